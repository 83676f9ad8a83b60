"""Every bad input to the core is a TensornetError that is also a ValueError or TypeError.

Each case names the argument, what was expected and what was received (STYLE.md, "Errors
a user can act on"); none is a foreign error (numpy's, torch's, an AttributeError) or a
silent result. The first block holds the cases the issue listed, the rest those found by
going through every public function of the core.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tensornet
import tensornet.errors as errors
from tensornet import (
    MPO,
    ConfigError,
    DTypeError,
    MachineProfile,
    NonFiniteError,
    RankError,
    ShapeError,
    TensornetError,
    TensorTrain,
    ToleranceError,
    calibrate,
    compression_ratio,
    cores_to_matrix,
    factorize,
    matrix_to_tensor,
    mpo_decompose,
    mpo_matmul,
    mpo_modes,
    mpo_num_params,
    mpo_ranks,
    plan_mpo_matmul,
    profile_for,
    rank_for_budget,
    tensor_to_matrix,
    tt_decompose,
    tt_num_params,
    tt_ranks,
)

ROOT = Path(__file__).resolve().parents[1]

W = np.random.default_rng(0).standard_normal((12, 8))
S = ((3, 4), (2, 4))
CORES = list(mpo_decompose(W, S, 2).cores)  # (1, 3, 2, 2), (2, 4, 4, 1)
X = np.ones((3, 8))

# (id, call, error class, builtin, fragments of the message)
CASES = [
    # -- the cases ------------------------------------------------------------
    ("meta-W", lambda: mpo_decompose(torch.empty(12, 8, device="meta"), S),
     DTypeError, TypeError, ["`W`", "meta device", "(12, 8)"]),
    ("ragged-W", lambda: mpo_decompose([[1.0, 2.0], [3.0]], 1),
     ShapeError, ValueError, ["`W`", "rectangular", "list"]),
    ("compression_ratio-str", lambda: compression_ratio("ab", (2, 2)),
     ShapeError, ValueError, ["`out_modes`", "positive ints", "'ab'"]),
    ("mpo_matmul-None", lambda: mpo_matmul(None, CORES),
     DTypeError, TypeError, ["`x`", "numpy array or a torch tensor", "NoneType"]),
    ("mpo_matmul-f32-x-f64-cores", lambda: mpo_matmul(X.astype(np.float32), CORES),
     DTypeError, TypeError, ["`cores[0]`", "dtype of `x`", "float32", "float64"]),
    ("rank-full-form-boundary", lambda: mpo_decompose(W, S, [2, 2, 1]),
     RankError, ValueError, ["`rank`", "3 positive ints starting and ending with 1", "[2, 2, 1]"]),
    ("tol-bad", lambda: mpo_decompose(W, S, tol=1.5),
     ToleranceError, ValueError, ["`tol`", "(0, 1)", "1.5"]),
    ("W-odd-order", lambda: mpo_decompose(np.ones((2, 3, 4)), 1),
     ShapeError, ValueError, ["`W`", "order-2N tensor", "(2, 3, 4)"]),
    # -- mpo_decompose / tt_decompose -------------------------------------------------
    ("W-sparse", lambda: mpo_decompose(torch.eye(4).to_sparse(), ((2, 2), (2, 2))),
     DTypeError, TypeError, ["`W`", "strided", "sparse"]),
    ("W-object", lambda: mpo_decompose(np.array([[1.0, None]]), 1),
     DTypeError, TypeError, ["`W`", "floating dtype", "object"]),
    ("W-matrix-without-shape", lambda: mpo_decompose(W),
     ShapeError, ValueError, ["`shape`", "(out_modes, in_modes)", "None"]),
    ("W-tensor-shape-disagrees", lambda: mpo_decompose(np.ones((2, 2, 3, 3)), ((2, 2), (9,))),
     ShapeError, ValueError, ["`shape`", "((2, 2), (3, 3))", "((2, 2), (9,))"]),
    ("W-tensor-wrong-N", lambda: mpo_decompose(np.ones((2, 2, 3, 3)), 3),
     ShapeError, ValueError, ["`shape`", "None, 2", "got 3"]),
    ("full_spectrum-str", lambda: mpo_decompose(W, S, full_spectrum="yes"),
     DTypeError, TypeError, ["`full_spectrum`", "True or False", "'yes'"]),
    ("tol-str", lambda: mpo_decompose(W, S, tol="0.1"),
     ToleranceError, ValueError, ["`tol`", "'0.1'"]),
    ("rank-float", lambda: mpo_decompose(W, S, 2.0),
     RankError, ValueError, ["`rank`", "positive int", "2.0"]),
    ("rank-str-list", lambda: mpo_decompose(W, S, ["a"]),
     RankError, ValueError, ["`rank`", "['a']"]),
    ("x-0d", lambda: tt_decompose(np.float64(3.0)),
     ShapeError, ValueError, ["`x`", "at least one axis", "0-d"]),
    ("x-None", lambda: tt_decompose(None),
     DTypeError, TypeError, ["`x`", "NoneType"]),
    ("x-str", lambda: tt_decompose("abc"),
     DTypeError, TypeError, ["`x`", "str"]),
    ("x-meta", lambda: tt_decompose(torch.empty(3, 4, device="meta")),
     DTypeError, TypeError, ["`x`", "meta device"]),
    ("tt-rank-wrong-length", lambda: tt_decompose(np.ones((3, 4, 5)), [1, 2, 1]),
     RankError, ValueError, ["`rank`", "2 positive ints", "4 positive ints", "[1, 2, 1]"]),
    # -- counting ---------------------------------------------------------------------
    ("mpo_ranks-modes-None", lambda: mpo_ranks(None, (2,)),
     ShapeError, ValueError, ["`out_modes`", "None"]),
    ("mpo_ranks-modes-int", lambda: mpo_ranks(4, 4),
     ShapeError, ValueError, ["`out_modes`", "got 4"]),
    ("mpo_ranks-rank-bool", lambda: mpo_ranks((2, 2), (2, 2), True),
     RankError, ValueError, ["`rank`", "True"]),
    ("mpo_num_params-None", lambda: mpo_num_params(None, None),
     ShapeError, ValueError, ["`out_modes`", "None"]),
    ("tt_ranks-str", lambda: tt_ranks("abc"),
     ShapeError, ValueError, ["`shape`", "'abc'"]),
    ("tt_num_params-None", lambda: tt_num_params(None),
     ShapeError, ValueError, ["`shape`", "None"]),
    ("rank_for_budget-str", lambda: rank_for_budget("ab", (2, 2), 10),
     ShapeError, ValueError, ["`out_modes`", "'ab'"]),
    ("rank_for_budget-float", lambda: rank_for_budget((2, 2), (2, 2), 10.0),
     DTypeError, TypeError, ["`budget`", "int", "10.0"]),
    ("compression_ratio-lengths", lambda: compression_ratio((2, 2), (2,)),
     ShapeError, ValueError, ["`out_modes`", "`in_modes`", "[2, 2]", "[2]"]),
    # -- tensorization ----------------------------------------------------------------
    ("factorize-None", lambda: factorize(None, 2),
     DTypeError, TypeError, ["`n`", "None"]),
    ("mpo_modes-str", lambda: mpo_modes("a", 4, 2),
     DTypeError, TypeError, ["`out_features`", "'a'"]),
    ("matrix_to_tensor-None", lambda: matrix_to_tensor(None, (2,), (2,)),
     DTypeError, TypeError, ["`matrix`", "NoneType"]),
    ("matrix_to_tensor-shape", lambda: matrix_to_tensor(np.ones((4, 5)), (2, 2), (2, 2)),
     ShapeError, ValueError, ["`matrix`", "(4, 4)", "(4, 5)"]),
    ("tensor_to_matrix-None", lambda: tensor_to_matrix(None),
     DTypeError, TypeError, ["`tensor`", "NoneType"]),
    ("tensor_to_matrix-0d", lambda: tensor_to_matrix(np.float64(2.0)),
     ShapeError, ValueError, ["`tensor`", "order-2N", "()"]),
    ("cores_to_matrix-None", lambda: cores_to_matrix(None),
     DTypeError, TypeError, ["`cores`", "NoneType"]),
    ("cores_to_matrix-mixed", lambda: cores_to_matrix([CORES[0], torch.from_numpy(CORES[1])]),
     DTypeError, TypeError, ["`cores[1]`", "numpy", "torch"]),
    ("cores_to_matrix-ints", lambda: cores_to_matrix([1, 2]),
     DTypeError, TypeError, ["`cores[0]`", "int"]),
    ("cores_to_matrix-base-str", lambda: cores_to_matrix(CORES, base="x"),
     DTypeError, TypeError, ["`base`", "str"]),
    ("cores_to_matrix-base-dtype", lambda: cores_to_matrix(CORES, base=np.ones((12, 8), "f4")),
     DTypeError, TypeError, ["`base`", "float64", "float32"]),
    # -- result objects ---------------------------------------------------------------
    ("MPO-None", lambda: MPO(None),
     DTypeError, TypeError, ["`cores`", "an MPO", "NoneType"]),
    ("MPO-lists", lambda: MPO([[[[1.0]]]]),
     DTypeError, TypeError, ["`cores[0]`", "list"]),
    ("MPO-mixed-dtypes", lambda: MPO([CORES[0], CORES[1].astype(np.float32)]),
     DTypeError, TypeError, ["`cores[1]`", "float64", "float32"]),
    ("MPO.from_tensorly-None", lambda: MPO.from_tensorly(None),
     DTypeError, TypeError, ["`tt_matrix`", "NoneType"]),
    ("TensorTrain-None", lambda: TensorTrain(None),
     DTypeError, TypeError, ["`cores`", "a tensor train", "NoneType"]),
    ("TensorTrain.from_tensorly-int", lambda: TensorTrain.from_tensorly(3),
     DTypeError, TypeError, ["`tt_tensor`", "int"]),
    # -- planning and contraction -----------------------------------------------------
    ("mpo_matmul-torch-x-numpy-cores", lambda: mpo_matmul(torch.ones(3, 8), CORES),
     DTypeError, TypeError, ["`cores[0]`", "torch", "numpy"]),
    ("mpo_matmul-int-x", lambda: mpo_matmul(np.ones((3, 8), dtype=int), CORES),
     DTypeError, TypeError, ["`x`", "floating dtype", "int64"]),
    ("mpo_matmul-0d-x", lambda: mpo_matmul(np.float64(1.0), CORES, strategy="contract"),
     ShapeError, ValueError, ["`x`", "in_features=8", "()"]),
    ("mpo_matmul-0d-x-dense", lambda: mpo_matmul(np.float64(1.0), CORES, strategy="dense"),
     ShapeError, ValueError, ["`x`", "in_features=8", "()"]),
    ("mpo_matmul-cores-None", lambda: mpo_matmul(X, None),
     DTypeError, TypeError, ["`cores`", "NoneType"]),
    ("mpo_matmul-mixed-core-dtypes",
     lambda: mpo_matmul(X, [CORES[0], CORES[1].astype(np.float32)]),
     DTypeError, TypeError, ["`cores[1]`", "float64", "float32"]),
    ("mpo_matmul-meta-x",
     lambda: mpo_matmul(torch.empty(3, 8, device="meta"), [torch.from_numpy(c) for c in CORES]),
     DTypeError, TypeError, ["`x`", "meta device"]),
    ("plan-cores-None", lambda: plan_mpo_matmul(None, 4),
     DTypeError, TypeError, ["`cores`", "NoneType"]),
    ("plan-cores-str", lambda: plan_mpo_matmul("abc", 4),
     DTypeError, TypeError, ["`cores`", "str"]),
    ("plan-shape-floats", lambda: plan_mpo_matmul([(1, 2.5, 2, 1)], 4),
     ShapeError, ValueError, ["`cores[0]`", "4 positive ints", "2.5"]),
    ("plan-profile-str", lambda: plan_mpo_matmul(CORES, 4, profile="fast"),
     ConfigError, ValueError, ["`profile`", "MachineProfile", "str"]),
    ("plan-itemsize-bool", lambda: plan_mpo_matmul(CORES, 4, itemsize=True),
     DTypeError, TypeError, ["`itemsize`", "True"]),
    ("plan-batch-float", lambda: plan_mpo_matmul(CORES, 4.0),
     DTypeError, TypeError, ["`batch_size`", "4.0"]),
    ("profile-negative", lambda: MachineProfile(-1.0, 1.0, 0.0),
     ConfigError, ValueError, ["`flops_per_s`", "> 0", "-1.0"]),
    ("profile-str", lambda: MachineProfile(1.0, "a", 0.0),
     ConfigError, ValueError, ["`bytes_per_s`", "'a'"]),
    ("profile-copy-table", lambda: MachineProfile(1.0, 1.0, 0.0, copy_efficiency=((64, 2.0),)),
     ConfigError, ValueError, ["`copy_efficiency`", "(0, 1]", "2.0"]),
    ("profile_for-kind", lambda: profile_for("tpu"),
     ConfigError, ValueError, ["`kind`", "'cpu', 'cuda'", "'tpu'"]),
    ("profile_for-list", lambda: profile_for(["cpu"]),
     ConfigError, ValueError, ["`kind`", "['cpu']"]),
    ("calibrate-None", lambda: calibrate(None),
     DTypeError, TypeError, ["`like`", "NoneType"]),
    ("calibrate-int", lambda: calibrate(np.ones(2, dtype=int)),
     DTypeError, TypeError, ["`like`", "floating dtype", "int64"]),
    ("plan-call-wrong-cores", lambda: plan_mpo_matmul(CORES, 3)(X, [c[:, :1] for c in CORES]),
     ShapeError, ValueError, ["`cores`", "(1, 3, 2, 2)", "(1, 1, 2, 2)"]),
    ("plan-call-strategy", lambda: plan_mpo_matmul(CORES, 3)(X, CORES, strategy="auto"),
     ConfigError, ValueError, ["`strategy`", "'dense'", "'auto'"]),
    ("plan-call-x-None", lambda: plan_mpo_matmul(CORES, 3)(None, CORES),
     DTypeError, TypeError, ["`x`", "NoneType"]),
    ("plan-call-x-dtype", lambda: plan_mpo_matmul(CORES, 3)(X.astype(np.float32), CORES),
     DTypeError, TypeError, ["`cores[0]`", "float32", "float64"]),
]


@pytest.mark.parametrize(("call", "exc", "builtin", "fragments"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_tensornet_error_naming_argument_and_value(call, exc, builtin, fragments):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc, type(info.value)
    assert isinstance(info.value, TensornetError) and isinstance(info.value, builtin)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_the_table_covers_the_core():
    # at least the 31 cases of the issue, and every public callable of the core appears
    assert len(CASES) >= 31
    source = Path(__file__).read_text()
    table = source[source.index("CASES = ["):source.index("\n]\n", source.index("CASES = ["))]
    callables = [n for n in tensornet.__all__ if callable(getattr(tensornet, n))
                 and not isinstance(getattr(tensornet, n), type(TensornetError))
                 or n in ("MPO", "TensorTrain", "MachineProfile")]
    for name in callables:
        if name == "ContractionPlan":  # built by plan_mpo_matmul; its call is covered
            assert "plan_mpo_matmul(CORES, 3)(" in table
            continue
        assert f"{name}(" in table, name


# ------------------------------------------------------------------- error classes


def test_error_hierarchy():
    for cls, builtin in [
        (errors.ShapeError, ValueError),
        (errors.ConfigError, ValueError),
        (errors.RankError, ValueError),
        (errors.ToleranceError, ValueError),
        (errors.DTypeError, TypeError),
        (errors.NonFiniteError, ValueError),
        (errors.AdapterMismatchError, ValueError),
        (errors.AdapterFileError, ValueError),
        (errors.PeftVersionError, ImportError),
        (errors.DataError, ValueError),
        (errors.UsageError, ValueError),
    ]:
        assert issubclass(cls, errors.TensornetError) and issubclass(cls, builtin), cls
        assert cls.__doc__, cls
    # one error for a rank, another for a tolerance; both are invalid options
    assert issubclass(errors.RankError, errors.ConfigError)
    assert issubclass(errors.ToleranceError, errors.ConfigError)
    assert not issubclass(errors.ToleranceError, errors.RankError)
    assert set(errors.__all__) == {
        n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)
    }


def _exception_classes_defined_in(module_name):
    tree = ast.parse(Path(importlib.import_module(module_name).__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = {ast.unparse(b) for b in node.bases}
            if any(b.endswith(("Error", "Exception")) for b in bases):
                yield node.name


def test_every_public_exception_class_of_core_and_adapters_is_in_errors_py():
    import tensornet.adapters

    modules = [f"tensornet.{m.name}" for m in pkgutil.iter_modules(tensornet.__path__)
               if not m.ispkg and m.name not in ("errors", "cli", "__main__")]
    modules += [m.name for m in pkgutil.walk_packages(tensornet.adapters.__path__,
                                                      "tensornet.adapters.")]
    found = {m: list(_exception_classes_defined_in(m)) for m in modules}
    assert not any(found.values()), {m: c for m, c in found.items() if c}


# ------------------------------------------------------------- no silent nonsense


def _dense64(mpo):
    """The matrix of an MPO's cores, contracted in float64."""
    return MPO([
        c.double().numpy() if isinstance(c, torch.Tensor) else c.astype(np.float64)
        for c in mpo.cores
    ]).to_dense()


