"""Tests for tensornet.plan: applying an MPO to a batch, and the cost model of both strategies."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
from core_helpers import mpo_shapes
from core_helpers import random_cores as _random_cores
from hypothesis import given, settings
from hypothesis import strategies as st

import tensornet as tn
from tensornet import MPO, ShapeError, cores_to_matrix, mpo_matmul, plan_mpo_matmul

FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None)

STRATEGIES = ["dense", "contract", "auto"]


def random_cores(seed, out_modes, in_modes, ranks, lib="numpy"):
    cores = _random_cores(np.random.default_rng(seed), out_modes, in_modes, ranks)
    if lib == "torch":
        return [torch.from_numpy(c).float() for c in cores]
    return cores


def einsum_apply(x, cores):
    """Reference y[..., i] = sum_j x[..., j] prod_k core_k[r, i_k, j_k, r'], by one np.einsum."""
    x = np.asarray(x, dtype=np.float64)
    cores = [np.asarray(c, dtype=np.float64) for c in cores]
    n = len(cores)
    letters = iter(string.ascii_letters)
    batch = next(letters)
    bonds = [next(letters) for _ in range(n + 1)]
    rows = [next(letters) for _ in range(n)]
    cols = [next(letters) for _ in range(n)]
    in_modes = [c.shape[2] for c in cores]
    lead = x.shape[:-1]
    xb = x.reshape(math.prod(lead), *in_modes)
    eq = (
        batch
        + "".join(cols)
        + ","
        + ",".join(bonds[k] + rows[k] + cols[k] + bonds[k + 1] for k in range(n))
        + "->"
        + batch
        + "".join(rows)
    )
    y = np.einsum(eq, xb, *cores)
    return y.reshape(*lead, math.prod(c.shape[1] for c in cores))


def as64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


@st.composite
def mpo_and_batch(draw):
    out_modes, in_modes, ranks = draw(mpo_shapes())
    lead = draw(st.sampled_from([(), (1,), (5,), (2, 3), (2, 1, 3), (0,)]))
    seed = draw(st.integers(0, 2**32 - 1))
    return out_modes, in_modes, ranks, lead, seed


def drawn_inputs(case, kind):
    """Cores and batch ``x`` of a drawn case, the einsum reference, and the tolerances."""
    out_modes, in_modes, ranks, lead, seed = case
    lib = "torch" if kind == "torch32" else "numpy"
    cores = random_cores(seed, out_modes, in_modes, ranks, lib)
    x_np = np.random.default_rng(seed + 1).standard_normal((*lead, math.prod(in_modes)))
    x = torch.from_numpy(x_np).float() if lib == "torch" else x_np
    reference = einsum_apply(as64(x), cores)
    # float32 products over at most 4^4 terms of unit-variance numbers
    scale = float(np.abs(reference).max(initial=0.0)) + 1.0
    rtol, atol = (1e-12, 1e-12 * scale) if lib == "numpy" else (1e-4, 1e-5 * scale)
    return cores, x, reference, rtol, atol


@FAST
@given(mpo_and_batch(), st.sampled_from(["numpy64", "torch32"]))
def test_all_strategies_equal_dense_matmul_and_einsum(case, kind):
    cores, x, reference, rtol, atol = drawn_inputs(case, kind)
    W = cores_to_matrix(cores)
    expected = as64(x @ W.T)
    np.testing.assert_allclose(expected, reference, rtol=rtol, atol=atol)
    for strategy in STRATEGIES:
        y = mpo_matmul(x, cores, strategy=strategy)
        assert type(y) is type(x)
        assert y.dtype == x.dtype
        assert tuple(y.shape) == reference.shape
        np.testing.assert_allclose(as64(y), expected, rtol=rtol, atol=atol)
        np.testing.assert_allclose(as64(y), reference, rtol=rtol, atol=atol)


def test_mpo_object_is_accepted():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((24, 16))
    mpo = tn.mpo_decompose(W, ((2, 3, 4), (2, 4, 2)))
    x = rng.standard_normal((2, 3, 16))
    for strategy in STRATEGIES:
        np.testing.assert_allclose(mpo_matmul(x, mpo, strategy=strategy), x @ W.T, atol=1e-10)
    assert plan_mpo_matmul(mpo, 6) == plan_mpo_matmul(list(mpo.cores), 6)
    assert plan_mpo_matmul([c.shape for c in mpo.cores], 6) == plan_mpo_matmul(mpo, 6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torch_device_is_kept(strategy):
    cores = random_cores(1, (2, 3), (3, 2), (1, 2, 1), "torch")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    y = mpo_matmul(x, cores, strategy=strategy)
    assert y.device == x.device and y.dtype == torch.float32


# --------------------------------------------------------------------------- cost model


# cores (1, 2, 3, 2) and (2, 3, 2, 1): W is (2*3) x (3*2) = 6 x 6
SMALL = [(1, 2, 3, 2), (2, 3, 2, 1)]


def test_plan_costs_by_hand_small_batch():
    plan = plan_mpo_matmul(SMALL, 5)
    assert plan.batch_size == 5
    rows, cols = 6, 6
    # dense: chain (I1 J1, R1) @ (R1, I2 J2 R2) = 2*6*2*6 flops, then 2 * batch * out * in
    assert plan.dense_flops == 2 * 6 * 2 * 6 * 1 + 2 * 5 * rows * cols
    assert plan.dense_peak == max(rows * cols, 5 * rows) == 36
    # contract, left to right (the path the planner picks here):
    #   x[a, j1, j2] * T1[1, i1, j1, r1] -> [a, j2, i1, r1]: 2*5*3*2*1*2*2 flops, 40 entries
    #   [a, j2, i1, r1] * T2[r1, i2, j2, 1] -> y[a, i1, i2]:  2*5*2*2*2*3*1 flops, 30 entries
    assert plan.path == ((0, 1), (0, 1))
    assert plan.contract_flops == 2 * 5 * 3 * 2 * 2 * 2 + 2 * 5 * 2 * 2 * 2 * 3 == 480
    assert plan.contract_peak == max(5 * 2 * 2 * 2, 5 * 2 * 3) == 40
    assert plan.equation.count(",") == 2 and "->" in plan.equation
    assert plan.strategy in ("dense", "contract")
    expected = "contract" if plan.contract_seconds <= plan.dense_seconds else "dense"
    assert plan.strategy == expected


def test_plan_costs_by_hand_large_batch():
    plan = plan_mpo_matmul(SMALL, 10)
    # batch * out = 60 > out * in = 36: the output is the dense strategy's largest array
    assert plan.dense_peak == 60
    assert plan.dense_flops == 2 * 6 * 2 * 6 + 2 * 10 * 6 * 6 == 864
    # contraction can never beat the output size as peak, nor 2 * batch * out flops
    assert plan.contract_peak >= 10 * 6
    assert plan.contract_flops >= 2 * 10 * 6


def test_plan_dense_flops_formula_three_cores():
    shapes = [(1, 2, 2, 3), (3, 3, 2, 4), (4, 2, 5, 1)]
    batch = 7
    rows, cols = 2 * 3 * 2, 2 * 2 * 5
    chain = 2 * (2 * 2) * 3 * (3 * 2 * 4) + 2 * (2 * 2 * 3 * 2) * 4 * (2 * 5 * 1)
    plan = plan_mpo_matmul(shapes, batch)
    assert plan.dense_flops == chain + 2 * batch * rows * cols
    assert plan.dense_peak == max(rows * cols, batch * rows)


def test_plan_picks_contract_for_one_row_and_dense_for_many():
    # 4096 x 4096 with Table 2's modes at R = 16 (the docstring's example)
    shapes = [(1, 4, 4, 16), (16, 4, 4, 16), (16, 8, 8, 16), (16, 8, 8, 16), (16, 4, 4, 1)]
    one, many = plan_mpo_matmul(shapes, 1), plan_mpo_matmul(shapes, 4096)
    assert one.strategy == "contract" and many.strategy == "dense"
    assert one.contract_flops < one.dense_flops
    assert many.dense_peak == 4096 * 4096


def test_plan_itemsize_and_profile_change_only_the_times():
    fast = tn.MachineProfile(flops_per_s=1e15, bytes_per_s=1e15, op_seconds=0.0)
    a = plan_mpo_matmul(SMALL, 5)
    b = plan_mpo_matmul(SMALL, 5, itemsize=8, profile=fast)
    assert (a.dense_flops, a.dense_peak) == (b.dense_flops, b.dense_peak)
    assert b.dense_seconds < a.dense_seconds


# ------------------------------------------------------------------------------ autograd


@pytest.mark.parametrize("strategy", ["contract", "auto"])
def test_gradients_match_the_dense_path(strategy):
    out_modes, in_modes, ranks = (2, 3, 2), (3, 2, 2), (1, 3, 2, 1)
    base = [torch.from_numpy(c) for c in random_cores(4, out_modes, in_modes, ranks)]
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((4, 12)))
    weights = torch.from_numpy(np.random.default_rng(6).standard_normal((4, 12)))

    def grads(strat):
        cores = [c.clone().requires_grad_(True) for c in base]
        xx = x.clone().requires_grad_(True)
        y = mpo_matmul(xx, cores, strategy=strat)
        (y.sum() + (y * weights).sum()).backward()
        return [c.grad for c in cores], xx.grad

    got, got_x = grads(strategy)
    ref, ref_x = grads("dense")
    # the dense path's gradients are themselves checked against torch's x @ W.T
    cores = [c.clone().requires_grad_(True) for c in base]
    xx = x.clone().requires_grad_(True)
    y = xx @ cores_to_matrix(cores).T
    (y.sum() + (y * weights).sum()).backward()
    for g, r, c in zip(got, ref, cores):
        assert g is not None and g.shape == c.shape
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(r, c.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-10, atol=1e-10)


def test_gradcheck_contract_path():
    cores = [
        c.requires_grad_(True)
        for c in (torch.from_numpy(c) for c in random_cores(7, (2, 2), (2, 3), (1, 2, 1)))
    ]
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((3, 6))).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: mpo_matmul(x, [a, b], strategy="contract"), (x, *cores)
    )


