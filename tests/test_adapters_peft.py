"""DoTA through peft's lifecycle: files, named adapters, refused loads, undo on failure.

What the design promises beyond the conformance table of ``test_adapters.py``:

* ``get_peft_model`` / ``print_trainable_parameters`` / ``save_pretrained`` write a small
  adapter-only file (cores and initial cores, no base weight) that ``PeftModel.from_pretrained``
  restores bit for bit, also as one of several named adapters that do not disturb each
  other (``load_adapter``, ``set_adapter``, ``delete_adapter``, ``disable_adapter``);
* QDoTA's base is its NF4 residual: ``unload()`` and ``delete_adapter`` are refused with a
  tensornet error, before anything changes;
* a saved adapter is refused, before the model is touched, by another base model (naming
  the layer), by a base in another dtype, and when its weights file is damaged;
* a layer failing while being installed leaves the model exactly as it was;
* the caller's config object stays usable for another model.

References: the unadapted base (``tiny_llama``, same seed) for disable and unload, and a
snapshot of every module, parameter and flag for "untouched". Tolerances: see
:mod:`dota_helpers`.
"""

from __future__ import annotations

import json
import shutil
import warnings

import dota_helpers as helpers
import pytest
import torch
from dota_helpers import (
    METHOD_NAMES,
    TINY_TARGETS,
    adapted,
    assert_untouched,
    cores,
    dota_layers,
    dtype_tolerance,
    logits,
    snapshot,
    train,
)
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tensornet.adapters import DoTAConfig, DoTALinear, LoRTAConfig, LoTRConfig, tiny_llama
from tensornet.adapters.dota import model as dota_model
from tensornet.adapters.files import MANIFEST_KEY
from tensornet.errors import AdapterFileError, AdapterMismatchError, ConfigError, TensornetError

WEIGHTS = "adapter_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Copies of an adapter's tensors (T and T_init), keyed as in the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if (".dota_cores." in k or ".dota_init." in k) and f".{adapter}." in k}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two trained adapters on the tiny LLaMA: ``a`` (DoTA) and ``b`` (DoTA-Random, R=8)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name, config in (("a", DoTAConfig()), ("b", DoTAConfig(init="random", seed=1, rank=8))):
        model = get_peft_model(tiny_llama(), config)
        train(model, steps=3)
        model.save_pretrained(root / name)
        out[name] = {"path": root / name, "logits": logits(model), "state": adapter_state(model)}
    return out


# ============================================================ files


def test_print_trainable_parameters_counts_the_cores(capsys):
    model = get_peft_model(tiny_llama(), DoTAConfig(rank=8, num_cores=5))
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    n_cores = sum(c.numel() for layer in dota_layers(model).values() for c in cores(layer))
    n_base = sum(p.numel() for p in tiny_llama().parameters())
    assert f"trainable params: {n_cores:,} || all params: {n_base + n_cores:,}" in printed
    assert model.get_nb_trainable_parameters() == (n_cores, n_base + n_cores)


