"""Contraction planning for applying an MPO to a batch: ``y = x @ W.T`` without (or with) ``W``.

Two strategies are costed on shapes alone:

``"dense"``
    contract the cores into ``W`` (``out x in``), then one matmul;
``"contract"``
    contract ``x`` through the cores along the cheapest path (opt_einsum), never
    forming ``W``.

Each plan reports FLOPs and the peak intermediate (in elements) of both, and a time
estimate from a three-term model (FLOPs at GEMM throughput, bytes moved at memory
bandwidth, a fixed cost per kernel launch) whose constants are a
:class:`~tensornet.profiles.MachineProfile`: fixed per device kind
(:func:`~tensornet.profiles.profile_for`) or measured once per array library, device and
dtype (:func:`~tensornet.calibration.calibrate`). A plan is what runs: calling it on ``x``
and the cores executes its strategy along its path (as opt_einsum's ``ContractExpression``
does), and :func:`tensornet.matmul.mpo_matmul` plans and calls the plan in one step.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import opt_einsum as oe

from ._backend import check_float, check_same_kind, is_torch, no_autocast
from ._chain import combine_halves, mpo_halves
from ._validate import check_positive_int
from .errors import ConfigError, DTypeError, ShapeError
from .formats import MPO
from .profiles import DEFAULT_PROFILE, MachineProfile
from .tensorize import check_cores

__all__ = ["ContractionPlan", "plan_mpo_matmul"]

Strategy = Literal["dense", "contract"]


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
        x = check_float(x, "x")
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
            return dense_matmul(x, core_list)
        else:
            in_modes = tuple(s[2] for s in shapes)
            expr = _expression(self.equation, self.path, ((batch, *in_modes), *shapes))
            with no_autocast(x):
                y = expr(x.reshape(batch, *in_modes), *core_list)
        return y.reshape(*lead, self.out_features)


def dense_matmul(x: Any, cores: Sequence[Any]) -> Any:
    """``x @ W.T`` through the dense ``W`` (checked arguments)."""
    W = combine_halves(*mpo_halves(cores))
    return (x.reshape(-1, W.shape[1]) @ W.T).reshape(*x.shape[:-1], W.shape[0])


def core_shapes(cores: Any) -> tuple[tuple[int, int, int, int], ...]:
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
def plan_cached(
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
    shapes = core_shapes(cores)
    batch_size = check_positive_int(batch_size, "batch_size")
    itemsize = check_positive_int(itemsize, "itemsize")
    if profile is not None and not isinstance(profile, MachineProfile):
        raise ConfigError(
            f"`profile` must be None or a MachineProfile (see calibrate()); got "
            f"{type(profile).__name__}"
        )
    return plan_cached(shapes, batch_size, itemsize, profile or DEFAULT_PROFILE)


@functools.lru_cache(maxsize=1024)
def _expression(equation: str, path: tuple[tuple[int, ...], ...], shapes: tuple) -> Any:
    return oe.contract_expression(equation, *shapes, optimize=list(path))
