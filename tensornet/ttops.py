"""Algebra in the tensor-train format: rounding, canonical forms, sums, inner products.

Every operation here works on the cores of a train and never forms the dense tensor:
for ``N`` cores of bond ``R`` and mode size ``d`` (``d = I_k J_k`` for an MPO, whose
cores are reshaped to ``(R_{k-1}, I_k J_k, R_k)`` first) each costs ``O(N R^3 d)``.
:class:`tensornet.MPO` and :class:`tensornet.TensorTrain` expose them as methods
(``round``, ``canonicalize``, ``inner``, ``norm``, ``+``, ``-``, scalar ``*``), which
are the API (validation included); the functions here are their kernels, on tuples of
3-D cores already checked, and are not exported by :mod:`tensornet`.

Why the algorithms are shaped as they are:

* **Rounding** is Oseledets' TT-rounding (Oseledets 2011, Algorithm 2): a right-to-left
  sweep of QR factorizations makes every core but the first right-orthogonal, so the
  first core carries the whole norm and the singular values of each ``(R_{k-1} d_k) x
  R_k`` core matrix in the following left-to-right sweep are those of the train's
  unfolding at that bond. Truncating them is then TT-SVD on the train, and, the sweep
  being orthogonal, the errors of the bonds are orthogonal too: the change of the train
  is exactly ``sqrt(sum of discarded sigma^2)`` (in exact arithmetic), not just bounded
  by it. ``tol`` gives each of the ``N-1`` bonds the budget ``tol^2 ||A||^2 / (N-1)``,
  as TT-SVD does.
* The factorizations run in float64 whatever the cores' dtype: the cores are small
  (``O(N R^2 d)`` entries), so the rounding left in a result is that of the float64
  sweep and of the cast back to the cores' dtype. :func:`rounding_allowance` sets aside
  ``(4 eps + 32 eps_64) sqrt(N)`` for both (``eps`` of the cores' dtype; measured on
  random trains: at most ``1.5 eps sqrt(N)`` for the cast, ``12 eps_64 sqrt(N)`` for the
  sweep): it is added to every error bound and taken off ``tol``.
* **Inner products** contract the two trains core by core, carrying an ``R_a x R_b``
  matrix along the chain (``O(N R^3 d)``); a **norm** is ``sqrt(<a, a>)``. (Reading it
  off the first core of a right-orthogonal form instead costs more QRs and, measured on
  differences ``(a + e b) - a``, is no more accurate.)
* **Sums** concatenate the bonds (block-diagonal middle cores); ``round`` brings the
  ranks back down.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> cores = (rng.standard_normal((1, 3, 2)), rng.standard_normal((2, 4, 1)))
>>> out, rel, bound, spectra = round_cores(add_cores(cores, cores), (2,), None)
>>> [c.shape for c in out], rel < 1e-12, bool(np.isclose(norm_cores(out) ** 2,
...                                                       inner_cores(out, out)))
([(1, 3, 2), (2, 4, 1)], True, True)

References
----------
I. V. Oseledets, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._backend import is_torch, ops_for
from .errors import DTypeError, NonFiniteError, ToleranceError

__all__ = [
    "round_cores",
    "canonical_cores",
    "add_cores",
    "scale_cores",
    "inner_cores",
    "norm_cores",
    "check_scalar",
    "rounding_allowance",
]

# Ulps, times sqrt(N), allowed for the cast of the float64 cores back to the cores' dtype
# and for the float64 sweep itself (see the module docstring and rounding_allowance).
_CAST_ULPS = 4.0
_SWEEP_ULPS = 32.0
EPS64 = float(np.finfo(np.float64).eps)


class _NumpyLinalg:
    """The two kernels this module needs that :mod:`tensornet._backend` lacks (numpy)."""

    @staticmethod
    def qr(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.linalg.qr(a)

    @staticmethod
    def zeros(shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
        return np.zeros(shape, dtype=like.dtype)


class _TorchLinalg:
    """As :class:`_NumpyLinalg`, on the tensor's device."""

    @staticmethod
    def qr(a: Any) -> tuple[Any, Any]:
        import torch

        return torch.linalg.qr(a)

    @staticmethod
    def zeros(shape: tuple[int, ...], like: Any) -> Any:
        return like.new_zeros(shape)


def _linalg(x: Any) -> type[_NumpyLinalg] | type[_TorchLinalg]:
    return _TorchLinalg if is_torch(x) else _NumpyLinalg


def _eps(like: Any) -> float:
    """Machine epsilon of ``like``'s dtype (at most float64's)."""
    return ops_for(like).eps(like)


