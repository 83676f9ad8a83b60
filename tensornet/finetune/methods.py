"""The fine-tuning methods: build a trainable model for a method, and save its adapter.

The methods, what trains in each, their default learning rates (the DoTA paper's,
appendix B), the options they read and their targets are the rows of
:data:`tensornet.method_table.METHOD_TABLE` (the methods table of the command's guide page
shows it). tensornet's methods are built with :func:`tensornet.adapters.apply`; LoRA,
DoRA, PiSSA and QLoRA are Hugging Face peft's own implementations, built from the row's
settings on a ``LoraConfig``; no dropout anywhere (the paper's recipe).

QLoRA does not go through transformers' ``load_in_4bit`` path: the target ``nn.Linear``
layers are replaced by bitsandbytes NF4 ``Linear4bit`` layers
(:func:`quantize_linears_nf4`, which quantizes on the CPU too) before
``get_peft_model``. On a CPU-only machine peft wraps those layers in its generic
``lora.Linear`` (its bitsandbytes dispatch is not taken), which trains correctly but
cannot be merged into the 4-bit base.

QPiSSA is built the way the PiSSA paper quantizes (and peft's documentation asks for:
PiSSA cannot be initialized on a 4-bit base): peft's PiSSA is initialized on the
full-precision model, which leaves each target's base layer holding the residual
``W0 - s B0 A0``; that residual is then replaced by an NF4 ``Linear4bit`` computing in
the model's dtype. Only the residual is quantized, and it is smaller than ``W0`` by the
principal components the adapter took, so the quantization error is smaller than
QLoRA's ``NF4(W0)``. The adapter is kept in float32 in a bfloat16 model, as peft keeps
every baseline's here (``autocast_adapter_dtype``), QLoRA's included: PiSSA's factors
start at the size of ``W0``'s principal components, and in bfloat16 an AdamW step of
1e-4 leaves most of their entries unchanged (rounded away).

PiSSA and QPiSSA change the base weights, so their adapter alone does not reproduce
the trained model on the original weights. :func:`save_trained` therefore saves them
converted to a plain LoRA adapter of twice the rank on the original ``W0`` (peft's
``path_initial_model_for_weight_conversion``: ``B A - B0 A0`` as ``[B | -B0] [A; A0]``).
``PeftModel.from_pretrained(original_base, path)`` then gives the trained PiSSA model
up to float rounding; for QPiSSA it gives ``W_res + s B A`` where the trained model had
``NF4(W_res) + s B A``, so the two differ by the NF4 error of the residual.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._atomic import atomic_dir
from ..adapters import LLAMA_TARGETS, apply, plan
from ..adapters import METHODS as TENSOR_METHODS
from ..adapters.base import count_parameters, find_targets, set_submodule
from ..adapters.dota.layer import nf4_linear
from ..errors import ConfigError
from ..method_table import MethodSpec, method_spec
from .defaults import DEFAULT_LR, DEFAULT_OPTIONS, METHODS

__all__ = [
    "METHODS",
    "DEFAULT_LR",
    "MethodOptions",
    "BuiltMethod",
    "build_method",
    "check_method",
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
        LoRA / DoRA / QLoRA / QPiSSA rank ``r``; ``alpha = r`` (QPiSSA takes QLoRA's
        rank: the paper's Figure 5 gives the two the same parameter share).
    pissa_rank : int
        PiSSA rank; ``alpha = r``.
    target_modules : tuple of str
        Layers to adapt (the paper's q, k, v, up, down).
    seed : int
        Seed for random initializations (DoTA-Random cores, LoRA's A).
    """

    rank: int = DEFAULT_OPTIONS["rank"]  # type: ignore[assignment]
    num_cores: int = DEFAULT_OPTIONS["num_cores"]  # type: ignore[assignment]
    lora_rank: int = DEFAULT_OPTIONS["lora_rank"]  # type: ignore[assignment]
    pissa_rank: int = DEFAULT_OPTIONS["pissa_rank"]  # type: ignore[assignment]
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    seed: int = 0


