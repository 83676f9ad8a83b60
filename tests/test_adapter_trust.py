"""An adapter file is the adapter and nothing else, checked on every load path (issue 20).

One table of damaged folders x every method x every way peft loads an adapter
(``PeftModel.from_pretrained``, ``load_adapter`` into a new and into an existing name,
``set_peft_model_state_dict``): each is refused before the first parameter changes, and
the model is left bit for bit as it was. Then the base identity: an adapter is refused
on a base whose weights *outside* the adapted layers differ.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dota_helpers import assert_load_refused, assert_untouched, logits, snapshot
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from tensornet.adapters import DoTAConfig, LoRTAConfig, LoTRConfig, tiny_llama
from tensornet.adapters.files import MANIFEST_KEY, read_adapter_tensors
from tensornet.errors import AdapterFileError, AdapterMismatchError, ConfigError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

METHODS = {
    "dota": DoTAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "qdota": DoTAConfig(rank=4, quantize="nf4", target_modules=["q_proj", "v_proj"]),
    "lotr": LoTRConfig(rank=4, seed=0),
    "lorta": LoRTAConfig(rank=4, seed=0),
}
IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(7))


def _step(model: torch.nn.Module) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per method: two saves of one trained adapter (after 1 and after 2 steps)."""
    out = {}
    for method, config in METHODS.items():
        root = tmp_path_factory.mktemp(method)
        model = get_peft_model(tiny_llama(), config.replace())
        _step(model)
        model.save_pretrained(root / "a")
        _step(model)
        model.save_pretrained(root / "b")
        out[method] = root
    return out


# ------------------------------------------------------------------ damages of a folder
def _edit(fn):
    def apply(folder, method):
        tensors = load_file(str(folder / WEIGHTS))
        fn(tensors, sorted(k for k in tensors if k != MANIFEST_KEY)[0], method)
        save_file(tensors, str(folder / WEIGHTS))
    return apply


def _add_base_weight(name, shape):
    def add(tensors, key, method):
        tensors[f"base_model.model.{name}"] = torch.zeros(shape)
    return add


def _cast(dtype):
    def cast(tensors, key, method):
        tensors[key] = tensors[key].to(dtype)
    return cast


def _flip_low_bit(tensors, key, method):
    t = tensors[key].clone()
    t.view(torch.int32).view(-1)[0] ^= 1  # the lowest mantissa bit of one value
    tensors[key] = t


def _flip_sign(tensors, key, method):
    t = tensors[key].clone()
    t.view(-1)[1] = -t.view(-1)[1]
    tensors[key] = t


def _replace_init(tensors, key, method):
    init = sorted(k for k in tensors if ".dota_init." in k)[0]
    g = torch.Generator().manual_seed(5)
    tensors[init] = torch.randn(tensors[init].shape, generator=g).to(tensors[init].dtype)


def _torn(folder, method):
    """The weights of the later save beside the config of the earlier one."""
    shutil.copy(folder.parent / "b" / WEIGHTS, folder / WEIGHTS)


def _bin_with_nan(folder, method):
    tensors = load_file(str(folder / WEIGHTS))
    key = sorted(k for k in tensors if k != MANIFEST_KEY)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


def _drop_manifest(tensors, key, method):
    del tensors[MANIFEST_KEY]


DAMAGES = {
    # a tensor named like a base parameter would be loaded into the base
    "base-o_proj": (_edit(_add_base_weight("model.layers.0.self_attn.o_proj.weight", (64, 64))),
                    "a base model's weight"),
    "base-embeddings": (_edit(_add_base_weight("model.embed_tokens.weight", (128, 64))),
                        "a base model's weight"),
    "float16": (_edit(_cast(torch.float16)), "not the one that was saved"),
    "int64": (_edit(_cast(torch.int64)), "not a floating point"),
    "bool": (_edit(_cast(torch.bool)), "not a floating point"),
    "low-mantissa-bit": (_edit(_flip_low_bit), "not the one that was saved"),
    "sign-bit": (_edit(_flip_sign), "not the one that was saved"),
    "replaced-T_init": (_edit(_replace_init), "not the one that was saved"),
    "torn-save": (_torn, "two different saves"),
    "bin-with-nan": (_bin_with_nan, "NaN"),
    "no-manifest": (_edit(_drop_manifest), "no tensornet manifest"),
}
#: what peft's existing-name paths (no config read) cannot see: the config-weights pair
NEEDS_CONFIG = {"torn-save", "no-manifest"}
LOADS = ["from_pretrained", "load_adapter-new", "load_adapter-existing", "set_state_dict"]


def _cases():
    for method in METHODS:
        for damage in DAMAGES:
            if damage == "replaced-T_init" and "dota" not in method:
                continue
            for how in LOADS:
                if damage in NEEDS_CONFIG and how in ("load_adapter-existing", "set_state_dict"):
                    continue
                if method == "qdota" and how == "load_adapter-new":
                    continue  # a QDoTA layer takes no second adapter (refused on its own)
                yield method, damage, how


@pytest.mark.parametrize("method,damage,how", list(_cases()))
def test_a_damaged_adapter_is_refused_on_every_load_path(method, damage, how, saved, tmp_path):
    damage_fn, needle = DAMAGES[damage]
    folder = tmp_path / "damaged"
    shutil.copytree(saved[method] / "a", folder)
    (tmp_path / "b").symlink_to(saved[method] / "b")
    damage_fn(folder, method)
    if how == "from_pretrained":
        model = tiny_llama()
    else:
        model = PeftModel.from_pretrained(tiny_llama(), saved[method] / "a", is_trainable=True)
    before, configs = snapshot(model), dict(getattr(model, "peft_config", {}))
    with pytest.raises(AdapterFileError) as info:
        if how == "from_pretrained":
            PeftModel.from_pretrained(model, folder)
        elif how == "load_adapter-new":
            model.load_adapter(folder, "other")
        elif how == "load_adapter-existing":
            model.load_adapter(folder, "default", is_trainable=True)
        else:
            file = folder / WEIGHTS
            set_peft_model_state_dict(model, read_adapter_tensors(
                file if file.exists() else folder / "adapter_model.bin"))
    assert needle in str(info.value), str(info.value)
    if how in ("from_pretrained", "load_adapter-new"):
        assert str(folder) in str(info.value)  # the message names the file
    assert_untouched(model, before)
    assert dict(getattr(model, "peft_config", {})) == configs


