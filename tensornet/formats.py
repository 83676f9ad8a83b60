"""Result objects: :class:`MPO` (tensor-train matrix) and :class:`TensorTrain`.

Both also compute in the format (rounding, canonical forms, sums, inner products and
norms, never the dense matrix): what they share (the fields and their checks, the
parameter count and these operations, over the kernels of :mod:`tensornet.ttops`) is
defined once, on their private base class ``_CoreChain``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from . import ttops
from ._backend import check_same_kind, is_torch
from ._chain import combine_halves, mpo_halves
from ._validate import check_positive_int, check_tol
from .errors import ConfigError, DTypeError, ShapeError
from .params import Rank, check_rank

__all__ = ["MPO", "TensorTrain"]


def _check_chain(cores: Any, order: int, kind: str) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """The cores as a tuple and their bond dimensions; raise on anything else."""
    if is_torch(cores) or isinstance(cores, (np.ndarray, str, bytes)) or not isinstance(
        cores, Sequence
    ):
        raise DTypeError(
            f"`cores` of {kind} must be a sequence of {order}-D arrays; got "
            f"{type(cores).__name__}"
        )
    cores = tuple(cores)
    if len(cores) == 0:
        raise ShapeError(f"`cores` of {kind} must hold at least one core; got none")
    ranks = [1]
    for k, core in enumerate(cores):
        if not (is_torch(core) or isinstance(core, np.ndarray)):
            raise DTypeError(
                f"`cores[{k}]` of {kind} must be a numpy array or a torch tensor; got "
                f"{type(core).__name__}"
            )
        shape = tuple(core.shape)
        if len(shape) != order:
            raise ShapeError(f"`cores[{k}]` of {kind} must have {order} axes; got shape {shape}")
        if 0 in shape:
            raise ShapeError(
                f"`cores[{k}]` of {kind} must have no axis of size 0; got shape {shape}"
            )
        if shape[0] != ranks[-1]:
            raise ShapeError(
                f"bond mismatch at `cores[{k}]`: expected leading rank {ranks[-1]}, got "
                f"shape {shape}"
            )
        ranks.append(shape[-1])
    if ranks[-1] != 1:
        raise ShapeError(f"the last core of {kind} must end with rank 1; got {ranks[-1]}")
    check_same_kind(cores, "cores")
    return cores, tuple(int(r) for r in ranks)


def _check_error_fields(result: Any) -> None:
    """``relative_error`` and ``error_bound``: None or a finite real number >= 0."""
    for name in ("relative_error", "error_bound"):
        value = getattr(result, name)
        if value is None:
            continue
        ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
              and math.isfinite(value) and value >= 0)
        if not ok:
            raise ConfigError(
                f"`{name}` must be None or a finite number >= 0 (a relative Frobenius "
                f"error); got {value!r}"
            )


def _cores_of(obj: Any, name: str) -> tuple[Any, ...]:
    """The cores of a tensorly object (a list of cores itself)."""
    if is_torch(obj) or isinstance(obj, (np.ndarray, str, bytes)) or not hasattr(obj, "__iter__"):
        raise DTypeError(
            f"`{name}` must be a tensorly TT object or a list of its cores; got "
            f"{type(obj).__name__}"
        )
    return tuple(obj)


# ---------------------------------------------------------------------------------------
# Operations in the format (tensornet.ttops), shared by MPO and TensorTrain through their
# base class _CoreChain (documented on both classes' pages: docs' class-train template). An
# MPO works on its cores reshaped to (R_{k-1}, I_k J_k, R_k).

_Train = TypeVar("_Train", "MPO", "TensorTrain")


def _check_operand(self: _Train, other: Any, op: str) -> None:
    """``other`` is a train of ``self``'s class, modes and array kind, else raise."""
    kind = type(self).__name__
    if type(other) is not type(self):
        raise DTypeError(
            f"`{op}` of {kind} takes another {kind} (of the same modes); got "
            f"{type(other).__name__}"
        )
    if self._modes() != other._modes():
        raise ShapeError(
            f"`{op}` of {kind} needs equal modes: the left operand has "
            f"{self._describe_modes()}, the right {other._describe_modes()}"
        )
    check_same_kind([other.cores[0]], "other", like=self.cores[0], like_name="self", indexed=False)