def _to64(cores: tuple[Any, ...]) -> list[Any]:
    ops = ops_for(cores[0])
    for k, core in enumerate(cores):
        if not ops.all_finite(core):
            raise NonFiniteError(
                f"`cores[{k}]` must hold only finite values; got NaN or Inf entries"
            )
    return [ops.to64(c) for c in cores]


def _balanced(cores: list[Any]) -> list[Any]:
    """The same chain with every core of the same Frobenius norm (their product kept)."""
    ops = ops_for(cores[0])
    norms = [math.sqrt(ops.sumsq(c)) for c in cores]
    if not all(n > 0.0 for n in norms):
        return cores
    mean = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [c * (mean / n) for c, n in zip(cores, norms)]


def _cast(cores: list[Any], like: Any, *, balance: bool) -> tuple[Any, ...]:
    """The float64 cores in ``like``'s dtype; raise rather than return Inf.

    The sweeps leave the whole norm in one core; where that core overflows a narrow dtype
    (float16), ``balance`` spreads the norm evenly over the cores first (a rounded train
    promises no orthogonality; a canonical form does, so it is not balanced).
    """
    ops = ops_for(like)
    with np.errstate(over="ignore"):  # an overflow is handled below
        out = tuple(ops.cast(c, like) for c in cores)
        if balance and not all(ops.all_finite(c) for c in out):
            out = tuple(ops.cast(c, like) for c in _balanced(cores))
    if not all(ops.all_finite(c) for c in out):
        raise NonFiniteError(
            f"the cores overflow their dtype {like.dtype}"
            + (" even with the norm spread evenly over them" if balance else " (the center "
               "core holds the whole norm)")
            + "; cast them to float32 first, or scale the train down (`c * train`)"
        )
    return out


def _orthogonalize_right(cores: list[Any], stop: int = 0) -> None:
    """Make cores ``stop+1..N-1`` right-orthogonal in place (of the list), by QR."""
    la = _linalg(cores[0])
    for k in range(len(cores) - 1, stop, -1):
        r0, d, r1 = cores[k].shape
        q, r = la.qr(cores[k].reshape(r0, d * r1).T)
        cores[k] = q.T.reshape(-1, d, r1)
        p0, pd, _ = cores[k - 1].shape
        cores[k - 1] = (cores[k - 1].reshape(p0 * pd, r0) @ r.T).reshape(p0, pd, -1)


def _orthogonalize_left(cores: list[Any], stop: int) -> None:
    """Make cores ``0..stop-1`` left-orthogonal in place (of the list), by QR."""
    la = _linalg(cores[0])
    for k in range(stop):
        r0, d, r1 = cores[k].shape
        q, r = la.qr(cores[k].reshape(r0 * d, r1))
        cores[k] = q.reshape(r0, d, -1)
        _, nd, n1 = cores[k + 1].shape
        cores[k + 1] = (r @ cores[k + 1].reshape(r1, nd * n1)).reshape(-1, nd, n1)


def rounding_allowance(like: Any, num_cores: int) -> float:
    """Relative change set aside for the float64 sweep and the cast to ``like``'s dtype."""
    return (_CAST_ULPS * _eps(like) + _SWEEP_ULPS * EPS64) * math.sqrt(num_cores)


def _keep(s: np.ndarray, cap: int | None, budget: float | None) -> int:
    """Smallest rank whose discarded mass ``sum(s[r:]^2)`` is <= budget, then capped."""
    r = len(s)
    if budget is not None:
        tails = np.concatenate([np.cumsum((s * s)[::-1])[::-1], [0.0]])
        r = max(int(np.argmax(tails <= budget)), 1)
    return r if cap is None else max(min(r, cap), 1)