def test_save_pretrained_writes_a_small_adapter_only_file(saved):
    path = saved["a"]["path"]
    assert {"adapter_config.json", WEIGHTS} <= {p.name for p in path.iterdir()}
    assert not list(path.glob("model*.safetensors")) and not list(path.glob("*.bin"))
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "DOTA" and sorted(config["base_layers"]) == sorted(TINY_TARGETS)
    with safe_open(str(path / WEIGHTS), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    # exactly T and T_init of every target layer, nothing of the base
    expected = {f"base_model.model.{name}.dota_{kind}.{k}"
                for name in TINY_TARGETS for kind in ("cores", "init") for k in range(5)}
    # ... plus the manifest: the tensors' digests and the base's fingerprint (uint8 JSON)
    assert set(shapes) == expected | {MANIFEST_KEY}
    manifest = shapes.pop(MANIFEST_KEY)[0]
    n_cores = sum(v.numel() for k, v in saved["a"]["state"].items() if ".dota_cores." in k)
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    assert numel == 2 * n_cores
    size = (path / WEIGHTS).stat().st_size
    assert 4 * numel + manifest < size < 4 * numel + manifest + 16_384  # plus the header


def test_the_adapter_file_is_far_smaller_than_the_model(tmp_path):
    # (at the default R=16 the tiny model's cores are about as large as the tiny model; at
    # R=4 the proportion is that of R=16 on a real model: SmolLM2-135M's is ~1%)
    model = get_peft_model(tiny_llama(), DoTAConfig(rank=4))
    model.save_pretrained(tmp_path / "adapter")
    tiny_llama().save_pretrained(tmp_path / "model")
    adapter = (tmp_path / "adapter" / WEIGHTS).stat().st_size
    full = sum(f.stat().st_size for f in (tmp_path / "model").glob("*.safetensors"))
    assert adapter < full / 5, (adapter, full)


def test_from_pretrained_restores_the_trained_model_bit_for_bit(saved):
    # (the same in a fresh Python process: test_adapters.py's fresh_process fixture)
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"]["path"])
    assert torch.equal(logits(model), saved["a"]["logits"])
    state = adapter_state(model)
    assert state.keys() == saved["a"]["state"].keys()
    for k, v in saved["a"]["state"].items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    # inference by default (peft's rule); is_trainable=True trains T, never T_init
    assert not any(p.requires_grad for p in model.parameters())
    again = PeftModel.from_pretrained(tiny_llama(), saved["a"]["path"], is_trainable=True)
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable == {k for k in state if ".dota_cores." in k}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_merge_and_unload_after_reload_matches_the_unmerged_outputs(method, tmp_path):
    model = adapted(method, init_weights=False, seed=0)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    unmerged = logits(reloaded)
    assert torch.equal(unmerged, logits(model))
    merged = reloaded.merge_and_unload(safe_merge=True)
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in TINY_TARGETS)
    tol = dtype_tolerance(torch.bfloat16 if method == "qdota" else torch.float32)
    assert (logits(merged) - unmerged).abs().max().item() <= tol


def test_safe_merge_refuses_a_non_finite_adapter():
    model = adapted("dota")
    with torch.no_grad():
        cores(dota_layers(model)["model.layers.0.self_attn.q_proj"])[2].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)


# ============================================================ named adapters


def test_named_adapters_do_not_disturb_each_other(saved):
    a, b = saved["a"], saved["b"]
    model = PeftModel.from_pretrained(tiny_llama(), a["path"])
    model.load_adapter(b["path"], "b")
    assert model.active_adapters == ["default"]  # loading does not switch
    assert torch.equal(logits(model), a["logits"])
    assert all(torch.equal(v, a["state"][k]) for k, v in adapter_state(model).items())
    model.set_adapter("b")
    assert torch.equal(logits(model), b["logits"])
    with model.disable_adapter():
        assert torch.equal(logits(model), helpers.base_logits())
    model.set_adapter("default")
    assert torch.equal(logits(model), a["logits"])

    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"]
    assert not [k for k in model.state_dict() if ".b." in k]
    assert torch.equal(logits(model), a["logits"])
    # "b" again, then the other way round: delete the active one
    model.load_adapter(b["path"], "b")
    model.set_adapter("b")
    model.delete_adapter("default")
    assert model.active_adapters == ["b"]
    assert torch.equal(logits(model), b["logits"])
    unloaded = model.unload()
    assert not dota_layers(unloaded)
    assert torch.equal(logits(unloaded), helpers.base_logits())


def test_an_added_adapter_trains_alone(saved):
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"]["path"], is_trainable=True)
    model.add_adapter("x", DoTAConfig(init="random", seed=3))
    assert model.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".x." in n)
    model.set_adapter("x")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".dota_cores.x." in n for n in trainable)
    train(model, steps=2)
    moved = adapter_state(model, "x")
    assert any(not torch.equal(v, moved[k.replace("dota_cores", "dota_init")])
               for k, v in moved.items() if ".dota_cores." in k)
    for k, v in saved["a"]["state"].items():  # "default" untouched by x's training
        assert torch.equal(model.state_dict()[k], v), k
    model.set_adapter("default")
    assert torch.equal(logits(model), saved["a"]["logits"])


