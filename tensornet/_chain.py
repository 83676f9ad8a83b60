"""Bond-by-bond helpers shared by the core's modules and the DoTA layer (private).

A chain of MPO cores ``(R_{k-1}, I_k, J_k, R_k)`` is contracted here into the two
half-chains whose product is the dense matrix (the cheapest way to form it, and what
the DoTA layer's dense path and serving cache keep), and the halves into the matrix.
These are used across module lines (tensorize, plan, formats, decompose, the DoTA
layer), so they live in one private module rather than as private names of a public
one. Every function works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def permute(x: Any, perm: Sequence[int]) -> Any:
    return x.permute(*perm) if hasattr(x, "permute") else np.transpose(x, perm)


def chain(cores: Sequence[Any]) -> Any:
    """Contract consecutive cores into ``(R_first, I.., J.., R_last)`` (rows, then columns)."""
    acc = cores[0]  # (r0, I, J, r1)
    for core in cores[1:]:
        q0, i, j, q1 = core.shape
        a0, ai, aj, _ = acc.shape
        prod = (acc.reshape(-1, q0) @ core.reshape(q0, -1)).reshape(a0, ai, aj, i, j, q1)
        acc = permute(prod, (0, 1, 3, 2, 4, 5)).reshape(a0, ai * i, aj * j, q1)
    return acc


def halves_split(shapes: Sequence[Sequence[int]]) -> int:
    """The core before which ``mpo_halves`` cuts a chain of ``shapes``: smallest halves."""
    sizes = [int(s[1]) * int(s[2]) for s in shapes]
    best, split = None, 1
    for m in range(1, len(shapes)):
        r = int(shapes[m][0])
        cost = math.prod(sizes[:m]) * r + r * math.prod(sizes[m:])
        if best is None or cost < best:
            best, split = cost, m
    return split


def mpo_halves(cores: Sequence[Any], split: int | None = None) -> tuple[Any, Any]:
    """Contract (checked) MPO cores into two small halves whose product is the matrix.

    The cores are split before core ``split``, by default where the two half-chains are
    smallest. Returns ``left`` of
    shape ``(I_left, J_left, R)`` and ``right`` of shape ``(R, I_right, J_right)``, with
    ``W[(i, i'), (j, j')] = sum_r left[i, j, r] right[r, i', j']``; differentiable for
    torch tensors. (DoTA's layer builds its dense weight from these halves as well.)
    """
    n = len(cores)
    if n == 1:
        c = cores[0]
        one = c.reshape(-1)[:1] * 0 + 1  # a 1 of c's array type, dtype and device
        return c.reshape(c.shape[1], c.shape[2], 1), one.reshape(1, 1, 1)
    if split is None:
        split = halves_split([tuple(int(d) for d in c.shape) for c in cores])
    left = chain(cores[:split])
    right = chain(cores[split:])
    left = left.reshape(left.shape[1], left.shape[2], left.shape[3])
    right = right.reshape(right.shape[0], right.shape[1], right.shape[2])
    return left, right


def combine_halves(left: Any, right: Any, base: Any = None) -> Any:
    """The ``(I, J)`` matrix from ``mpo_halves``, plus ``base`` if given.

    One matrix product writes the entries; one pass puts them in ``(I, J)`` order and,
    with ``base``, adds ``base`` in the same pass (no separate sum).
    """
    li, lj, r = left.shape
    _, ri, rj = right.shape
    prod = left.reshape(li * lj, r) @ right.reshape(r, ri * rj)
    ordered = permute(prod.reshape(li, lj, ri, rj), (0, 2, 1, 3))
    if base is None:
        return ordered.reshape(li * ri, lj * rj)
    return (base.reshape(li, ri, lj, rj) + ordered).reshape(li * ri, lj * rj)
