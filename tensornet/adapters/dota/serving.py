"""DoTA's forward pass without grad: the update as cached half-chains (serving, evaluation).

Serving an unmerged adapter (generation, evaluation during training) runs a few rows at
a time, where the contraction's many small calls and the per-call planning cost more
than the arithmetic. With grad off and the cores unchanged the update is fixed, so each
term's chain is contracted once into two halves and a call is two batched products and
a signed sum (:class:`_ServingOperands`), in the layer's compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..._chain import mpo_halves
from ...plan import MachineProfile

__all__: list[str] = []


def _serving_split(cores: Sequence[torch.Tensor]) -> int:
    """Where to cut a chain for :class:`_ServingOperands`: the fewest multiply-adds per row.

    Contracting one row through the halves cut before core ``m`` costs
    ``R_m (J * I_right + I * J_left)`` multiply-adds (``x`` against the right half, then
    the left half against that).
    """
    out_modes = [int(c.shape[1]) for c in cores]
    in_modes = [int(c.shape[2]) for c in cores]
    n_out, n_in = math.prod(out_modes), math.prod(in_modes)
    costs = {
        m: int(cores[m].shape[0])
        * (n_in * math.prod(out_modes[m:]) + n_out * math.prod(in_modes[:m]))
        for m in range(1, len(cores))
    }
    return min(costs, key=costs.__getitem__) if costs else 1


class _OptimizerSteps:
    """Counts ``torch.optim`` optimizer steps in this process (a global post-step hook).

    Fused optimizers (``AdamW(fused=True)``, the Trainer's default ``adamw_torch_fused``)
    update parameters without bumping their version counters, so a serving cache checked
    by versions alone would go stale after training. The hook is registered the first
    time a cache entry is built; it only increments this counter.
    """

    count = 0
    _handle: Any = None

    @classmethod
    def now(cls) -> int:
        if cls._handle is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            cls._handle = register_optimizer_step_post_hook(cls._bump)
        return cls.count

    @classmethod
    def _bump(cls, *_: Any) -> None:
        cls.count += 1


class _ServingOperands:
    """The update of a set of adapters as cached half-chains, for forward passes without grad.

    Serving an unmerged adapter (generation, evaluation during training) runs a few rows
    at a time, where the contraction's many small calls and the per-call planning cost
    more than the arithmetic. With grad off and the cores unchanged the update is fixed,
    so each term's chain is contracted once into its two halves (cut by
    :func:`_serving_split`), stacked over the terms: a call is then two batched matrix
    products and a signed sum over the terms, ``sum_t s_t L_t (R_t x)``. The terms stay
    separate (not one summed chain) so that at ``T = T_init`` they cancel exactly and the
    layer gives the base's output bit for bit, as the other paths do.

    An entry is valid while the tensors it was built from are the layer's, unchanged:
    same objects, same storage, same version counter (an in-place update or a load bumps
    it), and no optimizer step anywhere in the process since it was built
    (:class:`_OptimizerSteps`: fused optimizers bump no version counter). The layer also
    drops its entries on ``train()``/``eval()``, on a load, a merge or an adapter change,
    so a Trainer's evaluation between training steps always starts from fresh ones.
    """

    __slots__ = ("sources", "stamps", "steps", "left", "right", "signs", "dims", "dtype", "macs",
                 "use")

    def __init__(self, sources: list[torch.Tensor], terms: list[tuple[float, list[torch.Tensor]]],
                 dtype: torch.dtype) -> None:
        self.sources = sources
        self.stamps = [(t._version, t.data_ptr()) for t in sources]
        self.steps = _OptimizerSteps.now()
        chain = terms[0][1]
        split = _serving_split(chain)
        with torch.no_grad(), torch.autocast(device_type=chain[0].device.type, enabled=False):
            # contracted in the cores' own precision (at least float32), then rounded once
            # to the compute dtype, as the training path's halves are
            wide = torch.promote_types(chain[0].dtype, torch.float32)
            halves = [tuple(h.to(dtype) for h in mpo_halves([c.detach().to(wide) for c in t],
                                                             split))
                      for _, t in terms]
        li, lj, r = halves[0][0].shape
        _, ri, rj = halves[0][1].shape
        self.left = torch.stack([h[0].reshape(li, lj * r) for h in halves])
        self.right = torch.stack([h[1].permute(2, 0, 1).reshape(rj, r * ri) for h in halves])
        self.signs = [s for s, _ in terms]
        self.dims = (li, lj, r, ri, rj)
        self.dtype = dtype
        self.macs = len(terms) * r * (lj * rj * ri + li * ri * lj)  # per row
        self.use: dict[int, bool] = {}  # rows -> whether this path is the cheaper one

    def valid(self, sources: list[torch.Tensor]) -> bool:
        """True while ``sources`` are the tensors this entry was built from, unchanged."""
        return self.steps == _OptimizerSteps.count and len(sources) == len(self.sources) and all(
            a is b and a._version == v and a.data_ptr() == p
            for a, b, (v, p) in zip(sources, self.sources, self.stamps)
        )

    def seconds(self, rows: int, profile: MachineProfile) -> float:
        """Modelled time of a call on ``rows`` rows (``profile``: the device kind's constants)."""
        li, lj, r, ri, rj = self.dims
        # x, the intermediate and y per row, and the halves themselves on every call: on
        # large layers (LLaMA-2-7B's) they are megabytes, read from memory each time
        moved = len(self.signs) * (rows * (lj * rj + 2 * lj * r * ri + li * ri)
                                   + li * lj * r + r * ri * rj)
        size = self.left.element_size()
        regroup = [(2 * len(self.signs) * rows * lj * r * ri * size, ri * size)]
        return (profile.seconds(2 * self.macs * rows, moved * size, 4)
                + profile.copy_seconds(regroup))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_t s_t x MPO(term_t)^T`` for ``x`` of shape ``(..., J)`` (the entry's dtype)."""
        li, lj, r, ri, rj = self.dims
        lead = x.shape[:-1]
        n = x.numel() // (lj * rj)
        terms = len(self.signs)
        with torch.autocast(device_type=x.device.type, enabled=False):
            t = torch.matmul(x.reshape(n * lj, rj), self.right)  # (terms, n lj, r ri)
            # rows next to ri, so that the left half multiplies all rows in one product
            # (a broadcast over rows would copy the left half once per row)
            t = t.view(terms, n, lj * r, ri).transpose(1, 2).reshape(terms, lj * r, n * ri)
            y = torch.bmm(self.left, t).view(terms, li, n, ri)
        out = y[0] if self.signs[0] == 1 else -y[0]
        for k in range(1, terms):
            out = out + y[k] if self.signs[k] == 1 else out - y[k]
        return out.transpose(0, 1).reshape(*lead, li * ri)
