"""Issue 20, points 4 and 5: merges are all-or-nothing, tied targets and applying twice refused.

Every tensornet method (DoTA, QDoTA, LoTR, LoRTA): ``safe_merge=True`` with NaN in the
last layer's adapter raises before any layer is merged; ``lm_head`` tied to the input
embedding is refused at ``get_peft_model`` (merging it would rewrite the embedding too);
``get_peft_model`` on a model that already carries the adapter name refuses instead of
re-initialising the trained adapter in place.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from dota_helpers import IDS, assert_untouched, snapshot
from peft import get_peft_model

from tensornet.adapters import DoTAConfig, LoRTAConfig, LoTRConfig, tiny_llama
from tensornet.errors import ConfigError, NonFiniteError

CONFIGS = {
    "dota": DoTAConfig(),
    "qdota": DoTAConfig(quantize="nf4"),
    "lotr": LoTRConfig(rank=4),
    "lorta": LoRTAConfig(rank=4),
}


def _poison_last_layer(model):
    """NaN into one trainable tensor of the last adapted layer (not a shared factor)."""
    last = [m for m in model.modules() if hasattr(m, "get_delta_weight")][-1]
    own = [p for n, p in last.named_parameters() if p.requires_grad and "base_layer" not in n]
    with torch.no_grad():
        own[0].fill_(float("nan"))
    return last


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
@pytest.mark.parametrize("method", ["dota", "qdota", "lotr"])
def test_safe_merge_with_a_broken_layer_merges_nothing(method, how):
    model = get_peft_model(tiny_llama(), CONFIGS[method])
    _poison_last_layer(model)
    modules = list(model.named_modules())
    values = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="NaNs detected in the merged weights") as err:
        getattr(model, how)(safe_merge=True)
    assert isinstance(err.value, ValueError)  # what peft's safe_merge raises
    assert all(m is m0 for (_, m), (_, m0) in zip(model.named_modules(), modules))
    after = model.state_dict()
    assert after.keys() == values.keys()
    for name, value in values.items():  # (the poisoned tensor holds NaN: equal_nan)
        if value.is_floating_point():
            assert torch.allclose(after[name], value, rtol=0, atol=0, equal_nan=True), name
        else:
            assert torch.equal(after[name], value), name
    assert not any(getattr(m, "merged_adapters", []) for m in model.modules())


def test_safe_merge_of_a_healthy_adapter_still_merges():
    model = get_peft_model(tiny_llama(), CONFIGS["dota"])
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    merged = model.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["dota", "qdota", "lotr"])  # (LoRTA adapts attention only)
def test_a_tied_lm_head_target_is_refused(method):
    base = tiny_llama()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    before = snapshot(base)
    config = CONFIGS[method].replace(target_modules=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft: "tie_word_embeddings=True"
        with pytest.raises(ConfigError, match="lm_head.*shares its weight.*embed_tokens"):
            get_peft_model(base, config)
    assert_untouched(base, before)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_get_peft_model_twice_refuses_instead_of_reinitialising(method):
    model = get_peft_model(tiny_llama(), CONFIGS[method])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    inner = model.get_base_model()
    before = snapshot(inner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft: "modify a model ... second time"
        with pytest.raises(ConfigError, match="already carries.*'default'.*add_adapter"):
            get_peft_model(inner, CONFIGS[method])
    assert_untouched(inner, before)


def test_a_lotr_rank_beyond_the_layers_is_refused_before_any_allocation():
    # LoTRConfig(rank=100000) tried to allocate rank x rank cores per layer (40 GB)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ConfigError, match=r"`rank` must be <= \d+ .*larger than the layer"):
        get_peft_model(base, LoTRConfig(rank=100000))
    assert_untouched(base, before)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_add_weighted_adapter_is_a_clear_refusal(method):
    model = get_peft_model(tiny_llama(), CONFIGS[method])
    with pytest.raises(ConfigError, match="add_weighted_adapter.*not"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


@pytest.mark.parametrize("method", ["dota", "lotr"])
def test_the_saved_model_card_says_tensornet_is_needed_and_how_to_load(method, tmp_path):
    # peft's card says nothing: a user without tensornet met a bare KeyError: 'DOTA'
    model = get_peft_model(tiny_llama(), CONFIGS[method])
    for _ in range(2):  # saving again replaces the section, never repeats it
        model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.count("## tensornet adapter") == 1
    assert "import tensornet.adapters" in card and "PeftModel.from_pretrained" in card
    assert f"**{CONFIGS[method].method}**" in card
    assert "10 layers" in card


def test_the_model_card_says_what_the_offline_default_base_is(tmp_path):
    # issue 22 point 9: an adapter of the offline SmolLM2 recorded only a cache path; its
    # card says that base is the dequantized Q4_1 GGUF, and how tensornet gets installed
    cache = tmp_path / "smollm2-135m-instruct"
    cache.mkdir()
    (cache / "tensornet-cache.json").write_text("{}")
    base = tiny_llama()
    base.name_or_path = str(cache)  # what load_pretrained() gives its model
    model = get_peft_model(base, DoTAConfig())
    model.save_pretrained(tmp_path / "adapter")
    card = " ".join((tmp_path / "adapter" / "README.md").read_text().split())
    assert str(cache) in card and "Q4_1" in card and "dequantized to float32" in card
    assert 'pip install -e ".[adapters]"' in card and "KeyError: 'DOTA'" in card