def _round(self: _Train, *, rank: Rank = None, tol: float | None = None) -> _Train:
    """Recompress to smaller ranks without forming the dense matrix (TT-rounding).

    A right-to-left QR sweep makes the cores right-orthogonal, then a left-to-right
    sweep truncates the SVD of each core at its bond (Oseledets' TT-rounding, see
    :mod:`tensornet.ttops`): the result is the TT-SVD of the represented matrix or
    tensor, at ``O(N R^3 d)`` cost (``d = I_k J_k`` for an MPO).

    Parameters
    ----------
    rank : None, int or sequence of int
        A rank specification (:mod:`tensornet.params`), as for
        :func:`tensornet.mpo_decompose`: None truncates nothing (a bond falls only to
        what the cores' shapes allow, ``min(R_{k-1} d_k, d_{k+1} R_{k+1})``), an int caps
        every bond, ``N-1`` ints cap each, or the ``N+1`` form of :attr:`ranks`.
    tol : float, optional
        Relative Frobenius change allowed, in (0, 1): each of the ``N-1`` bonds keeps the
        smallest rank whose discarded mass is at most ``tol^2 ||A||^2 / (N-1)``.
        Combined with ``rank``, the cap wins. It must be at least twice the rounding
        allowance ``(4 eps + 32 eps_64) sqrt(N)`` (``eps`` of the cores' dtype, ``eps_64``
        float64's), which is set aside for the rounding of the result, so that the
        change, as measured, is at most ``tol``.

    Returns
    -------
    MPO or TensorTrain
        A new result of this class, the cores' array type, dtype and device, with
        ``relative_error`` the change ``||A - round(A)||_F / ||A||_F`` relative to this
        train ``A`` (not to a matrix it was decomposed from): exactly ``sqrt(sum of
        discarded sigma^2) / ||A||_F``, the sweep being orthogonal; ``error_bound``
        adds the rounding allowance (float64 sweep, cast to the cores' dtype), so that
        the measured change is within it; ``singular_values`` holds the spectrum of each
        bond in the sweep (float64, descending, every value).

    Raises
    ------
    RankError, ToleranceError
        On a bad ``rank`` or ``tol`` (a ``tol`` below the dtype's limit included).
    NonFiniteError
        If the cores hold NaN or Inf, or the result overflows their dtype even with its
        norm spread evenly over the cores (the sweep leaves it in the last core; a
        float16 train is balanced where that core would overflow).

    Examples
    --------
    A sum doubles the ranks; rounding at the original ranks gives the train back:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = MPO([rng.standard_normal(s) for s in [(1, 2, 3, 4), (4, 3, 2, 4), (4, 2, 2, 1)]])
    >>> b = (a + a).round(rank=a.ranks)
    >>> (a + a).ranks, b.ranks
    ((1, 8, 8, 1), (1, 4, 4, 1))
    >>> bool(np.allclose(b.to_dense(), 2 * a.to_dense())), b.relative_error < 1e-12
    (True, True)
    >>> c = a.round(rank=2)
    >>> c.ranks, c.relative_error <= c.error_bound
    ((1, 2, 2, 1), True)
    """
    cores = self._tt_cores()
    caps = check_rank(rank, len(cores))
    tol = check_tol(tol)
    out, rel, bound, spectra = ttops.round_cores(cores, caps, tol)
    return self._from_tt_cores(out, error_bound=bound, relative_error=rel, singular_values=spectra)


def _canonicalize(self: _Train, center: int) -> _Train:
    """The same operator with its cores in a canonical (mixed-orthogonal) form.

    Cores before ``center`` are left-orthogonal (each reshaped to ``(R_{k-1} d_k, R_k)``
    has orthonormal columns; ``d_k = I_k J_k`` for an MPO), cores after it
    right-orthogonal (each reshaped to ``(R_{k-1}, d_k R_k)`` has orthonormal rows); the
    ``center`` core carries the norm. A bond may shrink to what the cores' shapes allow
    (``R_k <= R_{k-1} d_k`` and ``R_{k-1} <= d_k R_k``); nothing else is truncated.

    Parameters
    ----------
    center : int
        The orthogonality center, ``0 <= center < N``.

    Returns
    -------
    MPO or TensorTrain
        A new result of this class (array type, dtype and device kept, factorized in
        float64), without error fields: it is a new set of cores for the same operator.

    Raises
    ------
    ShapeError, DTypeError
        If ``center`` is not an int in ``[0, N)``.
    NonFiniteError
        If the cores hold NaN or Inf, or the center core, which holds the whole norm,
        overflows their dtype (float16: cast to float32 first).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> tt = TensorTrain([rng.standard_normal(s) for s in [(1, 3, 2), (2, 4, 2), (2, 5, 1)]])
    >>> c = tt.canonicalize(2)
    >>> q = c.cores[0].reshape(3, 2)
    >>> bool(np.allclose(q.T @ q, np.eye(2))), bool(np.allclose(c.to_dense(), tt.to_dense()))
    (True, True)
    >>> bool(np.isclose(np.linalg.norm(c.cores[2]), tt.norm()))
    True
    """
    n = len(self.cores)
    center = check_positive_int(center, "center", minimum=0)
    if center >= n:
        raise ShapeError(
            f"`center` must be a core index in [0, {n}) for {n} "
            f"{'core' if n == 1 else 'cores'}; got {center}"
        )
    return self._from_tt_cores(ttops.canonical_cores(self._tt_cores(), center))