# -------------------------------------------------------------------------------- errors


def test_x_with_wrong_last_dim():
    cores = random_cores(0, (2, 3), (3, 2), (1, 2, 1))
    for strategy in STRATEGIES:
        with pytest.raises(ShapeError) as info:
            mpo_matmul(np.ones((4, 5)), cores, strategy=strategy)
        msg = str(info.value)
        assert "`x`" in msg and "in_features=6" in msg and "(4, 5)" in msg


def test_unknown_strategy():
    cores = random_cores(0, (2, 3), (3, 2), (1, 2, 1))
    with pytest.raises(ValueError) as info:
        mpo_matmul(np.ones((4, 6)), cores, strategy="foo")  # type: ignore[arg-type]
    msg = str(info.value)
    assert "`strategy`" in msg and "'foo'" in msg
    assert "'dense'" in msg and "'contract'" in msg and "'auto'" in msg


def test_unknown_strategy_is_a_tensornet_error():
    # errors.py: "Every error derives from TensornetError and from the builtin ..."
    cores = random_cores(0, (2, 3), (3, 2), (1, 2, 1))
    with pytest.raises(tn.TensornetError):
        mpo_matmul(np.ones((4, 6)), cores, strategy="foo")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cores", "fragments"),
    [
        ([np.ones((1, 2, 3, 2)), np.ones((2, 3, 2))], ["`cores[1]`", "4-D", "(2, 3, 2)"]),
        ([np.ones((1, 2, 3, 2, 1))], ["`cores[0]`", "4-D", "(1, 2, 3, 2, 1)"]),
        ([np.ones((1, 2, 3, 2)), np.ones((3, 3, 2, 1))], ["bond mismatch", "`cores[1]`"]),
        ([np.ones((1, 2, 3, 2))], ["last core", "got 2"]),
        ([], ["`cores`"]),
    ],
)
def test_bad_cores(cores, fragments):
    for call in (
        lambda: mpo_matmul(np.ones((4, 3)), cores, strategy="dense"),
        lambda: plan_mpo_matmul(cores, 4),
    ):
        with pytest.raises(ShapeError) as info:
            call()
        for fragment in fragments:
            assert fragment in str(info.value)


