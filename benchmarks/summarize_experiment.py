"""Combine the `tensornet compare` folders of benchmarks/experiment.sh into one result set.

    python benchmarks/summarize_experiment.py IN_DIR OUT_DIR [--expect LABEL,...]
                                              [--previous RESULTS_JSON]

Reads ``IN_DIR/*/results.json`` (one folder per label: dota, lora, ..., dota-r8) and, with
``--previous``, the folders of an earlier summary's ``results.json`` whose labels IN_DIR
does not have (their runs as that summary recorded them: labels run in another session
join the committed result without re-running the others). Writes to OUT_DIR:

- ``results.md``: the main table (every method at its default rank), the DoTA rank sweep
  (R = 8, 16, 32) and the settings, commands, dates and commit of the runs;
- ``results.json``: settings, both summaries and every run record without its test
  predictions (loss curves, best/final validation loss, accuracy, step time, memory, ...);
- ``val_loss.png`` (validation loss against step, mean ± std over seeds),
  ``accuracy_vs_params.png`` and ``rank_sweep.png``.

A run whose adapter rank differs from the default becomes its own method ("dota R=8"), so
the rank-sweep folders never mix with the main DoTA row. Labels of experiment.sh without a
finished folder are reported as missing; the output is made from what exists. The main
table is printed as well.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import re
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _environment import _git

from tensornet.cli.finetune import RUN_MARKER  # the marker holding each run's argv
from tensornet.finetune.compare import (
    RESULTS_FILE,
    markdown_table,
    plot_accuracy_vs_params,
    plot_val_loss,
    summarize,
)
from tensornet.finetune.defaults import DEFAULT_MODEL_NAME
from tensornet.finetune.io import save_figure_atomic, write_text_atomic
from tensornet.finetune.methods import MethodOptions
from tensornet.method_table import METHOD_TABLE

EXPERIMENT_SCRIPT = Path(__file__).resolve().parent / "experiment.sh"
TABLE_OUT, JSON_OUT = "results.md", "results.json"
LOSS_OUT, ACCURACY_OUT, SWEEP_OUT = "val_loss.png", "accuracy_vs_params.png", "rank_sweep.png"
SWEEP_METHOD = "dota"
TRAIN_KEYS = ("steps", "batch_size", "max_length", "warmup_ratio", "weight_decay",
              "max_grad_norm", "eval_every", "eval_batch_size", "checkpoint_every")


@dataclasses.dataclass
class Folder:
    label: str
    path: Path
    results: dict[str, Any]
    argv: list[str] | None  # the recorded `tensornet ...` arguments, if any
    started: float | None  # epoch seconds, from the run marker
    finished: float  # mtime of results.json
    #: a folder of an earlier summary (--previous): its runs as recorded there (relabelled,
    #: no predictions) and its settings; None for a folder read from IN_DIR
    recorded: tuple[list[dict[str, Any]], dict[str, Any]] | None = None


def expected_labels() -> list[str]:
    """The labels experiment.sh runs, in its order."""
    try:
        return re.findall(r"^run (\S+)", EXPERIMENT_SCRIPT.read_text(), flags=re.M)
    except OSError:
        return []


def load_folders(in_dir: Path, order: Sequence[str]) -> tuple[list[Folder], list[str]]:
    """Finished folders (expected labels first, in order) and labels still without results."""
    folders, unfinished = [], []
    rank = {label: i for i, label in enumerate(order)}
    subdirs = sorted((p for p in in_dir.iterdir() if p.is_dir()),
                     key=lambda p: (rank.get(p.name, len(rank)), p.name))
    for path in subdirs:
        result_file = path / RESULTS_FILE
        if not result_file.is_file():
            unfinished.append(path.name)
            continue
        marker = next((m for m in (path / RUN_MARKER, in_dir / RUN_MARKER) if m.is_file()), None)
        info = json.loads(marker.read_text()) if marker else {}
        folders.append(Folder(path.name, path, json.loads(result_file.read_text()),
                              info.get("argv"), info.get("time"), result_file.stat().st_mtime))
    return folders, unfinished


def load_previous(path: Path, skip: set[str]) -> list[Folder]:
    """The folders of an earlier summary's ``results.json``, but those labelled in ``skip``."""
    data = json.loads(path.read_text())
    shared, differing = data["settings"]["shared"], data["settings"]["differing"]
    folders = []
    for entry in data["folders"]:
        label = entry["label"]
        if label in skip:
            continue
        runs = [r for r in data["runs"] if r["folder"] == label]
        settings = {**shared, **{k: v[label] for k, v in differing.items() if label in v}}
        folders.append(Folder(label, Path(entry["path"]), {}, entry["argv"],
                              _epoch(entry["started"]), _epoch(entry["finished"]) or 0.0,
                              (runs, settings)))
    return folders


