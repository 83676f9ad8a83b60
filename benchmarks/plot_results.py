"""Plots of the committed benchmark results (benchmarks/results/*.json) for the docs.

    python benchmarks/plot_results.py     # writes plan.png, memory.png, speed.png there
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def plot_plan(data: dict, out: Path) -> None:
    shapes = data["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=False)
    for ax, shape in zip(axes, shapes):
        rows = shape["rows"]
        batch = [r["batch"] for r in rows]
        ax.loglog(batch, [r["t_dense"] for r in rows], "o-", label="dense (build W, matmul)")
        ax.loglog(batch, [r["t_contract"] for r in rows], "s-", label="contract (through cores)")
        picked = [r["t_dense"] if r["picked"] == "dense" else r["t_contract"] for r in rows]
        ax.loglog(batch, picked, "k.", markersize=10, label="planner's pick")
        ax.set_title(shape["shape_name"])
        ax.set_xlabel("rows of x (batch x tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("wall time per x @ W.T (s)")
    axes[0].legend()
    threads = data["environment"].get("torch_threads", "?")
    fig.suptitle(f"MPO matmul: dense vs contract (rank 16, float32, {threads} CPU thread(s))")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_memory(data: dict, out: Path) -> None:
    rows = data["rows"]
    models = sorted({r["model"] for r in rows}, key=["tiny", "smollm2"].index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4))
    axes = axes if len(models) > 1 else [axes]
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        ax.bar([r["method"] for r in mine], [r["step_peak_mb"] for r in mine], color="tab:blue")
        ax.set_title(f"{model}: peak memory of one training step")
        ax.set_ylabel("MiB above the interpreter's baseline")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_speed(data: dict, out: Path) -> None:
    groups = data["training"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.2))
    axes = axes if len(groups) > 1 else [axes]
    for ax, group in zip(axes, groups):
        runs: dict[str, list[dict]] = {}
        for r in group["rows"]:
            runs.setdefault(r["method"], []).append(r)
        names = list(runs)
        mean = {m: {k: sum(r[k] for r in rs) / len(rs) for k in ("forward_s", "backward_s",
                                                                   "optimizer_s")}
                for m, rs in runs.items()}
        y = range(len(names))
        left = [0.0] * len(names)
        for key, label in (("forward_s", "forward"), ("backward_s", "backward"),
                           ("optimizer_s", "optimizer")):
            widths = [mean[m][key] for m in names]
            ax.barh(y, widths, left=left, label=label)
            left = [a + b for a, b in zip(left, widths)]
        floor = sum(mean["floor"].values())
        ax.axvline(floor, color="k", lw=1)
        ax.axvline(1.6 * floor, color="k", lw=1, ls="--", label="1.6 x floor")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        what = f"{group['tokens']} tokens" if group["workload"] == "stack" else "8 x 128 tokens"
        ax.set_title(f"{group['workload']}, {what}", fontsize=10)
        ax.set_xlabel("seconds per training step")
    axes[0].legend(fontsize=8)
    fig.suptitle("training step by method (float32, CPU); mean of the readings")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    plot_plan(json.loads((RESULTS / "plan.json").read_text()), RESULTS / "plan.png")
    plot_memory(json.loads((RESULTS / "memory.json").read_text()), RESULTS / "memory.png")
    plot_speed(json.loads((RESULTS / "speed.json").read_text()), RESULTS / "speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