@pytest.mark.parametrize("batch", [0, -1])
def test_plan_batch_size_must_be_positive(batch):
    with pytest.raises(ShapeError) as info:
        plan_mpo_matmul(SMALL, batch)
    assert "`batch_size`" in str(info.value) and str(batch) in str(info.value)


def test_mpo_matmul_does_not_modify_inputs():
    cores = random_cores(2, (2, 2), (2, 2), (1, 3, 1))
    saved = [c.copy() for c in cores]
    x = np.random.default_rng(3).standard_normal((3, 4))
    x0 = x.copy()
    for strategy in STRATEGIES:
        mpo_matmul(x, cores, strategy=strategy)
    np.testing.assert_array_equal(x, x0)
    for c, s in zip(cores, saved):
        np.testing.assert_array_equal(c, s)


def test_hand_built_mpo_object():
    # the cores of an MPO built by hand go through both strategies unchanged
    cores = random_cores(9, (3, 2), (2, 2), (1, 2, 1))
    mpo = MPO(cores)
    x = np.random.default_rng(1).standard_normal((2, 4))
    np.testing.assert_allclose(
        mpo_matmul(x, mpo, strategy="contract"), x @ mpo.to_dense().T, rtol=1e-12
    )


def test_pairwise_torch_execution_matches_opt_einsum():
    # the path executor used under torch.compile computes what opt_einsum's expression does
    from tensornet.adapters.dota.route import _run_path
    from tensornet.plan import _expression, plan_cached
    from tensornet.profiles import DEFAULT_PROFILE

    gen = torch.Generator().manual_seed(0)
    shapes = ((1, 4, 3, 5), (5, 2, 4, 6), (6, 3, 2, 1))
    cores = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    x = torch.randn(7, 3, 4, 2, generator=gen, dtype=torch.float64)
    plan = plan_cached(shapes, 7, 8, DEFAULT_PROFILE)
    want = _expression(plan.equation, plan.path, ((7, 3, 4, 2), *shapes))(x, *cores)
    got = _run_path(plan.equation, plan.path, (x, *cores))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["dense", "contract"])