def test_two_active_adapters_add_their_updates():
    model = adapted("dota", init_weights=False, seed=0)
    model.add_adapter("r", DoTAConfig(init="random", seed=1, init_weights=False))
    layer = dota_layers(model)["model.layers.0.self_attn.q_proj"]
    model.base_model.set_adapter(["default", "r"])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    w0 = layer.get_base_layer().weight.detach().double()
    w = w0 + (layer.get_delta_weight("default").double() + layer.get_delta_weight("r").double())
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y.double(), x.double() @ w.T, atol=1e-5, rtol=1e-5)


def test_modules_to_save_trains_is_saved_and_restored(tmp_path):
    model = get_peft_model(tiny_llama(), DoTAConfig(modules_to_save=["model.norm"], seed=0))
    norm = "base_model.model.model.norm.modules_to_save.default.weight"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert norm in trainable
    original = tiny_llama().model.norm.weight.detach().clone()
    train(model, steps=3, lr=5e-2)
    trained = model.get_parameter(norm).detach().clone()
    assert not torch.equal(trained, original)
    wrapper = model.get_base_model().model.norm
    assert torch.equal(wrapper.original_module.weight, original)  # the base copy stays
    out = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), helpers.base_logits())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as fh:
        assert "base_model.model.model.norm.weight" in set(fh.keys())
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(reloaded.get_parameter(norm), trained)
    assert torch.equal(logits(reloaded), out)


# ============================================================ QDoTA's base is its residual


def test_qdota_delete_adapter_is_refused_before_anything_changes():
    model = adapted("qdota", init_weights=False, seed=0)
    out, before = logits(model), snapshot(model)
    with pytest.raises(ConfigError, match="merge_and_unload") as info:
        model.delete_adapter("default")
    assert isinstance(info.value, TensornetError)
    assert_untouched(model, before)
    assert list(model.peft_config) == ["default"]
    assert torch.equal(logits(model), out)


def test_qdota_layer_takes_no_other_adapter():
    model = adapted("qdota")
    before = snapshot(model)
    for config in (DoTAConfig(init="random", seed=0), DoTAConfig(quantize="nf4")):
        with pytest.raises(ConfigError, match="already has a DoTA adapter"):
            model.add_adapter("other", config)
        assert_untouched(model, before)
        assert list(model.peft_config) == ["default"]
    plain = adapted("dota")  # and a layer with a plain adapter takes no QDoTA one
    before = snapshot(plain)
    with pytest.raises(ConfigError, match="already has a DoTA adapter"):
        plain.add_adapter("q", DoTAConfig(quantize="nf4"))
    assert_untouched(plain, before)


# ============================================================ refused loads


def _last_layer_differs() -> nn.Module:
    model = tiny_llama()
    with torch.no_grad():  # only the LAST target differs: nothing may be installed before it
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    return model


OTHER_BASES = {
    "other-weights": (lambda: tiny_llama(seed=1), ["model.layers.0.self_attn.q_proj",
                                                     "fingerprint"]),
    "last-layer-differs": (_last_layer_differs, ["model.layers.1.mlp.down_proj", "fingerprint"]),
    # a float16 copy of the float32 base: its own rounding makes other bfloat16 words
    "float16-copy": (lambda: tiny_llama(dtype=torch.float16),
                     ["fingerprint", "float16", "float32"]),
    "other-shapes": (lambda: tiny_llama(hidden_size=128, intermediate_size=256),
                     ["model.layers.0.self_attn.q_proj", "128x128", "another base model"]),
    "other-layers": (lambda: tiny_llama(num_hidden_layers=3), ["model.layers.2."]),
}


@pytest.mark.parametrize("case", list(OTHER_BASES))
def test_loading_into_another_base_is_refused_and_model_untouched(case, saved):
    build, needles = OTHER_BASES[case]
    model = build()
    before = snapshot(model)
    with pytest.raises(AdapterMismatchError) as info:
        PeftModel.from_pretrained(model, saved["a"]["path"])
    assert isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert_untouched(model, before)
    assert not dota_layers(model)


