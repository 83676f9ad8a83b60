"""The layer base of the additive tensornet methods (LoTR, LoRTA): base output plus updates."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..errors import ConfigError

__all__ = ["AdditiveLinear", "mixed_batch", "shift_weight"]

#: peft's name for "no adapter" in a mixed-adapter batch
BASE_NAME = "__base__"


def mixed_batch(
    layer: Any, x: torch.Tensor, adapter_names: Sequence[str],
    adapted: Callable[[torch.Tensor, str], torch.Tensor],
    base: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run peft's mixed-adapter batch: row ``i`` of ``x`` through ``adapter_names[i]`` alone.

    Rows are grouped by name and each group runs as a batch of its own: ``adapted(rows,
    name)`` for an adapter the layer holds, ``base(rows)`` for ``"__base__"`` and for
    names the layer does not hold (peft's LoRA does the same: an adapter that targets
    other layers leaves this one at its base). Each row so gets what a call with only
    its adapter active gives it.
    """
    if layer.merged:
        raise ConfigError(
            f"`adapter_names` (a mixed-adapter batch) with merged adapters "
            f"{layer.merged_adapters}: call unmerge_adapter() first"
        )
    if len(adapter_names) != len(x):
        raise ConfigError(
            f"`adapter_names` must name one adapter (or '__base__') per row of the batch: "
            f"got {len(adapter_names)} names for {len(x)} rows"
        )
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)

    def run(rows: torch.Tensor, name: str) -> torch.Tensor:
        return base(rows) if name == BASE_NAME or not layer._holds(name) else adapted(rows, name)

    if len(groups) == 1:
        return run(x, adapter_names[0])
    out = None
    for name, rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        y = run(x[index], name)
        if out is None:
            out = y.new_empty((len(x), *y.shape[1:]))
        out[index] = y
    return out  # type: ignore[return-value]


@torch.no_grad()
def shift_weight(
    base: nn.Module, delta: torch.Tensor, *, sign: float = 1.0, check: str | None = None
) -> None:
    """``base.weight += sign * delta``, computed in float32 (float64) and stored in its dtype.

    With ``check`` (an adapter name: peft's ``safe_merge``) the sum is checked for NaN/Inf
    first and the weight is left unchanged if it has any.
    """
    w = base.weight.data
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    new = (w.to(dt) + sign * delta.to(dt)).to(w.dtype)
    if check is not None and not torch.isfinite(new).all():
        raise ValueError(
            f"NaNs detected in the merged weights; the adapter {check!r} seems to be broken"
        )
    base.weight.data = new


class AdditiveLinear(nn.Module):
    """A linear tuner layer that adds its adapters' updates to the base layer's output.

    For the methods whose update is applied through its factors, never as a dense matrix
    (LoTR, LoRTA): ``y = base(x) + sum over active adapters of delta(x, adapter)``. A
    subclass is also a peft ``BaseTunerLayer`` (its first ``adapter_layer_names`` entry is
    keyed by adapter) and gives ``delta(x, adapter)`` and ``get_delta_weight(adapter)``
    (the dense update in the base dtype, computed in float32 or more); merging adds the
    latter to the base weight, which is modified nowhere else.
    """

    def _holds(self, adapter: str) -> bool:
        return adapter in getattr(self, self.adapter_layer_names[0])

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: the update is additive, so peft's ``convert_to_lora`` may SVD it."""
        return self._holds(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' ``Delta W`` to the base weight (``safe_merge``: check first)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if self._holds(name):
                shift_weight(base, self.get_delta_weight(name), check=name if safe_merge else None)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take the merged adapters' ``Delta W`` out of the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self._holds(name):
                shift_weight(base, self.get_delta_weight(name), sign=-1.0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x)`` plus the active adapters' updates (none if disabled or merged).

        With ``adapter_names`` (peft's mixed-adapter batches, passed by the tuner's
        forward hooks) each row gets its own adapter's update (:func:`mixed_batch`).
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return mixed_batch(
                self, x, adapter_names,
                lambda rows, name: self._with(rows, (name,), *args, **kwargs),
                lambda rows: self.base_layer(rows, *args, **kwargs),
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._with(x, self.active_adapters, *args, **kwargs)

    def _with(self, x: torch.Tensor, adapters: Sequence[str], *args: Any,
              **kwargs: Any) -> torch.Tensor:
        """``base(x)`` plus the updates of ``adapters`` (those the layer holds)."""
        y = self.base_layer(x, *args, **kwargs)
        for adapter in adapters:
            if self._holds(adapter):
                y = y + self.delta(x, adapter).to(y.dtype)
        return y
