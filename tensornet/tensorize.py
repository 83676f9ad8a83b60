"""Tensorization: factoring dimensions into modes and matrix <-> MPO-tensor reshapes.

Layout convention (used everywhere in tensornet): a weight ``W`` has PyTorch's shape
``(out_features, in_features)``. The paper's ``W0 in R^{I x J}`` maps to it with
``I = out_features`` (rows, ``out_modes`` ``I_1..I_N``) and ``J = in_features``
(columns, ``in_modes`` ``J_1..J_N``). MPO cores have shape ``(R_{k-1}, I_k, J_k, R_k)``,
the layout of tensorly's TT-matrix cores.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ._backend import is_torch
from ._validate import check_modes, check_positive_int
from .errors import ShapeError

__all__ = [
    "PAPER_SHAPES",
    "factorize",
    "mpo_modes",
    "matrix_to_tensor",
    "tensor_to_matrix",
    "cores_to_matrix",
    "mpo_halves",
    "combine_halves",
]

#: Tensor shapes of the DoTA paper's Table 2 (appendix B), used by :func:`factorize`
#: for ``num_factors=5``.
PAPER_SHAPES: dict[int, tuple[int, ...]] = {
    50400: (5, 10, 14, 12, 6),
    14336: (4, 8, 8, 8, 7),
    11008: (4, 4, 43, 4, 4),
    768: (4, 4, 4, 4, 3),
    3072: (4, 4, 8, 6, 4),
    1024: (4, 4, 4, 4, 4),
    4096: (4, 4, 8, 8, 4),
    2304: (4, 4, 8, 6, 3),
}


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def _partitions(n: int, k: int, smallest: int) -> Iterator[tuple[int, ...]]:
    """Nondecreasing tuples of ``k`` factors >= ``smallest`` whose product is ``n``."""
    if k == 1:
        if n >= smallest:
            yield (n,)
        return
    d = smallest
    while d**k <= n:
        if n % d == 0:
            for rest in _partitions(n // d, k - 1, d):
                yield (d, *rest)
        d += 1


def factorize(n: int, num_factors: int) -> tuple[int, ...]:
    """Factor a dimension into ``num_factors`` modes, small at the ends, large in the middle.

    For ``num_factors=5`` and a dimension listed in the DoTA paper's Table 2
    (:data:`PAPER_SHAPES`) the paper's shape is returned. Otherwise the modes are the most
    balanced factorization (smallest sum of squares, every mode >= 2), placed largest first
    at the center and alternating outwards (right of center first).

    Parameters
    ----------
    n : int
        The dimension to factor (>= 1).
    num_factors : int
        Number of modes ``N`` (>= 1).

    Returns
    -------
    tuple of int
        ``N`` modes whose product is ``n``.

    Raises
    ------
    ShapeError
        If ``n`` has fewer than ``num_factors`` prime factors (counted with multiplicity),
        so no factorization into modes >= 2 exists; the message gives the largest
        feasible ``num_factors``.

    Examples
    --------
    >>> factorize(4096, 5)
    (4, 4, 8, 8, 4)
    >>> factorize(11008, 5)
    (4, 4, 43, 4, 4)
    >>> factorize(576, 5)
    (3, 4, 4, 4, 3)
    >>> factorize(1536, 3)
    (8, 16, 12)
    """
    n = check_positive_int(n, "n")
    num_factors = check_positive_int(num_factors, "num_factors")
    if num_factors == 5 and n in PAPER_SHAPES:
        return PAPER_SHAPES[n]
    if num_factors == 1:
        return (n,)
    primes = _prime_factors(n)
    if len(primes) < num_factors:
        raise ShapeError(
            f"cannot factor n={n} into num_factors={num_factors} modes >= 2: {n} has "
            f"{len(primes)} prime factor(s) {primes}; use num_factors <= {max(len(primes), 1)} "
            f"or give the modes explicitly"
        )
    best = min(_partitions(n, num_factors, 2), key=lambda f: (sum(x * x for x in f), f[::-1]))
    center = (num_factors - 1) // 2
    order = [center]
    for step in range(1, num_factors):
        for pos in (center + step, center - step):
            if 0 <= pos < num_factors:
                order.append(pos)
    modes = [0] * num_factors
    for pos, value in zip(order, sorted(best, reverse=True)):
        modes[pos] = value
    return tuple(modes)


def mpo_modes(
    out_features: int, in_features: int, num_cores: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return ``(out_modes, in_modes)`` for a ``(out_features, in_features)`` weight.

    Examples
    --------
    >>> mpo_modes(11008, 4096, 5)
    ((4, 4, 43, 4, 4), (4, 4, 8, 8, 4))
    """
    return factorize(out_features, num_cores), factorize(in_features, num_cores)


