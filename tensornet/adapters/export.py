"""Export a tensornet adapter for serving: as a LoRA adapter, or merged into the base.

vLLM and SGLang serve LoRA adapters (and full models), not DoTA's cores. peft converts
any adapter whose layers give a dense update (``get_delta_weight``) to a LoRA of a chosen
rank by a truncated SVD of that update (``peft.convert_to_lora``); :func:`export_lora`
uses it and adds what peft does not report: the relative error of the conversion, layer by
layer, ``||Delta W - B A||_F / ||Delta W||_F``. :func:`export_merged` writes the base model
with the updates added to its weights, a folder plain transformers loads, without
modifying the model in memory (peft's ``merge_and_unload`` would).

Both write their folder atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._atomic import atomic_dir
from ..errors import ConfigError
from .base import base_weights

__all__ = ["LoraExport", "export_lora", "export_merged", "to_lora"]


@dataclass(frozen=True)
class LoraExport:
    """What :func:`to_lora` / :func:`export_lora` made of an adapter.

    Attributes
    ----------
    config : peft.LoraConfig
        The LoRA's config (``lora_alpha == r``: the scale is in the factors).
    ranks : dict
        Layer name -> the LoRA rank it got.
    relative_errors : dict
        Layer name -> ``||Delta W - B A||_F / ||Delta W||_F`` (0 for a zero update), in
        float32: what the conversion loses.
    """

    config: Any
    ranks: dict[str, int]
    relative_errors: dict[str, float]

    @property
    def max_relative_error(self) -> float:
        """The largest relative error over the layers."""
        return max(self.relative_errors.values(), default=0.0)

    def __str__(self) -> str:
        return (f"LoRA of rank {min(self.ranks.values())}..{max(self.ranks.values())} on "
                f"{len(self.ranks)} layers; relative error of the conversion at most "
                f"{self.max_relative_error:.3e}")


def _check_rank(rank: Any) -> int | float:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise ConfigError(f"`rank` must be a positive int or a float in (0, 1]; got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ConfigError(f"`rank` must be a positive int or a float in (0, 1]; got {rank}")
        return int(rank)
    if not (math.isfinite(rank) and 0 < rank <= 1):
        raise ConfigError(
            f"`rank` as a float is the share of the update's energy to keep, in (0, 1]; "
            f"got {rank}"
        )
    return float(rank)


def _layers(model: nn.Module, adapter_name: str) -> dict[str, BaseTunerLayer]:
    peft_config = getattr(model, "peft_config", None)
    if not peft_config or adapter_name not in peft_config:
        known = sorted(peft_config) if peft_config else []
        raise ConfigError(
            f"`adapter_name` {adapter_name!r} is not an adapter of the model; its adapters: "
            f"{known} (export takes a PeftModel)"
        )
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if isinstance(m, BaseTunerLayer)}
    if not layers:
        raise ConfigError("the model has no adapter layers (unloaded?): nothing to export")
    refused = sorted({type(m).__name__ for m in layers.values()
                      if not m.supports_lora_conversion(adapter_name)})
    if refused:
        raise ConfigError(
            f"{', '.join(refused)} layers cannot be exported (a QDoTA layer's base is its "
            f"NF4 residual, so its update is not relative to the base model's weights)"
        )
    if any(m.merged for m in layers.values()):
        raise ConfigError("the model has merged adapters: unmerge_adapter() before exporting")
    return layers


def to_lora(model: nn.Module, *, rank: int | float,
            adapter_name: str = "default") -> tuple[LoraExport, dict[str, torch.Tensor]]:
    """The adapter as a LoRA (peft's ``convert_to_lora``) and the conversion's errors.

    Parameters
    ----------
    model : peft.PeftModel
        A model with a DoTA (not QDoTA), LoTR or LoRTA adapter.
    rank : int or float
        The LoRA rank of every layer, or (a float in (0, 1]) the share of each update's
        energy (squared singular values) to keep, as peft reads it.
    adapter_name : str
        The adapter to convert.

    Returns
    -------
    (LoraExport, dict)
        The report and the LoRA state dict (peft's checkpoint keys).

    Raises
    ------
    ConfigError
        A bad ``rank`` or ``adapter_name``, a method whose layers cannot be converted, a
        rank larger than a layer allows.
    """
    from peft import convert_to_lora

    rank = _check_rank(rank)
    layers = _layers(model, adapter_name)
    if isinstance(rank, int):
        small = min(min(m.in_features, m.out_features) for m in layers.values())
        if rank > small:
            raise ConfigError(f"`rank` {rank} is larger than the smallest adapted layer "
                              f"allows ({small})")
    config, state = convert_to_lora(model, rank, adapter_name=adapter_name)
    ranks, errors = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            a = state.get(f"base_model.model.{name}.lora_A.weight")
            if a is None:
                continue  # peft left the layer out (a zero update)
            b = state[f"base_model.model.{name}.lora_B.weight"]
            delta = layer.get_delta_weight(adapter_name).float()
            norm = torch.linalg.norm(delta)
            err = torch.linalg.norm(delta - b.float() @ a.float())
            ranks[name] = int(a.shape[0])
            errors[name] = float(err / norm) if float(norm) > 0 else 0.0
    return LoraExport(config, ranks, errors), state


def export_lora(model: nn.Module, folder: str | os.PathLike, *, rank: int | float,
                adapter_name: str = "default") -> LoraExport:
    """Write the adapter as a LoRA adapter folder that plain peft (and vLLM) loads.

    The folder holds ``adapter_config.json`` (a ``LoraConfig``) and
    ``adapter_model.safetensors``; ``PeftModel.from_pretrained(base, folder)`` loads it
    without tensornet. See :func:`to_lora` for the parameters.

    Returns
    -------
    LoraExport
        Including the relative error of the conversion per layer.
    """
    from safetensors.torch import save_file

    report, state = to_lora(model, rank=rank, adapter_name=adapter_name)
    with atomic_dir(folder) as tmp:
        report.config.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return report


def export_merged(model: nn.Module, folder: str | os.PathLike, *,
                  adapter_name: str = "default", tokenizer: Any = None) -> Path:
    """Write the base model with the adapter's update added to its weights.

    The folder is a plain transformers model (``AutoModelForCausalLM.from_pretrained``
    loads it without tensornet or peft): each adapted layer's weight is
    ``W0 + Delta W``, computed in float32 (float64 for a float64 base) and stored in the
    base's dtype, as ``merge_and_unload`` computes it; every other weight is the base's.
    The model in memory is not changed.

    Parameters
    ----------
    model : peft.PeftModel
        A model with a DoTA (not QDoTA), LoTR or LoRTA adapter.
    folder : path
        Written atomically; an existing folder is replaced.
    adapter_name : str
        The adapter to merge.
    tokenizer : optional
        Saved into the folder too.

    Returns
    -------
    Path
    """
    layers = _layers(model, adapter_name)
    base = model.get_base_model()
    state = {}
    with torch.no_grad():
        weights = base_weights(base)
        for name, p in weights.items():
            owner, _, leaf = name.rpartition(".")
            layer = layers.get(owner)
            holds = layer is not None and adapter_name in getattr(
                layer, layer.adapter_layer_names[0])
            if holds and leaf == "weight":
                dt = torch.float64 if p.dtype == torch.float64 else torch.float32
                delta = layer.get_delta_weight(adapter_name)
                p = (p.to(dt) + delta.to(p.device, dt)).to(p.dtype)
            state[name] = p.detach()
    with atomic_dir(folder) as tmp:
        base.save_pretrained(str(tmp), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(folder)
