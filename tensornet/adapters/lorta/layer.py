"""LoRTA's layer: one attention projection's slice of a CP tensor of all attention updates.

All attention updates of the model form one 5-way tensor indexed by (d_model, d_head,
head, matrix in {Q, K, V, O}, layer). LoRTA gives it rank ``r`` in CP form, with factors
``A`` (d_model x r), ``B`` (r x d_head), ``C_head`` (H x r), ``C_matrix`` (M x r) and
``C_layer`` (L x r). The ``(d_model, d_head)`` block of head ``h`` of matrix ``m`` in
layer ``l`` is::

    s * A @ diag(C_head[h] * C_matrix[m] * C_layer[l]) @ B

and a matrix's update places its heads' blocks side by side along the head dimension.
In PyTorch's ``(out, in)`` layout the head dimension is on the output side for Q, K and V
(``W_q`` is ``(H d_head, d_model)``: head ``h`` owns rows ``h d_head .. (h+1) d_head`` and
its block there is the transpose, ``B^T diag(c) A^T``), and on the input side for O
(``W_o`` is ``(d_model, H d_head)``: head ``h`` owns those columns, block ``A diag(c) B``).

Grouped-query attention
-----------------------
With fewer key/value heads than query heads (``H_kv < H``: LLaMA-3, SmolLM2), K and V
have ``H_kv`` head blocks, not ``H``. tensornet gives K and V their own head factor
``C_kv_head`` (H_kv x r); Q and O use ``C_head``. The tensor is then two CP tensors that
share ``A``, ``B``, ``C_matrix`` and ``C_layer`` (K/V head ``j`` is not tied to any query
head, as the model itself does not tie them). Trainable parameters:
``r (d_model + d_head + H + H_kv + M + L)``; with ``H_kv == H`` K and V use ``C_head`` and the
count is the paper's ``r (d_model + d_head + H + 4 + L)``
(:func:`tensornet.adapters.lorta_num_params`).

Initialization: ``B = 0`` (the model is unchanged at start); ``A`` Gaussian of variance
``1 / d_model``; ``C_head``, ``C_kv_head``, ``C_matrix``, ``C_layer`` standard Gaussian
(random, so that heads, matrices and layers differ from the first step on). With
``B = 0`` only ``B`` receives a nonzero gradient at the first step; the other factors
follow from the second.

The factors live on the tuner (:class:`~tensornet.adapters.lorta.LoRTAModel`); a layer
owns no parameters, only its position in the tensor (:class:`LoRTAIndex`, one per
adapter) and a plain-list reference to the factors. The forward pass contracts through
the factors (rank-sized and head-by-rank intermediates), never forming a dense update;
the base weights are not modified (except by ``merge``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..._compat.peft import LayerHooks
from ..layer import AdditiveLinear

__all__ = ["LoRTAIndex", "LoRTALayer", "LoRTALinear"]


class LoRTAIndex(nn.Module):
    """Where one projection sits in an adapter's CP tensor (no parameters).

    Attributes
    ----------
    matrix, layer : int
        Rows of ``C_matrix`` and ``C_layer`` the projection uses.
    head_factor : str
        ``"C_head"`` or ``"C_kv_head"``.
    num_heads, head_dim : int
        Head blocks of the projection and their width ``d_head``.
    heads_on_output : bool
        True for Q, K, V (heads along ``out_features``), False for O.
    scale : float
        Multiplies the update.
    """

    def __init__(self, *, matrix: int, layer: int, head_factor: str, num_heads: int,
                 head_dim: int, heads_on_output: bool, scale: float) -> None:
        super().__init__()
        self.matrix = int(matrix)
        self.layer = int(layer)
        self.head_factor = head_factor
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.heads_on_output = bool(heads_on_output)
        self.scale = float(scale)

    def extra_repr(self) -> str:
        """Indices for ``print(model)``."""
        return (
            f"matrix={self.matrix}, layer={self.layer}, heads={self.num_heads} "
            f"({self.head_factor}), scale={self.scale}"
        )


class LoRTALayer(LayerHooks):
    """peft tuner-layer state of LoRTA: per adapter, the projection's :class:`LoRTAIndex`."""

    adapter_layer_names = ("lorta_index",)

    def __init__(self, base_layer: nn.Module, factors: Mapping[str, nn.ParameterDict],
                 **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.lorta_index = nn.ModuleDict({})
        #: factor name -> the tuner's container (a plain list: not registered here)
        self._lorta_factors = [dict(factors)]
        self.start_enabled()
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)

    def update_layer(self, adapter_name: str, config: Any, index: LoRTAIndex) -> None:
        """Add adapter ``adapter_name``: this projection at ``index`` of its CP tensor."""
        self.lorta_index[adapter_name] = index
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def factor(self, name: str, adapter: str) -> torch.Tensor:
        """The CP factor ``name`` (``"A"``, ``"B"``, ...) of ``adapter``."""
        return self._lorta_factors[0][name][adapter]

    def coefficients(self, adapter: str) -> torch.Tensor:
        """``s * C_head[h] * C_matrix[m] * C_layer[l]`` for every head ``h``: ``(heads, r)``."""
        idx = self.lorta_index[adapter]
        heads = self.factor(idx.head_factor, adapter)
        c = heads * (self.factor("C_matrix", adapter)[idx.matrix]
                     * self.factor("C_layer", adapter)[idx.layer])
        return c * idx.scale

    def delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The update applied to ``x`` (the factors' dtype), contracted through the factors."""
        idx = self.lorta_index[adapter]
        a, b = self.factor("A", adapter), self.factor("B", adapter)
        x = x.to(a.dtype)
        c = self.coefficients(adapter)
        if idx.heads_on_output:  # q, k, v: head h gets (x A) diag(c_h) B
            u = x @ a
            return ((u.unsqueeze(-2) * c) @ b).flatten(-2)
        # o: sum over heads of x_h B^T diag(c_h) A^T
        w = x.unflatten(-1, (idx.num_heads, idx.head_dim)) @ b.T
        return (w * c).sum(-2) @ a.T

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``(out, in)`` update computed in float32 (float64), in the base dtype."""
        idx = self.lorta_index[adapter]
        a = self.factor("A", adapter)
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        a, b = a.detach().to(dt), self.factor("B", adapter).detach().to(dt)
        c = self.coefficients(adapter).detach().to(dt)
        if idx.heads_on_output:
            delta = torch.einsum("ir,hr,rd->hdi", a, c, b).reshape(self.out_features, -1)
        else:
            delta = torch.einsum("ir,hr,rd->ihd", a, c, b).reshape(self.out_features, -1)
        return delta.to(self.get_base_layer().weight.dtype)


class LoRTALinear(AdditiveLinear, LoRTALayer):
    """An attention projection plus LoRTA adapters (built by peft through :class:`LoRTAModel`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        factors: Mapping[str, nn.ParameterDict],
        config: Any,
        index: LoRTAIndex,
    ) -> None:
        super().__init__()
        LoRTALayer.__init__(self, base_layer, factors)
        self.mark_active(adapter_name)
        self.update_layer(adapter_name, config, index)

    def __repr__(self) -> str:
        return "lorta." + super().__repr__()
