"""Argument types, the parser class and the table printer shared by the subcommands.

Nothing here imports torch: ``tensornet --help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError

__all__ = [
    "EXIT_USAGE",
    "Parser",
    "ParseError",
    "device_arg",
    "int_list_arg",
    "seed_arg",
    "nonnegative_int_arg",
    "positive_int_arg",
    "print_table",
    "rank_arg",
    "rank_list_arg",
    "set_shown_defaults",
    "tol_arg",
]

#: Exit code for bad input (argparse's convention).
EXIT_USAGE = 2


_SAID_DEFAULT = re.compile(r"\(default: (?:[^()]|\([^()]*\))*\)")


def set_shown_defaults(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """``parser.set_defaults(**defaults)``, and each option's help says its new default.

    A subcommand that shares an option with another but runs it with another default
    (``demo``: bfloat16 on one thread) would otherwise show the shared help's default.
    """
    parser.set_defaults(**defaults)
    for action in parser._actions:  # argparse has no public list of a parser's options
        if action.dest not in defaults or not action.help:
            continue
        value = defaults[action.dest]
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        said = f"(default: {shown})"
        help_ = _SAID_DEFAULT.sub(lambda _, said=said: said, action.help)
        action.help = help_ if help_ != action.help else f"{action.help} (default: {shown})"


class ParseError(UsageError):
    """An argparse error, already formatted as ``prog: error: message``."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are raised (one line, exit 2) instead of exiting."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse API
        raise ParseError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def rank_arg(text: str) -> int | None:
    """A positive int, or ``full`` (None: the exact ranks)."""
    if text.strip().lower() == "full":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'full'; got {text!r}")
    return value


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}")
    return value


def positive_int_arg(text: str) -> int:
    """A positive int."""
    return _int_at_least(text, 1, "a positive int")


def nonnegative_int_arg(text: str) -> int:
    """An int >= 0."""
    return _int_at_least(text, 0, "an int >= 0")


def tol_arg(text: str) -> float:
    """A relative error in the open interval (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a relative error in the open interval (0, 1); got {text!r}"
        )
    return value


def rank_list_arg(text: str) -> tuple[int, ...]:
    """Comma-separated positive ints (an empty string: none)."""
    if not text.strip():
        return ()
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = (0,)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of positive ints such as 4,8,16; got {text!r}"
        )
    return values


#: Seeds numpy's legacy seeding takes (the Trainer's ``set_seed`` seeds numpy too).
_SEED_RANGE = "an int from 0 to 2**32 - 1"


def seed_arg(text: str) -> int:
    """A random seed: an int from 0 to ``2**32 - 1`` (what numpy's seeding accepts)."""
    value = _int_at_least(text, 0, _SEED_RANGE)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be {_SEED_RANGE}; got {text!r}")
    return value


def int_list_arg(text: str) -> list[int]:
    """Comma-separated seeds (:func:`seed_arg`), each once."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of ints; got {text!r}")
    bad = [v for v in values if not 0 <= v < 2**32]
    if bad:
        raise argparse.ArgumentTypeError(f"each seed must be {_SEED_RANGE}; got {bad[0]}")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise argparse.ArgumentTypeError(
            f"lists {', '.join(map(str, dup))} more than once; give each value once"
        )
    return values


_DEVICE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def device_arg(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked against the machine later).

    Spelled exactly (as torch spells devices: ``CUDA`` is refused); ``cuda:01`` is ``cuda:1``.
    """
    found = _DEVICE.fullmatch(text)
    if not found:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; choose auto (CUDA when present, else CPU), cpu, cuda "
            f"(one GPU: the current one) or cuda:N (GPU N alone)"
        )
    return text if found.group(1) is None else f"cuda:{int(found.group(1))}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print an aligned text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        padded = (
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))