@dataclass
class BuiltMethod:
    """A model ready to train with one method.

    Attributes
    ----------
    method : str
        The method's name.
    model : nn.Module
        The model to train.
    trainable_params, total_params : int
        Parameter counts (4-bit weights by logical size).
    initial_adapter : dict of str to Tensor, optional
        PiSSA's and QPiSSA's adapter as initialized (peft's state dict, copied at build
        time): :func:`save_trained` subtracts it to save the trained adapter as a LoRA on
        the original weights. ``None`` for the other methods.
    """

    method: str
    model: nn.Module
    trainable_params: int
    total_params: int
    initial_adapter: dict[str, torch.Tensor] | None = None

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
    names = find_targets(model, tuple(target_modules))
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ConfigError(f"target {name!r} is a {type(mod).__name__}, not nn.Linear")
    for name in names:
        mod = model.get_submodule(name)
        set_submodule(model, name, nf4_linear(mod.weight.detach(), mod.bias, mod.weight.dtype))
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
    check_method(model, method, opts)
    for p in model.parameters():
        p.requires_grad_(False)
    initial = None
    spec = method_spec(method)
    if spec.kind == "tensornet":  # a tensornet peft method: built by get_peft_model
        model = apply(model, _tensor_config(spec, opts))
    elif spec.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model, initial = _peft_model(model, spec, opts)
    trainable, total = count_parameters(model)
    return BuiltMethod(method, model, trainable, total, initial)


def check_method(model: nn.Module, method: str, options: MethodOptions | None = None) -> None:
    """Refuse what :func:`build_method` would refuse, without building or allocating.

    The targets must exist and be layers the method adapts, DoTA's ``num_cores`` must
    factor their shapes, and the ranks must fit them: a rank of peft's LoRA family (and
    LoTR's) is at most ``min(out_features, in_features)`` of every target (the most a
    product of rank-r factors can express: a larger one only allocates; PiSSA's SVD cannot
    give more), and a tensor adapter whose rank the shapes do not cap (LoRTA's CP rank;
    DoTA's bonds are capped at the exact ranks) may not hold more parameters than the
    weights it adapts. Works on a model on the meta device; ``model`` is not changed.

    Raises
    ------
    ConfigError
        Unknown method, no target matched, a target of the wrong type, or a rank or N the
        model's shapes cannot take (the message names the option and its bound).

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama
    >>> check_method(tiny_llama(), "lora", MethodOptions(lora_rank=4))
    >>> check_method(tiny_llama(), "lora", MethodOptions(lora_rank=99999))
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: `lora_rank` must be <= 64 for the target ...
    """
    opts = options or MethodOptions()
    if method not in METHODS:
        raise ConfigError(f"`method` must be one of {', '.join(METHODS)}; got {method!r}")
    spec = method_spec(method)
    if spec.kind == "tensornet":
        report = plan(model, _tensor_config(spec, opts))
        weights = sum(lay.out_features * lay.in_features for lay in report.layers)
        attained = any(opts.rank in lay.ranks for lay in report.layers)  # not capped
        if attained and report.trainable_params > weights:
            raise ConfigError(
                f"`rank` = {opts.rank} gives {method} {report.trainable_params:,} trainable "
                f"parameters, more than the {weights:,} weights of the {len(report.layers)} "
                f"layers it adapts; give a smaller rank"
            )
    elif spec.kind == "peft":
        r = getattr(opts, spec.rank_option)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"`{spec.rank_option}` must be a positive int; got {r!r}")
        for name in find_targets(model, tuple(opts.target_modules)):
            module = model.get_submodule(name)
            if spec.quantize == "base" and not isinstance(module, nn.Linear):
                raise ConfigError(f"target {name!r} is a {type(module).__name__}, not "
                                  f"nn.Linear; {method} quantizes nn.Linear layers")
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2:
                continue  # not a layer peft's LoRA takes: peft names it
            if r > min(weight.shape):
                rows, cols = weight.shape
                raise ConfigError(
                    f"`{spec.rank_option}` must be <= {min(weight.shape)} for the target "
                    f"{name!r} ({rows}x{cols}): a rank-r product cannot exceed "
                    f"min(out_features, in_features); got {r}"
                )


