"""DoTA's forward pass without grad: cached half-chains (``_ServingOperands``), checked
against a dense ``nn.Linear`` holding the merged weight, and kept in step with the cores."""

from __future__ import annotations

import copy

import pytest
import torch
from dota_helpers import IDS, adapted, dota_layers, dtype_tolerance, logits, one_layer, train
from torch import nn

from tensornet import plan_mpo_matmul
from tensornet.adapters.dota.cost import _strategy_seconds, residual_strategy
from tensornet.adapters.dota.serving import _serving_split


def perturb(layer, adapter: str = "default", scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for c in layer.cores(adapter):
            c.add_(torch.randn(c.shape, generator=gen) * scale)


def close(y: torch.Tensor, want: torch.Tensor) -> bool:
    """float32 agreement with a float64 reference, relative to the output's scale."""
    return (y.double() - want).abs().max().item() <= 1e-5 * max(want.abs().max().item(), 1.0)


def merged_linear(layer) -> nn.Linear:
    """A dense nn.Linear with W0 + MPO(T) - MPO(T_init) (float64 reference)."""
    base = layer.get_base_layer()
    ref = nn.Linear(layer.in_features, layer.out_features).double()
    with torch.no_grad():
        ref.weight.copy_(base.weight.double() + layer.get_delta_weight("default").double())
        ref.bias.copy_(base.bias.double())
    return ref


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_no_grad_forward_matches_the_merged_linear(rows):
    model, layer = one_layer()
    perturb(layer)
    x = torch.randn(2, rows, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    assert layer._serving, "the cached path was not taken"
    entry = next(iter(layer._serving.values()))
    assert entry.use[2 * rows]
    assert close(y, merged_linear(layer)(x.double()))
    with torch.enable_grad():  # the general path agrees
        assert torch.allclose(model(x), y, atol=1e-5)


def test_at_init_the_cached_path_gives_the_base_bit_for_bit():
    model, layer = one_layer()
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x)
        base = layer.get_base_layer()(x)
    assert layer._serving
    assert torch.equal(y, base)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused"])
def test_an_optimizer_step_between_evaluations_rebuilds_the_cache(optimizer):
    # a fused AdamW (the Trainer's default) updates parameters without bumping versions
    model, layer = one_layer()
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=1e-3) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=1e-3, fused=True))
    model(torch.randn(16, 96)).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after)
    assert close(after, merged_linear(layer)(x.double()))


def test_loading_other_cores_rebuilds_the_cache():
    model, layer = one_layer()
    other, other_layer = one_layer()
    perturb(other_layer, scale=0.1)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x), other(x))


def test_named_adapters_are_cached_apart_and_deleting_drops_the_cache():
    model, layer = one_layer()
    perturb(layer)
    model.add_adapter("second", copy.deepcopy(model.peft_config["default"]))
    perturb(layer, "second", scale=0.2)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(5))
    outs = {}
    for name in ("default", "second", "default"):
        model.set_adapter(name)
        with torch.no_grad():
            y = model(x)
        with torch.enable_grad():
            assert torch.allclose(model(x), y, atol=1e-5)
        outs.setdefault(name, y)
        assert torch.equal(outs[name], y)
    assert not torch.allclose(outs["default"], outs["second"])
    assert len(layer._serving) == 2
    model.delete_adapter("second")
    assert not layer._serving


def test_a_pinned_strategy_is_respected_without_grad():
    model, layer = one_layer(strategy="dense")
    with torch.no_grad():
        model(torch.randn(1, 96))
    assert all(not use for e in layer._serving.values() for use in e.use.values())


@pytest.mark.parametrize("method", ["dota", "qdota"])
def test_a_trained_tiny_llama_evaluates_the_same_through_the_cache(method):
    model = adapted(method)
    train(model, steps=2)
    cached = logits(model)  # no grad: the cached path where it is cheaper
    assert any(layer._serving for layer in dota_layers(model).values())
    with torch.enable_grad():
        general = model(input_ids=IDS).logits.float()
    # QDoTA's residual computes in bfloat16 (its default compute dtype): the two paths
    # round differently there, by bf16 noise; DoTA's float32 paths agree to float32
    tol = dtype_tolerance(torch.bfloat16 if method == "qdota" else torch.float32)
    assert (cached - general).abs().max().item() <= tol
    model.merge_adapter()
    assert all(not layer._serving for layer in dota_layers(model).values())


def test_serving_split_is_the_cheapest_cut():
    shapes = [(1, 4, 3, 5), (5, 6, 4, 7), (7, 2, 8, 1)]
    cores = [torch.zeros(s) for s in shapes]
    out_modes, in_modes = [4, 6, 2], [3, 4, 8]

    def cost(m):
        import math

        return shapes[m][0] * (math.prod(in_modes) * math.prod(out_modes[m:])
                               + math.prod(out_modes) * math.prod(in_modes[:m]))

    assert _serving_split(cores) == min((1, 2), key=cost)


def test_the_training_model_counts_terms_and_trainable_chains():
    shapes = [(1, 4, 4, 16), (16, 4, 4, 16), (16, 8, 8, 16), (16, 8, 8, 16), (16, 4, 4, 1)]
    plan = plan_mpo_matmul(shapes, 256)
    one = _strategy_seconds(plan, training=True, terms=1, trainable=1)
    two = _strategy_seconds(plan, training=True, terms=2, trainable=1)
    # a second (frozen) chain: contracted forward and back to x, and widens the build
    assert two[1] - one[1] == pytest.approx(2 * plan.contract_seconds)
    assert two[0] > one[0]
    forward = _strategy_seconds(plan, training=False, terms=2, trainable=0)
    assert forward[1] == pytest.approx(2 * plan.contract_seconds)
    assert residual_strategy(plan, training=True, terms=2, trainable=1) == (
        "dense" if two[0] < two[1] else "contract")


def test_train_and_eval_drop_the_cache():
    model, layer = one_layer()
    with torch.no_grad():
        model(torch.randn(1, 96))
    assert layer._serving
    model.eval()
    assert not layer._serving
    with torch.no_grad():
        model(torch.randn(1, 96))
    model.train()
    assert not layer._serving
