"""DoTA and QDoTA on the real SmolLM2-135M (offline; ``make test`` runs these).

One module-scoped fixture loads the model once; every test works on deep copies, so the
tests are independent of each other and of their order.
"""

from __future__ import annotations

import copy
import re

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from tensornet.adapters import (
    LLAMA_TARGETS,
    DoTALinear,
    apply_dota,
    load_adapter,
    load_pretrained,
    save_adapter,
)
from tensornet.adapters.base import set_submodule

pytestmark = pytest.mark.slow

TEXT = "The capital of France is Paris, and the capital of Italy is Rome."


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_pretrained()
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
    return model, ids, base


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def dota_layers(model: nn.Module) -> dict[str, DoTALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DoTALinear)}


def test_smollm2_dota_init_unchanged_then_one_step_trains_only_cores(smollm2):
    base_model, ids, base = smollm2
    model = copy.deepcopy(base_model)
    report = apply_dota(model, progress=False)
    assert len(report.layers) == 30 * 5
    out = logits(model, ids)
    # Logits of size ~30: the float32 rounding of W_res + MPO(T) is ~1e-7 per weight.
    assert (out - base).abs().max().item() <= 1e-3
    assert torch.equal(out.argmax(-1), base.argmax(-1))

    # the paper's learning rate: Adam's first step moves every core entry by ~lr, and the
    # MPO multiplies five cores, so 1e-3 already overshoots on this batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss0 = model(ids, labels=ids).loss
    loss0.backward()
    for name, p in model.named_parameters():
        if re.search(r"\.cores\.\d+$", name):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert not p.requires_grad and p.grad is None, name
    opt.step()
    with torch.no_grad():
        loss1 = model(ids, labels=ids).loss
    assert loss1.item() < loss0.item()


def test_smollm2_save_load_into_a_fresh_copy(smollm2, tmp_path):
    base_model, ids, _ = smollm2
    model = copy.deepcopy(base_model)
    apply_dota(model, progress=False, strategy="dense")
    with torch.no_grad():  # stands in for training: the loaded cores must be these
        gen = torch.Generator().manual_seed(0)
        for layer in dota_layers(model).values():
            for c in layer.cores:
                c.add_(1e-2 * c.abs().mean() * torch.randn(c.shape, generator=gen))
    trained = logits(model, ids)
    save_adapter(model, tmp_path)

    fresh = copy.deepcopy(base_model)
    report = load_adapter(fresh, tmp_path)
    assert len(report.layers) == 150
    assert torch.equal(logits(fresh, ids), trained)


def _nf4_targets(model: nn.Module, pattern: str) -> nn.Module:
    """QLoRA's base: the selected linears hold W0 itself in NF4 (float32 compute)."""
    for name, mod in list(model.named_modules()):
        if not re.fullmatch(pattern, name):
            continue
        layer = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(mod.weight.detach().clone(), requires_grad=False,
                                         quant_type="nf4")
        set_submodule(model, name, layer.to("cpu"))
    return model


def test_smollm2_qdota_init_within_nf4_tolerance(smollm2):
    base_model, ids, base = smollm2
    pattern = r"model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(LLAMA_TARGETS) + ")"
    qdota = copy.deepcopy(base_model)
    report = apply_dota(qdota, progress=False, quantize="nf4")
    assert report.method == "qdota" and len(report.layers) == 150
    out = logits(qdota, ids)
    qlora = logits(_nf4_targets(copy.deepcopy(base_model), pattern), ids)
    # The paper's claim: quantizing the residual loses no more than quantizing W0 itself.
    assert (out - base).norm() <= (qlora - base).norm()
