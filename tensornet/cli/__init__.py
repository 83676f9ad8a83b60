"""The ``tensornet`` command line.

Subcommands
-----------
``tensornet decompose [MODEL]``
    MPO decomposition of every target layer (q, k, v, up, down) of a causal LM: table,
    JSON, CSV and a plot of error against rank per kind of layer.
``tensornet finetune --method M [MODEL]``
    Fine-tune with one method on transformers' Trainer (DoTA, QDoTA, DoTA-Random, LoTR,
    LoRTA, or peft's LoRA, DoRA, PiSSA, QPiSSA, QLoRA, or full fine-tuning) on the built-in
    task or a local data file; checkpoints, ``--resume``, ``--device``, and DDP under
    ``torchrun`` / ``accelerate launch``.
``tensornet compare --methods A,B --seeds 0,1 [MODEL]``
    Several methods on the same data, budget and seeds: results JSON, markdown table,
    plots of validation loss against step and accuracy against trainable parameters.
``tensornet demo``
    On the offline SmolLM2-135M-Instruct: the decomposition report, a short comparison
    of DoTA, DoTA-Random and LoRA, and the saved DoTA adapter answering a test question.
``tensornet analyze-minilm``
    MPO decomposition of every linear weight of a real pretrained encoder (MiniLM-L6).
``tensornet export ADAPTER [MODEL] --merged DIR --lora DIR --lora-rank R``
    A saved adapter as a merged model folder and/or a peft LoRA adapter folder (the
    conversion's relative error per layer reported): what plain transformers, peft, vLLM
    and SGLang load without tensornet.

One module per group of subcommands (:mod:`.decompose`, :mod:`.finetune`, :mod:`.minilm`,
:mod:`.export`),
each with an ``add_command(s)(sub)`` that registers its parsers; the shared argument types
are in :mod:`._args`; the defaults (targets, ranks, default model, learning rates) are
read from :mod:`tensornet.finetune.defaults`. Bad input prints one
``tensornet <cmd>: error: ...`` line to stderr and returns exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import TensornetError
from ._args import EXIT_USAGE, ParseError, Parser
from .minilm import load_minilm_weights

__all__ = ["main", "build_parser", "load_minilm_weights", "version"]


def version() -> str:
    """The installed tensornet's version (the package metadata's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tensornet")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown (not installed)"


def build_parser() -> Parser:
    """Build the ``tensornet`` argument parser; each subcommand's parser sets ``func``."""
    from . import decompose, export, finetune, minilm

    parser = Parser(
        prog="tensornet",
        description="Tensor-network (MPO / tensor-train) decomposition of weight matrices, "
        "and fine-tuning of causal LMs with tensor adapters.",
    )
    parser.add_argument("--version", action="version", version=f"tensornet {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    decompose.add_command(sub)
    finetune.add_commands(sub)
    minilm.add_command(sub)
    export.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ParseError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    if getattr(args, "func", None) is None:
        print("tensornet: error: a command is required (decompose, finetune, compare, "
              "demo, analyze-minilm, export); see `tensornet --help`", file=sys.stderr)
        return EXIT_USAGE
    prog = f"tensornet {args.command}"
    try:
        return int(args.func(args))
    except TensornetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:
        print(f"{prog}: error: {exc}; install the optional dependencies with "
              f"`pip install -e '.[adapters]'` (or `make venv`)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
