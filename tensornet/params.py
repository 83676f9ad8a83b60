"""Parameter counting for MPO / tensor-train formats and the LoTR / LoRTA adapters.

Formulas on shapes only: nothing is decomposed or allocated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    "lotr_num_params",
    "lorta_num_params",
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


def lotr_num_params(
    shapes_by_kind: Mapping[str, tuple[int, int]], num_layers: int, rank: int
) -> int:
    """Trainable parameters of LoTR: ``sum over kinds of r (out + in) + L r^2``.

    LoTR shares ``A`` (out x r) and ``B`` (r x in) among the layers of one kind of matrix
    (every ``q_proj``, say) and gives each of the ``L`` layers its own ``G_l`` (r x r).

    Parameters
    ----------
    shapes_by_kind : mapping of str to (int, int)
        ``(out_features, in_features)`` of each kind of adapted matrix.
    num_layers : int
        ``L``, the number of layers holding each kind.
    rank : int
        ``r``.

    Returns
    -------
    int

    Examples
    --------
    LLaMA-2-7B's q, k, v (4096 x 4096), up (11008 x 4096) and down (4096 x 11008) in its
    32 layers, at r = 16:

    >>> shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
    ...           "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    >>> lotr_num_params(shapes, 32, 16)
    917504
    """
    num_layers = check_positive_int(num_layers, "num_layers")
    rank = check_positive_int(rank, "rank")
    if not isinstance(shapes_by_kind, Mapping) or not shapes_by_kind:
        raise ShapeError(
            f"`shapes_by_kind` must be a non-empty mapping of kind -> (out, in); got "
            f"{shapes_by_kind!r}"
        )
    total = 0
    for kind, shape in shapes_by_kind.items():
        out_f, in_f = check_modes(shape, f"shapes_by_kind[{kind!r}]")
        total += rank * (out_f + in_f) + num_layers * rank * rank
    return int(total)


def lorta_num_params(
    d_model: int,
    d_head: int,
    num_heads: int,
    num_kv_heads: int,
    num_layers: int,
    rank: int,
    *,
    num_matrices: int = 4,
) -> int:
    """Trainable parameters of LoRTA: ``r (d_model + d_head + H + H_kv + M + L)``.

    The five CP factors ``A`` (d_model x r), ``B`` (r x d_head), ``C_head`` (H x r),
    ``C_matrix`` (M x r, M = 4 for Q, K, V, O) and ``C_layer`` (L x r). With grouped-query
    attention (``num_kv_heads < num_heads``) K and V have their own head factor
    ``C_kv_head`` (H_kv x r); without it (``num_kv_heads == num_heads``) they share
    ``C_head`` and the count is the paper's ``r (d_model + d_head + H + 4 + L)``.

    Parameters
    ----------
    d_model, d_head : int
        Model width and width of one attention head.
    num_heads, num_kv_heads : int
        Query heads ``H`` and key/value heads ``H_kv`` (``H_kv == H`` without GQA).
    num_layers : int
        ``L``.
    rank : int
        CP rank ``r``.
    num_matrices : int, default 4
        ``M``, how many of Q, K, V, O are adapted. Pass ``num_kv_heads=num_heads`` when
        neither K nor V is adapted.

    Returns
    -------
    int

    Examples
    --------
    LLaMA-2-7B (no GQA) at r = 16, and SmolLM2-135M (9 heads, 3 key/value heads):

    >>> lorta_num_params(4096, 128, 32, 32, 32, 16)
    68672
    >>> lorta_num_params(576, 64, 9, 3, 30, 16)
    10976
    """
    dims = [
        check_positive_int(v, name)
        for v, name in (
            (d_model, "d_model"),
            (d_head, "d_head"),
            (num_heads, "num_heads"),
            (num_kv_heads, "num_kv_heads"),
            (num_layers, "num_layers"),
            (rank, "rank"),
            (num_matrices, "num_matrices"),
        )
    ]
    d_model, d_head, num_heads, num_kv_heads, num_layers, rank, num_matrices = dims
    kv = num_kv_heads if num_kv_heads != num_heads else 0
    return int(rank * (d_model + d_head + num_heads + kv + num_matrices + num_layers))
