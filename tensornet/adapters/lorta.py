"""LoRTA (Hounie et al., 2024): one CP decomposition of every attention update.

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
(:func:`tensornet.lorta_num_params`).

Initialization: ``B = 0`` (the model is unchanged at start); ``A`` Gaussian of variance
``1 / d_model``; ``C_head``, ``C_kv_head``, ``C_matrix``, ``C_layer`` standard Gaussian
(random, so that heads, matrices and layers differ from the first step on). With
``B = 0`` only ``B`` receives a nonzero gradient at the first step; the other factors
follow from the second.

The factors live in ``model.tensornet_lorta``; the adapted layers only reference them. The
forward pass contracts through the factors (rank-sized and head-by-rank intermediates),
never forming a dense update.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..params import lorta_num_params
from .base import AdapterReport, LayerReport
from .config import LoRTAConfig
from .shared import (
    AdditiveLinear,
    Prepared,
    check_fresh,
    check_linear,
    install,
    report,
    resolve_config,
)

__all__ = ["LoRTAConfig", "LoRTAFactors", "LoRTALinear", "apply_lorta", "plan_lorta"]

#: Attribute of the model holding the factors.
CONTAINER = "tensornet_lorta"
_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$")


class LoRTAFactors(nn.Module):
    """The CP factors shared by every adapted attention projection of the model.

    Attributes
    ----------
    A : (d_model, r)
    B : (r, d_head), zero at initialization
    C_head : (H, r)
    C_kv_head : (H_kv, r), only with grouped-query attention and K or V adapted
    C_matrix : (M, r), one row per adapted projection kind, in the config's order
    C_layer : (L, r)
    """

    def __init__(self, **factors: torch.Tensor) -> None:
        super().__init__()
        for name, value in factors.items():
            self.register_parameter(name, nn.Parameter(value))

    def extra_repr(self) -> str:
        """Shapes for ``print(model)``."""
        return ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters())


class LoRTALinear(AdditiveLinear):
    """One attention projection plus its LoRTA update (see the module docstring).

    Attributes
    ----------
    base_layer : nn.Linear
        The pretrained projection (frozen, unchanged).
    matrix_index, layer_index : int
        Rows of ``C_matrix`` and ``C_layer`` this projection uses.
    head_factor : str
        ``"C_head"`` or ``"C_kv_head"``.
    heads_on_output : bool
        True for Q, K, V (heads along ``out_features``), False for O.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        factors: LoRTAFactors,
        scale: float,
        *,
        matrix_index: int,
        layer_index: int,
        head_factor: str,
        num_heads: int,
        head_dim: int,
        heads_on_output: bool,
    ) -> None:
        super().__init__(base_layer, factors, scale)
        self.matrix_index = matrix_index
        self.layer_index = layer_index
        self.head_factor = head_factor
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.heads_on_output = heads_on_output

    def coefficients(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s * C_head[h] * C_matrix[m] * C_layer[l]`` for every head ``h``: ``(heads, r)``."""
        f = self.shared
        heads = getattr(f, self.head_factor)
        c = heads * (f.C_matrix[self.matrix_index] * f.C_layer[self.layer_index])
        c = c * self.scale
        return c if dtype is None else c.to(dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update applied to ``x``, contracted through the factors."""
        f = self.shared
        x = x.to(f.A.dtype)
        c = self.coefficients()
        if self.heads_on_output:  # q, k, v: head h gets (x A) diag(c_h) B
            u = x @ f.A
            return ((u.unsqueeze(-2) * c) @ f.B).flatten(-2)
        # o: sum over heads of x_h B^T diag(c_h) A^T
        w = x.unflatten(-1, (self.num_heads, self.head_dim)) @ f.B.T
        return (w * c).sum(-2) @ f.A.T

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``(out, in)`` update computed in ``dtype``."""
        f = self.shared
        a, b = f.A.detach().to(dtype), f.B.detach().to(dtype)
        c = self.coefficients().detach().to(dtype)
        if self.heads_on_output:
            return torch.einsum("ir,hr,rd->hdi", a, c, b).reshape(self.out_features, -1)
        return torch.einsum("ir,hr,rd->ihd", a, c, b).reshape(self.out_features, -1)

    def extra_repr(self) -> str:
        """Indices for ``print(model)``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"matrix={self.matrix_index}, layer={self.layer_index}, heads={self.num_heads} "
            f"({self.head_factor}), scale={self.scale}"
        )


