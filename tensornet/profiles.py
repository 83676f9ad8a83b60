"""Machine profiles: the constants of the planners' time model, fixed or measured.

A :class:`MachineProfile` holds the constants of the three-term time model the planners
cost with (FLOPs at GEMM throughput, bytes at memory bandwidth, a fixed cost per kernel
launch, plus the efficiency of reorganizing copies). :func:`profile_for` gives the fixed
constants of a device kind (what ``strategy="auto"`` plans with, in
:func:`tensornet.mpo_matmul` and in DoTA's layers, so that every process decides alike);
:func:`calibrate` measures the machine at hand (``strategy="calibrated"``).
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import opt_einsum as oe

from ._backend import check_float, is_torch, no_autocast
from ._device import DEVICE_KINDS
from .errors import ConfigError

if TYPE_CHECKING:  # the planner imports this module
    from .plan import ContractionPlan

__all__ = ["MachineProfile", "DEFAULT_PROFILE", "CUDA_PROFILE", "profile_for", "calibrate"]


@dataclass(frozen=True)
class MachineProfile:
    """Constants of the time model: ``t = flops / flops_per_s + bytes / bytes_per_s + ops * op_s``.

    Parameters
    ----------
    flops_per_s : float
        Matrix-product throughput, floating-point operations per second (> 0).
    bytes_per_s : float
        Memory bandwidth of a contiguous copy, bytes per second (> 0).
    op_seconds : float
        Fixed cost of one kernel launch, seconds (>= 0).
    contract_factor : float, default 1.0
        Scales the modelled time of a contraction through the cores: its pairwise steps
        are thin matrix products with strided reorganizations, slower per FLOP and per
        byte than one large matrix product. :func:`calibrate` measures it on a probe
        contraction.
    copy_efficiency : tuple of (int, float) pairs
        ``(run length in bytes, fraction of bytes_per_s)`` of a reorganizing copy whose
        contiguous runs have that length (interpolated in log-length, flat beyond the
        ends), run lengths increasing.

    Raises
    ------
    ConfigError
        If a constant is not a finite number in its range.

    Examples
    --------
    >>> MachineProfile(flops_per_s=1e11, bytes_per_s=1e10, op_seconds=1e-5).op_seconds
    1e-05
    """

    flops_per_s: float
    bytes_per_s: float
    op_seconds: float
    contract_factor: float = 1.0
    #: ``(run length in bytes, fraction of bytes_per_s)`` of a reorganizing copy whose
    #: contiguous runs have that length (interpolated in log-length, flat beyond the ends)
    copy_efficiency: tuple[tuple[int, float], ...] = ((16, 0.8), (64, 1.0))

    def __post_init__(self) -> None:
        for name, minimum in (
            ("flops_per_s", None),
            ("bytes_per_s", None),
            ("op_seconds", 0.0),
            ("contract_factor", None),
        ):
            v = getattr(self, name)
            ok = (
                not isinstance(v, bool)
                and isinstance(v, numbers.Real)
                and math.isfinite(v)
                and (v > 0 if minimum is None else v >= minimum)
            )
            if not ok:
                rng = "> 0" if minimum is None else ">= 0"
                raise ConfigError(f"`{name}` must be a finite number {rng}; got {v!r}")
        table = self.copy_efficiency
        try:
            pairs = [(int(r), float(e)) for r, e in table]
        except (TypeError, ValueError):
            pairs = []
        if not pairs or any(r <= 0 or not 0 < e <= 1 for r, e in pairs) or any(
            a[0] >= b[0] for a, b in zip(pairs, pairs[1:])
        ):
            raise ConfigError(
                f"`copy_efficiency` must be (run bytes > 0, fraction in (0, 1]) pairs with "
                f"increasing run lengths; got {table!r}"
            )
        object.__setattr__(self, "copy_efficiency", tuple(pairs))

    def copy_seconds(self, copies: Sequence[tuple[int, int]]) -> float:
        """Modelled time of reorganizing copies given as ``(bytes, run bytes)``.

        Examples
        --------
        >>> MachineProfile(1e11, 1e9, 0.0).copy_seconds([(10**9, 64)])
        1.0
        """
        table = self.copy_efficiency
        total = 0.0
        for nbytes, run in copies:
            if run <= table[0][0]:
                eff = table[0][1]
            elif run >= table[-1][0]:
                eff = table[-1][1]
            else:
                for (r0, e0), (r1, e1) in zip(table, table[1:]):
                    if r0 <= run <= r1:
                        t = math.log(run / r0) / math.log(r1 / r0)
                        eff = e0 + t * (e1 - e0)
                        break
            total += nbytes / (self.bytes_per_s * eff)
        return total

    def seconds(self, flops: float, bytes_moved: float, ops: int) -> float:
        """Modelled time of a computation.

        Examples
        --------
        >>> MachineProfile(1e9, 1e9, 1e-3).seconds(1e9, 1e9, 2)
        2.002
        """
        return flops / self.flops_per_s + bytes_moved / self.bytes_per_s + ops * self.op_seconds


#: Constants measured on a quiet 2-core x86-64 CPU (float32, MKL), the contraction factor
#: fitted to benchmarks/bench_plan.py there; used when planning on shapes alone.
#: :func:`calibrate` measures the machine at hand.
DEFAULT_PROFILE = MachineProfile(
    flops_per_s=1.5e11,
    bytes_per_s=5e9,
    op_seconds=3e-5,
    contract_factor=1.2,
    copy_efficiency=((16, 0.8), (64, 1.0)),
)

#: Constants for the accelerator path: an H200-class GPU in bfloat16 (tensor-core
#: throughput well below the peak, as for the thin products of DoTA's layers; HBM bandwidth; the
#: host-side cost of one small operator dispatched from Python, which bounds the
#: contraction's many small steps: the issue-19 profile saw ~77 ms of host time for
#: ~750 operators). Estimates, not a fit: no GPU was lent to the work that set them. With
#: them the training step always builds ``W`` (a launch costs more than the ``W``-sized
#: passes at the LLaMA shapes); ``benchmarks/bench_layer.py`` run on a GPU would check the
#: pick against both pinned strategies.
CUDA_PROFILE = MachineProfile(
    flops_per_s=3e14,
    bytes_per_s=2.5e12,
    op_seconds=2e-5,
    contract_factor=1.5,
    copy_efficiency=((16, 0.5), (256, 1.0)),
)


def profile_for(kind: str) -> MachineProfile:
    """The fixed time-model constants of a device kind (``"cpu"`` or ``"cuda"``).

    What ``strategy="auto"`` plans with, in :func:`mpo_matmul` and in DoTA's layers:
    nothing is measured, so every process (a training run, the process that reloads its
    adapter) picks the same path for the same shapes. :func:`calibrate` measures the
    machine at hand instead (``strategy="calibrated"``).

    Parameters
    ----------
    kind : {"cpu", "cuda"}
        The device kind: ``"cpu"`` for numpy arrays and CPU tensors, ``"cuda"`` for every
        accelerator (CUDA, ROCm, XPU, MPS).

    Returns
    -------
    MachineProfile
        :data:`DEFAULT_PROFILE` (measured on a 2-core x86-64 CPU) or :data:`CUDA_PROFILE`
        (estimates for an H200-class GPU).

    Raises
    ------
    ConfigError
        If ``kind`` is not ``"cpu"`` or ``"cuda"``.

    Examples
    --------
    >>> profile_for("cpu") is DEFAULT_PROFILE, profile_for("cuda") is CUDA_PROFILE
    (True, True)
    """
    if kind not in DEVICE_KINDS:
        raise ConfigError(f"`kind` must be one of {DEVICE_KINDS}; got {kind!r}")
    return DEFAULT_PROFILE if kind == "cpu" else CUDA_PROFILE


# The probe contraction of calibrate(): a 1024 x 1024 MPO (N = 5, modes 4, rank 16) applied
# to 4096 rows, whose intermediates (~64 MB in float32) exceed the caches, as those of the
# large batches do where dense and contract come close (small batches fit in cache and are
# far from the crossover).
_PROBE_SHAPES = ((1, 4, 4, 16), (16, 4, 4, 16), (16, 4, 4, 16), (16, 4, 4, 16), (16, 4, 4, 1))
_PROBE_BATCH = 4096


def _best_of(f: Any, reps: int = 3) -> float:
    """The shortest of ``reps`` timed calls of ``f``, after one untimed (warm-up) call.

    ``f`` must return only once its work is done (on a GPU: synchronize at its end), so
    that each timed call starts on an idle device.
    """
    f()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def _synchronizer(device: str) -> Any:
    """A function that waits until torch device ``device`` has done its queued work.

    The device measured, which need not be the current one (``cuda:1`` while ``cuda:0``
    is current); on the CPU a no-op.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return lambda: None
    if dev.type == "cuda":
        return functools.partial(torch.cuda.synchronize, dev)
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: XPU, MPS, ...
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        return functools.partial(accelerator.synchronize, dev)
    return lambda: None


