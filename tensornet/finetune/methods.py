"""The fine-tuning methods: build a trainable model for a method, and save its adapter.

=============  ==============================================================  ===========
method         what trains                                                     default lr
=============  ==============================================================  ===========
dota           MPO cores of q, k, v, up, down (:func:`tensornet.adapters.apply_dota`)  3e-4
dota-random    the same cores, Gaussian-initialized, residual not subtracted   3e-4
qdota          DoTA with the frozen residual in NF4 (``quantize="nf4"``)       1e-4
lotr           LoTR, factors shared per kind of target, ``r = rank`` (16)      3e-4
lorta          LoRTA, one CP decomposition of q, k, v, o, ``r = rank`` (16)    3e-4
lora           peft LoRA, ``r = lora_rank`` (32), ``alpha = r``                3e-4
pissa          peft PiSSA (``init_lora_weights="pissa_niter_4"``), r = 16      1e-4
qlora          peft LoRA on NF4 bitsandbytes ``Linear4bit`` bases              1e-5
full           every parameter                                                 1e-5
=============  ==============================================================  ===========

The learning rates are the DoTA paper's (appendix B: math for DoTA/LoRA/PiSSA/full,
the quantization settings for QDoTA/QLoRA). LoRA, PiSSA and QLoRA are Hugging Face
peft's own implementations; no dropout anywhere (the paper's recipe).

QLoRA does not go through transformers' ``load_in_4bit`` path: the target ``nn.Linear``
layers are replaced by bitsandbytes NF4 ``Linear4bit`` layers
(:func:`quantize_linears_nf4`, which quantizes on the CPU too) before
``get_peft_model``. On a CPU-only machine peft wraps those layers in its generic
``lora.Linear`` (its bitsandbytes dispatch is not taken), which trains correctly but
cannot be merged into the 4-bit base.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import LLAMA_TARGETS, apply
from ..adapters import METHODS as TENSOR_METHODS
from ..adapters.base import count_parameters, find_targets, set_submodule
from ..errors import ConfigError
from .defaults import DEFAULT_LR, METHODS
from .io import atomic_dir

__all__ = [
    "METHODS",
    "DEFAULT_LR",
    "MethodOptions",
    "BuiltMethod",
    "build_method",
    "count_parameters",
    "save_trained",
    "quantize_linears_nf4",
]

@dataclass(frozen=True)
class MethodOptions:
    """Method hyper-parameters (the paper's defaults).

    Attributes
    ----------
    rank : int
        Rank of the tensor adapters: DoTA's bond cap ``R`` (dota, dota-random, qdota),
        LoTR's and LoRTA's ``r``.
    num_cores : int
        DoTA's number of cores ``N``.
    lora_rank : int
        LoRA / QLoRA rank ``r``; ``alpha = r``.
    pissa_rank : int
        PiSSA rank; ``alpha = r``.
    target_modules : tuple of str
        Layers to adapt (the paper's q, k, v, up, down).
    seed : int
        Seed for random initializations (DoTA-Random cores, LoRA's A).
    """

    rank: int = 16
    num_cores: int = 5
    lora_rank: int = 32
    pissa_rank: int = 16
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    seed: int = 0


@dataclass
class BuiltMethod:
    """A model ready to train with one method."""

    method: str
    model: nn.Module
    trainable_params: int
    total_params: int

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a fraction of the model's parameters."""
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter that trains, in a fixed order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


def quantize_linears_nf4(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Replace the target ``nn.Linear`` layers by bitsandbytes NF4 ``Linear4bit``, in place.

    Quantization happens when the ``Params4bit`` weight is moved to a device (``.to("cpu")``
    quantizes on the CPU), so no CUDA is needed. Returns the replaced layer names.
    """
    import bitsandbytes as bnb

    names = find_targets(model, tuple(target_modules))
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ConfigError(f"target {name!r} is a {type(mod).__name__}, not nn.Linear")
        dtype = mod.weight.dtype
        layer = bnb.nn.Linear4bit(
            mod.in_features, mod.out_features, bias=mod.bias is not None,
            compute_dtype=dtype, quant_type="nf4", device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            mod.weight.detach().to(torch.float32).cpu().clone(), requires_grad=False,
            quant_type="nf4",
        ).to("cpu")
        if mod.bias is not None:
            layer.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        set_submodule(model, name, layer)
    return names


def build_method(
    model: nn.Module, method: str, options: MethodOptions | None = None
) -> BuiltMethod:
    """Prepare ``model`` (a causal LM) for training with ``method``.

    Parameters
    ----------
    model : nn.Module
        A fresh base model; it is modified (peft methods wrap it in a ``PeftModel``).
    method : str
        One of :data:`METHODS`.
    options : MethodOptions, optional
        Ranks, targets and seed; the paper's defaults when omitted.

    Returns
    -------
    BuiltMethod
        The model to train (``.model``) and its trainable / total parameter counts.

    Raises
    ------
    ConfigError
        Unknown method, or a rank / N the model's shapes cannot take.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama
    >>> built = build_method(tiny_llama(), "lora", MethodOptions(lora_rank=4))
    >>> built.trainable_params
    5632
    """
    opts = options or MethodOptions()
    if method not in METHODS:
        raise ConfigError(f"`method` must be one of {', '.join(METHODS)}; got {method!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    if method in TENSOR_METHODS:  # a tensornet peft method: built by get_peft_model
        model = apply(model, _tensor_config(method, opts))
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = _peft_model(model, method, opts)
    trainable, total = count_parameters(model)
    return BuiltMethod(method, model, trainable, total)


def _tensor_config(method: str, opts: MethodOptions) -> object:
    """The method's config from the shared options (each takes the fields it has)."""
    entry = TENSOR_METHODS[method]
    names = {f.name for f in dataclasses.fields(entry.config_cls)}
    wanted = {"rank": opts.rank, "num_cores": opts.num_cores, "seed": opts.seed}
    if tuple(entry.config_cls.default_targets) == LLAMA_TARGETS:  # LoRTA: attention only
        wanted["target_modules"] = list(opts.target_modules)
    return entry.config(**{k: v for k, v in wanted.items() if k in names})


def _peft_model(model: nn.Module, method: str, opts: MethodOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = list(opts.target_modules)
    find_targets(model, tuple(targets))  # a clear ConfigError when nothing matches
    r = opts.pissa_rank if method == "pissa" else opts.lora_rank
    if r < 1:
        raise ConfigError(f"the LoRA/PiSSA rank must be a positive int; got {r}")
    if method == "qlora":
        quantize_linears_nf4(model, targets)
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        target_modules=targets,
        init_lora_weights="pissa_niter_4" if method == "pissa" else True,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        return get_peft_model(model, config)


def save_trained(built: BuiltMethod, path: str | os.PathLike[str]) -> Path:
    """Save what ``built`` trained to the folder ``path``, atomically.

    Adapters (tensornet's and peft's methods alike): ``save_pretrained``
    (``adapter_config.json`` + ``adapter_model.safetensors``, reloaded with
    ``PeftModel.from_pretrained``); full fine-tuning: the model's state dict as
    ``model.safetensors``.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        _save_into(built, tmp)
    return path


def _save_into(built: BuiltMethod, folder: Path) -> None:
    if built.method == "full":
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in built.model.state_dict().items()}
        # tied weights share storage; keep one copy of each
        seen: dict[int, str] = {}
        unique = {}
        for k, v in state.items():
            if v.data_ptr() in seen:
                continue
            seen[v.data_ptr()] = k
            unique[k] = v
        save_file(unique, str(folder / "model.safetensors"))
    else:
        built.model.save_pretrained(str(folder))

