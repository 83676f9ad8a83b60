"""Operations on MPOs and tensor trains in the format, against their dense references."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import tensornet as tn
from tensornet.errors import DTypeError, NonFiniteError, RankError, ShapeError, ToleranceError
from tensornet.ttops import rounding_allowance

LIBS = ["numpy", "torch"]
DTYPES = ["float32", "float64"]

# (out_modes, in_modes, ranks): a single core, 1-sized modes, odd shapes, a long chain
MPO_CASES = [
    ((3,), (5,), (1, 1)),
    ((2, 3), (3, 1), (1, 3, 1)),
    ((1, 3, 2), (2, 1, 5), (1, 2, 3, 1)),
    ((3, 2, 5, 1), (2, 3, 1, 3), (1, 4, 5, 2, 1)),
    ((2, 2, 2, 2, 2), (1, 2, 1, 2, 1), (1, 2, 3, 3, 2, 1)),
]
# (shape, ranks)
TT_CASES = [
    ((7,), (1, 1)),
    ((1, 4), (1, 1, 1)),
    ((3, 1, 5), (1, 2, 2, 1)),
    ((2, 5, 3, 4), (1, 2, 4, 3, 1)),
]


def _array(rng, shape, lib, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    return torch.from_numpy(x) if lib == "torch" else x


def random_mpo(rng, out_modes, in_modes, ranks, lib="numpy", dtype="float64"):
    shapes = [(ranks[k], i, j, ranks[k + 1]) for k, (i, j) in enumerate(zip(out_modes, in_modes))]
    return tn.MPO([_array(rng, s, lib, dtype) for s in shapes])


def random_tt(rng, shape, ranks, lib="numpy", dtype="float64"):
    shapes = [(ranks[k], d, ranks[k + 1]) for k, d in enumerate(shape)]
    return tn.TensorTrain([_array(rng, s, lib, dtype) for s in shapes])


def random_train(kind, case, rng, lib="numpy", dtype="float64"):
    if kind == "mpo":
        return random_mpo(rng, *MPO_CASES[case], lib=lib, dtype=dtype)
    return random_tt(rng, *TT_CASES[case], lib=lib, dtype=dtype)


TRAINS = [("mpo", k) for k in range(len(MPO_CASES))] + [("tt", k) for k in range(len(TT_CASES))]


def each_train(test):
    """Run ``test(kind, case, lib, dtype)`` on every train of the cases, per library and dtype."""
    for name, values in (("kind,case", TRAINS), ("dtype", DTYPES), ("lib", LIBS)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def dense64(train):
    """The train's dense form, contracted in float64 from its cores."""
    cores = [c.detach().double().numpy() if torch.is_tensor(c) else c.astype(np.float64)
             for c in train.cores]
    return type(train)(cores).to_dense()


def change(a, b):
    """||a - b|| / ||a|| of two trains' dense float64 forms."""
    da, db = dense64(a), dense64(b)
    return float(np.linalg.norm(da - db) / np.linalg.norm(da))


def assert_kind_kept(result, like):
    for core in result.cores:
        assert type(core) is type(like.cores[0])
        assert core.dtype == like.cores[0].dtype
        if torch.is_tensor(core):
            assert core.device == like.cores[0].device


def rtol_for(dtype):
    return 1e-12 if dtype == "float64" else 1e-5


# --------------------------------------------------------------------------- rounding


@each_train
def test_rounding_a_sum_back_to_the_original_ranks_is_exact(kind, case, lib, dtype):
    a = random_train(kind, case, np.random.default_rng(case), lib, dtype)
    s = a + a
    assert s.ranks == tuple(1 if r == 1 and k in (0, len(a.ranks) - 1) else 2 * r
                            for k, r in enumerate(a.ranks))
    b = s.round(rank=a.ranks)
    assert b.ranks == a.round().ranks  # a's ranks, less what its shapes make redundant
    assert type(b) is type(a)
    assert_kind_kept(b, a)
    assert change(s, b) <= rtol_for(dtype)
    assert b.relative_error <= rtol_for(dtype)
    assert b.relative_error <= b.error_bound
    if dtype == "float64":
        assert b.relative_error < 1e-12 and change(s, b) < 1e-12
    assert len(b.singular_values) == len(a.cores) - 1


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", [1, 2])
@pytest.mark.parametrize("kind,case", TRAINS)
def test_rounding_error_is_the_measured_change_and_within_its_bound(kind, case, cap, lib, dtype):
    a = random_train(kind, case, np.random.default_rng(10 + case), lib, dtype)
    b = a.round(rank=cap)
    assert all(r <= cap for r in b.ranks)
    assert_kind_kept(b, a)
    measured = change(a, b)
    assert measured <= b.error_bound
    slack = rounding_allowance(a.cores[0], len(a.cores))
    assert abs(measured - b.relative_error) <= slack
    assert b.error_bound == pytest.approx(b.relative_error + slack)
    for s, r in zip(b.singular_values, b.ranks[1:-1]):
        assert s.dtype == np.float64 and np.all(np.diff(s) <= 0) and len(s) >= r