def _lib(x: Any) -> Any:
    """``torch`` for a torch tensor, ``numpy`` otherwise (their ``matmul``/``add`` take ``out``)."""
    if is_torch(x):
        import torch

        return torch
    return np


def _permute(x: Any, perm: Sequence[int]) -> Any:
    return x.permute(*perm) if hasattr(x, "permute") else np.transpose(x, perm)


def matrix_to_tensor(matrix: Any, out_modes: Sequence[int], in_modes: Sequence[int]) -> Any:
    """View a ``(prod(out_modes), prod(in_modes))`` matrix as the order-2N tensor of the MPO.

    The axes are interleaved ``(I_1, J_1, I_2, J_2, ..., I_N, J_N)``, so that the k-th
    core of the MPO owns axes ``2k`` and ``2k+1``.

    Examples
    --------
    >>> import numpy as np
    >>> matrix_to_tensor(np.zeros((6, 20)), (2, 3), (4, 5)).shape
    (2, 4, 3, 5)
    """
    out_modes = check_modes(out_modes, "out_modes")
    in_modes = check_modes(in_modes, "in_modes")
    if len(out_modes) != len(in_modes):
        raise ShapeError(
            f"`out_modes` and `in_modes` must have the same length; got {list(out_modes)} "
            f"and {list(in_modes)}"
        )
    expected = (int(np.prod(out_modes)), int(np.prod(in_modes)))
    if tuple(matrix.shape) != expected:
        raise ShapeError(
            f"modes {list(out_modes)} x {list(in_modes)} describe a matrix of shape "
            f"{expected}; got an array of shape {tuple(matrix.shape)}"
        )
    n = len(out_modes)
    t = matrix.reshape(*out_modes, *in_modes)
    perm = [p for k in range(n) for p in (k, n + k)]
    return _permute(t, perm)


def tensor_to_matrix(tensor: Any) -> Any:
    """Inverse of :func:`matrix_to_tensor`: interleaved ``(I_1, J_1, ...)`` axes to a matrix.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.arange(120.0).reshape(6, 20)
    >>> bool((tensor_to_matrix(matrix_to_tensor(w, (2, 3), (4, 5))) == w).all())
    True
    """
    shape = tuple(tensor.shape)
    if len(shape) % 2:
        raise ShapeError(f"expected an order-2N tensor with interleaved axes; got shape {shape}")
    n = len(shape) // 2
    perm = [2 * k for k in range(n)] + [2 * k + 1 for k in range(n)]
    t = _permute(tensor, perm)
    rows = int(np.prod(shape[0::2]))
    cols = int(np.prod(shape[1::2]))
    return t.reshape(rows, cols)


def _chain(cores: Sequence[Any]) -> tuple[Any, list[int], list[int]]:
    """Contract consecutive cores into ``(R_first, I.., J.., R_last)`` (rows, then columns)."""
    r0, i, j, r1 = cores[0].shape
    acc = cores[0]  # (r0, I, J, r1)
    rows, cols = [i], [j]
    for core in cores[1:]:
        q0, i, j, q1 = core.shape
        if acc.shape[-1] != q0:
            raise ShapeError(
                f"bond mismatch: a core ends with rank {acc.shape[-1]}, the next starts with "
                f"rank {q0}"
            )
        a0, ai, aj, _ = acc.shape
        prod = (acc.reshape(-1, q0) @ core.reshape(q0, -1)).reshape(a0, ai, aj, i, j, q1)
        acc = _permute(prod, (0, 1, 3, 2, 4, 5)).reshape(a0, ai * i, aj * j, q1)
        rows.append(i)
        cols.append(j)
    return acc, rows, cols