def test_dota_layer_under_torch_compile_matches_eager(strategy):
    # torch.compile traces the layer (planning runs outside the graph, the contraction
    # path in plain torch calls): outputs and core gradients agree with eager mode.
    # bench_speed.py --compile measures inductor on the LLaMA-shaped stack.
    from collections import OrderedDict

    from torch import nn

    from tensornet.adapters import apply_dota

    torch._dynamo.reset()
    torch.manual_seed(0)
    holder = nn.Sequential(OrderedDict(proj=nn.Linear(32, 24)))
    # init_weights=False: cores away from T_init, so the adapter's update is not zero
    model = apply_dota(holder, target_modules=["proj"], strategy=strategy, rank=4,
                       num_cores=3, init_weights=False, seed=0)
    cores = list(model.base_model.model.proj.dota_cores["default"])
    x = torch.randn(5, 32)
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOT autograd, no codegen
    y = compiled(x)
    y.square().sum().backward()
    got = [c.grad.clone() for c in cores]
    model.zero_grad(set_to_none=True)
    y_ref = model(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, c in zip(got, cores):
        torch.testing.assert_close(g, c.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- a plan is what runs


@FAST
@given(mpo_and_batch(), st.sampled_from(["numpy64", "torch32"]))
def test_a_plan_runs_both_strategies_like_einsum(case, kind):
    cores, x, reference, rtol, atol = drawn_inputs(case, kind)
    lead = tuple(x.shape[:-1])
    plan = plan_mpo_matmul(cores, max(math.prod(lead), 1))
    assert plan.core_shapes == tuple(tuple(int(d) for d in c.shape) for c in cores)
    for strategy in (None, "dense", "contract"):
        y = plan(x, cores, strategy=strategy)
        assert type(y) is type(x) and y.dtype == x.dtype
        assert tuple(y.shape) == (*lead, plan.out_features)
        np.testing.assert_allclose(as64(y), reference, rtol=rtol, atol=atol)
    # the path is valid for any number of rows: a plan costed for one batch runs another
    x2 = x[..., :1, :] if lead and lead[-1] else x
    np.testing.assert_allclose(
        as64(plan(x2, cores, strategy="contract")), einsum_apply(as64(x2), cores),
        rtol=rtol, atol=atol,
    )


def test_a_plan_runs_its_own_path(monkeypatch):
    # the plan calls opt_einsum's expression built from its own equation and path
    import tensornet.plan as plan_module

    cores = random_cores(0, (2, 3, 2), (3, 2, 2), (1, 3, 2, 1))
    plan = plan_mpo_matmul(cores, 6)
    seen = []
    real = plan_module._expression

    def spy(equation, path, shapes):
        seen.append((equation, path))
        return real(equation, path, shapes)

    monkeypatch.setattr(plan_module, "_expression", spy)
    x = np.random.default_rng(1).standard_normal((6, 12))
    plan(x, cores, strategy="contract")
    assert seen == [(plan.equation, plan.path)]


def _spy_plans(monkeypatch):
    ran = []
    real_call = tn.ContractionPlan.__call__

    def spy(self, xx, cc, *, strategy=None):
        ran.append((self, strategy))
        return real_call(self, xx, cc, strategy=strategy)

    monkeypatch.setattr(tn.ContractionPlan, "__call__", spy)
    return ran


def test_mpo_matmul_calibrated_runs_the_plan_of_the_calibrated_profile(monkeypatch):
    cores = random_cores(3, (4, 4, 4), (4, 4, 4), (1, 8, 8, 1))
    x = np.random.default_rng(0).standard_normal((32, 64))
    want = plan_mpo_matmul(cores, 32, itemsize=8, profile=tn.calibrate(x))
    ran = _spy_plans(monkeypatch)
    y = mpo_matmul(x, cores, strategy="calibrated")
    assert ran == [(want, None)]  # the costed plan, its own strategy
    np.testing.assert_allclose(y, einsum_apply(x, cores), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_mpo_matmul_auto_means_what_it_means_for_dota(monkeypatch, kind):
    # One meaning of "auto" across the library: the planner's choice under the fixed
    # constants of the device kind (tn.profile_for), as DoTA's layers decide; nothing is
    # measured, so every process picks the same path. "calibrated" measures.
    import tensornet.matmul as matmul_module
    from tensornet._device import device_path
    from tensornet.adapters.dota.cost import profile_for as dota_profile_for

    assert dota_profile_for is tn.profile_for
    cores = [torch.from_numpy(c) for c in random_cores(3, (4, 4, 4), (4, 4, 4), (1, 8, 8, 1))]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((32, 64)))
    want = plan_mpo_matmul(cores, 32, itemsize=8, profile=tn.profile_for(kind))
    monkeypatch.setattr(matmul_module, "calibrate", lambda like: pytest.fail("auto calibrated"))
    ran = _spy_plans(monkeypatch)
    with device_path(kind):
        y = mpo_matmul(x, cores)
    assert ran == [(want, None)]
    np.testing.assert_allclose(y.numpy(), einsum_apply(x.numpy(), [c.numpy() for c in cores]),
                               rtol=1e-12, atol=1e-10)
    assert tn.profile_for("cpu") is tn.profiles.DEFAULT_PROFILE
    assert tn.profile_for("cuda") is tn.profiles.CUDA_PROFILE


def test_residual_cost_model_lives_with_dota():
    from tensornet.adapters.dota.cost import residual_strategy

    assert not hasattr(tn.ContractionPlan, "residual_strategy")
    shapes = [(1, 4, 4, 16), (16, 4, 4, 16), (16, 8, 8, 16), (16, 8, 8, 16), (16, 4, 4, 1)]
    one, many = plan_mpo_matmul(shapes, 1), plan_mpo_matmul(shapes, 8192)
    assert residual_strategy(one, training=False) == "contract"
    assert residual_strategy(many, training=True) == "dense"
    # by hand: a forward pass compares building W with contracting
    assert residual_strategy(many, training=False) == (
        "dense" if many.build_seconds < many.contract_seconds else "contract"
    )


@pytest.mark.parametrize("strategy", ["auto", "contract"])
def test_dota_layer_runs_the_plan_it_costed(monkeypatch, strategy):
    from collections import OrderedDict

    from torch import nn

    from tensornet.adapters import apply_dota

    torch.manual_seed(0)
    holder = nn.Sequential(OrderedDict(proj=nn.Linear(1024, 1024)))
    model = apply_dota(holder, target_modules=["proj"], strategy=strategy, rank=4,
                       num_cores=5, init_weights=False, seed=0)
    layer = model.base_model.model.proj
    ran = _spy_plans(monkeypatch)
    x = torch.randn(1, 1024)  # one row: the planner contracts
    # (with grad: without it, "auto" serves from cached half-chains, tests/test_serving.py)
    y = model(x).detach()
    (route,) = layer._routes.values()
    (choice, plan), = route.choices.values()
    assert choice == "contract" and plan is not None
    assert [p for p, _ in ran] == [plan, plan]  # T and T_init, along the costed path
    assert all(s == "contract" for _, s in ran)
    # and the output is the adapted weight's
    cores = list(layer.dota_cores["default"])
    init = layer.init_cores("default")
    w = layer.base_layer.weight + cores_to_matrix(cores) - cores_to_matrix(init)
    torch.testing.assert_close(y, x @ w.T + layer.base_layer.bias, rtol=1e-5, atol=1e-5)


def test_calibrate_leaves_the_global_random_streams_alone(monkeypatch):
    import tensornet.calibration as calibration

    measured = []
    real_synchronizer = calibration._synchronizer

    def spy(device):
        measured.append(device)
        return real_synchronizer(device)

    monkeypatch.setattr(calibration, "_synchronizer", spy)
    calibration._calibrate_key.cache_clear()  # cached per key: measure again
    # numpy's legacy global stream is the one a caller's np.random.* calls draw from
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()  # noqa: NPY002
    profile = tn.calibrate(torch.zeros(1))
    assert profile.flops_per_s > 0 and profile.contract_factor >= 1.0
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()  # noqa: NPY002
    assert np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    assert measured == ["cpu"]  # it waits for the device it measures


def test_calibration_waits_for_the_measured_gpu_not_the_current_one(monkeypatch):
    from tensornet.calibration import _synchronizer

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _synchronizer("cuda:1")()
    assert calls == [torch.device("cuda", 1)]
    _synchronizer("cpu")()
    assert calls == [torch.device("cuda", 1)]  # nothing to wait for on the CPU
