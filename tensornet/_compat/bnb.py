"""bitsandbytes: recognizing 4-bit layers, reading their weights, keeping one CPU kernel."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["is_4bit", "dequantize_4bit", "keep_one_cpu_kernel"]


def is_4bit(module: Any) -> bool:
    """True for a bitsandbytes 4-bit linear layer (``Linear4bit`` and its NF4/FP4 kinds).

    Without importing bitsandbytes: a 4-bit layer cannot exist before bitsandbytes is
    imported, so where it is not in ``sys.modules`` the answer is False.
    """
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def dequantize_4bit(weight: Any) -> Any:
    """The dense weight of a 4-bit ``Params4bit`` (in its quant state's dtype).

    bitsandbytes (>= 0.48) repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the
    first inference forward and marks the quant state ``packing_format_for_cpu``;
    ``dequantize_4bit`` reads only the canonical layout. The private
    ``functional._convert_weight_packed_for_cpu_inverse`` restores it, as bitsandbytes'
    own ``state_dict`` does. If it moves, this raises AttributeError (tests/test_compat.py
    catches that first); a silently wrong weight is not possible: the check is explicit.
    """
    import bitsandbytes.functional as bnbf

    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )
    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


def keep_one_cpu_kernel(layer: Any) -> None:
    """Stop a ``Linear4bit`` from repacking its weight for another CPU kernel at inference.

    bitsandbytes switches a CPU layer to an AVX512-BF16 kernel (repacking the weight) on
    its first forward without grad, whose results differ from the training path's; the
    instance attribute ``support_avx512bf16_for_cpu`` (read in ``Linear4bit.forward``)
    turns that off, so a layer gives the same outputs in train and eval mode and after a
    reload. If bitsandbytes renames it, the assignment is a no-op: tests/test_compat.py
    checks the attribute is still read.
    """
    layer.support_avx512bf16_for_cpu = False
