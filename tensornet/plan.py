"""Contraction planning for applying an MPO to a batch: ``y = x @ W.T`` without (or with) ``W``.

Two strategies are costed on shapes alone:

``"dense"``
    contract the cores into ``W`` (``out x in``), then one matmul;
``"contract"``
    contract ``x`` through the cores along the cheapest path (opt_einsum), never
    forming ``W``.

Each plan reports FLOPs and the peak intermediate (in elements) of both, and a time
estimate from a three-term model (FLOPs at GEMM throughput, bytes moved at memory
bandwidth, a fixed cost per kernel launch) whose constants are measured once per array
library, device and dtype (:func:`calibrate`). A plan is what runs: calling it on ``x``
and the cores executes its strategy along its path (as opt_einsum's ``ContractExpression``
does), and :func:`mpo_matmul` plans and calls the plan in one step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import opt_einsum as oe

from ._backend import as_array, check_has_data, check_same_kind, is_torch
from ._chain import combine_halves, mpo_halves
from ._device import DEVICE_KINDS, device_kind
from ._validate import check_positive_int
from .errors import ConfigError, DTypeError, ShapeError
from .formats import MPO
from .tensorize import check_cores

__all__ = [
    "MachineProfile",
    "ContractionPlan",
    "calibrate",
    "profile_for",
    "plan_mpo_matmul",
    "mpo_matmul",
]

Strategy = Literal["dense", "contract"]


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


def _no_autocast(x: Any) -> Any:
    """A context that turns torch autocast off for ``x``'s device (no-op for numpy).

    The pairwise contractions run in the dtype of their operands: autocast would turn
    some intermediates into bf16 while the cores stay in float32.
    """
    if is_torch(x):
        import torch

        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


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
        plan = _plan_cached(_PROBE_SHAPES, batch, itemsize, profile)
        x = rand(batch, *in_modes)
        expr = _expression(plan.equation, plan.path, ((batch, *in_modes), *_PROBE_SHAPES))
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
    like = _check_float(like, "like")
    if is_torch(like):
        with _no_autocast(like):
            return _calibrate_key(
                "torch", str(like.device), str(like.dtype).replace("torch.", "")
            )
    return _calibrate_key("numpy", "cpu", str(np.dtype(like.dtype)))


def _check_float(x: Any, name: str) -> Any:
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


@dataclass(frozen=True)
class ContractionPlan:
    """How ``y = x @ W.T`` is computed for ``W`` given as MPO cores, and what each way costs.

    Made by :func:`plan_mpo_matmul` (its fields are costs on shapes); calling the plan
    runs it, as opt_einsum's ``ContractExpression`` does::

        plan = plan_mpo_matmul(cores, batch_size)
        y = plan(x, cores)            # plan.strategy, along plan.path

    Parameters
    ----------
    batch_size : int
        Rows of ``x`` the plan was costed for (all leading dimensions flattened).
    dense_flops, contract_flops : int
        Floating-point operations of each strategy (a multiply-add counts 2).
    dense_peak, contract_peak : int
        Largest intermediate of each strategy, in elements (``W`` itself for dense).
    dense_seconds, contract_seconds : float
        Modelled times under the plan's :class:`MachineProfile`.
    build_seconds, matmul_seconds : float
        The two parts of ``dense_seconds``: materializing ``W``, and ``x @ W.T``.
    strategy : {"dense", "contract"}
        The cheaper strategy by modelled time, what a call runs by default.
    equation : str
        The einsum equation of the contraction (``x`` first, then the cores).
    path : tuple of tuple of int
        The chosen pairwise contraction order (opt_einsum format).
    core_shapes : tuple of tuple of int
        Shapes ``(R_{k-1}, I_k, J_k, R_k)`` of the cores the plan is for.
    itemsize : int, default 4
        Bytes per element the costs were modelled with.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> cores = [rng.standard_normal((1, 4, 3, 2)), rng.standard_normal((2, 2, 5, 1))]
    >>> plan = plan_mpo_matmul(cores, 7, itemsize=8)
    >>> plan.strategy, plan.core_shapes
    ('contract', ((1, 4, 3, 2), (2, 2, 5, 1)))
    >>> x = rng.standard_normal((7, 15))
    >>> W = MPO(cores).to_dense()
    >>> bool(np.allclose(plan(x, cores), x @ W.T))
    True
    >>> bool(np.allclose(plan(x, cores, strategy="dense"), x @ W.T))
    True
    """

    batch_size: int
    dense_flops: int
    dense_peak: int
    contract_flops: int
    contract_peak: int
    dense_seconds: float
    contract_seconds: float
    build_seconds: float
    matmul_seconds: float
    strategy: Strategy
    equation: str
    path: tuple[tuple[int, ...], ...]
    core_shapes: tuple[tuple[int, int, int, int], ...]
    itemsize: int = 4

    @property
    def in_features(self) -> int:
        """Columns of ``W``: the last dimension ``x`` must have."""
        return math.prod(s[2] for s in self.core_shapes)

    @property
    def out_features(self) -> int:
        """Rows of ``W``: the last dimension of the result."""
        return math.prod(s[1] for s in self.core_shapes)

    def __call__(self, x: Any, cores: Any, *, strategy: Strategy | None = None) -> Any:
        """Run the plan: ``x @ W.T`` by ``strategy`` (default :attr:`strategy`).

        Parameters
        ----------
        x : numpy.ndarray or torch.Tensor
            Input of shape ``(..., in_features)``, any number of rows (the path is valid
            for every batch size; its costs were modelled for :attr:`batch_size`).
        cores : MPO or sequence of arrays
            Cores of the shapes :attr:`core_shapes`, of ``x``'s array type, dtype and
            device.
        strategy : {"dense", "contract"}, optional
            Run this strategy instead of the cheaper one; ``"contract"`` follows
            :attr:`path`.

        Returns
        -------
        array
            ``(..., out_features)``, of ``x``'s array type and dtype; differentiable for
            torch tensors.

        Raises
        ------
        ShapeError, DTypeError, ConfigError
            If ``x`` or the cores do not fit the plan, or ``strategy`` is unknown.

        Examples
        --------
        >>> import numpy as np
        >>> cores = [np.ones((1, 2, 2, 1))]
        >>> plan_mpo_matmul(cores, 1)(np.ones((1, 2)), cores).tolist()
        [[2.0, 2.0]]
        """
        if strategy is None:
            strategy = self.strategy
        elif strategy not in ("dense", "contract"):
            raise ConfigError(
                f"`strategy` must be None, 'dense' or 'contract'; got {strategy!r}"
            )
        x = _check_float(x, "x")
        core_list = check_cores(cores.cores if isinstance(cores, MPO) else cores)
        shapes = tuple(tuple(int(d) for d in c.shape) for c in core_list)
        if shapes != self.core_shapes:
            raise ShapeError(
                f"`cores` must have the shapes the plan is for, {list(self.core_shapes)}; got "
                f"{list(shapes)}"
            )
        check_same_kind(core_list, "cores", like=x, like_name="x")
        cols = self.in_features
        if x.ndim == 0 or x.shape[-1] != cols:
            raise ShapeError(
                f"`x` must have in_features={cols} as its last dimension; got shape "
                f"{tuple(x.shape)}"
            )
        lead = tuple(x.shape[:-1])
        batch = math.prod(lead)
        if strategy == "dense":
            return _dense_matmul(x, core_list)
        else:
            in_modes = tuple(s[2] for s in shapes)
            expr = _expression(self.equation, self.path, ((batch, *in_modes), *shapes))
            with _no_autocast(x):
                y = expr(x.reshape(batch, *in_modes), *core_list)
        return y.reshape(*lead, self.out_features)


def _dense_matmul(x: Any, cores: Sequence[Any]) -> Any:
    """``x @ W.T`` through the dense ``W`` (checked arguments)."""
    W = combine_halves(*mpo_halves(cores))
    return (x.reshape(-1, W.shape[1]) @ W.T).reshape(*x.shape[:-1], W.shape[0])


def _core_shapes(cores: Any) -> tuple[tuple[int, int, int, int], ...]:
    if isinstance(cores, MPO):
        cores = cores.cores
    if is_torch(cores) or isinstance(cores, (np.ndarray, str, bytes)) or not isinstance(
        cores, Sequence
    ):
        raise DTypeError(
            f"`cores` must be an MPO, a sequence of 4-D cores or a sequence of their shapes; "
            f"got {type(cores).__name__}"
        )
    shapes = []
    for k, c in enumerate(cores):
        raw = c.shape if hasattr(c, "shape") else c
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in raw
        ):
            raise ShapeError(
                f"`cores[{k}]` must be a 4-D core (R_prev, I_k, J_k, R_next) or its shape "
                f"(4 positive ints); got {c if not hasattr(c, 'shape') else tuple(raw)!r}"
            )
        shape = tuple(int(d) for d in raw)
        if len(shape) != 4:
            raise ShapeError(
                f"`cores[{k}]` must be a 4-D core (R_prev, I_k, J_k, R_next) or its shape; "
                f"got {shape}"
            )
        shapes.append(shape)
    _check_chain(tuple(shapes))
    return tuple(shapes)  # type: ignore[return-value]


@functools.lru_cache(maxsize=1024)
def _check_chain(shapes: tuple[tuple[int, ...], ...]) -> None:
    """Validate the bond chain once per shape tuple."""
    MPO(tuple(np.empty(s, dtype=np.int8) for s in shapes))


@functools.lru_cache(maxsize=256)
def _equation(num_cores: int) -> str:
    sym = oe.get_symbol
    j = [sym(1 + k) for k in range(num_cores)]
    i = [sym(1 + num_cores + k) for k in range(num_cores)]
    r = [sym(1 + 2 * num_cores + k) for k in range(num_cores + 1)]
    x = sym(0) + "".join(j)
    ops = [r[k] + i[k] + j[k] + r[k + 1] for k in range(num_cores)]
    return f"{x},{','.join(ops)}->{sym(0)}{''.join(i)}"


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :] if n else ""


def _path_cost(
    equation: str, shapes: Sequence[tuple[int, ...]], path: Sequence[tuple[int, ...]], itemsize: int
) -> tuple[int, int, list[tuple[int, int]], int, int]:
    """Cost of a pairwise path as opt_einsum runs it with tensordot.

    Returns FLOPs, bytes streamed by the matrix products, the reorganizing copies as
    ``(bytes, contiguous run in bytes)`` pairs, the kernel count and the peak
    intermediate. Each step's result is contiguous in tensordot's order (the left
    operand's free indices, then the right's) and is handed on as a transposed view; the
    next tensordot copies an operand unless its memory order already puts the free
    indices before (left operand) or after (right operand) the contracted ones. A copy
    moves runs as long as the innermost indices that keep their place.
    """
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        sizes.update(zip(term, shape))
    order = "".join(terms)

    def size(idx: str) -> int:
        return math.prod(sizes[c] for c in idx)

    # each live operand: (logical index order, memory order)
    live = [(t, t) for t in terms]
    flops = moved = peak = kernels = 0
    copies: list[tuple[int, int]] = []

    def copy_to(memory: str, wanted: str) -> None:
        if memory != wanted:
            run = size(_common_suffix(memory, wanted)) * itemsize
            copies.append((2 * size(memory) * itemsize, run))

    for step in path:
        picked = [live[p] for p in sorted(step, reverse=True)]  # opt_einsum's left, right
        for p in sorted(step, reverse=True):
            live.pop(p)
        (left, left_mem), (right, right_mem) = picked
        keep = set("".join(t for t, _ in live)) | set(output)
        removed = [c for c in left if c in right and c not in keep]
        removed.sort(key=left.find)
        free_left = "".join(c for c in left if c not in removed)
        free_right = "".join(c for c in right if c not in removed)
        copy_to(left_mem, free_left + "".join(removed))
        copy_to(right_mem, "".join(removed) + free_right)
        result_mem = free_left + free_right
        result = "".join(sorted(result_mem, key=order.find))
        out_size = size(result_mem)
        flops += 2 * size(set(left + right))
        moved += (size(left) + size(right) + out_size) * itemsize
        kernels += 2
        peak = max(peak, out_size)
        live.append((result, result_mem))
    (last, last_mem), = live
    copy_to(last_mem, output)  # the final reshape to (batch, out_features)
    return flops, moved, copies, kernels, peak


@functools.lru_cache(maxsize=1024)
def _plan_cached(
    shapes: tuple[tuple[int, int, int, int], ...],
    batch_size: int,
    itemsize: int,
    profile: MachineProfile,
) -> ContractionPlan:
    n = len(shapes)
    out_modes = [s[1] for s in shapes]
    in_modes = [s[2] for s in shapes]
    rows, cols = math.prod(out_modes), math.prod(in_modes)
    equation = _equation(n)
    operand_shapes = [(batch_size, *in_modes), *shapes]

    # dense: chain-contract the cores (as tensorize.cores_to_matrix does), permute, matmul
    b_flops = b_moved = 0
    acc = shapes[0][1] * shapes[0][2]
    for r0, i, j, r1 in shapes[1:]:
        b_flops += 2 * acc * r0 * i * j * r1
        b_moved += (acc * r0 + r0 * i * j * r1 + acc * i * j * r1) * itemsize
        acc *= i * j
    b_moved += 2 * rows * cols * itemsize  # interleaved -> (rows, cols) permute
    build_seconds = profile.seconds(b_flops, b_moved, 2 * n)
    m_flops = 2 * batch_size * rows * cols
    matmul_seconds = profile.seconds(
        m_flops, (rows * cols + batch_size * (rows + cols)) * itemsize, 1
    )
    d_flops = b_flops + m_flops
    d_seconds = build_seconds + matmul_seconds
    d_peak = max(rows * cols, batch_size * rows)

    # contract: best of opt_einsum's flop-optimal path and the plain left-to-right sweep
    optimize = "optimal" if n <= 6 else "dp"
    candidates = [
        tuple(oe.contract_path(equation, *operand_shapes, shapes=True, optimize=optimize)[0]),
        ((0, 1),) * n,
    ]
    best = None
    for path in candidates:
        flops, moved, copies, kernels, peak = _path_cost(
            equation, operand_shapes, path, itemsize
        )
        seconds = profile.seconds(flops, moved, kernels) + profile.copy_seconds(copies)
        seconds *= profile.contract_factor
        if best is None or seconds < best[0]:
            best = (seconds, flops, peak, path)
    c_seconds, c_flops, c_peak, c_path = best  # type: ignore[misc]
    return ContractionPlan(
        batch_size=batch_size,
        dense_flops=int(d_flops),
        dense_peak=int(d_peak),
        contract_flops=int(c_flops),
        contract_peak=int(c_peak),
        dense_seconds=float(d_seconds),
        contract_seconds=float(c_seconds),
        build_seconds=float(build_seconds),
        matmul_seconds=float(matmul_seconds),
        strategy="dense" if d_seconds < c_seconds else "contract",
        equation=equation,
        path=c_path,
        core_shapes=shapes,
        itemsize=itemsize,
    )


def plan_mpo_matmul(
    cores: Any,
    batch_size: int,
    *,
    itemsize: int = 4,
    profile: MachineProfile | None = None,
) -> ContractionPlan:
    """Cost both ways of computing ``x @ W.T`` for ``x`` with ``batch_size`` rows.

    Parameters
    ----------
    cores : MPO, sequence of arrays or sequence of shapes
        The MPO cores ``(R_{k-1}, I_k, J_k, R_k)``, or just their shapes.
    batch_size : int
        Number of rows of ``x`` (leading dimensions flattened).
    itemsize : int, default 4
        Bytes per element (4 for float32, 2 for bf16).
    profile : MachineProfile, optional
        Time-model constants; :data:`DEFAULT_PROFILE` if omitted.

    Returns
    -------
    ContractionPlan
        Cached per (shapes, batch size, itemsize, profile); call it on ``x`` and the
        cores to run it.

    Raises
    ------
    ShapeError, DTypeError, ConfigError
        On bad cores, a ``batch_size`` or ``itemsize`` that is not an int >= 1, or a
        ``profile`` that is not a :class:`MachineProfile`.

    Examples
    --------
    >>> shapes = [(1, 4, 4, 16), (16, 4, 4, 16), (16, 8, 8, 16), (16, 8, 8, 16), (16, 4, 4, 1)]
    >>> plan_mpo_matmul(shapes, 1).strategy
    'contract'
    >>> plan_mpo_matmul(shapes, 4096).strategy
    'dense'
    >>> plan_mpo_matmul(shapes, 4096).dense_peak
    16777216
    """
    shapes = _core_shapes(cores)
    batch_size = check_positive_int(batch_size, "batch_size")
    itemsize = check_positive_int(itemsize, "itemsize")
    if profile is not None and not isinstance(profile, MachineProfile):
        raise ConfigError(
            f"`profile` must be None or a MachineProfile (see calibrate()); got "
            f"{type(profile).__name__}"
        )
    return _plan_cached(shapes, batch_size, itemsize, profile or DEFAULT_PROFILE)


@functools.lru_cache(maxsize=1024)
def _expression(equation: str, path: tuple[tuple[int, ...], ...], shapes: tuple) -> Any:
    return oe.contract_expression(equation, *shapes, optimize=list(path))


def mpo_matmul(
    x: Any,
    cores: Any,
    *,
    strategy: Literal["auto", "calibrated", "dense", "contract"] = "auto",
) -> Any:
    """Compute ``x @ W.T`` where ``W`` is given by MPO cores, by the cheaper strategy.

    Plans with :func:`plan_mpo_matmul` and runs the plan (``plan(x, cores)``); to run a
    plan costed once, or with a profile of your own, call the plan instead.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        Floating input of shape ``(..., in_features)``.
    cores : MPO or sequence of arrays
        Cores ``(R_{k-1}, I_k, J_k, R_k)`` of ``x``'s array type, dtype and device.
    strategy : {"auto", "calibrated", "dense", "contract"}
        ``"auto"`` runs the plan's choice under the fixed constants of ``x``'s device
        kind (:func:`profile_for`), as DoTA's layers decide: every process picks the same
        path. ``"calibrated"`` runs the plan's choice under this machine's measured
        profile (:func:`calibrate`: about a second the first time per library, device and
        dtype). ``"contract"`` runs the contraction along the path planned with the fixed
        constants; ``"dense"`` builds ``W``.

    Returns
    -------
    array
        ``(..., out_features)``; differentiable for torch tensors.

    Raises
    ------
    DTypeError
        ``x`` or a core is not a floating array, or the cores' array type, dtype or
        device differ from ``x``'s.
    ShapeError
        The cores do not chain, or ``x``'s last dimension is not ``in_features``.
    ConfigError
        ``strategy`` is not one of the four.

    Examples
    --------
    >>> import numpy as np
    >>> from tensornet import mpo_decompose
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((16, 12))
    >>> mpo = mpo_decompose(W, ((4, 4), (3, 4)))
    >>> x = rng.standard_normal((5, 12))
    >>> bool(np.allclose(mpo_matmul(x, mpo), x @ W.T))
    True
    >>> bool(np.allclose(mpo_matmul(x, mpo, strategy="contract"), x @ W.T))
    True
    """
    if strategy not in ("auto", "calibrated", "dense", "contract"):
        raise ConfigError(
            "`strategy` must be one of 'auto', 'calibrated', 'dense', 'contract'; got "
            f"{strategy!r}"
        )
    x = _check_float(x, "x")
    core_list = check_cores(cores.cores if isinstance(cores, MPO) else cores)
    check_same_kind(core_list, "cores", like=x, like_name="x")
    shapes = _core_shapes(core_list)
    if strategy == "dense":  # nothing to plan
        cols = math.prod(s[2] for s in shapes)
        if x.ndim == 0 or x.shape[-1] != cols:
            raise ShapeError(
                f"`x` must have in_features={cols} as its last dimension; got shape "
                f"{tuple(x.shape)}"
            )
        return _dense_matmul(x, core_list)
    batch = max(math.prod(x.shape[:-1]) if x.ndim else 1, 1)
    itemsize = x.element_size() if is_torch(x) else x.itemsize
    profile = calibrate(x) if strategy == "calibrated" else profile_for(device_kind(x))
    plan = _plan_cached(shapes, batch, itemsize, profile)
    return plan(x, core_list, strategy="contract" if strategy == "contract" else None)
