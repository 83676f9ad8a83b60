"""benchmarks/bench_layer.py --quick: its code paths run, its records are complete."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layer.py"


def test_quick_run_records_every_strategy(tmp_path):
    out = tmp_path / "layer.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
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
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cuda"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 2
    assert "finds no CUDA device" in proc.stderr