def test_rounding_reports_the_discarded_singular_values():
    a = random_tt(np.random.default_rng(3), (4, 5, 3), (1, 4, 3, 1))
    b = a.round(rank=2)
    # the first bond's spectrum is that of the dense unfolding; the error is what the
    # sweep discarded, bond by bond
    s0 = np.linalg.svd(dense64(a).reshape(4, 15), compute_uv=False)
    np.testing.assert_allclose(b.singular_values[0], s0, rtol=1e-12, atol=1e-12)
    discarded = sum(float(np.sum(s[2:] ** 2)) for s in b.singular_values)
    assert b.relative_error == pytest.approx(math.sqrt(discarded) / np.linalg.norm(dense64(a)))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tol", [0.5, 0.2, 0.05, 1e-3])
def test_rounding_meets_tol(tol, lib, dtype):
    rng = np.random.default_rng(4)
    a = random_mpo(rng, (3, 2, 4, 2), (2, 3, 2, 2), (1, 5, 6, 4, 1), lib, dtype)
    b = a.round(tol=tol)
    assert change(a, b) <= tol
    assert b.relative_error <= tol
    assert sum(b.ranks) <= sum(a.ranks)
    # with a cap, the cap wins
    c = a.round(tol=tol, rank=1)
    assert c.ranks == (1, 1, 1, 1, 1)


def test_rounding_tol_gives_the_smallest_ranks_of_tt_svd():
    # a train of ranks 3 plus a small one of rank 1: tol above the small one's share drops it
    rng = np.random.default_rng(5)
    a = random_tt(rng, (4, 4, 4), (1, 3, 3, 1))
    noise = 1e-4 * random_tt(rng, (4, 4, 4), (1, 1, 1, 1))
    s = a + noise
    assert s.ranks == (1, 4, 4, 1)
    assert s.round(tol=1e-2).ranks == (1, 3, 3, 1)
    assert s.round(tol=1e-9).ranks == (1, 4, 4, 1)


def test_rounding_rank_specification_is_the_decompositions():
    a = random_mpo(np.random.default_rng(6), (2, 3, 2), (2, 2, 3), (1, 4, 4, 1))
    ranks = [a.round(rank=r).ranks for r in (2, [2, 2], [1, 2, 2, 1], (1, 2, 2, 1))]
    assert ranks == [(1, 2, 2, 1)] * 4
    assert a.round(rank=[3, 1]).ranks == (1, 3, 1, 1)
    assert a.round().ranks == a.ranks  # None truncates nothing
    np.testing.assert_allclose(dense64(a.round()), dense64(a), rtol=1e-12, atol=1e-12)
    for bad in (0, [2, 0], [1, 2, 2], "2", 2.5, True):
        with pytest.raises(RankError, match="`rank` must be"):
            a.round(rank=bad)
    for bad in (0.0, 1.0, -0.1, "0.1", True):
        with pytest.raises(ToleranceError, match="`tol` must be"):
            a.round(tol=bad)


def test_rounding_refuses_a_tol_below_the_dtypes_limit():
    a = random_tt(np.random.default_rng(7), (3, 4), (1, 2, 1), dtype="float32")
    with pytest.raises(ToleranceError, match="at least .* float32"):
        a.round(tol=1e-7)
    assert a.round(tol=1e-5).ranks == (1, 2, 1)
    b = random_tt(np.random.default_rng(7), (3, 4), (1, 2, 1))
    assert b.round(tol=1e-12).ranks == (1, 2, 1)


def test_rounding_only_shrinks_bonds_to_what_the_shapes_allow():
    # bond 8 on a 2 x 3 train: at most 2 (left) and 3 (right) are meaningful
    a = tn.TensorTrain([np.ones((1, 2, 8)), np.ones((8, 3, 1))])
    assert a.round().ranks == (1, 2, 1)
    assert a.round(tol=1e-9).ranks == (1, 1, 1)
    np.testing.assert_allclose(dense64(a.round(tol=1e-9)), dense64(a))


