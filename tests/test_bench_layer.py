"""benchmarks/bench_layer.py --quick: its code paths run, its records are complete."""

import math

from bench_helpers import run_quick, run_script


def test_quick_run_records_every_strategy(tmp_path):
    proc, result = run_quick("bench_layer.py", tmp_path)
    assert len(result["records"]) == 4  # two shapes x two batch sizes
    for rec in result["records"]:
        for key in ("floor_s", "dense_s", "contract_s", "auto_s", "model_dense_s",
                    "model_contract_s"):
            assert math.isfinite(rec[key]) and rec[key] > 0, (key, rec)
        assert rec["picked"] in ("dense", "contract")
        assert rec["picked_over_min"] >= 1.0
    assert [g["goal"] for g in result["goals"]] == ["picked / min"]
    assert "QUICK smoke run" in proc.stdout


def test_device_cuda_without_cuda_is_a_one_line_refusal():
    import torch

    if torch.cuda.is_available():  # a GPU machine runs the real thing instead
        return
    proc = run_script("bench_layer.py", "--quick", "--device", "cuda")
    assert proc.returncode == 2
    assert "finds no CUDA device" in proc.stderr
