"""The adapter weights file: what a saved tensornet adapter must hold, checked before use.

peft writes an adapter as ``adapter_config.json`` and ``adapter_model.safetensors``. Before
peft builds a saved adapter into a model, :func:`check_adapter_file` opens the weights file
and refuses a truncated or unreadable file, a missing, extra or misshapen tensor of the
method, or a non-finite value, naming the file and the tensor: a damaged adapter is
refused while the model is still untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import AdapterFileError

__all__ = ["WEIGHTS_NAME", "check_adapter_file"]

#: The file peft's ``save_pretrained`` writes the adapter tensors to.
WEIGHTS_NAME = "adapter_model.safetensors"


def check_adapter_file(
    file: str | os.PathLike, expected: Mapping[str, tuple[int, ...]], *, prefix: str
) -> None:
    """Refuse an adapter weights file that is unreadable or does not match its config.

    Parameters
    ----------
    file : path
        ``adapter_model.safetensors``.
    expected : mapping
        Checkpoint key -> shape of every tensor of the method (``config.expected_tensors()``);
        other keys (``modules_to_save``) are only checked for finiteness.
    prefix : str
        The method's peft prefix (``"dota_"``): a key holding ``"." + prefix`` that is not
        expected is refused as foreign.

    Raises
    ------
    AdapterFileError
        Naming the file and the problem.
    """
    from safetensors import safe_open

    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error type, or OSError
        raise AdapterFileError(
            f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
            f"truncated or damaged: save the adapter again"
        ) from None
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFileError(
            f"{file} lacks {len(missing)} tensor(s) its adapter_config.json describes, e.g. "
            f"{missing[:3]}: the file is damaged or belongs to another adapter"
        )
    extra = sorted(k for k in tensors if f".{prefix}" in k and k not in expected)
    if extra:
        raise AdapterFileError(
            f"{file} holds tensor(s) its adapter_config.json does not describe, e.g. "
            f"{extra[:3]}: the file belongs to another adapter"
        )
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != tuple(shape):
            raise AdapterFileError(
                f"{file}: tensor {key!r} has shape {list(got)}, its config implies "
                f"{list(shape)}: the file is damaged or belongs to another adapter"
            )
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterFileError(
                f"{file}: tensor {key!r} holds NaN or Inf values; the adapter is damaged"
            )
