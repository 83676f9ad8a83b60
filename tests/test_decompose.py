"""Tests for tensornet.decompose: TT-SVD / MPO decomposition against tensorly and by properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
import torch
from core_helpers import random_cores
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.decomposition import tensor_train, tensor_train_matrix
from tensorly.tt_matrix import TTMatrix, tt_matrix_to_tensor
from tensorly.tt_tensor import TTTensor, tt_to_tensor

import tensornet as tn
from tensornet import (
    MPO,
    DTypeError,
    NonFiniteError,
    RankError,
    ShapeError,
    TensorTrain,
    ToleranceError,
    mpo_decompose,
    mpo_num_params,
    mpo_ranks,
    tt_decompose,
)

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)
FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Tolerances against tensorly (float64 inputs), measured over ~1500 random Gaussian cases
# (N in 2..5, modes 1..5, R in 1..8): relative errors from the reconstructions agreed to
# 3e-15 relative, reconstructions to 8e-13 of ||W||. The kept subspaces are the same
# (TT-SVD is unique when the singular values at each cut are distinct), but tensornet
# computes them from Gram matrices, so they can move by ~eps * sigma_max^2 / gap; the
# bounds below leave room for that and still catch any real difference in truncation.
RTOL_ERROR_VS_TENSORLY = 1e-10
ATOL_RECON_VS_TENSORLY = 1e-9
# `relative_error` itself is read off the norm identity ||W - MPO||^2 = ||W||^2 - ||MPO||^2,
# whose absolute precision in the *squared* relative error is a few float64 ulps (13 eps
# measured). Its relative precision is therefore ~1e-15 / err^2: tight for the large
# errors of a truncation, loose for a near-exact one.
ATOL_SQUARED_REPORTED_ERROR = 1e-13


def rel_err(approx, W):
    """||W - approx||_F / ||W||_F in float64 (numpy or torch arrays)."""
    a, w = as64(approx), as64(W)
    return float(np.linalg.norm(a - w) / np.linalg.norm(w))


def as64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def eq1_capped(out_modes, in_modes, cap=None):
    """Independent eq. (1): R_k = min(prod_{n<=k} I_n J_n, prod_{n>k} I_n J_n), capped."""
    d = [i * j for i, j in zip(out_modes, in_modes)]
    inner = [min(math.prod(d[:k]), math.prod(d[k:])) for k in range(1, len(d))]
    return (1, *(r if cap is None else min(r, cap) for r in inner), 1)


@st.composite
def mpo_case(draw, max_entries=2048):
    """(out_modes, in_modes, rank, seed): N in 2..5, modes 1..5, at most max_entries entries."""
    n = draw(st.integers(2, 5))
    modes, size = [], 1
    for _ in range(2 * n):
        m = draw(st.integers(1, max(1, min(5, max_entries // size))))
        modes.append(m)
        size *= m
    out_modes, in_modes = tuple(modes[:n]), tuple(modes[n:])
    rank = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    return out_modes, in_modes, rank, seed


def gaussian(out_modes, in_modes, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((math.prod(out_modes), math.prod(in_modes)))


def tensorly_mpo(W, out_modes, in_modes, rank):
    """tensorly's TT-matrix of W (numpy backend), as a list of cores."""
    assert tl.get_backend() == "numpy"
    return list(tensor_train_matrix(W.reshape(*out_modes, *in_modes), rank))


def tensorly_dense(cores, out_modes, in_modes):
    return np.asarray(tt_matrix_to_tensor(cores)).reshape(math.prod(out_modes), math.prod(in_modes))


# ------------------------------------------------------------------- tensorly reference


@FAST
@given(mpo_case())
def test_truncated_mpo_matches_tensorly(case):
    out_modes, in_modes, rank, seed = case
    W = gaussian(out_modes, in_modes, seed)
    ours = mpo_decompose(W, (out_modes, in_modes), rank)
    ref = tensorly_mpo(W, out_modes, in_modes, rank)
    assert [tuple(c.shape) for c in ours.cores] == [tuple(c.shape) for c in ref]
    ref_dense = tensorly_dense(ref, out_modes, in_modes)
    ref_err = rel_err(ref_dense, W)
    our_err = rel_err(ours.to_dense(), W)
    assert our_err == pytest.approx(ref_err, rel=RTOL_ERROR_VS_TENSORLY, abs=1e-13)
    assert our_err <= ref_err * (1 + RTOL_ERROR_VS_TENSORLY) + 1e-13
    # the same truncation: the approximations themselves coincide
    gap = np.linalg.norm(ours.to_dense() - ref_dense)
    assert gap <= ATOL_RECON_VS_TENSORLY * np.linalg.norm(W)
    # the reported error is the reconstruction's
    assert abs(ours.relative_error**2 - ref_err**2) <= ATOL_SQUARED_REPORTED_ERROR


@pytest.mark.parametrize(
    ("out_modes", "in_modes"),
    [
        ((4, 4), (3, 5)),
        ((2, 3, 2), (3, 2, 2)),
        ((2, 2, 2, 2), (2, 2, 2, 2)),
        ((1, 3, 2, 2, 1), (2, 1, 2, 2, 3)),
    ],
)
def test_exact_ranks_match_tensorly_and_reconstruct(out_modes, in_modes):
    W = gaussian(out_modes, in_modes, 7)
    ours = mpo_decompose(W, (out_modes, in_modes))
    full = list(eq1_capped(out_modes, in_modes))
    ref = tensorly_mpo(W, out_modes, in_modes, full)
    assert ours.ranks == tuple(full)
    assert [tuple(c.shape) for c in ours.cores] == [tuple(c.shape) for c in ref]
    assert rel_err(ours.to_dense(), W) < 1e-10
    assert rel_err(tensorly_dense(ref, out_modes, in_modes), W) < 1e-10
    assert ours.relative_error < 1e-10


