"""``mpo_matmul``: plan ``x @ W.T`` for an MPO ``W`` under a profile, and run the plan.

Above the planner (:mod:`tensornet.plan`), the fixed profiles (:mod:`tensornet.profiles`)
and the calibration (:mod:`tensornet.calibration`, which runs the planner): the one place
that picks a profile for a call.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from ._backend import check_float, check_same_kind, is_torch
from ._device import device_kind
from .calibration import calibrate
from .errors import ConfigError, ShapeError
from .formats import MPO
from .plan import core_shapes, dense_matmul, plan_cached
from .profiles import profile_for
from .tensorize import check_cores

__all__ = ["mpo_matmul"]


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
    x = check_float(x, "x")
    core_list = check_cores(cores.cores if isinstance(cores, MPO) else cores)
    check_same_kind(core_list, "cores", like=x, like_name="x")
    shapes = core_shapes(core_list)
    if strategy == "dense":  # nothing to plan
        cols = math.prod(s[2] for s in shapes)
        if x.ndim == 0 or x.shape[-1] != cols:
            raise ShapeError(
                f"`x` must have in_features={cols} as its last dimension; got shape "
                f"{tuple(x.shape)}"
            )
        return dense_matmul(x, core_list)
    batch = max(math.prod(x.shape[:-1]) if x.ndim else 1, 1)
    itemsize = x.element_size() if is_torch(x) else x.itemsize
    profile = calibrate(x) if strategy == "calibrated" else profile_for(device_kind(x))
    plan = plan_cached(shapes, batch, itemsize, profile)
    return plan(x, core_list, strategy="contract" if strategy == "contract" else None)