def round_cores(
    cores: tuple[Any, ...], caps: tuple[int, ...] | None, tol: float | None
) -> tuple[tuple[Any, ...], float, float, tuple[np.ndarray, ...]]:
    """TT-rounding of 3-D cores to ``caps`` (``N-1`` ints, or None) and ``tol``.

    Returns the new cores (the input's array type, dtype and device), the relative change
    ``||A - round(A)|| / ||A||``, its bound (the change plus the rounding allowance) and
    the singular values of each bond's core matrix in the sweep (float64, descending).
    """
    like, n = cores[0], len(cores)
    ops = ops_for(like)
    allowance = rounding_allowance(like, n)
    if tol is not None and tol < 2 * allowance:
        raise ToleranceError(
            f"`tol` must be at least {2 * allowance:.2g} for {n} "
            f"{'core' if n == 1 else 'cores'} in {like.dtype} (twice the rounding allowance "
            f"(4 eps + 32 eps_float64) sqrt(N), the smallest change the cores can be trusted "
            f"to in that dtype); got {tol!r}; pass a larger `tol`"
            + ("" if _eps(like) <= EPS64 else ", or round a copy with float64 cores")
        )
    work = _to64(cores)
    _orthogonalize_right(work)
    norm2 = ops.sumsq(work[0])
    if not math.isfinite(norm2):
        raise NonFiniteError(
            "the train's norm overflows float64; scale it down (`c * train`) before rounding"
        )
    if norm2 == 0.0:
        zeros = [_linalg(like).zeros((1, int(c.shape[1]), 1), like) for c in cores]
        return tuple(zeros), 0.0, 0.0, tuple(np.zeros(0) for _ in range(n - 1))
    budget = None if tol is None else (tol - allowance) ** 2 * norm2 / max(n - 1, 1)
    discarded, spectra = 0.0, []
    for k in range(n - 1):
        r0, d, r1 = work[k].shape
        u, s, vt = ops.svd(work[k].reshape(r0 * d, r1))
        s64 = ops.numpy(s)
        r = _keep(s64, None if caps is None else caps[k], budget)
        discarded += float(np.sum(s64[r:] ** 2))
        spectra.append(s64)
        work[k] = u[:, :r].reshape(r0, d, r)
        _, nd, n1 = work[k + 1].shape
        carry = s[:r, None] * vt[:r]
        work[k + 1] = (carry @ work[k + 1].reshape(r1, nd * n1)).reshape(r, nd, n1)
    rel = math.sqrt(discarded / norm2)
    return _cast(work, like, balance=True), rel, rel + allowance, tuple(spectra)


def canonical_cores(cores: tuple[Any, ...], center: int) -> tuple[Any, ...]:
    """Cores before ``center`` left-orthogonal, after it right-orthogonal (same train)."""
    work = _to64(cores)
    _orthogonalize_left(work, center)
    _orthogonalize_right(work, center)
    return _cast(work, cores[0], balance=False)


def norm_cores(cores: tuple[Any, ...]) -> float:
    """Frobenius norm of the train, ``sqrt(<a, a>)`` (clipped at 0 against rounding)."""
    return math.sqrt(max(inner_cores(cores, cores), 0.0))


def inner_cores(a: tuple[Any, ...], b: tuple[Any, ...]) -> float:
    """Frobenius inner product of two trains of equal mode sizes, core by core."""
    a64 = _to64(a)
    b64 = a64 if b is a else _to64(b)
    env = a64[0].reshape(a64[0].shape[1], -1).T @ b64[0].reshape(b64[0].shape[1], -1)
    for ca, cb in zip(a64[1:], b64[1:]):
        ra, d, ra1 = ca.shape
        rb, _, rb1 = cb.shape
        t = (env.T @ ca.reshape(ra, d * ra1)).reshape(rb * d, ra1)
        env = t.T @ cb.reshape(rb * d, rb1)
    return float(env.reshape(-1)[0])


def add_cores(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    """Cores of ``a + b``: bonds concatenated, middle cores block-diagonal."""
    if len(a) == 1:
        return (a[0] + b[0],)
    la, n = _linalg(a[0]), len(a)
    out = []
    for k, (ca, cb) in enumerate(zip(a, b)):
        ra, d, ra1 = ca.shape
        rb, _, rb1 = cb.shape
        r0 = 1 if k == 0 else ra + rb
        r1 = 1 if k == n - 1 else ra1 + rb1
        core = la.zeros((r0, d, r1), ca)
        core[:ra, :, :ra1] = ca
        core[r0 - rb:, :, r1 - rb1:] = cb
        out.append(core)
    return tuple(out)


def check_scalar(c: Any, op: str, kind: str) -> float:
    """``c`` as a float if it is a finite real number (not a bool), else raise."""
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise DTypeError(
            f"`{op}` of {kind} takes a real scalar (a Python or numpy int or float); got "
            f"{type(c).__name__}"
        )
    if not math.isfinite(float(c)):
        raise NonFiniteError(f"the scalar of `{op}` must be finite; got {c!r}")
    return float(c)


def scale_cores(cores: tuple[Any, ...], c: float) -> tuple[Any, ...]:
    """Cores of ``c * train``: the first core scaled, the others shared."""
    with np.errstate(over="ignore"):  # an overflow is reported below
        first = cores[0] * c
    if not ops_for(first).all_finite(first):
        raise NonFiniteError(
            f"`{c!r} * train` overflows {first.dtype}; scale by a smaller number or cast "
            f"the cores to a wider dtype"
        )
    return (first, *cores[1:])
