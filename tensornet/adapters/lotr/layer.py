"""LoTR's layer: ``y = base(x) + s ((x B^T) G_l^T) A^T`` with a shared pair ``A``, ``B``.

For one kind of matrix (every ``q_proj`` of the model, say) in layers ``l = 1..L``::

    Delta W_l = s * A @ G_l @ B        A: (out, r)   G_l: (r, r)   B: (r, in)

``A`` and ``B`` are shared by the ``L`` layers of the kind (a Tucker-2 tensor of shape
``(L, out, in)``), ``G_l`` belongs to layer ``l``. In PyTorch's ``(out, in)`` layout the
paper's ``I`` is ``out_features`` and ``J`` is ``in_features``.

Each layer holds its cores ``G_l`` (``lotr_G``, one per adapter); the pairs live on the
tuner (:class:`~tensornet.adapters.lotr.LoTRModel`), which the layer reaches through a
plain list so that they are registered once. The base weight is not modified (except by
``merge``), and the forward pass contracts through the factors, never forming
``Delta W``: autograd keeps only rank-sized intermediates besides ``x``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..._compat.peft import LayerHooks
from ..layer import AdditiveLinear

__all__ = ["LoTRLayer", "LoTRLinear"]


class LoTRLayer(LayerHooks):
    """peft tuner-layer state of LoTR: per adapter, the layer's core ``G`` and its kind."""

    adapter_layer_names = ("lotr_G",)
    other_param_names = ("lotr_kind", "lotr_scale")

    def __init__(self, base_layer: nn.Module, shared: tuple[nn.ModuleDict, nn.ModuleDict],
                 **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.lotr_G = nn.ParameterDict({})
        self.lotr_kind: dict[str, str] = {}
        self.lotr_scale: dict[str, float] = {}
        #: the tuner's ``lotr_A`` and ``lotr_B`` (a plain list: not registered here)
        self._lotr_shared = list(shared)
        self.start_enabled()
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)

    def update_layer(self, adapter_name: str, config: Any, kind: str, core: torch.Tensor) -> None:
        """Add adapter ``adapter_name``: this layer's core ``core`` in the pair of ``kind``."""
        weight = self.get_base_layer().weight
        self.lotr_G[adapter_name] = nn.Parameter(core.to(weight.device))
        self.lotr_kind[adapter_name] = kind
        self.lotr_scale[adapter_name] = float(config.scale)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, G, B)`` of ``adapter`` for this layer."""
        kind = self.lotr_kind[adapter]
        a, b = (container[adapter][kind] for container in self._lotr_shared)
        return a, self.lotr_G[adapter], b

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s A G B`` (``(out, in)``) computed in float32 (float64), in the base dtype."""
        a, g, b = self.factors(adapter)
        dt = torch.float64 if g.dtype == torch.float64 else torch.float32
        a, g, b = (t.detach().to(dt) for t in (a, g, b))
        delta = self.lotr_scale[adapter] * (a @ g @ b)
        return delta.to(self.get_base_layer().weight.dtype)

    def delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """``s ((x B^T) G^T) A^T`` through rank-sized intermediates (the factors' dtype)."""
        a, g, b = self.factors(adapter)
        h = F.linear(x.to(g.dtype), b)
        h = F.linear(h, g) * self.lotr_scale[adapter]
        return F.linear(h, a)

    def move_to_base_device(self, adapter_name: str, device: Any = None) -> None:
        """As peft moves an adapter to the base layer's device; the cores keep their flags."""
        # peft re-wraps a moved ParameterDict entry as a new (trainable) Parameter
        flags = {k: p.requires_grad for k, p in self.lotr_G.items()}
        super().move_to_base_device(adapter_name, device=device)
        for k, flag in flags.items():
            self.lotr_G[k].requires_grad_(flag)


class LoTRLinear(AdditiveLinear, LoTRLayer):
    """A linear layer plus LoTR adapters (built by peft through :class:`LoTRModel`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        shared: tuple[nn.ModuleDict, nn.ModuleDict],
        config: Any,
        kind: str,
        core: torch.Tensor,
    ) -> None:
        super().__init__()
        LoTRLayer.__init__(self, base_layer, shared)
        self.mark_active(adapter_name)
        self.update_layer(adapter_name, config, kind, core)

    def __repr__(self) -> str:
        return "lotr." + super().__repr__()

    def extra_repr(self) -> str:
        """Kind, rank and scale of each adapter for ``print(model)``."""
        return "; ".join(
            f"{name}: kind={self.lotr_kind[name]!r}, rank={g.shape[0]}, "
            f"scale={self.lotr_scale[name]}"
            for name, g in self.lotr_G.items()
        )