def _dims(model: nn.Module) -> dict[str, int]:
    mc = getattr(model, "config", None)
    fields = ("hidden_size", "num_attention_heads", "num_hidden_layers")
    if mc is None or any(getattr(mc, k, None) is None for k in fields):
        raise ConfigError(
            "LoRTA reads hidden_size, num_attention_heads, num_hidden_layers (and "
            "num_key_value_heads, head_dim) from `model.config`; `model` has no such config"
        )
    heads = int(mc.num_attention_heads)
    kv = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
    return {
        "d_model": int(mc.hidden_size),
        "d_head": int(head_dim),
        "heads": heads,
        "kv_heads": int(kv),
        "layers": int(mc.num_hidden_layers),
    }


def prepare(model: nn.Module, cfg: LoRTAConfig, need_weights: bool = True) -> Prepared:
    """Validate the attention projections of ``model`` and plan LoRTA, changing nothing."""
    check_fresh(model)
    d = _dims(model)
    gqa = d["kv_heads"] != d["heads"] and any(t in cfg.target_modules for t in ("k_proj", "v_proj"))
    expected = {
        "q_proj": (d["heads"] * d["d_head"], d["d_model"]),
        "k_proj": (d["kv_heads"] * d["d_head"], d["d_model"]),
        "v_proj": (d["kv_heads"] * d["d_head"], d["d_model"]),
        "o_proj": (d["d_model"], d["heads"] * d["d_head"]),
    }
    targets, info = [], {}
    for name, module in model.named_modules():
        hit = _NAME.search(name)
        if hit is None or hit.group(2) not in cfg.target_modules:
            continue
        layer, proj = int(hit.group(1)), hit.group(2)
        check_linear(name, module, "LoRTA", need_weights)
        shape = (int(module.out_features), int(module.in_features))
        if layer >= d["layers"] or shape != expected[proj]:
            raise ConfigError(
                f"target {name!r} ({shape[0]}x{shape[1]}) does not fit `model.config` "
                f"(hidden_size={d['d_model']}, num_attention_heads={d['heads']}, "
                f"num_key_value_heads={d['kv_heads']}, head_dim={d['d_head']}, "
                f"num_hidden_layers={d['layers']}): expected {expected[proj][0]}x"
                f"{expected[proj][1]} in a layer below {d['layers']}"
            )
        targets.append((name, module))
        info[name] = (layer, proj)
    if not targets:
        raise ConfigError(
            f"LoRTA found no attention projection named like "
            f"'model.layers.<l>.self_attn.<proj>' with <proj> in `target_modules` "
            f"{list(cfg.target_modules)}"
        )
    found = {(m.weight.dtype, m.weight.device) for _, m in targets}
    if len(found) > 1:
        raise ConfigError(
            f"every LoRTA target must have one dtype and device (they share the factors); "
            f"got {sorted(str(k) for k in found)}"
        )
    r = cfg.rank
    shapes = {
        "A": (d["d_model"], r),
        "B": (r, d["d_head"]),
        "C_head": (d["heads"], r),
        **({"C_kv_head": (d["kv_heads"], r)} if gqa else {}),
        "C_matrix": (len(cfg.target_modules), r),
        "C_layer": (d["layers"], r),
    }
    num_params = lorta_num_params(
        d["d_model"], d["d_head"], d["heads"], d["kv_heads"] if gqa else d["heads"],
        d["layers"], r, num_matrices=len(cfg.target_modules),
    )
    layers = tuple(
        LayerReport(name, int(m.out_features), int(m.in_features), (int(m.out_features),),
                    (int(m.in_features),), (r,), 0)
        for name, m in targets
    )

    def build(fingerprints: Any) -> tuple[nn.Module, dict[str, AdditiveLinear]]:
        ref = targets[0][1].weight
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        values = {}
        for key, shape in shapes.items():
            if key == "B":
                values[key] = torch.zeros(shape)
            else:
                std = d["d_model"] ** -0.5 if key == "A" else 1.0
                values[key] = torch.randn(shape, generator=gen) * std
        factors = LoRTAFactors(
            **{k: v.to(device=ref.device, dtype=ref.dtype) for k, v in values.items()}
        )
        out = {}
        for name, module in targets:
            layer, proj = info[name]
            kv = proj in ("k_proj", "v_proj")
            out[name] = LoRTALinear(
                module,
                factors,
                cfg.scale,
                matrix_index=cfg.target_modules.index(proj),
                layer_index=layer,
                head_factor="C_kv_head" if kv and gqa else "C_head",
                num_heads=d["kv_heads"] if kv else d["heads"],
                head_dim=d["d_head"],
                heads_on_output=proj != "o_proj",
            )
        return factors, out

    tensor_shapes = {f"{CONTAINER}.{k}": v for k, v in shapes.items()}
    extra = {"shared_params": num_params, "gqa": gqa, **d}
    return Prepared("lorta", CONTAINER, targets, tensor_shapes, layers, num_params, build, extra)


