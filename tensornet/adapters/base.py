"""Helpers shared by every tensornet adapter: layer kinds, dense weights, fingerprints, counts.

Nothing here knows a particular parametrization (DoTA, LoTR, ...), and nothing here
duplicates peft's lifecycle (injection, save/load, merge), which the methods use.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "AdapterReport",
    "LayerReport",
    "find_targets",
    "set_submodule",
    "dense_weight",
    "fingerprint",
    "compute_dtype",
    "count_parameters",
    "is_4bit",
]


@dataclass(frozen=True)
class LayerReport:
    """One adapted layer: where, what shape, how it was tensorized, and how well."""

    name: str
    out_features: int
    in_features: int
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    num_params: int
    relative_error: float | None = None


@dataclass(frozen=True)
class AdapterReport:
    """What an adapter did to a model (or would do, for a model on the meta device).

    Attributes
    ----------
    method : str
        ``"dota"``, ``"dota-random"``, ``"qdota"``, ...
    layers : tuple of LayerReport
        One entry per adapted layer.
    trainable_params : int
        Parameters that receive gradients (the adapter's).
    total_params : int
        Parameters of the adapted model (4-bit weights counted by their logical size).
    """

    method: str
    layers: tuple[LayerReport, ...]
    trainable_params: int
    total_params: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def trainable_share(self) -> float:
        """``trainable_params / total_params`` (a fraction; multiply by 100 for %)."""
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.method}: {len(self.layers)} layers, {self.trainable_params:,} trainable "
            f"parameters of {self.total_params:,} ({100 * self.trainable_share:.4f}%)"
        ]
        for lay in self.layers:
            err = "" if lay.relative_error is None else f"  rel.err {lay.relative_error:.4f}"
            lines.append(
                f"  {lay.name}: {lay.out_features}x{lay.in_features} "
                f"{list(lay.out_modes)}x{list(lay.in_modes)} ranks {list(lay.ranks)} "
                f"params {lay.num_params:,}{err}"
            )
        return "\n".join(lines)


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (without importing bitsandbytes)."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def find_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Qualified names of the modules that ``target_modules`` selects (peft's rules).

    A sequence selects a module whose name equals an entry or ends with ``"." + entry``;
    a string is a regular expression that must match the whole name.
    """
    names = []
    for name, _ in model.named_modules():
        if not name:
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            names.append(name)
    if not names:
        sample = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"`target_modules` matched no module of the model; got {target_modules!r}. "
            f"Linear layer names in this model: {sample[:20]}"
        )
    return names


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_4bit(module)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or a 4-bit layer's compute dtype."""
    if is_4bit(module):
        return module.compute_dtype or torch.float32
    return module.weight.dtype


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear layer as a dense tensor (4-bit is dequantized).

    The result is computed in at least float32 unless ``dtype`` is given.
    """
    if is_4bit(module):
        import bitsandbytes.functional as bnbf

        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the
            # first inference forward; dequantize_4bit reads only the canonical layout, so
            # restore it first (as bitsandbytes' own state_dict does)
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        w = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    else:
        w = module.weight.detach()
    target = dtype or (w.dtype if w.element_size() >= 4 else torch.float32)
    return w.to(target)


def fingerprint(weight: torch.Tensor) -> str:
    """Content hash of a weight, independent of its storage dtype up to float32.

    The values are hashed as float32 (float64 weights as float64), so a bfloat16
    checkpoint loaded as float32 has the same fingerprint as the bfloat16 original.
    """
    w = weight.detach()
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32).contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(w.shape), str(w.dtype))).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit weights count by logical size.

    A parameter shared by several modules (tied input and output embeddings) counts once.
    """
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if is_4bit(module) and name == "weight":
                n = module.in_features * module.out_features
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total
