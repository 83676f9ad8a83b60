"""``tensornet export``: an adapter as a merged model folder and/or a LoRA adapter folder.

What vLLM, SGLang and plain transformers / peft load without tensornet: the base model
with the update merged into its weights (:func:`tensornet.adapters.export_merged`), and
the update as a LoRA of a chosen rank (:func:`tensornet.adapters.export_lora`, peft's
``convert_to_lora``), with the relative error of that conversion reported per layer.

Everything is checked before anything is written: the adapter folder, the outputs (not
the adapter's or the model's own folder, not existing unless ``--overwrite``), the LoRA
rank, and the adapter's load onto MODEL (tensornet's file and base checks: an adapter
trained on another base is refused). Each output folder is written atomically.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ._args import print_table

__all__ = ["add_command", "run_export"]


def lora_rank_arg(text: str) -> int | float:
    """``--lora-rank``: a positive int (the rank) or a float in (0, 1] (the energy kept)."""
    if text.strip().lstrip("+-").isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive int; got {text}")
        return int(text)
    value = _float(text)
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(
            f"a float is the share of the update's energy to keep, in (0, 1]; got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive int or a float in (0, 1]; got {text!r}") from None


def add_command(sub: Any) -> None:
    """Register ``tensornet export``."""
    p = sub.add_parser(
        "export",
        help="write an adapter as a merged model folder and/or a LoRA adapter folder",
        description="Write a saved tensornet adapter as a merged model folder and/or a peft "
        "LoRA adapter folder (the conversion's relative error reported per layer), which "
        "plain transformers, peft, vLLM and SGLang load without tensornet. Everything is "
        "checked before anything is written; each folder is written atomically.",
    )
    p.add_argument("adapter", metavar="ADAPTER",
                   help="a saved tensornet adapter folder (DoTA, DoTA-Random, LoTR, LoRTA)")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="the base model the adapter was trained on: a local model folder; "
                   "default: the built-in SmolLM2-135M-Instruct")
    p.add_argument("--merged", metavar="DIR", type=Path, default=None,
                   help="write the base model with the update merged into its weights here")
    p.add_argument("--lora", metavar="DIR", type=Path, default=None,
                   help="write the update as a peft LoRA adapter here (needs --lora-rank)")
    p.add_argument("--lora-rank", type=lora_rank_arg, default=None,
                   help="the LoRA's rank (an int), or the share of each update's energy to "
                   "keep (a float in (0, 1])")
    p.add_argument("--adapter-name", default="default",
                   help="the name the adapter is loaded under (default: default)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output folders (default: refuse them)")
    p.set_defaults(func=run_export)


def _same(a: Path, b: str | os.PathLike[str] | None) -> bool:
    return b is not None and os.path.realpath(a) == os.path.realpath(b)


def _check(args: argparse.Namespace) -> None:
    """Every argument, before the model is loaded or anything written."""
    if args.merged is None and args.lora is None:
        raise UsageError("nothing to write: give --merged DIR, --lora DIR, or both")
    if args.lora is not None and args.lora_rank is None:
        raise UsageError("argument --lora: needs --lora-rank (an int, or a float in (0, 1])")
    if args.lora is None and args.lora_rank is not None:
        raise UsageError("argument --lora-rank: only used with --lora DIR")
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"argument ADAPTER: {adapter} is not an adapter folder (no "
                         f"adapter_config.json)")
    outputs = [(flag, path) for flag, path in (("--merged", args.merged), ("--lora", args.lora))
               if path is not None]
    if len(outputs) == 2 and _same(args.merged, args.lora):
        raise UsageError("arguments --merged and --lora: must be two different folders")
    for flag, path in outputs:
        for other, name in ((adapter, "ADAPTER"), (args.model, "MODEL")):
            if _same(path, other) or (other is not None and
                                      Path(os.path.realpath(other)) in
                                      Path(os.path.realpath(path)).parents):
                raise UsageError(f"argument {flag}: {path} would overwrite {name}'s folder")
        if path.exists() and not path.is_dir():
            raise UsageError(f"argument {flag}: {path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not args.overwrite:
            raise UsageError(f"argument {flag}: {path} exists and is not empty (pass "
                             f"--overwrite to replace it)")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The base model and tokenizer, and the adapter loaded onto it (a PeftModel).

    transformers' progress bars are off while loading: a refusal is one line on stderr.
    """
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_quietly(args)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_quietly(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel

    from .. import adapters  # registers the methods with peft
    from ..adapters.config import TensornetConfig
    from ..errors import TensornetError

    try:
        base, tokenizer = adapters.load_pretrained(args.model, dtype=torch.float32)
    except TensornetError as exc:
        raise UsageError(f"argument MODEL: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any of transformers' errors becomes one line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"argument MODEL: cannot load {args.model!r} "
                         f"({type(exc).__name__}: {first})") from None
    try:
        model = PeftModel.from_pretrained(base, str(args.adapter),
                                          adapter_name=args.adapter_name)
    except TensornetError as exc:
        raise UsageError(f"argument ADAPTER: {exc}") from None
    except (KeyError, ValueError, OSError) as exc:  # peft's: another method, a bad file
        raise UsageError(f"argument ADAPTER: {args.adapter} does not load onto the model "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(model.peft_config[args.adapter_name], TensornetConfig):
        raise UsageError(f"argument ADAPTER: {args.adapter} is a "
                         f"{model.peft_config[args.adapter_name].peft_type} adapter, not a "
                         f"tensornet one (peft already serves it)")
    model.eval()
    return model, tokenizer


def run_export(args: argparse.Namespace) -> int:
    """``tensornet export``: check, load, write; one line per folder written."""
    from ..adapters.export import export_lora, export_merged
    from ..errors import TensornetError

    _check(args)
    model, tokenizer = _load(args)
    try:
        if args.lora is not None:
            report = export_lora(model, args.lora, rank=args.lora_rank,
                                 adapter_name=args.adapter_name)
            rows = [[name, str(report.ranks[name]), f"{err:.3e}"]
                    for name, err in sorted(report.relative_errors.items())]
            print(f"LoRA adapter written to {args.lora}: {report}")
            print_table(["layer", "rank", "relative error"], rows)
        if args.merged is not None:
            export_merged(model, args.merged, adapter_name=args.adapter_name,
                          tokenizer=tokenizer)
            print(f"merged model written to {args.merged} (loads with "
                  f"AutoModelForCausalLM.from_pretrained, without tensornet)")
    except TensornetError as exc:  # a QDoTA adapter, a merged one: refused before writing
        raise UsageError(f"argument ADAPTER: {exc}") from None
    return 0
