"""TT-SVD: tensor-train and MPO decomposition with rank and tolerance truncation.

The unfoldings of a TT-SVD sweep are very wide (``16 x 10^6`` for the first sweep of a
4096 x 4096 matrix), so each truncated SVD is computed from the Gram matrix of the
unfolding on its small side (one BLAS-3 product and a small symmetric eigensolve, in
float64) rather than from a dense SVD. The kept singular vectors span the same optimal
subspace, so the truncation error is the same as with a dense SVD.

A Gram matrix holds the squared singular values only to an absolute precision of a few
ulps of ``||X||^2``: with a tolerance, a rank read off it is certain only where the
per-bond error budget and the eigenvalues around the cut stand clear of that noise.
Where they do not (a small ``tol``, or a spectrum that falls off to noise right at the
cut), that bond is redone from a thin SVD of the unfolding itself, whose small singular
values are accurate to ulps of the largest one rather than of its square; a float32
computation is redone in float64 first. So ``tol`` is met, with minimal ranks, down to
the limit of the result's dtype; a smaller ``tol`` is refused
(``_validate.check_tol_reachable``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._backend import check_float_array, ops_for
from ._sweep import Layout, _NonFinite, matrix_layout, tt_sweep
from ._truncate import EPS64, _Overflow, _Unresolved
from ._validate import (
    as_int_list,
    check_modes,
    check_positive_int,
    check_tol,
    check_tol_reachable,
)
from .errors import DTypeError, NonFiniteError, ShapeError
from .formats import MPO, TensorTrain
from .params import Rank, check_rank, tt_ranks
from .tensorize import factorize

__all__ = ["tt_decompose", "mpo_decompose"]

# The relative error is read off the norm identity ||X - X_tt||^2 = ||X||^2 - ||X_tt||^2
# (exact for left-orthonormal cores) when (relative error)^2 is above this many units of
# the compute dtype's rounding; below it the identity cancels to noise and the error is
# measured on the float64 reconstruction instead.
_IDENTITY_MIN_ULPS = 1e4

# float32 is used for inputs of 32 bits or fewer, but it resolves squared errors only
# down to ~1e4 ulps of ||W||^2: a tolerance below this, or a result whose relative error
# falls below it, is computed (again) in float64.
_FLOAT32_MIN_TOL = 1e-2


def _balanced(cores: list[Any], ops: Any) -> list[Any]:
    """The same chain with every core of the same Frobenius norm (their product kept).

    TT-SVD leaves the cores left-orthonormal and the whole norm of ``W`` in the last
    core; a dtype with a small range (float16) can hold the balanced cores when it
    cannot hold that last core.
    """
    norms = [math.sqrt(ops.sumsq(c)) for c in cores]
    if not all(n > 0.0 and math.isfinite(n) for n in norms):
        return cores
    mean = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [c * (mean / n) for c, n in zip(cores, norms)]


def _run(
    layout_of: Any,
    like: Any,
    name: str,
    dims: tuple[int, ...],
    caps: tuple[int, ...],
    tol: float | None,
    full: bool,
    dense: Any,
) -> tuple[list[Any], float, float, tuple[np.ndarray, ...]]:
    """Decompose ``like`` (``layout_of(array)`` gives its views), cast back to its dtype.

    ``dense(cores)`` rebuilds ``like`` from float64 cores for the reconstruction error.
    Returns the cast cores, the relative bound (never below the relative error), the
    relative error and the spectra.
    """
    ops = ops_for(like)
    if tol is not None:
        # rounding the N cores (and, in float64, the sweep itself) moves the result by
        # about an ulp each: half the smallest tol accepted is set aside for it, so that
        # the measured error of the returned cores is <= tol
        eps = max(ops.eps(like), EPS64)
        tol -= check_tol_reachable(tol, eps, len(dims), like.dtype, name) / 2
    f64 = ops.to64(like.reshape(-1)[:1]).dtype
    cdtype = ops.compute_dtype(like)
    if tol is not None and tol < _FLOAT32_MIN_TOL:
        cdtype = f64
    scale = 1.0
    while True:
        data = like if scale == 1.0 else ops.to64(like) * (1.0 / scale)
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow -> float64 retry
                cores, norm2, discarded, kept2, spectra = tt_sweep(
                    layout_of(data), dims, caps, tol, cdtype, ops, full
                )
        except _NonFinite:
            raise NonFiniteError(
                f"`{name}` must hold only finite values; got NaN or Inf entries"
            ) from None
        except _Overflow:
            if scale != 1.0:  # pragma: no cover - max-abs scaling bounds every entry by 1
                raise
            cdtype, scale = f64, ops.max_abs(like)
            continue
        except _Unresolved:  # a float32 Gram cannot resolve the tol: float64 can
            cdtype = f64
            continue
        rel2 = (norm2 - kept2) / norm2 if norm2 else 0.0
        low_res = cdtype != f64 and rel2 < _IDENTITY_MIN_ULPS * float(np.finfo(np.float32).eps)
        if not low_res:
            break
        cdtype = f64  # redo: float32 cannot resolve an error this small
    if scale != 1.0:
        spectra = tuple(sigma * scale for sigma in spectra)
        cores[-1] = cores[-1] * scale
    with np.errstate(over="ignore"):  # an overflow of the cast is detected below
        out = [ops.cast(c, like) for c in cores]
        balanced = False
        if not all(ops.all_finite(c) for c in out):
            out = [ops.cast(c, like) for c in _balanced(cores, ops)]
            balanced = True
    if not all(ops.all_finite(c) for c in out):
        raise NonFiniteError(
            f"the MPO cores of `{name}` overflow its dtype {like.dtype} even with the norm "
            f"spread evenly over the cores (||{name}||_F = {math.sqrt(norm2) * scale:.3e}); "
            f"pass `{name}` in float32 or bfloat16, or scale it down"
        )
    if norm2 == 0.0:
        return out, 0.0, 0.0, spectra
    bound = math.sqrt(max(discarded, 0.0) / norm2)
    eps = float(np.finfo(np.float64).eps)
    same_dtype = out[0].dtype == cores[0].dtype
    if rel2 >= _IDENTITY_MIN_ULPS * eps and same_dtype and not balanced:
        rel = math.sqrt(rel2)
        return out, max(bound, rel), rel, spectra
    # small errors, or cores cast to a narrower dtype: measure the returned cores
    x64 = ops.to64(like)
    diff = dense([ops.to64(c) for c in out]) - x64
    rel = math.sqrt(ops.sumsq(diff) / ops.sumsq(x64))
    return out, max(bound, rel), rel, spectra


def tt_decompose(
    x: Any, rank: Rank = None, *, tol: float | None = None, full_spectrum: bool = False
) -> TensorTrain:
    """Tensor-train decomposition (TT-SVD) of an N-d array.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        Real floating array of order ``N >= 1``, any dtype and device.
    rank : None, int or sequence of int
        A rank specification (:mod:`tensornet.params`): None for the exact ranks
        ``R_k = min(prod_{n<=k} d_n, prod_{n>k} d_n)``, a cap for every bond, ``N-1``
        caps, or the ``N+1`` form with boundary 1s (``tt.ranks``, tensorly's form).
    tol : float, optional
        Relative Frobenius error target in (0, 1): each sweep keeps the smallest rank
        whose discarded mass is at most ``tol^2 ||x||^2 / (N-1)``, so that the relative
        error of the returned cores, as measured, is at most ``tol`` (the ranks are those
        of a TT-SVD by dense SVDs, up to ties within rounding). Combined with ``rank``,
        the cap wins. It must be at least ``10 * eps * sqrt(N)`` (``eps`` of ``x``'s
        dtype, at most float64's), the smallest error the cores can be trusted to reach
        in that dtype; see :func:`mpo_decompose` for how it is met.
    full_spectrum : bool, default False
        Keep every singular value of every unfolding in ``singular_values`` (costs a
        full eigendecomposition of each large Gram matrix), as for
        :func:`mpo_decompose`.

    Returns
    -------
    TensorTrain
        Cores ``(R_{k-1}, d_k, R_k)`` of the same array type, device and dtype as ``x``,
        with the error bound and the relative error (precision as for
        :func:`mpo_decompose`).

    Raises
    ------
    ShapeError, RankError, DTypeError, NonFiniteError
        On a bad argument (each message names it and the value received).
    ToleranceError
        ``tol`` is outside (0, 1), or below ``10 * eps * sqrt(N)`` (the message gives
        that smallest reachable value).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((4, 5, 6))
    >>> tt = tt_decompose(x)
    >>> tt.ranks
    (1, 4, 6, 1)
    >>> bool(np.allclose(tt.to_dense(), x))
    True
    >>> tt_decompose(x, 2).ranks
    (1, 2, 2, 1)
    """
    x = check_float_array(x, "x", finite=False)
    if x.ndim == 0:
        raise ShapeError(f"`x` must have at least one axis; got a 0-d array ({x!r})")
    dims = tuple(int(d) for d in x.shape)
    caps = check_rank(rank, len(dims))
    tol = check_tol(tol)
    full = _check_flag(full_spectrum, "full_spectrum")
    caps = tt_ranks(dims, caps)[1:-1]

    def layout_of(data: Any) -> Layout:
        if len(dims) < 3:
            return Layout(sweep=data)
        rest = dims[2:]
        return Layout(
            sweep=data,
            block=data,
            row_shape=dims[:2],
            row_perm=(0, 1),
            rest_shape=rest,
            rest_perm=tuple(range(len(rest))),
        )

    cores, bound, rel, spectra = _run(
        layout_of, x, "x", dims, caps, tol, full, lambda c: TensorTrain(tuple(c)).to_dense()
    )
    return TensorTrain(tuple(cores), error_bound=bound, relative_error=rel, singular_values=spectra)


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise DTypeError(f"`{name}` must be True or False; got {value!r}")
    return bool(value)


_SHAPE_FORMS = "a number of cores N (int) or a pair (out_modes, in_modes)"


def _resolve_shape(shape: Any, rows: int, cols: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        n = check_positive_int(shape, "shape")
        return factorize(rows, n), factorize(cols, n)
    pair = as_int_list(shape)
    if pair is not None and len(pair) == 2 and all(as_int_list(s) is not None for s in pair):
        out_modes = check_modes(pair[0], "shape[0] (out_modes)")
        in_modes = check_modes(pair[1], "shape[1] (in_modes)")
        if len(out_modes) != len(in_modes):
            raise ShapeError(
                f"`shape` must pair out_modes and in_modes of the same length; got "
                f"{list(out_modes)} and {list(in_modes)}"
            )
        if math.prod(out_modes) != rows or math.prod(in_modes) != cols:
            raise ShapeError(
                f"`shape` modes {list(out_modes)} x {list(in_modes)} multiply to "
                f"{math.prod(out_modes)} x {math.prod(in_modes)}, but `W` has shape "
                f"({rows}, {cols})"
            )
        return out_modes, in_modes
    raise ShapeError(f"`shape` must be {_SHAPE_FORMS}; got {shape!r}")


def _as_matrix(W: Any, shape: Any) -> tuple[Any, Any]:
    """``(matrix, shape)``: an order-2N tensor ``(I_1..I_N, J_1..J_N)`` becomes its matrix."""
    if W.ndim == 2:
        if shape is None:
            raise ShapeError(
                f"`shape` must be {_SHAPE_FORMS} for a matrix `W` of shape {tuple(W.shape)}; "
                f"got None (it may be omitted only for an order-2N tensor `W`)"
            )
        return W, shape
    if W.ndim < 4 or W.ndim % 2:
        raise ShapeError(
            f"`W` must be a 2-D matrix (out_features, in_features) or an order-2N tensor "
            f"(I_1, ..., I_N, J_1, ..., J_N) as tensorly's tensor_train_matrix takes; got a "
            f"{W.ndim}-D array of shape {tuple(W.shape)}"
        )
    n = W.ndim // 2
    out_modes = tuple(int(s) for s in W.shape[:n])
    in_modes = tuple(int(s) for s in W.shape[n:])
    modes_of_w = (out_modes, in_modes)
    if shape is not None:
        given: Any = None
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
            given = shape == n
        else:
            pair = as_int_list(shape)
            if pair is not None and len(pair) == 2:
                a, b = as_int_list(pair[0]), as_int_list(pair[1])
                given = a is not None and b is not None and (tuple(a), tuple(b)) == modes_of_w
        if not given:
            raise ShapeError(
                f"`shape` must be None, {n} or {modes_of_w} for an order-{2 * n} tensor `W` "
                f"of shape {tuple(W.shape)} (out modes, then in modes); got {shape!r}"
            )
    return W.reshape(math.prod(out_modes), math.prod(in_modes)), modes_of_w


def mpo_decompose(
    W: Any,
    shape: int | tuple[Sequence[int], Sequence[int]] | None = None,
    rank: Rank = None,
    *,
    tol: float | None = None,
    full_spectrum: bool = False,
) -> MPO:
    """MPO (tensor-train matrix) decomposition of a weight matrix, Algorithm 1 of DoTA.

    ``W`` is viewed as the order-2N tensor with interleaved modes
    ``(I_1 J_1)(I_2 J_2)...(I_N J_N)`` and decomposed by TT-SVD [2]_.

    Parameters
    ----------
    W : numpy.ndarray or torch.Tensor
        Real floating array, any dtype and device: a matrix of shape
        ``(out_features, in_features)`` (PyTorch's ``nn.Linear.weight`` layout), or the
        order-2N tensor ``(I_1, ..., I_N, J_1, ..., J_N)`` (out modes, then in modes: the
        input of tensorly's ``tensor_train_matrix``), which gives the same MPO as its
        matrix ``W.reshape(prod(I), prod(J))``.
    shape : int or (out_modes, in_modes), optional
        Number of cores ``N`` (modes from :func:`tensornet.factorize`), or explicit row
        modes ``I_1..I_N`` (product ``out_features``) and column modes ``J_1..J_N``
        (product ``in_features``). Required for a matrix; for a tensor it is read off
        ``W.shape`` (if given, it must agree).
    rank : None, int or sequence of int
        A rank specification (:mod:`tensornet.params`): None for the exact ranks of
        eq. (1), a cap ``R`` for every bond, ``N-1`` caps, or the ``N+1`` form with
        boundary 1s (``mpo.ranks``, tensorly's form).
    tol : float, optional
        Relative Frobenius error target in (0, 1), instead of or on top of ``rank``
        (then the cap wins): each sweep keeps the smallest rank whose discarded mass is
        at most ``tol^2 ||W||^2 / (N-1)``, so that ``relative_error``, the measured error
        of the returned cores, is at most ``tol``, with the ranks of a TT-SVD by dense
        SVDs up to ties within rounding. It must be at least ``10 * eps * sqrt(N)``
        (``eps`` of ``W``'s dtype, at most float64's: 4.4e-15 for 4 cores in float64,
        2.4e-6 in float32); a smaller one is refused (see Notes).
    full_spectrum : bool, default False
        Keep every singular value of every unfolding in ``singular_values``, to choose a
        rank from. By default an unfolding with at least 128 rows and columns keeps only
        the leading values (at least the kept ones): its eigensolver is asked for no
        more, which is what keeps a truncated decomposition fast. True costs a full
        eigendecomposition of each such Gram matrix.

    Returns
    -------
    MPO
        Cores ``(R_{k-1}, I_k, J_k, R_k)`` with ``W``'s array type, device and dtype;
        ``relative_error`` (``||W - MPO||_F / ||W||_F`` of the returned cores),
        ``error_bound`` (from the discarded singular values, never below
        ``relative_error``) and ``singular_values`` (one array per sweep).

    Notes
    -----
    Inputs of 32 bits or fewer are computed in float32, others in float64. float32
    resolves a squared relative error only down to about ``1e4`` units in the last
    place, so a ``tol`` below ``1e-2``, or a result whose relative error turns out below
    about 3e-2 (high ranks), is computed in float64 instead: the bound and the error are
    then accurate to float64 rounding. Entries large enough to overflow a Gram matrix are
    rescaled first. TT-SVD leaves the whole norm of ``W`` in the last core; where that
    core would overflow the output dtype (float16), the norm is spread evenly over the
    cores, and where even that overflows, :class:`~tensornet.errors.NonFiniteError` is
    raised: a result never holds NaN or Inf. Each sweep's truncated SVD comes from the
    Gram matrix of the unfolding on its small side, the method in [1]_ (Algorithm 1)
    computed as in [2]_.

    With ``tol``, a rank read off a Gram matrix is used only where it is certain: the
    eigenvalues carry an error of a few ulps of ``||W||^2``, so a sweep whose error budget
    ``tol^2 ||W||^2 / (N-1)``, or whose eigenvalues at the cut, are within that noise (in
    float64, typically a ``tol`` below ~1e-7, or a spectrum that falls to noise level
    right at the cut) takes its spectrum from a thin SVD of the unfolding instead, whose
    small singular values are accurate to ulps of ``||W||`` rather than of its square (a
    float32 computation is redone in float64 first). The common cases (a rank cap, a
    ``tol`` of 1e-6 or more on data without noise-level structure) never need it. Half
    of the smallest accepted ``tol`` is set aside for the rounding of the cores to the
    output dtype: so ``relative_error <= tol`` holds for every ``tol`` accepted, and the
    ranks are those of the dense-SVD TT-SVD at a ``tol`` smaller by at most that half.

    Raises
    ------
    ShapeError
        ``W`` is neither a matrix nor an order-2N tensor, or the modes do not multiply to
        its shape.
    RankError
        ``rank`` is not a rank specification for ``N`` cores.
    ToleranceError
        ``tol`` is outside (0, 1), or below ``10 * eps * sqrt(N)``, which ``W``'s dtype
        cannot deliver (the message gives that smallest reachable value; pass a float64
        copy of ``W`` for a smaller one).
    DTypeError
        ``W`` is not a real floating array with data (a meta tensor has none).
    NonFiniteError
        ``W`` holds NaN or Inf, or its cores cannot be held in its dtype.

    References
    ----------
    .. [1] Hu et al., "DoTA: Weight-Decomposed Tensor Adaptation for Large Language
       Models", section 2.2, Algorithm 1.
    .. [2] I. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.

    Examples
    --------
    >>> import numpy as np
    >>> W = np.random.default_rng(0).standard_normal((64, 32))
    >>> mpo = mpo_decompose(W, ((4, 4, 4), (2, 4, 4)), rank=8)
    >>> mpo.ranks, mpo.num_params
    ((1, 8, 8, 1), 1216)
    >>> bool(mpo.relative_error <= mpo.error_bound)
    True
    >>> again = mpo_decompose(W, ((4, 4, 4), (2, 4, 4)), mpo.ranks)  # ranks round-trip
    >>> again.ranks == mpo.ranks
    True
    >>> exact = mpo_decompose(W, 3)
    >>> bool(np.allclose(exact.to_dense(), W))
    True

    The order-2N tensor (tensorly's input) gives the same MPO:

    >>> T = W.reshape(4, 4, 4, 2, 4, 4)
    >>> bool(np.allclose(mpo_decompose(T, rank=8).to_dense(), mpo.to_dense()))
    True
    """
    W = check_float_array(W, "W", finite=False)
    W, shape = _as_matrix(W, shape)
    rows, cols = (int(s) for s in W.shape)
    out_modes, in_modes = _resolve_shape(shape, rows, cols)
    n = len(out_modes)
    caps = check_rank(rank, n)
    tol = check_tol(tol)
    full = _check_flag(full_spectrum, "full_spectrum")
    dims = tuple(i * j for i, j in zip(out_modes, in_modes))
    caps = tt_ranks(dims, caps)[1:-1]

    def as_mpo(tt_cores: list[Any]) -> list[Any]:
        return [
            c.reshape(c.shape[0], i, j, c.shape[-1])
            for c, i, j in zip(tt_cores, out_modes, in_modes)
        ]

    cores, bound, rel, spectra = _run(
        lambda data: matrix_layout(data, out_modes, in_modes),
        W,
        "W",
        dims,
        caps,
        tol,
        full,
        lambda c: MPO(tuple(as_mpo(c))).to_dense(),
    )
    return MPO(tuple(as_mpo(cores)), error_bound=bound, relative_error=rel, singular_values=spectra)