def _inner(self: _Train, other: _Train) -> float:
    """Frobenius inner product ``sum(A * B)`` with a train of the same modes.

    Contracts the two trains core by core in float64, carrying an ``R_a x R_b`` matrix
    along the chain: ``O(N R^3 d)``, never the dense operands.

    Parameters
    ----------
    other : MPO or TensorTrain
        A train of this class, of the same modes, array type, dtype and device.

    Returns
    -------
    float
        The inner product.

    Raises
    ------
    ShapeError
        If the modes differ.
    DTypeError
        If ``other`` is not of this class, or its array type, dtype or device differs.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = MPO([rng.standard_normal((1, 2, 3, 2)), rng.standard_normal((2, 2, 2, 1))])
    >>> b = MPO([rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((3, 2, 2, 1))])
    >>> bool(np.isclose(a.inner(b), np.vdot(a.to_dense(), b.to_dense())))
    True
    """
    _check_operand(self, other, "inner")
    return ttops.inner_cores(self._tt_cores(), other._tt_cores())


def _norm(self: _Train) -> float:
    """Frobenius norm ``sqrt(A.inner(A))``, contracted core by core in float64.

    Returns
    -------
    float
        ``||A||_F``.

    Raises
    ------
    NonFiniteError
        If the cores hold NaN or Inf.

    Examples
    --------
    >>> import numpy as np
    >>> tt = TensorTrain([np.ones((1, 3, 2)), np.ones((2, 4, 1))])
    >>> round(tt.norm(), 6), round(float(np.linalg.norm(tt.to_dense())), 6)
    (6.928203, 6.928203)
    """
    return ttops.norm_cores(self._tt_cores())


def _add(self: _Train, other: Any) -> _Train:
    _check_operand(self, other, "+")
    return self._from_tt_cores(ttops.add_cores(self._tt_cores(), other._tt_cores()))


def _sub(self: _Train, other: Any) -> _Train:
    _check_operand(self, other, "-")
    return _add(self, -other)


def _neg(self: _Train) -> _Train:
    return self._from_tt_cores(ttops.scale_cores(self._tt_cores(), -1.0))


def _mul(self: _Train, c: Any) -> _Train:
    c = ttops.check_scalar(c, "*", type(self).__name__)
    return self._from_tt_cores(ttops.scale_cores(self._tt_cores(), c))


@dataclass(frozen=True, eq=False)
class _CoreChain:
    """What :class:`MPO` and :class:`TensorTrain` share: cores, error fields, operations.

    The chain of cores (checked), the error fields of a decomposition, the parameter count
    and the operations in the format. A subclass sets ``_order`` (axes of a core) and
    ``_what`` (its name in messages), and gives ``_tt_cores`` / ``_from_tt_cores`` (its
    cores as, and from, 3-D train cores), ``_modes`` and ``_describe_modes``.
    """

    cores: tuple[Any, ...]
    error_bound: float | None = None
    relative_error: float | None = None
    singular_values: tuple[np.ndarray, ...] | None = field(default=None, repr=False)
    ranks: tuple[int, ...] = field(init=False)

    _order: ClassVar[int]
    _what: ClassVar[str]

    def __post_init__(self) -> None:
        cores, ranks = _check_chain(self.cores, self._order, self._what)
        _check_error_fields(self)
        object.__setattr__(self, "cores", cores)
        object.__setattr__(self, "ranks", ranks)

    @property
    def num_params(self) -> int:
        """Total number of core entries (for an MPO, the DoTA paper's ``rho``)."""
        return int(sum(int(np.prod(c.shape)) for c in self.cores))

    # operations in the format (the module-level functions above)
    __array_ufunc__ = None  # numpy defers ``np.float64(2) * x`` to __rmul__
    round = _round
    canonicalize = _canonicalize
    inner = _inner
    norm = _norm
    __add__ = _add
    __sub__ = _sub
    __neg__ = _neg
    __mul__ = _mul
    __rmul__ = _mul

    def _error_repr(self) -> str:
        return "n/a" if self.relative_error is None else f"{self.relative_error:.3e}"


