"""peft's own generic tuner tests on DoTA, DoTA-Random, QDoTA, LoTR and LoRTA.

The tests are peft's (``TestPeftCustomModel`` on its mock models, ``TestDecoderModels`` on a
causal LM), fetched for the installed peft version by :mod:`peft_harness`; this file only
lists tensornet's cases and, per upstream test, the cases it does not apply to and why.
"""

from __future__ import annotations

import peft_harness

from tensornet.adapters import DoTAConfig

custom = peft_harness.load("test_custom_models")
decoder = peft_harness.load("test_decoder_models")

#: MLP: lin0 is 10 -> 20, lin1 is 20 -> 2 (2 = 1 x 2 needs explicit modes for 2 cores).
MLP_DOTA = {"num_cores": 2, "rank": 3, "modes": {2: [1, 2]}, "seed": 0}

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
]

SKIPS: dict = {}


class TestTensornetOnPeftCustomModels(
    custom.TestPeftCustomModel,
):
    pass


for _name, _value in peft_harness.rebind(
    custom.TestPeftCustomModel,
    "test_name, model_id, config_cls, config_kwargs",
    CUSTOM_CASES,
    SKIPS,
    ids=[c[0] for c in CUSTOM_CASES],
).items():
    setattr(TestTensornetOnPeftCustomModels, _name, _value)
