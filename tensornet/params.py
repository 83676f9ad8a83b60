"""Parameter counting for MPO / tensor-train formats, without decomposing anything."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._validate import check_modes, check_positive_int, normalize_rank
from .errors import RankError, ShapeError

__all__ = [
    "tt_ranks",
    "tt_num_params",
    "mpo_ranks",
    "mpo_num_params",
    "compression_ratio",
    "rank_for_budget",
]


def tt_ranks(shape: Sequence[int], rank: Any = None) -> tuple[int, ...]:
    """Bond dimensions ``(1, R_1, ..., R_{N-1}, 1)`` of a tensor train of ``shape``.

    ``R_k = min(prod_{n<=k} d_n, prod_{n>k} d_n)`` (eq. (1) of the DoTA paper with
    ``d_n = I_n J_n``), each capped at ``rank``. With per-bond caps a bond also cannot
    exceed what the previous one passes on, ``R_{k-1} d_k`` (what TT-SVD produces).

    Parameters
    ----------
    shape : sequence of int
        The tensor's mode sizes ``d_1..d_N``.
    rank : int, sequence of int or None
        A cap for every bond, one cap per bond (``N-1`` values), or None for exact ranks.

    Returns
    -------
    tuple of int
        ``N+1`` bond dimensions, starting and ending with 1.

    Examples
    --------
    >>> tt_ranks((16, 16, 16, 16, 16))
    (1, 16, 256, 256, 16, 1)
    >>> tt_ranks((16, 16, 16, 16, 16), 8)
    (1, 8, 8, 8, 8, 1)
    """
    dims = check_modes(shape, "shape")
    caps = normalize_rank(rank, len(dims) - 1)
    ranks = [1]
    left, total = 1, int(np.prod(dims, dtype=object))
    for k in range(len(dims) - 1):
        left *= dims[k]
        full = min(left, total // left)
        ranks.append(full if caps is None else min(full, caps[k], ranks[-1] * dims[k]))
    ranks.append(1)
    return tuple(int(r) for r in ranks)


def tt_num_params(shape: Sequence[int], rank: Any = None) -> int:
    """Number of entries of the tensor-train cores of ``shape`` at ``rank``.

    Examples
    --------
    >>> tt_num_params((4, 4, 4), 2)
    32
    """
    dims = check_modes(shape, "shape")
    r = tt_ranks(dims, rank)
    return int(sum(r[k] * dims[k] * r[k + 1] for k in range(len(dims))))


def _mode_products(out_modes: Sequence[int], in_modes: Sequence[int]) -> tuple[int, ...]:
    out_modes = check_modes(out_modes, "out_modes")
    in_modes = check_modes(in_modes, "in_modes")
    if len(out_modes) != len(in_modes):
        raise ShapeError(
            f"`out_modes` and `in_modes` must have the same length (one pair per core); got "
            f"{list(out_modes)} and {list(in_modes)}"
        )
    return tuple(i * j for i, j in zip(out_modes, in_modes))


def mpo_ranks(
    out_modes: Sequence[int], in_modes: Sequence[int], rank: Any = None
) -> tuple[int, ...]:
    """Bond dimensions ``(1, R_1, ..., R_{N-1}, 1)`` of an MPO, eq. (1) capped at ``rank``.

    Examples
    --------
    >>> mpo_ranks((4, 4, 8, 8, 4), (4, 4, 8, 8, 4), 16)
    (1, 16, 16, 16, 16, 1)
    >>> mpo_ranks((4, 4, 8, 8, 4), (4, 4, 8, 8, 4))
    (1, 16, 256, 1024, 16, 1)
    """
    return tt_ranks(_mode_products(out_modes, in_modes), rank)


def mpo_num_params(out_modes: Sequence[int], in_modes: Sequence[int], rank: Any = None) -> int:
    """Trainable parameters of an MPO: the paper's ``rho = sum_k R_{k-1} I_k J_k R_k``.

    Parameters
    ----------
    out_modes, in_modes : sequence of int
        ``I_1..I_N`` (rows, ``out_features``) and ``J_1..J_N`` (columns, ``in_features``).
    rank : int, sequence of int or None
        Bond cap ``R`` (or one per bond); None for exact ranks.

    Returns
    -------
    int

    Examples
    --------
    The paper's example, a 1024 x 1024 matrix with N = 5, R = 8 and all modes 4:

    >>> mpo_num_params((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 8)
    3328
    """
    return tt_num_params(_mode_products(out_modes, in_modes), rank)


def compression_ratio(out_modes: Sequence[int], in_modes: Sequence[int], rank: Any = None) -> float:
    """Dense parameter count divided by the MPO's: how many times smaller the cores are.

    Examples
    --------
    >>> round(compression_ratio((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 8), 1)
    315.1
    """
    dense = int(np.prod(out_modes, dtype=object)) * int(np.prod(in_modes, dtype=object))
    return dense / mpo_num_params(out_modes, in_modes, rank)


def rank_for_budget(out_modes: Sequence[int], in_modes: Sequence[int], budget: int) -> int:
    """Largest uniform rank cap ``R`` whose MPO has at most ``budget`` parameters.

    Raises
    ------
    RankError
        If even ``R = 1`` exceeds the budget.

    Examples
    --------
    >>> rank_for_budget((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 3328)
    8
    >>> rank_for_budget((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 3327)
    7
    """
    budget = check_positive_int(budget, "budget")
    prods = _mode_products(out_modes, in_modes)
    full = tt_ranks(prods)
    if tt_num_params(prods, 1) > budget:
        raise RankError(
            f"`budget` must allow at least rank 1 ({tt_num_params(prods, 1)} parameters for "
            f"modes {list(out_modes)} x {list(in_modes)}); got {budget}"
        )
    lo, hi = 1, max(full)  # count is nondecreasing in R; beyond max(full) it is constant
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tt_num_params(prods, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
