"""Tensorization: factoring dimensions into modes and matrix <-> MPO-tensor reshapes.

Layout convention (used everywhere in tensornet): a weight ``W`` has PyTorch's shape
``(out_features, in_features)``. The paper's ``W0 in R^{I x J}`` maps to it with
``I = out_features`` (rows, ``out_modes`` ``I_1..I_N``) and ``J = in_features``
(columns, ``in_modes`` ``J_1..J_N``). MPO cores have shape ``(R_{k-1}, I_k, J_k, R_k)``,
the layout of tensorly's TT-matrix cores.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ._backend import as_array, check_same_kind, is_torch
from ._chain import combine_halves, mpo_halves, permute
from ._validate import check_mode_pair, check_positive_int
from .errors import DTypeError, ShapeError

__all__ = [
    "PAPER_SHAPES",
    "factorize",
    "mpo_modes",
    "matrix_to_tensor",
    "tensor_to_matrix",
    "cores_to_matrix",
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


#: The largest dimension :func:`factorize` takes: beyond any tensor's (2**40 float32
#: entries are 4 TB), and its trial division stays below a million steps.
_MAX_DIMENSION = 2**40


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
        so no factorization into modes >= 2 exists (the message gives the largest
        feasible ``num_factors``), or if ``n`` exceeds ``2**40``.

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
    if n > _MAX_DIMENSION:
        raise ShapeError(
            f"`n` must be at most 2**40 (a tensor dimension; factoring is trial division up "
            f"to sqrt(n)); got {n}"
        )
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

    Each dimension is factored with :func:`factorize` (the paper's Table 2 for
    ``num_cores=5``).

    Parameters
    ----------
    out_features, in_features : int
        The weight's rows and columns (``nn.Linear.weight`` is ``(out, in)``).
    num_cores : int
        Number of MPO cores ``N``.

    Returns
    -------
    (tuple of int, tuple of int)
        ``I_1..I_N`` (product ``out_features``) and ``J_1..J_N`` (product
        ``in_features``), the ``shape`` argument of :func:`tensornet.mpo_decompose`.

    Raises
    ------
    ShapeError
        If a dimension cannot be factored into ``num_cores`` modes.

    Examples
    --------
    >>> mpo_modes(11008, 4096, 5)
    ((4, 4, 43, 4, 4), (4, 4, 8, 8, 4))
    """
    out_features = check_positive_int(out_features, "out_features")
    in_features = check_positive_int(in_features, "in_features")
    num_cores = check_positive_int(num_cores, "num_cores")
    return factorize(out_features, num_cores), factorize(in_features, num_cores)


def matrix_to_tensor(matrix: Any, out_modes: Sequence[int], in_modes: Sequence[int]) -> Any:
    """View a ``(prod(out_modes), prod(in_modes))`` matrix as the order-2N tensor of the MPO.

    The axes are interleaved ``(I_1, J_1, I_2, J_2, ..., I_N, J_N)``, so that the k-th
    core of the MPO owns axes ``2k`` and ``2k+1``. (tensorly's ``tensor_train_matrix``
    takes the other order-2N layout, ``(I_1, ..., I_N, J_1, ..., J_N)``, which is
    ``matrix.reshape(*out_modes, *in_modes)``.)

    Parameters
    ----------
    matrix : numpy.ndarray or torch.Tensor
        2-D array of shape ``(prod(out_modes), prod(in_modes))``; a nested list is read
        with numpy.
    out_modes, in_modes : sequence of int
        ``I_1..I_N`` and ``J_1..J_N``.

    Returns
    -------
    array
        A view (no copy) of ``matrix`` with ``2N`` axes, of its array type.

    Examples
    --------
    >>> import numpy as np
    >>> matrix_to_tensor(np.zeros((6, 20)), (2, 3), (4, 5)).shape
    (2, 4, 3, 5)
    """
    matrix = as_array(matrix, "matrix")
    out_modes, in_modes = check_mode_pair(out_modes, in_modes)
    expected = (math.prod(out_modes), math.prod(in_modes))
    if tuple(matrix.shape) != expected:
        raise ShapeError(
            f"modes {list(out_modes)} x {list(in_modes)} describe a matrix of shape "
            f"{expected}; got `matrix` of shape {tuple(matrix.shape)}"
        )
    n = len(out_modes)
    t = matrix.reshape(*out_modes, *in_modes)
    perm = [p for k in range(n) for p in (k, n + k)]
    return permute(t, perm)


