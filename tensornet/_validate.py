"""Argument checks shared by the core modules (private)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from .errors import DTypeError, RankError, ShapeError


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DTypeError(f"`{name}` must be an int >= {minimum}; got {value!r}")
    if value < minimum:
        raise ShapeError(f"`{name}` must be an int >= {minimum}; got {value!r}")
    return int(value)


def check_modes(modes: Any, name: str) -> tuple[int, ...]:
    """Return ``modes`` as a non-empty tuple of ints >= 1."""
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence) or len(modes) == 0:
        raise ShapeError(f"`{name}` must be a non-empty sequence of positive ints; got {modes!r}")
    out = []
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ShapeError(
                f"`{name}` must be a non-empty sequence of positive ints; got {list(modes)!r}"
            )
        out.append(int(m))
    return tuple(out)


def normalize_rank(rank: Any, num_bonds: int, name: str = "rank") -> tuple[int, ...] | None:
    """Return the per-bond rank caps (``num_bonds`` ints >= 1), or None for exact ranks."""
    if rank is None:
        return None
    expected = (
        f"`{name}` must be None, a positive int or a list of {num_bonds} positive ints "
        f"(one per bond)"
    )
    if isinstance(rank, bool):
        raise RankError(f"{expected}; got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise RankError(f"{expected}; got {rank!r}")
        return (int(rank),) * num_bonds
    if isinstance(rank, (str, bytes)) or not isinstance(rank, Sequence):
        raise RankError(f"{expected}; got {rank!r}")
    caps = list(rank)
    if len(caps) != num_bonds or any(
        isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 for r in caps
    ):
        raise RankError(f"{expected}; got {caps!r}")
    return tuple(int(r) for r in caps)


def check_tol(tol: Any) -> float | None:
    """Return ``tol`` as a float in (0, 1), or None."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0.0 < float(tol) < 1.0:
        raise RankError(
            f"`tol` must be None or a relative Frobenius error in the open interval (0, 1); "
            f"got {tol!r}"
        )
    return float(tol)
