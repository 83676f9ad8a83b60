"""Tests for tensornet.tensorize: factoring dimensions and matrix <-> MPO-tensor reshapes."""

from __future__ import annotations

import math
import re
import string

import numpy as np
import pytest
import torch
from core_helpers import mpo_shapes, random_cores
from hypothesis import given, settings
from hypothesis import strategies as st

import tensornet as tn
from tensornet import ShapeError, cores_to_matrix, factorize, matrix_to_tensor, tensor_to_matrix

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# The DoTA paper's Table 2 (appendix B), N = 5, as the paper prints it (an independent
# copy of tensornet.tensorize.PAPER_SHAPES, read the paper's way).
_TABLE_2_TEXT = """
Hidden dimension	Tensor shape
50400	[5, 10, 14, 12, 6]
14336	[4, 8, 8, 8, 7]
11008	[4, 4, 43, 4, 4]
768	[4, 4, 4, 4, 3]
3072	[4, 4, 8, 6, 4]
1024	[4, 4, 4, 4, 4]
4096	[4, 4, 8, 8, 4]
2304	[4, 4, 8, 6, 3]
"""
PAPER_TABLE_2 = {
    int(dim): tuple(int(m) for m in re.findall(r"\d+", shape))
    for dim, shape in (row.split("\t") for row in _TABLE_2_TEXT.strip().splitlines()[1:])
}


# ---------------------------------------------------------------------------- factorize


@pytest.mark.parametrize(("n", "expected"), sorted(PAPER_TABLE_2.items()))
def test_factorize_returns_paper_table_2_shapes(n, expected):
    modes = factorize(n, 5)
    assert modes == expected
    assert all(type(m) is int for m in modes)
    assert math.prod(modes) == n


def test_mpo_modes_pairs_out_and_in_factorizations():
    # LLaMA-2-7B up_proj: W is (11008, 4096).
    assert tn.mpo_modes(11008, 4096, 5) == ((4, 4, 43, 4, 4), (4, 4, 8, 8, 4))