@pytest.mark.parametrize("method", list(METHODS))
def test_an_undamaged_save_loads_on_every_path(method, saved):
    reference = PeftModel.from_pretrained(tiny_llama(), saved[method] / "b")
    model = PeftModel.from_pretrained(tiny_llama(), saved[method] / "a", is_trainable=True)
    model.load_adapter(saved[method] / "b", "default")  # an existing name: Trainer's resume
    assert torch.equal(logits(model), logits(reference))
    if method == "qdota":
        return  # a QDoTA layer takes no second adapter
    model.load_adapter(saved[method] / "b", "other")
    model.set_adapter("other")
    assert torch.equal(logits(model), logits(reference))


def test_a_config_that_does_not_parse_is_refused_naming_the_file(saved, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(saved["dota"] / "a", folder)
    (folder / CONFIG).write_text('{"peft_type": "DOTA", "rank": ')
    with pytest.raises(AdapterFileError, match=str(folder / CONFIG)):
        DoTAConfig.from_pretrained(folder)
    record = json.loads((saved["dota"] / "a" / CONFIG).read_text())
    record["base_layers"] = {"model.layers.0.self_attn.q_proj": {"shape": "FOO"}}
    (folder / CONFIG).write_text(json.dumps(record))
    with pytest.raises(AdapterFileError, match="base_layers"):
        DoTAConfig.from_pretrained(folder)


def test_a_config_naming_another_method_is_refused(saved, tmp_path):
    folder = tmp_path / "relabelled"
    shutil.copytree(saved["lotr"] / "a", folder)
    record = json.loads((folder / CONFIG).read_text())
    record["peft_type"] = "LORTA"
    (folder / CONFIG).write_text(json.dumps(record))
    assert_load_refused(folder, AdapterFileError)


# ------------------------------------------------------------------ the whole base
def _changed(where):
    def build():
        model = tiny_llama()
        with torch.no_grad():
            model.get_parameter(where).view(-1)[0] += 0.25
        return model
    return build


OTHER_BASES = {
    "embeddings": _changed("model.embed_tokens.weight"),
    "a-norm": _changed("model.layers.1.input_layernorm.weight"),
    "non-target-gate_proj": _changed("model.layers.0.mlp.gate_proj.weight"),
    "final-norm": _changed("model.norm.weight"),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", list(OTHER_BASES))
def test_a_base_differing_outside_the_adapted_layers_is_refused(case, method, saved):
    assert_load_refused(saved[method] / "a", AdapterMismatchError, "outside the adapted layers",
                        OTHER_BASES[case]())


@pytest.mark.parametrize("method", ["dota", "lotr"])
def test_an_existing_name_load_of_another_bases_adapter_is_refused(method, tmp_path):
    other = get_peft_model(OTHER_BASES["embeddings"](), METHODS[method].replace())
    _step(other)
    other.save_pretrained(tmp_path / "other")
    model = get_peft_model(tiny_llama(), METHODS[method].replace())
    before = snapshot(model)
    with pytest.raises(AdapterMismatchError, match="another base"):
        model.load_adapter(tmp_path / "other", "default")
    assert_untouched(model, before)


def test_a_bfloat16_copy_of_the_base_is_the_same_base(saved):
    model = PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), saved["dota"] / "a")
    assert model.peft_config["default"].base_fingerprint.startswith("v2:base:")


def test_the_base_fingerprint_ignores_adapters_and_sees_every_weight():
    from tensornet.adapters.base import base_fingerprint, base_weights

    base = tiny_llama()
    names = set(dict(base.named_parameters()))
    fp = base_fingerprint(base)
    model = get_peft_model(base, METHODS["dota"].replace(modules_to_save=["lm_head"]))
    assert set(base_weights(model.base_model.model)) == names
    assert base_fingerprint(model.base_model.model) == fp
    _step(model)  # trains the adapter and the modules_to_save copy, not the base
    assert base_fingerprint(model.base_model.model) == fp


@pytest.mark.parametrize("method", ["dota", "lotr", "lorta"])
def test_from_pretrained_on_a_peft_model_is_refused_before_anything_changes(method, saved):
    model = get_peft_model(tiny_llama(), METHODS[method].replace())
    before = snapshot(model)
    configs = {k: v.to_dict() for k, v in model.peft_config.items()}
    with pytest.raises(ConfigError, match="load_adapter"):
        PeftModel.from_pretrained(model, saved[method] / "a")
    assert_untouched(model, before)
    assert {k: v.to_dict() for k, v in model.peft_config.items()} == configs


@pytest.mark.parametrize("method", list(METHODS))
def test_an_existing_name_load_of_another_rank_is_refused_before_any_copy(method, tmp_path):
    other = get_peft_model(tiny_llama(), METHODS[method].replace(rank=2))
    other.save_pretrained(tmp_path / "rank2")
    model = get_peft_model(tiny_llama(), METHODS[method].replace())  # rank 4
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="has shape"):
        model.load_adapter(tmp_path / "rank2", "default")
    assert_untouched(model, before)