def _epoch(iso: str | None) -> float | None:
    return None if iso is None else datetime.datetime.fromisoformat(iso).timestamp()


def run_label(method: str, options: dict[str, Any]) -> tuple[str, int | None]:
    """The method's name, with its rank appended when that is not the default."""
    spec = next((m for m in METHOD_TABLE if m.name == method), None)
    key = spec.rank_option if spec is not None else None
    if key is None:
        return method, None
    symbol = "R" if spec.peft_type == "dota" else "r"  # an MPO's bond rank, else a rank r
    default = getattr(MethodOptions(), key)
    rank = options.get(key, default)
    return (method if rank == default else f"{method} {symbol}={rank}"), rank


def collect_runs(folders: Sequence[Folder]) -> list[dict[str, Any]]:
    """Every run record, relabelled, without test predictions; a repeated (label, seed) once.

    A folder trained in another dtype than most gets it appended ("full (float32)").
    """
    runs, seen = [], {}
    dtypes = {f.label: getattr(_parse_argv(f.argv), "dtype", None) for f in folders}
    common = Counter(dtypes.values()).most_common(1)[0][0] if dtypes else None
    for folder in folders:
        if folder.recorded is not None:  # relabelled when that summary was made
            for record in folder.recorded[0]:
                seen.setdefault((record["method"], record["seed"]), folder.label)
                runs.append(record)
            continue
        options = folder.results["settings"].get("options", {})
        for record in folder.results["runs"]:
            label, rank = run_label(record["method"], options)
            if dtypes[folder.label] != common:  # e.g. full fine-tuning in float32
                label = f"{label} ({dtypes[folder.label]})"
            key = (label, record["seed"])
            if key in seen:
                print(f"warning: {label} seed {record['seed']} in both {seen[key]} and "
                      f"{folder.label}; keeping {seen[key]}", file=sys.stderr)
                continue
            seen[key] = folder.label
            kept = {k: v for k, v in record.items() if k != "test_predictions"}
            runs.append({**kept, "method": label, "base_method": record["method"],
                         "rank": rank, "folder": folder.label})
    return runs


def sweep_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DoTA runs at every rank, labelled "dota R=<rank>", by increasing rank."""
    picked = [r for r in runs if r["base_method"] == SWEEP_METHOD]
    picked.sort(key=lambda r: r["rank"])
    return [{**r, "method": f"{SWEEP_METHOD} R={r['rank']}"} for r in picked]


def _parse_argv(argv: list[str] | None) -> argparse.Namespace | None:
    if not argv:
        return None
    from tensornet.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit:
        return None


def folder_settings(folder: Folder) -> dict[str, Any]:
    """The settings of one folder that should be the same for every folder."""
    if folder.recorded is not None:
        return dict(folder.recorded[1])
    s = folder.results["settings"]
    out: dict[str, Any] = {k: s["train"].get(k) for k in TRAIN_KEYS}
    out |= {f"n_{k}": v for k, v in s["splits"].items()}
    out |= {"seeds": s["seeds"], "max_new_tokens": s["max_new_tokens"],
            "num_cores": s["options"]["num_cores"],
            "target_modules": s["options"]["target_modules"]}
    args = _parse_argv(folder.argv)
    if args is not None:
        out |= {"model": args.model or DEFAULT_MODEL_NAME, "dtype": args.dtype,
                "task": args.task, "data": args.data, "data_seed": args.data_seed,
                "threads": args.threads}
    return out


def combine_settings(folders: Sequence[Folder]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings shared by every folder, and the others per folder."""
    per = {f.label: folder_settings(f) for f in folders}
    keys = list(dict.fromkeys(k for s in per.values() for k in s))
    shared, differing = {}, {}
    for key in keys:
        values = {label: s.get(key) for label, s in per.items()}
        if len({json.dumps(v) for v in values.values()}) == 1:
            shared[key] = next(iter(values.values()))
        else:
            differing[key] = values
    return shared, differing


