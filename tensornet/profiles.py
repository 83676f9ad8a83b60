"""Machine profiles: the constants of the planners' time model, fixed or measured.

A :class:`MachineProfile` holds the constants of the three-term time model the planners
cost with (FLOPs at GEMM throughput, bytes at memory bandwidth, a fixed cost per kernel
launch, plus the efficiency of reorganizing copies). :func:`profile_for` gives the fixed
constants of a device kind (what ``strategy="auto"`` plans with, in
:func:`tensornet.mpo_matmul` and in DoTA's layers, so that every process decides alike);
:func:`tensornet.calibration.calibrate` measures the machine at hand
(``strategy="calibrated"``). This module holds data only: the planner costs with it, and
the calibration (which runs the planner) and the execution sit above both.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from ._device import DEVICE_KINDS
from .errors import ConfigError

__all__ = ["MachineProfile", "DEFAULT_PROFILE", "CUDA_PROFILE", "profile_for"]


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