@st.composite
def tt_case(draw):
    n = draw(st.integers(2, 5))  # tensorly's tensor_train does not take 1-D arrays
    shape, size = [], 1
    for _ in range(n):
        d = draw(st.integers(1, max(1, min(7, 3000 // size))))
        shape.append(d)
        size *= d
    return tuple(shape), draw(st.integers(1, 10)), draw(st.integers(0, 2**32 - 1))


@FAST
@given(tt_case())
def test_tt_decompose_matches_tensorly(case):
    shape, rank, seed = case
    x = np.random.default_rng(seed).standard_normal(shape)
    ours = tt_decompose(x, rank)
    ref = list(tensor_train(x, rank))
    assert [tuple(c.shape) for c in ours.cores] == [tuple(c.shape) for c in ref]
    ref_dense = np.asarray(tt_to_tensor(ref))
    ref_err = rel_err(ref_dense, x)
    our_err = rel_err(ours.to_dense(), x)
    assert our_err == pytest.approx(ref_err, rel=RTOL_ERROR_VS_TENSORLY, abs=1e-13)
    assert np.linalg.norm(as64(ours.to_dense()) - ref_dense) <= (
        ATOL_RECON_VS_TENSORLY * np.linalg.norm(x)
    )
    assert abs(ours.relative_error**2 - ref_err**2) <= ATOL_SQUARED_REPORTED_ERROR


def test_tt_decompose_exact_ranks_match_tensorly():
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 2))
    ours = tt_decompose(x)
    full = [1, 3, 10, 2, 1]  # min(prod left, prod right) at each cut
    ref = list(tensor_train(x, full))
    assert ours.ranks == tuple(full)
    assert [tuple(c.shape) for c in ours.cores] == [tuple(c.shape) for c in ref]
    assert rel_err(ours.to_dense(), x) < 1e-10
    assert rel_err(tt_to_tensor(ref), x) < 1e-10


def test_mpo_tensorly_round_trip():
    out_modes, in_modes = (2, 3, 4), (3, 2, 2)
    W = gaussian(out_modes, in_modes, 11)
    mpo = mpo_decompose(W, (out_modes, in_modes), 4)
    ttm = mpo.to_tensorly()
    assert isinstance(ttm, TTMatrix)
    assert len(ttm) == 3
    # tensorly's contraction of our cores equals ours
    dense = np.asarray(tt_matrix_to_tensor(ttm)).reshape(W.shape)
    np.testing.assert_allclose(dense, mpo.to_dense(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ttm.to_matrix()), mpo.to_dense(), rtol=1e-12, atol=1e-12)
    back = MPO.from_tensorly(ttm)
    assert back.ranks == mpo.ranks
    assert back.out_modes == out_modes and back.in_modes == in_modes
    assert all(a is b for a, b in zip(back.cores, mpo.cores))
    # and from tensorly's own decomposition
    ref = tensor_train_matrix(W.reshape(*out_modes, *in_modes), 4)
    from_ref = MPO.from_tensorly(ref)
    np.testing.assert_allclose(
        from_ref.to_dense(), tensorly_dense(list(ref), out_modes, in_modes), rtol=1e-12
    )


def test_tensor_train_tensorly_round_trip():
    x = np.random.default_rng(2).standard_normal((3, 4, 5))
    tt = tt_decompose(x, 3)
    ttt = tt.to_tensorly()
    assert isinstance(ttt, TTTensor)
    np.testing.assert_allclose(np.asarray(tt_to_tensor(ttt)), tt.to_dense(), rtol=1e-12)
    back = TensorTrain.from_tensorly(ttt)
    assert back.ranks == tt.ranks == (1, 3, 3, 1)
    np.testing.assert_array_equal(back.to_dense(), tt.to_dense())


# ---------------------------------------------------------------------- exact recovery


def realizable_ranks(out_modes, in_modes, caps):
    """Bond dimensions an MPO can actually have: R_k <= R_{k-1} d_k and R_k <= d_{k+1} R_{k+1}."""
    d = [i * j for i, j in zip(out_modes, in_modes)]
    r = [1, *caps, 1]
    for k in range(1, len(d)):
        r[k] = min(r[k], r[k - 1] * d[k - 1])
    for k in range(len(d) - 1, 0, -1):
        r[k] = min(r[k], d[k] * r[k + 1])
    return tuple(r)


@pytest.mark.parametrize(
    ("out_modes", "in_modes", "ranks"),
    [
        ((4, 4), (4, 4), (1, 3, 1)),
        ((2, 3, 2), (3, 2, 2), (1, 3, 3, 1)),
        ((2, 2, 2, 2), (2, 2, 2, 2), (1, 3, 4, 2, 1)),
        ((4, 4, 4, 4, 4), (2, 2, 2, 2, 2), (1, 3, 3, 3, 3, 1)),
        ((3, 1, 2, 2, 3), (1, 4, 2, 1, 2), (1, 2, 6, 4, 3, 1)),
    ],
)
def test_exact_recovery_of_known_ranks(out_modes, in_modes, ranks):
    assert realizable_ranks(out_modes, in_modes, ranks[1:-1]) == ranks
    assert all(r <= f for r, f in zip(ranks, eq1_capped(out_modes, in_modes)))
    rng = np.random.default_rng(sum(ranks))
    cores = random_cores(rng, out_modes, in_modes, ranks)
    W = tn.cores_to_matrix(cores)
    mpo = mpo_decompose(W, (out_modes, in_modes), list(ranks[1:-1]))
    assert mpo.ranks == ranks
    assert rel_err(mpo.to_dense(), W) < 1e-10
    assert mpo.relative_error < 1e-10
    assert mpo.error_bound < 1e-6  # sqrt of rounding-level discarded mass
    # the discarded singular values are (numerically) zero: rank R_k is the exact rank
    for k, sigma in enumerate(mpo.singular_values):
        r = ranks[k + 1]
        if len(sigma) > r:
            assert sigma[r] <= 1e-6 * sigma[0]
        assert sigma[r - 1] > 1e-6 * sigma[0]


@FEW
@given(mpo_case(max_entries=1024), st.lists(st.integers(1, 6), min_size=4, max_size=4))
def test_exact_recovery_property(case, caps):
    out_modes, in_modes, _, seed = case
    n = len(out_modes)
    ranks = realizable_ranks(out_modes, in_modes, caps[: n - 1])
    cores = random_cores(np.random.default_rng(seed), out_modes, in_modes, ranks)
    W = tn.cores_to_matrix(cores)
    mpo = mpo_decompose(W, (out_modes, in_modes), list(ranks[1:-1]))
    assert mpo.ranks == ranks
    assert rel_err(mpo.to_dense(), W) < 1e-10


# --------------------------------------------------------------------------- properties


@FAST
@given(mpo_case())
def test_error_bound_and_counts(case):
    out_modes, in_modes, rank, seed = case
    W = gaussian(out_modes, in_modes, seed)
    mpo = mpo_decompose(W, (out_modes, in_modes), rank)
    true_err = rel_err(mpo.to_dense(), W)
    # TT-SVD bound: ||W - MPO||^2 <= sum of the discarded sigma^2
    assert true_err <= mpo.error_bound * (1 + 1e-6) + 1e-9
    assert mpo.relative_error <= mpo.error_bound * (1 + 1e-6) + 1e-9
    sizes = sum(math.prod(c.shape) for c in mpo.cores)
    assert mpo.num_params == sizes == mpo_num_params(out_modes, in_modes, rank)
    assert (
        mpo.ranks == mpo_ranks(out_modes, in_modes, rank) == eq1_capped(out_modes, in_modes, rank)
    )
    assert mpo.out_modes == out_modes and mpo.in_modes == in_modes
    assert mpo.shape == W.shape
    assert len(mpo.singular_values) == len(out_modes) - 1


@FAST
@given(mpo_case(), st.floats(0.05, 0.95))
def test_tol_mode(case, tol):
    out_modes, in_modes, rank, seed = case
    W = gaussian(out_modes, in_modes, seed)
    uncapped = mpo_decompose(W, (out_modes, in_modes), tol=tol)
    assert uncapped.relative_error <= tol * (1 + 1e-6) + 1e-9
    assert rel_err(uncapped.to_dense(), W) <= tol * (1 + 1e-6) + 1e-9
    assert uncapped.error_bound <= tol * (1 + 1e-6) + 1e-9
    assert all(r <= f for r, f in zip(uncapped.ranks, eq1_capped(out_modes, in_modes)))
    assert uncapped.num_params == sum(math.prod(c.shape) for c in uncapped.cores)
    # with a rank cap too, the cap wins: ranks never exceed it
    capped = mpo_decompose(W, (out_modes, in_modes), rank, tol=tol)
    assert all(r <= c for r, c in zip(capped.ranks, eq1_capped(out_modes, in_modes, rank)))
    # the first sweep sees the same matrix either way: the tol choice, then the cap
    assert capped.ranks[1] == min(uncapped.ranks[1], rank)
    assert capped.num_params == sum(math.prod(c.shape) for c in capped.cores)


def test_tol_mode_is_tighter_with_smaller_tol():
    W = gaussian((4, 4, 4), (4, 4, 4), 3)
    loose = mpo_decompose(W, ((4, 4, 4), (4, 4, 4)), tol=0.9)
    tight = mpo_decompose(W, ((4, 4, 4), (4, 4, 4)), tol=0.05)
    assert tight.relative_error <= 0.05 < loose.relative_error <= 0.9
    assert tight.num_params > loose.num_params
    assert tight.ranks[1] >= loose.ranks[1]


@FEW
@given(mpo_case())
def test_torch_and_numpy_agree(case):
    out_modes, in_modes, rank, seed = case
    W = gaussian(out_modes, in_modes, seed)
    a = mpo_decompose(W, (out_modes, in_modes), rank)
    b = mpo_decompose(torch.from_numpy(W), (out_modes, in_modes), rank)
    assert a.ranks == b.ranks
    # singular vectors are defined up to sign: compare what does not depend on it
    np.testing.assert_allclose(as64(b.to_dense()), a.to_dense(), rtol=1e-9, atol=1e-10)
    # errors and bounds come from norm identities: compare their squares to rounding level
    assert abs(b.relative_error**2 - a.relative_error**2) <= ATOL_SQUARED_REPORTED_ERROR
    assert abs(b.error_bound**2 - a.error_bound**2) <= ATOL_SQUARED_REPORTED_ERROR
    for sa, sb in zip(a.singular_values, b.singular_values):
        # sigma = sqrt(Gram eigenvalue): zeros come out at ~sqrt(eps) * sigma_max
        np.testing.assert_allclose(sb, sa, rtol=1e-8, atol=1e-7 * sa[0])


# (array library, dtype, device, largest error of an exact decomposition after the cast)
DTYPE_CASES = [
    ("numpy", np.float64, "cpu", 1e-12),
    ("numpy", np.float32, "cpu", 1e-5),
    ("numpy", np.float16, "cpu", 5e-3),
] + [
    ("torch", dtype, device, err)
    for device in DEVICES
    for dtype, err in [
        (torch.float64, 1e-12),
        (torch.float32, 1e-5),
        (torch.bfloat16, 3e-2),
        (torch.float16, 5e-3),
    ]
]


@pytest.mark.parametrize(("lib", "dtype", "device", "tol_err"), DTYPE_CASES)
def test_array_type_dtype_and_device_are_kept(lib, dtype, device, tol_err):
    out_modes, in_modes = (2, 3, 4), (4, 2, 2)
    W64 = gaussian(out_modes, in_modes, 5)
    W = W64.astype(dtype) if lib == "numpy" else torch.from_numpy(W64).to(device, dtype)
    for kwargs in ({}, {"rank": 3}, {"tol": 0.5}):
        mpo = mpo_decompose(W, (out_modes, in_modes), **kwargs)
        for core in mpo.cores:
            assert type(core) is type(W)
            assert core.dtype == dtype
            if isinstance(W, torch.Tensor):
                assert core.device == W.device
                assert not core.requires_grad
        dense = mpo.to_dense()
        assert type(dense) is type(W) and dense.dtype == dtype
        assert isinstance(mpo.relative_error, float) and isinstance(mpo.error_bound, float)
        if not kwargs:
            # exact ranks: only the cast of the cores to the low-precision dtype is lost
            assert rel_err(dense, W) < tol_err
    tt = tt_decompose(W.reshape(6, 8, 8), 3)
    assert all(type(c) is type(W) and c.dtype == dtype for c in tt.cores)


def test_input_is_not_modified():
    W = gaussian((4, 4), (4, 4), 1)
    before = W.copy()
    Wt = torch.from_numpy(before.copy())
    mpo_decompose(W, ((4, 4), (4, 4)), 2)
    mpo_decompose(Wt, ((4, 4), (4, 4)), 2, tol=0.3)
    np.testing.assert_array_equal(W, before)
    np.testing.assert_array_equal(Wt.numpy(), before)


def test_integer_shape_uses_factorize():
    W = np.random.default_rng(0).standard_normal((64, 36))
    mpo = mpo_decompose(W, 3, 4)
    assert mpo.out_modes == tn.factorize(64, 3)
    assert mpo.in_modes == tn.factorize(36, 3)
    assert mpo.ranks == mpo_ranks(mpo.out_modes, mpo.in_modes, 4)


def test_accepts_non_contiguous_input():
    base = np.random.default_rng(4).standard_normal((24, 36))
    W = base.T  # (36, 24), Fortran-ordered view
    mpo = mpo_decompose(W, ((3, 3, 4), (2, 3, 4)))
    assert rel_err(mpo.to_dense(), W) < 1e-10
    Wt = torch.from_numpy(base).T
    mpo_t = mpo_decompose(Wt, ((3, 3, 4), (2, 3, 4)), 3)
    mpo_n = mpo_decompose(np.ascontiguousarray(W), ((3, 3, 4), (2, 3, 4)), 3)
    np.testing.assert_allclose(as64(mpo_t.to_dense()), mpo_n.to_dense(), rtol=1e-9, atol=1e-10)


# -------------------------------------------------------------------------------- errors


def test_error_classes():
    assert issubclass(tn.TensornetError, Exception)
    for cls, builtin in [
        (ShapeError, ValueError),
        (RankError, ValueError),
        (NonFiniteError, ValueError),
        (DTypeError, TypeError),
    ]:
        assert issubclass(cls, tn.TensornetError) and issubclass(cls, builtin)


def _raises(exc, builtin, call, *fragments):
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, builtin)
    assert isinstance(info.value, tn.TensornetError)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


W12 = np.random.default_rng(0).standard_normal((12, 8))
SHAPE12 = ((3, 4), (2, 4))


@pytest.mark.parametrize(
    ("shape", "fragments"),
    [
        (((3, 5), (2, 4)), ["`shape`", "[3, 5]", "15", "(12, 8)"]),
        (((3, 4), (2, 2)), ["`shape`", "[2, 2]", "(12, 8)"]),
        (((3, 4), (2, 2, 2)), ["`shape`", "[3, 4]", "[2, 2, 2]"]),
        (((3, 0, 4), (2, 4, 1)), ["shape[0]", "[3, 0, 4]"]),
    ],
)
def test_mode_products_must_match_w(shape, fragments):
    _raises(ShapeError, ValueError, lambda: mpo_decompose(W12, shape), *fragments)


@pytest.mark.parametrize(
    "shape", ["abc", 2.5, True, None, ((3, 4),), ((3, 4), (2, 4), (1, 1)), (3, 4)]
)
def test_shape_must_be_int_or_pair(shape):
    _raises(ShapeError, ValueError, lambda: mpo_decompose(W12, shape), "`shape`", repr(shape))


def test_int_shape_that_cannot_be_factored():
    W = np.ones((7, 8))
    _raises(ShapeError, ValueError, lambda: mpo_decompose(W, 2), "n=7", "num_factors=2")


@pytest.mark.parametrize("rank", [0, -1, -16])
def test_rank_must_be_positive(rank):
    _raises(
        RankError, ValueError, lambda: mpo_decompose(W12, SHAPE12, rank), "`rank`", f"got {rank}"
    )
    x = np.ones((3, 4, 5))
    _raises(RankError, ValueError, lambda: tt_decompose(x, rank), "`rank`", f"got {rank}")


@pytest.mark.parametrize(
    ("rank", "shown"),
    [
        ([2, 2, 2], "[2, 2, 2]"),
        ([], "[]"),
        ([2, 0, 2], "[2, 0, 2]"),
        ([0], "[0]"),
        ([2.5], "[2.5]"),
        (True, "True"),
        ("4", "'4'"),
    ],
)
def test_rank_list_must_have_one_positive_int_per_bond(rank, shown):
    shape = ((3, 2, 2), (2, 2, 2))
    msg = _raises(RankError, ValueError, lambda: mpo_decompose(W12, shape, rank), "`rank`", shown)
    assert "2 positive ints" in msg  # N = 3 cores have 2 bonds


@pytest.mark.parametrize(
    "W", [np.ones(12), np.ones((2, 3, 4)), torch.ones(12), torch.ones(2, 3, 4)]
)
def test_w_must_be_2d(W):
    _raises(ShapeError, ValueError, lambda: mpo_decompose(W, 2), "`W`", "2-D", str(tuple(W.shape)))


def _with_non_finite(kind, bad):
    W = W12.copy()
    W[5, 3] = bad
    if kind == "numpy32":
        return W.astype(np.float32)
    if kind == "torch":
        return torch.from_numpy(W)
    if kind == "torch16":
        return torch.from_numpy(W).to(torch.float16)
    return W


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["numpy", "torch", "numpy32", "torch16"])
@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        (SHAPE12, {}),
        (SHAPE12, {"tol": 0.5}),
        (((3, 2, 2), (2, 2, 2)), {}),  # N >= 3 exact: the fused first two sweeps
        (((3, 2, 2), (2, 2, 2)), {"rank": 2}),
    ],
)
def test_non_finite_w_is_rejected(bad, kind, shape, kwargs):
    W = _with_non_finite(kind, bad)
    _raises(NonFiniteError, ValueError, lambda: mpo_decompose(W, shape, **kwargs), "NaN", "Inf")


