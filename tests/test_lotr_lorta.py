"""tensornet.adapters: LoTR and LoRTA as peft methods, on a tiny LLaMA (GQA: 4 and 2 heads).

The checks every adapter passes (unchanged output at init, only the factors train, merge ==
unmerged, disable / unload, dtype / device, save / load in a fresh process) are rows of the
conformance table in ``test_conformance.py``. Here is what the shared factors bring: they
live once on the tuner, are saved once under any adapter name, and follow peft's
trainability rules (``set_adapter``, ``disable_adapter``, added adapters, inference mode),
and reloads are exact. Then the method-specific checks: parameter counts against the core
formulas, LoRTA's head blocks against ``A diag(c) B`` by hand, contraction == dense update,
refused loads and configs. The tolerances are explained in :mod:`dota_helpers`.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from dota_helpers import (
    LORTA_FACTORS,
    adapted,
    adapter_layers,
    assert_load_refused,
    assert_untouched,
    expected_trainable,
    logits,
    snapshot,
    train,
)
from dota_helpers import LOTR_METHODS as METHODS
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from tensornet.adapters import (
    DoTAConfig,
    LoRTAConfig,
    LoTRConfig,
    apply_lorta,
    apply_lotr,
    lorta_num_params,
    lotr_num_params,
    plan_lorta,
    plan_lotr,
    tiny_llama,
)
from tensornet.adapters.files import MANIFEST_KEY
from tensornet.errors import (
    AdapterFileError,
    AdapterMismatchError,
    ConfigError,
    DTypeError,
    RankError,
    ShapeError,
)

METHOD_NAMES = list(METHODS)


def saved_keys(method, model):
    """Keys of the adapter file of ``model`` (the adapter name removed), and its manifest."""
    return {k.replace(".default", "") for k in expected_trainable(method, model)} | {
        MANIFEST_KEY}


def shared_flags(model, adapter):
    return {p.requires_grad for _, _, p in model.base_model.shared_parameters(adapter)}


def randomize(model, adapter="default"):
    """Give every factor of ``adapter`` random values (the update is zero at init)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (".lotr_" in name or ".lorta_" in name) and adapter in name.split("."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


# ============================================================ shared factors, saving, loading


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_shared_factors_are_registered_once_on_the_tuner(method):
    model = adapted(method)
    tuner = model.base_model
    shared = {id(p) for _, _, p in tuner.shared_parameters("default")}
    assert len(shared) == (10 if method.startswith("lotr") else 6)
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in shared]
    assert len(names) == len(shared)  # one name each: the layers do not register them
    assert all(n.startswith(("base_model.lotr_", "base_model.lorta_")) for n in names)
    state = [k for k in model.state_dict() if ".lotr_A" in k or ".lorta_A" in k]
    assert len(state) == (5 if method.startswith("lotr") else 1)
    layer = next(iter(adapter_layers(model).values()))
    containers = layer._lotr_shared if method.startswith("lotr") else list(
        layer._lorta_factors[0].values())
    assert all(any(c is m for m in tuner.children()) for c in containers)
    clone = copy.deepcopy(model)  # the plain-list references follow the copy
    clone_layer = next(iter(adapter_layers(clone).values()))
    cloned = clone_layer._lotr_shared if method.startswith("lotr") else list(
        clone_layer._lorta_factors[0].values())
    assert all(any(c is m for m in clone.base_model.children()) for c in cloned)
    assert not any(c is d for c, d in zip(cloned, containers))
    randomize(clone)
    assert torch.equal(logits(model), logits(tiny_llama()))
    assert not torch.equal(logits(clone), logits(tiny_llama()))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Train and save every method once: ``{method: (folder, logits, trained model)}``."""
    root = tmp_path_factory.mktemp("lotr_lorta")
    out = {}
    for method in METHOD_NAMES:
        model = adapted(method)
        train(model, steps=3)
        model.save_pretrained(root / method)
        out[method] = (root / method, logits(model), model)
    return out


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_reload_is_exact_and_frozen_unless_trainable(method, low_cpu_mem_usage, saved):
    folder, out, trained = saved[method]
    model = PeftModel.from_pretrained(tiny_llama(), folder, low_cpu_mem_usage=low_cpu_mem_usage)
    assert torch.equal(logits(model), out)
    here = {n: p for n, p in trained.named_parameters() if n in expected_trainable(method, model)}
    there = dict(model.named_parameters())
    assert here.keys() <= there.keys()
    for name, p in here.items():
        assert torch.equal(there[name], p), name
        assert (there[name].device, there[name].dtype) == (p.device, p.dtype), name
        assert not there[name].requires_grad, name  # inference mode
    again = PeftModel.from_pretrained(tiny_llama(), folder, is_trainable=True,
                                      low_cpu_mem_usage=low_cpu_mem_usage)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == set(here)


def test_saved_file_holds_each_shared_factor_once(saved):
    for method in METHOD_NAMES:
        folder, _, model = saved[method]
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
            keys = set(fh.keys())
        assert keys == saved_keys(method, model), method
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == ("LOTR" if method.startswith("lotr") else "LORTA")
        assert len(config["base_layers"]) == (10 if method.startswith("lotr") else 8)
        assert all(rec["fingerprint"].startswith("v2:") for rec in config["base_layers"].values())
    lorta = json.loads((saved["lorta"][0] / "adapter_config.json").read_text())
    rec = lorta["base_layers"]["model.layers.1.self_attn.k_proj"]["lorta"]
    assert rec == {"layer": 1, "proj": "k_proj", "d_model": 64, "d_head": 16, "heads": 4,
                   "kv_heads": 2, "layers": 2}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_named_adapters_share_nothing_and_switch(method, saved):
    folder, out, _ = saved[method]
    model = adapted(method)  # "default": fresh, at init
    model.load_adapter(folder, adapter_name="trained")  # the saved one, under another name
    tuner = model.base_model
    assert not shared_flags(model, "trained") - {False}  # loaded for inference
    assert torch.equal(logits(model), logits(tiny_llama()))
    model.set_adapter("trained")
    assert torch.equal(logits(model), out)
    ids_default = {id(p) for _, _, p in tuner.shared_parameters("default")}
    assert not ids_default & {id(p) for _, _, p in tuner.shared_parameters("trained")}
    model.save_pretrained(folder.parent / f"{method}-two")  # "trained" in a subfolder
    with safe_open(str(folder.parent / f"{method}-two" / "trained" / "adapter_model.safetensors"),
                   framework="pt") as fh:
        assert set(fh.keys()) == saved_keys(method, model)
    model.delete_adapter("trained")
    assert all("trained" not in getattr(tuner, name) for name in tuner.shared_containers)
    assert not any("trained" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_shared_factors_follow_peft_trainability_rules(method):
    model = adapted(method)
    layer_params = lambda a: {p.requires_grad for n, p in model.named_parameters()  # noqa: E731
                              if n.endswith(f".lotr_G.{a}")}
    model.add_adapter("other", METHODS[method].replace(seed=1))  # added: not trainable
    assert shared_flags(model, "default") == {True} and shared_flags(model, "other") == {False}
    model.add_adapter("frozen", METHODS[method].replace(inference_mode=True))
    assert shared_flags(model, "default") == {True}  # adding leaves the others alone
    assert shared_flags(model, "frozen") == {False}
    model.set_adapter("other")
    assert shared_flags(model, "default") == {False} and shared_flags(model, "other") == {True}
    if method == "lotr":
        assert layer_params("default") == {False} and layer_params("other") == {True}
    with model.disable_adapter():
        assert all(shared_flags(model, a) == {False} for a in ("default", "other", "frozen"))
        assert not any(p.requires_grad for p in model.parameters())
    assert shared_flags(model, "other") == {True} and shared_flags(model, "default") == {False}
    model.set_requires_grad("default", True)
    assert shared_flags(model, "default") == {True}
    model.base_model.set_adapter("other", inference_mode=True)
    assert shared_flags(model, "other") == {False}
    model.set_adapter("other")
    model.delete_adapter("other")  # the active one: peft activates (and unfreezes) "default"
    assert model.active_adapters == ["default"] and shared_flags(model, "default") == {True}
    assert shared_flags(model, "frozen") == {False}
    assert "other" not in model.base_model._shared_adapters()


@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_init_weights_false_is_seeded_and_away_from_the_base(method):
    a = adapted(method, init_weights=False)
    b = adapted(method, init_weights=False)
    assert not torch.equal(logits(a), logits(tiny_llama()))
    assert torch.equal(logits(a), logits(b))  # the seed fixes every factor
    c = adapted(method, init_weights=False, seed=1)
    assert not torch.equal(logits(a), logits(c))
    name = "lotr_G" if method == "lotr" else "lorta_B"
    assert all(p.abs().sum() > 0 for n, p in a.named_parameters() if name in n)


REFUSALS = {
    "lotr-other-weights": ("lotr", lambda: tiny_llama(seed=1), "fingerprint"),
    "lorta-other-weights": ("lorta", lambda: tiny_llama(seed=1), "fingerprint"),
    "lotr-other-shapes": ("lotr", lambda: tiny_llama(hidden_size=32), "in this model but"),
    "lorta-other-shapes": ("lorta", lambda: tiny_llama(hidden_size=32), "in this model but"),
    "lorta-other-depth": ("lorta", lambda: tiny_llama(num_hidden_layers=3), "other layers"),
    # same weights and shapes, but 8 heads of 8 (4 key/value heads): another CP tensor
    "lorta-other-heads": ("lorta", lambda: tiny_llama(num_attention_heads=8,
                                                      num_key_value_heads=4),
                          "has lorta"),
    # (a bfloat16 copy of the float32 base loads: tests/test_adapters_peft.py; float16 not)
    "lotr-float16-base": ("lotr", lambda: tiny_llama(dtype=torch.float16), "float16"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_mismatched_load_is_refused_and_model_untouched(case, saved):
    method, build, needle = REFUSALS[case]
    assert_load_refused(saved[method][0], (AdapterMismatchError, ConfigError), needle, build())


@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_damaged_file_is_refused_before_the_model_changes(method, saved, tmp_path):
    folder = saved[method][0]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if k.startswith(("base_model.lotr_", "base_model.lorta_")))[0]
    del tensors[key]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    assert_load_refused(tmp_path, AdapterFileError, "lacks")


# ============================================================ method-specific checks


def test_parameter_counts_match_the_core_formulas():
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64),
              "up_proj": (128, 64), "down_proj": (64, 128)}
    for rank in (1, 4):
        plan = plan_lotr(tiny_llama(), rank=rank)
        model = apply_lotr(tiny_llama(), rank=rank)
        numel = model.get_nb_trainable_parameters()[0]
        assert plan.trainable_params == numel == lotr_num_params(shapes, 2, rank)
        assert plan.method == "lotr" and len(plan.layers) == 10
        assert all(lay.num_params == rank * rank for lay in plan.layers)
        assert plan.extra["shared_params"] == numel - 10 * rank * rank
    for kv_heads, has_kv in ((2, True), (4, False)):  # GQA, then plain multi-head
        plan = plan_lorta(tiny_llama(num_key_value_heads=kv_heads), rank=4)
        model = apply_lorta(tiny_llama(num_key_value_heads=kv_heads), rank=4)
        numel = model.get_nb_trainable_parameters()[0]
        assert plan.trainable_params == numel == lorta_num_params(64, 16, 4, kv_heads, 2, 4)
        assert ("default" in model.base_model.lorta_C_kv_head) == has_kv
        assert plan.extra["gqa"] == has_kv and len(plan.layers) == 8
    assert lorta_num_params(64, 16, 4, 4, 2, 4) == 4 * (64 + 16 + 4 + 4 + 2)
    # only Q and O adapted: no K/V head factor even with GQA, two rows of C_matrix
    model = apply_lorta(tiny_llama(), rank=4, target_modules=["q_proj", "o_proj"])
    assert model.get_nb_trainable_parameters()[0] == 4 * (64 + 16 + 4 + 2 + 2)
    assert tuple(model.base_model.lorta_C_matrix["default"].shape) == (2, 4)


@pytest.mark.parametrize(("args", "error", "match"), [
    (({}, 2, 4), ShapeError, "`shapes_by_kind` must be a non-empty mapping"),
    (({"q": (4,)}, 2, 4), ShapeError, r"`shapes_by_kind\['q'\]` must be \(out_features, in"),
    (({"q": (4, 4, 4)}, 2, 4), ShapeError, r"`shapes_by_kind\['q'\]` must be \(out_features"),
    (({"q": (4, 0)}, 2, 4), ShapeError, r"`shapes_by_kind\['q'\]`"),
    (({"q": (4, 4)}, 0, 4), ShapeError, "`num_layers` must be an int >= 1"),
    (({"q": (4, 4)}, 2.5, 4), DTypeError, "`num_layers` must be an int >= 1"),
    (({"q": (4, 4)}, 2, 0), RankError, "`rank` must be a positive int"),
])
def test_lotr_num_params_refuses_bad_input_with_a_tensornet_error(args, error, match):
    with pytest.raises(error, match=match):
        lotr_num_params(*args)


def test_plan_on_meta_device_counts_without_weights():
    with torch.device("meta"):
        model = tiny_llama()
    assert plan_lorta(model).trainable_params == lorta_num_params(64, 16, 4, 2, 2, 16)
    assert plan_lotr(model, rank=4).trainable_params == 2976
    with pytest.raises(ConfigError, match="meta"):
        apply_lotr(model)


@pytest.mark.parametrize(("proj", "head"), [("q_proj", 2), ("k_proj", 1), ("v_proj", 0),
                                            ("o_proj", 3)])
def test_lorta_head_block_is_a_diag_c_b(proj, head):
    model = randomize(adapted("lorta"))
    f = {name: getattr(model.base_model, f"lorta_{name}")["default"] for name in LORTA_FACTORS}
    layer_index, dh = 1, 16
    layer = model.base_model.model.get_submodule(f"model.layers.{layer_index}.self_attn.{proj}")
    m = ("q_proj", "k_proj", "v_proj", "o_proj").index(proj)
    heads = f["C_kv_head"] if proj in ("k_proj", "v_proj") else f["C_head"]
    c = heads[head] * f["C_matrix"][m] * f["C_layer"][layer_index]
    block = (f["A"] @ torch.diag(c) @ f["B"]).detach()  # (d_model, d_head)
    delta = layer.get_delta_weight("default")
    rows = slice(head * dh, (head + 1) * dh)
    if proj == "o_proj":  # W_o is (d_model, H d_head): heads along the input side
        assert delta.shape == (64, 64)
        torch.testing.assert_close(delta[:, rows], block)
    else:  # W_q, W_k, W_v are (H d_head, d_model): heads along the output side
        assert delta.shape == ((4 if proj == "q_proj" else 2) * dh, 64)
        torch.testing.assert_close(delta[rows, :], block.T)


@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_contraction_equals_the_dense_update(method):
    model = randomize(adapted(method, **({"scale": 0.5} if method == "lotr" else {})))
    x = torch.randn(3, 5, 128)
    for name, layer in adapter_layers(model).items():
        xi = x[..., : layer.in_features]
        with torch.no_grad():
            got = layer(xi)
            want = F.linear(xi, layer.get_base_layer().weight + layer.get_delta_weight("default"))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
    if method == "lotr":
        layer = model.base_model.model.model.layers[1].mlp.up_proj
        a = model.base_model.lotr_A["default"]["up_proj"]
        b = model.base_model.lotr_B["default"]["up_proj"]
        torch.testing.assert_close(layer.get_delta_weight("default"),
                                   (0.5 * a @ layer.lotr_G["default"] @ b).detach())


@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_two_active_adapters_add_up(method):
    model = randomize(adapted(method))
    model.add_adapter("other", METHODS[method].replace(seed=1))
    randomize(model, "other")
    x = torch.randn(2, 64)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        got = layer(x)
        w = layer.get_base_layer().weight
        want = F.linear(x, w + layer.get_delta_weight("default") + layer.get_delta_weight("other"))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_forward_saves_no_dense_update(method):
    model = randomize(adapted(method))
    name = "model.layers.0.self_attn.o_proj" if method == "lorta" else "model.layers.0.mlp.up_proj"
    layer = model.base_model.model.get_submodule(name)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    saved_tensors = []

    def pack(t):
        saved_tensors.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    weight = layer.get_base_layer().weight
    dense = {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    for t in saved_tensors:
        if tuple(t.shape) in dense:
            assert t.data_ptr() == weight.data_ptr()  # W0 itself, no update
        assert t.numel() <= max(x.numel(), weight.numel()), t.shape


def test_lotr_kinds_with_different_shapes_are_refused():
    model = nn.Sequential(OrderedDict(
        a=nn.Sequential(OrderedDict(proj=nn.Linear(8, 8))),
        b=nn.Sequential(OrderedDict(proj=nn.Linear(8, 4))),
    ))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"'proj'.*a\.proj: 8x8, b\.proj: 4x8"):
        apply_lotr(model, target_modules=["proj"], rank=2)
    assert_untouched(model, before)


BAD_CONFIGS = {
    "lotr-rank-0": (apply_lotr, {"rank": 0}, ["`rank`", "got 0"]),
    "lotr-init": (apply_lotr, {"init": "uniform"}, ["`init`", "'uniform'", "'orthogonal'"]),
    "lotr-scale-0": (apply_lotr, {"scale": 0}, ["`scale`", "got 0"]),
    "lotr-seed": (apply_lotr, {"seed": "0"}, ["`seed`", "'0'"]),
    "lotr-unknown": (apply_lotr, {"alpha": 8}, ["alpha", "LoTRConfig", "scale"]),
    "lotr-targets": (apply_lotr, {"target_modules": ["nope"]}, ["`target_modules`", "nope"]),
    "lotr-orthogonal-rank": (apply_lotr, {"init": "orthogonal", "rank": 40},
                             ["`rank`", "32", "'k_proj'", "got 40"]),
    "lorta-targets": (apply_lorta, {"target_modules": ["up_proj"]},
                      ["`target_modules`", "'up_proj'", "'o_proj'"]),
    "lorta-regex": (apply_lorta, {"target_modules": "q_proj"}, ["`target_modules`", "subset"]),
    "lorta-repeats": (apply_lorta, {"target_modules": ["q_proj", "q_proj"]}, ["repeats"]),
    "lorta-rank": (apply_lorta, {"rank": -1}, ["`rank`", "got -1"]),
    "lorta-scale": (apply_lorta, {"scale": float("nan")}, ["`scale`", "nan"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_raises_config_error_naming_the_field(case):
    apply, overrides, needles = BAD_CONFIGS[case]
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        apply(model, **overrides)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert isinstance(info.value, ValueError)
    assert_untouched(model, before)


def test_configs_come_back_from_json_with_lists():
    for cfg in (LoTRConfig(rank=4, target_modules=("q_proj", "v_proj")),
                LoRTAConfig(target_modules=("q_proj", "v_proj"))):
        again = type(cfg)(**json.loads(json.dumps(cfg.to_dict())))
        assert again.target_modules == ["q_proj", "v_proj"]
        assert again.to_dict() == cfg.to_dict()


def test_lorta_needs_a_transformers_config_and_refuses_adapted_models():
    with pytest.raises(ConfigError, match="model.config"):
        apply_lorta(nn.Sequential(nn.Linear(4, 4)))
    model = adapted("lorta")
    with pytest.raises(ConfigError, match="already"):
        apply_lotr(model)
    with pytest.raises(ConfigError, match="LoRTAConfig"):
        apply_lorta(tiny_llama(), LoTRConfig())
    with pytest.raises(ConfigError, match="LoTRConfig"):
        apply_lotr(tiny_llama(), DoTAConfig())


def test_a_failed_injection_leaves_the_model_as_it_was(monkeypatch):
    from tensornet.adapters.lorta import model as lorta_model

    base = tiny_llama()
    before = snapshot(base)
    calls = []

    def fail(*args, **kwargs):  # the 5th projection fails while it is being built
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    real = lorta_model.LoRTAIndex
    monkeypatch.setattr(lorta_model, "LoRTAIndex", fail)
    with pytest.raises(RuntimeError, match="boom"):
        get_peft_model(base, LoRTAConfig(seed=0))
    assert_untouched(base, before)


# ============================================================ the real model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_smollm2_unchanged_at_init_and_trains(method):
    from tensornet.adapters import load_pretrained

    model, tok = load_pretrained()
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
    model = (apply_lotr if method == "lotr" else apply_lorta)(model, seed=0)
    if method == "lorta":
        assert model.get_nb_trainable_parameters()[0] == lorta_num_params(
            576, 64, 9, 3, 30, 16) == 10976
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(after) and after.item() != loss.item()
