"""The methods' registration with peft: the PeftType members, peft's mappings, the versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import peft
import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

from tensornet.adapters import (
    TESTED_PEFT,
    DoTAConfig,
    DoTAModel,
    LoRTAConfig,
    LoRTAModel,
    LoTRConfig,
    LoTRModel,
    tiny_llama,
)
from tensornet.adapters._registry import check_peft, peft_type
from tensornet.errors import PeftVersionError

REGISTERED = {"DOTA": (DoTAConfig, DoTAModel), "LOTR": (LoTRConfig, LoTRModel),
              "LORTA": (LoRTAConfig, LoRTAModel)}


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_each_method_is_a_member_of_peft_type_and_in_peft_mappings(name):
    member = PeftType(name)
    assert member is getattr(PeftType, name) is peft_type(name)  # added once, found again
    assert member in list(PeftType) and member == name  # a str enum: serializes as "DOTA"
    config_cls, model_cls = REGISTERED[name]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls
    assert config_cls().peft_type is member


def test_saved_config_names_its_type_and_peft_reads_it_back(tmp_path):
    model = get_peft_model(tiny_llama(), LoTRConfig(rank=2))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LOTR" and saved["rank"] == 2
    again = PeftConfig.from_pretrained(tmp_path)  # peft's generic loader dispatches to ours
    assert type(again) is LoTRConfig and again.rank == 2


def test_the_installed_peft_is_a_tested_one():
    assert check_peft() == peft.__version__ in TESTED_PEFT


def test_an_older_peft_is_refused_with_a_message(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.20.0")
    with pytest.raises(PeftVersionError, match=r"need peft 0\.21\.0 or newer \(tested: 0\.21\.0, "
                                               r".*\); the installed peft is 0\.20\.0") as info:
        check_peft()
    assert 'pip install "peft>=0.21.0"' in str(info.value)
    assert "tensornet[" not in str(info.value)  # a PyPI name that is not this project


def test_a_newer_peft_is_accepted_with_a_warning(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "99.0.0")
    with pytest.warns(UserWarning, match=r"tested with peft 0\.21\.0, .*; the installed peft is "
                                         r"99\.0\.0, newer and untested"):
        assert check_peft() == "99.0.0"


@pytest.mark.parametrize("version", ["0.21.0", "0.21.1", "0.21.2.dev0"])
def test_a_peft_in_the_tested_range_is_accepted_silently(monkeypatch, recwarn, version):
    monkeypatch.setattr(peft, "__version__", version)
    assert check_peft() == version
    assert not [w for w in recwarn if "peft" in str(w.message)]


def test_importing_the_adapters_under_an_older_peft_fails_in_one_line():
    code = "import peft; peft.__version__ = '0.20.0'; import tensornet.adapters"
    # the hook of tensornet/_peft_hook.py would import the adapters with `import peft`
    env = {**os.environ, "TENSORNET_NO_PEFT_HOOK": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("tensornet.errors.PeftVersionError: ") and "0.20.0" in last
