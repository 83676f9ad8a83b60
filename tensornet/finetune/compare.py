"""Compare methods on the same data, budget and seeds: results JSON, markdown table, plots.

Every (method, seed) run starts from a freshly loaded base model, trains for the same
number of steps on the same examples in the same order (the order depends on the seed
only), is evaluated on the same validation and test examples, and writes its adapter to
``out/<method>/seed<k>/adapter``. The summary gives, per method, the trainable
parameters and their share of the model, the final and best validation loss, the test
accuracy, the mean step time and the peak memory (mean and std over the seeds).

Plots: validation loss against step for all methods with a band of one std over the
seeds (the DoTA paper's Figure 2), and test accuracy against trainable parameters on a
log axis (its Figure 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_figure, write_text_atomic
from .callbacks import Callback
from .devices import is_main_process, wait_for_everyone
from .evaluate import evaluate_accuracy
from .examples import Splits
from .methods import DEFAULT_LR, MethodOptions, build_method
from .trainer import TrainConfig, train

__all__ = [
    "RESULTS_FILE",
    "TABLE_FILE",
    "LOSS_PLOT",
    "ACCURACY_PLOT",
    "run_compare",
    "summarize",
    "markdown_table",
    "plot_val_loss",
    "plot_accuracy_vs_params",
]

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
LOSS_PLOT = "val_loss_vs_step.png"
ACCURACY_PLOT = "accuracy_vs_params.png"

#: ``load_model(method)`` returns a fresh ``(model, tokenizer)`` for a run of ``method``
#: (full fine-tuning may want float32 master weights where the adapters' base is bf16).
ModelLoader = Callable[[str], tuple[Any, Any]]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals))


def run_compare(
    load_model: ModelLoader,
    methods: Sequence[str],
    seeds: Sequence[int],
    splits: Splits,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    options: MethodOptions | None = None,
    lr: dict[str, float] | None = None,
    max_new_tokens: int = 64,
    callback: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every method with every seed; write the results and plots.

    Parameters
    ----------
    load_model : callable
        ``load_model(method)`` returns a fresh ``(model, tokenizer)`` (called once per
        run).
    methods : sequence of str
        Names from :data:`tensornet.finetune.methods.METHODS`.
    seeds : sequence of int
        Each seed sets the data order and the random initializations.
    splits : Splits
        The same data for every run.
    config : TrainConfig
        The shared budget; its ``lr`` and ``seed`` are replaced per run.
    out_dir : str or PathLike
        Receives ``results.json``, ``results.md``, the two PNGs and one folder per run.
    options : MethodOptions, optional
        Ranks and targets (the paper's defaults).
    lr : dict, optional
        Learning rate per method; :data:`DEFAULT_LR` for the others.
    max_new_tokens : int
        Generation budget for the test accuracy.
    callback : callable, optional
        Receives ``("run", {...})`` before each run, ``("run_done", {...})`` after it,
        and the training events of :func:`tensornet.finetune.train.train` with ``method``
        and ``seed`` added.

    Returns
    -------
    dict
        What ``results.json`` holds: settings, one record per run, a summary per method
        and the paths of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emit = callback or (lambda event, info: None)
    opts = options or MethodOptions()
    lrs = {**DEFAULT_LR, **(lr or {})}
    runs: list[dict[str, Any]] = []
    for method in methods:
        for seed in seeds:
            run_cfg = dataclasses.replace(config, lr=lrs[method], seed=seed)
            emit("run", {"method": method, "seed": seed, "lr": run_cfg.lr})
            t0 = time.perf_counter()
            model, tokenizer = load_model(method)
            built = build_method(model, method, dataclasses.replace(opts, seed=seed))

            def relay(event: str, info: dict[str, Any], m: str = method, s: int = seed) -> None:
                emit(event, {**info, "method": m, "seed": s})

            cb: Callback = relay
            folder = out / method / f"seed{seed}"
            result = train(built, tokenizer, splits.train, splits.validation, run_cfg, folder,
                           callback=cb)
            if is_main_process():  # the other DDP processes wait at the barrier below
                acc, preds = evaluate_accuracy(
                    built.model, tokenizer, splits.test, max_new_tokens=max_new_tokens
                )
            else:
                acc, preds = math.nan, []
            wait_for_everyone()
            record = {
                **result.to_dict(),
                "seed": seed,
                "lr": run_cfg.lr,
                "test_accuracy": acc if acc == acc else None,  # NaN: none scored
                "test_predictions": preds,
                "adapter": str(folder / "adapter"),
                "wall_s": time.perf_counter() - t0,
            }
            runs.append(record)
            emit("run_done", record)
            del built, model
    summary = summarize(runs)
    results = {
        "settings": {
            "methods": list(methods),
            "seeds": list(seeds),
            "train": dataclasses.asdict(config) | {"lr": None},
            "lr": {m: lrs[m] for m in methods},
            "options": dataclasses.asdict(opts),
            "splits": splits.sizes(),
            "max_new_tokens": max_new_tokens,
        },
        "runs": runs,
        "summary": summary,
        "files": {
            "results": str(out / RESULTS_FILE),
            "table": str(out / TABLE_FILE),
            "loss_plot": str(out / LOSS_PLOT),
            "accuracy_plot": str(out / ACCURACY_PLOT),
        },
    }
    if is_main_process():
        write_text_atomic(out / TABLE_FILE, markdown_table(summary) + "\n")
        plot_val_loss(runs, out / LOSS_PLOT)
        plot_accuracy_vs_params(summary, out / ACCURACY_PLOT)
        write_text_atomic(out / RESULTS_FILE, json.dumps(results, indent=2, default=_json) + "\n")
    wait_for_everyone()
    return results


def _json(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): means and stds over its seeds."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for method, rs in by_method.items():
        row: dict[str, Any] = {
            "method": method,
            "seeds": [r["seed"] for r in rs],
            "trainable_params": rs[0]["trainable_params"],
            "total_params": rs[0]["total_params"],
            "trainable_share": rs[0]["trainable_share"],
            "memory_kind": rs[0]["memory_kind"],
        }
        for key in ("final_val_loss", "best_val_loss", "test_accuracy", "step_time_s",
                    "peak_memory_bytes"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in rs])
        rows.append(row)
    return rows


def _pm(mean: float, std: float, fmt: str, n: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{fmt}} ± {std:{fmt}}" if n > 1 else f"{mean:{fmt}}"


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table (mean ± std when there are several seeds)."""
    mem = "peak GPU memory" if summary and summary[0]["memory_kind"] != "rss" else "peak RSS"
    lines = [
        f"| method | trainable params | % of model | final val loss | best val loss "
        f"| test accuracy | step time (s) | {mem} (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary:
        n = len(r["seeds"])
        mib, mib_std = r["peak_memory_bytes"] / 2**20, r["peak_memory_bytes_std"] / 2**20
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {100 * r['trainable_share']:.3f}% "
            f"| {_pm(r['final_val_loss'], r['final_val_loss_std'], '.4f', n)} "
            f"| {_pm(r['best_val_loss'], r['best_val_loss_std'], '.4f', n)} "
            f"| {_pm(r['test_accuracy'], r['test_accuracy_std'], '.3f', n)} "
            f"| {_pm(r['step_time_s'], r['step_time_s_std'], '.2f', n)} "
            f"| {_pm(mib, mib_std, '.0f', n)} |"
        )
    return "\n".join(lines)


