"""DoTA's layer: ``y = x (W0 + MPO(T) - MPO(T_init))^T + b`` with trainable cores ``T``.

Each adapter holds its cores ``T`` (``dota_cores``, trained) and its initial cores
``T_init`` (``dota_init``, stored, frozen). The base weight ``W0`` is not modified, so the
layer follows peft's semantics (disable, several adapters, unload) exactly; the paper's
``W_res + MPO(T)`` with ``W_res = W0 - MPO(T_init)`` is the same matrix.

The update is a sum of MPO terms (``+T`` and ``-T_init`` per active adapter), computed
by the planner's strategy:

* ``"contract"``: ``base(x) + sum_i s_i x MPO(term_i)^T``, contracting ``x`` through each
  term's cores (a summed chain of bond ``2R`` would cost ``(2R)^2`` in its middle cores);
* ``"dense"``: ``W = W0 + sum_i s_i MPO(term_i)`` built in one product of the terms'
  half-chains side by side (bond ``2R``), with the sum fused into the reordering pass, in a
  reused buffer, used for one matmul and dropped (:class:`_DenseResidualMPO`). Backward
  rebuilds it and pulls ``dW`` back through the halves of ``T`` only; no dense matrix is
  kept. :func:`chain_sum` gives the sum as one MPO (bonds added) where one chain is needed.

QDoTA stores ``NF4(W0 - MPO(T_init))`` as the base (the paper's form, the only way the
base can be 4-bit) and adds ``MPO(T)``; disabled, it adds ``MPO(T_init)`` back, which gives
``W0`` up to the residual's NF4 rounding.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F

from ...errors import ConfigError
from ...plan import DEFAULT_PROFILE, ContractionPlan, plan_mpo_matmul
from ...tensorize import _halves_split, _mpo_halves, cores_to_matrix
from ..base import compute_dtype, dense_weight, is_4bit
from ..layer import shift_weight

__all__ = [
    "DoTALayer",
    "DoTALinear",
    "chain_sum",
    "random_cores",
    "release_scratch",
    "residual_strategy",
]


#: How much faster than the profile's copy bandwidth the dense path's W-sized passes
#: stream (long contiguous runs, written by a matrix product or one fused add); fitted to
#: per-layer training steps on the LLaMA-2-7B shapes, 32-2048 rows, 1 and 2 threads
#: (``benchmarks/bench_plan.py --training``).
STREAM_SPEEDUP = 2.0


def residual_strategy(
    plan: ContractionPlan, *, training: bool, terms: int = 1, trainable: int | None = None
) -> str:
    """DoTA's cost model: the cheaper strategy for ``x @ (W_base + sum_t s_t MPO(T_t)).T``.

    It models what the layer runs (:class:`_DenseResidualMPO` and the term-by-term
    contraction), on the core's plan of one term's chain. Both strategies pay the matmul
    with the frozen base (folded into one matmul by ``"dense"``):

    * forward pass: ``"dense"`` builds ``W`` once (the terms' half-chains side by side,
      bond ``terms * R``, multiplied block by block with the base added:
      :func:`_build_weight`); ``"contract"`` contracts ``x`` through each term;
    * training step (forward, backward to the input and to the trainable cores): dense is
      three matmuls (``y``, ``dx``, ``dW``), two builds and the pull-back of ``dW``
      through the halves of each trainable term (:func:`_pull_back`);
      contract is two matmuls and ``2 * terms + trainable`` contractions (each term
      forward and back to ``x``, the trainable ones back to their cores).

    Parameters
    ----------
    plan : ContractionPlan
        The core's plan of one term's chain (:func:`tensornet.plan_mpo_matmul`).
    training : bool
        Cost a training step (forward and backward) rather than a forward pass.
    terms : int, default 1
        Chains in the update (DoTA: ``T`` and ``T_init`` per adapter; QDoTA: ``T``).
    trainable : int, optional
        Of those, how many need core gradients (default: all of them).

    Returns
    -------
    {"dense", "contract"}

    Examples
    --------
    >>> from tensornet import plan_mpo_matmul
    >>> shapes = [(1, 4, 4, 16), (16, 4, 4, 16), (16, 8, 8, 16), (16, 8, 8, 16), (16, 4, 4, 1)]
    >>> residual_strategy(plan_mpo_matmul(shapes, 1), training=False)
    'contract'
    >>> residual_strategy(plan_mpo_matmul(shapes, 8192), training=True, terms=2, trainable=1)
    'dense'
    """
    dense, contract = _strategy_seconds(plan, training=training, terms=terms,
                                        trainable=terms if trainable is None else trainable)
    return "dense" if dense < contract else "contract"


def _strategy_seconds(
    plan: ContractionPlan, *, training: bool, terms: int, trainable: int
) -> tuple[float, float]:
    """Modelled seconds of ``("dense", "contract")`` for :func:`residual_strategy`."""
    profile = DEFAULT_PROFILE
    entries = plan.out_features * plan.in_features
    itemsize = plan.itemsize
    split = _halves_split(plan.core_shapes)
    bond = int(plan.core_shapes[split][0])
    blocks = math.prod(s[1] for s in plan.core_shapes[:split])  # the block loops' length
    stream = profile.bytes_per_s * STREAM_SPEEDUP

    def seconds(flops: float, passes: int, ops: int) -> float:
        return (flops / profile.flops_per_s + passes * entries * itemsize / stream
                + ops * profile.op_seconds)

    # the CPU layout of _build_weight and _pull_back: blockwise products that read the
    # base and write W in one pass; dW read once per trainable term
    build = seconds(2 * entries * bond * terms, 2, blocks)
    if not training:
        return build, terms * plan.contract_seconds
    pullback = seconds(4 * entries * bond * trainable, trainable, 2 * blocks * trainable)
    dense = 3 * plan.matmul_seconds + 2 * build + pullback
    contract = 2 * plan.matmul_seconds + (2 * terms + trainable) * plan.contract_seconds
    return dense, contract


def _run_path(equation: str, path: Sequence[Sequence[int]], operands: Sequence[Any]) -> Any:
    """Contract ``operands`` pairwise along ``path`` with ``torch.einsum``.

    The contraction a :class:`~tensornet.ContractionPlan` runs (path in opt_einsum's
    linear format), in plain torch calls that torch.compile traces; opt_einsum's own
    dispatch does not trace.
    """
    inputs, out = equation.split("->")
    terms, ops = inputs.split(","), list(operands)
    for pair in path:
        picked = sorted(pair, reverse=True)
        group_ops = [ops.pop(k) for k in picked]
        group_terms = [terms.pop(k) for k in picked]
        keep = set("".join(terms)) | set(out)
        joined = dict.fromkeys("".join(group_terms))
        result = "".join(ch for ch in joined if ch in keep)
        ops.append(torch.einsum(f"{','.join(group_terms)}->{result}", *group_ops))
        terms.append(result)
    return ops[0] if terms[0] == out else torch.einsum(f"{terms[0]}->{out}", ops[0])


def _contract(
    plan: ContractionPlan, x: torch.Tensor, cores: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``x @ MPO(cores).T`` along ``plan``'s path (the plan the layer costed)."""
    if not torch.compiler.is_compiling():
        return plan(x, cores, strategy="contract")
    in_modes = [s[2] for s in plan.core_shapes]
    lead = x.shape[:-1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = _run_path(plan.equation, plan.path, (x.reshape(-1, *in_modes), *cores))
    return y.reshape(*lead, plan.out_features)


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

    Differentiable: gradients flow back to every chain's cores.

    Examples
    --------
    >>> a = random_cores((2, 3), (2, 2), (1, 3, 1), zero_last=False)
    >>> b = random_cores((2, 3), (2, 2), (1, 2, 1), zero_last=False)
    >>> s = chain_sum([(1.0, a), (-1.0, b)])
    >>> [tuple(c.shape) for c in s]
    [(1, 2, 2, 5), (5, 3, 2, 1)]
    >>> bool(torch.allclose(cores_to_matrix(s), cores_to_matrix(a) - cores_to_matrix(b)))
    True
    """
    if len(chains) == 1 and chains[0][0] == 1:
        return list(chains[0][1])
    n = len(chains[0][1])
    out = []
    for k in range(n):
        parts = [c[k] for _, c in chains]
        if k == n - 1:
            out.append(torch.cat([p if s == 1 else p * s for (s, _), p in zip(chains, parts)], 0))
        elif k == 0:
            out.append(torch.cat(parts, 3))
        else:  # block diagonal
            right = sum(int(p.shape[3]) for p in parts)
            rows, off = [], 0
            for p in parts:
                a, i, j, b = p.shape
                pieces = [p.new_zeros(a, i, j, off), p, p.new_zeros(a, i, j, right - off - b)]
                rows.append(torch.cat(pieces, 3))
                off += b
            out.append(torch.cat(rows, 0))
    return out


class _Scratch(threading.local):
    """Per-thread reusable CPU buffers for the W-sized temporaries of the dense path.

    A training step builds ``W`` twice and forms ``dW`` once per layer; on the CPU each
    fresh W-sized tensor costs page faults on first touch (as much as the arithmetic that
    fills it), so they are written into one buffer that grows to the largest layer and
    is reused by every layer (``W``, then ``dW`` in the backward pass, each used before
    the next is written). GPU tensors use the caching allocator instead.
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
            # a normal tensor even when first needed under torch.inference_mode, so that
            # a later build outside it may write into it
            with torch.inference_mode(False):
                self.buffers[key] = buf = torch.empty(numel, dtype=like.dtype)
        return buf[:numel].view(shape)


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free this thread's CPU scratch buffers of the dense DoTA path (they regrow on use)."""
    _SCRATCH.buffers.clear()


def _build_weight(left: torch.Tensor, right: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base + MPO`` from the two half-chains, written into the ``"weight"`` scratch buffer.

    ``W[(a, c), (b, d)] = base + sum_r left[a, b, r] right[r, c, d]``. On the CPU, for each
    ``a`` one batched product over ``c`` writes the block ``W[a]`` in its final
    ``(c, b, d)`` order with ``base`` added (``baddbmm``): one pass reads ``base`` and
    writes ``W``, where a single matrix product over all entries writes them in
    ``(a, b, c, d)`` order and needs a second, reordering pass over ``W``. Elsewhere (a GPU,
    where a launch per block costs more than a pass) that product and one fused
    reorder-and-add pass. The result is valid until the next build on this thread (no
    autograd through the buffers).

    ``base`` may come in another dtype than the halves (QDoTA's residual comes from
    bitsandbytes in the dtype it was quantized from); it is cast on the way. A 4-bit
    base is dequantized into fresh memory for each build (forward, and again in the
    backward pass for ``dx``): bitsandbytes 0.50 has no CPU kernel for dequantizing into
    a given buffer (``dequantize_4bit(out=...)`` raises NotImplementedError there), and
    keeping the dequantized residual from forward to backward would hold a dense copy
    of every adapted weight.
    """
    li, lj, r = left.shape
    _, ri, rj = right.shape
    with torch.autocast(device_type=left.device.type, enabled=False):  # the cores' dtype
        target = _SCRATCH.get("weight", (li * ri, lj * rj), left).view(li, ri, lj, rj)
        base4 = base.reshape(li, ri, lj, rj)
        if left.device.type != "cpu":
            prod = torch.matmul(left.reshape(li * lj, r), right.reshape(r, ri * rj))
            torch.add(base4, prod.view(li, lj, ri, rj).permute(0, 2, 1, 3), out=target)
            return target.view(li * ri, lj * rj)
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


def _pull_back(
    g_weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the halves from ``dW`` (``(I, J)``): ``dW`` pulled back through the product.

    ``g_left[a, b, r] = sum_{c,d} dW[a, c, b, d] right[r, c, d]`` and ``g_right[r, c, d] =
    sum_{a,b} left[a, b, r] dW[a, c, b, d]``. On the CPU both are taken block by block
    over ``a`` straight from ``dW``'s ``(a, c, b, d)`` layout (the block stays in cache
    between the two products), without reordering ``dW`` first; elsewhere ``dW`` is
    reordered once and pulled back by two matrix products.
    """
    li, lj, r = left.shape
    _, ri, rj = right.shape
    with torch.autocast(device_type=left.device.type, enabled=False):
        if left.device.type != "cpu":
            g_prod = g_weight.view(li, ri, lj, rj).permute(0, 2, 1, 3).reshape(li * lj, ri * rj)
            g_left = (g_prod @ right.reshape(r, ri * rj).T).reshape(li, lj, r)
            return g_left, (left.reshape(li * lj, r).T @ g_prod).reshape(r, ri, rj)
        blocks = g_weight.view(li, ri, lj, rj)  # per a: (c, b, d)
        right_t = right.permute(1, 2, 0).contiguous()  # (c, d, r)
        left_t = left.permute(0, 2, 1).contiguous()  # (a, r, b)
        g_left = left.new_empty(li, lj, r)
        acc = left.new_zeros(ri, r, rj)  # (c, r, d)
        for a in range(li):
            torch.sum(torch.bmm(blocks[a], right_t), 0, out=g_left[a])
            acc.baddbmm_(left_t[a].expand(ri, r, lj), blocks[a])
        return g_left, acc.permute(1, 0, 2)


def _term_halves(
    terms: Sequence[Sequence[torch.Tensor]], signs: Sequence[float], ct: torch.dtype
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Half-chains of each term, and of their sum: ``[L_1 .. L_n]`` and ``[s_1 R_1; ...]``.

    The half-chains of a sum of MPOs with the same modes and split are the halves of the
    terms side by side (left) and stacked with their signs (right), so one product of the
    two builds ``sum_i s_i MPO(term_i)`` and each term keeps its own small halves for the
    backward pass.
    """
    with torch.autocast(device_type=terms[0][0].device.type, enabled=False):
        halves = [_mpo_halves([c.to(ct) for c in t]) for t in terms]
        left = torch.cat([h[0] for h in halves], dim=-1)
        right = torch.cat([h[1] if s == 1 else h[1] * s for h, s in zip(halves, signs)], dim=0)
    return halves, left, right


class _DenseResidualMPO(torch.autograd.Function):
    """``x (W_base + sum_i s_i MPO(term_i))^T + b`` that keeps no dense matrix for backward.

    Forward builds ``W`` from the summed half-chains (:func:`_term_halves`) with ``W_base``
    added in the same pass (:func:`_build_weight`), uses it and drops it; only ``x`` and
    the small cores are saved. Backward rebuilds ``W`` for ``dx = dy W``, forms the dense
    ``dW = dy^T x`` in the same buffer and pulls it back by hand (:func:`_pull_back`),
    through the halves of only the terms that need a gradient (DoTA's ``T``, not its
    ``T_init``), then through each half by autograd. On the CPU the W-sized temporaries
    live in a reused per-thread buffer (:class:`_Scratch`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        layer: DoTALinear,
        signs: tuple[float, ...],
        *cores: torch.Tensor,
    ) -> torch.Tensor:
        ct = layer.compute_dtype
        n = len(cores) // len(signs)
        terms = [cores[i * n:(i + 1) * n] for i in range(len(signs))]
        _, left, right = _term_halves(terms, signs, ct)
        weight = _build_weight(left, right, layer.dense_base())
        y = F.linear(x.to(ct), weight, None if bias is None else bias.to(ct))
        del weight
        ctx.layer = layer
        ctx.signs = signs
        ctx.save_for_backward(x, *cores)
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, *cores = ctx.saved_tensors
        layer, signs = ctx.layer, ctx.signs
        ct = layer.compute_dtype
        n = len(cores) // len(signs)
        want = [c.requires_grad for c in cores]
        with torch.enable_grad():
            leaves = [c.detach().requires_grad_(w) for c, w in zip(cores, want)]
            terms = [leaves[i * n:(i + 1) * n] for i in range(len(signs))]
            halves, left, right = _term_halves(terms, signs, ct)
        gy2 = gy.reshape(-1, gy.shape[-1]).to(ct)
        gx = None
        if ctx.needs_input_grad[0]:
            weight = _build_weight(left.detach(), right.detach(), layer.dense_base())
            gx = (gy2 @ weight).reshape(x.shape).to(x.dtype)
            del weight
        gb = gy2.sum(0).to(gy.dtype) if ctx.has_bias and ctx.needs_input_grad[1] else None
        grads: list[torch.Tensor | None] = [None] * len(cores)
        if any(want):
            li, lj, _ = left.shape
            _, ri, rj = right.shape
            x2 = x.reshape(-1, x.shape[-1]).to(ct)
            g_weight = _SCRATCH.get("weight", (li * ri, lj * rj), gy2)
            with torch.autocast(device_type=gy2.device.type, enabled=False):
                torch.mm(gy2.T, x2, out=g_weight)
            for t, ((lt, rt), sign) in enumerate(zip(halves, signs)):
                picked = [(i, leaves[i]) for i in range(t * n, (t + 1) * n) if want[i]]
                if not picked:
                    continue  # a frozen term (T_init): no thin products for it
                g_left, g_right = _pull_back(g_weight, lt.detach(), rt.detach())
                if sign != 1:
                    g_left, g_right = g_left * sign, g_right * sign
                got = torch.autograd.grad(
                    (lt, rt), [leaf for _, leaf in picked], (g_left, g_right), allow_unused=True
                )
                for (i, leaf), g in zip(picked, got):
                    grads[i] = torch.zeros_like(leaf) if g is None else g
            del g_weight
        return (gx, gb, None, None, *grads)


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
            halves = [_mpo_halves([c.detach().to(dtype) for c in t], split) for _, t in terms]
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

    def seconds(self, rows: int) -> float:
        """Modelled time of a call on ``rows`` rows (the planner's machine constants)."""
        li, lj, r, ri, rj = self.dims
        # x, the intermediate and y per row, and the halves themselves on every call: on
        # large layers (LLaMA-2-7B's) they are megabytes, read from memory each time
        moved = len(self.signs) * (rows * (lj * rj + 2 * lj * r * ri + li * ri)
                                   + li * lj * r + r * ri * rj)
        size = self.left.element_size()
        regroup = [(2 * len(self.signs) * rows * lj * r * ri * size, ri * size)]
        return (DEFAULT_PROFILE.seconds(2 * self.macs * rows, moved * size, 4)
                + DEFAULT_PROFILE.copy_seconds(regroup))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_t s_t x MPO(term_t)^T`` for ``x`` of shape ``(..., J)`` (cores' dtype)."""
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


class DoTALayer(BaseTunerLayer):
    """peft tuner-layer state of DoTA: per adapter, trained and initial cores."""

    adapter_layer_names = ("dota_cores",)
    other_param_names = ("dota_init", "dota_strategy")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.dota_cores = nn.ModuleDict({})
        self.dota_init = nn.ModuleDict({})
        self.dota_strategy: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        #: QDoTA: the NF4 residual layer while the base is a merged dense layer
        self._nf4_base: list[nn.Module] = []
        #: QDoTA being restored: the residual is built from the loaded T_init on first use
        self._pending_residual: str | None = None
        self._plans: dict[tuple[Any, ...], tuple[str, ContractionPlan | None]] = {}
        #: (adapters, disabled) -> the cached operands of forward passes without grad
        self._serving: dict[tuple[tuple[str, ...], bool], _ServingOperands] = {}

    # -- state ---------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True if the base holds QDoTA's NF4 residual (or, merged, was built from it)."""
        return is_4bit(self.get_base_layer()) or bool(self._nf4_base) or (
            self._pending_residual is not None
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the dense computations: the base weight's (a 4-bit base's compute dtype)."""
        return compute_dtype(self.get_base_layer())

    def cores(self, adapter: str) -> list[nn.Parameter]:
        """The trainable cores ``T`` of ``adapter``."""
        return list(self.dota_cores[adapter])

    def init_cores(self, adapter: str) -> list[torch.Tensor]:
        """The initial cores ``T_init`` of ``adapter``."""
        init = self.dota_init[adapter]
        return [init[str(k)] for k in range(len(init))]

    def update_layer(
        self,
        adapter_name: str,
        config: Any,
        cores: Sequence[torch.Tensor],
        init: Sequence[torch.Tensor],
        *,
        restoring: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` with cores ``cores`` and initial cores ``init``."""
        # (a 4-bit base is QDoTA's to take; a layer that has adapters takes no QDoTA one,
        # and one that has a QDoTA adapter takes nothing else)
        if self.dota_cores and (self.quantized or config.quantize == "nf4"):
            raise ConfigError(
                f"QDoTA replaces the base layer by its NF4 residual: a layer takes one QDoTA "
                f"adapter and nothing else (adapter {adapter_name!r})"
            )
        self._serving.clear()
        base = self.get_base_layer()
        device = dense_device(base)
        self.dota_cores[adapter_name] = nn.ParameterList(
            [nn.Parameter(c.to(device)) for c in cores]
        )
        self.dota_init[adapter_name] = BufferDict(
            {str(k): c.detach().to(device).clone() for k, c in enumerate(init)}, persistent=True
        )
        self.dota_strategy[adapter_name] = config.strategy
        if config.quantize == "nf4":
            # the residual's compute dtype is the cores' dtype as created (bfloat16 by
            # default), before peft upcasts adapter weights to float32
            self._residual_dtype = self.dota_cores[adapter_name][0].dtype
            if restoring:
                self._pending_residual = adapter_name
            else:
                self._build_residual(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _build_residual(self, adapter: str) -> None:
        """Replace the base by ``NF4(W0 - MPO(T_init))`` (QDoTA)."""
        base = self.get_base_layer()
        with torch.no_grad():
            w0 = dense_weight(base)
            init = [c.to(w0.dtype) for c in self.init_cores(adapter)]
            residual = w0 - cores_to_matrix(init)
            compute = self._residual_dtype
            # the dtype a merge gives back: the replaced layer's (an empty buffer, so that
            # a later ``model.to(dtype)`` moves it along with the model)
            dense = torch.empty(0, dtype=self.compute_dtype, device=dense_device(base))
            self.base_layer = nf4_linear(residual, base.bias, compute)
        self.register_buffer("_merge_dtype", dense, persistent=False)
        self._pending_residual = None

    def _ensure_residual(self) -> None:
        if self._pending_residual is not None:
            self._build_residual(self._pending_residual)

    @staticmethod
    def _after_load(module: Any, incompatible_keys: Any) -> None:
        if getattr(module, "_init_arrives", False):
            module._init_arrives = False
            module._ensure_residual()

    # -- the adapter's matrix --------------------------------------------------------
    def delta_terms(
        self, adapters: Sequence[str], *, disabled: bool = False
    ) -> list[tuple[float, list[torch.Tensor]]]:
        """``(sign, cores)`` of the chains whose sum the ``adapters`` add to the base.

        DoTA: ``+T`` and ``-T_init`` per adapter; QDoTA: ``+T`` (disabled: ``+T_init``).
        """
        if self.quantized:
            (adapter,) = adapters
            return [(1.0, self.init_cores(adapter) if disabled else self.cores(adapter))]
        terms: list[tuple[float, list[torch.Tensor]]] = []
        for a in adapters:
            cores = self.cores(a)
            dt = cores[0].dtype
            terms.append((1.0, cores))
            terms.append((-1.0, [c.to(dt) for c in self.init_cores(a)]))
        return terms

    def delta_chain(self, adapters: Sequence[str], *, disabled: bool = False) -> list[torch.Tensor]:
        """One chain for the update the ``adapters`` add to the base (see the module doc)."""
        return chain_sum(self.delta_terms(adapters, disabled=disabled))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``MPO(T) - MPO(T_init)`` (QDoTA: ``MPO(T)``) in the base dtype, computed in float32+."""
        cores = self.cores(adapter)
        dt = torch.float64 if cores[0].dtype == torch.float64 else torch.float32
        delta = cores_to_matrix([c.detach().to(dt) for c in cores])
        if not self.quantized:
            delta = delta - cores_to_matrix([c.to(dt) for c in self.init_cores(adapter)])
        return delta.to(self.compute_dtype)

    def _serve(self, x: torch.Tensor, adapters: list[str], disabled: bool) -> torch.Tensor | None:
        """The update for ``x`` from cached operands, or None where another path is cheaper.

        Forward passes without grad only (:class:`_ServingOperands`); the entry is checked
        against the layer's tensors on each call and rebuilt when they changed.
        """
        if self.quantized:
            sources = list(self.dota_init[adapters[0]]._buffers.values() if disabled
                           else self.dota_cores[adapters[0]]._parameters.values())
        else:
            sources = []
            for a in adapters:
                sources += self.dota_cores[a]._parameters.values()
                sources += self.dota_init[a]._buffers.values()
        key = (tuple(adapters), disabled)
        entry = self._serving.get(key)
        if entry is None or not entry.valid(sources):
            terms = self.delta_terms(adapters, disabled=disabled)
            if len({tuple(tuple(c.shape) for c in t) for _, t in terms}) > 1:
                return None  # adapters of different ranks: the general path
            # in the trained cores' dtype, as the other paths compute (QDoTA's T_init may
            # be stored in another)
            dtype = self.dota_cores[adapters[0]][0].dtype
            entry = self._serving[key] = _ServingOperands(sources, terms, dtype)
        rows = x.numel() // self.in_features
        use = entry.use.get(rows)
        if use is None:
            use = False
            if all(self.dota_strategy.get(a, "auto") == "auto" for a in adapters):
                terms = self.delta_terms(adapters, disabled=disabled)
                choice, plan = self.choose_strategy(terms[0][1], rows, False, adapters[0])
                other = plan.build_seconds if choice == "dense" else (  # type: ignore[union-attr]
                    len(terms) * plan.contract_seconds)  # type: ignore[union-attr]
                use = entry.seconds(rows) < other
            entry.use[rows] = use
        return entry(x.to(entry.dtype)) if use else None

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete as peft's layer does, dropping the cached serving operands too."""
        self._serving.clear()
        super().delete_adapter(adapter_name)

    def dense_base(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as a dense ``(out, in)`` tensor, of ``dtype`` if given.

        Without ``dtype``: as stored (a dense weight itself, no copy; a 4-bit one as
        bitsandbytes dequantizes it), for the dense path to cast in its fused add.
        """
        base = self.get_base_layer()
        if dtype is None and not is_4bit(base):
            return base.weight.detach()
        return dense_weight(base, dtype)

    def _term_counts(self, adapter: str) -> tuple[int, int]:
        """Chains in the active update, and those of them trained (``T``, one per adapter).

        Counted from the active adapters, not from which cores require grad, so that a
        reloaded adapter in inference mode takes the trained model's path.
        """
        active = sum(a in self.dota_cores for a in self.active_adapters) or 1
        return (1 if self.quantized else 2) * active, active

    def choose_strategy(self, chain: Sequence[torch.Tensor], batch: int, training: bool,
                        adapter: str) -> tuple[str, ContractionPlan | None]:
        """Dense or contract for ``batch`` rows, and the plan that costed it (cached per shape).

        The plan (of one term's chain) is what the contract branch then runs, so the path
        executed is the path costed (None for ``strategy="dense"``, which needs none).
        Plans use fixed machine constants (:data:`tensornet.plan.DEFAULT_PROFILE`), not a
        per-process calibration, so a reloaded adapter picks the same path and computes the
        same bits as the model it was saved from.
        """
        fixed = self.dota_strategy.get(adapter, "auto")
        c0 = chain[0]
        shapes = tuple(tuple(int(d) for d in c.shape) for c in chain)
        terms, trainable = self._term_counts(adapter)
        key = (shapes, batch, training, c0.dtype, c0.device.type, fixed, terms)
        found = self._plans.get(key)
        if found is None:
            plan = None
            if fixed != "dense":
                plan = plan_mpo_matmul(
                    shapes, max(batch, 1), itemsize=c0.element_size(), profile=DEFAULT_PROFILE,
                )
            if fixed == "auto":
                choice = residual_strategy(plan, training=training, terms=terms,
                                           trainable=trainable)
            else:
                choice = fixed
            found = self._plans[key] = (choice, plan)
        return found


def dense_device(module: nn.Module) -> torch.device:
    """The device of a layer's weight."""
    return module.weight.device


class DoTALinear(nn.Module, DoTALayer):
    """A linear layer plus DoTA adapters (built by peft through :class:`DoTAModel`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        cores: Sequence[torch.Tensor],
        init: Sequence[torch.Tensor],
        *,
        restoring: bool = False,
    ) -> None:
        super().__init__()
        DoTALayer.__init__(self, base_layer)
        self.register_load_state_dict_post_hook(DoTALayer._after_load)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, cores, init, restoring=restoring)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # QDoTA being restored: note whether this load brings T_init (the children's
        # buffers are filled after this call; the post-hook below builds the residual)
        self._serving.clear()
        pending = self._pending_residual
        self._init_arrives = pending is not None and f"{prefix}dota_init.{pending}.0" in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args)

    def train(self, mode: bool = True) -> DoTALinear:
        """As ``nn.Module.train``; drops the cached serving operands (see _ServingOperands)."""
        self._serving.clear()
        return super().train(mode)

    # -- merge -------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' ``Delta W`` to the base weight (QDoTA: a dense merged base)."""
        self._ensure_residual()
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if name not in self.dota_cores:
                continue
            base = self.get_base_layer()
            with torch.no_grad():
                if is_4bit(base):  # QDoTA: the merged base is dense, NF4(W_res) + MPO(T)
                    weight = dense_weight(base, torch.float32) + self.get_delta_weight(name).float()
                    marker = self._buffers.get("_merge_dtype")
                    merged = nn.Linear(self.in_features, self.out_features,
                                       bias=base.bias is not None, device=weight.device,
                                       dtype=self.compute_dtype if marker is None else marker.dtype)
                    merged.weight.copy_(weight)
                    if base.bias is not None:
                        merged.bias.copy_(base.bias)
                    merged.requires_grad_(False)
                    if safe_merge and not torch.isfinite(merged.weight).all():
                        raise ValueError(f"NaNs in the merged weights of adapter {name!r}")
                    self._nf4_base.append(base)
                    self.base_layer = merged
                else:
                    shift_weight(base, self.get_delta_weight(name),
                                 check=name if safe_merge else None)
            self.merged_adapters.append(name)
        release_scratch()
        self._serving.clear()

    def unmerge(self) -> None:
        """Take the merged adapters' ``Delta W`` out of the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._serving.clear()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.dota_cores:
                continue
            with torch.no_grad():
                if self._nf4_base:
                    self.base_layer = self._nf4_base.pop()
                else:
                    shift_weight(self.get_base_layer(), self.get_delta_weight(name), sign=-1.0)

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x)`` plus the active adapters' update, by the planner's strategy."""
        self._ensure_residual()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            if not self.quantized:
                return self.base_layer(x, *args, **kwargs)
            adapters, disabled = [a for a in self.dota_cores], True
        elif self.merged:
            return self.base_layer(x, *args, **kwargs)
        else:
            adapters, disabled = [a for a in self.active_adapters if a in self.dota_cores], False
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            delta = self._serve(x, adapters, disabled)
            if delta is not None:
                y = self.base_layer(x, *args, **kwargs)
                return y + delta.to(y.dtype)
        terms = self.delta_terms(adapters, disabled=disabled)
        batch = x.numel() // self.in_features
        # by grad mode only (not by which cores require grad), so a reloaded adapter in
        # inference mode takes the same path as the trained one and gives the same bits
        training = torch.is_grad_enabled()
        choose = self.choose_strategy
        if torch.compiler.is_compiling():  # plan outside the traced graph, on concrete sizes
            choose = torch.compiler.disable(choose)
        # planned on one term's chain: contracting costs that per term, building W about
        # as much per term (one product of the summed chain's halves)
        choice, plan = choose(terms[0][1], batch, training, adapters[0])
        if choice == "contract":
            plans = {plan.core_shapes: plan}  # type: ignore[union-attr]
            for _, cores in terms[1:]:  # adapters of other ranks: their own plans, alike
                shapes = tuple(tuple(int(d) for d in c.shape) for c in cores)
                if shapes not in plans:
                    plans[shapes] = choose(cores, batch, training, adapters[0])[1]
            # term by term: a summed chain's middle cores are (n R)^2, n^2 times the work
            # (summed before the base output is added: at T = T_init the terms cancel
            # exactly and the layer gives the base's output bit for bit)
            y = self.base_layer(x, *args, **kwargs)
            xc = x.to(terms[0][1][0].dtype)
            delta = None
            for sign, cores in terms:
                shapes = tuple(tuple(int(d) for d in c.shape) for c in cores)
                part = _contract(plans[shapes], xc, cores)
                part = part if sign == 1 else -part
                delta = part if delta is None else delta + part
            return y + delta.to(y.dtype)
        signs = tuple(sign for sign, _ in terms)
        if len({tuple(tuple(c.shape) for c in t) for _, t in terms}) > 1:
            # adapters of different ranks may split at different cores: one summed chain
            signs, terms = (1.0,), [(1.0, chain_sum(terms))]
        flat = [c for _, t in terms for c in t]
        return _DenseResidualMPO.apply(x, self.get_base_layer().bias, self, signs, *flat)

    def __repr__(self) -> str:
        return "dota." + super().__repr__()

    def extra_repr(self) -> str:
        """Shapes, modes and ranks for ``print(model)``."""
        parts = []
        for name, cores in self.dota_cores.items():
            ranks = [1, *(int(c.shape[-1]) for c in cores)]
            parts.append(
                f"{name}: out_modes={[int(c.shape[1]) for c in cores]}, "
                f"in_modes={[int(c.shape[2]) for c in cores]}, ranks={ranks}"
            )
        q = ", residual=nf4" if self.quantized else ""
        return "; ".join(parts) + q


def nf4_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> nn.Module:
    """A frozen bitsandbytes NF4 ``Linear4bit`` holding ``weight`` (quantized on creation)."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    device = weight.device
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
        quant_type="nf4", device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.to(torch.float32).cpu(), requires_grad=False, quant_type="nf4",
        compress_statistics=True,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype).cpu(), requires_grad=False)
    # bitsandbytes would repack the weight for another CPU kernel on the first inference
    # forward, whose results differ from the training path's; one kernel keeps the
    # layer's outputs the same in train and eval mode and after a reload
    layer.support_avx512bf16_for_cpu = False
    return layer.to(device)
