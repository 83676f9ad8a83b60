"""Result objects: :class:`MPO` (tensor-train matrix) and :class:`TensorTrain`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import check_same_kind, is_torch
from .errors import DTypeError, ShapeError
from .tensorize import _combine_halves, _mpo_halves

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


def _cores_of(obj: Any, name: str) -> tuple[Any, ...]:
    """The cores of a tensorly object (a list of cores itself)."""
    if is_torch(obj) or isinstance(obj, (np.ndarray, str, bytes)) or not hasattr(obj, "__iter__"):
        raise DTypeError(
            f"`{name}` must be a tensorly TT object or a list of its cores; got "
            f"{type(obj).__name__}"
        )
    return tuple(obj)


@dataclass(frozen=True, eq=False)
class MPO:
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

    Examples
    --------
    >>> import numpy as np
    >>> cores = [np.ones((1, 2, 3, 4)), np.ones((4, 5, 6, 1))]
    >>> m = MPO(cores)
    >>> m.shape, m.ranks, m.num_params
    ((10, 18), (1, 4, 1), 144)
    >>> float(m.to_dense()[0, 0])
    4.0
    """

    cores: tuple[Any, ...]
    error_bound: float | None = None
    relative_error: float | None = None
    singular_values: tuple[np.ndarray, ...] | None = field(default=None, repr=False)
    ranks: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        cores, ranks = _check_chain(self.cores, 4, "an MPO")
        object.__setattr__(self, "cores", cores)
        object.__setattr__(self, "ranks", ranks)

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
    def num_params(self) -> int:
        """Total number of core entries (the paper's ``rho``)."""
        return int(sum(int(np.prod(c.shape)) for c in self.cores))

    @property
    def compression_ratio(self) -> float:
        """Dense entries divided by :attr:`num_params`."""
        rows, cols = self.shape
        return rows * cols / self.num_params

    def to_dense(self) -> Any:
        """Contract the cores into the ``(out_features, in_features)`` matrix."""
        return _combine_halves(*_mpo_halves(self.cores))

    def to_tensorly(self) -> Any:
        """Return a :class:`tensorly.tt_matrix.TTMatrix` over the same cores (no copy).

        The cores' layout ``(R_{k-1}, I_k, J_k, R_k)`` is tensorly's; the array type must
        match tensorly's active backend.
        """
        from tensorly.tt_matrix import TTMatrix

        return TTMatrix(list(self.cores))

    @classmethod
    def from_tensorly(cls, tt_matrix: Any) -> MPO:
        """Build an :class:`MPO` from a tensorly ``TTMatrix`` (or its list of cores)."""
        return cls(_cores_of(tt_matrix, "tt_matrix"))

    def __repr__(self) -> str:
        err = "n/a" if self.relative_error is None else f"{self.relative_error:.3e}"
        return (
            f"MPO(shape={self.shape}, out_modes={list(self.out_modes)}, "
            f"in_modes={list(self.in_modes)}, ranks={list(self.ranks)}, "
            f"num_params={self.num_params}, relative_error={err})"
        )


@dataclass(frozen=True, eq=False)
class TensorTrain:
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

    Examples
    --------
    >>> import numpy as np
    >>> tt = TensorTrain([np.ones((1, 3, 2)), np.ones((2, 4, 1))])
    >>> tt.shape, tt.ranks, tt.to_dense().shape
    ((3, 4), (1, 2, 1), (3, 4))
    """

    cores: tuple[Any, ...]
    error_bound: float | None = None
    relative_error: float | None = None
    singular_values: tuple[np.ndarray, ...] | None = field(default=None, repr=False)
    ranks: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        cores, ranks = _check_chain(self.cores, 3, "a tensor train")
        object.__setattr__(self, "cores", cores)
        object.__setattr__(self, "ranks", ranks)

    @property
    def shape(self) -> tuple[int, ...]:
        """Mode sizes ``d_1..d_N`` of the represented tensor."""
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def num_params(self) -> int:
        """Total number of core entries."""
        return int(sum(int(np.prod(c.shape)) for c in self.cores))

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

    @classmethod
    def from_tensorly(cls, tt_tensor: Any) -> TensorTrain:
        """Build a :class:`TensorTrain` from a tensorly ``TTTensor`` (or its cores)."""
        return cls(_cores_of(tt_tensor, "tt_tensor"))

    def __repr__(self) -> str:
        err = "n/a" if self.relative_error is None else f"{self.relative_error:.3e}"
        return (
            f"TensorTrain(shape={self.shape}, ranks={list(self.ranks)}, "
            f"num_params={self.num_params}, relative_error={err})"
        )