def test_float16_matrix_near_its_range_gives_finite_cores():
    # the issue's case: entries of 6e4 (float16's max is 65504); TT-SVD puts ||W|| ~ 1e6
    # into the last core, which float16 cannot hold: the norm is spread over the cores
    W16 = np.full((16, 16), 6e4, dtype=np.float16)
    W16[::3, ::2] = -6e4
    with np.errstate(over="raise", invalid="raise"):  # no overflow, not even a warning
        mpo = mpo_decompose(W16, ((4, 4), (4, 4)))
    assert all(c.dtype == np.float16 and np.isfinite(c).all() for c in mpo.cores)
    dense = _dense64(mpo)  # the cores' own error, not float16's rounding of the product
    w = W16.astype(np.float64)
    err = np.linalg.norm(dense - w) / np.linalg.norm(w)
    assert err < 5e-3
    assert mpo.relative_error == pytest.approx(err, rel=1e-6)
    assert mpo.relative_error <= mpo.error_bound
    t = mpo_decompose(torch.from_numpy(W16), ((4, 4), (4, 4)))
    assert all(c.dtype == torch.float16 and bool(c.isfinite().all()) for c in t.cores)


def test_float32_matrix_whose_norm_overflows_float32_gives_finite_cores():
    W32 = (np.random.default_rng(0).standard_normal((16, 16)) * 1e38).astype(np.float32)
    assert np.isfinite(W32).all() and not np.isfinite(np.float32(np.linalg.norm(W32)))
    mpo = mpo_decompose(W32, ((4, 4), (4, 4)), 4)
    assert all(c.dtype == np.float32 and np.isfinite(c).all() for c in mpo.cores)
    w = W32.astype(np.float64)
    err = np.linalg.norm(_dense64(mpo) - w) / np.linalg.norm(w)
    assert mpo.relative_error == pytest.approx(err, rel=1e-3)
    # the spectrum is that of W, not of the rescaled copy the sweep worked on
    ref = np.linalg.svd(tensornet.matrix_to_tensor(w, (4, 4), (4, 4)).reshape(16, 16),
                        compute_uv=False)
    np.testing.assert_allclose(mpo.singular_values[0], ref, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, "bfloat16"])