@dataclass(frozen=True, eq=False)
class MPO(_CoreChain):
    """A matrix product operator (tensor-train matrix) approximating a weight matrix.

    Returned by :func:`tensornet.mpo_decompose`; can also be built from cores.

    Parameters
    ----------
    cores : sequence of arrays
        ``N`` cores of shape ``(R_{k-1}, I_k, J_k, R_k)`` with ``R_0 = R_N = 1``, all of
        one array type, dtype and device (a decomposition gives the decomposed matrix's).
    error_bound : float, optional
        Relative bound on ``||W - to_dense()||_F / ||W||_F``: the TT-SVD bound
        ``sqrt(sum of discarded sigma^2) / ||W||_F``, raised to the measured error where
        rounding (of the compute dtype, or of the cast to the output dtype) exceeds it, so
        that ``relative_error <= error_bound`` always. None when not decomposed.
    relative_error : float, optional
        ``||W - to_dense()||_F / ||W||_F`` of the returned cores (None when not computed).
    singular_values : tuple of numpy arrays, optional
        For each of the ``N-1`` sweeps, the singular values of the unfolding the sweep
        truncated (float64, descending): the first is the spectrum of ``W``'s unfolding
        ``(I_1 J_1) x (rest)``, the k-th that of the ``(R_{k-1} I_k J_k) x (rest)``
        remainder. Every value when ``mpo_decompose(..., full_spectrum=True)`` was asked
        for, or the unfolding has fewer than 128 rows or columns; otherwise the leading
        ones, at least the kept ``R_k`` (the eigensolver is asked for no more).

    Attributes
    ----------
    ranks : tuple of int
        Bond dimensions ``(1, R_1, ..., R_{N-1}, 1)``, read off the cores; a valid ``rank``
        argument (:mod:`tensornet.params`), so ``mpo_decompose(W, shape, mpo.ranks)``
        repeats the decomposition.

    Raises
    ------
    ShapeError, DTypeError
        If the cores are not a chain of 4-D arrays of one kind with matching bonds.

    Notes
    -----
    Operations in the format, none of which forms the dense matrix
    (:mod:`tensornet.ttops`): :meth:`round` recompresses to smaller ranks,
    :meth:`canonicalize` gives a mixed-orthogonal form, :meth:`inner` and :meth:`norm`
    the Frobenius inner product and norm; ``a + b`` and ``a - b`` (equal modes, array
    type, dtype and device) add the bonds, ``R_k(a + b) = R_k(a) + R_k(b)``, and
    ``c * a``, ``a * c``, ``-a`` scale by a real number. Results of arithmetic carry no
    error fields (None).

    Examples
    --------
    >>> import numpy as np
    >>> cores = [np.ones((1, 2, 3, 4)), np.ones((4, 5, 6, 1))]
    >>> m = MPO(cores)
    >>> m.shape, m.ranks, m.num_params
    ((10, 18), (1, 4, 1), 144)
    >>> float(m.to_dense()[0, 0])
    4.0
    >>> (m + m).ranks, float((m - 0.5 * m).to_dense()[0, 0]), (m + m).round(tol=1e-9).ranks
    ((1, 8, 1), 2.0, (1, 1, 1))
    """

    _order = 4
    _what = "an MPO"

    @property
    def num_cores(self) -> int:
        """Number of cores ``N``."""
        return len(self.cores)

    @property
    def out_modes(self) -> tuple[int, ...]:
        """Row modes ``I_1..I_N`` (their product is ``out_features``)."""
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def in_modes(self) -> tuple[int, ...]:
        """Column modes ``J_1..J_N`` (their product is ``in_features``)."""
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the represented matrix."""
        return int(np.prod(self.out_modes)), int(np.prod(self.in_modes))

    @property
    def compression_ratio(self) -> float:
        """Dense entries divided by :attr:`num_params`."""
        rows, cols = self.shape
        return rows * cols / self.num_params

    def to_dense(self) -> Any:
        """Contract the cores into the ``(out_features, in_features)`` matrix."""
        return combine_halves(*mpo_halves(self.cores))

    def to_tensorly(self) -> Any:
        """Return a :class:`tensorly.tt_matrix.TTMatrix` over the same cores (no copy).

        The cores' layout ``(R_{k-1}, I_k, J_k, R_k)`` is tensorly's; the array type must
        match tensorly's active backend.
        """
        from tensorly.tt_matrix import TTMatrix

        return TTMatrix(list(self.cores))

    def _tt_cores(self) -> tuple[Any, ...]:
        return tuple(c.reshape(c.shape[0], -1, c.shape[3]) for c in self.cores)

    def _from_tt_cores(self, cores: tuple[Any, ...], **fields: Any) -> MPO:
        return MPO(
            tuple(
                c.reshape(c.shape[0], i, j, c.shape[2])
                for c, i, j in zip(cores, self.out_modes, self.in_modes)
            ),
            **fields,
        )

    def _modes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.out_modes, self.in_modes

    def _describe_modes(self) -> str:
        return f"out_modes {list(self.out_modes)} and in_modes {list(self.in_modes)}"

    @classmethod
    def from_tensorly(cls, tt_matrix: Any) -> MPO:
        """Build an :class:`MPO` from a tensorly ``TTMatrix`` (or its list of cores)."""
        return cls(_cores_of(tt_matrix, "tt_matrix"))

    def __repr__(self) -> str:
        return (
            f"MPO(shape={self.shape}, out_modes={list(self.out_modes)}, "
            f"in_modes={list(self.in_modes)}, ranks={list(self.ranks)}, "
            f"num_params={self.num_params}, relative_error={self._error_repr()})"
        )


@dataclass(frozen=True, eq=False)
class TensorTrain(_CoreChain):
    """A tensor train approximating an N-d array.

    Returned by :func:`tensornet.tt_decompose`; can also be built from cores.

    Parameters
    ----------
    cores : sequence of arrays
        ``N`` cores of shape ``(R_{k-1}, d_k, R_k)`` with ``R_0 = R_N = 1``, all of one
        array type, dtype and device.
    error_bound, relative_error, singular_values : optional
        As for :class:`MPO` (the unfoldings are ``(R_{k-1} d_k) x (rest)``).

    Attributes
    ----------
    ranks : tuple of int
        Bond dimensions ``(1, R_1, ..., R_{N-1}, 1)``; a valid ``rank`` argument.

    Raises
    ------
    ShapeError, DTypeError
        If the cores are not a chain of 3-D arrays of one kind with matching bonds.

    Notes
    -----
    The operations of :class:`MPO` (:meth:`round`, :meth:`canonicalize`, :meth:`inner`,
    :meth:`norm`, ``+``, ``-``, scalar ``*``) work on tensor trains of equal shape.

    Examples
    --------
    >>> import numpy as np
    >>> tt = TensorTrain([np.ones((1, 3, 2)), np.ones((2, 4, 1))])
    >>> tt.shape, tt.ranks, tt.to_dense().shape
    ((3, 4), (1, 2, 1), (3, 4))
    """

    _order = 3
    _what = "a tensor train"

    @property
    def shape(self) -> tuple[int, ...]:
        """Mode sizes ``d_1..d_N`` of the represented tensor."""
        return tuple(int(c.shape[1]) for c in self.cores)

    def to_dense(self) -> Any:
        """Contract the cores into the full tensor."""
        acc = self.cores[0].reshape(self.shape[0], self.ranks[1])
        for core in self.cores[1:]:
            r0, d, r1 = core.shape
            acc = (acc @ core.reshape(r0, d * r1)).reshape(-1, r1)
        return acc.reshape(*self.shape)

    def to_tensorly(self) -> Any:
        """Return a :class:`tensorly.tt_tensor.TTTensor` over the same cores."""
        from tensorly.tt_tensor import TTTensor

        return TTTensor(list(self.cores))

    def _tt_cores(self) -> tuple[Any, ...]:
        return self.cores

    def _from_tt_cores(self, cores: tuple[Any, ...], **fields: Any) -> TensorTrain:
        return TensorTrain(tuple(cores), **fields)

    def _modes(self) -> tuple[int, ...]:
        return self.shape

    def _describe_modes(self) -> str:
        return f"shape {list(self.shape)}"

    @classmethod
    def from_tensorly(cls, tt_tensor: Any) -> TensorTrain:
        """Build a :class:`TensorTrain` from a tensorly ``TTTensor`` (or its cores)."""
        return cls(_cores_of(tt_tensor, "tt_tensor"))

    def __repr__(self) -> str:
        return (
            f"TensorTrain(shape={self.shape}, ranks={list(self.ranks)}, "
            f"num_params={self.num_params}, relative_error={self._error_repr()})"
        )