def _multisets(n, k, smallest=2):
    """Every nondecreasing k-tuple of factors >= smallest with product n (brute force)."""
    if k == 1:
        return [(n,)] if n >= smallest else []
    out = []
    d = smallest
    while d**k <= n:  # the smallest of k factors is at most n ** (1 / k)
        if n % d == 0:
            out.extend((d, *rest) for rest in _multisets(n // d, k - 1, d))
        d += 1
    return out


SMALL_PRIMES = [2, 2, 2, 2, 3, 3, 5, 7, 11, 13]


@st.composite
def factorable(draw):
    """(n, N) with N in 2..6 and n a product of at least N primes (so a factorization exists)."""
    num_factors = draw(st.integers(2, 6))
    primes = draw(
        st.lists(
            st.sampled_from(SMALL_PRIMES), min_size=num_factors, max_size=num_factors + 3
        ).filter(lambda p: math.prod(p) <= 10**6)
    )
    return math.prod(primes), num_factors


@FAST
@given(factorable())
def test_factorize_properties(case):
    n, num_factors = case
    modes = factorize(n, num_factors)
    assert len(modes) == num_factors
    assert math.prod(modes) == n
    assert min(modes) >= 2
    # center-heavy: the end modes are never the unique largest, and the sequence rises to
    # its maximum and falls after it (unimodal)
    assert modes[0] <= max(modes) and modes[-1] <= max(modes)
    peak = modes.index(max(modes))
    assert all(a <= b for a, b in zip(modes[:peak], modes[1 : peak + 1]))
    assert all(a >= b for a, b in zip(modes[peak:], modes[peak + 1 :]))
    if not (num_factors == 5 and n in PAPER_TABLE_2):
        # the most balanced factorization: smallest sum of squares among all candidates
        best = min(sum(m * m for m in c) for c in _multisets(n, num_factors))
        assert sum(m * m for m in modes) == best


@pytest.mark.parametrize("n", [2, 3, 97])
def test_factorize_one_factor_is_identity(n):
    assert factorize(n, 1) == (n,)


@pytest.mark.parametrize(
    ("n", "num_factors"),
    [
        (7, 2),  # prime n with N > 1
        (97, 3),
        (8191, 5),
        (12, 4),  # n < 2**N
        (31, 5),
        (1, 2),
    ],
)
def test_factorize_impossible_raises_shape_error(n, num_factors):
    with pytest.raises(ShapeError) as info:
        factorize(n, num_factors)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, tn.TensornetError)
    msg = str(info.value)
    assert f"n={n}" in msg
    assert f"num_factors={num_factors}" in msg


@pytest.mark.parametrize(
    ("n", "num_factors", "name", "value"),
    [
        (True, 2, "n", "True"),
        (16, True, "num_factors", "True"),
        (16.0, 2, "n", "16.0"),
        (16, 2.0, "num_factors", "2.0"),
        (-16, 2, "n", "-16"),
        (0, 2, "n", "0"),
        (16, -2, "num_factors", "-2"),
        (16, 0, "num_factors", "0"),
        ("16", 2, "n", "'16'"),
    ],
)
def test_factorize_rejects_bad_arguments(n, num_factors, name, value):
    with pytest.raises((TypeError, ValueError)) as info:
        factorize(n, num_factors)
    msg = str(info.value)
    assert f"`{name}`" in msg
    assert value in msg


def test_factorize_accepts_numpy_integers():
    assert factorize(np.int64(4096), np.int32(5)) == (4, 4, 8, 8, 4)


# ------------------------------------------------------------- matrix <-> tensor reshapes


MODE_PAIRS = [((2, 3), (4, 5)), ((3,), (7,)), ((2, 1, 3), (1, 4, 2)), ((2, 2, 3, 2), (3, 2, 1, 2))]


@pytest.mark.parametrize(("out_modes", "in_modes"), MODE_PAIRS)
def test_matrix_to_tensor_interleaves_modes(out_modes, in_modes):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((math.prod(out_modes), math.prod(in_modes)))
    T = matrix_to_tensor(W, out_modes, in_modes)
    assert T.shape == tuple(d for pair in zip(out_modes, in_modes) for d in pair)
    # entry by entry: T[i1, j1, ..., iN, jN] == W[row(i), col(j)], row-major multi-indices
    for idx in np.ndindex(*T.shape):
        row = np.ravel_multi_index(idx[0::2], out_modes)
        col = np.ravel_multi_index(idx[1::2], in_modes)
        assert T[idx] == W[row, col]


@pytest.mark.parametrize(("out_modes", "in_modes"), MODE_PAIRS)
def test_matrix_tensor_round_trip_numpy(out_modes, in_modes):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((math.prod(out_modes), math.prod(in_modes)))
    back = tensor_to_matrix(matrix_to_tensor(W, out_modes, in_modes))
    assert isinstance(back, np.ndarray)
    assert back.dtype == W.dtype
    np.testing.assert_array_equal(back, W)


@pytest.mark.parametrize(("out_modes", "in_modes"), MODE_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matrix_tensor_round_trip_torch(out_modes, in_modes, dtype):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(math.prod(out_modes), math.prod(in_modes), generator=gen).to(dtype)
    T = matrix_to_tensor(W, out_modes, in_modes)
    assert isinstance(T, torch.Tensor)
    np.testing.assert_array_equal(
        T.double().numpy(), matrix_to_tensor(W.double().numpy(), out_modes, in_modes)
    )
    back = tensor_to_matrix(T)
    assert isinstance(back, torch.Tensor)
    assert back.dtype == dtype
    assert torch.equal(back, W)


def test_matrix_to_tensor_shape_mismatch_names_modes_and_shape():
    with pytest.raises(ShapeError) as info:
        matrix_to_tensor(np.zeros((6, 21)), (2, 3), (4, 5))
    msg = str(info.value)
    assert "[2, 3]" in msg and "[4, 5]" in msg and "(6, 21)" in msg


def test_matrix_to_tensor_mode_lists_of_different_length():
    with pytest.raises(ShapeError) as info:
        matrix_to_tensor(np.zeros((6, 20)), (2, 3), (20,))
    assert "`out_modes`" in str(info.value) and "`in_modes`" in str(info.value)


def test_tensor_to_matrix_rejects_odd_order():
    with pytest.raises(ShapeError) as info:
        tensor_to_matrix(np.zeros((2, 3, 4)))
    assert "(2, 3, 4)" in str(info.value)


# ------------------------------------------------------------------------ cores_to_matrix


def _einsum_reference(cores):
    """Dense (I, J) matrix of MPO cores (R_{k-1}, I_k, J_k, R_k) from one np.einsum call."""
    n = len(cores)
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(n + 1)]
    rows = [next(letters) for _ in range(n)]
    cols = [next(letters) for _ in range(n)]
    terms = [bonds[k] + rows[k] + cols[k] + bonds[k + 1] for k in range(n)]
    # the boundary bonds have size 1; summing over them is a no-op
    eq = ",".join(terms) + "->" + "".join(rows) + "".join(cols)
    t = np.einsum(eq, *cores)
    out_rows = math.prod(c.shape[1] for c in cores)
    return t.reshape(out_rows, -1)


@FAST
@given(mpo_shapes(), st.integers(0, 2**32 - 1))
def test_cores_to_matrix_matches_einsum(shapes, seed):
    out_modes, in_modes, ranks = shapes
    cores = random_cores(np.random.default_rng(seed), out_modes, in_modes, ranks)
    W = cores_to_matrix(cores)
    assert W.shape == (math.prod(out_modes), math.prod(in_modes))
    np.testing.assert_allclose(W, _einsum_reference(cores), rtol=1e-12, atol=1e-12)


def test_cores_to_matrix_torch_matches_einsum_and_keeps_grad():
    rng = np.random.default_rng(3)
    cores_np = random_cores(rng, (2, 3, 2), (3, 1, 2), (1, 2, 3, 1))
    cores = [torch.tensor(c, requires_grad=True) for c in cores_np]
    W = cores_to_matrix(cores)
    assert isinstance(W, torch.Tensor) and W.dtype == torch.float64
    np.testing.assert_allclose(W.detach().numpy(), _einsum_reference(cores_np), rtol=1e-12)
    W.sum().backward()
    assert all(c.grad is not None and c.grad.shape == c.shape for c in cores)


@pytest.mark.parametrize(
    ("cores", "fragment"),
    [
        ([], "at least one core"),
        ([np.ones((1, 2, 2))], "`cores[0]`"),
        ([np.ones((2, 2, 2, 1))], "expected leading rank 1, got shape (2, 2, 2, 1)"),
        ([np.ones((1, 2, 2, 3)), np.ones((2, 2, 2, 1))], "bond mismatch"),
        ([np.ones((1, 2, 2, 3)), np.ones((3, 2, 2, 2))], "must end with rank 1; got 2"),
    ],
)
def test_cores_to_matrix_rejects_bad_chains(cores, fragment):
    with pytest.raises(ShapeError) as info:
        cores_to_matrix(cores)
    assert fragment in str(info.value)


def test_factorize_type_errors_are_tensornet_errors():
    # errors.py: "Every error derives from TensornetError and from the builtin a caller
    # would catch anyway"; a bool or float count is a TypeError a caller may catch as such
    for args in ((True, 2), (16.0, 2), (16, 2.5)):
        with pytest.raises(TypeError) as info:
            factorize(*args)
        assert isinstance(info.value, tn.TensornetError), (args, type(info.value))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_cores_to_matrix_with_base_matches_einsum_plus_base(kind):
    rng = np.random.default_rng(0)
    cores = [rng.standard_normal(s) for s in ((1, 2, 3, 4), (4, 5, 2, 3), (3, 2, 2, 1))]
    base = rng.standard_normal((20, 12))
    want = _einsum_reference(cores) + base
    if kind == "torch":
        cores, base = [torch.from_numpy(c) for c in cores], torch.from_numpy(base)
    got = cores_to_matrix(cores, base=base)
    assert type(got) is type(base)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13, atol=1e-13)
    with pytest.raises(ShapeError, match="`base` must have the matrix's shape"):
        cores_to_matrix(cores, base=base[:4])


def test_dota_dense_build_into_scratch_buffers_equals_cores_to_matrix():
    # DoTA's layer writes base + MPO into reused buffers (its own helper, not the core's)
    from tensornet._chain import mpo_halves
    from tensornet.adapters.dota.kernels import _SCRATCH, CPUKernels

    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(s, generator=gen, dtype=torch.float64)
             for s in ((1, 2, 3, 4), (4, 5, 2, 3), (3, 2, 2, 1))]
    base = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    got = CPUKernels.build(*mpo_halves(cores), base)
    want = cores_to_matrix(cores, base=base)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    buf = _SCRATCH.buffers[("weight", torch.float64)]
    assert got.data_ptr() == buf.data_ptr()


def test_factorize_refuses_a_dimension_beyond_any_tensor_at_once():
    # trial division of 2**61 - 1 (a prime) ran for minutes; it is refused up front
    with pytest.raises(ShapeError, match=r"`n`.*2\*\*40"):
        factorize(2**61 - 1, 2)
    assert factorize(2**40, 2) == (2**20, 2**20)
