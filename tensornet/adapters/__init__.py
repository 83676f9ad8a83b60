"""Torch adapters built on the tensornet core: DoTA, DoTA-Random, QDoTA, LoTR and LoRTA.

Usage mirrors peft::

    report = tensornet.adapters.apply_dota(model)      # N=5, R=16 on q,k,v,up,down
    ...                                                # train the cores
    tensornet.adapters.save_adapter(model, "out/")
    tensornet.adapters.load_adapter(fresh_model, "out/")
    tensornet.adapters.merge(model)                    # plain nn.Linear layers

``apply_lotr(model)`` and ``apply_lorta(model)`` take the place of ``apply_dota`` for
LoTR and LoRTA; merge / unapply / save_adapter / load_adapter serve all three.
"""

from .apply import apply_dota, load_adapter, merge, plan_dota, save_adapter, unapply
from .base import AdapterReport, LayerReport
from .config import ATTENTION_TARGETS, LLAMA_TARGETS, DoTAConfig, LoRTAConfig, LoTRConfig
from .dota import DoTALinear, random_cores
from .lorta import LoRTAFactors, LoRTALinear, apply_lorta, plan_lorta
from .lotr import LoTRFactors, LoTRLinear, apply_lotr, plan_lotr
from .models import DEFAULT_MODEL, load_pretrained, tiny_llama

__all__ = [
    "ATTENTION_TARGETS",
    "DEFAULT_MODEL",
    "LLAMA_TARGETS",
    "AdapterReport",
    "DoTAConfig",
    "DoTALinear",
    "LayerReport",
    "LoRTAConfig",
    "LoRTAFactors",
    "LoRTALinear",
    "LoTRConfig",
    "LoTRFactors",
    "LoTRLinear",
    "apply_dota",
    "apply_lorta",
    "apply_lotr",
    "load_adapter",
    "load_pretrained",
    "merge",
    "plan_dota",
    "plan_lorta",
    "plan_lotr",
    "random_cores",
    "save_adapter",
    "tiny_llama",
    "unapply",
]
