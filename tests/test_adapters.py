"""tensornet.adapters: DoTA, DoTA-Random and QDoTA as a peft method, on a tiny LLaMA.

The checks every adapter passes (unchanged output at init, only the cores train, an
optimizer step helps, merge == unmerged, disable and unload give the base, save/load in a
fresh process, dtype/device follow the base, ``generate`` works) are rows of the
conformance table in ``test_conformance.py``. Here are the DoTA-specific ones: the
``dtype`` override of the cores, the custom autograd path against a plain-autograd
reference, its memory property, config errors, ``plan_dota`` against the paper's shares,
the recorded base layers, the config object and 4-bit bases. peft's lifecycle beyond the
table (named adapters, refused loads, undo on failure, ...) is in ``test_adapters_peft.py``.

The tolerances (float32, bfloat16, NF4) are explained in :mod:`dota_helpers`.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from dota_helpers import (
    DTYPES,
    FLOAT32_ATOL,
    IDS,
    METHOD_NAMES,
    METHODS,
    TINY_TARGETS,
    adapted,
    assert_untouched,
    base_logits,
    cores,
    dota_layers,
    dtype_tolerance,
    lm_loss,
    logits,
    snapshot,
    to_nf4_base,
    train,
)
from peft import PeftConfig, get_peft_model
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from tensornet.adapters import (
    AdapterReport,
    DoTAConfig,
    DoTALinear,
    apply_dota,
    plan_dota,
    tiny_llama,
)
from tensornet.adapters.base import is_4bit
from tensornet.errors import ConfigError
from tensornet.tensorize import cores_to_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def single_layer(out_f: int, in_f: int, *, bias: bool = True, dtype=torch.float32,
                 **overrides) -> tuple[nn.Module, DoTALinear]:
    """A container holding one DoTA-wrapped ``nn.Linear`` named ``proj`` (adapted in place)."""
    torch.manual_seed(0)
    holder = nn.Sequential(OrderedDict(proj=nn.Linear(in_f, out_f, bias=bias, dtype=dtype)))
    apply_dota(holder, target_modules=["proj"], **overrides)
    return holder, holder.proj


# ============================================================ the cores' dtype


@pytest.mark.parametrize("strategy", ["dense", "contract"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_dtype_override_float32_cores(method, dtype, strategy):
    dt = DTYPES[dtype]
    model = adapted(method, dt, dtype="float32", strategy=strategy, autocast_adapter_dtype=False)
    for name, layer in dota_layers(model).items():
        assert all(c.dtype == torch.float32 for c in cores(layer)), name
        assert all(b.dtype == torch.float32 for b in layer.init_cores("default")), name
    out = model(input_ids=IDS).logits
    assert out.dtype == dt
    lm_loss(model).backward()
    assert all(cores(layer)[0].grad is not None for layer in dota_layers(model).values())
    base = base_logits(dt)
    err = (out.detach().float() - base).abs().max().item()
    if method != "qdota":
        assert err <= dtype_tolerance(dt), err


# ============================================================ the dense autograd path


def naive_reference(layer: DoTALinear, x: torch.Tensor):
    """Plain autograd: W = W0 + cores_to_matrix(T) - cores_to_matrix(T_init), F.linear."""
    t = [c.detach().clone().requires_grad_(True) for c in cores(layer)]
    base = layer.get_base_layer()
    bias = None if base.bias is None else base.bias.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    init = cores_to_matrix([c.to(t[0].dtype) for c in layer.init_cores("default")])
    w = base.weight.detach() + cores_to_matrix(t) - init
    return F.linear(xr, w, bias), xr, t, bias


def perturb(params, scale: float = 0.1, seed: int = 1) -> None:
    """Move the cores away from the init, so that MPO(T) != MPO(T_init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in params:
            c.add_(scale * torch.randn(c.shape, generator=gen, dtype=c.dtype))


@pytest.mark.parametrize("input_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48)], ids=["rows", "batch-seq"])
@pytest.mark.parametrize("strategy", ["dense", "contract"])
def test_gradients_match_naive_reference(strategy, shape, dtype, input_grad):
    holder, layer = single_layer(40, 48, bias=True, dtype=dtype, strategy=strategy, rank=4,
                                 num_cores=3)
    perturb(cores(layer))
    bias = layer.get_base_layer().bias
    bias.requires_grad_(input_grad)  # also exercise the bias gradient
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    g = torch.randn(*shape[:-1], 40, generator=torch.Generator().manual_seed(3), dtype=dtype)
    xt = x.clone().requires_grad_(input_grad)
    y = holder(xt)
    (y * g).sum().backward()
    y_ref, xr, cores_ref, bias_ref = naive_reference(layer, x)
    (y_ref * g).sum().backward()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-11, "rtol": 1e-11}
    assert y.shape == (*shape[:-1], 40)
    torch.testing.assert_close(y, y_ref, **tol)
    if input_grad:
        torch.testing.assert_close(xt.grad, xr.grad, **tol)
        torch.testing.assert_close(bias.grad, bias_ref.grad, **tol)
    else:
        assert xt.grad is None and bias.grad is None
    for k, (c, cr) in enumerate(zip(cores(layer), cores_ref)):
        assert c.grad is not None, k
        torch.testing.assert_close(c.grad, cr.grad, **tol)
    assert layer.get_base_layer().weight.grad is None
    assert all(b.grad is None for b in layer.init_cores("default"))


def test_dense_path_layers_of_different_sizes_share_scratch_correctly():
    # the dense path writes W and dW into per-thread buffers reused by every layer: a
    # stack of a large, a small and a large layer must still match plain autograd
    torch.manual_seed(0)
    stack = nn.Sequential(OrderedDict(a=nn.Linear(48, 40), b=nn.Linear(40, 12),
                                      c=nn.Linear(12, 48)))
    apply_dota(stack, target_modules=["a", "b", "c"], strategy="dense", rank=4, num_cores=3)
    perturb([p for p in stack.parameters() if p.requires_grad])
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = torch.randn(6, 48, generator=torch.Generator().manual_seed(3))
    (stack(x) * g).sum().backward()
    layers = [stack.a, stack.b, stack.c]
    refs = [[c.detach().clone().requires_grad_(True) for c in cores(layer)] for layer in layers]
    xr = x.detach().clone().requires_grad_(True)
    h = xr
    for layer, t in zip(layers, refs):
        base = layer.get_base_layer()
        w = (base.weight.detach() + cores_to_matrix(t)
             - cores_to_matrix(layer.init_cores("default")))
        h = F.linear(h, w, base.bias.detach())
    (h * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    for layer, t in zip(layers, refs):
        for c, cr in zip(cores(layer), t):
            torch.testing.assert_close(c.grad, cr.grad, atol=1e-5, rtol=1e-5)


def test_dense_path_gradcheck_float64():
    holder, layer = single_layer(12, 8, bias=True, dtype=torch.float64, strategy="dense",
                                 rank=3, num_cores=2)
    perturb(cores(layer))
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *c: holder(x), (x, *cores(layer)))


def test_dense_path_saves_no_dense_matrix():
    out_f = in_f = 256
    holder, layer = single_layer(out_f, in_f, bias=True, strategy="dense")
    x = torch.randn(4, in_f, requires_grad=True)
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = holder(x)
    assert sizes, "the hook saw nothing: the check would be vacuous"
    assert max(sizes) < out_f * in_f, sizes
    y.sum().backward()  # and backward still works from what was saved
    assert all(c.grad is not None for c in cores(layer)) and x.grad is not None

    # control: the same hook does see the dense W of the naive plain-autograd version
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_reference(layer, x)
    assert max(sizes) >= out_f * in_f


def test_merge_frees_the_dense_path_scratch_buffers():
    from tensornet.adapters.dota.kernels import _SCRATCH

    holder, layer = single_layer(40, 48, strategy="dense", rank=4, num_cores=3)
    holder(torch.randn(3, 48, requires_grad=True)).sum().backward()
    assert _SCRATCH.buffers  # the dense path wrote W into reused buffers
    layer.merge()
    assert not _SCRATCH.buffers


def test_tied_target_never_corrupts_the_shared_weight():
    # tiny_llama ties lm_head to the input embedding (as SmolLM2 does). Adapting lm_head
    # must either be refused, or leave the embedding alone and the output unchanged.
    base = tiny_llama()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    embedding = base.model.embed_tokens.weight.detach().clone()
    before = snapshot(base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # peft: "tie_word_embeddings=True"
            model = apply_dota(base, target_modules=["lm_head"])
    except ConfigError as exc:
        assert "lm_head" in str(exc)
        assert_untouched(base, before)
        return
    assert torch.equal(base.model.embed_tokens.weight, embedding), "embedding overwritten"
    err = (logits(model) - base_logits()).abs().max().item()
    assert err <= FLOAT32_ATOL, err
    train(model, steps=1)
    assert torch.equal(base.model.embed_tokens.weight, embedding), "embedding trained"


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_merge_and_unload_keep_the_bias(how):
    torch.manual_seed(0)
    holder = nn.Sequential(OrderedDict(proj=nn.Linear(48, 32, bias=True)))
    bias = holder.proj.bias.detach().clone()
    model = apply_dota(holder, target_modules=["proj"], strategy="dense", rank=4)
    with torch.no_grad():
        cores(holder.proj)[0].mul_(1.5)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        plain = getattr(model, how)()
        assert plain is holder and type(holder.proj) is nn.Linear
        assert torch.equal(holder.proj.bias, bias)
        if how == "merge_and_unload":
            torch.testing.assert_close(holder(x), y, atol=FLOAT32_ATOL, rtol=0)


# ============================================================ config errors


BAD_CONFIGS = {
    "init-svd": ({"init": "svd"}, ["`init`", "'svd'", "'mpo'", "'random'"]),
    "quantize-nf8": ({"quantize": "nf8"}, ["`quantize`", "'nf8'", "'nf4'"]),
    "num_cores-1": ({"num_cores": 1}, ["`num_cores`", "got 1"]),
    "num_cores-0": ({"num_cores": 0}, ["`num_cores`", "got 0"]),
    "rank-0": ({"rank": 0}, ["`rank`", "got 0"]),
    "rank-short-list": ({"rank": [16, 16]}, ["`rank`", "[16, 16]", "4"]),
    "rank-str": ({"rank": "16"}, ["`rank`", "'16'"]),
    "dtype-int8": ({"dtype": "int8"}, ["`dtype`", "'int8'", "'float32'"]),
    "strategy-fast": ({"strategy": "fast"}, ["`strategy`", "'fast'", "'dense'"]),
    "targets-empty": ({"target_modules": []}, ["`target_modules`", "got []"]),
    "targets-missing": ({"target_modules": ["no_such_module"]},
                        ["`target_modules`", "no_such_module", "q_proj"]),
    "targets-bad-regex": ({"target_modules": "["}, ["`target_modules`", "'['"]),
    "modes-wrong-length": ({"modes": {64: [2, 2, 2]}}, ["`modes", "64", "[2, 2, 2]"]),
    "modes-wrong-product": ({"modes": {64: [3, 3, 3, 3, 3]}},
                            ["`modes", "64", "[3, 3, 3, 3, 3]"]),
    "init_weights-str": ({"init_weights": "yes"}, ["`init_weights`", "'yes'"]),
    "modules_to_save-str": ({"modules_to_save": "lm_head"}, ["`modules_to_save`", "'lm_head'"]),
    "unknown-field": ({"foo": 1}, ["foo", "rank"]),
    "targets-not-linear": ({"target_modules": ["mlp"]}, ["model.layers.0.mlp", "LlamaMLP"]),
    "seed-str": ({"init": "random", "seed": "0"}, ["`seed`", "'0'"]),
    "num_cores-too-many": ({"num_cores": 9}, ["num_cores=9", "model.layers.0.", "modes"]),
    "config-not-a-config": ({"config": {"rank": 8}}, ["`config`", "dict"]),
    # bitsandbytes' NF4 kernels compute in float32/bfloat16/float16: a float64 QDoTA gave
    # nondeterministic garbage
    "qdota-float64": ({"quantize": "nf4", "dtype": "float64"},
                      ["`dtype`", "'float64'", "quantize='nf4'", "'bfloat16'"]),
}
#: the cases the config itself cannot refuse (they need a model, or are not fields)
NEED_A_MODEL = ("targets-missing", "num_cores-too-many", "config-not-a-config",
                "unknown-field", "targets-not-linear")


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_value_is_a_clear_error_and_model_untouched(case):
    kwargs, needles = BAD_CONFIGS[case]
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        apply_dota(model, **kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert_untouched(model, before)
    assert not dota_layers(model)


@pytest.mark.parametrize("case", [c for c in BAD_CONFIGS if c not in NEED_A_MODEL])
def test_bad_values_are_refused_by_the_config_itself(case):
    kwargs, needles = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as info:
        DoTAConfig(**kwargs)
    assert needles[0] in str(info.value), case


@pytest.mark.parametrize("case", ["targets-missing", "num_cores-too-many", "targets-not-linear"])
def test_get_peft_model_refuses_a_config_that_does_not_fit_the_model(case):
    kwargs, needles = BAD_CONFIGS[case]
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        get_peft_model(model, DoTAConfig(**kwargs))
    for needle in needles:
        assert needle in str(info.value), needle
    assert_untouched(model, before)


def test_applying_twice_is_refused_and_model_untouched():
    model = adapted("dota")
    for target in (model, model.get_base_model()):
        before = snapshot(target)
        with pytest.raises(ConfigError, match="already has peft adapters"):
            apply_dota(target)
        assert_untouched(target, before)
    assert len(dota_layers(model)) == 10
    # no adapter wrapped inside another
    assert all(not isinstance(m.base_layer, DoTALinear) for m in dota_layers(model).values())


# ============================================================ plan_dota on the meta device


class AllocationSpy(TorchDispatchMode):
    """Records every tensor op whose result is a real (not meta) tensor of 1M+ elements."""

    def __init__(self) -> None:
        super().__init__()
        self.big: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() >= 1 << 20:
                self.big.append((str(func), tuple(t.shape)))
        return out


def test_allocation_spy_sees_real_allocations():
    with AllocationSpy() as spy:
        torch.zeros(1 << 20)
        torch.empty(2, 1 << 20, device="meta")
    assert spy.big == [("aten.zeros.default", (1 << 20,))]


def _meta_llama(**sizes) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**sizes))


LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


@pytest.mark.parametrize(
    ("sizes", "rank", "share"),
    [(LLAMA2_7B, 16, "0.149%"), (LLAMA3_8B, 16, "0.065%"), (LLAMA3_8B, 32, "0.200%")],
    ids=["llama2-7b-R16", "llama3-8b-R16", "llama3-8b-R32"],
)
def test_plan_dota_on_meta_model_gives_paper_shares(sizes, rank, share):
    model = _meta_llama(**sizes)
    before = snapshot(model)
    with AllocationSpy() as spy:
        report = plan_dota(model, rank=rank)
    # no real tensor of 1M+ elements was made (the spy's own test shows it would see one)
    assert not spy.big, spy.big[:5]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not dota_layers(model)
    assert [(n, m) for n, m in model.named_modules()] == before["modules"]
    assert isinstance(report, AdapterReport)
    assert f"{100 * report.trainable_share:.3f}%" == share
    assert len(report.layers) == 32 * 5
    assert report.trainable_params == sum(lay.num_params for lay in report.layers)
    if sizes is LLAMA2_7B and rank == 16:
        assert report.trainable_params == 10_043_392
    q = next(lay for lay in report.layers if lay.name.endswith("layers.0.self_attn.q_proj"))
    assert q.out_modes == q.in_modes == (4, 4, 8, 8, 4)  # the paper's Table 2 for 4096
    # eq. (1) caps the outer bonds at I_1 J_1 = I_5 J_5 = 16 before R does
    assert q.ranks == (1, min(16, rank), rank, rank, min(16, rank), 1)


def test_apply_dota_on_meta_model_points_to_plan():
    model = _meta_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"meta device.*plan\("):
        apply_dota(model)
    assert_untouched(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_plan_dota_agrees_with_the_adapted_model(method):
    report = plan_dota(tiny_llama(), METHODS[method])
    model = adapted(method)
    layers = dota_layers(model)
    trainable, total = model.get_nb_trainable_parameters()
    cores_numel = sum(c.numel() for layer in layers.values() for c in cores(layer))
    assert report.method == method
    assert [lay.name for lay in report.layers] == list(layers) == TINY_TARGETS
    assert report.trainable_params == cores_numel == trainable
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for lay in report.layers:
        layer = layers[lay.name]
        t = cores(layer)
        assert lay.num_params == sum(c.numel() for c in t)
        assert (lay.out_features, lay.in_features) == (layer.out_features, layer.in_features)
        assert lay.out_modes == tuple(c.shape[1] for c in t)
        assert lay.in_modes == tuple(c.shape[2] for c in t)
        assert math.prod(lay.out_modes) == lay.out_features
        assert math.prod(lay.in_modes) == lay.in_features
        assert lay.ranks == (1, *(c.shape[3] for c in t)) and len(lay.ranks) == 6
    # total: every parameter of the model once (tiny_llama ties lm_head to the embedding,
    # as SmolLM2 does), 4-bit weights counted by their logical size
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    assert report.total_params == base_total + cores_numel, "tied weights counted twice?"
    assert report.trainable_share == pytest.approx(report.trainable_params / report.total_params)
    assert report.layers[-1].name in str(report)
    if method != "qdota":  # peft's count agrees (4-bit weights: peft counts packed bytes)
        assert total == report.total_params


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_base_layers_record_what_the_adapter_was_built_on(method):
    model = adapted(method)
    record = model.peft_config["default"].base_layers
    assert list(record) == TINY_TARGETS
    original = tiny_llama()
    for name, rec in record.items():
        w0 = original.get_submodule(name).weight
        assert rec["shape"] == list(w0.shape) and rec["dtype"] == "float32"
        assert isinstance(rec["fingerprint"], str) and rec["fingerprint"].startswith("v2:")
        assert rec["ranks"][0] == rec["ranks"][-1] == 1 and len(rec["modes"]) == 2
        if method == "dota-random":
            assert "relative_error" not in rec
        else:  # the MPO of W0 at these ranks; truncated, so strictly between 0 and 1
            assert 0.0 < rec["relative_error"] < 1.0
    # the fingerprint is of the values: another seed, another fingerprint
    other = adapted(method).peft_config["default"].base_layers
    assert {k: r["fingerprint"] for k, r in other.items()} == {
        k: r["fingerprint"] for k, r in record.items()
    }
    seed1 = get_peft_model(tiny_llama(seed=1), METHODS[method]).peft_config["default"]
    assert all(seed1.base_layers[k]["fingerprint"] != r["fingerprint"] for k, r in record.items())


# ============================================================ the config object


ROUND_TRIP = [
    DoTAConfig(),
    DoTAConfig(rank=[8, 16, 16, 8], num_cores=5),
    DoTAConfig(modes={64: [2, 2, 4, 2, 2]}, target_modules=r".*\.(q|v)_proj"),
    DoTAConfig(init="random", seed=3, strategy="dense"),
    DoTAConfig(quantize="nf4", dtype="float32", target_modules=["q_proj"]),
    DoTAConfig(modules_to_save=["lm_head"], exclude_modules=["k_proj"], init_weights=False),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_config_round_trips_through_dict_and_json(cfg):
    data = cfg.to_dict()
    again = PeftConfig.from_peft_type(**json.loads(json.dumps(data)))
    assert type(again) is DoTAConfig
    assert again == cfg
    assert again.to_dict() == data


def test_config_round_trips_through_save_pretrained(tmp_path):
    model = adapted("dota", modes={64: [2, 2, 4, 2, 2]})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DOTA" and saved["modes"] == {"64": [2, 2, 4, 2, 2]}
    again = DoTAConfig.from_pretrained(tmp_path)
    assert again.modes == {64: (2, 2, 4, 2, 2)}
    assert again.base_layers == model.peft_config["default"].base_layers


def test_config_replace_does_not_mutate():
    cfg = DoTAConfig()
    other = cfg.replace(rank=32, init="random")
    assert (cfg.rank, cfg.init) == (16, "mpo")
    assert (other.rank, other.init) == (32, "random")
    assert other is not cfg
    with pytest.raises(ConfigError, match="foo"):
        cfg.replace(foo=1)


def test_apply_dota_does_not_mutate_callers_config():
    targets = ["q_proj", "v_proj"]
    modes = {64: [2, 2, 4, 2, 2]}
    cfg = DoTAConfig(target_modules=targets, modes=modes)
    data = copy.deepcopy(cfg.to_dict())
    model = apply_dota(tiny_llama(), cfg, rank=8, init="random", seed=1)
    assert cfg.to_dict() == data and not cfg.base_layers
    assert targets == ["q_proj", "v_proj"] and modes == {64: [2, 2, 4, 2, 2]}
    used = model.peft_config["default"]
    assert (used.rank, used.init) == (8, "random")
    assert len(dota_layers(model)) == 4


# ============================================================ 4-bit bases


def test_qdota_on_a_4bit_base():
    float_base = base_logits(torch.float32)
    base4 = to_nf4_base(tiny_llama(), compute_dtype=torch.float32)
    assert all(is_4bit(base4.get_submodule(n)) for n in TINY_TARGETS)
    out4 = logits(base4)
    model = apply_dota(base4, quantize="nf4")
    assert model.peft_config["default"].method == "qdota"
    layers = dota_layers(model)
    assert len(layers) == 10 and all(layer.quantized for layer in layers.values())
    assert all(layer.init_cores("default")[0].dtype == torch.bfloat16 for layer in layers.values())
    out = logits(model)
    # Re-quantizing the (smaller) residual costs less than the base's own NF4 error did.
    assert (out - out4).norm() <= (out4 - float_base).norm()
    assert (out - out4).abs().max() <= (out4 - float_base).abs().max()
    lm_loss(model).backward()
    assert all(c.grad is not None for layer in layers.values() for c in cores(layer))
    merged = model.merge_and_unload()
    for name in TINY_TARGETS:  # a dense layer in the 4-bit base's compute dtype
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32, name


def test_plain_dota_on_a_4bit_base_is_refused():
    base4 = to_nf4_base(tiny_llama(), compute_dtype=torch.float32)
    before = snapshot(base4)
    with pytest.raises(ConfigError, match="quantize='nf4'"):
        apply_dota(base4)
    assert_untouched(base4, before)
    assert not dota_layers(base4)
