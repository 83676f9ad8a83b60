"""The one table of every fine-tuning method tensornet knows: its own and peft's baselines.

Each row says what a method is (the peft tuner it is built on and the config fields it
fixes), what trains, its default learning rate (the DoTA paper's), the options it reads,
its default targets and what it quantizes. Everything else reads this table:

* :mod:`tensornet.adapters` imports the folder of each tensornet method
  (``tensornet/adapters/<peft_type>/``), whose ``register(...)`` line registers the peft
  tuner; the rows on that tuner become :data:`tensornet.adapters.METHODS`;
* :mod:`tensornet.finetune.defaults` (``METHODS``, ``BASELINES``, ``DEFAULT_LR``,
  ``METHOD_OPTIONS``, ``DEFAULT_TARGETS``) and so the command line's choices and option
  checks, and :func:`tensornet.finetune.build_method` (how a baseline is built);
* ``tests/test_method_table.py`` checks the rest against it: the config classes' default
  targets, ``benchmarks/experiment.sh``'s list and the methods table of the docs.

Adding a method: its folder under ``tensornet/adapters/`` and one row here (see the
contributing guide). The module imports nothing, so the command line reads it before
torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ATTENTION_TARGETS",
    "LLAMA_TARGETS",
    "METHOD_TABLE",
    "OPTION_DEFAULTS",
    "MethodSpec",
    "method_spec",
]

#: The DoTA paper's targets on LLaMA: q_proj, k_proj, v_proj, up_proj and down_proj.
LLAMA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

#: LoRTA's targets: the attention projections, one CP decomposition over all of them.
ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

#: The options a method may read, with their defaults (the paper's): the tensor adapters'
#: rank (DoTA's bond cap R, LoTR's and LoRTA's r), DoTA's number of cores N, the rank of
#: LoRA, DoRA, QLoRA and QPiSSA (r = 32, alpha = r; QPiSSA has QLoRA's parameter share in
#: the paper's Figure 5) and PiSSA's (r = 16), and the layers to adapt.
OPTION_DEFAULTS: dict[str, object] = {
    "rank": 16,
    "num_cores": 5,
    "lora_rank": 32,
    "pissa_rank": 16,
    "targets": LLAMA_TARGETS,
}

Kind = Literal["tensornet", "peft", "full"]


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method.

    Attributes
    ----------
    name : str
        The method's name (``--methods``).
    kind : {"tensornet", "peft", "full"}
        A tensornet peft method, one of peft's own (the LoRA family), or full fine-tuning.
    summary : str
        What trains, as the docs' methods table says it.
    lr : float
        The default learning rate.
    options : tuple of str
        The options of :data:`OPTION_DEFAULTS` it reads; the first is its rank option.
    targets : tuple of str
        Its default targets (empty: no target, full fine-tuning).
    peft_type : str or None
        The peft method it is built on (``"dota"``, ``"lora"``, ...); for a tensornet
        method, also the folder of ``tensornet/adapters/`` that registers it.
    settings : tuple of (str, object)
        The config fields the method fixes on that peft method (QDoTA's ``quantize="nf4"``,
        DoRA's ``use_dora=True``).
    quantize : {None, "base", "residual"}
        What is stored in NF4: the base weight (QLoRA) or the residual the adapter leaves
        (QDoTA, QPiSSA).
    """

    name: str
    kind: Kind
    summary: str
    lr: float
    options: tuple[str, ...]
    targets: tuple[str, ...]
    peft_type: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    quantize: Literal[None, "base", "residual"] = None

    @property
    def rank_option(self) -> str | None:
        """The option that holds the method's rank (``None`` for full fine-tuning)."""
        return self.options[0] if self.options else None


_DOTA = ("rank", "num_cores", "targets")
_LORA = ("lora_rank", "targets")
_PISSA = (("init_lora_weights", "pissa_niter_4"),)

# Learning rates: the DoTA paper's appendix B (math for DoTA, LoRA, PiSSA and full
# fine-tuning; the quantization settings for QDoTA, QLoRA and QPiSSA). LoTR and LoRTA are
# not in that paper: they get LoRA's rate. DoRA is in the paper's tables only with the DoRA
# paper's own numbers and appendix B gives it no rate; it is LoRA with a trained magnitude
# vector over the same rank-r update, so it gets LoRA's rate in the math setting.
#: Every method, in the order the command line and the docs list them.
METHOD_TABLE: tuple[MethodSpec, ...] = (
    MethodSpec("dota", "tensornet",
               "MPO cores of q, k, v, up, down (N = 5, R = 16), from W0's MPO",
               3e-4, _DOTA, LLAMA_TARGETS, "dota"),
    MethodSpec("dota-random", "tensornet",
               "the same cores, Gaussian-initialized (the paper's ablation)",
               3e-4, _DOTA, LLAMA_TARGETS, "dota", (("init", "random"),)),
    MethodSpec("qdota", "tensornet",
               "DoTA over an NF4 residual NF4(W0 - MPO(T_init)) (:doc:`qdota`)",
               1e-4, _DOTA, LLAMA_TARGETS, "dota", (("quantize", "nf4"),), "residual"),
    MethodSpec("lotr", "tensornet",
               "LoTR, factors shared per kind of target, r = 16 (a)",
               3e-4, ("rank", "targets"), LLAMA_TARGETS, "lotr"),
    MethodSpec("lorta", "tensornet",
               "LoRTA, one CP decomposition of q, k, v, o, r = 16 (a)",
               3e-4, ("rank",), ATTENTION_TARGETS, "lorta"),
    MethodSpec("lora", "peft", "peft LoRA, r = 32, alpha = r",
               3e-4, _LORA, LLAMA_TARGETS, "lora"),
    MethodSpec("dora", "peft",
               "peft DoRA (``LoraConfig(use_dora=True)``), r = 32, alpha = r (b)",
               3e-4, _LORA, LLAMA_TARGETS, "lora", (("use_dora", True),)),
    MethodSpec("pissa", "peft",
               'peft PiSSA (``init_lora_weights="pissa_niter_4"``), r = 16',
               1e-4, ("pissa_rank", "targets"), LLAMA_TARGETS, "lora", _PISSA),
    MethodSpec("qpissa", "peft",
               "PiSSA at full precision, then its residual in NF4, r = 32",
               1e-4, _LORA, LLAMA_TARGETS, "lora", _PISSA, "residual"),
    MethodSpec("qlora", "peft", "peft LoRA on an NF4 bitsandbytes base, r = 32",
               1e-5, _LORA, LLAMA_TARGETS, "lora", (), "base"),
    MethodSpec("full", "full", "every parameter (float32 master weights)",
               1e-5, (), ()),
)


def method_spec(name: str) -> MethodSpec:
    """The row of ``name``; ``KeyError`` naming the known methods if there is none."""
    for spec in METHOD_TABLE:
        if spec.name == name:
            return spec
    raise KeyError(f"no method {name!r}; known: {', '.join(s.name for s in METHOD_TABLE)}")
