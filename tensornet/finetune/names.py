"""Method names and the DoTA paper's learning rates (no heavy imports: the CLI reads these)."""

from __future__ import annotations

__all__ = ["METHODS", "DEFAULT_LR", "DEFAULT_MODEL_NAME"]

METHODS: tuple[str, ...] = (
    "dota", "dota-random", "qdota", "lotr", "lorta", "lora", "pissa", "qlora", "full",
)

#: Learning rates of the DoTA paper, appendix B (math for DoTA, LoRA, PiSSA and full
#: fine-tuning; the quantization settings for QDoTA and QLoRA). LoTR and LoRTA are not in
#: that paper: they get LoRA's rate; tune them with --lr.
DEFAULT_LR: dict[str, float] = {
    "dota": 3e-4,
    "dota-random": 3e-4,
    "qdota": 1e-4,
    "lotr": 3e-4,
    "lorta": 3e-4,
    "lora": 3e-4,
    "pissa": 1e-4,
    "qlora": 1e-5,
    "full": 1e-5,
}

#: The built-in offline model (:data:`tensornet.adapters.DEFAULT_MODEL`).
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
