"""Where a run trains: its processes (torchrun / accelerate) and the one GPU of a process.

One process trains on one device: ``cuda:N`` (or ``cuda``, the current GPU) is GPU N alone,
never ``torch.nn.DataParallel`` over every visible GPU (the Trainer's arguments are pinned
to it by :mod:`tensornet.finetune.trainer`); several GPUs are DDP's, one process each,
under ``torchrun`` or ``accelerate launch``, which set ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``. Read from the environment, so that the command line can check a
``--device`` before anything is loaded.
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import ConfigError

__all__ = [
    "DEVICE_PATTERN",
    "world_size",
    "is_launched",
    "is_main_process",
    "wait_for_everyone",
    "gpu_index",
]

#: ``cpu``, ``cuda`` (the current GPU; under torchrun each process's own) or ``cuda:N``.
DEVICE_PATTERN = re.compile(r"cpu|cuda(?::(\d+))?")


def world_size() -> int:
    """Number of training processes (``WORLD_SIZE`` set by torchrun / accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_launched() -> bool:
    """True under ``torchrun`` / ``accelerate launch``, where each process has its own GPU.

    accelerate goes distributed when ``LOCAL_RANK`` is set, even for a single process.
    """
    return world_size() > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1


def is_main_process() -> bool:
    """True in the process that writes the run folder (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone(device: str = "cpu") -> None:
    """Barrier of all training processes (a no-op in a single process).

    The first call under torchrun / accelerate sets up accelerate's process group (gloo
    on the CPU, NCCL on CUDA), the one the Trainer then uses.
    """
    if world_size() == 1:
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu", backend="gloo" if device == "cpu" else None)
    PartialState().wait_for_everyone()


def _cuda_index(device: str) -> int | None:
    """N of ``"cuda:N"``; None for ``"cuda"`` and ``"cpu"``."""
    found = DEVICE_PATTERN.fullmatch(device)
    return int(found.group(1)) if found and found.group(1) is not None else None


def gpu_index(device: str) -> int | None:
    """The one GPU a single process trains on (None: the CPU, or torchrun's choice).

    Raises
    ------
    ConfigError
        For ``cuda:N`` under torchrun / accelerate launch, without CUDA, or past the last GPU.
    """
    if device == "cpu":
        return None
    index = _cuda_index(device)
    if is_launched():
        if index is not None:
            raise ConfigError(
                f"`device` = {device!r} under torchrun / accelerate launch ({world_size()} "
                f"process(es)): each process trains on the GPU of its LOCAL_RANK; give 'cuda'"
            )
        return None
    if not torch.cuda.is_available():
        raise ConfigError(f"`device` = {device!r}, but torch finds no CUDA device; give 'cpu'")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(
            f"`device` = {device!r}, but torch sees {count} CUDA device(s): 'cuda:0' to "
            f"'cuda:{count - 1}'"
        )
    # read now: building TrainingArguments makes cuda:0 the current device
    return torch.cuda.current_device() if index is None else index
