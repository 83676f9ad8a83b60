"""benchmarks/bench_gpu.py: the CPU smoke run, the skip without bitsandbytes, no CUDA."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_gpu  # noqa: E402

SCRIPT = BENCHMARKS / "bench_gpu.py"
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _run(*args):
    # one thread: the test machine's 2 cores are shared, more would oversubscribe them
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "gpu.json"
    proc = _run("--device", "cpu", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_method_timed(smoke):
    _, result = smoke
    assert [g["workload"] for g in result["training"]] == ["layer", "smollm2"]
    for group in result["training"]:
        rows = {r["method"]: r for r in group["rows"]}
        assert list(rows) == list(bench_gpu.METHODS)
        for method, row in rows.items():
            if method in bench_gpu.QUANTIZED and not HAVE_BNB:
                assert row["skipped"] == "bitsandbytes not installed"
                continue
            assert "skipped" not in row, row
            assert _positive(row["step_s"]), row
            assert row["trainable_params"] > 0
            assert math.isfinite(row["peak_mb"]) and row["peak_mb"] >= row["held_mb"]


def test_generation_speeds(smoke):
    _, result = smoke
    assert [r["batch"] for r in result["inference"]] == [1, 8]
    for rec in result["inference"]:
        for model in ("base", "unmerged", "merged"):
            assert _positive(rec[f"{model}_tokens_per_s"]), rec


def test_goals_listed(smoke):
    stdout, result = smoke
    names = [g["name"] for g in result["goals"]]
    assert names == [
        f"{w}: {a} / {b} {'step' if key == 'step_s' else 'peak memory'}"
        for w in ("layer", "smollm2") for a, b, key, _, _ in bench_gpu.GOALS
    ] + ["merged / base tokens/s, batch 1", "merged / base tokens/s, batch 8"]
    for g in result["goals"]:
        assert g["verdict"] in ("PASS", "FAIL", "SKIPPED")
        assert g["verdict"] == "SKIPPED" or _positive(g["value"])
    assert result["settings"]["device"] == "cpu" and result["settings"]["dtype"] == "float32"
    assert "(cpu smoke run: goals are for CUDA)" in stdout
    assert "# device            cpu" in stdout


def test_skips_quantized_without_bitsandbytes(capsys, one_thread):
    args = argparse.Namespace(device=torch.device("cpu"), dtype=torch.float32, quick=True,
                              layers=1, steps=1, seconds=0.0, have_bnb=False)
    group = bench_gpu.training("layer", args)
    rows = {r["method"]: r for r in group["rows"]}
    assert all(rows[m] == {"method": m, "skipped": "bitsandbytes not installed"}
               for m in bench_gpu.QUANTIZED)
    assert "qdota    skipped: bitsandbytes not installed" in capsys.readouterr().out
    goals = bench_gpu.goals({"training": [group]}, cpu=True)
    assert [g["verdict"] == "SKIPPED" for g in goals] == [False, False, True]
    assert "SKIPPED (bitsandbytes not installed)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_unavailable_exits_2():
    proc = _run("--device", "cuda", "--quick")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "--device cpu" in lines[0]
