"""What the adapter test files share: the methods tables, a fixed batch, tolerances, snapshots.

Tolerances
----------
float32
    The adapted layer computes ``x (W0 + MPO(T) - MPO(T_init))^T`` where the base computed
    ``x W0^T``; at init ``T == T_init`` and the update is zero up to float32 rounding of the
    one MPO of the difference (its bond sums a chain and its negative), so logits of
    order 1 agree to ~1e-7; we allow 1e-5.
bfloat16
    A bf16 adapted layer adds the update to ``W0`` in bf16, where the base used ``W0`` as
    stored: a couple of bf16 roundings per weight. The yardstick is :func:`bf16_noise`, how
    far the bf16 base model's logits are from the same bf16 weights evaluated in float32
    (bf16 compute noise of this very model, ~4e-3); an adapted bf16 model may deviate from
    the bf16 base by at most 4 such units (measured: ~2).
NF4 (QDoTA)
    No absolute number: QDoTA must lose no more than QLoRA's base does, i.e. than the same
    model with its target weights quantized to NF4 directly (bitsandbytes ``Params4bit``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from tensornet.adapters import (
    LLAMA_TARGETS,
    DoTAConfig,
    DoTALinear,
    LoRTAConfig,
    LoRTALinear,
    LoTRConfig,
    LoTRLinear,
    apply_dota,
    tiny_llama,
)

#: The DoTA methods of the conformance table (peft's TEST_CASES): name -> config.
METHODS: dict[str, DoTAConfig] = {
    "dota": DoTAConfig(),
    "dota-random": DoTAConfig(init="random", seed=0),
    "qdota": DoTAConfig(quantize="nf4"),
}
METHOD_NAMES = list(METHODS)
#: LoTR (normal and orthogonal init) and LoRTA: name -> config.
LOTR_METHODS: dict[str, LoTRConfig | LoRTAConfig] = {
    "lotr": LoTRConfig(seed=0),
    "lotr-orthogonal": LoTRConfig(init="orthogonal", rank=8, seed=0, scale=2.0),
    "lorta": LoRTAConfig(seed=0),
}
#: Every method of the conformance table (``tests/test_conformance.py``).
ALL_METHODS: dict[str, Any] = {**METHODS, **LOTR_METHODS}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ADAPTER_LAYERS = (DoTALinear, LoTRLinear, LoRTALinear)
#: The projections LoTR adapts (one shared pair A, B per kind).
LOTR_KINDS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
#: LoRTA's shared CP factors.
LORTA_FACTORS = ("A", "B", "C_head", "C_kv_head", "C_matrix", "C_layer")

#: A fixed batch: 2 sequences of 8 tokens of tiny_llama's 128-token vocabulary.
IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1234))
FLOAT32_ATOL = 1e-5
BF16_NOISE_UNITS = 4.0
#: The ten target layers of tiny_llama: q, k, v, up, down in each of its 2 decoder layers.
TINY_TARGETS = [
    f"model.layers.{i}.{part}"
    for i in range(2)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "mlp.up_proj", "mlp.down_proj")
]


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def adapted(method: str, base_dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """``get_peft_model(tiny_llama(dtype=base_dtype), ALL_METHODS[method] with overrides)``."""
    peft_kwargs = {k: overrides.pop(k) for k in ("autocast_adapter_dtype",) if k in overrides}
    config = ALL_METHODS[method].replace(**overrides)
    return get_peft_model(tiny_llama(dtype=base_dtype), config, **peft_kwargs)


def dota_layers(model: nn.Module) -> dict[str, DoTALinear]:
    """DoTA layers by their name in the *base* model (``model.layers.0.self_attn.q_proj``)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, DoTALinear):
            out[name.removeprefix("base_model.model.")] = module
    return out


def one_layer(in_f: int = 96, out_f: int = 160, **kw: Any) -> tuple[Any, DoTALinear]:
    """A DoTA adapter (rank 4, 3 cores) on one ``nn.Linear`` named ``proj``: model, layer."""
    torch.manual_seed(0)
    holder = nn.Sequential(OrderedDict(proj=nn.Linear(in_f, out_f)))
    model = apply_dota(holder, target_modules=["proj"], rank=4, num_cores=3, seed=0,
                       dtype="float32", **kw)
    (layer,) = dota_layers(model).values()
    return model, layer


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """DoTA, LoTR and LoRTA layers by their name in the *base* model."""
    return {name.removeprefix("base_model.model."): module
            for name, module in model.named_modules() if isinstance(module, ADAPTER_LAYERS)}


