"""peft's mixed-adapter batches (``model(..., adapter_names=[...])``) for tensornet's methods.

Each row of a batch runs through the adapter named for it alone (``"__base__"``: the
base layer), as peft's LoRA does. Checked row by row against runs of the whole batch with
one adapter active (``set_adapter``) or with adapters disabled, to float32 tolerance, for
DoTA, DoTA-Random, LoTR and LoRTA on a tiny LLaMA with two named adapters moved off their
initial values. QDoTA is refused (its base layer is the NF4 residual).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from tensornet.adapters import DoTAConfig, LoRTAConfig, LoTRConfig, tiny_llama
from tensornet.errors import ConfigError, TensornetError

METHODS = {
    "dota": DoTAConfig(),
    "dota-random": DoTAConfig(init="random", seed=0),
    "lotr": LoTRConfig(rank=4, seed=0),
    "lorta": LoRTAConfig(rank=4, seed=0),
}
IDS = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(7))
ATOL = 1e-5


def two_adapters(method: str):
    """A model with adapters "one" and "two", both moved off their initial values."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), copy.deepcopy(METHODS[method]), adapter_name="one")
    model.add_adapter("two", copy.deepcopy(METHODS[method]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("dota_cores", "lotr", "lorta")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def single(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(input_ids=IDS).logits
        model.set_adapter(name)
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_each_row_gets_its_own_adapter(method):
    model = two_adapters(method)
    want = {name: single(model, name) for name in ("one", "two", "__base__")}
    assert (want["one"] - want["two"]).abs().max() > 1e-3  # the adapters differ
    assert (want["one"] - want["__base__"]).abs().max() > 1e-3
    model.set_adapter("one")
    names = ["two", "__base__", "one", "two"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], want[name][row], rtol=0, atol=ATOL)
    # the hooks are gone after the call: a plain call runs the active adapter again
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want["one"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["dota", "lotr"])
def test_one_name_for_every_row_is_that_adapter(method):
    model = two_adapters(method)
    want = single(model, "two")
    model.set_adapter("one")
    with torch.no_grad():
        got = model(input_ids=IDS, adapter_names=["two"] * len(IDS)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_generate_with_mixed_adapters_matches_single_runs():
    model = two_adapters("dota")
    ids = IDS[:2]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.set_adapter("two")
        want_b = model.generate(input_ids=ids, **kw)
        with model.disable_adapter():
            want_base = model.generate(input_ids=ids, **kw)
        model.set_adapter("one")
        got = model.generate(input_ids=ids, adapter_names=["two", "__base__"], **kw)
    assert torch.equal(got[0], want_b[0]) and torch.equal(got[1], want_base[1])


@pytest.mark.parametrize("method", ["dota", "lorta"])
def test_refusals_name_the_problem(method):
    model = two_adapters(method)
    with pytest.raises(ConfigError, match=r"\['three'\].*does not have"):
        model(input_ids=IDS, adapter_names=["one", "three", "one", "one"])
    with pytest.raises(ConfigError, match="per row.*3 names for 4 rows"):
        with torch.no_grad():
            model(input_ids=IDS, adapter_names=["one", "two", "one"])
    model.train()
    with pytest.raises(ConfigError, match="model.eval"):
        model(input_ids=IDS, adapter_names=["one"] * 4)


def test_merged_adapters_are_refused():
    model = two_adapters("dota")
    model.merge_adapter(["one"])
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        with torch.no_grad():
            model(input_ids=IDS, adapter_names=["one", "two", "one", "one"])


def test_qdota_is_refused_and_says_why():
    model = get_peft_model(tiny_llama(), DoTAConfig(quantize="nf4")).eval()
    with pytest.raises(TensornetError, match="NF4 residual.*'__base__'"):
        model(input_ids=IDS, adapter_names=["default", "__base__", "default", "default"])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()  # hooks removed


@pytest.mark.parametrize("method", list(METHODS))
def test_add_weighted_adapter_is_a_tensornet_refusal(method):
    # not peft's AttributeError on the wrapped transformers model
    model = two_adapters(method)
    with pytest.raises(ConfigError, match="add_weighted_adapter is not implemented"):
        model.add_weighted_adapter(["one", "two"], [0.5, 0.5], "mix")
