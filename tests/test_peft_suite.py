"""peft's own generic tuner tests on DoTA, DoTA-Random, QDoTA, LoTR and LoRTA.

The tests are peft's (``TestPeftCustomModel`` on its mock models, ``TestDecoderModels`` on a
causal LM), fetched for the installed peft version by :mod:`peft_harness`; this file only
lists tensornet's cases and, per upstream test, the cases it does not apply to and why.

The decoder path runs on a local model folder (``tiny_llama`` with grouped-query attention,
4 query and 2 key/value heads, plus a tokenizer trained in-process): peft's decoder tests
load their models by id with ``AutoModelForCausalLM.from_pretrained``, which reads a local
folder as well.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import peft_harness
from tiny_tokenizer import save_tiny_model

from tensornet.adapters import DoTAConfig, LoRTAConfig, LoTRConfig

custom = peft_harness.load("test_custom_models")
decoder = peft_harness.load("test_decoder_models")

#: MLP: lin0 is 10 -> 20, lin1 is 20 -> 2 (2 = 1 x 2 needs explicit modes for 2 cores).
MLP_DOTA = {"num_cores": 2, "rank": 3, "modes": {2: [1, 2]}, "seed": 0}
MLP_LOTR = {"rank": 3, "seed": 0}

CUSTOM_CASES = [
    ("DoTA MLP lin0", "MLP", DoTAConfig, {**MLP_DOTA, "target_modules": ["lin0"]}),
    ("DoTA MLP lin1", "MLP", DoTAConfig, {**MLP_DOTA, "target_modules": ["lin1"]}),
    ("DoTA MLP both", "MLP", DoTAConfig, {**MLP_DOTA, "target_modules": ["lin0", "lin1"]}),
    ("DoTA MLP regex", "MLP", DoTAConfig, {**MLP_DOTA, "target_modules": "lin0"}),
    (
        "DoTA MLP modules_to_save",
        "MLP",
        DoTAConfig,
        {**MLP_DOTA, "target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    ),
    ("DoTA-Random MLP", "MLP", DoTAConfig, {**MLP_DOTA, "init": "random",
                                            "target_modules": ["lin0", "lin1"]}),
    # LoTR: each of lin0, lin1 is its own kind (one layer each, its own pair A, B)
    ("LoTR MLP lin0", "MLP", LoTRConfig, {**MLP_LOTR, "target_modules": ["lin0"]}),
    ("LoTR MLP both", "MLP", LoTRConfig, {**MLP_LOTR, "target_modules": ["lin0", "lin1"]}),
    (
        "LoTR MLP modules_to_save",
        "MLP",
        LoTRConfig,
        {**MLP_LOTR, "target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    ),
    # orthonormal B is not scaled by 1/sqrt(in): on peft's inputs (up to 89) with SGD at lr 0.5
    # a scale of 2 overflows in test_parameters_after_loading_model; 0.5 trains
    ("LoTR-orthogonal MLP", "MLP", LoTRConfig, {"rank": 2, "init": "orthogonal", "scale": 0.5,
                                                "seed": 0, "target_modules": ["lin0", "lin1"]}),
]

#: tiny_llama: q 64x64, k/v 32x64, up 128x64, down 64x128.
LLAMA_DOTA = {"num_cores": 3, "rank": 4, "seed": 0}


def _llama_folder() -> str:
    folder = tempfile.mkdtemp(prefix="tensornet-tiny-llama-")
    atexit.register(shutil.rmtree, folder, True)
    save_tiny_model(folder)
    return folder


LLAMA = _llama_folder()

DECODER_CASES = [
    (LLAMA, DoTAConfig, {**LLAMA_DOTA}),
    (LLAMA, DoTAConfig, {**LLAMA_DOTA, "init": "random"}),
    (LLAMA, DoTAConfig, {**LLAMA_DOTA, "quantize": "nf4"}),
    (LLAMA, LoTRConfig, {"rank": 4, "seed": 0}),
    (LLAMA, LoRTAConfig, {"rank": 4, "seed": 0}),  # q, k, v, o with C_kv_head (GQA)
]
DECODER_IDS = ["DoTA tiny-llama", "DoTA-Random tiny-llama", "QDoTA tiny-llama",
               "LoTR tiny-llama", "LoRTA tiny-llama"]


def _offline(**case):
    return "trains on the Hub dataset 'Abirate/english_quotes': no network at test time"


def _qdota(reason):
    """Skip the QDoTA cases of a test, for ``reason`` (QDoTA's documented exceptions)."""
    def skip(config_kwargs, **case):
        return f"QDoTA: {reason}" if config_kwargs.get("quantize") == "nf4" else None
    return skip


#: QDoTA replaces each base layer by NF4(W0 - MPO(T_init)) (docs/guide/qdota.rst): one
#: adapter per layer, no original base to disable to, unload or delete back to.
_ONE = _qdota("a layer takes one QDoTA adapter (its base is that adapter's residual)")
_BASE = _qdota("the base layers are the NF4 residual, not the original weights")

SKIPS: dict = {
    "test_prompt_learning_with_gradient_checkpointing": _offline,
    "test_add_adapter_no_autocast_adapter_dtype": _qdota(
        "adds a second adapter, and QDoTA's cores default to bfloat16 (the paper's setting), "
        "not the base dtype"
    ),
    "test_delete_adapter": _ONE,
    "test_delete_inactive_adapter": _ONE,
    "test_save_pretrained_selected_adapters": _ONE,
    "test_save_pretrained_selected_adapters_pickle": _ONE,
    "test_disable_adapter": _qdota(
        "disabled, it computes NF4(W0 - MPO(T_init)) + MPO(T_init): W0 up to the residual's "
        "NF4 rounding, not exactly the base"
    ),
    "test_get_base_model_state_dict": _BASE,
    "test_unload_adapter": _qdota("unload() is refused (it would give back the NF4 residual)"),
}


class TestTensornetOnPeftCustomModels(custom.TestPeftCustomModel):
    """peft's ``TestPeftCustomModel`` with tensornet's cases."""


class TestTensornetOnPeftDecoderModels(decoder.TestDecoderModels):
    """peft's ``TestDecoderModels`` with tensornet's cases on the tiny LLaMA folder."""


for _name, _value in peft_harness.rebind(
    custom.TestPeftCustomModel,
    "test_name, model_id, config_cls, config_kwargs",
    CUSTOM_CASES,
    SKIPS,
    ids=[c[0] for c in CUSTOM_CASES],
).items():
    setattr(TestTensornetOnPeftCustomModels, _name, _value)

for _name, _value in peft_harness.rebind(
    decoder.TestDecoderModels,
    "model_id, config_cls, config_kwargs",
    DECODER_CASES,
    SKIPS,
    ids=DECODER_IDS,
).items():
    setattr(TestTensornetOnPeftDecoderModels, _name, _value)