@pytest.mark.parametrize("rank", [None, 1, 3])
@pytest.mark.parametrize("seed", range(6))
def test_error_bound_is_never_below_the_measured_error(dtype, rank, seed):
    rng = np.random.default_rng(seed)
    n = 2 + seed % 3
    out_modes = tuple(int(v) for v in rng.integers(1, 5, n))
    in_modes = tuple(int(v) for v in rng.integers(1, 5, n))
    W64 = rng.standard_normal((math.prod(out_modes), math.prod(in_modes)))
    if dtype == "bfloat16":
        W = torch.from_numpy(W64).to(torch.bfloat16)
        w = W.double().numpy()
    else:
        W = W64.astype(dtype)
        w = W.astype(np.float64)
    mpo = mpo_decompose(W, (out_modes, in_modes), rank)
    dense = _dense64(mpo)
    measured = np.linalg.norm(dense - w) / np.linalg.norm(w)
    assert mpo.relative_error <= mpo.error_bound
    # the stated error is the returned cores' (to float32 rounding of the identity)
    assert mpo.relative_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
    assert measured <= mpo.error_bound * (1 + 1e-3) + 1e-6


def test_non_finite_input_is_still_refused_after_the_cast_changes():
    W16 = np.ones((4, 4), dtype=np.float16)
    W16[1, 1] = np.inf
    with pytest.raises(NonFiniteError, match="`W`"):
        mpo_decompose(W16, ((2, 2), (2, 2)))


