"""tensornet.adapters: LoTR and LoRTA on a tiny LLaMA (4 heads, 2 key/value heads: GQA).

A conformance table in peft's ``TEST_CASES`` style (:data:`METHODS`: LoTR with normal and
orthogonal init, LoRTA) goes through the checks DoTA passes: unchanged output at init,
only the factors train, an optimizer step helps, merge == unmerged, unapply restores the
base exactly, save / load in a fresh process, dtype / device follow the base. Then the
method-specific checks: parameter counts against the core formulas, LoRTA's head blocks
against ``A diag(c) B`` by hand, contraction == dense update, refused loads, config errors.

Tolerances: both methods add an update that is exactly zero at init (``G = 0``,
``B = 0``), so outputs at init are compared with ``torch.equal``. After training, float32
merged vs unmerged agree to 1e-5; bfloat16 within 4 units of the bf16 compute noise of
the model (as in test_adapters.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from tensornet import lorta_num_params, lotr_num_params
from tensornet.adapters import (
    DoTAConfig,
    LoRTAConfig,
    LoRTALinear,
    LoTRConfig,
    LoTRLinear,
    apply_dota,
    apply_lorta,
    apply_lotr,
    load_adapter,
    merge,
    plan_lorta,
    plan_lotr,
    save_adapter,
    tiny_llama,
    unapply,
)
from tensornet.errors import AdapterMismatchError, ConfigError

REPO = Path(__file__).resolve().parents[1]

METHODS = {
    "lotr": (apply_lotr, LoTRConfig(seed=0)),
    "lotr-orthogonal": (apply_lotr, LoTRConfig(init="orthogonal", rank=8, seed=0, scale=2.0)),
    "lorta": (apply_lorta, LoRTAConfig(seed=0)),
}
METHOD_NAMES = list(METHODS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1234))
KINDS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def adapted(method, dtype=torch.float32, **overrides):
    apply, cfg = METHODS[method]
    model = tiny_llama(dtype=dtype)
    apply(model, cfg.replace(**overrides))
    return model


def adapter_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoTRLinear, LoRTALinear))}


def train(model, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(IDS, labels=IDS).loss.item())
    return losses


def expected_trainable(method, model):
    if method.startswith("lotr"):
        names = {f"tensornet_lotr.{k}.{f}" for k in KINDS for f in "AB"}
        return names | {f"{n}.G" for n in adapter_layers(model)}
    return {f"tensornet_lorta.{f}" for f in ("A", "B", "C_head", "C_kv_head", "C_matrix",
                                            "C_layer")}


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": sorted(vars(model)),
    }


def assert_untouched(model, before):
    after = snapshot(model)
    for key in ("types", "grad", "attrs"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


_BF16_NOISE: list[float] = []


def tolerance(dtype):
    if dtype == torch.float32:
        return 1e-5
    if not _BF16_NOISE:
        bf16 = logits(tiny_llama(dtype=torch.bfloat16))
        _BF16_NOISE.append((bf16 - logits(tiny_llama(dtype=torch.bfloat16).float())).abs().max())
    return 4 * _BF16_NOISE[0].item()


# ============================================================ the conformance table


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_output_unchanged_at_init(method, dtype):
    dt = DTYPES[dtype]
    assert torch.equal(logits(adapted(method, dt)), logits(tiny_llama(dtype=dt)))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_only_factors_train_and_all_get_gradients_after_a_step(method):
    model = adapted(method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(method, model)
    train(model, steps=1)  # B = 0 / G = 0: some factors get a zero gradient at step 0 only
    for p in model.parameters():
        p.grad = None
    model(IDS, labels=IDS).loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_shared_factors_are_registered_once(method):
    model = adapted(method)
    container = "tensornet_lotr" if method.startswith("lotr") else "tensornet_lorta"
    shared = {n for n, _ in getattr(model, container).named_parameters()}
    keys = list(model.state_dict())
    for n in shared:
        assert [k for k in keys if k.endswith("." + n) or k == n] == [f"{container}.{n}"]
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    layer = next(iter(adapter_layers(model).values()))
    assert layer.shared is getattr(model, container) or layer.shared in getattr(
        model, container).children()
    clone = copy.deepcopy(model)  # the plain-list reference follows the copy
    clone_layer = next(iter(adapter_layers(clone).values()))
    assert clone_layer.shared is not layer.shared
    assert any(clone_layer.shared is m for m in clone.modules())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_optimizer_steps_lower_the_loss(method):
    losses = train(adapted(method), steps=4)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_merge_equals_unmerged(method, dtype):
    dt = DTYPES[dtype]
    model = adapted(method, dt)
    train(model, steps=3)
    before = logits(model)
    assert (before - logits(tiny_llama(dtype=dt))).abs().max() > 1e-3
    targets = list(adapter_layers(model))
    assert merge(model) is model
    assert not adapter_layers(model)
    assert not hasattr(model, "_tensornet_adapter")
    assert not hasattr(model, "tensornet_lotr") and not hasattr(model, "tensornet_lorta")
    for name in targets:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == dt, name
    assert all(p.requires_grad for p in model.parameters())  # tiny_llama's flags
    assert (logits(model) - before).abs().max().item() <= tolerance(dt)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_unapply_restores_the_base_exactly(method):
    model = adapted(method)
    train(model, steps=2)
    assert unapply(model) is model
    assert not adapter_layers(model)
    assert model.state_dict().keys() == tiny_llama().state_dict().keys()
    for k, v in tiny_llama().state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_dtype_and_device_follow_the_base(method):
    model = adapted(method, torch.bfloat16)
    for name in expected_trainable(method, model):
        p = model.get_parameter(name)
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu", name
    assert model(IDS).logits.dtype == torch.bfloat16


_FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from tensornet.adapters import load_adapter, tiny_llama
    spec = json.loads(sys.argv[1])
    ids = torch.tensor(spec["ids"])
    for job in spec["jobs"]:
        model = tiny_llama()
        report = load_adapter(model, job["path"])
        assert report.method == job["method"], report.method
        with torch.no_grad():
            torch.save(model(ids).logits, job["out"])
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Train and save every method (and a DoTA adapter) once: ``{case: (folder, logits)}``."""
    root = tmp_path_factory.mktemp("lotr_lorta")
    out = {}
    for method in METHOD_NAMES:
        model = adapted(method)
        train(model, steps=3)
        save_adapter(model, root / method)
        out[method] = (root / method, logits(model))
    dota = tiny_llama()
    apply_dota(dota, progress=False)
    save_adapter(dota, root / "dota")
    out["dota"] = (root / "dota", None)
    return out


