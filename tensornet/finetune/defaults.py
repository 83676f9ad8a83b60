"""The main job's defaults, read from :mod:`tensornet.method_table`.

The names the command line, the Trainer glue and the docs use, each a view of the one
method table (no second copy): the methods, the baselines, the learning rates, the options
each method reads and their defaults, the targets, and the default model.

No heavy imports: the command line reads this module to build its parser and to check
its arguments before torch is loaded.
"""

from __future__ import annotations

from ..method_table import LLAMA_TARGETS, METHOD_TABLE, OPTION_DEFAULTS

__all__ = [
    "METHODS",
    "BASELINES",
    "DEFAULT_LR",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_TARGETS",
    "DEFAULT_OPTIONS",
    "METHOD_OPTIONS",
]

#: Every method of the main job, in the table's order.
METHODS: tuple[str, ...] = tuple(spec.name for spec in METHOD_TABLE)

#: The baselines that are not tensornet's peft methods: peft's LoRA family and full
#: fine-tuning (every other name of :data:`METHODS` is in ``tensornet.adapters.METHODS``).
BASELINES: tuple[str, ...] = tuple(s.name for s in METHOD_TABLE if s.kind != "tensornet")

#: Default learning rates: the DoTA paper's (appendix B), LoRA's for LoTR, LoRTA and DoRA
#: (the reasons are in :mod:`tensornet.method_table`).
DEFAULT_LR: dict[str, float] = {spec.name: spec.lr for spec in METHOD_TABLE}

#: The built-in offline model (:data:`tensornet.adapters.DEFAULT_MODEL`).
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

#: The paper's targets on LLaMA: q_proj, k_proj, v_proj, up_proj and down_proj.
DEFAULT_TARGETS: tuple[str, ...] = LLAMA_TARGETS

#: The method options and their defaults (the paper's).
DEFAULT_OPTIONS: dict[str, object] = OPTION_DEFAULTS

#: The options of :data:`DEFAULT_OPTIONS` each method reads; the command line refuses an
#: option that none of the chosen methods reads (LoRTA adapts q, k, v and o, whatever
#: ``--targets`` says; full fine-tuning reads none).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {s.name: s.options for s in METHOD_TABLE}
