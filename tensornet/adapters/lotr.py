"""LoTR (Bershatsky et al., 2024): low-rank updates whose outer factors are shared.

For one kind of matrix (every ``q_proj`` of the model, say) in layers ``l = 1..L``::

    Delta W_l = s * A @ G_l @ B        A: (out, r)   G_l: (r, r)   B: (r, in)

``A`` and ``B`` are shared by the ``L`` layers of the kind (a Tucker-2 tensor of shape
``(L, out, in)``), ``G_l`` belongs to layer ``l``. In PyTorch's ``(out, in)`` layout the
paper's ``I`` is ``out_features`` and ``J`` is ``in_features``. ``A`` and ``B`` start
random, every ``G_l`` at zero, so the adapted model computes what the base computed.

The shared pairs live in ``model.tensornet_lotr`` (an ``nn.ModuleDict`` keyed by kind),
the cores ``G`` in the layers; the base weights are not modified. The forward pass
contracts ``y = base(x) + s ((x B^T) G^T) A^T`` and never forms ``Delta W``: autograd keeps
only rank-sized intermediates besides ``x``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..params import lotr_num_params
from .base import AdapterReport, LayerReport, find_targets
from .config import LoTRConfig
from .shared import (
    AdditiveLinear,
    Prepared,
    check_fresh,
    check_linear,
    install,
    report,
    resolve_config,
)

__all__ = ["LoTRConfig", "LoTRFactors", "LoTRLinear", "apply_lotr", "plan_lotr"]

#: Attribute of the model holding the shared factors.
CONTAINER = "tensornet_lotr"


class LoTRFactors(nn.Module):
    """The pair shared by every layer of one kind: ``A`` (out x r) and ``B`` (r x in)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:  # noqa: N803
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)

    def extra_repr(self) -> str:
        """Shapes for ``print(model)``."""
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"


class LoTRLinear(AdditiveLinear):
    """``y = base(x) + s ((x B^T) G^T) A^T`` with shared ``A``, ``B`` and this layer's ``G``.

    Build it with :func:`apply_lotr`.

    Attributes
    ----------
    base_layer : nn.Linear
        The pretrained layer (frozen, unchanged).
    G : nn.Parameter
        This layer's core, ``(r, r)``, zero at initialization.
    shared : LoTRFactors
        ``A`` and ``B`` of this layer's kind (registered on the model, not here).
    """

    def __init__(
        self, base_layer: nn.Linear, factors: LoTRFactors, core: torch.Tensor, scale: float
    ) -> None:
        super().__init__(base_layer, factors, scale)
        self.G = nn.Parameter(core)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s ((x B^T) G^T) A^T`` through rank-sized intermediates."""
        f = self.shared
        h = F.linear(x.to(self.G.dtype), f.B)
        h = F.linear(h, self.G) * self.scale
        return F.linear(h, f.A)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``s A G B`` (``(out, in)``) computed in ``dtype``."""
        f = self.shared
        a, g, b = (t.detach().to(dtype) for t in (f.A, self.G, f.B))
        return self.scale * (a @ g @ b)

    def extra_repr(self) -> str:
        """Shapes for ``print(model)``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.G.shape[0]}, scale={self.scale}"
        )


def _initial_factors(
    out_f: int, in_f: int, rank: int, init: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (out x r) and ``B`` (r x in), float32 on the CPU."""
    if init == "orthogonal":
        qa, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=generator))
        qb, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=generator))
        return qa, qb.T.contiguous()
    # LoRA-like: x B^T has entries of unit scale, A maps r of them to unit scale
    b = torch.randn(rank, in_f, generator=generator) / in_f**0.5
    a = torch.randn(out_f, rank, generator=generator) / rank**0.5
    return a, b