def test_validation_does_not_call_into_foreign_libraries_for_signature_errors():
    # keyword-only options: a positional `tol` is a TypeError from Python itself
    with pytest.raises(TypeError):
        mpo_decompose(W, S, 2, 0.5)  # type: ignore[misc]
    assert list(inspect.signature(mpo_decompose).parameters)[:3] == ["W", "shape", "rank"]


@pytest.mark.parametrize("cls, shapes", [
    (MPO, [(1, 2, 3, 2), (2, 2, 2, 1)]),
    (TensorTrain, [(1, 3, 2), (2, 4, 1)]),
])
@pytest.mark.parametrize("field, value", [("relative_error", "x"), ("error_bound", -1.0),
                                          ("relative_error", float("nan")),
                                          ("error_bound", True)])
def test_result_error_fields_are_checked(cls, shapes, field, value):
    # they were accepted, and repr / compression_ratio raised foreign errors later
    cores = [np.ones(s) for s in shapes]
    with pytest.raises(ConfigError, match=f"`{field}` must be"):
        cls(cores, **{field: value})
    assert cls(cores, **{field: 0.5}).relative_error in (0.5, None)


@pytest.mark.parametrize("cls, shapes", [
    (MPO, [(1, 2, 0, 2), (2, 2, 2, 1)]),
    (TensorTrain, [(1, 0, 2), (2, 4, 1)]),
])
def test_zero_size_modes_are_refused(cls, shapes):
    with pytest.raises(ShapeError, match="cores\\[0\\].*size 0"):
        cls([np.ones(s) for s in shapes])