def _utc(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    when = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return when.isoformat(timespec="seconds")


def provenance(folders: Sequence[Folder]) -> dict[str, Any]:
    """When the runs ran, the commit when the first one started, library commits since."""
    starts = [f.started for f in folders if f.started is not None]
    first = min(starts) if starts else min(f.finished for f in folders)
    commit = _git("log", "-1", "--format=%h %ci", f"--before=@{int(first)}")
    last = max(f.finished for f in folders)
    during = _git("log", "--format=%h", f"--since=@{int(first)}", f"--until=@{int(last) + 1}",
                  "--", ":/tensornet")
    return {
        "first_start": _utc(first),
        "last_finish": _utc(last),
        "commit_at_first_start": commit,
        "library_commits_during": during.split() if during else [],
        "summarized_at": _utc(datetime.datetime.now(datetime.timezone.utc).timestamp()),
        "summarized_commit": _git("rev-parse", "--short", "HEAD"),
    }


def plot_rank_sweep(summary: Sequence[dict[str, Any]], path: Path) -> Path:
    """Best validation loss and test accuracy against DoTA's rank R (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [int(r["method"].split("R=")[1]) for r in summary]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), constrained_layout=True)
    panels = (("best_val_loss", "best validation loss"), ("test_accuracy", "test accuracy"))
    for ax, (key, name) in zip(axes, panels):
        ax.errorbar(ranks, [r[key] for r in summary], fmt="o-", capsize=3,
                    yerr=[r[key + "_std"] if len(r["seeds"]) > 1 else 0 for r in summary])
        for rank, r in zip(ranks, summary):
            ax.annotate(f"{r['trainable_params'] / 1e6:.2f}M params (n={len(r['seeds'])})",
                        (rank, r[key]), textcoords="offset points", xytext=(5, 6), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.margins(x=0.3)  # room for the labels of the largest rank
        ax.set(xlabel="DoTA rank R", ylabel=name)
        ax.grid(alpha=0.3)
    fig.suptitle("DoTA rank sweep (mean ± std over seeds)", fontsize=10)
    try:
        return save_figure_atomic(fig, path, dpi=120)
    finally:
        plt.close(fig)


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def render_markdown(main: list[dict[str, Any]], sweep: list[dict[str, Any]],
                    runs: Sequence[dict[str, Any]], folders: Sequence[Folder],
                    shared: dict[str, Any], differing: dict[str, Any],
                    prov: dict[str, Any], missing: Sequence[str]) -> str:
    lines = [f"# Fine-tuning comparison on {shared.get('model', 'the default model')}", ""]
    if missing:
        lines += [f"Not finished when summarized (left out): {', '.join(missing)}.", ""]
    lines += ["## Main table (every method at its default rank)", "",
              "Mean ± std over the seeds; validation loss per response token, test accuracy "
              "as exact match.", "", markdown_table(main), "", f"![validation loss]({LOSS_OUT})",
              "", f"![accuracy vs parameters]({ACCURACY_OUT})", "",
              "## DoTA rank sweep", ""]
    if sweep:
        lines += [markdown_table(sweep), "", f"![rank sweep]({SWEEP_OUT})", ""]
    else:
        lines += ["No DoTA runs yet.", ""]
    lines += ["## Settings", ""]
    lines += [f"- {key}: {_value(value)}" for key, value in shared.items() if value is not None]
    for key, values in differing.items():
        per = "; ".join(f"{label}: {_value(v)}" for label, v in values.items())
        lines.append(f"- {key} (differs): {per}")
    lrs = dict.fromkeys(f"{r['method']} {r['lr']:g}" for r in runs)
    lines += [f"- learning rate: {', '.join(lrs)}", "", "## Commands", "", "```"]
    for f in folders:
        command = ("tensornet " + shlex.join(f.argv) if f.argv
                   else f"(not recorded; see {EXPERIMENT_SCRIPT.name})")
        lines.append(f"# {f.label}: {command}")
    lines += ["```", "", f"(read from each folder's {RUN_MARKER}; benchmarks/"
              f"{EXPERIMENT_SCRIPT.name} runs one such process per label)", "",
              "## Provenance", "",
              f"- runs: first started {prov['first_start']}, last finished "
              f"{prov['last_finish']} (UTC)",
              f"- commit checked out when the first run started: "
              f"{prov['commit_at_first_start']} (last commit before that time; the runs do "
              "not record it themselves)"]
    if prov["library_commits_during"]:
        during = prov["library_commits_during"]
        names = ", ".join(during) if len(during) <= 3 else f"{during[-1]} to {during[0]}"
        lines.append(f"- commits to tensornet/ while the runs ran: {len(during)} ({names}); "
                     "the later runs may have used them")
    lines.append(f"- summarized {prov['summarized_at']} at commit {prov['summarized_commit']}")
    return "\n".join(lines) + "\n"


def _strict(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("in_dir", type=Path, help="folder of compare folders (one per label)")
    parser.add_argument("out_dir", type=Path, help="receives results.md, results.json, PNGs")
    parser.add_argument("--expect", type=lambda s: [x for x in s.split(",") if x],
                        default=None, metavar="LABEL,...",
                        help=f"labels to report as missing (default: {EXPERIMENT_SCRIPT.name}'s)")
    parser.add_argument("--previous", type=Path, default=None, metavar="RESULTS_JSON",
                        help="an earlier summary's results.json: its folders whose labels "
                             "IN_DIR lacks are combined too")
    args = parser.parse_args(argv)
    expect = expected_labels() if args.expect is None else args.expect
    if not args.in_dir.is_dir():
        print(f"error: IN_DIR {args.in_dir} is not a folder", file=sys.stderr)
        return 2
    folders, unfinished = load_folders(args.in_dir, expect)
    if args.previous is not None:
        earlier = load_previous(args.previous, {f.label for f in folders})
        rank = {label: i for i, label in enumerate(expect)}
        folders = sorted(folders + earlier, key=lambda f: rank.get(f.label, len(rank)))
        print(f"from {args.previous}: {', '.join(f.label for f in earlier) or 'nothing'}")
    done = {f.label for f in folders}
    missing = [label for label in expect if label not in done]
    if unfinished:
        print(f"unfinished (no {RESULTS_FILE}): {', '.join(unfinished)}")
    if missing:
        print(f"missing labels: {', '.join(missing)}")
    if not folders:
        print(f"error: no {args.in_dir}/*/{RESULTS_FILE} yet", file=sys.stderr)
        return 1
    print(f"combining: {', '.join(f.label for f in folders)}")

    runs = collect_runs(folders)
    main_runs = [r for r in runs if r["method"] == r["base_method"]]
    main_runs += [r for r in runs if r["method"] != r["base_method"]
                  and r["base_method"] != SWEEP_METHOD]  # other non-default ranks
    main_summary = summarize(main_runs)
    sweep = sweep_runs(runs)
    sweep_summary = summarize(sweep) if sweep else []
    shared, differing = combine_settings(folders)
    prov = provenance(folders)

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / TABLE_OUT, render_markdown(
        main_summary, sweep_summary, runs, folders, shared, differing, prov, missing))
    plot_val_loss(main_runs, out / LOSS_OUT)
    plot_accuracy_vs_params(main_summary, out / ACCURACY_OUT)
    if sweep_summary:
        plot_rank_sweep(sweep_summary, out / SWEEP_OUT)
    else:
        (out / SWEEP_OUT).unlink(missing_ok=True)  # no stale plot next to a table without it
    combined = {
        "settings": {"shared": shared, "differing": differing,
                     "lr": {r["method"]: r["lr"] for r in runs}},
        "folders": [{"label": f.label, "path": str(f.path), "argv": f.argv,
                     "started": _utc(f.started), "finished": _utc(f.finished)} for f in folders],
        "missing": missing,
        "provenance": prov,
        "summary": main_summary,
        "rank_sweep": sweep_summary,
        "runs": runs,
    }
    text = json.dumps(_strict(combined), indent=2, default=str, allow_nan=False)
    write_text_atomic(out / JSON_OUT, text + "\n")
    print("\nmain table:\n" + markdown_table(main_summary))
    if sweep_summary:
        print("\nDoTA rank sweep:\n" + markdown_table(sweep_summary))
    print("\nwrote: " + ", ".join(str(out / n) for n in (TABLE_OUT, JSON_OUT, LOSS_OUT,
                                                          ACCURACY_OUT, SWEEP_OUT)
                                  if (out / n).exists()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