def test_non_finite_message_names_the_argument():
    # STYLE.md: every message names the argument; the other checks of mpo_decompose say `W`
    for kind in ("numpy", "torch"):
        with pytest.raises(NonFiniteError) as info:
            mpo_decompose(_with_non_finite(kind, np.nan), SHAPE12)
        assert "`W`" in str(info.value), f"the message does not name `W`: {info.value}"
    x = np.ones((3, 4, 5))
    x[1, 2, 3] = np.inf
    with pytest.raises(NonFiniteError) as info:
        tt_decompose(x, 2)
    assert "`x`" in str(info.value), f"the message does not name `x`: {info.value}"


@pytest.mark.parametrize(
    "W",
    [
        np.ones((12, 8), dtype=np.int64),
        np.ones((12, 8), dtype=bool),
        torch.ones(12, 8, dtype=torch.int32),
        np.ones((12, 8), dtype=np.complex128),
    ],
)
def test_non_float_w_is_rejected(W):
    msg = _raises(DTypeError, TypeError, lambda: mpo_decompose(W, SHAPE12), "`W`", "dtype")
    assert str(W.dtype) in msg


def test_non_array_w_is_rejected():
    _raises(DTypeError, TypeError, lambda: mpo_decompose("W", SHAPE12), "`W`", "str")


