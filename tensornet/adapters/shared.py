"""Additive adapters with factors shared across layers: the machinery of LoTR and LoRTA.

Such an adapter leaves the base layer untouched and adds an update:
``y = base(x) + delta(x)``. The shared factors live in ONE module registered on the
model under a fixed attribute (``model.tensornet_lotr``, ``model.tensornet_lorta``), so
they appear once in ``state_dict()`` and ``parameters()`` (what DDP and FSDP expect); each
adapted layer references them through a plain Python list, which ``nn.Module`` does not
register again. Per-layer parameters (LoTR's ``G_l``) are registered on the layer.

A method supplies a ``prepare(model, config, need_weights)`` function that validates
everything and returns a :class:`Prepared`; :func:`install`, :func:`merge_additive`,
:func:`unapply_additive`, :func:`save_additive` and :func:`load_additive` do the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import AdapterMismatchError, ConfigError
from .base import (
    FORMAT_VERSION,
    STATE_ATTR,
    AdapterReport,
    LayerReport,
    count_parameters,
    dense_weight,
    fingerprint,
    iter_layers,
    progress_bar,
    restore_requires_grad,
    set_submodule,
    write_adapter_file,
)

__all__ = [
    "AdditiveLinear",
    "Prepared",
    "check_fresh",
    "check_linear",
    "install",
    "load_additive",
    "merge_additive",
    "report",
    "resolve_config",
    "save_additive",
    "unapply_additive",
]


def resolve_config(config: Any, cls: type, overrides: Mapping[str, Any]) -> Any:
    """``config`` (default ``cls()``) with ``overrides`` applied; refuse another type."""
    if config is not None and not isinstance(config, cls):
        raise ConfigError(
            f"`config` must be a {cls.__name__} or None; got {type(config).__name__}"
        )
    return (config or cls()).replace(**overrides)


class AdditiveLinear(nn.Module):
    """A frozen linear layer plus an update computed from (partly shared) factors.

    Subclasses implement :meth:`delta` (the update applied to an input, never through a
    dense matrix) and :meth:`delta_weight` (the dense update, for merging and tests).

    Attributes
    ----------
    base_layer : nn.Linear
        The pretrained layer, unchanged and frozen.
    shared : nn.Module
        The shared factors (held in a plain list, registered only on the model).
    scale : float
        Multiplies the update.
    """

    def __init__(self, base_layer: nn.Linear, shared: nn.Module, scale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._shared = [shared]  # a plain list: not registered as a submodule here
        self.scale = float(scale)
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.base_fingerprint = ""

    @property
    def shared(self) -> nn.Module:
        """The shared factor module (registered once on the model)."""
        return self._shared[0]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The layer's own trainable parameters (not the base layer's, not shared)."""
        return dict(self.named_parameters(recurse=False))

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The update applied to ``x`` (factor dtype), contracted through the factors."""
        raise NotImplementedError

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # pragma: no cover
        """The dense ``(out, in)`` update ``Delta W`` computed in ``dtype``."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """``W0 + Delta W`` computed in float32 (float64 for a float64 base), base dtype."""
        w0 = self.base_layer.weight
        dt = torch.float64 if w0.dtype == torch.float64 else torch.float32
        return (dense_weight(self.base_layer, dt) + self.delta_weight(dt)).to(w0.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + delta(x)``; the dense update is never formed."""
        y = self.base_layer(x)
        return y + self.delta(x).to(y.dtype)


@dataclass
class Prepared:
    """A validated plan: what an ``apply_*`` will install, checked before any change.

    Attributes
    ----------
    method : str
        ``"lotr"`` or ``"lorta"``.
    container : str
        Attribute of the model that will hold the shared factors.
    targets : list of (str, nn.Module)
        The layers to wrap, in model order.
    tensor_shapes : dict
        Name -> shape of every tensor the adapter file holds (shared factors prefixed by
        ``container + "."``, per-layer ones by the layer name).
    layers : tuple of LayerReport
        The report entries.
    num_params : int
        Trainable parameters, from the core formulas.
    build : callable
        ``build(fingerprints) -> (shared module, {name: AdditiveLinear})``, where
        ``fingerprints`` maps each target name to its base fingerprint.
    """

    method: str
    container: str
    targets: list[tuple[str, nn.Module]]
    tensor_shapes: dict[str, tuple[int, ...]]
    layers: tuple[LayerReport, ...]
    num_params: int
    build: Callable[[Mapping[str, str]], tuple[nn.Module, dict[str, AdditiveLinear]]]
    extra: dict[str, Any] = field(default_factory=dict)