def test_load_adapter_into_another_base_is_refused_and_model_untouched(saved):
    model = get_peft_model(tiny_llama(seed=1), DoTAConfig(init="random", seed=0))
    before = snapshot(model)
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        model.load_adapter(saved["a"]["path"], "a")
    assert_untouched(model, before)
    assert list(model.peft_config) == ["default"]


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _edit(fn):
    def apply(file):
        tensors = load_file(str(file))
        key = sorted(k for k in tensors if ".dota_cores." in k)[3]
        fn(tensors, key)
        save_file(tensors, str(file))
    return apply


def _nan(tensors, key):
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")


def _drop_init(tensors, key):
    del tensors[key.replace(".dota_cores.", ".dota_init.")]


DAMAGES = {
    "truncated": (_truncate, "truncated"),
    "missing-core": (_edit(lambda t, k: t.pop(k)), "lacks 1 tensor"),
    "missing-initial-core": (_edit(_drop_init), "lacks 1 tensor"),
    "misshapen-core": (_edit(lambda t, k: t.__setitem__(k, torch.zeros(2, 3))), "shape [2, 3]"),
    "nan": (_edit(_nan), "NaN"),
}


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_weights_file_is_refused_before_the_model_is_touched(damage, how, saved,
                                                                        tmp_path):
    damage_fn, needle = DAMAGES[damage]
    path = tmp_path / "damaged"
    shutil.copytree(saved["a"]["path"], path)
    damage_fn(path / WEIGHTS)
    model = tiny_llama() if how == "from_pretrained" else adapted("dota-random")
    before = snapshot(model)
    with pytest.raises(AdapterFileError) as info:
        if how == "from_pretrained":
            PeftModel.from_pretrained(model, path)
        else:
            model.load_adapter(path, "damaged")
    message = str(info.value)
    assert str(path / WEIGHTS) in message and needle in message, message
    assert isinstance(info.value, ValueError)
    assert_untouched(model, before)
    if how == "load_adapter":
        assert list(model.peft_config) == ["default"]


# ============================================================ undo on failure


class Boom(RuntimeError):
    pass


def _fail_on_fifth(monkeypatch, owner, name):
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Boom("simulated failure while installing the 5th layer")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


FAILURE_POINTS = {
    "create_and_replace": lambda mp: _fail_on_fifth(mp, dota_model.DoTAModel,
                                                    "create_and_replace"),
    "initial-cores": lambda mp: _fail_on_fifth(mp, dota_model, "_initial_cores"),
    "layer-constructor": lambda mp: _fail_on_fifth(mp, DoTALinear, "__init__"),
}


@pytest.mark.parametrize("where", list(FAILURE_POINTS))
def test_a_failure_on_the_fifth_layer_leaves_the_model_as_it_was(where, monkeypatch):
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)  # a user's own flag, to be kept
    before = snapshot(model)
    calls = FAILURE_POINTS[where](monkeypatch)
    with pytest.raises(Boom):
        get_peft_model(model, DoTAConfig())
    assert len(calls) == 5  # four layers were installed before the failure
    assert_untouched(model, before)
    assert not dota_layers(model) and not hasattr(model, "peft_config")
    monkeypatch.undo()  # and the model takes the adapter as a fresh one would
    again = get_peft_model(model, DoTAConfig())
    assert len(dota_layers(again)) == 10
    assert torch.equal(logits(again), logits(get_peft_model(tiny_llama(), DoTAConfig())))


@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
def test_a_failure_adding_a_second_adapter_leaves_the_first_alone(how, saved, monkeypatch):
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"]["path"])
    before, out = snapshot(model), logits(model)
    calls = _fail_on_fifth(monkeypatch, DoTALinear, "update_layer")
    with pytest.raises(Boom):
        if how == "add_adapter":
            model.add_adapter("b", DoTAConfig(init="random", seed=1, rank=8))
        else:
            model.load_adapter(saved["b"]["path"], "b")
    assert len(calls) == 5
    assert_untouched(model, before)
    assert list(model.peft_config) == ["default"]
    assert all(list(layer.dota_cores) == ["default"] for layer in dota_layers(model).values())
    assert torch.equal(logits(model), out)