def mpo_halves(cores: Sequence[Any]) -> tuple[Any, Any]:
    """Contract MPO cores into two small halves whose product is the matrix.

    The cores are split where the two half-chains are smallest. Returns ``left`` of
    shape ``(I_left, J_left, R)`` and ``right`` of shape ``(R, I_right, J_right)``, with
    ``W[(i, i'), (j, j')] = sum_r left[i, j, r] right[r, i', j']``; see
    :func:`combine_halves`. Differentiable for torch tensors.

    Examples
    --------
    >>> import numpy as np
    >>> cores = [np.ones((1, 2, 3, 4)), np.ones((4, 5, 6, 1))]
    >>> left, right = mpo_halves(cores)
    >>> left.shape, right.shape
    ((2, 3, 4), (4, 5, 6))
    """
    if len(cores) == 0:
        raise ShapeError("`cores` must hold at least one core; got an empty sequence")
    for k, core in enumerate(cores):
        if core.ndim != 4:
            raise ShapeError(
                f"`cores[{k}]` must have 4 axes (R_prev, I_k, J_k, R_next); got shape "
                f"{tuple(core.shape)}"
            )
    if cores[0].shape[0] != 1:
        raise ShapeError(f"`cores[0]` must have a leading rank of 1; got {cores[0].shape[0]}")
    if cores[-1].shape[-1] != 1:
        raise ShapeError(
            f"the last core must have a trailing rank of 1; got {cores[-1].shape[-1]}"
        )
    n = len(cores)
    if n == 1:
        c = cores[0]
        one = c.reshape(-1)[:1] * 0 + 1  # a 1 of c's array type, dtype and device
        return c.reshape(c.shape[1], c.shape[2], 1), one.reshape(1, 1, 1)
    sizes = [int(np.prod(c.shape[1:3])) for c in cores]
    best, split = None, 1
    for m in range(1, n):
        r = int(cores[m].shape[0])
        cost = int(np.prod(sizes[:m])) * r + r * int(np.prod(sizes[m:]))
        if best is None or cost < best:
            best, split = cost, m
    left, _, _ = _chain(cores[:split])
    right, _, _ = _chain(cores[split:])
    if left.shape[-1] != right.shape[0]:
        raise ShapeError(f"bond mismatch at core {split}: {left.shape[-1]} vs {right.shape[0]}")
    left = left.reshape(left.shape[1], left.shape[2], left.shape[3])
    right = right.reshape(right.shape[0], right.shape[1], right.shape[2])
    return left, right


def combine_halves(
    left: Any, right: Any, *, base: Any = None, out: Any = None, work: Any = None
) -> Any:
    """The ``(I, J)`` matrix from :func:`mpo_halves`, plus ``base`` if given.

    One matrix product writes the entries; one pass puts them in ``(I, J)`` order and,
    with ``base``, adds ``base`` in the same pass (no separate sum).

    ``work`` (``(I_left * J_left, I_right * J_right)``) and ``out`` (``(I, J)``, only with
    ``base``) are contiguous arrays to write the product and the result into instead of
    allocating them: a caller that builds matrices repeatedly reuses its buffers (no
    autograd through them).

    Examples
    --------
    >>> import numpy as np
    >>> cores = [np.ones((1, 2, 3, 4)), np.ones((4, 5, 6, 1))]
    >>> w = combine_halves(*mpo_halves(cores), base=np.ones((10, 18)))
    >>> w.shape, float(w[0, 0])
    ((10, 18), 5.0)
    """
    li, lj, r = left.shape
    _, ri, rj = right.shape
    a, b = left.reshape(li * lj, r), right.reshape(r, ri * rj)
    if work is None:
        prod = a @ b
    else:
        prod = work.reshape(li * lj, ri * rj)
        _lib(a).matmul(a, b, out=prod)
    ordered = _permute(prod.reshape(li, lj, ri, rj), (0, 2, 1, 3))
    if base is None:
        if out is not None:
            raise ShapeError("`out` needs `base`: without it the result is a reordered view")
        return ordered.reshape(li * ri, lj * rj)
    if tuple(base.shape) != (li * ri, lj * rj):
        raise ShapeError(
            f"`base` must have the matrix's shape {(li * ri, lj * rj)}; got {tuple(base.shape)}"
        )
    if out is None:
        return (base.reshape(li, ri, lj, rj) + ordered).reshape(li * ri, lj * rj)
    target = out.reshape(li, ri, lj, rj)
    _lib(a).add(base.reshape(li, ri, lj, rj), ordered, out=target)
    return target.reshape(li * ri, lj * rj)


def cores_to_matrix(cores: Sequence[Any], *, base: Any = None) -> Any:
    """Contract MPO cores ``(R_{k-1}, I_k, J_k, R_k)`` into the dense ``(I, J)`` matrix.

    The cores are split where the two halves are smallest (:func:`mpo_halves`); each
    half is contracted into a small block, and one matrix product over the shared bond
    writes ``W``, reordered in one more pass (:func:`combine_halves`). Works for numpy
    arrays and torch tensors (autograd flows through it).

    Parameters
    ----------
    cores : sequence of arrays
        The MPO cores.
    base : array, optional
        A dense ``(I, J)`` matrix to add, in the same pass as the reordering.

    Examples
    --------
    >>> import numpy as np
    >>> cores = [np.ones((1, 2, 3, 2)), np.ones((2, 2, 2, 1))]
    >>> cores_to_matrix(cores).shape
    (4, 6)
    """
    return combine_halves(*mpo_halves(cores), base=base)
