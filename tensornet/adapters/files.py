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

__all__ = ["WEIGHTS_NAME", "check_adapter_file", "write_model_card"]

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


_CARD_BEGIN, _CARD_END = "<!-- tensornet:begin -->", "<!-- tensornet:end -->"


def write_model_card(folder: str | os.PathLike, config: object) -> None:
    """Add (or replace) a tensornet section in the adapter folder's ``README.md``.

    peft writes the folder's model card first, with nothing about the method; a reader
    without tensornet then meets peft's bare ``KeyError: 'DOTA'``. The section says
    what the adapter is (method, ranks, layers, base), that tensornet must be imported
    before peft reads the folder, and the lines that load it.
    """
    card = Path(folder) / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if _CARD_BEGIN in text and _CARD_END in text:
        head, _, rest = text.partition(_CARD_BEGIN)
        text = head.rstrip("\n") + rest.partition(_CARD_END)[2]
    layers = getattr(config, "base_layers", None) or {}
    shape = ", ".join(f"{k} = {getattr(config, k)}" for k in ("rank", "num_cores")
                      if getattr(config, k, None) is not None)
    from .. import __version__

    base = getattr(config, "base_model_name_or_path", None)
    base = f"`{base}`" if base else "its base model"
    peft_type = getattr(config, "peft_type", "")
    peft_type = getattr(peft_type, "value", peft_type)

    section = f"""{_CARD_BEGIN}
## tensornet adapter

A **{getattr(config, "method", "tensornet")}** adapter ({shape}) on {len(layers)} layers of
{base}, saved by tensornet {__version__} as the peft method `{peft_type}`. Loading it needs
tensornet installed and imported before peft reads this folder (the import registers
tensornet's methods with peft):

```python
import tensornet.adapters  # registers DoTA, LoTR and LoRTA with peft
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```

The base model must be the one the adapter was trained on (each adapted layer's weights
are checked by their fingerprint; float32 and bfloat16 copies of it match).
{_CARD_END}
"""
    card.write_text(text.rstrip("\n") + ("\n\n" if text.strip() else "") + section,
                    encoding="utf-8")

