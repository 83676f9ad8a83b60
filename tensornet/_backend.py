"""Minimal array namespace over numpy and torch (private).

The core never imports torch unless it is handed a torch tensor; numpy arrays are
computed with numpy. Both compute in float32 for inputs of 32 bits or fewer and in
float64 otherwise (see :func:`tensornet.mpo_decompose` for when float32 inputs are
redone in float64), and cast back to the input dtype.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any

import numpy as np

from ._device import device_kind
from .errors import DTypeError, NonFiniteError, ShapeError


def is_torch(x: Any) -> bool:
    """Return True if ``x`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


# Symmetric eigenproblems at least this large, asked for few eigenpairs, use LAPACK's
# subset solver (dsyevr) on CPU: only the leading eigenvectors are formed.
_SUBSET_MIN_SIZE = 128

# Gram matrices with at least this many rows are computed in this many block rows on
# the CPU path (:meth:`TorchOps.gram`).
_GRAM_BLOCK_MIN_ROWS = 128
_GRAM_BLOCKS = 4


def _eigh_top_lapack(g: np.ndarray, k: int, full: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and the leading ``k`` eigenvectors of a symmetric matrix.

    The eigenvalues are all of them for a small ``g``, for ``2 k >= m``, or with ``full``;
    otherwise only the leading ``k`` (LAPACK's subset solver forms no more).
    """
    m = g.shape[0]
    if not full and m >= _SUBSET_MIN_SIZE and 2 * k < m:
        import scipy.linalg

        lam, vec = scipy.linalg.eigh(
            g, subset_by_index=[m - k, m - 1], driver="evr", overwrite_a=True, check_finite=False
        )
    else:
        lam, vec = np.linalg.eigh(g)
    return lam[::-1].copy(), vec[:, ::-1][:, :k].copy()


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _eigh_top_beside_torch(g: np.ndarray, k: int, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_eigh_top_lapack` with numpy's BLAS on one thread.

    Right after a torch CPU kernel, torch's OpenMP workers are still spinning; a
    multi-threaded OpenBLAS call then fights them for the cores and runs several times
    slower. One BLAS thread leaves them a core.
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        return _eigh_top_lapack(g, k, full)


