"""The one method table: everything that names the methods is read from it or checked here.

tensornet.method_table is the source; the peft registration, the main job's defaults, the
baselines' recipes, the docs' methods table and benchmarks/experiment.sh follow it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig
from peft.utils.peft_types import PeftType

from tensornet.adapters import METHODS, DoTAConfig, DoTAModel, LoTRConfig
from tensornet.adapters._registry import register
from tensornet.errors import ConfigError
from tensornet.finetune import defaults
from tensornet.method_table import METHOD_TABLE, OPTION_DEFAULTS, method_spec

ROOT = Path(__file__).resolve().parents[1]
NAMES = [spec.name for spec in METHOD_TABLE]
TENSORNET = [spec for spec in METHOD_TABLE if spec.kind == "tensornet"]
PEFT = [spec for spec in METHOD_TABLE if spec.kind == "peft"]


def test_names_are_unique_and_every_option_has_a_default():
    assert len(set(NAMES)) == len(NAMES)
    assert {o for spec in METHOD_TABLE for o in spec.options} == set(OPTION_DEFAULTS)
    for spec in METHOD_TABLE:
        assert (spec.rank_option is None) == (spec.kind == "full")
        if spec.rank_option is not None:
            assert spec.rank_option.endswith("rank")
    with pytest.raises(KeyError, match="known: dota, dota-random"):
        method_spec("nosuch")


@pytest.mark.parametrize("spec", TENSORNET, ids=lambda s: s.name)
def test_each_tensornet_row_is_registered_with_its_tuner_settings_and_targets(spec):
    method = METHODS[spec.name]
    assert method.peft_type == spec.peft_type
    assert PeftType(spec.peft_type.upper()) is method.config_cls().peft_type
    config = method.config()
    for field, value in spec.settings:
        assert getattr(config, field) == value
    assert tuple(config.target_modules) == spec.targets
    assert tuple(method.config_cls.default_targets) == spec.targets


def test_the_registry_holds_the_tensornet_rows_and_nothing_else():
    assert list(METHODS) == [spec.name for spec in TENSORNET]


@pytest.mark.parametrize("spec", PEFT, ids=lambda s: s.name)
def test_each_baseline_row_is_a_lora_config_with_its_settings(spec):
    # the row's settings are LoraConfig fields; build_method passes them unchanged
    assert spec.peft_type == "lora"
    config = LoraConfig(r=4, target_modules=list(spec.targets), **dict(spec.settings))
    for field, value in spec.settings:
        assert getattr(config, field) == value


def test_the_learning_rates_are_the_papers_appendix_b():
    lr = {spec.name: spec.lr for spec in METHOD_TABLE}
    assert lr["dota"] == lr["dota-random"] == lr["lora"] == 3e-4  # math
    assert lr["pissa"] == 1e-4 and lr["full"] == 1e-5  # math
    assert lr["qdota"] == lr["qpissa"] == 1e-4 and lr["qlora"] == 1e-5  # quantization
    assert lr["dora"] == lr["lotr"] == lr["lorta"] == lr["lora"]  # not in appendix B


def test_the_defaults_are_views_of_the_table():
    assert defaults.METHODS == tuple(NAMES)
    assert defaults.BASELINES == tuple(s.name for s in METHOD_TABLE if s.kind != "tensornet")
    assert defaults.DEFAULT_LR == {s.name: s.lr for s in METHOD_TABLE}
    assert defaults.METHOD_OPTIONS == {s.name: s.options for s in METHOD_TABLE}
    assert defaults.DEFAULT_OPTIONS is OPTION_DEFAULTS


def test_register_refuses_a_tuner_no_row_uses_before_touching_peft():
    with pytest.raises(ConfigError, match="no row of tensornet.method_table"):
        register("nosuch", DoTAConfig, DoTAModel)
    assert "NOSUCH" not in PeftType.__members__


def test_register_refuses_a_config_of_another_peft_type():
    # LoTR's config names PeftType.LOTR: it cannot be registered as the "dota" tuner
    with pytest.raises(ConfigError, match="LoTRConfig.peft_name must be 'DOTA'"):
        register("dota", LoTRConfig, DoTAModel)


def test_every_config_sets_the_peft_type_it_names():
    for method in METHODS.values():
        config = method.config_cls()
        assert config.peft_type.value == method.config_cls.peft_name == method.peft_type.upper()


def test_register_refuses_a_config_whose_default_targets_are_not_the_rows(monkeypatch):
    monkeypatch.setattr(DoTAConfig, "default_targets", ("q_proj",))
    with pytest.raises(ConfigError, match="default_targets is not the targets of 'dota'"):
        register("dota", DoTAConfig, DoTAModel)


def test_the_docs_methods_table_shows_the_rows():
    # docs/guide/main-job.rst: name, what trains, default lr, in the table's order
    text = (ROOT / "docs" / "guide" / "main-job.rst").read_text()
    header = text.index("\nmethod         what trains")
    table = text[header:].split("\n=============  ", 3)[1]
    rows = re.findall(r"^([a-z-]+) {2,}(.*?) {2,}(\d+e-\d+)$", table, flags=re.M)
    assert rows == [(s.name, s.summary, f"{s.lr:.0e}".replace("e-0", "e-"))
                    for s in METHOD_TABLE]


def test_the_experiment_script_runs_every_method():
    script = (ROOT / "benchmarks" / "experiment.sh").read_text()
    assert set(re.findall(r"--methods ([a-z-]+)", script)) == set(NAMES)


def test_the_table_imports_nothing_heavy():
    # the command line reads it to build its parser before torch is loaded
    code = ("import sys, tensornet.method_table, tensornet.finetune.defaults; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_the_conformance_table_has_every_tensornet_method():
    # a new method gets its conformance cases (tests/test_conformance.py) with the row
    from dota_helpers import ALL_METHODS

    assert {spec.name for spec in TENSORNET} <= set(ALL_METHODS)
