"""The main job's defaults in one place: methods, options, ranks, targets, learning rates.

The methods, the options each reads, the ranks, the targets, the default model and the
DoTA paper's learning rates.

No heavy imports: the command line reads this module to build its parser and to check
its arguments before torch is loaded. The tensornet methods in :data:`METHODS` are the
peft methods registered in :data:`tensornet.adapters.METHODS`, and
:data:`DEFAULT_TARGETS` is :data:`tensornet.adapters.LLAMA_TARGETS` (a test keeps both
equal; importing those here would import torch and peft).
"""

from __future__ import annotations

__all__ = [
    "METHODS",
    "BASELINES",
    "DEFAULT_LR",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_TARGETS",
    "DEFAULT_OPTIONS",
    "METHOD_OPTIONS",
]

#: The baselines that are not tensornet's peft methods: peft's LoRA family and full
#: fine-tuning (every other name of :data:`METHODS` is in ``tensornet.adapters.METHODS``).
BASELINES: tuple[str, ...] = ("lora", "dora", "pissa", "qpissa", "qlora", "full")

METHODS: tuple[str, ...] = ("dota", "dota-random", "qdota", "lotr", "lorta", *BASELINES)

#: Learning rates of the DoTA paper, appendix B (math for DoTA, LoRA, PiSSA and full
#: fine-tuning; the quantization settings for QDoTA, QLoRA and QPiSSA). LoTR and LoRTA
#: are not in that paper: they get LoRA's rate; tune them with --lr. DoRA is in the
#: paper's tables only with the DoRA paper's own numbers (commonsense reasoning, its
#: own recipe with alpha = 2r and dropout), and appendix B gives it no rate; it is LoRA
#: with a trained magnitude vector over the same rank-r update, so it gets LoRA's rate
#: in our math setting, 3e-4.
DEFAULT_LR: dict[str, float] = {
    "dota": 3e-4,
    "dota-random": 3e-4,
    "qdota": 1e-4,
    "lotr": 3e-4,
    "lorta": 3e-4,
    "lora": 3e-4,
    "dora": 3e-4,
    "pissa": 1e-4,
    "qpissa": 1e-4,
    "qlora": 1e-5,
    "full": 1e-5,
}

#: The built-in offline model (:data:`tensornet.adapters.DEFAULT_MODEL`).
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

#: The paper's targets on LLaMA: q_proj, k_proj, v_proj, up_proj and down_proj.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

#: The method options and their defaults (the paper's): the tensor adapters' rank (DoTA's
#: bond cap R, LoTR's and LoRTA's r), DoTA's number of cores N, the rank of LoRA, DoRA,
#: QLoRA and QPiSSA (r = 32, alpha = r; QPiSSA has QLoRA's parameter share in the paper's
#: Figure 5) and PiSSA's (r = 16), and the layers to adapt.
DEFAULT_OPTIONS: dict[str, object] = {
    "rank": 16,
    "num_cores": 5,
    "lora_rank": 32,
    "pissa_rank": 16,
    "targets": DEFAULT_TARGETS,
}

_DOTA = ("rank", "num_cores", "targets")
_LORA = ("lora_rank", "targets")

#: The options of :data:`DEFAULT_OPTIONS` each method reads; the command line refuses an
#: option that none of the chosen methods reads (LoRTA adapts q, k, v and o, whatever
#: ``--targets`` says; full fine-tuning reads none).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "dota": _DOTA,
    "dota-random": _DOTA,
    "qdota": _DOTA,
    "lotr": ("rank", "targets"),
    "lorta": ("rank",),
    "lora": _LORA,
    "dora": _LORA,
    "pissa": ("pissa_rank", "targets"),
    "qpissa": _LORA,
    "qlora": _LORA,
    "full": (),
}
