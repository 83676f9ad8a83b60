"""DoTA, DoTA-Random and QDoTA: the MPO-parametrized linear layer.

The layer computes ``y = x (W_res + MPO(T))^T + b``. The frozen residual ``W_res`` lives
in the wrapped base layer (an ``nn.Linear`` whose weight now holds ``W_res``, or a
bitsandbytes ``Linear4bit`` holding it in NF4); the cores ``T`` are the only trainable
parameters. The initial cores are kept as buffers: ``W_res = W0 - MPO(T_init)`` can then
be rebuilt from the base weight on any machine, without an SVD.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..plan import calibrate, mpo_matmul, plan_mpo_matmul
from ..tensorize import combine_halves, cores_to_matrix, mpo_halves
from .base import dense_weight, is_4bit

__all__ = ["DoTALinear", "random_cores"]


def random_cores(
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    generator: torch.Generator | None = None,
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
        if k == n - 1:
            cores.append(torch.zeros(shape))
        else:
            std = (1.0 / in_features if k == 0 else 1.0 / ranks[k]) ** 0.5
            cores.append(torch.randn(shape, generator=generator) * std)
    return cores


class _Scratch(threading.local):
    """Per-thread reusable CPU buffers for the W-sized temporaries of the dense path.

    A training step builds ``W`` twice and forms ``dW`` once per layer; on the CPU each
    fresh W-sized tensor costs page faults on first touch (as much as the arithmetic that
    fills it), so they are written into two buffers that grow to the largest layer and
    are reused by every layer. GPU tensors use the caching allocator instead.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        key = (slot, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers[key] = buf = torch.empty(numel, dtype=like.dtype)
        return buf[:numel].view(shape)


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free this thread's CPU scratch buffers of the dense DoTA path (they regrow on use)."""
    _SCRATCH.buffers.clear()


def _build_weight(left: torch.Tensor, right: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base + MPO`` from the two half-chains, written into the scratch buffers.

    The result (:func:`~tensornet.tensorize.combine_halves` with ``work``/``out``) is valid
    until the next build on this thread.
    """
    li, lj, _ = left.shape
    _, ri, rj = right.shape
    with torch.autocast(device_type=left.device.type, enabled=False):  # the cores' dtype
        return combine_halves(
            left, right, base=base,
            work=_SCRATCH.get("prod", (li * lj, ri * rj), left),
            out=_SCRATCH.get("weight", (li * ri, lj * rj), left),
        )


class _DenseResidualMPO(torch.autograd.Function):
    """``x (W_res + MPO(T))^T + b`` that keeps no dense matrix alive for backward.

    Forward builds ``W = W_res + MPO(T)`` (one product of the two half-chains, then the
    sum with ``W_res`` fused into the reordering pass), uses it and drops it; only ``x``
    and the small cores are saved. Backward rebuilds ``W`` for ``dx = dy W``, forms the
    dense ``dW = dy^T x`` in the same buffer and pulls it back through the product of the
    two half-chains by hand (two thin matmuls), then through each half by autograd. On
    the CPU the W-sized temporaries live in reused per-thread buffers (:class:`_Scratch`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        layer: DoTALinear,
        *cores: torch.Tensor,
    ) -> torch.Tensor:
        ct = layer.compute_dtype
        with torch.autocast(device_type=x.device.type, enabled=False):  # W in the cores' dtype
            left, right = mpo_halves([c.to(ct) for c in cores])
        weight = _build_weight(left, right, layer.residual_weight(ct))
        y = F.linear(x.to(ct), weight, None if bias is None else bias.to(ct))
        del weight
        ctx.layer = layer
        ctx.save_for_backward(x, *cores)
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, *cores = ctx.saved_tensors
        layer = ctx.layer
        ct = layer.compute_dtype
        want = [c.requires_grad for c in cores]
        with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            leaves = [c.detach().requires_grad_(w) for c, w in zip(cores, want)]
            left, right = mpo_halves([leaf.to(ct) for leaf in leaves])
        gy2 = gy.reshape(-1, gy.shape[-1]).to(ct)
        gx = None
        if ctx.needs_input_grad[0]:
            weight = _build_weight(left.detach(), right.detach(), layer.residual_weight(ct))
            gx = (gy2 @ weight).reshape(x.shape).to(x.dtype)
            del weight
        gb = gy2.sum(0).to(gy.dtype) if ctx.has_bias and ctx.needs_input_grad[1] else None
        grads: list[torch.Tensor | None] = [None] * len(cores)
        if any(want):
            li, lj, r = left.shape
            _, ri, rj = right.shape
            x2 = x.reshape(-1, x.shape[-1]).to(ct)
            g_weight = _SCRATCH.get("weight", (li * ri, lj * rj), gy2)
            with torch.autocast(device_type=gy2.device.type, enabled=False):
                torch.mm(gy2.T, x2, out=g_weight)
            g_prod = _SCRATCH.get("prod", (li, lj, ri, rj), gy2)
            g_prod.copy_(g_weight.view(li, ri, lj, rj).permute(0, 2, 1, 3))
            g_prod = g_prod.view(li * lj, ri * rj)
            del g_weight
            g_left = (g_prod @ right.detach().reshape(r, ri * rj).T).reshape(li, lj, r)
            g_right = (left.detach().reshape(li * lj, r).T @ g_prod).reshape(r, ri, rj)
            del g_prod
            picked = [leaf for leaf, w in zip(leaves, want) if w]
            it = iter(
                torch.autograd.grad(
                    (left, right), picked, (g_left, g_right), allow_unused=True
                )
            )
            grads = [next(it) if w else None for w in want]
            grads = [
                torch.zeros_like(c) if w and g is None else g
                for c, g, w in zip(cores, grads, want)
            ]
        return (gx, gb, None, *grads)


class DoTALinear(nn.Module):
    """A linear layer whose weight is ``W_res + MPO(T)`` with trainable cores ``T``.

    Build it with :func:`tensornet.adapters.apply_dota` (or :meth:`from_linear`).

    Attributes
    ----------
    base_layer : nn.Module
        ``nn.Linear`` holding ``W_res`` (frozen) and the bias, or a bitsandbytes
        ``Linear4bit`` holding ``W_res`` in NF4 (QDoTA).
    cores : nn.ParameterList
        The trainable MPO cores ``(R_{k-1}, I_k, J_k, R_k)``; ``I`` are the output modes.
    init_0, init_1, ... : buffers
        The cores at initialization (``W_res = W0 - MPO(T_init)``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        init_cores: Sequence[torch.Tensor],
        *,
        base_dtype: torch.dtype | None = None,
        strategy: str = "auto",
        method: str = "dota",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.cores = nn.ParameterList([nn.Parameter(c.clone()) for c in init_cores])
        for k, c in enumerate(init_cores):
            self.register_buffer(f"init_{k}", c.detach().clone())
        self.strategy = strategy
        self.method = method
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.base_fingerprint = ""
        self.relative_error: float | None = None
        self._strategies: dict[tuple[Any, ...], str] = {}
        #: dtype of the layer before it was adapted (merge and unapply give it back)
        self.base_dtype = base_dtype or self.compute_dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        init_cores: Sequence[torch.Tensor],
        *,
        quantize: str | None = None,
        dtype: torch.dtype | None = None,
        strategy: str = "auto",
        method: str = "dota",
    ) -> DoTALinear:
        """Wrap ``linear``: residual ``W0 - MPO(init_cores)``, cores trainable.

        Parameters
        ----------
        linear : nn.Linear or bitsandbytes Linear4bit
            The pretrained layer. An ``nn.Linear`` becomes the base layer: its weight is
            replaced by a new frozen Parameter holding the residual (a weight it shared
            with another module, such as a tied embedding, keeps ``W0`` there); a 4-bit
            layer is dequantized first.
        init_cores : sequence of tensors
            Initial cores ``(R_{k-1}, I_k, J_k, R_k)``.
        quantize : {"nf4"} or None
            Store the residual in NF4 (QDoTA).
        dtype : torch.dtype, optional
            Dtype of the cores; default the base weight's (bfloat16 for QDoTA).
        """
        w0 = dense_weight(linear)
        device = w0.device
        base_dtype = linear.weight.dtype if not is_4bit(linear) else linear.compute_dtype
        cores_dtype = dtype or (torch.bfloat16 if quantize == "nf4" else base_dtype)
        cores = [c.to(device=device, dtype=cores_dtype) for c in init_cores]
        residual = w0 - cores_to_matrix([c.to(w0.dtype) for c in cores])
        if quantize == "nf4":
            base = _nf4_linear(residual, linear.bias, cores_dtype)
        else:
            base = linear
            # a new Parameter, not `.data =`: a weight tied to another module (lm_head and
            # the embedding) must keep W0 there
            base.weight = nn.Parameter(residual.to(base_dtype), requires_grad=False)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        return cls(base, cores, base_dtype=base_dtype, strategy=strategy, method=method)

    @property
    def quantized(self) -> bool:
        """True if the residual is stored in 4 bits."""
        return is_4bit(self.base_layer)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the dense computations (the cores' dtype when quantized)."""
        return self.cores[0].dtype if self.quantized else self.base_layer.weight.dtype

    @property
    def out_modes(self) -> tuple[int, ...]:
        """Row modes ``I_1..I_N``."""
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def in_modes(self) -> tuple[int, ...]:
        """Column modes ``J_1..J_N``."""
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Bond dimensions ``(1, R_1, ..., 1)``."""
        return (1, *(int(c.shape[-1]) for c in self.cores))

    def init_cores(self) -> list[torch.Tensor]:
        """The cores at initialization."""
        return [getattr(self, f"init_{k}") for k in range(len(self.cores))]

    def residual_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen ``W_res`` as a dense ``(out, in)`` tensor of ``dtype``."""
        return dense_weight(self.base_layer, dtype)

    def delta_weight(self) -> torch.Tensor:
        """``MPO(T) - MPO(T_init)``: what training changed, as a dense matrix (float32+)."""
        dt = torch.float64 if self.cores[0].dtype == torch.float64 else torch.float32
        now = cores_to_matrix([c.detach().to(dt) for c in self.cores])
        return now - cores_to_matrix([c.to(dt) for c in self.init_cores()])

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_res + MPO(T)`` computed in float32 (at least), cast to ``dtype``."""
        dt = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        w = self.residual_weight(dt) + cores_to_matrix([c.detach().to(dt) for c in self.cores])
        return w.to(dtype or self.base_dtype)

    def choose_strategy(self, batch: int, training: bool) -> str:
        """Dense or contract for a batch of ``batch`` rows (the planner's choice, cached)."""
        if self.strategy != "auto":
            return self.strategy
        c0 = self.cores[0]
        key = (batch, training, c0.dtype, c0.device)
        choice = self._strategies.get(key)
        if choice is None:
            plan = plan_mpo_matmul(
                [tuple(c.shape) for c in self.cores],
                max(batch, 1),
                itemsize=c0.element_size(),
                profile=calibrate(c0.detach()),
            )
            choice = self._strategies[key] = plan.residual_strategy(training=training)
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W_res + MPO(T))^T + b`` by the planner's strategy."""
        cores = list(self.cores)
        batch = x.numel() // self.in_features
        training = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        choose = self.choose_strategy
        if torch.compiler.is_compiling():  # plan outside the traced graph, on concrete sizes
            choose = torch.compiler.disable(choose)
        if choose(batch, training) == "contract":
            y = self.base_layer(x)
            # mpo_matmul contracts in the cores' dtype, with autocast off
            delta = mpo_matmul(x.to(cores[0].dtype), cores, strategy="contract")
            return y + delta.to(y.dtype)
        bias = self.base_layer.bias
        return _DenseResidualMPO.apply(x, bias, self, *cores)

    def extra_repr(self) -> str:
        """Shapes, modes and ranks for ``print(model)``."""
        q = ", residual=nf4" if self.quantized else ""
        return (
            f"method={self.method}, in_features={self.in_features}, "
            f"out_features={self.out_features}, out_modes={list(self.out_modes)}, "
            f"in_modes={list(self.in_modes)}, ranks={list(self.ranks)}{q}"
        )


def _nf4_linear(
    residual: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` holding ``residual`` (quantized on creation)."""
    import bitsandbytes as bnb

    out_f, in_f = residual.shape
    device = residual.device
    layer = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        residual.to(torch.float32).cpu(),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype).cpu(), requires_grad=False)
    return layer.to(device)
