"""DoTA's cores: the DoTA-Random baseline's draw, and one chain for a sum of chains."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...formats import MPO

__all__ = ["chain_sum", "random_cores"]


def random_cores(
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    zero_last: bool = True,
) -> list[torch.Tensor]:
    """Cores of the DoTA-Random baseline: Gaussian, the last one zero (float32, CPU).

    Core ``k`` is drawn with variance ``1 / R_{k-1}`` (the first with ``1 / in_features``),
    so that the product of the first ``N-1`` cores maps an input of unit scale to unit
    scale, as peft's LoRA ``A`` does; the zero last core makes ``MPO(T) = 0`` at start.

    Examples
    --------
    >>> cores = random_cores((2, 2), (3, 2), (1, 4, 1))
    >>> [tuple(c.shape) for c in cores], bool((cores[-1] == 0).all())
    ([(1, 2, 3, 4), (4, 2, 2, 1)], True)
    """
    n = len(out_modes)
    in_features = math.prod(in_modes)
    cores = []
    for k in range(n):
        shape = (ranks[k], out_modes[k], in_modes[k], ranks[k + 1])
        if k == n - 1 and zero_last:
            cores.append(torch.zeros(shape))
        else:
            std = (1.0 / in_features if k == 0 else 1.0 / ranks[k]) ** 0.5
            cores.append(torch.randn(shape, generator=generator) * std)
    return cores


def chain_sum(chains: Sequence[tuple[float, Sequence[torch.Tensor]]]) -> list[torch.Tensor]:
    """Cores of one MPO equal to ``sum_i sign_i * MPO(chain_i)`` (bonds add up).

    The core's arithmetic in the format (:class:`tensornet.MPO`'s ``+`` and scalar ``*``),
    which keeps the autograd graph: gradients flow back to every chain's cores.

    Examples
    --------
    >>> a = random_cores((2, 3), (2, 2), (1, 3, 1), zero_last=False)
    >>> b = random_cores((2, 3), (2, 2), (1, 2, 1), zero_last=False)
    >>> s = chain_sum([(1.0, a), (-1.0, b)])
    >>> [tuple(c.shape) for c in s]
    [(1, 2, 2, 5), (5, 3, 2, 1)]
    >>> from tensornet import cores_to_matrix
    >>> bool(torch.allclose(cores_to_matrix(s), cores_to_matrix(a) - cores_to_matrix(b)))
    True
    """
    if len(chains) == 1 and chains[0][0] == 1:
        return list(chains[0][1])
    total = None
    for sign, cores in chains:
        term = MPO(tuple(cores))
        term = term if sign == 1 else sign * term
        total = term if total is None else total + term
    return list(total.cores)  # type: ignore[union-attr]