class NumpyOps:
    """Numpy kernels."""

    name = "numpy"

    @staticmethod
    def compute_dtype(x: Any) -> Any:
        return np.float64 if x.dtype.itemsize > 4 else np.float32

    @staticmethod
    def contiguous(x: Any, dtype: Any) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=dtype)

    @staticmethod
    def is_contiguous(x: Any, dtype: Any) -> bool:
        """Whether ``x`` is read in place as a C-ordered array of ``dtype``."""
        return bool(x.dtype == dtype and x.flags.c_contiguous)

    @staticmethod
    def empty(like: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    @staticmethod
    def to64(x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def gram(x: np.ndarray) -> np.ndarray:
        """``x @ x.T`` (numpy hands this product to BLAS's syrk itself)."""
        return x @ x.T

    @staticmethod
    def eigh_top(g: np.ndarray, k: int, full: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return _eigh_top_lapack(g, k, full)

    @staticmethod
    def kron_eye(u: np.ndarray, n: int) -> np.ndarray:
        return np.kron(u, np.eye(n, dtype=u.dtype))

    @staticmethod
    def trace(g: np.ndarray) -> float:
        return float(np.trace(g.astype(np.float64)))

    @staticmethod
    def all_finite(x: np.ndarray) -> bool:
        return bool(np.isfinite(x).all())

    @staticmethod
    def max_abs(x: np.ndarray) -> float:
        return float(np.abs(x).max())

    @staticmethod
    def svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.linalg.svd(a, full_matrices=False)

    @staticmethod
    def svd_unfolding(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # LAPACK's gesdd reduces a very wide or tall matrix by QR itself first
        return np.linalg.svd(a, full_matrices=False)

    @staticmethod
    def eps(x: np.ndarray) -> float:
        return float(np.finfo(x.dtype).eps)

    @staticmethod
    def numpy(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def sumsq(x: np.ndarray) -> float:
        flat = x.reshape(-1)
        return (
            float(np.dot(flat, flat))
            if flat.dtype == np.float64
            else float(np.einsum("i,i->", flat, flat, dtype=np.float64))
        )

    @staticmethod
    def cast(x: np.ndarray, like: Any) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=like.dtype)


class TorchOps:
    """Torch kernels on the input's device."""

    name = "torch"

    @staticmethod
    def compute_dtype(x: Any) -> Any:
        import torch

        return torch.float64 if x.element_size() > 4 else torch.float32

    @staticmethod
    def contiguous(x: Any, dtype: Any) -> Any:
        import torch

        if x.dtype == dtype and x.is_contiguous():
            # read in place, as numpy's ascontiguousarray does: the sweeps never write
            # their input, and the W-sized copy is a full extra pass over W (bench_decompose)
            return x.detach()
        out = torch.empty(tuple(x.shape), dtype=dtype, device=x.device)
        return out.copy_(x.detach())

    @staticmethod
    def is_contiguous(x: Any, dtype: Any) -> bool:
        """Whether ``x`` is read in place as a C-ordered tensor of ``dtype``."""
        return bool(x.dtype == dtype and x.is_contiguous())

    @staticmethod
    def empty(like: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        import torch

        return torch.empty(shape, dtype=dtype, device=like.device)

    @staticmethod
    def to64(x: Any) -> Any:
        import torch

        return x.detach().to(torch.float64)

    @staticmethod
    def gram(x: Any) -> Any:
        """``x @ x.T``.

        torch has no symmetric rank-k product (BLAS syrk): its ``x @ x.T`` computes both
        triangles. On the CPU path a large Gram is computed a block row at a time, the
        blocks on and right of the diagonal only, the others mirrored from them: 5/8 of
        the work with four block rows (the 256 x 65536 Gram of a 4096 x 4096 matrix's
        first sweeps: 28 -> 22 ms on a 2-core Xeon). The accelerator path makes one
        product (a launch costs more than the flops saved there).
        """
        import torch

        m = x.shape[0]
        if device_kind(x) != "cpu" or m < _GRAM_BLOCK_MIN_ROWS:
            return x @ x.T
        g = torch.empty((m, m), dtype=x.dtype, device=x.device)
        step = -(-m // _GRAM_BLOCKS)
        for i in range(0, m, step):
            block = x[i:i + step] @ x[i:].T
            g[i:i + step, i:] = block
            g[i + step:, i:i + step] = block[:, step:].T
        return g

    @staticmethod
    def eigh_top(g: Any, k: int, full: bool = False) -> tuple[Any, Any]:
        import torch

        if device_kind(g) == "cpu":
            lam, vec = _eigh_top_beside_torch(g.numpy(), k, full)
            return torch.from_numpy(lam), torch.from_numpy(vec)
        # the accelerator path (``torch.linalg.eigh`` on the device). The leading pairs
        # are copied out of the ascending result: a flipped view is not contiguous, and
        # the sweeps reshape what this returns (torch.kron then failed on every CUDA weight)
        lam, vec = torch.linalg.eigh(g)
        return lam.flip(0), vec[:, vec.shape[1] - k:].flip(1).contiguous()

    @staticmethod
    def kron_eye(u: Any, n: int) -> Any:
        import torch

        return torch.kron(u, torch.eye(n, dtype=u.dtype, device=u.device))

    @staticmethod
    def trace(g: Any) -> float:
        return float(g.diagonal().double().sum())

    @staticmethod
    def all_finite(x: Any) -> bool:
        return bool(x.isfinite().all())

    @staticmethod
    def max_abs(x: Any) -> float:
        return float(x.detach().abs().max())

    @staticmethod
    def svd(a: Any) -> tuple[Any, Any, Any]:
        import torch

        return torch.linalg.svd(a, full_matrices=False)

    @staticmethod
    def svd_unfolding(a: Any) -> tuple[Any, Any, Any]:
        """Thin SVD ``(u, s, vt)`` of an unfolding, typically very wide (or tall)."""
        import torch

        if device_kind(a) == "cpu":
            # LAPACK's gesdd reduces a very wide or tall matrix by QR itself first
            return torch.linalg.svd(a, full_matrices=False)
        # the accelerator path: QR of the long side, then an SVD of the small R factor (a
        # device SVD of a 16 x 10^6 unfolding is far slower than this QR)
        m, n = a.shape
        if m >= n:
            q, r = torch.linalg.qr(a)
            u, s, vt = torch.linalg.svd(r)
            return q @ u, s, vt
        q, r = torch.linalg.qr(a.T)
        w, s, ut = torch.linalg.svd(r)
        return ut.T, s, (q @ w).T

    @staticmethod
    def eps(x: Any) -> float:
        import torch

        return float(torch.finfo(x.dtype).eps)

    @staticmethod
    def numpy(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy().astype(np.float64)

    @staticmethod
    def sumsq(x: Any) -> float:
        import torch

        flat = x.reshape(-1)
        if flat.dtype == torch.float64:
            return float(flat @ flat)
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64) ** 2)

    @staticmethod
    def cast(x: Any, like: Any) -> Any:
        return x.to(dtype=like.dtype).contiguous()


def ops_for(x: Any) -> type[NumpyOps] | type[TorchOps]:
    """Kernels matching the array type of ``x``."""
    return TorchOps if is_torch(x) else NumpyOps


def _library(x: Any) -> str:
    return "torch" if is_torch(x) else "numpy"


def as_array(x: Any, name: str) -> Any:
    """``x`` if it is a numpy array or a torch tensor; lists and array-likes via numpy.

    Raises :class:`DTypeError` for anything else and :class:`ShapeError` for a ragged
    nested list, naming the argument. numpy's subclasses: an ``np.matrix`` is read as
    the plain 2-D array it holds (its ``*`` and always-2-D indexing would break the
    reshapes); a masked array is refused, since a decomposition cannot leave entries out
    and reading its data would silently use the masked values.
    """
    if isinstance(x, np.ma.MaskedArray):
        raise DTypeError(
            f"`{name}` is a numpy masked array: the decomposition would use the masked "
            f"entries' values; pass `{name}.filled(value)` (the value the masked entries "
            f"should take) or `{name}.data` explicitly"
        )
    if isinstance(x, np.matrix):
        return np.asarray(x)
    if is_torch(x) or isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)) or (hasattr(x, "__array__") and not isinstance(x, str)):
        try:
            return np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise ShapeError(
                f"`{name}` must be a numpy array, a torch tensor or a rectangular nested list; "
                f"got a {type(x).__name__} numpy cannot read as an array ({exc})"
            ) from None
    raise DTypeError(f"`{name}` must be a numpy array or a torch tensor; got {type(x).__name__}")


def check_has_data(x: Any, name: str) -> None:
    """Refuse a torch tensor without data (meta device) or not strided (sparse)."""
    if is_torch(x):
        if x.device.type == "meta":
            raise DTypeError(
                f"`{name}` must hold data; got a tensor on the meta device (shape "
                f"{tuple(x.shape)}); materialize it first (e.g. load the weights)"
            )
        import torch

        if x.layout != torch.strided:
            raise DTypeError(f"`{name}` must be a dense (strided) tensor; got layout {x.layout}")


def check_float_array(x: Any, name: str, ndim: int | None = None, finite: bool = True) -> Any:
    """Validate a numpy array or torch tensor of real floating dtype (finite if asked).

    Lists and other array-likes are converted with ``np.asarray``. Callers that detect
    non-finite values more cheaply themselves pass ``finite=False``.
    """
    x = as_array(x, name)
    if ndim is not None and x.ndim != ndim:
        raise ShapeError(
            f"`{name}` must be a {ndim}-D array; got a {x.ndim}-D array of shape {tuple(x.shape)}"
        )
    check_has_data(x, name)
    if is_torch(x):
        ok = x.dtype.is_floating_point
    else:
        ok = np.issubdtype(x.dtype, np.floating)
    if not ok:
        raise DTypeError(
            f"`{name}` must have a real floating dtype (float16/bfloat16/float32/float64); "
            f"got dtype {x.dtype}"
        )
    if x.numel() == 0 if is_torch(x) else x.size == 0:
        raise ShapeError(f"`{name}` must not be empty; got shape {tuple(x.shape)}")
    if finite:
        check_finite(x, name)
    return x


def check_same_kind(
    arrays: Any, name: str, like: Any = None, like_name: str = "x", *, indexed: bool = True
) -> None:
    """All of ``arrays`` (``name[k]``) share one array library, dtype and device (``like``'s).

    ``indexed=False`` names a single array ``name`` instead of ``name[0]``.
    """
    ref = like if like is not None else arrays[0]
    ref_name = like_name if like is not None else f"{name}[0]"
    for k, a in enumerate(arrays):
        if a is ref:
            continue
        label = f"{name}[{k}]" if indexed else name
        if _library(a) != _library(ref):
            raise DTypeError(
                f"`{label}` must be a {_library(ref)} array like `{ref_name}`; got a "
                f"{_library(a)} {'tensor' if is_torch(a) else 'array'}"
            )
        if a.dtype != ref.dtype:
            raise DTypeError(
                f"`{label}` must have the dtype of `{ref_name}` ({ref.dtype}); got "
                f"{a.dtype}; cast one of them (e.g. `.to(x.dtype)` / `.astype(x.dtype)`)"
            )
        if is_torch(a) and a.device != ref.device:
            raise DTypeError(
                f"`{label}` must be on the device of `{ref_name}` ({ref.device}); got "
                f"{a.device}"
            )


def check_finite(x: Any, name: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or Inf."""
    ok = bool(x.isfinite().all()) if is_torch(x) else bool(np.isfinite(x).all())
    if not ok:
        raise NonFiniteError(f"`{name}` must hold only finite values; got NaN or Inf entries")


def check_float(x: Any, name: str) -> Any:
    """A numpy array or torch tensor with data and a real floating dtype."""
    x = as_array(x, name)
    check_has_data(x, name)
    ok = x.dtype.is_floating_point if is_torch(x) else np.issubdtype(x.dtype, np.floating)
    if not ok:
        raise DTypeError(
            f"`{name}` must have a real floating dtype (float16/bfloat16/float32/float64); "
            f"got dtype {x.dtype}"
        )
    return x


def no_autocast(x: Any) -> Any:
    """A context that turns torch autocast off for ``x``'s device (no-op for numpy).

    The pairwise contractions run in the dtype of their operands: autocast would turn
    some intermediates into bf16 while the cores stay in float32.
    """
    if is_torch(x):
        import torch

        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()
