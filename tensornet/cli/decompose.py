"""``tensornet decompose``: the MPO report of a causal LM's target layers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..finetune.defaults import DEFAULT_OPTIONS
from ._args import print_table, rank_arg, rank_list_arg, tol_arg
from ._model import add_model_args, load, model_name, setup

__all__ = ["add_command", "add_decompose_args", "decompose"]


def _print_decomposition(report: Any, *, full: bool) -> None:
    if full:
        rows = [
            [lay.name, f"{lay.out_features}x{lay.in_features}", "x".join(map(str, lay.out_modes)),
             "x".join(map(str, lay.in_modes)), "-".join(map(str, lay.ranks)),
             f"{lay.num_params:,}", f"{lay.relative_error:.4f}"]
            for lay in report.layers
        ]
        print_table(["layer", "shape", "out modes", "in modes", "ranks", "params",
                     "rel. error"], rows)
        print()
    by_kind: dict[str, list[Any]] = {}
    for lay in report.layers:
        by_kind.setdefault(lay.kind, []).append(lay)
    rows = []
    for kind, lays in by_kind.items():
        first, errs = lays[0], [x.relative_error for x in lays]
        rows.append([
            kind, str(len(lays)), f"{first.out_features}x{first.in_features}",
            "x".join(map(str, first.out_modes)), "x".join(map(str, first.in_modes)),
            "-".join(map(str, first.ranks)), f"{first.num_params:,}",
            f"{sum(errs) / len(errs):.4f}", f"{min(errs):.4f}", f"{max(errs):.4f}",
        ])
    print_table(["kind", "layers", "shape", "out modes", "in modes", "ranks", "params/layer",
                 "mean err", "min err", "max err"], rows)
    share = 100 * report.mpo_params / report.total_params if report.total_params else 0
    print(f"\n{report.mpo_params:,} MPO parameters in {len(report.layers)} layers "
          f"({share:.3f}% of the model's {report.total_params:,})")
    if report.sweep:
        ranks = [r for r, _, _ in next(iter(report.sweep.values()))]
        print("\nerror vs rank (first layer of each kind):")
        print_table(["kind", *[f"R={r}" for r in ranks]],
                    [[k, *[f"{e:.4f}" for _, _, e in pts]] for k, pts in report.sweep.items()])


def decompose(args: argparse.Namespace, model: Any, out: Path, *, full: bool,
              rank: int | None) -> Any:
    """Decompose ``model``'s targets, print the report and write its files."""
    from ..finetune.analysis import decompose_model, write_report

    num_cores = args.num_cores or DEFAULT_OPTIONS["num_cores"]
    targets = list(args.targets or DEFAULT_OPTIONS["targets"])  # type: ignore[call-overload]
    report = decompose_model(
        model, model_name=model_name(args.model), num_cores=num_cores, rank=rank,
        tol=args.tol, target_modules=targets, sweep_ranks=args.sweep_ranks,
    )
    tol = "" if args.tol is None else f", tol={args.tol:g}"
    print(f"MPO decomposition of {report.model}: {len(report.layers)} target layers, "
          f"N={num_cores}, R={'full' if rank is None else rank}{tol}; W is "
          f"(out_features, in_features)\n")
    _print_decomposition(report, full=full)
    paths = write_report(report, out)
    print("\nfiles: " + ", ".join(str(p) for p in paths.values()))
    return report


def _cmd_decompose(args: argparse.Namespace) -> int:
    setup(args)
    model, _ = load(args.model, "float32" if args.dtype == "float16" else args.dtype)
    decompose(args, model, Path(args.out), full=True, rank=args.rank)
    return 0


def add_decompose_args(p: argparse.ArgumentParser, *, with_rank: bool = True) -> None:
    """--rank (unless the command has its own), --tol and --sweep-ranks."""
    if with_rank:
        p.add_argument("--rank", type=rank_arg, default=16, metavar="R",
                       help="rank cap R of every bond, or 'full' (default: 16)")
    p.add_argument("--tol", type=tol_arg, default=None, metavar="EPS",
                   help="relative error target in (0, 1), the rank cap still applies")
    p.add_argument("--sweep-ranks", type=rank_list_arg, default=(4, 8, 16, 32, 64),
                   metavar="R,R,...", help="ranks of the error-vs-rank plot (default: "
                   "4,8,16,32,64)")


def add_command(sub: Any) -> None:
    """Register ``decompose`` on the subparsers ``sub``."""
    dec = sub.add_parser("decompose", help="MPO report of a causal LM's target layers",
                         description="For every target layer: modes, ranks, parameters and "
                         "relative reconstruction error at N and R (or --tol); a table, "
                         "decompose.json, decompose.csv and error_vs_rank.png.")
    add_model_args(dec)
    add_decompose_args(dec)
    dec.add_argument("--out", default="runs/decompose", metavar="DIR",
                     help="folder for the JSON, CSV and plot (default: runs/decompose)")
    dec.set_defaults(func=_cmd_decompose)