def test_save_load_in_a_fresh_process_reproduces_logits(saved, tmp_path):
    jobs = [
        {"path": str(saved[m][0]), "out": str(tmp_path / f"{m}.pt"),
         "method": "lotr" if m.startswith("lotr") else "lorta"}
        for m in METHOD_NAMES
    ]
    spec = json.dumps({"ids": IDS.tolist(), "jobs": jobs})
    subprocess.run([sys.executable, "-c", _FRESH_SCRIPT, spec], check=True, cwd=REPO,
                   timeout=300)
    for m, job in zip(METHOD_NAMES, jobs):
        got = torch.load(job["out"]).float()
        assert torch.allclose(got, saved[m][1], atol=1e-6, rtol=0), m


def test_saved_file_holds_each_shared_factor_once(saved):
    from safetensors import safe_open

    with safe_open(str(saved["lotr"][0] / "adapter.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        meta = json.loads(fh.metadata()["tensornet"])
    assert keys == {f"tensornet_lotr.{k}.{f}" for k in KINDS for f in "AB"} | {
        f"{lay['name']}.G" for lay in meta["layers"]}
    assert meta["method"] == "lotr" and meta["config"]["rank"] == 16
    assert all(len(lay["fingerprint"]) == 32 for lay in meta["layers"])
    with safe_open(str(saved["lorta"][0] / "adapter.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == expected_trainable("lorta", None)


REFUSALS = {
    "lotr-other-weights": ("lotr", lambda: tiny_llama(seed=1), {}, "fingerprint"),
    "lorta-other-weights": ("lorta", lambda: tiny_llama(seed=1), {}, "fingerprint"),
    "lotr-other-shapes": ("lotr", lambda: tiny_llama(hidden_size=32), {}, "shape"),
    "lorta-other-shapes": ("lorta", lambda: tiny_llama(hidden_size=32), {}, "shape"),
    "lorta-other-depth": ("lorta", lambda: tiny_llama(num_hidden_layers=3), {}, "layers"),
    "lotr-as-dota": ("lotr", tiny_llama, {"method": "dota"}, "'dota'"),
    "lorta-as-lotr": ("lorta", tiny_llama, {"method": "lotr"}, "'lotr'"),
    "lotr-with-dota-config": ("lotr", tiny_llama, {"config": DoTAConfig()}, "made for LoTR"),
    "dota-with-lotr-config": ("dota", tiny_llama, {"config": LoTRConfig()}, "made for DoTA"),
    "dota-with-lorta-config": ("dota", tiny_llama, {"config": LoRTAConfig()}, "made for DoTA"),
    "lotr-other-config": ("lotr", tiny_llama, {"config": LoTRConfig(rank=8)}, "config"),
    "lorta-other-config": ("lorta", tiny_llama, {"config": LoRTAConfig(seed=1)}, "config"),
    "already-adapted": ("lorta", lambda: adapted("lotr"), {}, "already"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_mismatched_load_is_refused_and_model_untouched(case, saved):
    file, build, kwargs, needle = REFUSALS[case]
    model = build()
    before = snapshot(model)
    with pytest.raises(AdapterMismatchError, match=needle):
        load_adapter(model, saved[file][0], **kwargs)
    assert_untouched(model, before)


def test_load_with_the_saved_config_and_method_is_accepted(saved):
    model = tiny_llama()
    report = load_adapter(model, saved["lotr"][0], config=METHODS["lotr"][1], method="lotr")
    assert report.method == "lotr"
    assert torch.allclose(logits(model), saved["lotr"][1], atol=1e-6, rtol=0)


# ============================================================ method-specific checks


def test_parameter_counts_match_the_core_formulas():
    for rank in (1, 4):
        model = tiny_llama()
        shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64),
                  "up_proj": (128, 64), "down_proj": (64, 128)}
        plan = plan_lotr(model, rank=rank)
        report = apply_lotr(model, rank=rank)
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert report.trainable_params == plan.trainable_params == numel
        assert numel == lotr_num_params(shapes, 2, rank)
    for kv_heads, has_kv in ((2, True), (4, False)):  # GQA, then plain multi-head
        model = tiny_llama(num_key_value_heads=kv_heads)
        plan = plan_lorta(model, rank=4)
        report = apply_lorta(model, rank=4)
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert report.trainable_params == plan.trainable_params == numel
        assert numel == lorta_num_params(64, 16, 4, kv_heads, 2, 4)
        assert hasattr(model.tensornet_lorta, "C_kv_head") == has_kv
    assert lorta_num_params(64, 16, 4, 4, 2, 4) == 4 * (64 + 16 + 4 + 4 + 2)


def test_plan_on_meta_device_counts_without_weights():
    with torch.device("meta"):
        model = tiny_llama()
    assert plan_lorta(model).trainable_params == lorta_num_params(64, 16, 4, 2, 2, 16)
    with pytest.raises(ConfigError, match="meta"):
        apply_lotr(model)


def _trained_lorta():
    model = adapted("lorta")
    with torch.no_grad():  # B = 0 at init: give every factor random values
        for p in model.tensornet_lorta.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


@pytest.mark.parametrize(("proj", "head"), [("q_proj", 2), ("k_proj", 1), ("v_proj", 0),
                                            ("o_proj", 3)])
def test_lorta_head_block_is_a_diag_c_b(proj, head):
    model = _trained_lorta()
    f = model.tensornet_lorta
    layer_index, dh = 1, 16
    layer = model.get_submodule(f"model.layers.{layer_index}.self_attn.{proj}")
    m = ("q_proj", "k_proj", "v_proj", "o_proj").index(proj)
    heads = f.C_kv_head if proj in ("k_proj", "v_proj") else f.C_head
    c = heads[head] * f.C_matrix[m] * f.C_layer[layer_index]
    block = (f.A @ torch.diag(c) @ f.B).detach()  # (d_model, d_head)
    delta = layer.delta_weight()
    rows = slice(head * dh, (head + 1) * dh)
    if proj == "o_proj":  # W_o is (d_model, H d_head): heads along the input side
        assert delta.shape == (64, 64)
        torch.testing.assert_close(delta[:, rows], block)
    else:  # W_q, W_k, W_v are (H d_head, d_model): heads along the output side
        assert delta.shape == ((4 if proj == "q_proj" else 2) * dh, 64)
        torch.testing.assert_close(delta[rows, :], block.T)


@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_contraction_equals_the_dense_update(method):
    model = _trained_lorta() if method == "lorta" else adapted("lotr", scale=0.5)
    if method == "lotr":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".G"):
                    p.normal_()
    x = torch.randn(3, 5, 128)
    for name, layer in adapter_layers(model).items():
        xi = x[..., : layer.in_features]
        with torch.no_grad():
            got = layer(xi)
            want = xi @ (layer.base_layer.weight + layer.delta_weight()).T
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
    if method == "lotr":
        layer = model.model.layers[1].mlp.up_proj
        f = model.tensornet_lotr.up_proj
        torch.testing.assert_close(layer.delta_weight(), (0.5 * f.A @ layer.G @ f.B).detach())


@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_forward_saves_no_dense_update(method):
    model = _trained_lorta() if method == "lorta" else adapted("lotr")
    name = "model.layers.0.self_attn.o_proj" if method == "lorta" else "model.layers.0.mlp.up_proj"
    layer = model.get_submodule(name)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    dense = {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    for t in saved:
        if tuple(t.shape) in dense:
            assert t.data_ptr() == layer.base_layer.weight.data_ptr()  # W0 itself, no update
        assert t.numel() <= max(x.numel(), layer.base_layer.weight.numel()), t.shape


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


def test_lorta_needs_a_transformers_config_and_refuses_adapted_models():
    with pytest.raises(ConfigError, match="model.config"):
        apply_lorta(nn.Sequential(nn.Linear(4, 4)))
    model = adapted("lorta")
    with pytest.raises(ConfigError, match="already"):
        apply_lotr(model)
    with pytest.raises(ConfigError, match="LoRTAConfig"):
        apply_lorta(tiny_llama(), LoTRConfig())


# ============================================================ the real model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lotr", "lorta"])
def test_smollm2_unchanged_at_init_and_trains(method):
    from tensornet.adapters import load_pretrained

    model, tok = load_pretrained()
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
    report = (apply_lotr if method == "lotr" else apply_lorta)(model, seed=0)
    if method == "lorta":
        assert report.trainable_params == lorta_num_params(576, 64, 9, 3, 30, 16) == 10976
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(ids, labels=ids).loss
    assert torch.isfinite(after) and after.item() != loss.item()