@pytest.mark.parametrize("tol", [0, 0.0, -0.1, 1, 1.0, 1.5, float("nan"), float("inf"), True])
def test_tol_must_be_in_open_unit_interval(tol):
    _raises(
        ToleranceError, ValueError, lambda: mpo_decompose(W12, SHAPE12, tol=tol), "`tol`", repr(tol)
    )
    x = np.ones((3, 4, 5))
    _raises(ToleranceError, ValueError, lambda: tt_decompose(x, tol=tol), "`tol`", repr(tol))


def test_tol_is_keyword_only():
    with pytest.raises(TypeError):
        mpo_decompose(W12, SHAPE12, 2, 0.5)  # type: ignore[misc]


# ---------------------------------------------------------------------- special values


@pytest.mark.parametrize("make", [lambda z: z, lambda z: z.astype(np.float32), torch.from_numpy])
@pytest.mark.parametrize("kwargs", [{}, {"rank": 2}, {"tol": 0.1}])
def test_zero_matrix(make, kwargs):
    Z = make(np.zeros((8, 8)))
    with np.errstate(all="raise"):
        mpo = mpo_decompose(Z, ((2, 2, 2), (2, 2, 2)), **kwargs)
    assert mpo.relative_error == 0.0
    assert mpo.error_bound == 0.0
    dense = as64(mpo.to_dense())
    assert np.isfinite(dense).all() and not dense.any()
    assert all(np.isfinite(as64(c)).all() for c in mpo.cores)
    tt = tt_decompose(make(np.zeros((3, 4, 5))), **kwargs)
    assert tt.relative_error == 0.0 and not as64(tt.to_dense()).any()