def _tensor_config(spec: MethodSpec, opts: MethodOptions) -> object:
    """The method's config from the shared options (each takes the fields it has)."""
    entry = TENSOR_METHODS[spec.name]
    names = {f.name for f in dataclasses.fields(entry.config_cls)}
    wanted = {"rank": opts.rank, "num_cores": opts.num_cores, "seed": opts.seed}
    if "targets" in spec.options:  # not LoRTA: attention only
        wanted["target_modules"] = list(opts.target_modules)
    return entry.config(**{k: v for k, v in wanted.items() if k in names})


def _peft_model(
    model: nn.Module, spec: MethodSpec, opts: MethodOptions
) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The baseline's peft model and its initial adapter (``None`` when the init is zero).

    The model is built from a ``LoraConfig`` with the table row's settings.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    targets = list(opts.target_modules)  # checked by check_method
    r = getattr(opts, spec.rank_option)
    if spec.quantize == "base":
        quantize_linears_nf4(model, targets)
    settings = dict(spec.settings)
    config = LoraConfig(
        r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
        **settings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        peft_model = get_peft_model(model, config)
    if spec.quantize == "residual":
        _quantize_residuals_nf4(peft_model)
    if settings.get("init_lora_weights", True) is True:
        return peft_model, None
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return peft_model, initial


def _quantize_residuals_nf4(peft_model: nn.Module) -> None:
    """Replace each LoRA layer's base (PiSSA's residual) by its NF4 ``Linear4bit``."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            module.base_layer = nf4_linear(base.weight.detach(), base.bias, base.weight.dtype)


def save_trained(built: BuiltMethod, path: str | os.PathLike[str]) -> Path:
    """Save what ``built`` trained to the folder ``path``, atomically.

    Adapters (tensornet's and peft's methods alike): ``save_pretrained``
    (``adapter_config.json`` + ``adapter_model.safetensors``, reloaded with
    ``PeftModel.from_pretrained`` onto the original base model); full fine-tuning: the
    model's state dict as ``model.safetensors``.

    PiSSA and QPiSSA are saved converted to a LoRA of rank ``2 r`` on the original
    weights (``built.initial_adapter`` subtracted through peft's
    ``path_initial_model_for_weight_conversion``), because their base layers hold a
    residual the original model does not have. Reloaded on the original base, a PiSSA
    adapter gives the trained model's outputs up to float rounding; a QPiSSA adapter
    gives them up to the NF4 error of the residual (the reloaded model has the exact
    residual, the trained one its NF4 copy).

    Examples
    --------
    >>> import tempfile
    >>> from peft import PeftModel
    >>> from tensornet.adapters import tiny_llama
    >>> built = build_method(tiny_llama(), "pissa", MethodOptions(pissa_rank=4))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = save_trained(built, Path(tmp) / "adapter")
    ...     again = PeftModel.from_pretrained(tiny_llama(), folder)
    >>> ids = torch.arange(8)[None]
    >>> bool(torch.allclose(again(ids).logits, built.model(ids).logits, atol=1e-5))
    True
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        _save_into(built, tmp)
    return path


def _save_into(built: BuiltMethod, folder: Path) -> None:
    if method_spec(built.method).kind == "full":
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
    elif built.initial_adapter is not None:
        from safetensors.torch import save_file

        # peft reads the initial adapter from a folder; it must not be named "pissa*",
        # or peft warns about the quantized residual on every save (documented above)
        with tempfile.TemporaryDirectory(prefix="tensornet-initial-") as tmp:
            initial = Path(tmp) / "initial"
            initial.mkdir()
            save_file(built.initial_adapter, str(initial / "adapter_model.safetensors"))
            built.model.save_pretrained(
                str(folder), path_initial_model_for_weight_conversion=str(initial)
            )
    else:
        built.model.save_pretrained(str(folder))

