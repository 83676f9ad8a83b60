"""The TT-SVD sweep: the layouts of the entries and the left-to-right sweep.

What :func:`tensornet.mpo_decompose` and :func:`tensornet.tt_decompose` run once their
arguments are checked (:mod:`tensornet.decompose`): a left-to-right sweep of truncated
SVDs, each from the Gram matrix of the unfolding on its small side, whose first two
sweeps are fused into one Gram matrix of the ``(d_1 d_2, rest)`` unfolding when that is
small. For a matrix the entries are laid out once as views of the caller's array
(:func:`matrix_layout`); nothing W-sized is copied except the fused head's block, and on
the CPU path only a piece of it at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._chain import permute
from ._device import device_kind
from ._truncate import _Overflow, top_from_gram, truncated_svd
from .tensorize import matrix_to_tensor

# The first two sweeps are fused into one Gram matrix of the (d_1 d_2, rest) unfolding
# when it has at most this many rows (and the first bond is not truncated).
_FUSED_MAX_ROWS = 1024

# On the CPU path the fused head's block (for a matrix, a permuted view of it) is copied
# and multiplied a piece of at most about this many bytes at a time, into one buffer,
# rather than copied whole: a W-sized copy lands in memory fresh from the system, and
# faulting its pages in cost more than the copy itself (4096 x 4096, float32: ~17 ms for
# the 64 MiB copy against ~5 ms into a buffer already touched). The accelerator path
# copies whole (one copy, one product).
_PIECE_BYTES = 8 << 20

@dataclass(frozen=True)
class Layout:
    """How the entries to decompose are laid out (views of the caller's array, no copy).

    ``sweep`` holds them in sweep order (``d_1, ..., d_N``, any strides). ``block``, if
    set, holds the same entries as ``(*row_shape, *rest_shape)``, a layout that is cheap
    to copy contiguously (for a matrix: whole runs of columns); ``row_perm`` and
    ``rest_perm`` reorder its row axes into ``(d_1, d_2)`` and its remaining axes into
    ``(d_3, ..., d_N)``.
    """

    sweep: Any
    block: Any = None
    row_shape: tuple[int, ...] = ()
    row_perm: tuple[int, ...] = ()
    rest_shape: tuple[int, ...] = ()
    rest_perm: tuple[int, ...] = ()


def _fused_head(
    layout: Layout,
    dims: tuple[int, ...],
    caps: tuple[int, ...],
    cdtype: Any,
    ops: Any,
    full: bool,
) -> tuple[list[Any], list[np.ndarray], float, float, Any]:
    """Sweeps 1 and 2 from one Gram ``G2`` of the ``(d_1 d_2, rest)`` unfolding.

    Sweep 1's Gram is the partial trace of ``G2`` over ``d_2``; sweep 2's is
    ``(U_1 x I)^T G2 (U_1 x I)``. Returns both cores, their spectra, ``||X||^2``, the
    discarded mass and the remainder ``(R_2, d_3 ... d_N)`` in sweep order.
    """
    d1, d2 = dims[0], dims[1]
    rows2 = d1 * d2
    pieces = _pieces(layout, cdtype, ops)
    if pieces is None:
        x2 = ops.contiguous(layout.block, cdtype).reshape(rows2, -1)
        g = ops.gram(x2)
    else:
        g = sum(ops.gram(piece) for piece in pieces())
    norm2 = ops.trace(g)
    _check_norm(norm2, layout.block, ops)
    nr = len(layout.row_shape)
    to_sweep = layout.row_perm + tuple(nr + p for p in layout.row_perm)
    g2 = permute(g.reshape(*layout.row_shape, *layout.row_shape), to_sweep).reshape(rows2, rows2)
    g1 = g2.reshape(d1, d2, d1, d2).diagonal(0, 1, 3).sum(-1)
    u1, r1, lost1, sigma1 = top_from_gram(g1, caps[0], 0.0, ops, full)
    lift = ops.kron_eye(u1, d2)
    u2, r2, lost2, sigma2 = top_from_gram(lift.T @ g2 @ lift, caps[1], 0.0, ops, full)
    # the projector (lift @ u2) back in the block's row order
    back = tuple(int(i) for i in np.argsort(layout.row_perm)) + (nr,)
    sweep_rows = tuple(layout.row_shape[p] for p in layout.row_perm)
    proj = permute((lift @ u2).reshape(*sweep_rows, r2), back).reshape(rows2, r2)
    if pieces is None:
        rest = proj.T @ x2
    else:  # the block's columns again, a piece at a time, in order
        rest = ops.empty(proj, (r2, math.prod(layout.rest_shape)), cdtype)
        start = 0
        for piece in pieces():
            stop = start + piece.shape[1]
            rest[:, start:stop] = proj.T @ piece
            start = stop
    rest = rest.reshape(r2, *layout.rest_shape)
    rest = permute(rest, (0, *(1 + p for p in layout.rest_perm))).reshape(r2, -1)
    cores = [u1.reshape(1, d1, r1), u2.reshape(r1, d2, r2)]
    return cores, [sigma1, sigma2], norm2, lost1 + lost2, rest


def _pieces(layout: Layout, cdtype: Any, ops: Any) -> Callable[[], Iterator[Any]] | None:
    """The fused head's block as ``(rows, columns)`` pieces, in column order, or None.

    None where the block is read whole: on the accelerator path, where it is already
    contiguous in ``cdtype`` (read in place) or where one piece holds it. Otherwise a
    function whose every call walks the pieces, each a copy into the same buffer (a
    piece is overwritten by the next): whole slices of the leading rest axes.
    """
    block, nr, rest = layout.block, len(layout.row_shape), layout.rest_shape
    if device_kind(block) != "cpu" or ops.is_contiguous(block, cdtype):
        return None
    itemsize = 8 if "64" in str(cdtype) else 4  # the compute dtype: float32 or float64
    size = math.prod(layout.row_shape) * math.prod(rest) * itemsize
    j = 0  # the first rest axis of which one slice fits, and as many slices as fit
    while j < len(rest) - 1 and size // rest[j] > _PIECE_BYTES:
        size //= rest[j]
        j += 1
    one = size // rest[j]
    width = max(w for w in range(1, rest[j] + 1)
                if rest[j] % w == 0 and (w == 1 or w * one <= _PIECE_BYTES))
    if j == 0 and width == rest[0]:
        return None
    buf = ops.empty(block, (*block.shape[:nr], width, *rest[j + 1:]), cdtype)
    flat = buf.reshape(math.prod(layout.row_shape), -1)

    def walk() -> Iterator[Any]:
        for lead in itertools.product(*(range(n) for n in rest[:j])):
            for s0 in range(0, rest[j], width):
                buf[...] = block[(slice(None),) * nr + lead + (slice(s0, s0 + width),)]
                yield flat

    return walk


def tt_sweep(
    layout: Layout,
    dims: tuple[int, ...],
    caps: tuple[int, ...],
    tol: float | None,
    cdtype: Any,
    ops: Any,
    full: bool,
) -> tuple[list[Any], float, float, float, tuple[np.ndarray, ...]]:
    """Left-to-right TT-SVD.

    Returns cores ``(R_{k-1}, d_k, R_k)`` in ``cdtype``, ``||X||^2``, the discarded
    mass, ``||X_tt||^2`` and the spectra of every sweep.
    """
    n = len(dims)
    rows2 = dims[0] * dims[1] if n >= 3 else 0
    fused = (
        layout.block is not None
        and n >= 3
        and tol is None
        and caps[0] >= dims[0]
        and rows2 <= _FUSED_MAX_ROWS
        and math.prod(dims) // rows2 >= rows2
    )
    if fused:
        cores, spectra, norm2, discarded, rest = _fused_head(layout, dims, caps, cdtype, ops, full)
        r_prev, start = cores[-1].shape[-1], 2
    else:
        x = ops.contiguous(layout.sweep, cdtype)
        norm2 = ops.sumsq(x)
        _check_norm(norm2, x, ops)
        cores, spectra, discarded = [], [], 0.0
        rest, r_prev, start = x.reshape(dims[0], -1), 1, 0
    budget = 0.0 if tol is None else tol * tol * norm2 / max(n - 1, 1)
    for k in range(start, n - 1):
        a = rest.reshape(r_prev * dims[k], -1)
        u, rest, lost, sigma = truncated_svd(a, caps[k], budget, ops, full)
        r = u.shape[1]
        cores.append(u.reshape(r_prev, dims[k], r))
        spectra.append(sigma)
        discarded += lost
        r_prev = r
    cores.append(rest.reshape(r_prev, dims[-1], 1))
    return cores, norm2, discarded, ops.sumsq(rest), tuple(spectra)


def _check_norm(norm2: float, x: Any, ops: Any) -> None:
    if not math.isfinite(norm2):
        if not ops.all_finite(x):
            raise _NonFinite
        raise _Overflow


class _NonFinite(Exception):
    """The input holds NaN or Inf (turned into a NonFiniteError naming the argument)."""


def matrix_layout(W: Any, out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> Layout:
    """Views of ``W`` for the sweep: interleaved modes, and blocks for the fused head."""
    n = len(out_modes)
    sweep = matrix_to_tensor(W, out_modes, in_modes)
    if n < 3:
        return Layout(sweep=sweep)
    # (i1, i2, j1, j2, i3..iN, j3..jN): copying this keeps runs of j3..jN contiguous
    t = W.reshape(*out_modes, *in_modes)
    perm = (0, 1, n, n + 1, *range(2, n), *range(n + 2, 2 * n))
    m = n - 2
    return Layout(
        sweep=sweep,
        block=permute(t, perm),
        row_shape=(out_modes[0], out_modes[1], in_modes[0], in_modes[1]),
        row_perm=(0, 2, 1, 3),
        rest_shape=(*out_modes[2:], *in_modes[2:]),
        rest_perm=tuple(p for k in range(m) for p in (k, m + k)),
    )
