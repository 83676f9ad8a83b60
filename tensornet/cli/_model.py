"""The model arguments and loading every subcommand that reads a model shares.

MODEL, ``--targets``, ``--num-cores``, ``--threads`` and ``--dtype``; the check of a model
folder before torch is imported; quieting the libraries; loading through
:func:`tensornet.models.load_pretrained`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..finetune.defaults import DEFAULT_MODEL_NAME, DEFAULT_OPTIONS
from ._args import positive_int_arg

__all__ = ["add_model_args", "check_model", "load", "model_name", "quiet", "setup"]


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
    """``(model, tokenizer)`` from :func:`tensornet.models.load_pretrained`."""
    import torch

    from ..models import load_pretrained

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
