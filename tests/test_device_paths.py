"""DoTA and QDoTA on both device paths (``tensornet._device``), run here on CPU tensors.

The accelerator layout of the dense path (one product and one fused pass, the
caching allocator), the eigensolver of the decomposition and the CUDA cost model are
what a GPU runs; ``device_path("cuda")`` makes CPU tensors take them, so the
conformance checks below run both ways: output at init equal to the base, merge equal
to unmerged, a bit-exact reload, gradients equal to a float64 reference, non-contiguous
inputs, the numerics under float32, bfloat16 and float16 (with GradScaler's 2^16 loss
scale), the two paths equal to each other; and the CUDA path's training step dispatches
few aten ops (the CPU-side proxy of a GPU step that is not launch-bound).
"""

from __future__ import annotations

import collections
from collections import OrderedDict

import pytest
import torch
from dota_helpers import (
    FLOAT32_ATOL,
    IDS,
    adapted,
    base_logits,
    dota_layers,
    dtype_tolerance,
    logits,
)
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tensornet._device import DEVICE_KINDS, device_path
from tensornet.adapters import DoTAConfig, tiny_llama
from tensornet.adapters.dota.kernels import CPUKernels, CUDAKernels, kernels_for
from tensornet.errors import DTypeError
from tensornet.tensorize import cores_to_matrix

KINDS = list(DEVICE_KINDS)


@pytest.fixture(params=KINDS)
def kind(request):
    with device_path(request.param):
        yield request.param


def test_the_seam_picks_the_kernels():
    x = torch.zeros(1)
    assert kernels_for(x) is CPUKernels
    with device_path("cuda"):
        assert kernels_for(x) is CUDAKernels


