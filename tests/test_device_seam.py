"""The device seam (``tensornet._device``): the CUDA path of the core runs on CPU tensors.

An H200 run found ``mpo_decompose`` crashing on every CUDA weight: the accelerator
eigensolver returned a non-contiguous view that ``torch.kron`` could not reshape, in a
branch no test ever took. Here both paths run on CPU tensors and must agree with each
other and with a dense reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensornet
from tensornet._backend import NumpyOps, TorchOps
from tensornet._device import DEVICE_KINDS, device_kind, device_path
from tensornet.errors import ConfigError


def test_device_kind_follows_the_tensor_and_the_override():
    assert device_kind(torch.zeros(1)) == "cpu"
    assert device_kind(torch.zeros(1, device="meta")) == "cuda"  # any non-CPU device
    with device_path("cuda"):
        assert device_kind(torch.zeros(1)) == "cuda"
        with device_path("cpu"):
            assert device_kind(torch.zeros(1)) == "cpu"
        assert device_kind(torch.zeros(1)) == "cuda"
    assert device_kind(torch.zeros(1)) == "cpu"
    with pytest.raises(ConfigError, match="kind"):
        with device_path("tpu"):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_eigh_top_returns_contiguous_leading_pairs(kind):
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((40, 40)))
    g = a @ a.T
    with device_path(kind):
        lam, vec = TorchOps.eigh_top(g.clone(), 5)
    ref = np.linalg.eigvalsh(g.numpy())[::-1]
    np.testing.assert_allclose(lam.numpy()[:5], ref[:5], rtol=1e-10)
    assert vec.shape == (40, 5) and vec.is_contiguous()
    np.testing.assert_allclose((g @ vec).numpy(), (vec * lam[:5]).numpy(), atol=1e-8)


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 30), (256, 300), (333, 50), (1024, 40)])
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_equals_the_product(kind, dtype, shape, transposed):
    # x x^T of the sweeps (the CPU path computes it a block row at a time, the
    # accelerator path in one product): the same matrix, symmetric to rounding
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal(shape[::-1] if transposed else shape)).to(dtype)
    x = x.T if transposed else x
    with device_path(kind):
        g = TorchOps.gram(x)
    assert g.shape == (shape[0], shape[0]) and g.dtype == dtype and g.is_contiguous()
    ref = x.double() @ x.double().T
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((g - g.T).abs().max()) <= tol * float(ref.abs().max())
    assert float((g.double() - ref).abs().max()) <= tol * float(ref.abs().max())
    gn = NumpyOps.gram(x.numpy())
    np.testing.assert_allclose(gn, ref.numpy(), rtol=0, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mpo_decompose_on_both_paths(kind, dtype):
    # the shapes that crashed on CUDA: a LLaMA-like factorization at N = 5, R = 16
    # (fused first Gram, then kron-lifted sweeps)
    W = torch.from_numpy(np.random.default_rng(1).standard_normal((256, 512))).to(dtype)
    with device_path(kind):
        mpo = tensornet.mpo_decompose(W, 5, rank=16)
    ref = tensornet.mpo_decompose(W.double().numpy(), 5, rank=16)
    assert mpo.ranks == ref.ranks
    assert mpo.relative_error == pytest.approx(ref.relative_error, rel=1e-4)
    err = torch.linalg.norm(mpo.to_dense().double() - W.double()) / torch.linalg.norm(W.double())
    assert float(err) == pytest.approx(mpo.relative_error, rel=1e-4)