@pytest.mark.parametrize("lib", LIBS)
def test_rounding_a_zero_train_gives_rank_one_zeros(lib):
    a = random_mpo(np.random.default_rng(8), (2, 3), (2, 2), (1, 3, 1), lib)
    z = 0 * a
    for kwargs in ({}, {"rank": 2}, {"tol": 0.1}):
        r = z.round(**kwargs)
        assert r.ranks == (1, 1, 1) and r.relative_error == 0.0 and r.error_bound == 0.0
        assert not np.any(dense64(r))
        assert_kind_kept(r, a)


def test_single_core_rounding_is_the_identity():
    a = random_mpo(np.random.default_rng(9), (4,), (3,), (1, 1))
    b = a.round(rank=1, tol=0.5)
    np.testing.assert_array_equal(b.cores[0], a.cores[0])
    assert b.relative_error == 0.0 and b.singular_values == ()


@pytest.mark.parametrize("lib,dtype", [("torch", torch.bfloat16), ("torch", torch.float16),
                                       ("numpy", np.float16)])
def test_narrow_dtypes_round_and_come_back_in_their_dtype(lib, dtype):
    a = random_mpo(np.random.default_rng(11), (2, 3, 2), (2, 2, 2), (1, 3, 3, 1))
    cores = [torch.from_numpy(c).to(dtype) if lib == "torch" else c.astype(dtype)
             for c in a.cores]
    a = tn.MPO(cores)
    b = (a + a).round(rank=a.ranks)
    assert_kind_kept(b, a)
    assert change(a + a, b) <= b.error_bound
    with pytest.raises(ToleranceError):
        a.round(tol=1e-4)


@pytest.mark.parametrize("lib", LIBS)
def test_float16_cores_whose_norm_overflows_one_core_are_balanced(lib):
    # each core holds ~100s, the train's norm ~1e9: float16 (max 65504) cannot hold it in
    # one core, which is where the sweep leaves it
    a = random_tt(np.random.default_rng(13), (3, 4, 4, 3), (1, 2, 2, 2, 1))
    cores = [(300 * c).astype(np.float16) for c in a.cores]
    a = tn.TensorTrain([torch.from_numpy(c) for c in cores] if lib == "torch" else cores)
    assert a.norm() > 1e6
    with np.errstate(over="raise"):  # no overflow, not even a warning
        b = a.round(rank=1)
    assert_kind_kept(b, a)
    assert all(np.isfinite(_unfold_left(c)).all() for c in b.cores)
    assert change(a, b) <= b.error_bound
    with pytest.raises(NonFiniteError, match="overflow their dtype"):
        a.canonicalize(0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_cores_are_refused(bad):
    a = random_tt(np.random.default_rng(12), (3, 4), (1, 2, 1))
    cores = [a.cores[0].copy(), a.cores[1]]
    cores[0][0, 1, 1] = bad
    a = tn.TensorTrain(cores)
    for op in (lambda: a.round(rank=1), lambda: a.canonicalize(0), a.norm, lambda: a.inner(a)):
        with pytest.raises(NonFiniteError, match=r"`cores\[0\]` must hold only finite"):
            op()


# --------------------------------------------------------------------------- canonical forms


def _unfold_left(core):
    c = core.detach().double().numpy() if torch.is_tensor(core) else core.astype(np.float64)
    return c.reshape(-1, c.shape[-1])


def _unfold_right(core):
    c = core.detach().double().numpy() if torch.is_tensor(core) else core.astype(np.float64)
    return c.reshape(c.shape[0], -1)


@each_train
def test_canonical_form_is_orthogonal_around_the_center_and_unchanged(kind, case, lib, dtype):
    a = random_train(kind, case, np.random.default_rng(20 + case), lib, dtype)
    tol = 1e-12 if dtype == "float64" else 1e-5
    n = len(a.cores)
    for center in range(n):
        c = a.canonicalize(center)
        assert type(c) is type(a) and c.relative_error is None and c.error_bound is None
        assert_kind_kept(c, a)
        assert all(r <= q for r, q in zip(c.ranks, a.ranks))
        for k in range(center):
            q = _unfold_left(c.cores[k])
            np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=10 * tol)
        for k in range(center + 1, n):
            q = _unfold_right(c.cores[k])
            np.testing.assert_allclose(q @ q.T, np.eye(q.shape[0]), atol=10 * tol)
        assert change(a, c) <= 10 * tol
        center_norm = float(np.linalg.norm(_unfold_left(c.cores[center])))
        assert center_norm == pytest.approx(float(np.linalg.norm(dense64(a))), rel=10 * tol)


