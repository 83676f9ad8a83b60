"""Export for serving (issue 22, point 6): a LoRA adapter plain peft loads, within the
reported error; a merged folder plain transformers loads, to the adapted model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tensornet.adapters import DoTAConfig, LoRTAConfig, LoTRConfig, tiny_llama
from tensornet.adapters.export import export_lora, export_merged, to_lora
from tensornet.errors import ConfigError

IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(11))
METHODS = {
    "dota": DoTAConfig(rank=4, init_weights=False, seed=0),
    "lotr": LoTRConfig(rank=4, init_weights=False, seed=0),
    "lorta": LoRTAConfig(rank=4, init_weights=False, seed=0),
}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def adapted(method):
    return get_peft_model(tiny_llama(), METHODS[method].replace())


@pytest.mark.parametrize("method", list(METHODS))
def test_a_full_rank_lora_export_reproduces_the_adapter(method, tmp_path):
    model = adapted(method)
    # rank 1.0: keep all of every update's energy (the full rank, whatever the layer)
    report = export_lora(model, tmp_path / "lora", rank=1.0)
    assert report.max_relative_error < 1e-3, report
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    torch.testing.assert_close(logits(lora), logits(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_low_rank_lora_export_reports_its_error_exactly(method):
    model = adapted(method)
    report, state = to_lora(model, rank=2)
    assert set(report.ranks.values()) == {2}
    for name, err in report.relative_errors.items():
        layer = model.get_submodule(f"base_model.model.{name}")
        delta = layer.get_delta_weight("default").double()
        s = torch.linalg.svdvals(delta)
        # the truncated SVD's error is the tail of the spectrum (Eckart-Young)
        expected = float(s[2:].norm() / s.norm()) if float(s.norm()) else 0.0
        assert err == pytest.approx(expected, rel=1e-3, abs=1e-6), name
    assert 0 < report.max_relative_error < 1


@pytest.mark.parametrize("method", list(METHODS))
def test_a_merged_export_loads_with_plain_transformers(method, tmp_path):
    model = adapted(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_merged(model, tmp_path / "merged")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(plain), logits(model), rtol=1e-5, atol=1e-5)
    assert not any("dota" in k or "lotr" in k or "lorta" in k for k in plain.state_dict())


def test_export_refuses_bad_ranks_and_qdota(tmp_path):
    model = adapted("lotr")
    for bad in (0, -1, 1.5, float("nan"), True, "8", 33):  # k_proj is 32 x 64
        with pytest.raises(ConfigError):
            to_lora(model, rank=bad)
    with pytest.raises(ConfigError, match="not an adapter"):
        to_lora(model, rank=2, adapter_name="nope")
    q = get_peft_model(tiny_llama(), DoTAConfig(rank=4, quantize="nf4"))
    with pytest.raises(ConfigError, match="QDoTA"):
        export_lora(q, tmp_path / "q", rank=4)
    assert not (tmp_path / "q").exists()