def plan_lorta(
    model: nn.Module, config: LoRTAConfig | None = None, **overrides: Any
) -> AdapterReport:
    """Report what :func:`apply_lorta` would do, without weights and without changes.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    ...                   num_attention_heads=32, vocab_size=32000)
    >>> with torch.device("meta"):
    ...     llama2 = LlamaForCausalLM(cfg)
    >>> plan_lorta(llama2).trainable_params        # r = 16: 16 (4096 + 128 + 32 + 4 + 32)
    68672
    """
    cfg = resolve_config(config, LoRTAConfig, overrides)
    return report(model, prepare(model, cfg, need_weights=False), cfg, planned=True)


def apply_lorta(
    model: nn.Module, config: LoRTAConfig | None = None, *, progress: bool = False,
    **overrides: Any,
) -> AdapterReport:
    """Add LoRTA adapters to the attention projections of ``model``, in place.

    Reads ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``
    and ``num_hidden_layers`` from ``model.config`` and the layer index from each module
    name (``model.layers.<l>.self_attn.<q|k|v|o>_proj``). The base weights are not
    modified; only the CP factors train, and ``B = 0`` keeps the outputs unchanged at start.

    Parameters
    ----------
    model : nn.Module
        A transformers LLaMA-style model (``model.config`` and the module names above).
    config : LoRTAConfig, optional
        Default: q, k, v, o; ``r = 16``; ``scale = 1``.
    progress : bool
        Show a progress bar while fingerprinting the base weights.
    **overrides
        Fields of :class:`LoRTAConfig` to change.

    Returns
    -------
    AdapterReport
        One entry per projection (all parameters are shared: ``num_params`` 0 each);
        ``trainable_params`` is the factors' total.

    Raises
    ------
    ConfigError
        A bad config value, a model without the config fields or projections, a
        projection whose shape does not fit the config, a model that already has
        adapters. The model is left untouched.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama, apply_lorta
    >>> model = tiny_llama()               # 4 heads, 2 key/value heads: C_kv_head is used
    >>> report = apply_lorta(model, rank=4)
    >>> report.method, len(report.layers), report.trainable_params
    ('lorta', 8, 368)
    """
    cfg = resolve_config(config, LoRTAConfig, overrides)
    prep = prepare(model, cfg, need_weights=True)
    return install(model, prep, cfg, progress=progress)
