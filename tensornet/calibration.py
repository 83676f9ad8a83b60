"""Calibration: the time-model constants of the machine at hand, measured once.

:func:`calibrate` times a matrix product, a copy, reorganizing copies and a probe
contraction planned by :func:`tensornet.plan.plan_mpo_matmul`, and returns a
:class:`~tensornet.profiles.MachineProfile` (``strategy="calibrated"`` of
:func:`tensornet.mpo_matmul`). It sits above the planner it runs; the profiles below both.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import numpy as np
import opt_einsum as oe

from ._backend import check_float, is_torch, no_autocast
from .plan import ContractionPlan, plan_mpo_matmul
from .profiles import DEFAULT_PROFILE, MachineProfile

__all__ = ["calibrate"]


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