_LINES, _MARKERS = ("-", "--", ":", "-."), ("o", "s", "^", "D")


def plot_style(i: int) -> tuple[str, str, str]:
    """``(color, line style, marker)`` of the ``i``-th method of a plot, distinct for 40.

    matplotlib's default cycle has ten colors: the eleventh method would take the first
    one's; each further ten take the next line style and marker.
    """
    group = i // 10 % len(_LINES)
    return f"C{i % 10}", _LINES[group], _MARKERS[group]


def plot_val_loss(runs: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Validation loss against step per method: mean over seeds, band of one std."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    with atomic_figure(path) as ax:
        for i, (method, rs) in enumerate(by_method.items()):
            steps = sorted({s for r in rs for s, _ in r["val_loss"]})
            table = [dict(r["val_loss"]) for r in rs]
            mean, std = [], []
            for s in steps:
                m, d = _mean_std([t.get(s, math.nan) for t in table])
                mean.append(m)
                std.append(d)
            mean_a, std_a = np.array(mean), np.array(std)
            color, line, marker = plot_style(i)
            ax.plot(steps, mean_a, linestyle=line, marker=marker, ms=3, color=color,
                    label=f"{method} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(steps, mean_a - std_a, mean_a + std_a, color=color, alpha=0.2)
        ax.set(xlabel="step", ylabel="validation loss (per response token)")
        ax.set_title("validation loss vs step (mean ± std over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return Path(path)


def plot_accuracy_vs_params(
    summary: Sequence[dict[str, Any]], path: str | os.PathLike[str]
) -> Path:
    """Test accuracy against trainable parameters (log x axis), one point per method."""
    with atomic_figure(path) as ax:
        for i, r in enumerate(summary):
            color, _, marker = plot_style(i)
            ax.errorbar(
                [r["trainable_params"]], [r["test_accuracy"]],
                yerr=[r["test_accuracy_std"]] if len(r["seeds"]) > 1 else None,
                fmt=marker, color=color, capsize=3, label=r["method"],
            )
            ax.annotate(r["method"], (r["trainable_params"], r["test_accuracy"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set(xlabel="trainable parameters (log scale)", ylabel="test accuracy (exact match)")
        ax.set_title("accuracy vs trainable parameters", fontsize=10)
        ax.grid(alpha=0.3)
    return Path(path)