@pytest.mark.parametrize("array", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        (((4, 4), (4, 4)), {}),
        (((4, 4), (4, 4)), {"rank": 3}),
        (((2, 2, 2, 2), (2, 2, 2, 2)), {}),
        (((2, 2, 2, 2), (2, 2, 2, 2)), {"rank": 3}),
        (((2, 2, 2, 2), (2, 2, 2, 2)), {"tol": 0.5}),
    ],
)
def test_large_finite_float32_is_not_non_finite(array, shape, kwargs):
    # ||W||^2 overflows float32 (max ~3.4e38) although every entry is finite
    W64 = np.random.default_rng(0).standard_normal((16, 16)) * 1e30
    W = W64.astype(np.float32) if array == "numpy" else torch.from_numpy(W64).float()
    mpo = mpo_decompose(W, shape, **kwargs)
    assert all(c.dtype == W.dtype for c in mpo.cores)
    dense = as64(mpo.to_dense())
    assert np.isfinite(dense).all()
    assert math.isfinite(mpo.relative_error) and math.isfinite(mpo.error_bound)
    true_err = rel_err(dense, W)
    assert true_err == pytest.approx(mpo.relative_error, rel=1e-3, abs=1e-5)
    if not kwargs:
        assert true_err < 1e-5


@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_large_finite_float32_tt_decompose(array):
    x64 = np.random.default_rng(1).standard_normal((4, 5, 6)) * 1e30
    x = x64.astype(np.float32) if array == "numpy" else torch.from_numpy(x64).float()
    tt = tt_decompose(x)
    assert rel_err(tt.to_dense(), x) < 1e-5


