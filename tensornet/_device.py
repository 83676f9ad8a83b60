"""Device paths: the one place that decides between the CPU and the accelerator way (private).

Some computations are shaped differently on a CPU and on a GPU: an eigensolver (LAPACK's
subset solver through numpy against ``torch.linalg.eigh`` on the device), DoTA's dense
build (cache-sized blocks written in place against one large product and one fused pass,
since a GPU pays a launch per block), its cost model's constants. Code asks
:func:`device_kind` which way to go, once per call from the tensor it works on, instead
of branching on ``x.device.type`` inline.

:func:`device_path` forces one kind for the code run inside it, so that the test suite
runs the ``"cuda"`` path on CPU tensors too: a branch that only a GPU would take is
otherwise a branch no test runs (an accelerator path written for CUDA tensors must
therefore work on CPU tensors as well, which torch's operators do). The override is a
context variable: it holds for the current thread or task only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, Literal

from .errors import ConfigError

DeviceKind = Literal["cpu", "cuda"]

#: The kinds of path; every non-CPU device (CUDA, ROCm, XPU, MPS) takes the ``"cuda"`` one.
DEVICE_KINDS: tuple[DeviceKind, ...] = ("cpu", "cuda")

_FORCED: contextvars.ContextVar[DeviceKind | None] = contextvars.ContextVar(
    "tensornet_device_path", default=None
)


def device_kind(x: Any) -> DeviceKind:
    """The path for computations on ``x``: ``"cpu"`` for numpy arrays and CPU tensors.

    Inside :func:`device_path` the forced kind, whatever ``x``'s device.
    """
    forced = _FORCED.get()
    if forced is not None:
        return forced
    device = getattr(x, "device", None)
    return "cpu" if device is None or getattr(device, "type", "cpu") == "cpu" else "cuda"


@contextlib.contextmanager
def device_path(kind: DeviceKind) -> Iterator[None]:
    """Run the ``kind`` path for every tensor inside the block (tests, benchmarks).

    Examples
    --------
    >>> import numpy as np
    >>> with device_path("cuda"):
    ...     device_kind(np.zeros(1))
    'cuda'
    >>> device_kind(np.zeros(1))
    'cpu'
    """
    if kind not in DEVICE_KINDS:
        raise ConfigError(f"`kind` must be one of {DEVICE_KINDS}; got {kind!r}")
    token = _FORCED.set(kind)
    try:
        yield
    finally:
        _FORCED.reset(token)
