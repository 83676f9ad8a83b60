"""``tensornet decompose``: the MPO report of a causal LM's target layers.

Also the model arguments and loading every fine-tuning subcommand shares (MODEL,
``--targets``, ``--num-cores``, ``--threads``, ``--dtype``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..finetune.defaults import DEFAULT_MODEL_NAME, DEFAULT_OPTIONS
from ._args import positive_int_arg, print_table, rank_arg, rank_list_arg, tol_arg

__all__ = ["add_command", "add_model_args", "check_model", "load", "model_name", "quiet"]


def quiet() -> None:
    """Silence library chatter (weight-loading bars, deprecation warnings) on the terminal."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def check_model(model: str | None) -> None:
    """Fail fast (before torch is imported) on a MODEL that is not a complete model folder.

    A folder needs ``config.json`` and a tokenizer (``tokenizer.json``,
    ``tokenizer.model`` or ``vocab.json``, as ``tokenizer.save_pretrained`` writes).
    """
    if model is None or model == DEFAULT_MODEL_NAME:
        return
    folder = Path(model)
    if not (folder / "config.json").is_file():
        why = "no such folder" if not folder.is_dir() else "the folder has no config.json"
        raise UsageError(
            f"argument MODEL: {model!r} is not a local Hugging Face model folder ({why}); "
            f"give a folder with config.json, or omit MODEL for the built-in "
            f"{DEFAULT_MODEL_NAME}"
        )
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                "vocab.json")):
        raise UsageError(
            f"argument MODEL: the folder {model!r} has no tokenizer (tokenizer.json, "
            f"tokenizer.model or vocab.json); save one next to the weights with "
            f"tokenizer.save_pretrained({model!r})"
        )


def setup(args: argparse.Namespace) -> None:
    """Check MODEL, silence the libraries and set torch's CPU threads."""
    check_model(args.model)
    quiet()
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def load(model: str | None, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from :func:`tensornet.adapters.load_pretrained`."""
    import torch

    from ..adapters import load_pretrained

    return load_pretrained(model, dtype=getattr(torch, dtype))


def model_name(model: str | None) -> str:
    """The name a run records for MODEL."""
    return DEFAULT_MODEL_NAME if model is None else os.fspath(model)


def _targets_arg(text: str) -> tuple[str, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"must name at least one module; got {text!r}")
    return tuple(names)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --targets, --num-cores, --threads and --dtype.

    ``--targets`` and ``--num-cores`` default to None (the defaults of
    :data:`~tensornet.finetune.defaults.DEFAULT_OPTIONS` are filled in after the check
    that a method reads them).
    """
    targets = ",".join(DEFAULT_OPTIONS["targets"])  # type: ignore[arg-type]
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a local Hugging Face model folder (config.json, weights and a "
                   "tokenizer); default: the built-in offline SmolLM2-135M-Instruct")
    p.add_argument("--targets", type=_targets_arg, default=None, metavar="NAME,...",
                   help=f"layers to adapt (default: {targets}, the paper's)")
    p.add_argument("--num-cores", type=positive_int_arg, default=None, metavar="N",
                   help=f"MPO cores N (default: {DEFAULT_OPTIONS['num_cores']})")
    p.add_argument("--threads", type=positive_int_arg, default=None, metavar="T",
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the frozen weights and of the mixed-precision computation "
                   "(autocast); trained weights stay float32 (default: float32)")


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
