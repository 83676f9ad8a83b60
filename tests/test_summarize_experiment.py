"""benchmarks/summarize_experiment.py on tiny synthetic `tensornet compare` folders."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import summarize_experiment  # noqa: E402

TRAIN = {"steps": 10, "batch_size": 2, "lr": None, "warmup_ratio": 0.03, "weight_decay": 0.0,
         "max_grad_norm": 1.0, "max_length": 64, "eval_every": 5, "checkpoint_every": 0,
         "seed": 0, "eval_batch_size": 8}
PARAMS = {("dota", 8): 400_000, ("dota", 16): 1_431_900, ("lora", 16): 6_635_520,
          ("lotr", 16): 500_000, ("lotr", 8): 250_000}


def _record(method, rank, seed):
    loss = 1.0 / rank + 0.01 * seed + (0.2 if method == "lora" else 0.0)
    return {
        "method": method, "seed": seed, "lr": 3e-4,
        "trainable_params": PARAMS[method, rank], "total_params": 135_000_000,
        "trainable_share": PARAMS[method, rank] / 135_000_000, "memory_kind": "rss",
        "train_loss": [[1, 2.0], [10, 1.0]], "val_loss": [[0, 2.0], [5, 1.5], [10, loss]],
        "best_val_loss": loss, "final_val_loss": loss, "best_step": 10,
        "test_accuracy": 0.1 * seed, "step_time_s": 1.0, "peak_memory_bytes": 2**30,
        "test_predictions": [{"question": "1+1", "answer": "2", "prediction": "2"}],
    }


def _folder(root, label, method, *, rank=16, lora_rank=32):
    out = root / label
    out.mkdir(parents=True)
    settings = {"methods": [method], "seeds": [0, 1], "train": TRAIN, "lr": {method: 3e-4},
                "options": {"rank": rank, "num_cores": 5, "lora_rank": lora_rank,
                            "pissa_rank": 16, "target_modules": ["q_proj"], "seed": 0},
                "splits": {"train": 20, "validation": 4, "test": 4}, "max_new_tokens": 8}
    key = "lora_rank" if method == "lora" else "rank"
    runs = [_record(method, 16 if method == "lora" else rank, s) for s in (0, 1)]
    (out / "results.json").write_text(json.dumps(
        {"settings": settings, "runs": runs, "summary": [], "files": {}}))
    argv = ["compare", "--dtype", "bfloat16", "--methods", method, f"--{key.replace('_', '-')}",
            str(rank if key == "rank" else lora_rank), "--out", str(out)]
    (out / "tensornet-run.json").write_text(json.dumps({"argv": argv, "time": 1.7e9}))


def test_summarize_experiment(tmp_path, capsys):
    runs = tmp_path / "runs"
    _folder(runs, "dota", "dota")
    _folder(runs, "lora", "lora", lora_rank=32)
    _folder(runs, "dota-r8", "dota", rank=8)
    (runs / "qdota").mkdir()  # still running: no results.json
    out = tmp_path / "out"
    assert summarize_experiment.main(
        [str(runs), str(out), "--expect", "dota,lora,qdota,dota-r8,dota-r32"]) == 0
    stdout = capsys.readouterr().out
    assert "missing labels: qdota, dota-r32" in stdout
    assert "| dota | 1,431,900 |" in stdout and "| lora | 6,635,520 |" in stdout

    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["summary"]] == ["dota", "lora"]
    assert [r["method"] for r in data["rank_sweep"]] == ["dota R=8", "dota R=16"]
    assert data["rank_sweep"][0]["trainable_params"] == 400_000
    assert data["missing"] == ["qdota", "dota-r32"]
    assert len(data["runs"]) == 6
    assert all("test_predictions" not in r and r["val_loss"] for r in data["runs"])
    assert "test_predictions" not in (out / "results.json").read_text()
    assert data["settings"]["shared"]["dtype"] == "bfloat16"

    md = (out / "results.md").read_text()
    main_table, sweep_table = md.split("## DoTA rank sweep")
    assert "| dota R=8 |" in sweep_table and "| dota R=16 |" in sweep_table
    rows = [line.split(" | ")[0] for line in main_table.splitlines() if line.startswith("| ")]
    assert rows[2:] == ["| dota", "| lora"]  # after header and rule: no rank-sweep rows
    assert "tensornet compare --dtype bfloat16 --methods dota --rank 8" in md
    for png in ("val_loss.png", "accuracy_vs_params.png", "rank_sweep.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_run_later_join_an_earlier_summary(tmp_path, capsys):
    # the committed summary was made from folders that no longer exist; two labels run
    # in another session join it, a re-run label replaces its earlier runs
    first = tmp_path / "first"
    _folder(first, "dota", "dota")
    _folder(first, "lora", "lora")
    _folder(first, "dota-r8", "dota", rank=8)
    committed = tmp_path / "committed"
    expect = "dota,lora,lotr,dota-r8,lotr-r8"
    assert summarize_experiment.main([str(first), str(committed), "--expect", expect]) == 0
    later = tmp_path / "later"
    _folder(later, "lotr", "lotr")
    _folder(later, "lotr-r8", "lotr", rank=8)
    _folder(later, "lora", "lora")  # re-run: replaces the committed lora runs
    out = tmp_path / "out"
    assert summarize_experiment.main([
        str(later), str(out), "--expect", expect,
        "--previous", str(committed / "results.json")]) == 0
    assert "from " + str(committed / "results.json") + ": dota, dota-r8" in capsys.readouterr().out

    data = json.loads((out / "results.json").read_text())
    assert [f["label"] for f in data["folders"]] == ["dota", "lora", "lotr", "dota-r8", "lotr-r8"]
    assert data["missing"] == []
    # LoTR's rank is r (a matrix rank), DoTA's R (an MPO's bond rank)
    assert [r["method"] for r in data["summary"]] == ["dota", "lora", "lotr", "lotr r=8"]
    assert [r["method"] for r in data["rank_sweep"]] == ["dota R=8", "dota R=16"]
    assert len(data["runs"]) == 10
    assert {r["folder"] for r in data["runs"] if r["base_method"] == "lora"} == {"lora"}
    assert [r["path"] for r in data["folders"] if r["label"] == "lora"] == [str(later / "lora")]
    before = json.loads((committed / "results.json").read_text())
    kept = [r for r in before["runs"] if r["folder"] == "dota"]
    assert [r for r in data["runs"] if r["folder"] == "dota"] == kept
    assert data["settings"]["shared"]["dtype"] == "bfloat16"
    md = (out / "results.md").read_text()
    assert "tensornet compare --dtype bfloat16 --methods dota --rank 16" in md
    assert "tensornet compare --dtype bfloat16 --methods lotr --rank 8" in md
