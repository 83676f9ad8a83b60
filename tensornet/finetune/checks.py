"""What a run checks before it writes anything: the model folder, its tokenizer, a checkpoint.

A run refuses bad input before its output folder is touched, so that the corrected command
can run in the same folder. These checks read files only; none builds a model or an
adapter:

* :func:`check_model_folder`: ``config.json`` parses and names a causal LM, and every
  safetensors file is whole (its header's byte ranges cover the file exactly: a truncated
  copy is caught here, not as a ``SafetensorError`` half-way through loading);
* :func:`model_digest`: the identity of a model folder for the run key of ``--resume``:
  SHA-256 of the contents of every file transformers reads (weights, config, tokenizer).
  Sizes and modification times are not an identity (a copy keeps the size, ``cp -p`` the
  time); the contents are. On SmolLM2-135M (540 MB of float32 safetensors) it takes
  about 0.8 s on one core once the file is in the page cache (OpenSSL's SHA-256 reads
  about 700 MB/s there);
* :func:`check_tokenizer`: a pad or EOS token, and no token id past the model's
  embedding;
* :func:`check_checkpoint`: a Trainer checkpoint that ``--resume`` would read is whole
  (``trainer_state.json`` parses, the ``torch.save`` archives pass their CRC checks) and
  its trained weights are finite.

Each raises a :class:`~tensornet.errors.TensornetError` whose message says what is wrong
with which file; the command line prefixes the option it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from ..errors import AdapterFileError, ConfigError, NonFiniteError

__all__ = ["check_model_folder", "model_digest", "check_tokenizer", "check_checkpoint"]

#: The suffixes of the files transformers reads from a model folder (weights, their
#: index, config, generation config, tokenizer files, chat template).
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".gguf",
                        ".pt", ".pth", ".tiktoken")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
#: A safetensors header larger than this is not one (the format caps it at 100 MB).
_MAX_HEADER = 100 * 2**20


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix in _MODEL_FILE_SUFFIXES)


def model_digest(folder: str | os.PathLike[str]) -> str:
    """SHA-256 (16 hex digits) of the names and contents of a model folder's files.

    Every file transformers may read is hashed (weights, ``config.json``, tokenizer
    files); a README or a hidden file is not. Weights replaced under the same
    ``config.json`` give another digest.

    Examples
    --------
    >>> import tempfile
    >>> from tensornet.adapters import tiny_llama
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     tiny_llama(seed=0).save_pretrained(folder)
    ...     first = model_digest(folder)
    ...     tiny_llama(seed=1).save_pretrained(folder)  # other weights, the same config
    ...     first != model_digest(folder)
    True
    """
    total = hashlib.sha256()
    for path in _model_files(Path(folder)):
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        total.update(f"{path.name}\0{digest}\n".encode())
    return total.hexdigest()[:16]


def _check_safetensors(path: Path) -> None:
    """A safetensors file whose header is JSON and whose tensors end where the file does."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise ConfigError(f"{path.name} is not a safetensors file, or is cut short "
                              f"({size} bytes); copy it again")
        try:
            header = json.loads(fh.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items()
                       if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ConfigError(f"{path.name} has a damaged safetensors header; copy it "
                              f"again") from None
    if 8 + length + end != size:
        what = "truncated" if 8 + length + end > size else "longer than its header says"
        raise ConfigError(f"{path.name} is {what}: its header describes "
                          f"{8 + length + end} bytes, the file has {size}; copy it again")


def check_model_folder(folder: str | os.PathLike[str]) -> Any:
    """The transformers config of a local model folder, checked to be a whole causal LM.

    Returns
    -------
    transformers.PretrainedConfig

    Raises
    ------
    ConfigError
        ``config.json`` does not parse or names a model transformers cannot load as a
        causal LM (an encoder-decoder such as T5, an encoder such as BERT); the folder
        holds no weights file; a safetensors file (or a shard its index names) is
        missing, truncated or has a damaged header.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from tensornet.adapters import tiny_llama
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     tiny_llama().save_pretrained(folder)
    ...     print(check_model_folder(folder).model_type)
    ...     weights = Path(folder) / "model.safetensors"
    ...     weights.write_bytes(weights.read_bytes()[:-100])
    ...     check_model_folder(folder)
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: model.safetensors is truncated: ...
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    folder = Path(folder)
    config_file = folder / "config.json"
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {config_file}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{config_file} is not valid JSON ({exc})") from None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any of transformers' errors becomes one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"transformers cannot read {config_file}: {first[:300]}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"the folder holds a {config.model_type!r} model ({type(config).__name__}), which "
            f"is not a causal language model (transformers' AutoModelForCausalLM does not "
            f"take it); give a decoder-only model such as LLaMA or SmolLM2"
        )
    weights = [p for p in _model_files(folder) if p.suffix in _WEIGHT_SUFFIXES]
    if not weights:
        raise ConfigError(f"the folder {os.fspath(folder)!r} holds no weights file "
                          f"(model.safetensors, pytorch_model.bin, ...)")
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{index.name} is not a valid weights index") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ConfigError(f"{index.name} names {missing[0]}, which the folder does not "
                              f"hold ({len(missing)} shard(s) missing)")
    for path in weights:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
    return config


def check_tokenizer(tokenizer: Any, model: Any) -> None:
    """Refuse a tokenizer the model cannot train with.

    Raises
    ------
    ConfigError
        The tokenizer has neither a pad nor an EOS token (batches cannot be padded, and
        the model never learns to stop), or it has more tokens than the model's input
        embedding has rows (an id past the last row fails inside the forward pass).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> check_tokenizer(SimpleNamespace(pad_token_id=None, eos_token_id=None), None)
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: the tokenizer has neither a pad nor an EOS token; ...
    """
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError(
            "the tokenizer has neither a pad nor an EOS token; add one (e.g. "
            "tokenizer.add_special_tokens({'eos_token': '</s>'})) and save it next to the "
            "weights"
        )
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} "
            f"rows (ids {rows} to {len(tokenizer) - 1} have none); save the model's own "
            f"tokenizer in the folder, or resize the embedding "
            f"(model.resize_token_embeddings) and save the model"
        )


def _check_archive(path: Path) -> None:
    """A ``torch.save`` file (a zip archive) whose members pass their CRC-32 checks."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise AdapterFileError(f"{path.name} is damaged ({exc})") from None
    if bad is not None:
        raise AdapterFileError(f"{path.name} is damaged (its member {bad} fails its CRC check)")


def _check_finite_weights(path: Path) -> None:
    """Every floating tensor of a safetensors file is finite (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = fh.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(
                        f"{path.name} holds NaN or Inf values (in {key}): the run diverged "
                        f"before this checkpoint, or the file is damaged"
                    )
    except NonFiniteError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' errors become one line
        raise AdapterFileError(f"{path.name} is damaged ({exc})") from None


def check_checkpoint(folder: str | os.PathLike[str], *, required: tuple[str, ...]) -> None:
    """Refuse a Trainer checkpoint that resuming from would fail on, or train NaN from.

    Parameters
    ----------
    folder : str or PathLike
        ``checkpoint-K``.
    required : tuple of str
        ``torch.save`` files the checkpoint must hold besides ``optimizer.pt`` and
        ``scheduler.pt`` (the trainer's own state file); the RNG states
        (``rng_state*.pth``) are checked where present.

    Raises
    ------
    AdapterFileError
        ``trainer_state.json`` is not JSON or is not of step K; an archive is missing or
        fails its CRC check; no weights file, or a damaged one.
    NonFiniteError
        The trained weights hold NaN or Inf values.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     check_checkpoint(folder, required=())
    Traceback (most recent call last):
    ...
    tensornet.errors.AdapterFileError: trainer_state.json is damaged (FileNotFoundError: ...
    """
    folder = Path(folder)
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step = state["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterFileError(f"{state_file.name} is damaged ({type(exc).__name__}: "
                               f"{exc})") from None
    if folder.name != f"checkpoint-{step}":
        raise AdapterFileError(f"{state_file.name} is of step {step!r}, not of "
                               f"{folder.name}")
    for name in ("optimizer.pt", "scheduler.pt", *required):
        if not (folder / name).is_file():
            raise AdapterFileError(f"{name} is missing")
    for path in sorted({*(folder / n for n in ("optimizer.pt", "scheduler.pt", *required)),
                        *folder.glob("rng_state*.pth")}):
        _check_archive(path)
    weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors")
               if (folder / n).is_file()]
    if not weights:
        raise AdapterFileError("it holds no weights (adapter_model.safetensors or "
                               "model.safetensors)")
    _check_finite_weights(weights[0])