# ---------------------------------------------------------------------- per-bond rank lists


@FEW
@given(mpo_case(max_entries=1024), st.lists(st.integers(1, 8), min_size=4, max_size=4))
def test_rank_list_caps(case, caps):
    out_modes, in_modes, _, seed = case
    n = len(out_modes)
    caps = caps[: n - 1]
    W = gaussian(out_modes, in_modes, seed)
    mpo = mpo_decompose(W, (out_modes, in_modes), caps)
    # tensorly's TT-SVD with the same per-bond caps is the reference
    ref = tensorly_mpo(W, out_modes, in_modes, [1, *caps, 1])
    assert [tuple(c.shape) for c in mpo.cores] == [tuple(c.shape) for c in ref]
    assert rel_err(mpo.to_dense(), W) == pytest.approx(
        rel_err(tensorly_dense(ref, out_modes, in_modes), W), rel=RTOL_ERROR_VS_TENSORLY, abs=1e-13
    )
    assert all(r <= c for r, c in zip(mpo.ranks[1:-1], caps))
    assert mpo.num_params == sum(math.prod(c.shape) for c in mpo.cores)
    # the counting functions describe what the decomposition returns
    assert mpo.ranks == mpo_ranks(out_modes, in_modes, caps)
    assert mpo.num_params == mpo_num_params(out_modes, in_modes, caps)


# ------------------------------------------------------------------- small special cases


def test_single_core_is_the_matrix():
    W = gaussian((12,), (8,), 0)
    mpo = mpo_decompose(W, ((12,), (8,)))
    assert mpo.ranks == (1, 1)
    assert mpo.cores[0].shape == (1, 12, 8, 1)
    np.testing.assert_array_equal(mpo.to_dense(), W)
    assert mpo.relative_error == 0.0 and mpo.singular_values == ()
    tt = tt_decompose(W[0])
    assert tt.ranks == (1, 1)
    np.testing.assert_array_equal(tt.to_dense(), W[0])


def _unfolding_singular_values(W, out_modes, in_modes, k):
    """Singular values of the k-th sweep unfolding (d_1..d_k) x (d_{k+1}..d_N) of W."""
    t = tn.matrix_to_tensor(W, out_modes, in_modes)
    rows = math.prod(i * j for i, j in zip(out_modes[: k + 1], in_modes[: k + 1]))
    return np.linalg.svd(np.ascontiguousarray(t).reshape(rows, -1), compute_uv=False)


@pytest.mark.parametrize(
    ("out_modes", "in_modes", "rank"),
    [
        ((2, 3, 2), (3, 2, 2), None),
        ((2, 4, 2), (4, 2, 2), 3),
        ((12, 12), (12, 12), None),
        ((12, 12), (12, 12), 4),  # a 144 x 144 Gram matrix, 4 kept
    ],
)
def test_singular_values_hold_every_value_of_each_unfolding(out_modes, in_modes, rank):
    # MPO.singular_values by default: "every value when ... the unfolding has fewer than
    # 128 rows or columns; otherwise the leading ones, at least the kept R_k"
    W = gaussian(out_modes, in_modes, 9)
    mpo = mpo_decompose(W, (out_modes, in_modes), rank)
    assert len(mpo.singular_values) == len(out_modes) - 1
    d = [i * j for i, j in zip(out_modes, in_modes)]
    for k, sigma in enumerate(mpo.singular_values):
        # the unfolding of sweep k is (R_{k-1} d_k) x (d_{k+1} ... d_N)
        rows, cols = mpo.ranks[k] * d[k], math.prod(d[k + 1 :])
        assert sigma.dtype == np.float64
        assert np.all(np.diff(sigma) <= 1e-12 * max(sigma[0], 1.0))  # descending
        if min(rows, cols) < 128:
            assert len(sigma) == min(rows, cols), (k, len(sigma), rows, cols)
        else:
            assert mpo.ranks[k + 1] <= len(sigma) <= min(rows, cols), (k, len(sigma))
    # the first sweep sees W untruncated: its spectrum is that of W's first unfolding
    ref = _unfolding_singular_values(W, out_modes, in_modes, 0)
    first = mpo.singular_values[0]
    n = min(len(first), len(ref))
    np.testing.assert_allclose(first[:n], ref[:n], rtol=1e-8, atol=1e-7 * ref[0])
    if rank is None:
        for k, sigma in enumerate(mpo.singular_values):
            ref = _unfolding_singular_values(W, out_modes, in_modes, k)
            np.testing.assert_allclose(sigma, ref[: len(sigma)], rtol=1e-8, atol=1e-7 * ref[0])


@pytest.mark.parametrize(
    ("shape", "rank"),
    [
        (((1, 2), (1, 3)), None),  # d_1 = 1: the first unfolding has one row
        (((2, 1, 2), (2, 1, 2)), 1),  # R_1 d_2 = 1: the second unfolding has one row
    ],
)
def test_unfolding_with_a_single_row_numpy_and_torch(shape, rank):
    out_modes, in_modes = shape
    W = gaussian(out_modes, in_modes, 8)
    a = mpo_decompose(W, shape, rank)
    b = mpo_decompose(torch.from_numpy(W), shape, rank)
    assert a.ranks == b.ranks == mpo_ranks(out_modes, in_modes, rank)
    np.testing.assert_allclose(as64(b.to_dense()), a.to_dense(), rtol=1e-9, atol=1e-12)
    if rank is None:
        assert rel_err(b.to_dense(), W) < 1e-12


# ------------------------------------------------------------ one rank specification


