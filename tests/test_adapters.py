"""tensornet.adapters: DoTA, DoTA-Random and QDoTA on a tiny LLaMA.

The core of this file is a conformance table in peft's ``TEST_CASES`` style: every method
(:data:`METHODS`) goes through every check (unchanged output at init, only the cores train,
an optimizer step helps, merge == unmerged, unapply restores W0, save/load in a fresh
process, dtype/device follow the base, ``generate`` works). The checks that are not per
method follow: the custom autograd path against a plain-autograd reference, its memory
property, refused loads, config errors, ``plan_dota`` against the paper's shares, the
report, the config object and 4-bit bases.

Tolerances
----------
float32
    The adapted layer computes ``x (W_res + MPO(T))^T`` where the base computed ``x W0^T``;
    ``W_res + MPO(T)`` equals ``W0`` up to one float32 rounding per weight, so logits of
    order 1 agree to ~1e-7; we allow 1e-5.
bfloat16
    A bf16 adapted layer rounds ``W_res`` and ``MPO(T)`` to bf16 and adds them in bf16,
    where the base used ``W0`` as stored: a couple of bf16 roundings per weight. The yardstick
    is :func:`bf16_noise`, how far the bf16 base model's logits are from the same bf16
    weights evaluated in float32 (bf16 compute noise of this very model, ~4e-3); an adapted
    bf16 model may deviate from the bf16 base by at most 4 such units (measured: ~2).
NF4 (QDoTA)
    No absolute number: QDoTA must lose no more than QLoRA's base does, i.e. than the same
    model with its target weights quantized to NF4 directly (bitsandbytes ``Params4bit``).
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from tensornet.adapters import (
    LLAMA_TARGETS,
    AdapterReport,
    DoTAConfig,
    DoTALinear,
    apply_dota,
    load_adapter,
    merge,
    plan_dota,
    save_adapter,
    tiny_llama,
    unapply,
)
from tensornet.adapters.base import is_4bit, set_submodule
from tensornet.errors import AdapterMismatchError, ConfigError
from tensornet.tensorize import cores_to_matrix

REPO = Path(__file__).resolve().parents[1]

#: The conformance table's methods (peft's TEST_CASES): name -> config.
METHODS: dict[str, DoTAConfig] = {
    "dota": DoTAConfig(),
    "dota-random": DoTAConfig(init="random", seed=0),
    "qdota": DoTAConfig(quantize="nf4"),
}
METHOD_NAMES = list(METHODS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: A fixed batch: 2 sequences of 8 tokens of tiny_llama's 128-token vocabulary.
IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1234))
FLOAT32_ATOL = 1e-5
BF16_NOISE_UNITS = 4.0
# Ten target layers in tiny_llama: q, k, v, up, down in each of its 2 decoder layers.
TINY_TARGETS = [
    f"model.layers.{i}.{part}"
    for i in range(2)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "mlp.up_proj", "mlp.down_proj")
]


# ----------------------------------------------------------------------------- helpers


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def adapted(method: str, base_dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    model = tiny_llama(dtype=base_dtype)
    apply_dota(model, METHODS[method].replace(**overrides), progress=False)
    return model


def dota_layers(model: nn.Module) -> dict[str, DoTALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DoTALinear)}


def lm_loss(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids, labels=ids).loss


def train(model: nn.Module, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """AdamW on the fixed batch; returns the loss before each step and after the last."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = lm_loss(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(lm_loss(model).item())
    return losses


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: values, module types, grad flags, state."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": sorted(vars(model)),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["attrs"] == before["attrs"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def to_nf4_base(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """QLoRA's base: the target linears replaced by NF4 ``Linear4bit`` holding W0 itself."""
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in LLAMA_TARGETS:
            continue
        layer = bnb.nn.Linear4bit(
            mod.in_features, mod.out_features, bias=mod.bias is not None,
            compute_dtype=compute_dtype or mod.weight.dtype, quant_type="nf4", device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            mod.weight.detach().clone(), requires_grad=False, quant_type="nf4"
        )
        if mod.bias is not None:
            layer.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        set_submodule(model, name, layer.to("cpu"))  # .to() on CPU quantizes
    return model


_BF16_NOISE: list[float] = []


def bf16_noise() -> float:
    """Max |logits| gap between the bf16 base and its own bf16 weights evaluated in float32."""
    if not _BF16_NOISE:
        bf16 = logits(tiny_llama(dtype=torch.bfloat16))
        upcast = logits(tiny_llama(dtype=torch.bfloat16).float())
        _BF16_NOISE.append((bf16 - upcast).abs().max().item())
        assert 0 < _BF16_NOISE[0] < 0.05
    return _BF16_NOISE[0]


def dtype_tolerance(dtype: torch.dtype) -> float:
    return FLOAT32_ATOL if dtype == torch.float32 else BF16_NOISE_UNITS * bf16_noise()


_BASE_LOGITS: dict[torch.dtype, torch.Tensor] = {}


def base_logits(dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _BASE_LOGITS:
        _BASE_LOGITS[dtype] = logits(tiny_llama(dtype=dtype))
    return _BASE_LOGITS[dtype]


def single_layer(out_f: int, in_f: int, *, bias: bool = True, dtype=torch.float32,
                 **overrides) -> tuple[nn.Module, DoTALinear]:
    """A container holding one DoTA-wrapped ``nn.Linear`` named ``proj``."""
    torch.manual_seed(0)
    holder = nn.Sequential(OrderedDict(proj=nn.Linear(in_f, out_f, bias=bias, dtype=dtype)))
    apply_dota(holder, target_modules=["proj"], progress=False, **overrides)
    return holder, holder.proj


# ============================================================ the conformance table


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_output_unchanged_at_init(method, dtype):
    dt = DTYPES[dtype]
    base = base_logits(dt)
    out = logits(adapted(method, dt))
    err = (out - base).abs().max().item()
    if method != "qdota":
        assert err <= dtype_tolerance(dt), err
        return
    # QDoTA: no worse than QLoRA's base (W0 itself in NF4), in the Frobenius norm and at max.
    qlora = logits(to_nf4_base(tiny_llama(dtype=dt)))
    assert (out - base).norm() <= (qlora - base).norm()
    assert err <= (qlora - base).abs().max().item()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_only_cores_receive_gradients(method, dtype):
    model = adapted(method, DTYPES[dtype])
    lm_loss(model).backward()
    cores = {f"{name}.cores.{k}" for name, layer in dota_layers(model).items()
             for k in range(len(layer.cores))}
    assert len(cores) == 10 * 5
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable == cores
    assert all(re.search(r"\.cores\.\d+$", n) for n in with_grad)
    for name in cores:
        assert torch.isfinite(model.get_parameter(name).grad).all(), name
    # the embeddings (tied with lm_head), norms and untargeted linears are frozen too
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.layers[0].self_attn.o_proj.weight.requires_grad
    assert not model.model.layers[0].mlp.gate_proj.weight.requires_grad
    total = sum(model.get_parameter(n).grad.float().norm() ** 2 for n in cores)
    assert total > 0


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_optimizer_steps_lower_the_loss(method):
    losses = train(adapted(method), steps=4, lr=1e-2)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_merge_equals_unmerged(method, dtype):
    dt = DTYPES[dtype]
    model = tiny_llama(dtype=dt)
    model.model.norm.weight.requires_grad_(False)  # a user's own flag, to be restored
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_dota(model, METHODS[method], progress=False)
    train(model, steps=3)
    before = logits(model)
    assert (before - base_logits(dt)).abs().max() > 1e-3  # training changed something
    out = merge(model)
    assert out is model
    assert not dota_layers(model)
    assert not hasattr(model, "_tensornet_adapter")
    for name in TINY_TARGETS:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear, name
        # the dtype the layer had before it was adapted (QDoTA too: bf16 cores merged into
        # a float32 model must give float32 layers, or the model's forward breaks)
        assert layer.weight.dtype == dt, name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = logits(model)
    # QDoTA computes in bf16 (its cores' dtype) before the merge.
    tol = dtype_tolerance(torch.bfloat16 if method == "qdota" else dt)
    assert (after - before).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_unapply_restores_original_weights(method, dtype):
    dt = DTYPES[dtype]
    original = tiny_llama(dtype=dt)
    model = tiny_llama(dtype=dt)
    model.model.norm.weight.requires_grad_(False)  # a user's own flag, to be restored
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_dota(model, METHODS[method], progress=False)
    train(model, steps=2)  # unapply must ignore training: it rebuilds W0, not W'
    assert unapply(model) is model
    assert not dota_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name in TINY_TARGETS:
        w0 = original.get_submodule(name).weight.detach()
        w = model.get_submodule(name).weight.detach()
        assert type(model.get_submodule(name)) is nn.Linear
        assert w.dtype == w0.dtype, name  # the original layer's dtype, not the cores'
        diff = (w.float() - w0.float()).abs().max().item()
        if method == "dota-random":
            assert diff == 0.0, name  # W_res = W0 and MPO(T_init) = 0 exactly
        elif method == "dota":
            # one rounding: within 2 units in the last place at the weights' scale
            # (measured: 0.45 ulp in float32, 0.22 in bf16)
            ulp = torch.finfo(dt).eps * w0.float().abs().max().item()
            assert diff <= 2 * ulp, (name, diff, ulp)
        else:  # QDoTA's residual went through NF4: no worse than quantizing W0 itself
            nf4 = to_nf4_base(nn.Sequential(OrderedDict(q_proj=copy.deepcopy(
                original.get_submodule(name)))))
            w_nf4 = bnb.functional.dequantize_4bit(nf4.q_proj.weight.data,
                                                   nf4.q_proj.weight.quant_state).float()
            assert (w.float() - w0.float()).norm() <= (w_nf4 - w0.float()).norm(), name
    for k, v in original.state_dict().items():
        if not any(k.startswith(t + ".") for t in TINY_TARGETS):
            assert torch.equal(model.state_dict()[k], v), k
    tol = dtype_tolerance(dt) if method != "qdota" else float("inf")
    assert (logits(model) - base_logits(dt)).abs().max().item() <= tol


_FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from tensornet.adapters import load_adapter, tiny_llama
    spec = json.loads(sys.argv[1])
    ids = torch.tensor(spec["ids"])
    for job in spec["jobs"]:
        model = tiny_llama(dtype=getattr(torch, job["dtype"]))
        load_adapter(model, job["path"])
        with torch.no_grad():
            torch.save(model(ids).logits, job["out"])
    """
)


@pytest.fixture(scope="module")
def fresh_process_logits(tmp_path_factory):
    """Train, save and compute logits here; load and compute in ONE fresh interpreter.

    Returns ``{case: (logits here, logits in the fresh process)}``. The table's cases pin
    ``strategy="dense"``: with ``"auto"`` the layer asks a planner whose machine profile is
    *timed* per process, so two processes may pick different (equally correct) contraction
    orders with different float rounding. ``"dota-auto"`` checks that case with a tolerance.
    """
    root = tmp_path_factory.mktemp("adapters")
    cases = {m: (m, "float32", {"strategy": "dense"}) for m in METHOD_NAMES}
    cases["dota-bfloat16"] = ("dota", "bfloat16", {"strategy": "dense"})
    cases["dota-auto"] = ("dota", "float32", {})
    here, jobs = {}, []
    for case, (method, dtype, overrides) in cases.items():
        model = adapted(method, DTYPES[dtype], **overrides)
        train(model, steps=3)
        save_adapter(model, root / case)
        here[case] = logits(model)
        jobs.append({"dtype": dtype, "path": str(root / case), "out": str(root / f"{case}.pt")})
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_SCRIPT, json.dumps({"ids": IDS.tolist(), "jobs": jobs})],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {case: (here[case], torch.load(root / f"{case}.pt").float()) for case in cases}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_save_load_in_fresh_process_reproduces_logits(method, fresh_process_logits):
    here, there = fresh_process_logits[method]
    assert (here - base_logits(torch.float32)).abs().max() > 1e-3  # trained, not the base
    # Same file, same base, same deterministic CPU kernels: bit-for-bit.
    assert torch.equal(here, there), (here - there).abs().max()


def test_save_load_bf16_base_in_fresh_process(fresh_process_logits):
    here, there = fresh_process_logits["dota-bfloat16"]
    assert (here - base_logits(torch.bfloat16)).abs().max() > 1e-2
    assert torch.equal(here, there), (here - there).abs().max()


def test_save_load_with_auto_strategy_in_fresh_process(fresh_process_logits):
    here, there = fresh_process_logits["dota-auto"]
    torch.testing.assert_close(there, here, atol=FLOAT32_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_dtype_and_device_follow_the_base(method, dtype):
    dt = DTYPES[dtype]
    model = adapted(method, dt)
    expected = torch.bfloat16 if method == "qdota" else dt
    for name, layer in dota_layers(model).items():
        assert all(c.dtype == expected for c in layer.cores), name
        assert all(c.device == torch.device("cpu") for c in layer.cores), name
        assert all(b.dtype == expected for b in layer.init_cores()), name
        assert layer.quantized == (method == "qdota")
        if method != "qdota":
            assert layer.base_layer.weight.dtype == dt
        assert layer.base_layer.weight.device == torch.device("cpu")
    out = model(IDS).logits
    assert out.shape == (2, 8, 128)
    assert out.dtype == dt  # activations keep the base model's dtype


@pytest.mark.parametrize("strategy", ["dense", "contract"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_dtype_override_float32_cores(method, dtype, strategy):
    dt = DTYPES[dtype]
    model = adapted(method, dt, dtype="float32", strategy=strategy)
    for name, layer in dota_layers(model).items():
        assert all(c.dtype == torch.float32 for c in layer.cores), name
    out = model(IDS).logits
    assert out.dtype == dt
    lm_loss(model).backward()
    assert all(layer.cores[0].grad is not None for layer in dota_layers(model).values())
    base = base_logits(dt)
    err = (out.detach().float() - base).abs().max().item()
    if method != "qdota":
        assert err <= dtype_tolerance(dt), err


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_generate_works_and_matches_base_at_init(method):
    prompt = IDS[:1, :4]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                  pad_token_id=2)
    with torch.no_grad():
        base = tiny_llama().generate(prompt, **kwargs)
        out = adapted(method).generate(prompt, **kwargs)
    assert out.shape[0] == 1 and out.shape[1] > prompt.shape[1]
    assert torch.equal(out[:, :4], prompt)
    if method != "qdota":  # exact W0 (random) or W0 to ~1e-7 (dota): greedy tokens agree
        assert torch.equal(out, base)


# ============================================================ the dense autograd path


def naive_reference(layer: DoTALinear, x: torch.Tensor):
    """Plain autograd: W = W_res + cores_to_matrix(cores), F.linear."""
    cores = [c.detach().clone().requires_grad_(True) for c in layer.cores]
    bias = layer.base_layer.bias
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    w = layer.base_layer.weight.detach() + cores_to_matrix(cores)
    return F.linear(xr, w, bias), xr, cores, bias


@pytest.mark.parametrize("input_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48)], ids=["rows", "batch-seq"])
@pytest.mark.parametrize("strategy", ["dense", "contract"])
def test_gradients_match_naive_reference(strategy, shape, dtype, input_grad):
    holder, layer = single_layer(40, 48, bias=True, dtype=dtype, strategy=strategy, rank=4,
                                 num_cores=3)
    with torch.no_grad():  # move away from the init so that MPO(T) != MPO(T_init)
        gen = torch.Generator().manual_seed(1)
        for c in layer.cores:
            c.add_(0.1 * torch.randn(c.shape, generator=gen, dtype=dtype))
    layer.base_layer.bias.requires_grad_(input_grad)  # also exercise the bias gradient
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
        torch.testing.assert_close(layer.base_layer.bias.grad, bias_ref.grad, **tol)
    else:
        assert xt.grad is None and layer.base_layer.bias.grad is None
    for k, (c, cr) in enumerate(zip(layer.cores, cores_ref)):
        assert c.grad is not None, k
        torch.testing.assert_close(c.grad, cr.grad, **tol)
    assert layer.base_layer.weight.grad is None


def test_dense_path_layers_of_different_sizes_share_scratch_correctly():
    # the dense path writes W and dW into per-thread buffers reused by every layer: a
    # stack of a large, a small and a large layer must still match plain autograd
    torch.manual_seed(0)
    stack = nn.Sequential(OrderedDict(a=nn.Linear(48, 40), b=nn.Linear(40, 12),
                                      c=nn.Linear(12, 48)))
    apply_dota(stack, target_modules=["a", "b", "c"], progress=False, strategy="dense",
               rank=4, num_cores=3)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for c in stack.parameters():
            if c.requires_grad:
                c.add_(0.1 * torch.randn(c.shape, generator=gen))
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = torch.randn(6, 48, generator=torch.Generator().manual_seed(3))
    (stack(x) * g).sum().backward()
    layers = [stack.a, stack.b, stack.c]
    refs = [[c.detach().clone().requires_grad_(True) for c in layer.cores] for layer in layers]
    xr = x.detach().clone().requires_grad_(True)
    h = xr
    for layer, cores in zip(layers, refs):
        w = layer.base_layer.weight.detach() + cores_to_matrix(cores)
        h = F.linear(h, w, layer.base_layer.bias.detach())
    (h * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    for layer, cores in zip(layers, refs):
        for c, cr in zip(layer.cores, cores):
            torch.testing.assert_close(c.grad, cr.grad, atol=1e-5, rtol=1e-5)


def test_dense_path_gradcheck_float64():
    holder, layer = single_layer(12, 8, bias=True, dtype=torch.float64, strategy="dense",
                                 rank=3, num_cores=2)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *cores: holder(x), (x, *layer.cores))


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
    assert all(c.grad is not None for c in layer.cores) and x.grad is not None

    # control: the same hook does see the dense W of the naive plain-autograd version
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_reference(layer, x)
    assert max(sizes) >= out_f * in_f


def test_tied_target_never_corrupts_the_shared_weight():
    # tiny_llama ties lm_head to the input embedding (as SmolLM2 does). Adapting lm_head
    # must either be refused, or leave the embedding alone and the output unchanged.
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    before = snapshot(model)
    try:
        apply_dota(model, target_modules=["lm_head"], progress=False)
    except ConfigError as exc:
        assert "lm_head" in str(exc)
        assert_untouched(model, before)
        return
    assert torch.equal(model.model.embed_tokens.weight, embedding), "embedding overwritten"
    err = (logits(model) - base_logits(torch.float32)).abs().max().item()
    assert err <= FLOAT32_ATOL, err


def test_merge_and_unapply_keep_the_bias():
    for fold in (merge, unapply):
        holder, layer = single_layer(32, 48, bias=True, strategy="dense", rank=4)
        bias = layer.base_layer.bias.detach().clone()
        with torch.no_grad():
            layer.cores[0].mul_(1.5)
        x = torch.randn(3, 48, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = holder(x)
            fold(holder)
            assert type(holder.proj) is nn.Linear
            assert torch.equal(holder.proj.bias, bias)
            if fold is merge:
                torch.testing.assert_close(holder(x), y, atol=FLOAT32_ATOL, rtol=0)


def test_operations_on_a_model_without_adapters_are_refused(tmp_path):
    for op in (merge, unapply, lambda m: save_adapter(m, tmp_path / "x")):
        model = tiny_llama()
        before = snapshot(model)
        with pytest.raises(ConfigError, match="no tensornet adapters"):
            op(model)
        assert_untouched(model, before)
    assert not (tmp_path / "x").exists()


# ============================================================ refused loads


@pytest.fixture(scope="module")
def saved_dota(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "dota"
    model = adapted("dota")
    train(model, steps=1)
    save_adapter(model, path)
    return path


def _fresh():
    return tiny_llama()


def _already_adapted():
    return adapted("dota")


def _last_layer_differs():
    model = tiny_llama()
    with torch.no_grad():  # only the LAST target differs: nothing may be installed before it
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    return model


LOAD_REFUSALS = {
    "other-weights": (lambda: tiny_llama(seed=1), {}, "fingerprint"),
    "last-layer-differs": (_last_layer_differs, {}, "layers.1.mlp.down_proj"),
    "other-shapes": (lambda: tiny_llama(hidden_size=32), {}, "shape"),
    "other-config": (_fresh, {"config": DoTAConfig(rank=8)}, "config"),
    "other-method": (_fresh, {"method": "lotr"}, "lotr"),
    "no-adapter": (_fresh, {"path": "EMPTY"}, "save_adapter"),
    "already-adapted": (_already_adapted, {}, "already"),
}


@pytest.mark.parametrize("case", list(LOAD_REFUSALS))
def test_mismatched_load_is_refused_and_model_untouched(case, saved_dota, tmp_path):
    build, kwargs, needle = LOAD_REFUSALS[case]
    model = build()
    kwargs = dict(kwargs)
    path = tmp_path if kwargs.pop("path", None) == "EMPTY" else saved_dota
    n_layers = len(dota_layers(model))
    before = snapshot(model)
    with pytest.raises(AdapterMismatchError, match=needle) as info:
        load_adapter(model, path, **kwargs)
    assert isinstance(info.value, ValueError)
    assert_untouched(model, before)
    assert len(dota_layers(model)) == n_layers


def test_load_with_equal_config_is_accepted(saved_dota):
    model = tiny_llama()
    report = load_adapter(model, saved_dota, config=DoTAConfig())
    assert len(report.layers) == 10 and len(dota_layers(model)) == 10


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
    "unknown-field": ({"foo": 1}, ["foo", "rank"]),
    "targets-not-linear": ({"target_modules": ["mlp"]}, ["model.layers.0.mlp", "LlamaMLP"]),
    "seed-str": ({"init": "random", "seed": "0"}, ["`seed`", "'0'"]),
    "num_cores-too-many": ({"num_cores": 9}, ["num_cores=9", "model.layers.0.", "modes"]),
    "config-not-a-config": ({"config": {"rank": 8}}, ["`config`", "dict"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_value_is_a_clear_error_and_model_untouched(case):
    kwargs, needles = BAD_CONFIGS[case]
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        apply_dota(model, progress=False, **kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert_untouched(model, before)
    assert not dota_layers(model)


def test_applying_twice_is_refused_and_model_untouched():
    model = adapted("dota")
    before = snapshot(model)
    with pytest.raises(ConfigError, match="already has tensornet adapters"):
        apply_dota(model, progress=False)
    assert_untouched(model, before)
    assert len(dota_layers(model)) == 10
    # no adapter wrapped inside another
    assert all(not isinstance(m.base_layer, DoTALinear) for m in dota_layers(model).values())


def test_bad_values_are_refused_by_the_config_itself():
    for case, (kwargs, needles) in BAD_CONFIGS.items():
        if case in ("targets-missing", "num_cores-too-many", "config-not-a-config",
                    "unknown-field", "targets-not-linear"):
            continue  # these need a model (or are not fields)
        with pytest.raises(ConfigError) as info:
            DoTAConfig(**kwargs)
        assert needles[0] in str(info.value), case


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
    with AllocationSpy() as spy:
        report = plan_dota(model, rank=rank)
    # no real tensor of 1M+ elements was made (the spy's own test shows it would see one)
    assert not spy.big, spy.big[:5]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not dota_layers(model)
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


def test_apply_dota_on_meta_model_points_to_plan_dota():
    model = _meta_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ConfigError, match="plan_dota"):
        apply_dota(model, progress=False)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert all(p.requires_grad for p in model.parameters())


def test_plan_dota_agrees_with_apply_dota():
    plan = plan_dota(tiny_llama())
    report = apply_dota(tiny_llama(), progress=False)
    assert [lay.name for lay in plan.layers] == [lay.name for lay in report.layers]
    assert plan.trainable_params == report.trainable_params
    assert [lay.ranks for lay in plan.layers] == [lay.ranks for lay in report.layers]


# ============================================================ the report


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_report_counts_match_the_model(method):
    model = tiny_llama()
    report = apply_dota(model, METHODS[method], progress=False)
    layers = dota_layers(model)
    cores_numel = sum(c.numel() for layer in layers.values() for c in layer.cores)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable_params == cores_numel == trainable
    assert report.method == method
    assert [lay.name for lay in report.layers] == list(layers) == TINY_TARGETS
    for lay in report.layers:
        layer = layers[lay.name]
        assert lay.num_params == sum(c.numel() for c in layer.cores)
        assert (lay.out_features, lay.in_features) == (layer.out_features, layer.in_features)
        assert math.prod(lay.out_modes) == lay.out_features
        assert math.prod(lay.in_modes) == lay.in_features
        assert lay.ranks == layer.ranks and len(lay.ranks) == 6
        if method == "dota-random":
            assert lay.relative_error is None
        else:
            assert 0.0 <= lay.relative_error < 1.0
    # total: every parameter of the model once (tiny_llama ties lm_head to the embedding,
    # as SmolLM2 does), 4-bit weights counted by their logical size
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    assert report.total_params == base_total + cores_numel, "tied weights counted twice?"
    assert report.trainable_share == pytest.approx(report.trainable_params / report.total_params)
    assert lay.name in str(report)


# ============================================================ the config object


ROUND_TRIP = [
    DoTAConfig(),
    DoTAConfig(rank=[8, 16, 16, 8], num_cores=5),
    DoTAConfig(modes={64: [2, 2, 4, 2, 2]}, target_modules=r".*\.(q|v)_proj"),
    DoTAConfig(init="random", seed=3, strategy="dense"),
    DoTAConfig(quantize="nf4", dtype="float32", target_modules=["q_proj"]),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_config_round_trips_through_dict_and_json(cfg):
    data = cfg.to_dict()
    again = DoTAConfig.from_dict(json.loads(json.dumps(data)))
    assert again == cfg
    assert again.to_dict() == data


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
    data = cfg.to_dict()
    report = apply_dota(tiny_llama(), cfg, progress=False, rank=8, init="random", seed=1)
    assert cfg.to_dict() == data
    assert targets == ["q_proj", "v_proj"] and modes == {64: [2, 2, 4, 2, 2]}
    assert report.extra["config"]["rank"] == 8 and report.extra["config"]["init"] == "random"
    assert len(report.layers) == 4


# ============================================================ 4-bit bases


def test_qdota_on_a_4bit_base():
    float_base = base_logits(torch.float32)
    base4 = to_nf4_base(tiny_llama(), compute_dtype=torch.float32)
    assert all(is_4bit(base4.get_submodule(n)) for n in TINY_TARGETS)
    out4 = logits(base4)
    report = apply_dota(base4, quantize="nf4", progress=False)
    assert report.method == "qdota" and len(report.layers) == 10
    layers = dota_layers(base4)
    assert all(layer.quantized for layer in layers.values())
    assert all(layer.cores[0].dtype == torch.bfloat16 for layer in layers.values())
    out = logits(base4)
    # Re-quantizing the (smaller) residual costs less than the base's own NF4 error did.
    assert (out - out4).norm() <= (out4 - float_base).norm()
    assert (out - out4).abs().max() <= (out4 - float_base).abs().max()
    lm_loss(base4).backward()
    assert all(c.grad is not None for layer in layers.values() for c in layer.cores)


def test_plain_dota_on_a_4bit_base_is_refused():
    base4 = to_nf4_base(tiny_llama(), compute_dtype=torch.float32)
    before = snapshot(base4)
    with pytest.raises(ConfigError, match="quantize='nf4'"):
        apply_dota(base4, progress=False)
    assert_untouched(base4, before)
    assert not dota_layers(base4)


def test_merge_frees_the_dense_path_scratch_buffers():
    from tensornet.adapters.dota import _SCRATCH

    holder, layer = single_layer(40, 48, strategy="dense", rank=4, num_cores=3)
    holder(torch.randn(3, 48, requires_grad=True)).sum().backward()
    assert _SCRATCH.buffers  # the dense path wrote W into reused buffers
    merge(holder)
    assert not _SCRATCH.buffers