def expected_trainable(method: str, model: nn.Module, adapter: str = "default") -> set[str]:
    """Names of ``adapter``'s parameters in the PeftModel ``model`` of ``method``."""
    if method.startswith("lotr"):
        names = {f"base_model.lotr_{f}.{adapter}.{k}" for k in LOTR_KINDS for f in "AB"}
        return names | {f"base_model.model.{n}.lotr_G.{adapter}" for n in adapter_layers(model)}
    if method.startswith("lorta"):
        return {f"base_model.lorta_{f}.{adapter}" for f in LORTA_FACTORS}
    return {f"base_model.model.{name}.dota_cores.{adapter}.{k}"
            for name, layer in dota_layers(model).items() for k in range(len(cores(layer)))}


def cores(layer: DoTALinear, adapter: str = "default") -> list[torch.Tensor]:
    return list(layer.dota_cores[adapter])


def lm_loss(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


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
    """Everything a refused call must leave alone: module objects, parameters, flags, values."""
    return {
        "modules": [(n, m) for n, m in model.named_modules()],
        "params": [(n, p, p.requires_grad, p.detach().clone())
                   for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, b, b.detach().clone()) for n, b in model.named_buffers()],
        "attrs": sorted(vars(model)),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert [n for n, _ in after["modules"]] == [n for n, _ in before["modules"]]
    for (name, m), (_, m0) in zip(after["modules"], before["modules"]):
        assert m is m0, f"module {name!r} was replaced"
    assert [n for n, *_ in after["params"]] == [n for n, *_ in before["params"]]
    for (name, p, flag, value), (_, p0, flag0, value0) in zip(after["params"], before["params"]):
        assert p is p0, f"parameter {name!r} was replaced"
        assert flag == flag0, f"requires_grad of {name!r} changed"
        if value.device.type != "meta":
            assert torch.equal(value, value0), f"values of {name!r} changed"
    assert [n for n, *_ in after["buffers"]] == [n for n, *_ in before["buffers"]]
    for (name, b, value), (_, b0, value0) in zip(after["buffers"], before["buffers"]):
        assert b is b0, name
        if value.device.type != "meta":
            assert torch.equal(value, value0), name
    assert after["attrs"] == before["attrs"]


def assert_load_refused(folder: Any, error: Any, match: str | None = None,
                        model: nn.Module | None = None) -> BaseException:
    """``PeftModel.from_pretrained(model, folder)`` raises ``error`` and leaves ``model`` alone.

    ``model`` defaults to a fresh ``tiny_llama()``; returns the exception raised.
    """
    model = tiny_llama() if model is None else model
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        PeftModel.from_pretrained(model, folder)
    assert_untouched(model, before)
    return info.value


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
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("cpu"))  # .to() on CPU quantizes
    return model


_HALF_NOISE: dict[torch.dtype, float] = {}


def half_noise(dtype: torch.dtype) -> float:
    """Max |logits| gap between the ``dtype`` base and its own weights evaluated in float32."""
    if dtype not in _HALF_NOISE:
        half = logits(tiny_llama(dtype=dtype))
        upcast = logits(tiny_llama(dtype=dtype).float())
        _HALF_NOISE[dtype] = (half - upcast).abs().max().item()
        assert 0 < _HALF_NOISE[dtype] < 0.05, (dtype, _HALF_NOISE[dtype])
    return _HALF_NOISE[dtype]


def bf16_noise() -> float:
    """Max |logits| gap between the bf16 base and its own bf16 weights evaluated in float32."""
    return half_noise(torch.bfloat16)


def dtype_tolerance(dtype: torch.dtype) -> float:
    if dtype in (torch.float32, torch.float64):
        return FLOAT32_ATOL
    return BF16_NOISE_UNITS * half_noise(dtype)


_BASE_LOGITS: dict[torch.dtype, torch.Tensor] = {}


def base_logits(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dtype not in _BASE_LOGITS:
        _BASE_LOGITS[dtype] = logits(tiny_llama(dtype=dtype))
    return _BASE_LOGITS[dtype]
