"""DoTA's forward pass without grad: the update as cached half-chains (serving, evaluation).

Serving an unmerged adapter (generation, evaluation during training) runs a few rows at
a time, where the contraction's many small calls and the per-call planning cost more
than the arithmetic. With grad off the update is a fixed function of the cores, so each
term's chain is contracted into two halves and a call is two batched products and a
signed sum (:class:`_ServingOperands`), in the layer's compute dtype.

Why reused operands cannot be stale
-----------------------------------
Operands prepared from tensors (these halves, and ``T_init``'s halves that every forward
pass uses, :class:`~.route._Route`) are only as good as the check that the tensors still
hold the values they were built from. Tensor identity, storage and version counter
(``tensornet._compat.torch.version_of``) do not make that check: a write through
``p.data`` (hand-written update loops, EMA, model soups, reference-model syncs) bumps no
version counter, and fused optimizers bump none either. What a reuse is keyed on here is
the values themselves, and how they are compared is the device seam's choice
(:func:`reuses_operands`, once per call from the device kind, as
:func:`~.kernels.kernels_for` chooses the kernels):

* CPU: the operands are kept with a bitwise copy of the tensors they were built from
  (:class:`_Snapshot`), compared on each call, and rebuilt when any bit differs. Equal
  bits give equal operands (the build is a deterministic function of them), so a reuse
  is never stale, whatever wrote the tensors and however. Reading a CPU tensor's values
  from Python synchronizes with nothing; the comparison reads the cores and ``T_init``
  once (measured 7-41 us per layer for SmolLM2- to LLaMA-2-7B-sized layers, N = 5,
  R = 16, against a build of about a millisecond and a forward pass of 0.5-50 ms).
* Accelerators, without grad (serving, evaluation, a reference model's logits): a
  comparison's answer would have to reach the host before the next kernel could be
  chosen, a synchronization per layer per call, which would serialize the stream.
  Nothing is reused across calls there: the operands are built on each call from the
  tensors as they are (a fixed handful of small kernels, no host read), and the cost
  model counts that build when it decides whether serving from halves is cheaper.
* Accelerators, with grad (training steps): the trainable cores' halves are contracted
  on each call anyway (autograd needs them); only the frozen ``T_init``'s halves are
  kept, checked by identity, storage and version counter (:class:`_Stamps`). Rebuilding
  them on each step would add 14 of the 47 kernel launches of a DoTA layer's training
  step on that path (16 of 59 under bf16 autocast; counted by
  ``tests/test_device_paths.py``), for a write no training loop makes: update loops,
  EMA and reference-model syncs go over ``parameters()``, and ``load_state_dict``,
  ``copy_`` and moves are seen. A write into the ``T_init`` buffers through ``.data``
  between training steps on an accelerator is the one write this does not see.

The snapshot costs memory equal to the adapter's cores and ``T_init`` (small beside the
halves themselves), on the CPU only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from ..._chain import mpo_halves
from ..._compat.torch import version_of
from ...plan import MachineProfile

__all__: list[str] = []


Reuse = Literal["content", "rebuild", "version"]


def reuse_policy(kind: str, *, grad: bool = False) -> Reuse:
    """How operands built from tensors are kept across calls (see the module docstring).

    ``"content"`` (the CPU): kept behind a bitwise content check (:class:`_Snapshot`);
    ``"rebuild"`` (an accelerator, no grad): built on each call; ``"version"`` (an
    accelerator with grad; ``T_init``'s halves only): kept behind :class:`_Stamps`.
    """
    if kind == "cpu":
        return "content"
    return "version" if grad else "rebuild"


def validator(policy: Reuse, tensors: Sequence[torch.Tensor]) -> _Snapshot | _Stamps | None:
    """What checks operands built from ``tensors`` under ``policy`` (None: never reused)."""
    if policy == "content":
        return _Snapshot(tensors)
    if policy == "version":
        return _Stamps(tensors)
    return None


#: integer dtypes of each item size: a bitwise view of a floating tensor
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as an integer tensor (NaN equals NaN, ``-0.0`` differs from ``0.0``)."""
    t = t.detach()
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


class _Snapshot:
    """The exact content of a list of CPU tensors at one moment, to tell whether it changed.

    :meth:`same` is true only if the tensors given now have the shapes, dtypes and
    devices the snapshot was taken of and the same bits, whichever objects they are
    and however they were written in between. The bits are read through numpy views of
    the tensors' own memory, kept while a tensor is the same object on the same storage
    (the view holds that storage, so its address cannot be reused meanwhile), and
    compared as bytes (a copy and a ``memcmp``: 7-41 us for the ten tensors of a DoTA
    layer of SmolLM2 to LLaMA-2-7B size, where ``torch.equal`` took 50-150 us).
    """

    __slots__ = ("bits", "views")

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.views = [(t, t.data_ptr(), t.shape, _host_bits(t)) for t in tensors]
        self.bits = [v[3].tobytes() for v in self.views]

    def same(self, tensors: Sequence[torch.Tensor]) -> bool:
        """True while ``tensors`` hold exactly the values the snapshot was taken of."""
        if len(tensors) != len(self.bits):
            return False
        for k, (t, bits) in enumerate(zip(tensors, self.bits)):
            held, ptr, shape, view = self.views[k]
            if t is not held or t.data_ptr() != ptr or t.shape != shape:
                if t.shape != shape or t.dtype != held.dtype or t.device.type != "cpu":
                    return False
                view = _host_bits(t)
                self.views[k] = (t, t.data_ptr(), t.shape, view)
            if view.tobytes() != bits:  # a copy and a memcmp: faster than an elementwise ==
                return False
        return True


def _host_bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's bits (its memory, not a copy)."""
    return _bits(t).numpy()


class _Stamps:
    """Identity, storage and version counter of tensors: blind to writes through ``.data``.

    Used only where a content check would cost a device synchronization per call and
    the tensors are frozen buffers (``T_init`` in training steps on an accelerator).
    """

    __slots__ = ("stamps",)

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.stamps = [(t, version_of(t), t.data_ptr()) for t in tensors]

    def same(self, tensors: Sequence[torch.Tensor]) -> bool:
        """True while ``tensors`` are the same objects, storage and version counters."""
        return len(tensors) == len(self.stamps) and all(
            t is a and version_of(t) == v and t.data_ptr() == p
            for t, (a, v, p) in zip(tensors, self.stamps))


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


def _halves_macs(cores: Sequence[torch.Tensor], split: int) -> int:
    """Multiply-adds of contracting a chain into its two halves cut before ``split``."""
    sizes = [int(c.shape[1]) * int(c.shape[2]) for c in cores]
    ranks = [int(c.shape[0]) for c in cores] + [int(cores[-1].shape[-1])]
    macs = sum(math.prod(sizes[:k]) * ranks[0] * ranks[k] * sizes[k] * ranks[k + 1]
               for k in range(1, split))
    n = len(cores)
    macs += sum(math.prod(sizes[k + 1:]) * ranks[k] * sizes[k] * ranks[k + 1] * ranks[n]
                for k in range(split, n - 1))
    return macs


def _halves_of(terms: list[tuple[float, list[torch.Tensor]]], split: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms' halves, stacked over the terms: ``(terms, I_l, J_l R)``, ``(terms, J_r, R I_r)``.

    Contracted in the cores' own precision (at least float32), then rounded once to the
    compute dtype ``dtype``, as the training path's halves are.
    """
    chain = terms[0][1]
    with torch.no_grad(), torch.autocast(device_type=chain[0].device.type, enabled=False):
        wide = torch.promote_types(chain[0].dtype, torch.float32)
        halves = [tuple(h.to(dtype) for h in mpo_halves([c.detach().to(wide) for c in t],
                                                         split))
                  for _, t in terms]
        li, lj, r = halves[0][0].shape
        _, ri, rj = halves[0][1].shape
        left = torch.stack([h[0].reshape(li, lj * r) for h in halves])
        right = torch.stack([h[1].permute(2, 0, 1).reshape(rj, r * ri) for h in halves])
    return left, right


class _ServingOperands:
    """The update of a set of adapters as half-chains, for forward passes without grad.

    Serving an unmerged adapter (generation, evaluation during training) runs a few rows
    at a time, where the contraction's many small calls and the per-call planning cost
    more than the arithmetic. With grad off the update is a fixed function of the cores,
    so each term's chain is contracted into its two halves (cut by
    :func:`_serving_split`), stacked over the terms: a call is then two batched matrix
    products and a signed sum over the terms, ``sum_t s_t L_t (R_t x)``. The terms stay
    separate (not one summed chain) so that at ``T = T_init`` they cancel exactly and the
    layer gives the base's output bit for bit, as the other paths do.

    The entry holds what depends only on the shapes (split, dimensions, the per-row-count
    decision of :meth:`seconds` against the general path); the halves are brought up to
    date by :meth:`refresh` before each call: kept while a content check passes on the
    CPU, rebuilt on every call on an accelerator (module docstring). The layer also drops
    its entries when its state changes (``train()``/``eval()``, a load, a merge, an
    adapter change, a move).
    """

    __slots__ = ("split", "left", "right", "signs", "dims", "dtype", "macs", "build_macs",
                 "build_ops", "reuse", "snapshot", "use", "origin")

    def __init__(self, sources: list[torch.Tensor], terms: list[tuple[float, list[torch.Tensor]]],
                 dtype: torch.dtype, *, reuse: Reuse, origin: object = None) -> None:
        chain = terms[0][1]
        #: what the entry was shaped from (the layer's route): a new one needs a new entry
        self.origin = origin
        self.split = _serving_split(chain)
        self.signs = [s for s, _ in terms]
        self.dtype = dtype
        self.reuse = reuse
        self.left, self.right = _halves_of(terms, self.split, dtype)
        self.snapshot = validator(reuse, sources)
        _, li, ljr = self.left.shape
        _, rj, rri = self.right.shape
        r = int(chain[self.split].shape[0])
        lj, ri = ljr // r, rri // r
        self.dims = (li, lj, r, ri, rj)
        self.macs = len(terms) * r * (lj * rj * ri + li * ri * lj)  # per row
        # a rebuild: per chain step a product and a reordering copy, then casts and stacks
        self.build_macs = len(terms) * _halves_macs(chain, self.split)
        self.build_ops = len(terms) * 2 * max(len(chain) - 2, 0) + 4
        self.use: dict[int, bool] = {}  # rows -> whether this path is the cheaper one

    def refresh(self, sources: list[torch.Tensor],
                terms: Callable[[], list[tuple[float, list[torch.Tensor]]]]) -> None:
        """Make the halves those of ``terms()`` as they are now (``sources``: their tensors).

        Reused after the check :func:`reuse_policy` gives, else rebuilt.
        """
        if self.snapshot is not None and self.snapshot.same(sources):
            return
        self.left, self.right = _halves_of(terms(), self.split, self.dtype)
        self.snapshot = validator(self.reuse, sources)

    def seconds(self, rows: int, profile: MachineProfile) -> float:
        """Modelled time of a call on ``rows`` rows (``profile``: the device kind's constants).

        Where the halves are rebuilt on every call (an accelerator), the build is counted.
        """
        li, lj, r, ri, rj = self.dims
        terms = len(self.signs)
        # x, the intermediate and y per row, and the halves themselves on every call: on
        # large layers (LLaMA-2-7B's) they are megabytes, read from memory each time
        moved = terms * (rows * (lj * rj + 2 * lj * r * ri + li * ri)
                         + li * lj * r + r * ri * rj)
        size = self.left.element_size()
        regroup = [(2 * terms * rows * lj * r * ri * size, ri * size)]
        total = (profile.seconds(2 * self.macs * rows, moved * size, 4)
                 + profile.copy_seconds(regroup))
        if self.reuse == "rebuild":
            halves = terms * (li * lj * r + r * ri * rj) * size
            total += profile.seconds(2 * self.build_macs, 4 * halves, self.build_ops)
        return total

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