# ============================================================ dtype casts and configs


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cast_to_bf16_then_merge_and_unload(method):
    model = adapted(method, init_weights=False, seed=0).to(torch.bfloat16)
    with torch.no_grad():
        unmerged = model(input_ids=torch.arange(3, 11)[None]).logits
    assert unmerged.dtype == torch.bfloat16
    merged = model.merge_and_unload()
    for name in TINY_TARGETS:
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16, name
    with torch.no_grad():  # the next forward runs (no float32/bf16 mix) and agrees
        after = merged(input_ids=torch.arange(3, 11)[None]).logits
    assert after.dtype == torch.bfloat16
    err = (after.float() - unmerged.float()).abs().max().item()
    assert err <= dtype_tolerance(torch.bfloat16), err


def test_one_config_object_serves_two_models(tmp_path):
    # peft keeps the caller's object as the adapter's config (its own tests check that);
    # what must hold is that the object stays usable and each model saves its own base
    config = DoTAConfig(rank=8, target_modules=["q_proj", "v_proj"])
    written = ("base_layers", "base_fingerprint")  # the records tensornet writes
    fields = {k: v for k, v in config.to_dict().items() if k not in written}
    first = get_peft_model(tiny_llama(), config)
    second = get_peft_model(tiny_llama(seed=1), config)
    assert {k: v for k, v in config.to_dict().items() if k not in written} == fields
    assert len(dota_layers(first)) == len(dota_layers(second)) == 4
    records = {}
    for name, model, seed in (("first", first, 0), ("second", second, 1)):
        train(model, steps=1)
        model.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        records[name] = {k: r["fingerprint"] for k, r in saved["base_layers"].items()}
        # each saved adapter describes its own base: it reloads there, and not into the other
        again = PeftModel.from_pretrained(tiny_llama(seed=seed), tmp_path / name)
        assert torch.equal(logits(again), logits(model))
        with pytest.raises(AdapterMismatchError, match="fingerprint"):
            PeftModel.from_pretrained(tiny_llama(seed=1 - seed), tmp_path / name)
    assert records["first"].keys() == records["second"].keys()
    assert all(records["first"][k] != records["second"][k] for k in records["first"])


def test_the_table_configs_are_never_changed_by_use():
    data = {m: c.to_dict() for m, c in helpers.METHODS.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in helpers.METHODS:
            adapted(m)
    assert {m: c.to_dict() for m, c in helpers.METHODS.items()} == data


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["dota", "qdota", "lotr", "lorta"])
def test_an_adapter_trained_on_float32_loads_onto_the_base_in_another_dtype(
        method, dtype, tmp_path):
    """peft users load float32-trained adapters onto bfloat16 bases: the fingerprint is
    the same for float32, bfloat16 and float64 copies of one base (issue 22, point 4)."""
    if method == "qdota" and dtype == torch.float64:
        pytest.skip("QDoTA computes in float32/bfloat16/float16 only (bitsandbytes)")
    config = {"dota": DoTAConfig(), "qdota": DoTAConfig(quantize="nf4"),
              "lotr": LoTRConfig(rank=4), "lorta": LoRTAConfig(rank=4)}[method]
    model = get_peft_model(tiny_llama(), config)
    train(model, steps=1)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        want = model(input_ids=helpers.IDS).logits.float()
    other = PeftModel.from_pretrained(tiny_llama(dtype=dtype), tmp_path)
    with torch.no_grad():
        got = other(input_ids=helpers.IDS).logits.float()
    tol = 1e-6 if dtype == torch.float64 else dtype_tolerance(torch.bfloat16)
    assert (got - want).abs().max().item() <= max(tol, 2e-2 if method == "qdota" else 0)