def one_layer(out_f=48, in_f=64, *, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    holder = nn.Sequential(OrderedDict(proj=nn.Linear(in_f, out_f, dtype=dtype)))
    cfg = DoTAConfig(target_modules=["proj"], rank=4, num_cores=3, **kw)
    model = get_peft_model(holder, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():  # move T away from T_init: a non-zero update
        gen = torch.Generator().manual_seed(1)
        for c in layer.dota_cores["default"]:
            c.add_(0.1 * torch.randn(c.shape, generator=gen, dtype=c.dtype))
    return model, layer


def reference(layer, x):
    """``F.linear`` with ``W0 + MPO(T) - MPO(T_init)`` in float64, by plain autograd."""
    t = [c.detach().double().requires_grad_(True) for c in layer.dota_cores["default"]]
    t0 = [c.double() for c in layer.init_cores("default")]
    base = layer.get_base_layer()
    xr = x.detach().double().requires_grad_(True)
    w = base.weight.double() + cores_to_matrix(t) - cores_to_matrix(t0)
    return F.linear(xr, w, base.bias.double()), xr, t


@pytest.mark.parametrize("strategy", ["dense", "auto"])
def test_gradients_equal_a_float64_reference(kind, strategy):
    model, layer = one_layer(strategy=strategy)
    x = torch.randn(2, 5, 64, requires_grad=True)
    g = torch.randn(2, 5, 48)
    (model(x) * g).sum().backward()
    y_ref, xr, t = reference(layer, x)
    (y_ref * g.double()).sum().backward()
    torch.testing.assert_close(model(x).double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    for c, r in zip(layer.dota_cores["default"], t):
        torch.testing.assert_close(c.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs(kind):
    model, layer = one_layer(strategy="dense")
    x = torch.randn(64, 6, requires_grad=True)
    xt = x.t()  # (6, 64), not contiguous
    assert not xt.is_contiguous()
    y = model(xt)
    y.square().sum().backward()
    y_ref, _, _ = reference(layer, xt)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_both_paths_give_the_same_layer():
    model, layer = one_layer(strategy="dense")  # one layer (the eigensolvers' signs differ)
    out = {}
    for k in KINDS:
        model.zero_grad(set_to_none=True)
        with device_path(k):
            x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
            y = model(x)
            y.square().sum().backward()
            out[k] = (y.detach(), x.grad, [c.grad for c in layer.dota_cores["default"]])
    (y0, gx0, gc0), (y1, gx1, gc1) = out["cpu"], out["cuda"]
    torch.testing.assert_close(y0, y1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx0, gx1, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc0, gc1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


#: (autocast dtype, loss scale, tolerance relative to the output's / gradients' scale)
AUTOCAST = {
    "bfloat16": (torch.bfloat16, 1.0, 3e-2),
    "float16": (torch.float16, 2.0**16, 5e-3),
}


@pytest.mark.parametrize("dt", list(AUTOCAST))
def test_autocast_numerics(kind, dt):
    """Under autocast the W-sized products run in its dtype; results stay near float64."""
    dtype, scale, tol = AUTOCAST[dt]
    model, layer = one_layer(strategy="dense")
    x = torch.randn(4, 7, 64, requires_grad=True)
    g = torch.randn(4, 7, 48)
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype  # as nn.Linear under autocast
    (y.float() * g).mean().mul(scale).backward()  # GradScaler's scaled loss
    y_ref, xr, t = reference(layer, x)
    (y_ref * g.double()).mean().backward()

    def close(got, want):
        assert torch.isfinite(got).all()
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= tol, f"relative error {err:.2e} above {tol:.0e}"

    close(y, y_ref)
    close(x.grad / scale, xr.grad)
    for c, r in zip(layer.dota_cores["default"], t):
        assert c.grad.dtype == torch.float32  # the trainable cores keep their dtype
        close(c.grad / scale, r.grad)


@pytest.mark.parametrize("method", ["dota", "qdota"])
def test_conformance_on_a_tiny_llama(kind, method, tmp_path):
    """Init = base, merge = unmerged, reload bit-exact, a step lowers the loss."""
    model = adapted(method)
    out = logits(model)
    if method == "dota":
        torch.testing.assert_close(out, base_logits(), rtol=0, atol=FLOAT32_ATOL)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.enable_grad():  # the training path (the serving cache is tested elsewhere)
        trained = model(input_ids=IDS).logits.detach()
    model.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.enable_grad():
        again = fresh(input_ids=IDS).logits.detach()
    assert torch.equal(again, trained)  # bit for bit
    merged = model.merge_and_unload()
    tol = FLOAT32_ATOL if method == "dota" else 2e-2
    torch.testing.assert_close(logits(merged), trained.float(), rtol=0, atol=tol)


def test_qdota_residual_dequantizes_in_its_compute_dtype(kind):
    model = adapted("qdota")
    for layer in dota_layers(model).values():
        base = layer.get_base_layer()
        assert base.weight.quant_state.dtype == base.compute_dtype == torch.bfloat16
        assert layer.dense_base().dtype == torch.bfloat16


# ------------------------------------------------------------------ dispatched ops

VIEWS = {"view", "_unsafe_view", "t", "permute", "expand", "detach", "alias", "select",
         "slice", "as_strided", "transpose", "unsqueeze", "squeeze", "split",
         "split_with_sizes", "unbind", "_reshape_alias"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def step_ops(config, autocast):
    """aten ops of one training step of one adapted 1024 x 1024 layer (steady state)."""
    torch.manual_seed(0)
    holder = nn.Sequential(OrderedDict(q_proj=nn.Linear(1024, 1024)))
    model = get_peft_model(holder, config)
    x = torch.randn(512, 1024, requires_grad=True)
    g = torch.randn(512, 1024)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.backward(g.to(y.dtype))

    step()
    step()
    with _Count() as count:
        step()
    kernels = sum(n for op, n in count.ops.items() if op not in VIEWS)
    return sum(count.ops.values()), kernels


#: Measured per 1024 x 1024 layer step on the CUDA path (all ops, kernel-launching ops):
#: DoTA (N = 5, R = 16) 101 / 33 in float32 and 111 / 43 under bf16 autocast; peft
#: LoRA r = 32: 27 / 15 and 36 / 24. The old path dispatched ~390. What remains beyond
#: LoRA's is the update's own structure: 3 contraction steps of the five cores into two
#: halves (a product and a reordering copy each, and their backward), the halves side
#: by side with T_init's cached ones, W built twice (forward and for dx), dW pulled
#: back by two thin products, and five core gradients to accumulate.
STEP_OPS = {False: (101, 33), True: (111, 43)}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_cuda_path_step_dispatches_few_ops(autocast):
    """The GPU step was launch-bound (392 aten ops per DoTA layer step on the CPU proxy).

    Counted through the seam on CPU tensors, in the steady state (routes prepared):
    everything the CUDA path dispatches, and the ops that launch a kernel (views
    excluded), next to peft LoRA (r = 32) on the same layer. The goal of issue 19, at
    most 2x LoRA's ops, is missed (see STEP_OPS); this test keeps what was reached.
    """
    with device_path("cuda"):
        lora = step_ops(LoraConfig(r=32, target_modules=["q_proj"]), autocast)
        dota = step_ops(DoTAConfig(rank=16, num_cores=5, target_modules=["q_proj"],
                                   strategy="auto"), autocast)
    assert dota[0] <= STEP_OPS[autocast][0] and dota[1] <= STEP_OPS[autocast][1], (dota, lora)
    # launched kernels: within 2x LoRA's under autocast (1.8x), 2.2x in float32
    assert dota[1] <= (2.0 if autocast else 2.2) * lora[1], (dota, lora)


def test_serving_equals_the_training_forward_under_autocast(kind):
    """Without grad (cached halves) and with grad (dense build): the same logits up to
    bf16 rounding, both computing in autocast's dtype (the serving path ran a float32
    product under bf16 autocast and differed by 0.88 in SmolLM2's logits; now 0.5-0.6,
    against 0.35 between the bf16 and float32 base itself)."""
    model = adapted("dota")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            served = model(input_ids=IDS).logits.float()
        trained = model(input_ids=IDS).logits.detach().float()
    assert any(layer._serving for layer in dota_layers(model).values())
    assert (served - trained).abs().max() <= dtype_tolerance(torch.bfloat16)


def test_a_write_into_t_init_is_seen_by_the_next_call(kind):
    # T_init's halves are prepared once; a write into the stored T_init (copy_ under
    # no_grad, not through load_state_dict) must not leave them stale
    model, layer = one_layer(strategy="dense")
    x = torch.randn(3, 64, requires_grad=True)
    model(x)
    with torch.no_grad():
        for c in layer.init_cores("default"):
            c.copy_(c * 0.5)
    y = model(x)
    y_ref, _, _ = reference(layer, x)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("grad", [True, False])
def test_integer_input_is_refused_with_and_without_grad(kind, quantize, grad):
    # QDoTA cast integer input silently and returned int64 garbage
    model, _ = one_layer(quantize=quantize)
    x = torch.randint(0, 5, (2, 64))
    with torch.set_grad_enabled(grad), pytest.raises(DTypeError, match="floating.*int64"):
        model(x)


def test_chain_sum_is_the_cores_arithmetic_and_differentiable():
    from tensornet.adapters.dota.layer import chain_sum, random_cores

    gen = torch.Generator().manual_seed(3)
    a = [c.requires_grad_(True) for c in random_cores((2, 3), (2, 2), (1, 3, 1),
                                                      zero_last=False, generator=gen)]
    b = [c.requires_grad_(True) for c in random_cores((2, 3), (2, 2), (1, 2, 1),
                                                      zero_last=False, generator=gen)]
    summed = chain_sum([(1.0, a), (-1.0, b)])
    cores_to_matrix(summed).square().sum().backward()
    ra = [c.detach().double().requires_grad_(True) for c in a]
    rb = [c.detach().double().requires_grad_(True) for c in b]
    (cores_to_matrix(ra) - cores_to_matrix(rb)).square().sum().backward()
    for got, want in zip(a + b, ra + rb):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-6)