@functools.cache
def _calibrate_key(kind: str, device: str, dtype: str) -> MachineProfile:
    """:func:`calibrate` for one (library, device, dtype), measured once per process.

    The probe data come from generators of its own, seeded: calibrating neither reads nor
    advances the caller's global random streams (torch's or numpy's).
    """
    from .plan import plan_mpo_matmul  # the planner costs with profiles: imported late

    rows, inner = 2048, 1024
    if kind == "torch":
        import torch

        dt = getattr(torch, dtype)
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape: int) -> Any:
            return torch.randn(*shape, generator=gen, device=device).to(dt)

        sync = _synchronizer(device)

        def run(f: Any) -> Any:
            return lambda: (f(), sync())

        itemsize = torch.empty(0, dtype=dt).element_size()
    else:
        rng = np.random.default_rng(0)

        def rand(*shape: int) -> Any:
            return rng.standard_normal(shape).astype(dtype)

        def run(f: Any) -> Any:
            return f

        itemsize = np.dtype(dtype).itemsize
    a, b = rand(rows, inner), rand(inner, inner)
    big = rand(1 << 23)
    gemm = _best_of(run(lambda: a @ b))
    copy = _best_of(run(lambda: big.copy() if kind == "numpy" else big.clone()))
    cores = [rand(*shape) for shape in _PROBE_SHAPES]
    in_modes = tuple(shape[2] for shape in _PROBE_SHAPES)

    def probe(batch: int, profile: MachineProfile) -> tuple[float, ContractionPlan]:
        plan = plan_mpo_matmul(_PROBE_SHAPES, batch, itemsize=itemsize, profile=profile)
        x = rand(batch, *in_modes)
        expr = oe.contract_expression(plan.equation, (batch, *in_modes), *_PROBE_SHAPES,
                                      optimize=list(plan.path))
        return _best_of(run(lambda: expr(x, *cores)), reps=5), plan

    flops_per_s = 2 * rows * inner * inner / gemm
    bytes_per_s = 2 * (1 << 23) * itemsize / copy
    # reorganizing copies: (a, b, n) -> (b, a, n) moves contiguous runs of n items
    table = []
    for length in (4, 16, 64, 256):
        side = int(math.sqrt((1 << 23) // length))
        block = big[: side * side * length].reshape(side, side, length)
        if kind == "numpy":
            seconds = _best_of(run(lambda b=block: b.transpose(1, 0, 2).copy()))
        else:
            seconds = _best_of(run(lambda b=block: b.permute(1, 0, 2).contiguous()))
        rate = 2 * side * side * length * itemsize / seconds
        table.append((length * itemsize, min(rate / bytes_per_s, 1.0)))
    # per-kernel overhead: the probe contraction at one row is all overhead
    efficiency = tuple(table)
    latency, plan1 = probe(
        1, MachineProfile(flops_per_s, bytes_per_s, 0.0, copy_efficiency=efficiency)
    )
    op_seconds = max(latency / (2 * len(plan1.path)), 1e-7)
    base = MachineProfile(flops_per_s, bytes_per_s, op_seconds, copy_efficiency=efficiency)
    # the contraction's efficiency against the model, on the probe at a real batch
    measured, plan = probe(_PROBE_BATCH, base)
    # The step model charges every product and copy a contraction makes, yet on CPU the
    # contractions of LLaMA-sized layers ran ~1.2x slower than it says (fitted with
    # benchmarks/bench_plan.py on a quiet machine); the probe, noisy run to run, may only
    # raise that floor.
    floor = DEFAULT_PROFILE.contract_factor
    factor = min(max(measured / plan.contract_seconds, floor), 20.0)
    return MachineProfile(flops_per_s, bytes_per_s, op_seconds, factor, efficiency)


def calibrate(like: Any) -> MachineProfile:
    """Measure (once, then cached) the time-model constants for arrays like ``like``.

    Parameters
    ----------
    like : numpy.ndarray or torch.Tensor
        A floating array of the library, device and dtype the plans are for (its values
        and shape do not matter).

    Returns
    -------
    MachineProfile
        Measured on this machine (a matrix product, a copy, reorganizing copies and a
        probe contraction; about a second the first time per library, device and dtype).

    Raises
    ------
    DTypeError
        If ``like`` is not a floating numpy array or torch tensor with data.

    Notes
    -----
    The probe data come from seeded generators of its own, on ``like``'s device: the
    caller's global random streams (torch's, numpy's) are neither read nor advanced. On a
    GPU each timing waits for ``like``'s device, which need not be the current one.

    Examples
    --------
    >>> import numpy as np
    >>> profile = calibrate(np.zeros(1))
    >>> profile.flops_per_s > 0 and profile.contract_factor >= 1.0
    True
    >>> calibrate(np.ones(3)) is profile  # cached per (library, device, dtype)
    True
    """
    like = check_float(like, "like")
    if is_torch(like):
        with no_autocast(like):
            return _calibrate_key(
                "torch", str(like.device), str(like.dtype).replace("torch.", "")
            )
    return _calibrate_key("numpy", "cpu", str(np.dtype(like.dtype)))
