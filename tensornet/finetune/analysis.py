"""MPO analysis of a causal LM's target layers: the data behind ``tensornet decompose``.

For every target layer (q, k, v, up, down by default): the modes, the ranks, the
parameters and the relative reconstruction error of :func:`tensornet.mpo_decompose` at
the chosen ``N`` and ``R`` (or tolerance), and a sweep of the error against the rank for
one layer of each kind. Written as JSON, CSV and a PNG plot.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._atomic import atomic_figure, write_text_atomic
from ..adapters import LLAMA_TARGETS, LayerReport, plan_dota
from ..adapters.base import dense_weight
from ..decompose import mpo_decompose

__all__ = ["LayerDecomposition", "DecomposeReport", "decompose_model", "write_report"]

JSON_FILE = "decompose.json"
CSV_FILE = "decompose.csv"
PLOT_FILE = "error_vs_rank.png"


@dataclass(frozen=True, kw_only=True)
class LayerDecomposition(LayerReport):
    """One layer's MPO at the chosen ``N`` and ``R``.

    The adapters' :class:`~tensornet.adapters.LayerReport` (here with the decomposition's
    ranks, parameters and relative error) and the kind of the layer (``"q"``, ``"up"``,
    ...), a keyword argument.
    """

    kind: str

    @property
    def dense_params(self) -> int:
        """Entries of the dense weight, ``out_features * in_features``."""
        return self.out_features * self.in_features


#: The keys of a layer's entry in ``decompose.json``, in their order.
_LAYER_KEYS = ("name", "kind", "out_features", "in_features", "out_modes", "in_modes", "ranks",
               "num_params", "dense_params", "relative_error")


@dataclass
class DecomposeReport:
    """Per-layer decompositions, totals and the rank sweep per kind of layer."""

    model: str
    num_cores: int
    rank: int | None
    tol: float | None
    layers: list[LayerDecomposition] = field(default_factory=list)
    #: kind -> list of (rank cap, parameters, relative error), for the sweep's layer
    sweep: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)
    sweep_layers: dict[str, str] = field(default_factory=dict)
    total_params: int = 0

    @property
    def mpo_params(self) -> int:
        """Sum of the MPO parameters of every layer."""
        return sum(lay.num_params for lay in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "model": self.model,
            "num_cores": self.num_cores,
            "rank": self.rank,
            "tol": self.tol,
            "total_model_params": self.total_params,
            "mpo_params": self.mpo_params,
            "layers": [{k: getattr(lay, k) for k in _LAYER_KEYS} for lay in self.layers],
            "sweep": {
                k: [{"rank": r, "params": p, "relative_error": e} for r, p, e in pts]
                for k, pts in self.sweep.items()
            },
            "sweep_layers": self.sweep_layers,
        }


def _kind(name: str, targets: Sequence[str]) -> str:
    last = name.rsplit(".", 1)[-1]
    return last.removesuffix("_proj") if last in targets else last


def decompose_model(
    model: nn.Module,
    *,
    model_name: str = "model",
    num_cores: int = 5,
    rank: int | None = 16,
    tol: float | None = None,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    sweep_ranks: Sequence[int] = (4, 8, 16, 32, 64),
) -> DecomposeReport:
    """Decompose every target layer of ``model`` and sweep the rank per kind of layer.

    The shapes are validated first with :func:`tensornet.adapters.plan_dota`, so an
    ``N`` or ``R`` the model cannot take raises before any work.

    Raises
    ------
    tensornet.errors.ConfigError
        A target that matches nothing, or a dimension that cannot be split into
        ``num_cores`` modes.
    """
    plan = plan_dota(model, target_modules=tuple(target_modules), num_cores=num_cores,
                     rank=rank)
    report = DecomposeReport(model_name, num_cores, rank, tol)
    report.total_params = sum(p.numel() for p in model.parameters())
    first_of_kind: dict[str, tuple[str, Any]] = {}
    for lay in plan.layers:
        weight = dense_weight(model.get_submodule(lay.name))
        shape = (lay.out_modes, lay.in_modes)
        mpo = mpo_decompose(weight, shape, rank, tol=tol)
        kind = _kind(lay.name, target_modules)
        first_of_kind.setdefault(kind, (lay.name, weight))
        report.layers.append(
            LayerDecomposition(
                lay.name, lay.out_features, lay.in_features, tuple(lay.out_modes),
                tuple(lay.in_modes), tuple(mpo.ranks), int(mpo.num_params),
                float(mpo.relative_error), kind=kind,
            )
        )
    for kind, (name, weight) in first_of_kind.items():
        report.sweep_layers[kind] = name
        lay = next(x for x in plan.layers if x.name == name)
        for r in sweep_ranks:
            mpo = mpo_decompose(weight, (lay.out_modes, lay.in_modes), r)
            report.sweep.setdefault(kind, []).append(
                (int(r), int(mpo.num_params), float(mpo.relative_error))
            )
    return report


def _csv_text(report: DecomposeReport) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["layer", "kind", "out_features", "in_features", "out_modes", "in_modes",
                     "ranks", "params", "dense_params", "relative_error"])
    for lay in report.layers:
        writer.writerow([
            lay.name, lay.kind, lay.out_features, lay.in_features,
            "x".join(map(str, lay.out_modes)), "x".join(map(str, lay.in_modes)),
            "-".join(map(str, lay.ranks)), lay.num_params, lay.dense_params,
            f"{lay.relative_error:.6f}",
        ])
    return buf.getvalue()


def write_report(report: DecomposeReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``decompose.json``, ``decompose.csv`` and ``error_vs_rank.png`` atomically.

    Returns
    -------
    dict
        ``{"json": path, "csv": path, "plot": path}`` (no ``plot`` without a sweep).
    """
    out = Path(out_dir)
    paths = {
        "json": write_text_atomic(out / JSON_FILE, json.dumps(report.to_dict(), indent=2) + "\n"),
        "csv": write_text_atomic(out / CSV_FILE, _csv_text(report)),
    }
    if report.sweep:
        paths["plot"] = _plot(report, out / PLOT_FILE)
    return paths


def _plot(report: DecomposeReport, path: Path) -> Path:
    with atomic_figure(path) as ax:
        for i, (kind, pts) in enumerate(report.sweep.items()):
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "o-", color=f"C{i}",
                    label=f"{kind} ({report.sweep_layers[kind]})")
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in report.sweep.values() for p in pts})
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.minorticks_off()
        ax.set(xlabel="rank cap R", ylabel="relative error ||W - MPO||_F / ||W||_F")
        ax.set_title(f"{report.model}: MPO error vs rank (N={report.num_cores})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return path
