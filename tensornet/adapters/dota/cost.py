"""DoTA's cost model: which strategy a layer runs, per device kind (no torch work here).

The layer computes ``x (W_base + sum_t s_t MPO(T_t))^T`` either by building ``W``
(``"dense"``, :mod:`.kernels`) or by contracting ``x`` through each term's cores
(``"contract"``). Both pay the matmul with the frozen base (folded into one matmul by
``"dense"``). The model charges what each runs, on the core's plan of one term's chain,
with the constants of the device kind the layer runs on (:func:`profile_for`): on a CPU
the dense build is a loop of cache-sized blocks (a fixed cost per block), on a GPU one
large product and one fused pass (a kernel launch costs more than a pass there).
"""

from __future__ import annotations

import math

from ..._chain import halves_split
from ...plan import ContractionPlan
from ...profiles import CUDA_PROFILE, profile_for

# CUDA_PROFILE and profile_for are the core's (tensornet.profiles), re-exported here where the
# layer's cost model has always offered them.
__all__ = ["CUDA_PROFILE", "STREAM_SPEEDUP", "profile_for", "residual_strategy"]

#: How much faster than the profile's copy bandwidth the dense path's W-sized passes
#: stream (long contiguous runs, written by a matrix product or one fused add); fitted to
#: per-layer training steps on the LLaMA-2-7B shapes, 32-2048 rows, 1 and 2 threads
#: (``benchmarks/bench_layer.py``).
STREAM_SPEEDUP = 2.0

def residual_strategy(
    plan: ContractionPlan,
    *,
    training: bool,
    terms: int = 1,
    trainable: int | None = None,
    kind: str = "cpu",
) -> str:
    """DoTA's cost model: the cheaper strategy for ``x @ (W_base + sum_t s_t MPO(T_t)).T``.

    * forward pass: ``"dense"`` builds ``W`` once (the terms' half-chains side by side,
      bond ``terms * R``, with the base added in the same pass); ``"contract"`` contracts
      ``x`` through each term;
    * training step (forward, backward to the input and to the trainable cores): dense is
      three matmuls (``y``, ``dx``, ``dW``), two builds and the pull-back of ``dW``
      through the halves of the trainable terms; contract is two matmuls and
      ``2 * terms + trainable`` contractions (each term forward and back to ``x``, the
      trainable ones back to their cores).

    Parameters
    ----------
    plan : ContractionPlan
        The core's plan of one term's chain (:func:`tensornet.plan_mpo_matmul`), made
        with the profile of ``kind`` (:func:`profile_for`).
    training : bool
        Cost a training step (forward and backward) rather than a forward pass.
    terms : int, default 1
        Chains in the update (DoTA: ``T`` and ``T_init`` per adapter; QDoTA: ``T``).
    trainable : int, optional
        Of those, how many need core gradients (default: all of them).
    kind : {"cpu", "cuda"}, default "cpu"
        The device path the layer runs (:mod:`tensornet._device`).

    Returns
    -------
    {"dense", "contract"}

    Examples
    --------
    >>> from tensornet import plan_mpo_matmul
    >>> shapes = [(1, 4, 4, 16), (16, 4, 4, 16), (16, 8, 8, 16), (16, 8, 8, 16), (16, 4, 4, 1)]
    >>> residual_strategy(plan_mpo_matmul(shapes, 1), training=False)
    'contract'
    >>> residual_strategy(plan_mpo_matmul(shapes, 8192), training=True, terms=2, trainable=1)
    'dense'
    >>> plan = plan_mpo_matmul(shapes, 256, itemsize=2, profile=profile_for("cuda"))
    >>> residual_strategy(plan, training=True, terms=2, trainable=1, kind="cuda")
    'dense'
    """
    dense, contract = _strategy_seconds(
        plan, training=training, terms=terms,
        trainable=terms if trainable is None else trainable, kind=kind,
    )
    return "dense" if dense < contract else "contract"


def _strategy_seconds(
    plan: ContractionPlan, *, training: bool, terms: int, trainable: int, kind: str = "cpu"
) -> tuple[float, float]:
    """Modelled seconds of ``("dense", "contract")`` for :func:`residual_strategy`."""
    profile = profile_for(kind)
    entries = plan.out_features * plan.in_features
    itemsize = plan.itemsize
    split = halves_split(plan.core_shapes)
    bond = int(plan.core_shapes[split][0])
    stream = profile.bytes_per_s * STREAM_SPEEDUP
    if kind == "cpu":
        # blockwise products that read the base and write W in one pass; dW read once
        # per trainable term, block by block
        blocks = math.prod(s[1] for s in plan.core_shapes[:split])
        build_passes, build_ops = 2, blocks
        pull_passes, pull_ops = trainable, 2 * blocks * trainable
    else:
        # one product, then one pass reading it and the base and writing W (3 passes);
        # dW reordered once (2 passes) and pulled back by two products for all terms
        build_passes, build_ops = 3, 3
        pull_passes, pull_ops = 2 + trainable, 4

    def seconds(flops: float, passes: int, ops: int) -> float:
        return (flops / profile.flops_per_s + passes * entries * itemsize / stream
                + ops * profile.op_seconds)

    build = seconds(2 * entries * bond * terms, build_passes, build_ops)
    if not training:
        return build, terms * plan.contract_seconds
    pullback = seconds(4 * entries * bond * trainable, pull_passes, pull_ops)
    dense = 3 * plan.matmul_seconds + 2 * build + pullback
    contract = 2 * plan.matmul_seconds + (2 * terms + trainable) * plan.contract_seconds
    return dense, contract