def check_fresh(model: Any) -> None:
    """Refuse a non-module, or a model that already carries tensornet adapters."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
    if getattr(model, STATE_ATTR, None) is not None:
        raise ConfigError(
            "`model` already has tensornet adapters; call merge(model) or unapply(model) first"
        )


def check_linear(name: str, module: nn.Module, method: str, need_weights: bool) -> None:
    """A target must be a plain ``nn.Linear`` (with weights, unless only planning)."""
    if type(module) is not nn.Linear:
        raise ConfigError(
            f"target {name!r} is a {type(module).__name__}; {method} adapts nn.Linear layers"
        )
    if need_weights and module.weight.device.type == "meta":
        raise ConfigError(
            f"target {name!r} is on the meta device (no weights); use plan_{method.lower()}"
            f"(model, ...) to count parameters without weights"
        )


def report(model: nn.Module, prep: Prepared, config: Any, *, planned: bool) -> AdapterReport:
    """The :class:`AdapterReport` of ``prep`` (``planned``: the model is not adapted yet)."""
    trainable, total = count_parameters(model)
    if planned:
        trainable, total = prep.num_params, total + prep.num_params
    extra = {"config": config.to_dict(), **prep.extra}
    return AdapterReport(prep.method, prep.layers, trainable, total, extra)


def install(
    model: nn.Module,
    prep: Prepared,
    config: Any,
    fingerprints: Mapping[str, str] | None = None,
    *,
    progress: bool = False,
) -> AdapterReport:
    """Freeze the model, register the shared factors, swap the targets; return the report."""
    if fingerprints is None:
        fingerprints = {
            name: fingerprint(dense_weight(m))
            for name, m in progress_bar(prep.targets, progress, "fingerprinting")
        }
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        shared, layers = prep.build(fingerprints)
    for p in model.parameters():
        p.requires_grad_(False)
    model.add_module(prep.container, shared)
    for name, layer in layers.items():
        layer.base_fingerprint = fingerprints[name]
        set_submodule(model, name, layer)
    setattr(
        model,
        STATE_ATTR,
        {
            "method": prep.method,
            "config": config,
            "requires_grad": flags,
            "container": prep.container,
        },
    )
    return report(model, prep, config, planned=False)


def _remove(model: nn.Module, state: Mapping[str, Any], replacement: Callable) -> nn.Module:
    for name, layer in list(iter_layers(model, AdditiveLinear)):
        set_submodule(model, name, replacement(layer))
    delattr(model, state["container"])
    delattr(model, STATE_ATTR)
    restore_requires_grad(model, state["requires_grad"])
    return model


@torch.no_grad()
def merge_additive(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Replace each layer by a plain ``nn.Linear`` holding ``W0 + Delta W``."""

    def merged(layer: AdditiveLinear) -> nn.Linear:
        base = layer.base_layer
        weight = layer.merged_weight()
        linear = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=base.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear

    return _remove(model, state, merged)


@torch.no_grad()
def unapply_additive(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Put the untouched base layers back (exactly the original weights)."""
    return _remove(model, state, lambda layer: layer.base_layer)


def save_additive(model: nn.Module, state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the shared factors and per-layer parameters with their metadata."""
    container = state["container"]
    tensors = {
        f"{container}.{k}": v.detach() for k, v in getattr(model, container).state_dict().items()
    }
    layers = []
    for name, layer in iter_layers(model, AdditiveLinear):
        for pname, p in layer.adapter_parameters().items():
            tensors[f"{name}.{pname}"] = p.detach()
        layers.append(
            {
                "name": name,
                "out_features": layer.out_features,
                "in_features": layer.in_features,
                "fingerprint": layer.base_fingerprint,
                "dtype": str(layer.base_layer.weight.dtype).replace("torch.", ""),
            }
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "tensornet_version": __version__,
        "method": state["method"],
        "config": state["config"].to_dict(),
        "container": container,
        "layers": layers,
    }
    write_adapter_file(path, tensors, meta)


def load_additive(
    model: nn.Module,
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    config_cls: type,
    prepare: Callable[..., Prepared],
    config: Any = None,
) -> AdapterReport:
    """Check the file against ``model`` and ``config``, then install and copy the tensors."""
    saved = config_cls.from_dict(meta["config"])
    if config is not None and config.to_dict() != saved.to_dict():
        raise AdapterMismatchError(
            f"`config` differs from the saved adapter's config: saved {saved.to_dict()}, "
            f"got {config.to_dict()}"
        )
    if getattr(model, STATE_ATTR, None) is not None:
        raise AdapterMismatchError(
            "`model` already has tensornet adapters; load into a fresh model"
        )
    try:
        prep = prepare(model, saved, need_weights=True)
    except ConfigError as exc:
        raise AdapterMismatchError(
            f"the adapter in {os.fspath(path)!r} does not fit `model` (another base model?): "
            f"{exc}"
        ) from None
    names = [name for name, _ in prep.targets]
    want = [lay["name"] for lay in meta["layers"]]
    if names != want:
        missing = sorted(set(want) - set(names)) or sorted(set(names) - set(want))
        raise AdapterMismatchError(
            f"the adapter's layers differ from the targets its config selects in `model` "
            f"(another base model?); first differences: {missing[:5]}"
        )
    fingerprints = {}
    for (name, module), lay in zip(prep.targets, meta["layers"]):
        shape = (int(module.out_features), int(module.in_features))
        if shape != (lay["out_features"], lay["in_features"]):
            raise AdapterMismatchError(
                f"layer {name!r} has shape {shape} in `model` but "
                f"{(lay['out_features'], lay['in_features'])} in the adapter: another base model"
            )
        fp = fingerprint(dense_weight(module))
        if fp != lay["fingerprint"]:
            raise AdapterMismatchError(
                f"layer {name!r} of `model` has other weights than the base the adapter was "
                f"trained on (fingerprint mismatch): load it into the same base model"
            )
        fingerprints[name] = fp
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != prep.tensor_shapes:
        diff = sorted(set(got.items()) ^ set(prep.tensor_shapes.items()))
        raise AdapterMismatchError(
            f"the tensors in {os.fspath(path)!r} do not match its config (a damaged or edited "
            f"file?); differences (name, shape): {diff[:5]}"
        )
    out = install(model, prep, saved, fingerprints)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, value in tensors.items():  # keys == prep.tensor_shapes: parameter names
            p = params[key]
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    return out
