"""Parameter counting for MPO / tensor-train formats, and the one rank specification.

Formulas on shapes only: nothing is decomposed or allocated.

A rank specification (the ``rank`` argument of :func:`tensornet.mpo_decompose`,
:func:`tensornet.tt_decompose`, the counting functions below and
:class:`tensornet.adapters.DoTAConfig`) takes one of four forms, for a train of ``N``
cores (``N-1`` bonds):

* ``None``: the exact ranks of eq. (1), no truncation;
* an int ``R >= 1``: a cap for every bond;
* ``N-1`` ints ``>= 1``: one cap per bond;
* ``N+1`` ints starting and ending with 1, ``[1, R_1, ..., R_{N-1}, 1]``: the form of
  :attr:`tensornet.MPO.ranks` and of tensorly, so that ``mpo.ranks`` can be passed back.

Anything else raises :class:`~tensornet.errors.RankError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._validate import as_int_list, check_mode_pair, check_modes, check_positive_int, is_int
from .errors import RankError

__all__ = [
    "Rank",
    "check_rank",
    "tt_ranks",
    "tt_num_params",
    "mpo_ranks",
    "mpo_num_params",
    "compression_ratio",
    "rank_for_budget",
]

#: A rank specification: None, an int cap, ``N-1`` caps or the ``N+1`` form with boundary 1s.
Rank = int | Sequence[int] | None


def check_rank(rank: Any, num_cores: int, *, name: str = "rank") -> tuple[int, ...] | None:
    """Validate a rank specification; return its ``N-1`` bond caps (None: exact ranks).

    Parameters
    ----------
    rank : None, int or sequence of int
        One of the four forms of the module docstring.
    num_cores : int
        ``N``, the number of cores of the train.
    name : str, default "rank"
        The argument's name in the error message.

    Returns
    -------
    tuple of int or None
        One cap per bond (``N-1`` ints), or None for exact ranks.

    Raises
    ------
    RankError
        For anything else; the message names the argument, lists the valid forms for this
        ``N`` and shows the value received.

    Examples
    --------
    >>> check_rank(16, 3), check_rank([8, 4], 3), check_rank([1, 8, 4, 1], 3)
    ((16, 16), (8, 4), (8, 4))
    >>> check_rank(None, 3) is None
    True
    >>> check_rank([16, 0, 16], 5)
    Traceback (most recent call last):
    ...
    tensornet.errors.RankError: `rank` must be None (exact ranks), ... or a list of 6 positive ints
    starting and ending with 1 (the form of MPO.ranks); got [16, 0, 16]
    """
    bonds = num_cores - 1
    if rank is None:
        return None
    expected = (
        f"`{name}` must be None (exact ranks), a positive int (a cap for every bond), a list "
        f"of {bonds} positive ints (one per bond) or a list of {bonds + 2} positive ints "
        f"starting and ending with 1 (the form of MPO.ranks)"
    )
    if is_int(rank):
        return (int(rank),) * bonds
    caps = as_int_list(rank)
    if caps is None or not all(is_int(r) for r in caps):
        raise RankError(f"{expected}; got {rank if caps is None else caps!r}")
    if len(caps) == bonds + 2 and caps[0] == 1 and caps[-1] == 1:
        caps = caps[1:-1]
    if len(caps) != bonds:
        raise RankError(f"{expected}; got {caps!r}")
    return tuple(int(r) for r in caps)


def tt_ranks(shape: Sequence[int], rank: Rank = None) -> tuple[int, ...]:
    """Bond dimensions ``(1, R_1, ..., R_{N-1}, 1)`` of a tensor train of ``shape``.

    ``R_k = min(prod_{n<=k} d_n, prod_{n>k} d_n)`` (eq. (1) of the DoTA paper with
    ``d_n = I_n J_n``), each capped at ``rank``. With per-bond caps a bond also cannot
    exceed what the previous one passes on, ``R_{k-1} d_k`` (what TT-SVD produces).

    Parameters
    ----------
    shape : sequence of int
        The tensor's mode sizes ``d_1..d_N``.
    rank : None, int or sequence of int
        A rank specification (module docstring): None for exact ranks, a cap for every
        bond, ``N-1`` caps, or ``N+1`` values with boundary 1s.

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
    >>> tt_ranks((16, 16, 16, 16, 16), [1, 8, 8, 8, 8, 1])
    (1, 8, 8, 8, 8, 1)
    """
    dims = check_modes(shape, "shape")
    caps = check_rank(rank, len(dims))
    ranks = [1]
    left, total = 1, math.prod(dims)
    for k in range(len(dims) - 1):
        left *= dims[k]
        full = min(left, total // left)
        ranks.append(full if caps is None else min(full, caps[k], ranks[-1] * dims[k]))
    ranks.append(1)
    return tuple(int(r) for r in ranks)


def tt_num_params(shape: Sequence[int], rank: Rank = None) -> int:
    """Number of entries of the tensor-train cores of ``shape`` at ``rank``.

    Parameters
    ----------
    shape : sequence of int
        The tensor's mode sizes ``d_1..d_N``.
    rank : None, int or sequence of int
        A rank specification, as for :func:`tt_ranks`.

    Returns
    -------
    int
        ``sum_k R_{k-1} d_k R_k`` with the ranks of :func:`tt_ranks`.

    Examples
    --------
    >>> tt_num_params((4, 4, 4), 2)
    32
    """
    dims = check_modes(shape, "shape")
    r = tt_ranks(dims, rank)
    return int(sum(r[k] * dims[k] * r[k + 1] for k in range(len(dims))))


def _mode_products(out_modes: Sequence[int], in_modes: Sequence[int]) -> tuple[int, ...]:
    out_modes, in_modes = check_mode_pair(out_modes, in_modes)
    return tuple(i * j for i, j in zip(out_modes, in_modes))


def mpo_ranks(
    out_modes: Sequence[int], in_modes: Sequence[int], rank: Rank = None
) -> tuple[int, ...]:
    """Bond dimensions ``(1, R_1, ..., R_{N-1}, 1)`` of an MPO, eq. (1) capped at ``rank``.

    Parameters
    ----------
    out_modes, in_modes : sequence of int
        ``I_1..I_N`` (rows, ``out_features``) and ``J_1..J_N`` (columns, ``in_features``).
    rank : None, int or sequence of int
        A rank specification (:mod:`tensornet.params`): None for exact ranks, a cap for
        every bond, ``N-1`` caps, or ``N+1`` values with boundary 1s.

    Returns
    -------
    tuple of int
        The ``N+1`` ranks :func:`tensornet.mpo_decompose` returns for these arguments.

    Examples
    --------
    >>> mpo_ranks((4, 4, 8, 8, 4), (4, 4, 8, 8, 4), 16)
    (1, 16, 16, 16, 16, 1)
    >>> mpo_ranks((4, 4, 8, 8, 4), (4, 4, 8, 8, 4))
    (1, 16, 256, 1024, 16, 1)
    """
    return tt_ranks(_mode_products(out_modes, in_modes), rank)


def mpo_num_params(out_modes: Sequence[int], in_modes: Sequence[int], rank: Rank = None) -> int:
    """Trainable parameters of an MPO: the paper's ``rho = sum_k R_{k-1} I_k J_k R_k``.

    Parameters
    ----------
    out_modes, in_modes : sequence of int
        ``I_1..I_N`` (rows, ``out_features``) and ``J_1..J_N`` (columns, ``in_features``).
    rank : None, int or sequence of int
        A rank specification, as for :func:`mpo_ranks`.

    Returns
    -------
    int
        The number of core entries.

    Examples
    --------
    The paper's example, a 1024 x 1024 matrix with N = 5, R = 8 and all modes 4:

    >>> mpo_num_params((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 8)
    3328
    """
    return tt_num_params(_mode_products(out_modes, in_modes), rank)


def compression_ratio(
    out_modes: Sequence[int], in_modes: Sequence[int], rank: Rank = None
) -> float:
    """Dense parameter count divided by the MPO's: how many times smaller the cores are.

    Parameters
    ----------
    out_modes, in_modes : sequence of int
        ``I_1..I_N`` (rows) and ``J_1..J_N`` (columns).
    rank : None, int or sequence of int
        A rank specification, as for :func:`mpo_ranks`.

    Returns
    -------
    float
        ``prod(out_modes) * prod(in_modes) / mpo_num_params(out_modes, in_modes, rank)``.

    Examples
    --------
    >>> round(compression_ratio((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 8), 1)
    315.1
    """
    prods = _mode_products(out_modes, in_modes)
    return math.prod(prods) / tt_num_params(prods, rank)


def rank_for_budget(out_modes: Sequence[int], in_modes: Sequence[int], budget: int) -> int:
    """Largest uniform rank cap ``R`` whose MPO has at most ``budget`` parameters.

    Parameters
    ----------
    out_modes, in_modes : sequence of int
        ``I_1..I_N`` (rows) and ``J_1..J_N`` (columns).
    budget : int
        The largest parameter count allowed (>= 1).

    Returns
    -------
    int
        The largest ``R`` with ``mpo_num_params(out_modes, in_modes, R) <= budget``, but
        at most the largest exact rank ``max(mpo_ranks(out_modes, in_modes))``: beyond it
        a larger cap changes nothing, so a budget that fits the exact MPO returns that
        rank (the exact decomposition), not an arbitrarily large number.

    Raises
    ------
    RankError
        If even ``R = 1`` exceeds the budget.
    ShapeError, DTypeError
        On bad modes or a ``budget`` that is not an int >= 1.

    Examples
    --------
    >>> rank_for_budget((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 3328)
    8
    >>> rank_for_budget((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 3327)
    7
    >>> rank_for_budget((2, 2), (2, 2), 10**9)  # capped at the exact rank, max((1, 4, 1))
    4
    """
    prods = _mode_products(out_modes, in_modes)
    budget = check_positive_int(budget, "budget")
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