def prepare(model: nn.Module, cfg: LoTRConfig, need_weights: bool = True) -> Prepared:
    """Validate every target of ``cfg`` in ``model`` and plan LoTR, changing nothing."""
    check_fresh(model)
    kinds: dict[str, list[tuple[str, nn.Module]]] = {}
    targets = []
    for name in find_targets(model, cfg.target_modules):
        module = model.get_submodule(name)
        check_linear(name, module, "LoTR", need_weights)
        targets.append((name, module))
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((name, module))
    r = cfg.rank
    shapes: dict[str, tuple[int, int]] = {}
    for kind, items in kinds.items():
        found = {(int(m.out_features), int(m.in_features)) for _, m in items}
        if len(found) > 1:
            listed = ", ".join(f"{n}: {m.out_features}x{m.in_features}" for n, m in items)
            raise ConfigError(
                f"LoTR shares A and B among the layers of one kind, so every {kind!r} target "
                f"must have one shape; got {listed}. Narrow `target_modules`"
            )
        kinds_of = {(m.weight.dtype, m.weight.device) for _, m in items}
        if len(kinds_of) > 1:
            raise ConfigError(
                f"every {kind!r} target must have one dtype and device (they share factors); "
                f"got {sorted(str(k) for k in kinds_of)}"
            )
        shapes[kind] = found.pop()
        if cfg.init == "orthogonal" and r > min(shapes[kind]):
            raise ConfigError(
                f"`rank` must be <= min(out_features, in_features) = {min(shapes[kind])} "
                f"for init='orthogonal' (the {kind!r} layers are "
                f"{shapes[kind][0]}x{shapes[kind][1]}); got {r}"
            )
    tensor_shapes: dict[str, tuple[int, ...]] = {}
    for kind, (out_f, in_f) in shapes.items():
        tensor_shapes[f"{CONTAINER}.{kind}.A"] = (out_f, r)
        tensor_shapes[f"{CONTAINER}.{kind}.B"] = (r, in_f)
    for name, _ in targets:
        tensor_shapes[f"{name}.G"] = (r, r)
    layers = tuple(
        LayerReport(name, int(m.out_features), int(m.in_features), (int(m.out_features),),
                    (int(m.in_features),), (r,), r * r)
        for name, m in targets
    )
    num_params = sum(
        lotr_num_params({kind: shapes[kind]}, len(items), r) for kind, items in kinds.items()
    )

    def build(fingerprints: Any) -> tuple[nn.Module, dict[str, AdditiveLinear]]:
        factors = nn.ModuleDict()
        layers_out: dict[str, AdditiveLinear] = {}
        for index, (kind, items) in enumerate(kinds.items()):
            ref = items[0][1].weight
            gen = None
            if cfg.seed is not None:
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
            a, b = _initial_factors(*shapes[kind], r, cfg.init, gen)
            factors[kind] = LoTRFactors(
                a.to(device=ref.device, dtype=ref.dtype), b.to(device=ref.device, dtype=ref.dtype)
            )
            for name, module in items:
                core = torch.zeros(r, r, device=ref.device, dtype=ref.dtype)
                layers_out[name] = LoTRLinear(module, factors[kind], core, cfg.scale)
        return factors, layers_out

    shared = num_params - r * r * len(targets)
    return Prepared("lotr", CONTAINER, targets, tensor_shapes, layers, num_params, build,
                    {"shared_params": shared})


def plan_lotr(
    model: nn.Module, config: LoTRConfig | None = None, **overrides: Any
) -> AdapterReport:
    """Report what :func:`apply_lotr` would do, without weights and without changes.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    ...                   num_attention_heads=32, vocab_size=32000)
    >>> with torch.device("meta"):
    ...     llama2 = LlamaForCausalLM(cfg)
    >>> report = plan_lotr(llama2)          # r = 16 on q, k, v, up, down
    >>> report.trainable_params, f"{100 * report.trainable_share:.4f}%"
    (917504, '0.0136%')
    """
    cfg = resolve_config(config, LoTRConfig, overrides)
    return report(model, prepare(model, cfg, need_weights=False), cfg, planned=True)


def apply_lotr(
    model: nn.Module, config: LoTRConfig | None = None, *, progress: bool = False, **overrides: Any
) -> AdapterReport:
    """Add LoTR adapters to the target linear layers of ``model``, in place.

    Every target keeps its weight; it is wrapped in a :class:`LoTRLinear` adding
    ``s A G_l B``. Only the factors train (``A``, ``B`` per kind, ``G_l`` per layer);
    everything else is frozen. ``G_l = 0`` at start, so the outputs are unchanged.

    Parameters
    ----------
    model : nn.Module
        A model with ``nn.Linear`` targets, e.g. a transformers LLaMA.
    config : LoTRConfig, optional
        Default: q, k, v, up, down projections, ``r = 16``, ``s = 1``, normal init.
    progress : bool
        Show a progress bar while fingerprinting the base weights.
    **overrides
        Fields of :class:`LoTRConfig` to change (``rank=8``, ``init="orthogonal"``, ...).

    Returns
    -------
    AdapterReport
        One entry per layer (its ``G``); ``trainable_params`` includes the shared pairs.

    Raises
    ------
    ConfigError
        A bad config value, no matching target, a target that is not ``nn.Linear``,
        layers of one kind with different shapes, a model that already has adapters.
        The model is left untouched.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama, apply_lotr
    >>> model = tiny_llama()
    >>> report = apply_lotr(model, rank=4)
    >>> report.method, len(report.layers), report.trainable_params
    ('lotr', 10, 2976)
    >>> sorted(model.tensornet_lotr)
    ['down_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj']
    """
    cfg = resolve_config(config, LoTRConfig, overrides)
    prep = prepare(model, cfg, need_weights=True)
    return install(model, prep, cfg, progress=progress)
