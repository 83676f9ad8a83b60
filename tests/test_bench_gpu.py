"""benchmarks/bench_gpu.py: the CPU smoke run, failures recorded and fatal, skips, no CUDA."""

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
from _gpu_goals import GOALS, GOALS_GENERATION, goals  # noqa: E402
from _record import Record  # noqa: E402

SCRIPT = BENCHMARKS / "bench_gpu.py"
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
TRAINING = [w for w in bench_gpu.WORKLOADS if w != "inference"]


def _run(*args):
    # one thread: the test machine's 2 cores are shared, more would oversubscribe them
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "gpu.json"
    proc = _run("--device", "cpu", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _quick(tmp_path, *workloads):
    """In-process arguments of a quick CPU run of ``workloads``, and its JSON path."""
    out = tmp_path / "gpu.json"
    return ["--device", "cpu", "--quick", "--json", str(out), "--workloads", *workloads], out


def _positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _measured(row):
    return (_positive(row["step_s"]) and row["trainable_params"] > 0
            and math.isfinite(row["create_s"]) and row["create_s"] >= 0
            and math.isfinite(row["peak_mb"]) and row["peak_mb"] >= row["held_mb"])


def test_every_method_timed(smoke):
    _, result = smoke
    assert result["failures"] == []
    assert [g["workload"] for g in result["training"]] == TRAINING
    for group in result["training"]:
        rows = {r["method"]: r for r in group["rows"]}
        assert list(rows) == list(bench_gpu.WORKLOAD_METHODS[group["workload"]])
        for method, row in rows.items():
            if method in bench_gpu.QUANTIZED and not HAVE_BNB:
                assert row["skipped"] == "bitsandbytes not installed"
                continue
            assert "skipped" not in row and "error" not in row, row
            assert _measured(row), row


def test_prefill_speeds(smoke):
    _, result = smoke
    group = result["training"][TRAINING.index("llama7b")]
    assert "full" not in {r["method"] for r in group["rows"]}
    prefill = group["prefill"]
    measured = [m for m in bench_gpu.WORKLOAD_METHODS["llama7b"]
                if HAVE_BNB or m not in bench_gpu.QUANTIZED]
    assert set(prefill["unmerged"]) == {"rounds", "base", *measured}
    assert set(prefill["merged"]) == {"rounds", "base", "dota"}
    for kind in ("unmerged", "merged"):
        assert all(_positive(v) for k, v in prefill[kind].items() if k != "rounds"), prefill


def test_generation_speeds(smoke):
    _, result = smoke
    assert [r["batch"] for r in result["inference"]["batches"]] == [1, 8]
    for rec in result["inference"]["batches"]:
        for model in ("base", "unmerged", "merged"):
            assert _positive(rec[f"{model}_tokens_per_s"]), rec


def test_goals_listed(smoke):
    stdout, result = smoke
    names = [g["name"] for g in result["goals"]]
    assert names == [f"{w}: {g[0]}" for w in TRAINING for g in GOALS[w]] + [
        f"generation: {kind} / base tokens/s, batch {b}"
        for b in (1, 8) for kind, _ in GOALS_GENERATION]
    for g in result["goals"]:
        # N/A: a CPU reading of 0 MB (resident set sizes are indicative only)
        assert g["verdict"] in ("PASS", "FAIL", "SKIPPED", "N/A")
        assert g["verdict"] in ("SKIPPED", "N/A") or _positive(g["value"])
    assert result["settings"]["device"] == "cpu" and result["settings"]["dtype"] == "float32"
    assert "(cpu smoke run: goals are for CUDA)" in stdout
    assert "# device            cpu" in stdout
    assert "FAILED" not in stdout


def test_failed_method_recorded_and_fatal(tmp_path, monkeypatch, capsys, one_thread):
    apply = bench_gpu.apply_method

    def failing(model, method, *args):
        if method == "dota":
            raise RuntimeError("forced failure")
        return apply(model, method, *args)

    monkeypatch.setattr(bench_gpu, "apply_method", failing)
    argv, out = _quick(tmp_path, "layer", "llama7b")
    assert bench_gpu.main(argv) == 1
    result = json.loads(out.read_text())
    for group in result["training"]:
        rows = {r["method"]: r for r in group["rows"]}
        error = rows["dota"]["error"]
        assert error.startswith("RuntimeError: forced failure\n") and "in failing" in error
        assert "skipped" not in rows["dota"] and "step_s" not in rows["dota"]
        assert all(_measured(r) for m, r in rows.items()
                   if m != "dota" and (HAVE_BNB or m not in bench_gpu.QUANTIZED))
    assert "dota" not in result["training"][1]["prefill"]["unmerged"]
    assert "merged" not in result["training"][1]["prefill"]
    assert result["failures"] == [f"{w}/dota: RuntimeError: forced failure"
                                  for w in ("layer", "llama7b")]
    verdicts = {g["name"]: g["verdict"] for g in result["goals"]}
    assert verdicts["layer: dota / lora step"] == "ERROR"
    assert verdicts["llama7b: dota merged / base prefill"] == "ERROR"
    assert verdicts["layer: qdota / qlora peak memory"] != "ERROR"
    stdout = capsys.readouterr().out
    assert "  dota     FAILED: RuntimeError: forced failure" in stdout
    assert "# FAILED layer/dota: RuntimeError: forced failure" in stdout


def test_failed_part_recorded_and_fatal(tmp_path, monkeypatch, one_thread):
    def broken(*args):
        raise ValueError("no generation today")

    monkeypatch.setattr(bench_gpu, "inference", broken)
    argv, out = _quick(tmp_path, "inference")
    assert bench_gpu.main(argv) == 1
    result = json.loads(out.read_text())
    assert result["inference"]["error"].startswith("ValueError: no generation today")
    assert result["failures"] == ["inference: ValueError: no generation today"]
    assert {g["verdict"] for g in result["goals"]} == {"ERROR"}


class _Crash(BaseException):
    """Stands for what kills the process (no ``except Exception`` catches it)."""


def test_json_written_before_a_later_crash(tmp_path, monkeypatch, one_thread):
    def crash(*args):
        raise _Crash

    monkeypatch.setattr(bench_gpu, "inference", crash)
    argv, out = _quick(tmp_path, "smollm2", "inference")
    with pytest.raises(_Crash):
        bench_gpu.main(argv)
    result = json.loads(out.read_text())
    assert [g["workload"] for g in result["training"]] == ["smollm2"]
    assert _measured(result["training"][0]["rows"][0])
    assert "goals" not in result


def test_skips_quantized_only_without_bitsandbytes(capsys, one_thread):
    args = argparse.Namespace(device=torch.device("cpu"), dtype=torch.float32, quick=True,
                              layers=1, steps=1, seconds=0.0, have_bnb=False)
    group = {"workload": "layer"}
    run = Record(None, {"training": [group]})
    bench_gpu.training("layer", args, run, group)
    rows = {r["method"]: r for r in group["rows"]}
    assert all(rows[m] == {"method": m, "skipped": "bitsandbytes not installed"}
               for m in bench_gpu.QUANTIZED)
    assert run.failures == []
    assert "qdota    skipped: bitsandbytes not installed" in capsys.readouterr().out
    verdicts = goals(run.result, cpu=True)
    assert [g["verdict"] == "SKIPPED" for g in verdicts] == [False, False, True]
    assert "SKIPPED (bitsandbytes not installed)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_unavailable_exits_2():
    proc = _run("--device", "cuda", "--quick")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "--device cpu" in lines[0]