# ------------------------------------------------------- numpy's array subclasses (issue 20)


def test_np_matrix_is_read_as_the_2d_array_it_holds():
    W = np.random.default_rng(0).standard_normal((8, 6))
    want = mpo_decompose(W, ((2, 4), (2, 3)), 2)
    got = mpo_decompose(np.asmatrix(W), ((2, 4), (2, 3)), 2)
    assert all(type(c) is np.ndarray for c in got.cores)
    for a, b in zip(got.cores, want.cores, strict=True):
        np.testing.assert_array_equal(a, b)
    tt = tt_decompose(np.asmatrix(W), 3)
    assert type(tt.cores[0]) is np.ndarray and tt.shape == (8, 6)


@pytest.mark.parametrize("call", [
    lambda x: mpo_decompose(x, ((2, 2), (2, 2)), 2),
    lambda x: tt_decompose(x, 2),
    lambda x: matrix_to_tensor(x, (2, 2), (2, 2)),
], ids=["mpo_decompose", "tt_decompose", "matrix_to_tensor"])
def test_masked_arrays_are_refused_not_decomposed_with_the_mask_ignored(call):
    x = np.ma.masked_array(np.ones((4, 4)), mask=np.eye(4, dtype=bool))
    with pytest.raises(DTypeError, match=r"masked array.*filled"):
        call(x)