def tensor_to_matrix(tensor: Any) -> Any:
    """Inverse of :func:`matrix_to_tensor`: interleaved ``(I_1, J_1, ...)`` axes to a matrix.

    Parameters
    ----------
    tensor : numpy.ndarray or torch.Tensor
        Array of even order ``2N >= 2`` with axes ``(I_1, J_1, ..., I_N, J_N)``.

    Returns
    -------
    array
        The ``(prod(I), prod(J))`` matrix, of the tensor's array type (a copy where the
        axes must move).

    Examples
    --------
    >>> import numpy as np
    >>> w = np.arange(120.0).reshape(6, 20)
    >>> bool((tensor_to_matrix(matrix_to_tensor(w, (2, 3), (4, 5))) == w).all())
    True
    """
    tensor = as_array(tensor, "tensor")
    shape = tuple(int(s) for s in tensor.shape)
    if len(shape) % 2 or not shape:
        raise ShapeError(
            f"`tensor` must be an order-2N tensor (N >= 1) with interleaved axes "
            f"(I_1, J_1, ..., I_N, J_N); got shape {shape}"
        )
    n = len(shape) // 2
    perm = [2 * k for k in range(n)] + [2 * k + 1 for k in range(n)]
    t = permute(tensor, perm)
    return t.reshape(math.prod(shape[0::2]), math.prod(shape[1::2]))


def check_cores(cores: Any, name: str = "cores") -> tuple[Any, ...]:
    """Validate MPO cores: a non-empty sequence of 4-D arrays of one kind, bonds chained.

    Returns them as a tuple (private helper of the core's public functions).
    """
    if is_torch(cores) or isinstance(cores, np.ndarray) or isinstance(cores, (str, bytes)) or (
        not isinstance(cores, Sequence)
    ):
        raise DTypeError(
            f"`{name}` must be a sequence of 4-D MPO cores (R_prev, I_k, J_k, R_next); got "
            f"{type(cores).__name__}"
        )
    cores = tuple(cores)
    if not cores:
        raise ShapeError(f"`{name}` must hold at least one core; got an empty sequence")
    for k, core in enumerate(cores):
        if not (is_torch(core) or isinstance(core, np.ndarray)):
            raise DTypeError(
                f"`{name}[{k}]` must be a numpy array or a torch tensor; got "
                f"{type(core).__name__}"
            )
        if core.ndim != 4:
            raise ShapeError(
                f"`{name}[{k}]` must be a 4-D core (R_prev, I_k, J_k, R_next); got shape "
                f"{tuple(core.shape)}"
            )
    check_same_kind(cores, name)
    prev = 1
    for k, core in enumerate(cores):
        if core.shape[0] != prev:
            raise ShapeError(
                f"bond mismatch at `{name}[{k}]`: expected leading rank {prev}, got shape "
                f"{tuple(core.shape)}"
            )
        prev = core.shape[-1]
    if prev != 1:
        raise ShapeError(f"the last core of `{name}` must end with rank 1; got {prev}")
    return cores


def cores_to_matrix(cores: Sequence[Any], *, base: Any = None) -> Any:
    """Contract MPO cores ``(R_{k-1}, I_k, J_k, R_k)`` into the dense ``(I, J)`` matrix.

    The cores are split where the two halves are smallest; each half is contracted into
    a small block, and one matrix product over the shared bond writes ``W``, reordered
    in one more pass. Works for numpy arrays and torch tensors (autograd flows through
    it).

    Parameters
    ----------
    cores : sequence of arrays
        The MPO cores, all of one array type, dtype and device.
    base : array, optional
        A dense ``(I, J)`` matrix of the cores' kind to add, in the same pass as the
        reordering.

    Returns
    -------
    array
        ``(prod(I_k), prod(J_k))``, of the cores' array type, dtype and device.

    Examples
    --------
    >>> import numpy as np
    >>> cores = [np.ones((1, 2, 3, 2)), np.ones((2, 2, 2, 1))]
    >>> cores_to_matrix(cores).shape
    (4, 6)
    >>> float(cores_to_matrix(cores, base=np.ones((4, 6)))[0, 0])
    3.0
    """
    cores = check_cores(cores)
    if base is not None:
        base = as_array(base, "base")
        shape = (
            math.prod(int(c.shape[1]) for c in cores),
            math.prod(int(c.shape[2]) for c in cores),
        )
        if tuple(base.shape) != shape:
            raise ShapeError(
                f"`base` must have the matrix's shape {shape}; got {tuple(base.shape)}"
            )
        check_same_kind([base], "base", like=cores[0], like_name="cores[0]", indexed=False)
    return combine_halves(*mpo_halves(cores), base=base)
