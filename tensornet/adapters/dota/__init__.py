"""DoTA, DoTA-Random and QDoTA (Hu et al., 2024): MPO cores of the pretrained weight.

One peft method, ``PeftType.DOTA``; tensornet's method table names its three variants.
"""

from .._registry import register
from .config import LLAMA_TARGETS, DoTAConfig
from .cores import chain_sum, random_cores
from .layer import DoTALayer, DoTALinear, release_scratch
from .model import DoTAModel

__all__ = [
    "LLAMA_TARGETS",
    "DoTAConfig",
    "DoTALayer",
    "DoTALinear",
    "DoTAModel",
    "chain_sum",
    "random_cores",
    "release_scratch",
]

register("dota", DoTAConfig, DoTAModel)  # dota, dota-random, qdota: tensornet.method_table