@FEW
@given(mpo_case(max_entries=1024))
def test_ranks_round_trip_and_the_full_form_matches_tensorly(case):
    out_modes, in_modes, rank, seed = case
    W = gaussian(out_modes, in_modes, seed)
    mpo = mpo_decompose(W, (out_modes, in_modes), rank)
    # MPO.ranks (N+1 values, boundary 1s) is a valid `rank`: the same decomposition again
    again = mpo_decompose(W, (out_modes, in_modes), mpo.ranks)
    assert again.ranks == mpo.ranks
    np.testing.assert_allclose(again.to_dense(), mpo.to_dense(), rtol=1e-10, atol=1e-12)
    # tensorly takes the same full form; the interior caps are the same request
    ref = tensorly_mpo(W, out_modes, in_modes, list(mpo.ranks))
    assert [tuple(c.shape) for c in ref] == [tuple(c.shape) for c in again.cores]
    inner = mpo_decompose(W, (out_modes, in_modes), list(mpo.ranks[1:-1]))
    assert inner.ranks == mpo.ranks
    assert mpo_ranks(out_modes, in_modes, mpo.ranks) == mpo.ranks
    assert mpo_num_params(out_modes, in_modes, mpo.ranks) == mpo.num_params


def test_the_issue_rank_forms_are_accepted():
    W = gaussian((4, 4, 8, 8, 4), (2, 2, 2, 2, 2), 0)
    shape = ((4, 4, 8, 8, 4), (2, 2, 2, 2, 2))
    full = mpo_decompose(W, shape, [1, 16, 16, 16, 16, 1])
    assert full.ranks == (1, 8, 16, 16, 8, 1) == mpo_decompose(W, shape, 16).ranks
    x = np.random.default_rng(0).standard_normal((3, 4, 5))
    tt = tt_decompose(x, [1, 2, 3, 1])
    ref = list(tensor_train(x, [1, 2, 3, 1]))
    assert tt.ranks == (1, 2, 3, 1) == (1, *(int(c.shape[-1]) for c in ref))
    assert rel_err(tt.to_dense(), x) == pytest.approx(
        rel_err(tt_to_tensor(ref), x), rel=RTOL_ERROR_VS_TENSORLY
    )


@pytest.mark.parametrize(
    ("rank", "shown"),
    [([1, 2, 2, 2], "[1, 2, 2, 2]"), ([2, 2, 2, 2], "[2, 2, 2, 2]"), ([1, 2, 2], "[1, 2, 2]")],
)
def test_rank_of_the_wrong_length_names_both_forms(rank, shown):
    shape = ((3, 2, 2), (2, 2, 2))  # N = 3: 2 caps, or 4 values starting and ending with 1
    msg = _raises(RankError, ValueError, lambda: mpo_decompose(W12, shape, rank), "`rank`", shown)
    assert "2 positive ints" in msg and "4 positive ints starting and ending with 1" in msg


# ----------------------------------------------------- the order-2N tensor of tensorly


@FAST
@given(mpo_case())
def test_order_2n_tensor_gives_the_matrix_mpo_and_matches_tensorly(case):
    out_modes, in_modes, rank, seed = case
    W = gaussian(out_modes, in_modes, seed)
    T = W.reshape(*out_modes, *in_modes)  # tensorly's tensor_train_matrix input
    from_matrix = mpo_decompose(W, (out_modes, in_modes), rank)
    from_tensor = mpo_decompose(T, rank=rank)
    assert from_tensor.ranks == from_matrix.ranks
    for a, b in zip(from_tensor.cores, from_matrix.cores):
        np.testing.assert_array_equal(a, b)  # the same computation on the same entries
    assert from_tensor.relative_error == from_matrix.relative_error
    # the shape, if given, must agree with the tensor; then the result is the same
    same = mpo_decompose(T, (out_modes, in_modes), rank)
    assert same.ranks == from_matrix.ranks
    ref = list(tensor_train_matrix(T, rank))
    assert [tuple(c.shape) for c in ref] == [tuple(c.shape) for c in from_tensor.cores]
    ref_err = rel_err(tensorly_dense(ref, out_modes, in_modes), W)
    assert rel_err(from_tensor.to_dense(), W) == pytest.approx(
        ref_err, rel=RTOL_ERROR_VS_TENSORLY, abs=1e-13
    )


def test_order_2n_torch_tensor_and_non_contiguous_tensor():
    out_modes, in_modes = (2, 3, 4), (3, 2, 2)
    W = gaussian(out_modes, in_modes, 3)
    T = torch.from_numpy(W).reshape(*out_modes, *in_modes)
    got = mpo_decompose(T, rank=3)
    want = mpo_decompose(torch.from_numpy(W), (out_modes, in_modes), 3)
    assert got.ranks == want.ranks and all(type(c) is torch.Tensor for c in got.cores)
    torch.testing.assert_close(got.to_dense(), want.to_dense())
    # a strided view of the same entries (tensorly accepts any layout)
    F = np.asfortranarray(W).reshape(*out_modes, *in_modes, order="C")
    assert rel_err(mpo_decompose(F, 3, 3).to_dense(), W) == pytest.approx(
        rel_err(want.to_dense(), W), rel=1e-9
    )