def test_canonical_form_shrinks_only_redundant_bonds():
    a = tn.TensorTrain([np.ones((1, 2, 8)), np.ones((8, 3, 1))])
    assert a.canonicalize(0).ranks == (1, 3, 1)
    assert a.canonicalize(1).ranks == (1, 2, 1)


def test_canonicalize_checks_the_center():
    a = random_tt(np.random.default_rng(21), (2, 3), (1, 2, 1))
    for bad in (-1, 2, 5):
        with pytest.raises(ShapeError, match="`center`"):
            a.canonicalize(bad)
    for bad in (1.0, "0", True, None):
        with pytest.raises(DTypeError, match="`center`"):
            a.canonicalize(bad)


# --------------------------------------------------------------------------- inner and norm


@each_train
def test_inner_and_norm_equal_the_dense_ones(kind, case, lib, dtype):
    rng = np.random.default_rng(30 + case)
    a = random_train(kind, case, rng, lib, dtype)
    b = random_train(kind, case, rng, lib, dtype).round(rank=2)  # other ranks
    da, db = dense64(a), dense64(b)
    scale = np.linalg.norm(da) * np.linalg.norm(db)
    assert isinstance(a.inner(b), float) and isinstance(a.norm(), float)
    assert abs(a.inner(b) - float(np.vdot(da, db))) <= 1e-12 * scale
    assert a.inner(b) == pytest.approx(b.inner(a), rel=1e-12, abs=1e-12 * scale)
    assert a.norm() == pytest.approx(float(np.linalg.norm(da)), rel=1e-12)
    assert a.inner(a) == pytest.approx(a.norm() ** 2, rel=1e-12)


def test_the_norm_of_a_small_difference_is_accurate():
    a = random_mpo(np.random.default_rng(31), (2, 3, 2), (2, 2, 2), (1, 3, 3, 1))
    assert (a - a).norm() < 1e-14 * a.norm()
    b = a + 1e-6 * random_mpo(np.random.default_rng(32), (2, 3, 2), (2, 2, 2), (1, 2, 2, 1))
    assert (b - a).norm() == pytest.approx(float(np.linalg.norm(dense64(b) - dense64(a))),
                                           rel=1e-8)


# --------------------------------------------------------------------------- arithmetic


@each_train
def test_arithmetic_equals_the_dense_arithmetic(kind, case, lib, dtype):
    rng = np.random.default_rng(40 + case)
    a = random_train(kind, case, rng, lib, dtype)
    b = random_train(kind, case, rng, lib, dtype)
    da, db = dense64(a), dense64(b)
    rtol = 1e-12 if dtype == "float64" else 1e-5
    scale = np.abs(da).max() + np.abs(db).max()
    cases = [
        (a + b, da + db),
        (a - b, da - db),
        (2.5 * a, 2.5 * da),
        (a * -3, -3 * da),
        (np.float64(0.5) * a, 0.5 * da),
        (a * np.float32(2), 2 * da),
        (-a, -da),
        (a + b - b, da),
    ]
    for result, ref in cases:
        assert type(result) is type(a)
        assert_kind_kept(result, a)
        assert result.relative_error is None and result.error_bound is None
        np.testing.assert_allclose(dense64(result), ref, rtol=rtol, atol=3 * rtol * scale)
    n = len(a.ranks)
    bonds = [1] + [x + y for x, y in zip(a.ranks[1:-1], b.ranks[1:-1])] + [1]
    assert (a + b).ranks == tuple(bonds) if n > 2 else (a + b).ranks == (1, 1)
    assert (2 * a).ranks == a.ranks


def test_arithmetic_leaves_the_operands_alone():
    a = random_tt(np.random.default_rng(41), (2, 3), (1, 2, 1))
    before = [c.copy() for c in a.cores]
    _ = (a + a, 3 * a, -a, a - a, a.round(rank=1), a.canonicalize(0), a.norm())
    for c, d in zip(a.cores, before):
        np.testing.assert_array_equal(c, d)


