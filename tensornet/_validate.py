"""Argument checks shared by the core modules (private)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DTypeError, RankError, ShapeError, ToleranceError


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DTypeError(f"`{name}` must be an int >= {minimum}; got {value!r}")
    if value < minimum:
        raise ShapeError(f"`{name}` must be an int >= {minimum}; got {value!r}")
    return int(value)


def as_int_list(value: Any) -> list[Any] | None:
    """``value`` as a list if it is a sequence (or a 1-D numpy array), else None."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    return list(value)


def _is_int(v: Any, minimum: int = 1) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= minimum


def check_modes(modes: Any, name: str) -> tuple[int, ...]:
    """Return ``modes`` as a non-empty tuple of ints >= 1."""
    items = as_int_list(modes)
    if not items:
        raise ShapeError(f"`{name}` must be a non-empty sequence of positive ints; got {modes!r}")
    if not all(_is_int(m) for m in items):
        raise ShapeError(f"`{name}` must be a non-empty sequence of positive ints; got {items!r}")
    return tuple(int(m) for m in items)


def check_mode_pair(out_modes: Any, in_modes: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Both mode lists checked (:func:`check_modes`) and of one length (a pair per core)."""
    out_modes = check_modes(out_modes, "out_modes")
    in_modes = check_modes(in_modes, "in_modes")
    if len(out_modes) != len(in_modes):
        raise ShapeError(
            f"`out_modes` and `in_modes` must have the same length (one pair per core); got "
            f"{list(out_modes)} and {list(in_modes)}"
        )
    return out_modes, in_modes


def check_rank_int(value: Any, name: str = "rank") -> int:
    """A single rank ``r`` (LoTR, LoRTA): an int >= 1, else :class:`RankError`."""
    if not _is_int(value):
        raise RankError(f"`{name}` must be a positive int; got {value!r}")
    return int(value)


def check_tol(tol: Any) -> float | None:
    """Return ``tol`` as a float in (0, 1), or None; :class:`ToleranceError` otherwise."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0.0 < float(tol) < 1.0:
        raise ToleranceError(
            f"`tol` must be None or a relative Frobenius error in the open interval (0, 1); "
            f"got {tol!r}"
        )
    return float(tol)