# -------------------------------------------------------------------- full spectra


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("out_modes", "in_modes", "rank"),
    [
        ((12, 12), (12, 12), 4),  # a 144 x 144 Gram matrix, 4 kept
        ((4, 4, 4, 4), (4, 4, 2, 2), 8),  # the fused first two sweeps, 256 rows
        ((4, 4, 8, 2), (4, 4, 2, 8), None),  # exact: every unfolding is one of W's
    ],
)
def test_full_spectrum_holds_every_singular_value_of_each_unfolding(lib, out_modes, in_modes, rank):
    W = gaussian(out_modes, in_modes, 9)
    Wx = torch.from_numpy(W) if lib == "torch" else W
    shape = (out_modes, in_modes)
    full = mpo_decompose(Wx, shape, rank, full_spectrum=True)
    default = mpo_decompose(Wx, shape, rank)
    # the option changes nothing else
    assert full.ranks == default.ranks
    np.testing.assert_allclose(as64(full.to_dense()), as64(default.to_dense()), atol=1e-9)
    d = [i * j for i, j in zip(out_modes, in_modes)]
    for k, sigma in enumerate(full.singular_values):
        rows, cols = full.ranks[k] * d[k], math.prod(d[k + 1 :])
        assert len(sigma) == min(rows, cols)
        # the default keeps at least the leading kept values, and they agree
        keep = default.singular_values[k]
        assert full.ranks[k + 1] <= len(keep) <= len(sigma)
        np.testing.assert_allclose(keep, sigma[: len(keep)], rtol=1e-8, atol=1e-7 * sigma[0])
    # against numpy's SVD of the unfoldings of W
    first = _unfolding_singular_values(W, out_modes, in_modes, 0)
    np.testing.assert_allclose(full.singular_values[0], first, rtol=1e-8, atol=1e-7 * first[0])
    if rank is None:
        for k, sigma in enumerate(full.singular_values):
            ref = _unfolding_singular_values(W, out_modes, in_modes, k)
            np.testing.assert_allclose(sigma, ref, rtol=1e-8, atol=1e-7 * ref[0])


def test_a_rank_can_be_chosen_from_the_spectrum():
    # W of exact MPO ranks (1, 3, 1) plus noise: the spectrum of the one unfolding shows the
    # gap after 3 values, and the discarded mass predicts the error of each rank
    rng = np.random.default_rng(0)
    cores = random_cores(rng, (12, 12), (12, 12), (1, 3, 1))
    W = tn.cores_to_matrix(cores) + 1e-3 * rng.standard_normal((144, 144))
    sigma = mpo_decompose(W, ((12, 12), (12, 12)), 1, full_spectrum=True).singular_values[0]
    assert len(sigma) == 144
    assert sigma[3] < 1e-2 * sigma[2]
    for r in (1, 2, 3, 5):
        mpo = mpo_decompose(W, ((12, 12), (12, 12)), r)
        predicted = math.sqrt((sigma[r:] ** 2).sum() / (sigma**2).sum())
        assert mpo.relative_error == pytest.approx(predicted, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("module", ["numpy", "torch"])
def test_a_contiguous_weight_in_the_compute_dtype_is_read_in_place(module):
    # the torch path copied W (a full extra pass over W) where numpy's
    # ascontiguousarray shares it
    from tensornet._backend import ops_for

    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    x = w if module == "numpy" else torch.from_numpy(w.copy())
    before = x.copy() if module == "numpy" else x.clone()
    ops = ops_for(x)
    view = ops.contiguous(x, ops.compute_dtype(x))
    shares = np.shares_memory(view, x) if module == "numpy" else view.data_ptr() == x.data_ptr()
    assert shares
    tn.mpo_decompose(x, ((4, 4, 4), (4, 6, 4)), rank=4)
    assert (x == before).all()  # read, never written
    odd = x.T  # not contiguous: copied
    assert (ops.contiguous(odd, ops.compute_dtype(odd)) == odd).all()


# ------------------------------------------------- the fused head's block, piece by piece


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("piece_bytes", [1, 3000, 10_000])
@pytest.mark.parametrize(("out_modes", "in_modes", "transposed"), [
    ((2, 3, 4, 5), (3, 2, 5, 2), False),   # pieces along the first rest axis
    ((2, 2, 3, 2, 2), (2, 3, 2, 2, 3), True),  # a transposed W: nothing is contiguous
])
def test_the_block_read_in_pieces_gives_the_whole_reads_result(
    monkeypatch, lib, dtype, piece_bytes, out_modes, in_modes, transposed
):
    # on the CPU path a large block is copied and multiplied a piece at a time; tiny piece
    # sizes force that path (several pieces, several rest axes) on a small matrix, which
    # must decompose as the one-copy path does
    from tensornet import _sweep

    rows, cols = math.prod(out_modes), math.prod(in_modes)
    a = np.random.default_rng(3).standard_normal((cols, rows) if transposed else (rows, cols))
    a = a.T if transposed else a
    W = a.astype(dtype) if lib == "numpy" else torch.from_numpy(a).to(getattr(torch, dtype))
    rank = [1, 4, 5, 3, *[2] * (len(out_modes) - 4), 1]
    whole = tn.mpo_decompose(W, (out_modes, in_modes), rank=rank)
    monkeypatch.setattr(_sweep, "_PIECE_BYTES", piece_bytes)
    layout = _sweep.matrix_layout(W, out_modes, in_modes)
    cdtype = np.float64 if dtype == "float64" else np.float32
    if lib == "torch":
        cdtype = torch.float64 if dtype == "float64" else torch.float32
    ops = tn._backend.ops_for(W)
    assert _sweep._pieces(layout, cdtype, ops) is not None  # the piece path runs
    if lib == "torch":
        from tensornet._device import device_path

        with device_path("cuda"):  # the accelerator path copies the block once, whole
            assert _sweep._pieces(layout, cdtype, ops) is None
    pieces = tn.mpo_decompose(W, (out_modes, in_modes), rank=rank)
    assert pieces.ranks == whole.ranks
    rtol = 1e-12 if dtype == "float64" else 1e-4
    assert pieces.relative_error == pytest.approx(whole.relative_error, rel=rtol)
    dense = [np.asarray(m.to_dense().float() if lib == "torch" else m.to_dense(), np.float64)
             for m in (whole, pieces)]
    np.testing.assert_allclose(dense[1], dense[0], rtol=0, atol=rtol * np.abs(dense[0]).max() * 10)
    for core in pieces.cores:
        assert type(core) is type(W) and core.dtype == W.dtype
