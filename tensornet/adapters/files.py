"""The adapter weights file: what a saved tensornet adapter must hold, checked before use.

peft writes an adapter as ``adapter_model.safetensors`` (or ``adapter_model.bin``) and
then ``adapter_config.json``. A tensornet adapter's weights carry a **manifest**: one
extra tensor (:data:`MANIFEST_KEY`, JSON bytes) holding a BLAKE2b digest of every tensor
of the method (its dtype, shape and bytes) and the fingerprint of the base model the
adapter was trained on; the config records the SHA-256 of the manifest
(``adapter_digest``). So a file is verified on its own (a flipped bit, a tensor cast to
another dtype or replaced by other values is named), and a config is tied to the weights
saved with it (weights from one save and a config from another, the state a crash
between peft's two writes leaves, are refused).

:func:`check_adapter_file` reads the file before peft builds anything; :func:`check_state`
checks a state dict on its way into a model (every load path of peft passes through it,
``load_adapter`` into an existing name and ``set_peft_model_state_dict`` included).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._atomic import write_text_atomic
from ..errors import AdapterFileError
from ._registry import TESTED_PEFT

__all__ = [
    "MANIFEST_KEY",
    "WEIGHTS_NAME",
    "BIN_WEIGHTS_NAME",
    "check_adapter_file",
    "check_state",
    "make_manifest",
    "manifest_digest",
    "read_adapter_tensors",
    "weights_file",
    "write_model_card",
]

#: The file peft's ``save_pretrained`` writes the adapter tensors to (and its pickle twin).
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
#: The manifest's key in the weights file: no dot, so peft's adapter-name and prefix
#: rewriting of keys never touches it.
MANIFEST_KEY = "tensornet-manifest"
MANIFEST_FORMAT = 1


def weights_file(folder: str | os.PathLike) -> Path | None:
    """The weights file peft's loader reads in ``folder`` (safetensors first), or None."""
    folder = Path(folder)
    for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def read_adapter_tensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file (safetensors, or peft's ``torch.save`` pickle).

    Raises
    ------
    AdapterFileError
        The file is truncated, damaged or not a weights file (a ``.bin`` is read with
        ``weights_only=True``: it may hold tensors and nothing else).
    """
    file = Path(file)
    try:
        if file.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(str(file))
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors' own error type, pickle's, or OSError
        kind = "safetensors" if file.name.endswith(".safetensors") else "torch.save"
        raise AdapterFileError(
            f"{file} is not a readable {kind} file ({type(exc).__name__}: {exc}); it is "
            f"truncated or damaged: save the adapter again"
        ) from None
    if not isinstance(tensors, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterFileError(f"{file} does not hold a mapping of names to tensors")
    return dict(tensors)


def _tensor_digest(t: torch.Tensor) -> str:
    """``"<dtype>:<shape>:<16 hex digits>"``: BLAKE2b of the tensor's bytes (row-major)."""
    data = t.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy()
    h = hashlib.blake2b(data.tobytes(), digest_size=8).hexdigest()
    shape = "x".join(str(d) for d in t.shape)
    return f"{str(t.dtype).removeprefix('torch.')}:{shape}:{h}"


def make_manifest(tensors: Mapping[str, torch.Tensor], *, method: str,
                  base: str | None) -> torch.Tensor:
    """The manifest tensor of ``tensors`` (checkpoint key -> tensor) as saved."""
    record = {
        "format": MANIFEST_FORMAT,
        "method": method,
        "base": base,
        "tensors": {k: _tensor_digest(v) for k, v in sorted(tensors.items())},
    }
    data = json.dumps(record, sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def manifest_digest(manifest: torch.Tensor) -> str:
    """SHA-256 of the manifest's bytes: what ``adapter_config.json`` records."""
    return "sha256:" + hashlib.sha256(manifest.numpy().tobytes()).hexdigest()


def _read_manifest(manifest: torch.Tensor, where: str) -> dict[str, Any]:
    try:
        if manifest.dtype != torch.uint8 or manifest.dim() != 1:
            raise ValueError(f"a {manifest.dtype} tensor of shape {list(manifest.shape)}")
        record = json.loads(manifest.numpy().tobytes().decode())
        if not isinstance(record, dict) or not isinstance(record.get("tensors"), dict):
            raise ValueError("no tensor digests")
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{where}: its tensornet manifest is damaged ({exc})") from None
    if record.get("format") != MANIFEST_FORMAT:
        raise AdapterFileError(
            f"{where}: its manifest has format {record.get('format')!r}, which this "
            f"tensornet does not know (it writes {MANIFEST_FORMAT}); upgrade tensornet"
        )
    return record


def check_state(
    tensors: Mapping[str, torch.Tensor], *, where: str, method: str, prefix: str,
    allowed: Callable[[str], bool] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    digest: str | None = None, base: str | None = None,
) -> dict[str, torch.Tensor]:
    """Check an adapter's tensors (checkpoint keys) before they reach a model.

    Returns the tensors without the manifest. Every check names ``where`` (the file,
    or the state dict being loaded) and the tensor.

    Parameters
    ----------
    allowed : callable, optional
        True for every key the adapter may hold besides the manifest (the method's
        tensors and ``modules_to_save``'s); anything else (a base model's weight, another method's
        tensor) is refused. None: not checked here.
    shapes : mapping, optional
        Key -> shape of the method's tensors; every one must be present with that shape.
    digest : str, optional
        The ``adapter_digest`` of the config saved with the weights: the manifest must
        be there and be that one.
    base : str, optional
        The fingerprint of the base the adapter is going into (when known): the
        manifest's must equal it.

    Raises
    ------
    AdapterFileError
    """
    tensors = dict(tensors)
    manifest = tensors.pop(MANIFEST_KEY, None)
    if shapes is not None:
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise AdapterFileError(
                f"{where} lacks {len(missing)} tensor(s) its adapter_config.json describes, "
                f"e.g. {missing[:3]}: the file is damaged or belongs to another adapter"
            )
    if allowed is not None:
        extra = sorted(k for k in tensors if not allowed(k))
        if extra:
            own = [k for k in extra if f".{prefix}" in k]
            why = ("its config does not describe them: the file belongs to another adapter"
                   if own else "they are not tensors of the adapter (a base model's weight "
                   "there would overwrite the model's): an adapter file holds the adapter "
                   "and nothing else")
            raise AdapterFileError(f"{where} holds tensor(s) {extra[:3]}: {why}")
    for key, shape in (shapes or {}).items():
        got = tuple(tensors[key].shape)
        if got != tuple(shape):
            raise AdapterFileError(
                f"{where}: tensor {key!r} has shape {list(got)}, its config implies "
                f"{list(shape)}: the file is damaged or belongs to another adapter"
            )
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterFileError(
                f"{where}: tensor {key!r} is stored as {value.dtype}, not a floating point "
                f"tensor; the adapter is damaged"
            )
        if not bool(torch.isfinite(value).all()):
            raise AdapterFileError(
                f"{where}: tensor {key!r} holds NaN or Inf values; the adapter is damaged"
            )
    if manifest is None:
        if digest is not None:
            raise AdapterFileError(
                f"{where} has no tensornet manifest, but the adapter_config.json beside it "
                f"was saved with one: the weights come from another save (or the save was "
                f"interrupted); save the adapter again"
            )
        return tensors  # saved before manifests (tensornet < 0.3): the checks above only
    if digest is not None and manifest_digest(manifest) != digest:
        raise AdapterFileError(
            f"{where}: the weights are not the ones adapter_config.json was saved with "
            f"(weights and config from two different saves, or a save that was "
            f"interrupted between them); save the adapter again"
        )
    record = _read_manifest(manifest, where)
    if record.get("method") != method:
        raise AdapterFileError(
            f"{where} holds a {record.get('method')!r} adapter, but its config describes "
            f"{method!r}: the config was edited or belongs to another adapter"
        )
    saved = record["tensors"]
    own = {k: v for k, v in tensors.items() if k in saved}
    lacking = sorted(k for k in saved if k not in tensors)
    if lacking:
        raise AdapterFileError(f"{where} lacks tensor(s) {lacking[:3]} its manifest lists")
    for key, value in own.items():
        if _tensor_digest(value) != saved[key]:
            raise AdapterFileError(
                f"{where}: tensor {key!r} is not the one that was saved (its bytes, dtype or "
                f"shape changed: a flipped bit, a cast, a replaced tensor); the adapter is "
                f"damaged: save it again"
            )
    if base is not None and record.get("base") is not None and record["base"] != base:
        from ..errors import AdapterMismatchError

        raise AdapterMismatchError(
            f"{where} was trained on another base model than the one it is loaded into "
            f"(base fingerprint {record['base']} in the file, {base} here)"
        )
    return tensors


def check_adapter_file(
    file: str | os.PathLike, expected: Mapping[str, tuple[int, ...]], *, prefix: str,
    method: str = "", extra: Callable[[str], bool] = lambda key: False,
    digest: str | None = None,
) -> None:
    """Refuse an adapter weights file that is unreadable or does not match its config.

    Parameters
    ----------
    file : path
        ``adapter_model.safetensors`` or ``adapter_model.bin``.
    expected : mapping
        Checkpoint key -> shape of every tensor of the method (``config.expected_tensors()``).
    prefix : str
        The method's peft prefix (``"dota_"``).
    method : str
        The method the config names (checked against the manifest's).
    extra : callable
        True for other keys the file may hold (``modules_to_save``'s tensors).
    digest : str, optional
        The config's ``adapter_digest``.

    Raises
    ------
    AdapterFileError
        Naming the file and the problem.
    """
    file = Path(file)
    tensors = read_adapter_tensors(file)
    check_state(tensors, where=str(file), method=method, prefix=prefix,
                allowed=lambda key: key in expected or extra(key), shapes=expected,
                digest=digest)


_CARD_BEGIN, _CARD_END = "<!-- tensornet:begin -->", "<!-- tensornet:end -->"


def write_model_card(folder: str | os.PathLike, config: object) -> None:
    """Add (or replace) a tensornet section in the adapter folder's ``README.md``.

    peft writes the folder's model card first, with nothing about the method; a reader
    without tensornet then meets peft's bare ``KeyError: 'DOTA'``. The section says
    what the adapter is (method, ranks, layers, base), which tensornet and peft install
    reads it (with the peft hook of ``tensornet/_peft_hook.py``, or an import when the
    hook is off), and the lines that load it.
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
    from ..models import describe_base

    path = getattr(config, "base_model_name_or_path", None)
    base = f"`{path}`" if path else "its base model"
    if describe_base(path):
        base += f" ({describe_base(path)})"
    peft_type = getattr(config, "peft_type", "")
    peft_type = getattr(peft_type, "value", peft_type)

    section = f"""{_CARD_BEGIN}
## tensornet adapter

A **{getattr(config, "method", "tensornet")}** adapter ({shape}) on {len(layers)} layers of
{base}, saved by tensornet {__version__} as the peft method `{peft_type}`. Loading it needs
tensornet installed beside peft {TESTED_PEFT[0]} or newer (tested: {", ".join(TESTED_PEFT)}):
from a tensornet checkout, `pip install -e ".[adapters]"` (the `tensornet` project on PyPI is
another one). The install registers tensornet's methods whenever peft is imported, so peft's
own loaders (`PeftModel`, `AutoPeftModelForCausalLM`, lm-eval, TRL) read this folder. Where
that hook is off (`TENSORNET_NO_PEFT_HOOK=1`), peft stops on `KeyError: '{peft_type}'` unless
tensornet is imported first:

```python
import tensornet.adapters  # registers DoTA, LoTR and LoRTA (needed with the hook off)
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```

The base model must be the one the adapter was trained on (each adapted layer's weights
are checked by their fingerprint; float32 and bfloat16 copies of it match).
{_CARD_END}
"""
    write_text_atomic(card, text.rstrip("\n") + ("\n\n" if text.strip() else "") + section)

