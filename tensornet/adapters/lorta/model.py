"""LoRTA's peft tuner: the model's attention sizes, the CP factors, each projection's place."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..base import LayerReport
from ..config import TensornetConfig
from ..shared_state import SharedStateTuner
from ..tuner import Target
from .config import FACTORS, LoRTAConfig, factor_shapes, lorta_num_params
from .layer import LoRTAIndex, LoRTALayer, LoRTALinear

__all__ = ["LoRTAModel"]

_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.\w+\.(q_proj|k_proj|v_proj|o_proj)$")


class LoRTAModel(SharedStateTuner):
    """peft tuner of LoRTA (``PeftType.LORTA``).

    Built by ``peft.get_peft_model(model, LoRTAConfig(...))`` on a transformers
    LLaMA-style model: it reads ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim`` and ``num_hidden_layers`` from ``model.config``
    and the layer index from each projection's name
    (``model.layers.<l>.self_attn.<q|k|v|o>_proj``). The CP factors are the tuner's:
    ``lorta_A[adapter]``, ``lorta_B[adapter]``, ... (saved as ``base_model.lorta_A``, ...);
    the layers own no parameters.
    """

    prefix: str = "lorta_"
    tuner_layer_cls = LoRTALayer
    target_module_mapping: dict[str, list[str]] = {}
    shared_containers = {f"lorta_{name}": nn.ParameterDict for name in FACTORS}

    @classmethod
    def validate(cls, model: nn.Module, config: TensornetConfig, **kwargs: Any) -> list[Target]:
        """The model's attention sizes first (``model.config``), then every target."""
        _dims(model)
        return super().validate(model, config, **kwargs)

    @classmethod
    def check_targets(cls, model: nn.Module, targets: list[Target], config: LoRTAConfig) -> None:
        """Each projection's layer and shape against ``model.config``; one dtype and device."""
        d = _dims(model)
        expected = {
            "q_proj": (d["heads"] * d["d_head"], d["d_model"]),
            "k_proj": (d["kv_heads"] * d["d_head"], d["d_model"]),
            "v_proj": (d["kv_heads"] * d["d_head"], d["d_model"]),
            "o_proj": (d["d_model"], d["heads"] * d["d_head"]),
        }
        for t in targets:
            hit = _NAME.search(t.key)
            if hit is None:
                raise ConfigError(
                    f"target {t.key!r} is not an attention projection named like "
                    f"'model.layers.<l>.self_attn.<proj>' (LoRTA reads the layer index <l> from "
                    f"the name)"
                )
            layer, proj = int(hit.group(1)), hit.group(2)
            shape = tuple(t.record["shape"])
            if layer >= d["layers"] or shape != expected[proj]:
                raise ConfigError(
                    f"target {t.key!r} ({shape[0]}x{shape[1]}) does not fit `model.config` "
                    f"(hidden_size={d['d_model']}, num_attention_heads={d['heads']}, "
                    f"num_key_value_heads={d['kv_heads']}, head_dim={d['d_head']}, "
                    f"num_hidden_layers={d['layers']}): expected {expected[proj][0]}x"
                    f"{expected[proj][1]} in a layer below {d['layers']}"
                )
            t.record["lorta"] = {"layer": layer, "proj": proj, **d}
        found = {(t.module.weight.dtype, t.module.weight.device) for t in targets}
        if len(found) > 1:
            raise ConfigError(
                f"every LoRTA target must have one dtype and device (they share the factors); "
                f"got {sorted(str(k) for k in found)}"
            )

    @classmethod
    def count(cls, model: nn.Module, targets: list[Target], config: LoRTAConfig) -> tuple:
        """One report per projection (all parameters are shared: 0 each); the factors' total."""
        r = config.rank
        records = [t.record["lorta"] for t in targets]
        d = records[0]
        gqa = "C_kv_head" in factor_shapes(records, r, len(config.target_modules))
        total = lorta_num_params(
            d["d_model"], d["d_head"], d["heads"], d["kv_heads"] if gqa else d["heads"],
            d["layers"], r, num_matrices=len(config.target_modules),
        )
        layers = tuple(
            LayerReport(t.key, *t.record["shape"], (t.record["shape"][0],),
                        (t.record["shape"][1],), (r,), 0)
            for t in targets
        )
        dims = {k: v for k, v in d.items() if k not in ("layer", "proj")}
        return layers, total, {"shared_params": total, "gqa": gqa, **dims}

    def build_layer(self, config: LoRTAConfig, adapter_name: str, target: nn.Module,
                    key: str) -> LoRTALinear | None:
        """The LoRTA layer of ``target`` (or the adapter added to it); factors made once."""
        if adapter_name not in self.lorta_A:
            self._build_factors(config, adapter_name)
        rec = self._targets[key].record["lorta"]
        proj = rec["proj"]
        kv = proj in ("k_proj", "v_proj")
        index = LoRTAIndex(
            matrix=config.target_modules.index(proj),
            layer=rec["layer"],
            head_factor="C_kv_head" if kv and adapter_name in self.lorta_C_kv_head else "C_head",
            num_heads=rec["kv_heads"] if kv else rec["heads"],
            head_dim=rec["d_head"],
            heads_on_output=proj != "o_proj",
            scale=config.scale,
        )
        if isinstance(target, LoRTALinear):
            target.update_layer(adapter_name, config, index)
            return None
        return LoRTALinear(target, adapter_name, self._factors(), config, index)

    def _factors(self) -> dict[str, nn.ParameterDict]:
        return {name: getattr(self, f"lorta_{name}") for name in FACTORS}

    def _build_factors(self, config: LoRTAConfig, adapter_name: str) -> None:
        """The CP factors of the adapter: drawn (``B = 0``), or placeholders to be loaded."""
        targets = list(self._targets.values())
        shapes = factor_shapes([t.record["lorta"] for t in targets], config.rank,
                               len(config.target_modules))
        weight = targets[0].module.weight
        gen = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        values = {}
        for name, shape in shapes.items():
            if self._placeholders or name == "B":
                values[name] = torch.zeros(shape)
            else:
                std = shape[0] ** -0.5 if name == "A" else 1.0
                values[name] = torch.randn(shape, generator=gen) * std
        if not config.init_weights and not self._placeholders:  # away from the identity
            values["B"] = torch.randn(shapes["B"], generator=gen) * config.rank**-0.5
        factors = self._factors()
        for name, value in values.items():
            factors[name][adapter_name] = nn.Parameter(
                value.to(device=weight.device, dtype=weight.dtype)
            )


def _dims(model: nn.Module) -> dict[str, int]:
    """The attention sizes LoRTA needs, from ``model.config``."""
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
