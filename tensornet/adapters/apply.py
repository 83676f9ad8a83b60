"""Applying DoTA to a model, and merge / unapply / save / load for every method.

``merge``, ``unapply``, ``save_adapter`` and ``load_adapter`` dispatch on the method
recorded on the model by ``apply_dota`` / ``apply_lotr`` / ``apply_lorta`` (or, for
loading, in the file); LoTR and LoRTA share the machinery of :mod:`.shared`.

Every entry point validates everything before it changes anything: a bad config, a
missing target or a mismatched adapter file leaves the model exactly as it was.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..decompose import mpo_decompose
from ..errors import AdapterMismatchError, ConfigError, ShapeError
from ..params import mpo_num_params, mpo_ranks
from ..tensorize import cores_to_matrix, factorize
from . import lorta, lotr
from .base import (
    FORMAT_VERSION,
    STATE_ATTR,
    AdapterReport,
    LayerReport,
    count_parameters,
    dense_weight,
    find_targets,
    fingerprint,
    is_4bit,
    iter_layers,
    progress_bar,
    read_adapter_file,
    restore_requires_grad,
    set_submodule,
    tied_elsewhere,
    write_adapter_file,
)
from .config import DoTAConfig, LoRTAConfig, LoTRConfig
from .dota import DoTALinear, random_cores, release_scratch
from .shared import (
    check_fresh,
    load_additive,
    merge_additive,
    resolve_config,
    save_additive,
    unapply_additive,
)

__all__ = ["plan_dota", "apply_dota", "merge", "unapply", "save_adapter", "load_adapter"]

_STATE_ATTR = STATE_ATTR
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


#: Method family -> (display name, config class, prepare function or None for DoTA).
_FAMILIES: dict[str, tuple[str, type, Any]] = {
    "dota": ("DoTA", DoTAConfig, None),
    "lotr": ("LoTR", LoTRConfig, lotr.prepare),
    "lorta": ("LoRTA", LoRTAConfig, lorta.prepare),
}


def _family(method: str) -> str:
    """``"dota"`` for dota, dota-random, qdota, qdota-random; else the method itself."""
    return "dota" if "dota" in method else method


def _method(cfg: DoTAConfig) -> str:
    if cfg.quantize == "nf4":
        return "qdota" if cfg.init == "mpo" else "qdota-random"
    return "dota" if cfg.init == "mpo" else "dota-random"


@dataclass(frozen=True)
class _Target:
    name: str
    module: nn.Module
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]


def _modes(cfg: DoTAConfig, dim: int, layer: str, which: str) -> tuple[int, ...]:
    if cfg.modes and dim in cfg.modes:
        return tuple(cfg.modes[dim])
    try:
        return factorize(dim, cfg.num_cores)
    except ShapeError as exc:
        raise ConfigError(
            f"layer {layer!r}: {which}={dim} cannot be split into num_cores={cfg.num_cores} "
            f"modes ({exc}); give `modes={{{dim}: [...]}}` or another num_cores"
        ) from None


def _targets(model: nn.Module, cfg: DoTAConfig, *, need_weights: bool) -> list[_Target]:
    """Validate every target of ``cfg`` in ``model`` without changing anything."""
    check_fresh(model)
    out = []
    for name in find_targets(model, cfg.target_modules):
        module = model.get_submodule(name)
        if not (isinstance(module, nn.Linear) or is_4bit(module)):
            kind = type(module).__name__
            hint = (
                " (8-bit bases are not supported; load the model in 16/32 bit or 4 bit)"
                if "8bit" in kind
                else ""
            )
            raise ConfigError(
                f"target {name!r} is a {kind}; DoTA adapts nn.Linear and bitsandbytes "
                f"Linear4bit layers{hint}"
            )
        tied = tied_elsewhere(model, name)
        if tied:
            raise ConfigError(
                f"target {name!r} shares its weight with {tied} (tied weights); DoTA stores "
                f"the residual in the base weight and would overwrite them. Leave it out of "
                f"`target_modules`"
            )
        if is_4bit(module) and cfg.quantize != "nf4":
            raise ConfigError(
                f"target {name!r} is 4-bit quantized; use quantize='nf4' (QDoTA dequantizes, "
                f"decomposes at full precision and re-quantizes the residual)"
            )
        if need_weights and module.weight.device.type == "meta":
            raise ConfigError(
                f"target {name!r} is on the meta device (no weights to decompose); use "
                f"plan_dota(model, ...) to count parameters without weights"
            )
        out_f, in_f = int(module.out_features), int(module.in_features)
        out_modes = _modes(cfg, out_f, name, "out_features")
        in_modes = _modes(cfg, in_f, name, "in_features")
        ranks = mpo_ranks(out_modes, in_modes, cfg.rank)
        out.append(_Target(name, module, out_modes, in_modes, ranks))
    if cfg.quantize == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"quantize='nf4' needs bitsandbytes (pip install 'tensornet[adapters]'): {exc}"
            ) from None
    return out


def plan_dota(
    model: nn.Module, config: DoTAConfig | None = None, **overrides: Any
) -> AdapterReport:
    """Report what :func:`apply_dota` would do, without weights and without changes.

    Works on a model built on the meta device, so the adapter size of a 7B model can
    be counted without allocating it.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    ...                   num_attention_heads=32, vocab_size=32000)
    >>> with torch.device("meta"):
    ...     llama2 = LlamaForCausalLM(cfg)
    >>> report = plan_dota(llama2)          # the paper's defaults: N=5, R=16
    >>> report.trainable_params, f"{100 * report.trainable_share:.3f}%"
    (10043392, '0.149%')
    """
    cfg = resolve_config(config, DoTAConfig, overrides)
    targets = _targets(model, cfg, need_weights=False)
    layers = tuple(
        LayerReport(
            t.name,
            math.prod(t.out_modes),
            math.prod(t.in_modes),
            t.out_modes,
            t.in_modes,
            t.ranks,
            mpo_num_params(t.out_modes, t.in_modes, cfg.rank),
        )
        for t in targets
    )
    adapter = sum(lay.num_params for lay in layers)
    _, total = count_parameters(model)
    return AdapterReport(_method(cfg), layers, adapter, total + adapter, {"config": cfg.to_dict()})


def _initial_cores(
    t: _Target, cfg: DoTAConfig, index: int
) -> tuple[list[torch.Tensor], float | None, str]:
    w0 = dense_weight(t.module)
    fp = fingerprint(w0)
    if cfg.init == "random":
        gen = None
        if cfg.seed is not None:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
        return random_cores(t.out_modes, t.in_modes, t.ranks, generator=gen), None, fp
    mpo = mpo_decompose(w0, (t.out_modes, t.in_modes), cfg.rank)
    return list(mpo.cores), mpo.relative_error, fp


def _install(
    model: nn.Module,
    cfg: DoTAConfig,
    targets: list[_Target],
    inits: list[tuple[list[torch.Tensor], float | None, str]],
) -> AdapterReport:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    dtype = _DTYPES[cfg.dtype] if cfg.dtype else None
    method = _method(cfg)
    reports = []
    for p in model.parameters():
        p.requires_grad_(False)
    for t, (cores, err, fp) in zip(targets, inits):
        layer = DoTALinear.from_linear(
            t.module,
            cores,
            quantize=cfg.quantize,
            dtype=dtype,
            strategy=cfg.strategy,
            method=method,
        )
        layer.base_fingerprint = fp
        layer.relative_error = err
        set_submodule(model, t.name, layer)
        reports.append(
            LayerReport(
                t.name,
                layer.out_features,
                layer.in_features,
                t.out_modes,
                t.in_modes,
                t.ranks,
                sum(c.numel() for c in layer.cores),
                err,
            )
        )
    setattr(model, _STATE_ATTR, {"method": method, "config": cfg, "requires_grad": flags})
    trainable, total = count_parameters(model)
    return AdapterReport(method, tuple(reports), trainable, total, {"config": cfg.to_dict()})


def apply_dota(
    model: nn.Module, config: DoTAConfig | None = None, *, progress: bool = True, **overrides: Any
) -> AdapterReport:
    """Replace the target linear layers of ``model`` by DoTA layers, in place.

    Each target weight ``W0`` is decomposed (MPO, :func:`tensornet.mpo_decompose`); its
    cores become the only trainable parameters and ``W_res = W0 - MPO(T)`` is frozen in
    the base layer, so the model computes what it computed before. Everything else in
    the model is frozen.

    Parameters
    ----------
    model : nn.Module
        Any model with ``nn.Linear`` (or bitsandbytes ``Linear4bit``) targets, e.g. a
        transformers LLaMA.
    config : DoTAConfig, optional
        Defaults to the paper's: q, k, v, up, down projections, ``N = 5``, ``R = 16``.
    progress : bool
        Show a progress bar while decomposing.
    **overrides
        Fields of :class:`DoTAConfig` to change (``rank=32``, ``quantize="nf4"``, ...).

    Returns
    -------
    AdapterReport
        The wrapped layers, trainable parameters and their share of the model.

    Raises
    ------
    ConfigError
        A bad config value, no matching target, a target that is not linear, a model
        that already has adapters; the model is left untouched.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama, apply_dota
    >>> model = tiny_llama()
    >>> report = apply_dota(model, progress=False)
    >>> report.method, len(report.layers), report.trainable_params
    ('dota', 10, 39232)
    """
    cfg = resolve_config(config, DoTAConfig, overrides)
    targets = _targets(model, cfg, need_weights=True)
    inits = [
        _initial_cores(t, cfg, i)
        for i, t in enumerate(progress_bar(targets, progress, "decomposing"))
    ]
    with torch.no_grad():
        return _install(model, cfg, targets, inits)


def _state(model: nn.Module) -> dict[str, Any]:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ConfigError(
            "`model` has no tensornet adapters (apply_dota, apply_lotr or apply_lorta was not "
            "called on it)"
        )
    return state


def _replace_layers(model: nn.Module, weight_of: Any) -> nn.Module:
    state = _state(model)
    for name, layer in list(iter_layers(model, DoTALinear)):
        base = layer.base_layer
        weight = weight_of(layer)
        bias = base.bias
        linear = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.to(weight.dtype))
        set_submodule(model, name, linear)
    delattr(model, _STATE_ATTR)
    restore_requires_grad(model, state["requires_grad"])
    release_scratch()  # the dense path's reused buffers regrow if DoTA runs again
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into a plain ``nn.Linear`` computing ``W_res + MPO(T)``, in place.

    The merged layers run at the base model's speed. The weight is computed in float32
    (at least) and stored in the dtype the layer had before it was adapted; for QDoTA the
    residual is dequantized first (the merged weight carries its NF4 rounding), and a base
    that was 4-bit becomes a dense layer of its compute dtype.
    The model's original ``requires_grad`` flags are restored.

    For LoTR and LoRTA the merged weight is ``W0 + Delta W`` (float32 compute, the base
    dtype) and the shared factor container is removed from the model.

    Returns
    -------
    nn.Module
        ``model`` itself, without tensornet layers.

    Examples
    --------
    >>> from tensornet.adapters import apply_lotr, merge, tiny_llama
    >>> model = tiny_llama()
    >>> _ = apply_lotr(model)
    >>> type(merge(model).model.layers[0].self_attn.q_proj).__name__
    'Linear'
    >>> hasattr(model, "tensornet_lotr")
    False
    """
    state = _state(model)
    if _family(state["method"]) != "dota":
        return merge_additive(model, state)
    return _replace_layers(model, lambda layer: layer.merged_weight())


