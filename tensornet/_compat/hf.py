"""transformers: dropping a quantization config after dequantizing a GGUF model."""

from __future__ import annotations

from typing import Any

__all__ = ["drop_quantization_config"]


def drop_quantization_config(model: Any) -> None:
    """Forget that ``model`` was loaded through a quantizer (its weights are dense now).

    ``save_pretrained`` refuses a model that still carries ``hf_quantizer`` or
    ``config.quantization_config``. transformers' quantizer offers
    ``remove_quantization_config`` (not part of its documented API); older releases had
    no quantizer on GGUF models, where the config entry is removed by hand.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
        model.is_quantized = False
