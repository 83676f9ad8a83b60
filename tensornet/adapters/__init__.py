"""Torch adapters built on the tensornet core: DoTA, DoTA-Random and QDoTA.

Usage mirrors peft::

    report = tensornet.adapters.apply_dota(model)      # N=5, R=16 on q,k,v,up,down
    ...                                                # train the cores
    tensornet.adapters.save_adapter(model, "out/")
    tensornet.adapters.load_adapter(fresh_model, "out/")
    tensornet.adapters.merge(model)                    # plain nn.Linear layers
"""

from .apply import apply_dota, load_adapter, merge, plan_dota, save_adapter, unapply
from .base import AdapterReport, LayerReport
from .config import LLAMA_TARGETS, DoTAConfig
from .dota import DoTALinear, random_cores
from .models import DEFAULT_MODEL, load_pretrained, tiny_llama

__all__ = [
    "DEFAULT_MODEL",
    "LLAMA_TARGETS",
    "AdapterReport",
    "DoTAConfig",
    "DoTALinear",
    "LayerReport",
    "apply_dota",
    "load_adapter",
    "load_pretrained",
    "merge",
    "plan_dota",
    "random_cores",
    "save_adapter",
    "tiny_llama",
    "unapply",
]
