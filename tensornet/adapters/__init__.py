"""Tensor adapters as peft methods: DoTA, DoTA-Random, QDoTA, LoTR and LoRTA.

Importing this package registers the methods with the installed peft (from the oldest to
the newest release of :data:`TESTED_PEFT`; an older peft is refused, a newer one warned
about), after which they work as any peft method. With tensornet installed, peft's own
loaders need no such import: a start-up hook (``tensornet/_peft_hook.py``, off with
``TENSORNET_NO_PEFT_HOOK=1``) imports this package when peft is imported::

    from peft import PeftModel, get_peft_model
    from tensornet.adapters import DoTAConfig

    model = get_peft_model(base, DoTAConfig(rank=16, num_cores=5))
    model.save_pretrained("out/")
    again = PeftModel.from_pretrained(fresh_base, "out/")
    merged = again.merge_and_unload()

``apply_dota(model)``, ``apply_lotr`` and ``apply_lorta`` are one-line entry points that
return what ``get_peft_model`` returns; ``plan_dota`` / ``plan_lotr`` / ``plan_lorta``
count an adapter on a model built on the meta device, and ``lotr_num_params`` /
``lorta_num_params`` give LoTR's and LoRTA's counts in closed form (DoTA's is the core's
:func:`tensornet.mpo_num_params`).
"""

import importlib

from ..method_table import METHOD_TABLE
from ._registry import METHODS, TESTED_PEFT, check_peft

check_peft()

# Each tensornet method's folder registers its peft tuner (``register(...)``); the folders
# are the method table's, so adding a method needs no line here.
for _folder in dict.fromkeys(s.peft_type for s in METHOD_TABLE if s.kind == "tensornet"):
    importlib.import_module(f".{_folder}", __name__)
del _folder

from ..models import DEFAULT_MODEL, load_pretrained, tiny_llama  # noqa: E402
from .base import AdapterReport, LayerReport  # noqa: E402
from .dota import LLAMA_TARGETS, DoTAConfig, DoTALinear, DoTAModel, random_cores  # noqa: E402
from .entry import (  # noqa: E402
    apply,
    apply_dota,
    apply_lorta,
    apply_lotr,
    plan,
    plan_dota,
    plan_lorta,
    plan_lotr,
)
from .export import LoraExport, export_lora, export_merged, to_lora  # noqa: E402
from .lorta import ATTENTION_TARGETS, LoRTAConfig, LoRTALinear, LoRTAModel  # noqa: E402
from .lorta.config import lorta_num_params  # noqa: E402
from .lotr import LoTRConfig, LoTRLinear, LoTRModel  # noqa: E402
from .lotr.config import lotr_num_params  # noqa: E402

__all__ = [
    "ATTENTION_TARGETS",
    "DEFAULT_MODEL",
    "LLAMA_TARGETS",
    "METHODS",
    "TESTED_PEFT",
    "AdapterReport",
    "DoTAConfig",
    "DoTALinear",
    "DoTAModel",
    "LayerReport",
    "LoRTAConfig",
    "LoRTALinear",
    "LoRTAModel",
    "LoTRConfig",
    "LoTRLinear",
    "LoTRModel",
    "LoraExport",
    "apply",
    "apply_dota",
    "apply_lorta",
    "apply_lotr",
    "export_lora",
    "export_merged",
    "load_pretrained",
    "lorta_num_params",
    "lotr_num_params",
    "plan",
    "plan_dota",
    "plan_lorta",
    "plan_lotr",
    "random_cores",
    "tiny_llama",
    "to_lora",
]
