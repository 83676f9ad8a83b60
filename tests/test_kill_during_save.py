"""A save killed at a random point leaves a folder that loads the old adapter, the new one,
or is refused: never a mix (issue 20, point 9).

A child process saves two adapters A and B into one folder in turn, as fast as it can,
with peft's ``save_pretrained`` (weights, then config, then model card); the test kills it
(SIGKILL) at a random moment, then loads the folder. peft writes the weights in place and
the config after them: the manifest digest recorded in the config (written atomically by
tensornet) is what turns every torn state into a refusal.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel, get_peft_model

from tensornet.adapters import DoTAConfig, tiny_llama
from tensornet.errors import AdapterFileError

TRIALS = 20
IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(3))

CHILD = r"""
import sys, torch
from peft import PeftModel
from tensornet.adapters import tiny_llama
ref_a, ref_b, target = sys.argv[1:4]
model = PeftModel.from_pretrained(tiny_llama(), ref_a, is_trainable=True)
model.load_adapter(ref_b, "b")
states = [{k: v.clone() for k, v in model.state_dict().items() if ".default" in k}, None]
states[1] = {k: model.state_dict()[k.replace(".default", ".b")].clone() for k in states[0]}
model.save_pretrained(target)  # a complete first save: the folder exists
print("ready", flush=True)
i = 0
while True:
    i += 1
    model.load_state_dict(states[i % 2], strict=False)
    model.save_pretrained(target)
"""


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = get_peft_model(tiny_llama(), DoTAConfig(rank=4, target_modules=["q_proj"],
                                                         init_weights=False, seed=seed))
        model.save_pretrained(root / name)
        out[name] = (root / name, _logits(PeftModel.from_pretrained(tiny_llama(), root / name)))
    return out


def test_a_save_killed_at_random_points_never_loads_a_mix(refs, tmp_path):
    assert not torch.equal(refs["a"][1], refs["b"][1])
    rng = random.Random(2026)
    outcomes = {"a": 0, "b": 0, "refused": 0}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for trial in range(TRIALS):
        target = tmp_path / f"t{trial}"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(refs["a"][0]), str(refs["b"][0]), str(target)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
        )
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.2))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        try:
            out = _logits(PeftModel.from_pretrained(tiny_llama(), target))
        except (AdapterFileError, ValueError) as exc:  # peft: no config file at all
            assert isinstance(exc, AdapterFileError) or "adapter_config.json" in str(exc)
            outcomes["refused"] += 1
            continue
        matches = [k for k in ("a", "b") if torch.equal(out, refs[k][1])]
        assert matches, f"trial {trial}: the folder loaded neither adapter (a mix)"
        outcomes[matches[0]] += 1
    # the killed saves landed in different phases (not all before or after a save)
    assert sum(v > 0 for v in outcomes.values()) >= 2, outcomes
