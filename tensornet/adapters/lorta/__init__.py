"""LoRTA (Hounie et al., 2024): one CP decomposition of every attention update of a model.

One peft method, ``PeftType.LORTA``: the updates of the attention projections, indexed by
(d_model, d_head, head, matrix, layer), form one rank-``r`` CP tensor whose factors live on
the tuner; grouped-query attention gets a head factor of its own for K and V.
"""

from .._registry import register
from .config import ATTENTION_TARGETS, LoRTAConfig
from .layer import LoRTAIndex, LoRTALayer, LoRTALinear
from .model import LoRTAModel

__all__ = ["ATTENTION_TARGETS", "LoRTAConfig", "LoRTAIndex", "LoRTALayer", "LoRTALinear",
           "LoRTAModel"]

register("lorta", LoRTAConfig, LoRTAModel)
