"""LoTR (Bershatsky et al., 2024): low-rank updates whose outer factors are shared.

One peft method, ``PeftType.LOTR``: ``Delta W_l = s A G_l B`` with ``A``, ``B`` shared by
the layers of one kind (every ``q_proj``, ...) and a small core ``G_l`` per layer.
"""

from .._registry import register
from .config import LoTRConfig
from .layer import LoTRLayer, LoTRLinear
from .model import LoTRModel

__all__ = ["LoTRConfig", "LoTRLayer", "LoTRLinear", "LoTRModel"]

register("lotr", LoTRConfig, LoTRModel)