@torch.no_grad()
def unapply(model: nn.Module) -> nn.Module:
    """Remove the adapters, in place: plain ``nn.Linear`` layers with the original weights.

    The weight is rebuilt as ``W_res + MPO(T_init)``: the original ``W0`` up to one
    rounding to the base dtype (at most one unit in the last place). For QDoTA the
    residual was stored in NF4, so the rebuilt weight carries its quantization error.
    LoTR and LoRTA never modified the base layers: they are put back exactly.
    """
    state = _state(model)
    if _family(state["method"]) != "dota":
        return unapply_additive(model, state)

    def original(layer: DoTALinear) -> torch.Tensor:
        dt = torch.float64 if layer.compute_dtype == torch.float64 else torch.float32
        w = layer.residual_weight(dt) + cores_to_matrix([c.to(dt) for c in layer.init_cores()])
        return w.to(layer.base_dtype)

    return _replace_layers(model, original)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the adapter of ``model`` to the folder ``path`` (atomically).

    Writes ``adapter.safetensors`` (trained cores, initial cores, and in its header the
    config, the layer list and a fingerprint of each base weight) and a readable
    ``adapter_config.json``. The initial cores let :func:`load_adapter` rebuild
    ``W_res`` exactly on any machine without an SVD.

    LoTR and LoRTA files hold the shared factors (under ``tensornet_lotr.*`` /
    ``tensornet_lorta.*``) and the per-layer cores (``<layer>.G`` for LoTR), with the same
    metadata (method, config, layers with shapes and base fingerprints).
    """
    state = _state(model)
    if _family(state["method"]) != "dota":
        save_additive(model, state, path)
        return
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for name, layer in iter_layers(model, DoTALinear):
        for k, (c, c0) in enumerate(zip(layer.cores, layer.init_cores())):
            tensors[f"{name}.cores.{k}"] = c.detach()
            tensors[f"{name}.init.{k}"] = c0
        layers.append(
            {
                "name": name,
                "out_features": layer.out_features,
                "in_features": layer.in_features,
                "out_modes": list(layer.out_modes),
                "in_modes": list(layer.in_modes),
                "ranks": list(layer.ranks),
                "fingerprint": layer.base_fingerprint,
                "dtype": str(layer.cores[0].dtype).replace("torch.", ""),
            }
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "tensornet_version": __version__,
        "method": state["method"],
        "config": state["config"].to_dict(),
        "layers": layers,
    }
    write_adapter_file(path, tensors, meta)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    config: DoTAConfig | LoTRConfig | LoRTAConfig | None = None,
    *,
    method: str | None = None,
) -> AdapterReport:
    """Apply a saved adapter to a fresh base ``model``; outputs match the saved model.

    Parameters
    ----------
    model : nn.Module
        The same base model the adapter was trained on (checked by fingerprint).
    path : str or PathLike
        Folder written by :func:`save_adapter`.
    config : DoTAConfig, LoTRConfig or LoRTAConfig, optional
        If given, must be of the file's method and equal the saved config.
    method : {"dota", "lotr", "lorta"} or None
        Family of the adapter expected in the file (``"dota"`` covers DoTA, DoTA-Random
        and QDoTA; an exact method name such as ``"qdota"`` is accepted too). None: any.

    Raises
    ------
    AdapterMismatchError
        The file is of another method than ``method`` or ``config``, its config differs
        from ``config``, or a layer is missing from ``model`` or has another shape or
        other weights. The model is left untouched.

    Examples
    --------
    >>> import tempfile
    >>> from tensornet.adapters import apply_lorta, load_adapter, save_adapter, tiny_llama
    >>> model = tiny_llama()
    >>> _ = apply_lorta(model)
    >>> folder = tempfile.mkdtemp()
    >>> save_adapter(model, folder)
    >>> load_adapter(tiny_llama(), folder).method
    'lorta'
    >>> load_adapter(tiny_llama(), folder, method="dota")
    Traceback (most recent call last):
    ...
    tensornet.errors.AdapterMismatchError: ... holds a 'lorta' adapter; load_adapter expected a
    'dota' adapter
    """
    tensors, meta = read_adapter_file(path)
    file_method = str(meta.get("method", ""))
    family = _family(file_method)
    if family not in _FAMILIES:
        raise AdapterMismatchError(
            f"{os.fspath(path)!r} holds a {file_method!r} adapter, which this tensornet does "
            f"not know; known: {sorted(_FAMILIES)}"
        )
    if method is not None and method not in (file_method, family):
        raise AdapterMismatchError(
            f"{os.fspath(path)!r} holds a {meta.get('method')!r} adapter; load_adapter "
            f"expected a {method!r} adapter"
        )
    title, config_cls, prepare = _FAMILIES[family]
    if config is not None and not isinstance(config, config_cls):
        raise AdapterMismatchError(
            f"{os.fspath(path)!r} holds a {file_method!r} adapter: a file made for {title} "
            f"loads only into a matching {config_cls.__name__}; got `config` of type "
            f"{type(config).__name__}"
        )
    if prepare is not None:
        return load_additive(model, path, tensors, meta, config_cls, prepare, config)
    saved = DoTAConfig.from_dict(meta["config"])
    if config is not None and config.to_dict() != saved.to_dict():
        raise AdapterMismatchError(
            f"`config` differs from the saved adapter's config: saved {saved.to_dict()}, "
            f"got {config.to_dict()}"
        )
    cfg = saved.replace(target_modules=tuple(lay["name"] for lay in meta["layers"]))
    if getattr(model, _STATE_ATTR, None) is not None:
        raise AdapterMismatchError(
            "`model` already has tensornet adapters; load into a fresh model"
        )
    modules = dict(model.named_modules())
    targets = []
    for lay in meta["layers"]:
        name = lay["name"]
        module = modules.get(name)
        if module is None or not (isinstance(module, nn.Linear) or is_4bit(module)):
            raise AdapterMismatchError(
                f"the adapter's layer {name!r} is not a linear layer of `model`"
            )
        shape = (int(module.out_features), int(module.in_features))
        if shape != (lay["out_features"], lay["in_features"]):
            raise AdapterMismatchError(
                f"layer {name!r} has shape {shape} in `model` but "
                f"{(lay['out_features'], lay['in_features'])} in the adapter: another base model"
            )
        if fingerprint(dense_weight(module)) != lay["fingerprint"]:
            raise AdapterMismatchError(
                f"layer {name!r} of `model` has other weights than the base the adapter was "
                f"trained on (fingerprint mismatch): load it into the same base model"
            )
        targets.append(
            _Target(
                name, module, tuple(lay["out_modes"]), tuple(lay["in_modes"]), tuple(lay["ranks"])
            )
        )
    inits = []
    for lay, t in zip(meta["layers"], targets):
        n = len(lay["out_modes"])
        inits.append(([tensors[f"{t.name}.init.{k}"] for k in range(n)], None, lay["fingerprint"]))
    with torch.no_grad():
        report = _install(model, cfg, targets, inits)
        for name, layer in iter_layers(model, DoTALinear):
            for k, c in enumerate(layer.cores):
                c.copy_(tensors[f"{name}.cores.{k}"].to(device=c.device, dtype=c.dtype))
    _state(model)["config"] = saved
    return report
