"""DoTA's dense path: ``W = W_base + MPO`` built from half-chains, used once and dropped.

The update's terms (``+T`` per adapter, ``-T_init`` for DoTA) are contracted into two
halves each (:func:`tensornet._chain.mpo_halves`); the halves of a sum of MPOs that
share their modes and split are the terms' halves side by side, so one product of the
two builds ``sum_t s_t MPO(T_t)``. :class:`DenseMPOLinear` uses ``W`` for one matmul and
keeps only ``x`` and the small halves for the backward pass, which rebuilds ``W`` for
``dx``, forms ``dW = dy^T x`` and pulls it back through the trainable halves by hand.

How ``W`` is built and ``dW`` pulled back depends on the device, and is chosen once per
call through the device seam (:func:`kernels_for`, :mod:`tensornet._device`), so that the
test suite runs both ways on CPU tensors:

* :class:`CPUKernels`: for each block of rows, one batched product writes ``W``'s block
  in its final order with the base added (``baddbmm``): one pass over ``W`` where one
  product over all entries would write them out of order and need a reordering pass,
  and the pull-back reads ``dW`` block by block, in cache. W-sized temporaries live in
  a per-thread buffer reused by every layer (a fresh W-sized tensor costs page faults on
  first touch, as much as the arithmetic that fills it).
* :class:`CUDAKernels`: one product and one fused reorder-and-add pass for ``W``; ``dW``
  reordered once and pulled back by two products for all trainable terms together. A
  launch per block would cost more than a pass on a GPU; the caching allocator serves
  the temporaries.

Every W-sized product runs in the layer's compute dtype (autocast's where it is on, as
``nn.Linear`` computes; accumulation in float32 inside the matrix products).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

from ..._device import device_kind

__all__ = ["CPUKernels", "CUDAKernels", "DenseMPOLinear", "kernels_for", "release_scratch"]


class _Scratch(threading.local):
    """Per-thread reusable CPU buffers for the W-sized temporaries of the dense path.

    A training step builds ``W`` twice and forms ``dW`` once per layer, each used before
    the next is written, so one buffer (per dtype) that grows to the largest layer serves
    every layer.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        key = (slot, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            # a normal tensor even when first needed under torch.inference_mode, so that
            # a later build outside it may write into it
            with torch.inference_mode(False):
                self.buffers[key] = buf = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free this thread's CPU scratch buffers of the dense DoTA path (they regrow on use)."""
    _SCRATCH.buffers.clear()


class CPUKernels:
    """The CPU layout: cache-sized blocks written in place into reused buffers."""

    kind = "cpu"

    @staticmethod
    def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A W-sized temporary (the thread's scratch buffer; valid until the next one)."""
        return _SCRATCH.get("weight", shape, like.dtype)

    @staticmethod
    def outer(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``dW = gy^T x`` (``(O, I)``), written into the thread's scratch buffer."""
        return torch.mm(gy.t(), x, out=CPUKernels.empty((gy.shape[1], x.shape[1]), gy))

    @staticmethod
    def build(left: torch.Tensor, right: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``W[(a, c), (b, d)] = base + sum_r left[a, b, r] right[r, c, d]`` in the halves' dtype.

        For each ``a`` one batched product over ``c`` writes the block ``W[a]`` in its
        final ``(c, b, d)`` order with ``base`` added; a base of another dtype (QDoTA's
        dequantized residual, a float32 base under autocast) is cast on the way.
        """
        li, lj, r = left.shape
        _, ri, rj = right.shape
        target = CPUKernels.empty((li * ri, lj * rj), left).view(li, ri, lj, rj)
        base4 = base.reshape(li, ri, lj, rj)
        blocks = right.permute(1, 0, 2).contiguous()  # (c, r, d)
        fused = base.dtype == left.dtype
        if not fused:
            target.copy_(base4)
        for a in range(li):
            rows = left[a].expand(ri, lj, r)  # (c, b, r): the same block for every c
            if fused:
                torch.baddbmm(base4[a], rows, blocks, out=target[a])
            else:
                target[a].baddbmm_(rows, blocks)
        return target.view(li * ri, lj * rj)

    @staticmethod
    def pull_back(
        g_weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the halves from ``dW`` (``(I, J)``), block by block over ``a``.

        ``g_left[a, b, r] = sum_{c,d} dW[a, c, b, d] right[r, c, d]`` and ``g_right[r, c,
        d] = sum_{a,b} left[a, b, r] dW[a, c, b, d]``, straight from ``dW``'s layout (the
        block stays in cache between the two products).
        """
        li, lj, r = left.shape
        _, ri, rj = right.shape
        blocks = g_weight.view(li, ri, lj, rj)  # per a: (c, b, d)
        right_t = right.permute(1, 2, 0).contiguous()  # (c, d, r)
        left_t = left.permute(0, 2, 1).contiguous()  # (a, r, b)
        g_left = left.new_empty(li, lj, r)
        acc = left.new_zeros(ri, r, rj)  # (c, r, d)
        for a in range(li):
            torch.sum(torch.bmm(blocks[a], right_t), 0, out=g_left[a])
            acc.baddbmm_(left_t[a].expand(ri, r, lj), blocks[a])
        return g_left, acc.permute(1, 0, 2)


class CUDAKernels:
    """The accelerator layout: one product and one fused pass, fresh (cached) memory."""

    kind = "cuda"

    @staticmethod
    def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A W-sized temporary from the caching allocator."""
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    @staticmethod
    def outer(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``dW = gy^T x`` (``(O, I)``)."""
        return torch.mm(gy.t(), x)

    @staticmethod
    def build(left: torch.Tensor, right: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """As :meth:`CPUKernels.build`: the product, then one pass reorders it and adds ``base``."""
        li, lj, r = left.shape
        _, ri, rj = right.shape
        prod = torch.mm(left.reshape(li * lj, r), right.reshape(r, ri * rj))
        ordered = prod.view(li, lj, ri, rj).permute(0, 2, 1, 3)
        base4 = base.view(li, ri, lj, rj)
        if base.dtype == left.dtype:  # the output follows the contiguous base's layout
            return torch.add(base4, ordered).view(li * ri, lj * rj)
        # a base of another dtype: the add computes in the wider one and rounds once into W
        target = torch.empty((li * ri, lj * rj), dtype=left.dtype, device=left.device)
        torch.add(base4, ordered, out=target.view(li, ri, lj, rj))
        return target

    @staticmethod
    def pull_back(
        g_weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`CPUKernels.pull_back`: ``dW`` reordered once, then two products."""
        li, lj, r = left.shape
        _, ri, rj = right.shape
        g_prod = g_weight.view(li, ri, lj, rj).permute(0, 2, 1, 3).reshape(li * lj, ri * rj)
        # (the halves may be slices of the summed halves along the bond: reshape, not view)
        g_left = torch.mm(g_prod, right.reshape(r, ri * rj).t()).view(li, lj, r)
        g_right = torch.mm(left.reshape(li * lj, r).t(), g_prod).view(r, ri, rj)
        return g_left, g_right


Kernels = type[CPUKernels] | type[CUDAKernels]
_KERNELS: dict[str, Kernels] = {"cpu": CPUKernels, "cuda": CUDAKernels}


def kernels_for(x: torch.Tensor) -> Kernels:
    """The dense path's kernels for tensors like ``x`` (:func:`tensornet._device.device_kind`).

    Under ``torch.compile`` the accelerator layout on every device: it is functional (no
    writes into slices of reused buffers, which the compiler's functionalization turns
    into scatters), and the compiler fuses and allocates on its own.
    """
    if torch.compiler.is_compiling():
        return CUDAKernels
    return _KERNELS[device_kind(x)]


def _side_by_side(
    halves: Sequence[torch.Tensor], const: torch.Tensor | None, dim: int
) -> torch.Tensor:
    """The halves of a sum of terms: concatenated along the bond (one tensor: itself)."""
    parts = list(halves) if const is None else [*halves, const]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class DenseMPOLinear(torch.autograd.Function):
    """``x (W_base + [L_1 .. L_n L_c] [R_1; ..; R_n; R_c])^T + b``, keeping no dense matrix.

    Inputs after the layer: the compute dtype, the kernels, the constant halves
    ``(L_c, R_c)`` (DoTA's ``-T_init`` terms, signs folded into ``R_c``; or None) and the
    trainable terms' halves ``L_1, R_1, ..., L_n, R_n`` in the compute dtype (autograd
    takes their gradients back to the cores). ``base`` is read from the layer on each
    build (QDoTA's residual is dequantized there).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        layer: Any,
        ct: torch.dtype,
        kernels: Kernels,
        const: tuple[torch.Tensor, torch.Tensor] | None,
        *halves: torch.Tensor,
    ) -> torch.Tensor:
        """Build ``W``, use it for ``y`` and drop it; save ``x`` and the summed halves."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            left = _side_by_side(halves[0::2], None if const is None else const[0], 2)
            right = _side_by_side(halves[1::2], None if const is None else const[1], 0)
            weight = kernels.build(left, right, layer.dense_base())
            xc = x.to(ct)
            y = F.linear(xc, weight, None if bias is None else bias.to(ct))
        ctx.layer, ctx.kernels, ctx.x_dtype = layer, kernels, x.dtype
        ctx.ranks = [int(h.shape[-1]) for h in halves[0::2]]
        ctx.has_bias = bias is not None
        # x in the compute dtype (what the dW product reads; half the bytes under
        # autocast) and the halves of the whole sum: the trainable ones are its first
        # bonds, so the backward pass needs no concatenation
        ctx.save_for_backward(x if x.dtype == ct else xc, left, right)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        """``dx`` through a rebuilt ``W``; ``dW`` pulled back through the trainable halves."""
        xc, left, right = ctx.saved_tensors
        kernels, ranks = ctx.kernels, ctx.ranks
        gx = gb = None
        grads: list[torch.Tensor | None] = [None] * (2 * len(ranks))
        with torch.autocast(device_type=gy.device.type, enabled=False):
            gy2 = gy.reshape(-1, gy.shape[-1]).to(xc.dtype)
            if ctx.needs_input_grad[0]:
                weight = kernels.build(left, right, ctx.layer.dense_base())
                gx = torch.mm(gy2, weight).view(xc.shape).to(ctx.x_dtype)
                del weight
            if ctx.has_bias and ctx.needs_input_grad[1]:
                gb = gy2.sum(0)
            if any(ctx.needs_input_grad[6:]):
                g_weight = kernels.outer(gy2, xc.reshape(-1, xc.shape[-1]))
                trained = sum(ranks)
                g_left, g_right = kernels.pull_back(
                    g_weight, left[..., :trained], right[:trained]
                )
                del g_weight
                if len(ranks) == 1:
                    grads = [g_left, g_right]
                else:  # several trainable terms: each its own bonds
                    for k, (gl, gr) in enumerate(zip(g_left.split(ranks, 2),
                                                     g_right.split(ranks, 0))):
                        grads[2 * k], grads[2 * k + 1] = gl, gr
        return (gx, gb, None, None, None, None, *grads)