def test_mismatched_operands_raise_the_right_errors():
    rng = np.random.default_rng(42)
    a = random_mpo(rng, (2, 3), (3, 2), (1, 2, 1))
    t = random_tt(rng, (6, 6), (1, 2, 1))
    swapped = random_mpo(rng, (3, 2), (2, 3), (1, 2, 1))  # same sizes, other modes
    split = random_mpo(rng, (2, 3), (2, 3), (1, 2, 1))  # same I_k J_k per core
    longer = random_mpo(rng, (2, 3, 1), (3, 2, 1), (1, 2, 1, 1))
    f32 = tn.MPO([c.astype(np.float32) for c in a.cores])
    tch = tn.MPO([torch.from_numpy(c) for c in a.cores])
    for op in ("+", "-", "inner"):
        def run(other, op=op):
            if op == "+":
                return a + other
            if op == "-":
                return a - other
            return a.inner(other)

        for other in (swapped, split, longer):
            with pytest.raises(ShapeError, match="needs equal modes"):
                run(other)
        with pytest.raises(DTypeError, match="takes another MPO"):
            run(t)
        with pytest.raises(DTypeError, match="takes another MPO"):
            run(1.0)
        with pytest.raises(DTypeError, match="dtype of `self`"):
            run(f32)
        with pytest.raises(DTypeError, match="must be a numpy array like `self`"):
            run(tch)
    with pytest.raises(ShapeError, match=r"shape \[6, 6\].*shape \[6\]"):
        t + random_tt(rng, (6,), (1, 1))
    for bad in (a, t, np.ones(2), torch.ones(2), "2", True, 1j, None):
        with pytest.raises(DTypeError, match="takes a real scalar"):
            a * bad
        with pytest.raises(DTypeError, match="takes a real scalar"):
            bad * a
    with pytest.raises(NonFiniteError, match="must be finite"):
        a * np.nan
    with pytest.raises(NonFiniteError, match="overflows float32"):
        f32 * 1e300


def test_torch_devices_must_match():
    # two devices without a GPU: the meta device holds no data, so the check comes first
    a = random_tt(np.random.default_rng(43), (2, 3), (1, 2, 1), "torch")
    meta = tn.TensorTrain([c.to("meta") for c in a.cores])
    with pytest.raises(DTypeError, match="device of `self`"):
        a + meta
    with pytest.raises(DTypeError, match="device of `self`"):
        a.inner(meta)


def test_numpy_operations_never_import_torch():
    code = (
        "import sys, numpy as np, tensornet as tn\n"
        "a = tn.MPO([np.ones((1, 2, 3, 2)), np.ones((2, 2, 2, 1))])\n"
        "b = (2 * a - a + a).round(rank=1); a.canonicalize(1); a.inner(b); a.norm()\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- properties

try:  # the property test needs hypothesis (a test extra); the rest of the file does not
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    hypothesis = None


if hypothesis is not None:

    @st.composite
    def trains(draw):
        n = draw(st.integers(1, 5))
        shape = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
        ranks = [1] + draw(st.lists(st.integers(1, 6), min_size=n - 1, max_size=n - 1)) + [1]
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        dtype = draw(st.sampled_from(DTYPES))
        if draw(st.booleans()):
            in_modes = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
            return random_mpo(rng, shape, in_modes, ranks, dtype=dtype)
        return random_tt(rng, shape, ranks, dtype=dtype)

    @hypothesis.settings(max_examples=80, deadline=None, derandomize=True)
    @hypothesis.given(
        trains(),
        st.one_of(st.none(), st.integers(1, 4)),
        st.one_of(st.none(), st.floats(1e-4, 0.9)),
    )
    def test_property_rounding_error_is_within_its_bound(a, rank, tol):
        b = a.round(rank=rank, tol=tol)
        measured = change(a, b) if np.linalg.norm(dense64(a)) > 0 else 0.0
        assert b.relative_error <= b.error_bound
        assert measured <= b.error_bound
        if rank is None and tol is not None:
            assert measured <= tol
        if rank is not None:
            assert max(b.ranks) <= rank
        assert b.num_params == sum(c.size for c in b.cores)
        assert type(b) is type(a) and b.cores[0].dtype == a.cores[0].dtype
        full = tn.tt_ranks(a.shape) if isinstance(a, tn.TensorTrain) else tn.mpo_ranks(
            a.out_modes, a.in_modes
        )
        assert all(x <= y for x, y in zip(b.ranks, full))

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_rounding_error_is_within_its_bound():
        pass
