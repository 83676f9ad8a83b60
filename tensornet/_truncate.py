"""Truncated SVDs of the TT-SVD sweep (private): from a Gram matrix, or the unfolding's SVD.

Each bond of a sweep keeps the leading singular vectors of a very wide unfolding. They
come from the Gram matrix on its small side (one BLAS-3 product and a small symmetric
eigensolve: :func:`top_from_gram`); where a tolerance's budget falls within that Gram's
noise, from a thin SVD of the unfolding itself (:func:`_svd_cut`), whose small singular
values are accurate to ulps of the largest one rather than of its square
(:func:`tensornet.tt_decompose`'s module doc says when each is used).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class _Overflow(Exception):
    """A Gram matrix overflowed its dtype on finite input: rescale and retry in float64."""


# The tail mass ``trace(G) - sum(kept eigenvalues)`` of a Gram matrix ``G`` is taken to be
# uncertain by this many ulps of ``trace(G)`` times ``sqrt(G.shape[0])`` (measured: up to
# 8 ulps for a 512 x 512 Gram, 4 for a 16 x 10^6 unfolding, whatever its spectrum).
_GRAM_NOISE_ULPS = 4.0

EPS64 = float(np.finfo(np.float64).eps)


def _choose_rank(lam: np.ndarray, total: float, cap: int, budget: float) -> int:
    """Smallest rank <= cap whose discarded mass ``total - sum(lam[:r])`` is <= budget."""
    if budget <= 0.0:
        return cap
    kept = np.cumsum(lam[:cap])
    for r in range(1, cap + 1):
        if total - kept[r - 1] <= budget:
            return r
    return cap


class _Unresolved(Exception):
    """A Gram matrix cannot tell which rank meets the budget: its noise is at the cut."""


def _certain(lam: np.ndarray, total: float, r: int, budget: float, noise: float) -> bool:
    """Whether rank ``r`` certainly meets ``budget`` and ``r - 1`` certainly does not.

    ``total - sum(lam[:q])`` (the tail mass at rank ``q``) is known to within ``noise``.
    """
    tail = total - float(lam[:r].sum())
    if tail > budget + noise:  # only for r == cap: the cap wins whatever the noise
        return True
    if budget <= noise or tail > budget - noise:
        return False
    return r == 1 or tail + float(lam[r - 1]) > budget + noise


def top_from_gram(
    g: Any, cap: int, budget: float, ops: Any, full: bool
) -> tuple[Any, int, float, np.ndarray]:
    """Leading eigenvectors of a Gram matrix: ``(vectors[:, :r], r, discarded, sigma)``.

    ``sigma`` holds every singular value with ``full``, else at least the leading ``cap``.
    Raises :class:`_Unresolved` where a positive ``budget`` cannot be resolved (see
    :func:`_certain`).
    """
    total = ops.trace(g)
    if not math.isfinite(total):
        raise _Overflow
    m = g.shape[0]
    lam, vec = ops.eigh_top(g, min(cap, m), full)
    lam_np = np.clip(ops.numpy(lam), 0.0, None)
    r = _choose_rank(lam_np, total, min(cap, m), budget)
    if budget > 0.0:
        noise = _GRAM_NOISE_ULPS * ops.eps(g) * total * math.sqrt(m)
        if not _certain(lam_np, total, r, budget, noise):
            raise _Unresolved
    discarded = max(total - float(lam_np[:r].sum()), 0.0)
    return vec[:, :r], r, discarded, np.sqrt(lam_np)


def _svd_cut(a: Any, cap: int, budget: float, ops: Any) -> tuple[Any, Any, float, np.ndarray]:
    """:func:`truncated_svd` from a thin SVD of ``a``: the tail masses summed directly.

    A singular value is accurate to ulps of the largest one, so a tail mass
    ``sum(sigma[r:]^2)`` is accurate far below the ulps of ``||a||^2`` a Gram matrix has.
    """
    u, s, vt = ops.svd_unfolding(a)
    sigma = ops.numpy(s)
    lam = sigma * sigma
    tails = np.append(np.cumsum(lam[::-1])[::-1], 0.0)  # tails[q] = sum(lam[q:])
    c = min(cap, len(lam))
    r = next((q for q in range(1, c + 1) if tails[q] <= budget), c)
    u = u[:, :r]
    return u, u.T @ a, float(tails[r]), sigma


def truncated_svd(
    a: Any, cap: int, budget: float, ops: Any, full: bool
) -> tuple[Any, Any, float, np.ndarray]:
    """Truncated SVD of ``a`` through its small-side Gram matrix.

    Returns ``(u, s_vt, discarded, sigma)``: ``u`` has orthonormal columns (the left
    singular vectors), ``s_vt = u^T a``, ``discarded`` is the sum of the discarded
    squared singular values and ``sigma`` the leading (``full``: all) singular values.
    Where the Gram matrix cannot resolve ``budget``, the SVD of ``a`` itself is used in
    float64; in a narrower dtype :class:`_Unresolved` is raised (redo in float64).
    """
    m, n = a.shape
    try:
        if m <= n:
            u, _, discarded, sigma = top_from_gram(ops.gram(a), cap, budget, ops, full)
            return u, u.T @ a, discarded, sigma
        v, _, discarded, sigma = top_from_gram(ops.gram(a.T), cap, budget, ops, full)
    except _Unresolved:
        if ops.eps(a) > EPS64:
            raise
        return _svd_cut(a, cap, budget, ops)
    # a v = u s w^T exactly: a small thin SVD orthonormalizes the m x r block.
    u, s, wt = ops.svd(a @ v)
    return u, (s[:, None] * wt) @ v.T, discarded, sigma
