"""Argument checks shared by the core modules (private)."""

from __future__ import annotations

import math
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


def is_int(v: Any, minimum: int = 1) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= minimum


def check_modes(modes: Any, name: str) -> tuple[int, ...]:
    """Return ``modes`` as a non-empty tuple of ints >= 1."""
    items = as_int_list(modes)
    if not items:
        raise ShapeError(f"`{name}` must be a non-empty sequence of positive ints; got {modes!r}")
    if not all(is_int(m) for m in items):
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
    if not is_int(value):
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


# The smallest ``tol`` a decomposition accepts, in ulps of its result dtype times sqrt(N).
# A float64 result: the sweep itself computes in float64 and rounds about an ulp per
# core and step, so a smaller tolerance could not be told from rounding. A narrower
# result (float32, bfloat16, float16) is computed in float64 and only rounded once per
# core to its dtype (half an ulp each): two ulps leave that rounding room (float32 cores
# reach about 1e-7; 10 ulps refused ``tol=1e-6`` for float32 input).
TOL_FLOOR_ULPS = {"float64": 10.0, "narrower": 2.0}


def tol_floor(eps: float, num_cores: int) -> float:
    """The smallest reachable relative error for a result of machine epsilon ``eps``."""
    wide = eps <= float(np.finfo(np.float64).eps)
    return TOL_FLOOR_ULPS["float64" if wide else "narrower"] * eps * math.sqrt(num_cores)


def check_tol_reachable(tol: float, eps: float, num_cores: int, dtype: Any, name: str) -> float:
    """Return the smallest reachable ``tol``; :class:`ToleranceError` if ``tol`` is below.

    ``eps`` is the machine epsilon of the result dtype ``dtype`` (at most float64's),
    ``name`` the decomposed argument (``x`` or ``W``), named in the remedy.
    """
    floor = tol_floor(eps, num_cores)
    if tol < floor:
        wider = eps > float(np.finfo(np.float64).eps)
        remedy = "pass a larger `tol`" + (
            f", or a float64 copy of `{name}` for a smaller one" if wider else ""
        )
        cores = "core" if num_cores == 1 else "cores"
        raise ToleranceError(
            f"`tol` must be at least {floor:.2g} for {num_cores} {cores} in {dtype} (the "
            f"smallest relative error reachable: {floor / (eps * math.sqrt(num_cores)):g} * "
            f"eps * sqrt(N), eps = {eps:.3g}); got {tol!r}; {remedy}"
        )
    return floor
