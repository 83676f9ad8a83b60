"""Mixed-adapter batches, the tuner's side: peft's ``adapter_names`` per row of a batch.

``PeftModel.forward`` / ``generate`` hand their call's arguments to the tuner's forward
context (``tensornet._compat.peft.TunerHooks.forward_context``); :class:`MixedBatches`
checks ``adapter_names`` there, by peft's rules and with tensornet's errors, and passes
the names to every tensornet layer for that one call. What a layer does with them is in
:func:`tensornet.adapters.layer.mixed_batch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import ConfigError

__all__ = ["MixedBatches", "adapters_of"]


def adapters_of(layer: BaseTunerLayer) -> Any:
    """The adapter names a tuner layer holds (its first per-adapter container's keys)."""
    names = getattr(layer, "adapter_layer_names", ())
    return getattr(layer, names[0], {}) if names else {}


class MixedBatches:
    """The forward context of a tensornet tuner (a mixin before peft's ``BaseTuner``)."""

    model: nn.Module
    training: bool
    tuner_layer_cls: type[BaseTunerLayer]

    @contextmanager
    def forward_context(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Pass peft's per-call arguments to the layers (``PeftModel.forward`` / ``generate``).

        ``adapter_names`` (one adapter name, or ``"__base__"``, per row of the batch):
        each row runs through its adapter alone, as peft's LoRA does; every tensornet
        layer gets the names through a forward pre-hook for the duration of the call
        (:func:`tensornet.adapters.layer.mixed_batch`). In eval mode only, as in peft;
        QDoTA is refused (its base layer is the NF4 residual, not the base model's).
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        names = self._mixed_names(adapter_names, kwargs.get("num_beams"))
        handles = []
        try:
            for module in self.model.modules():
                if isinstance(module, self.tuner_layer_cls):
                    handles.append(module.register_forward_pre_hook(
                        partial(self._inject_adapter_names, adapter_names=names), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _mixed_names(self, adapter_names: Any, num_beams: Any) -> list[str]:
        """``adapter_names`` checked (peft's rules and messages, tensornet's errors), per row."""
        from .layer import BASE_NAME

        if self.training:
            raise ConfigError(
                "`adapter_names` (a mixed-adapter batch) is for inference: call model.eval() "
                "first (peft refuses it in training mode too)"
            )
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ConfigError(
                f"`adapter_names` must be a list of adapter names (or '__base__'), one per row; "
                f"got {adapter_names!r}"
            )
        layers = [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]
        if any(getattr(m, "quantized", False) for m in layers):
            from .dota.layer import QDOTA_MIXED_BATCH

            raise ConfigError(QDOTA_MIXED_BATCH)
        known = {a for m in layers for a in adapters_of(m)}
        unknown = sorted({n for n in adapter_names if n != BASE_NAME} - known)
        if unknown:
            raise ConfigError(
                f"`adapter_names` names adapter(s) {unknown} that the model does not have; its "
                f"adapters: {sorted(known)}, or '{BASE_NAME}' for the base model"
            )
        names = list(adapter_names)
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats each row per beam
            names = [n for n in names for _ in range(num_beams)]
        return names

    @staticmethod
    def _inject_adapter_names(module: nn.Module, args: Any, kwargs: dict[str, Any], *,
                              adapter_names: list[str]) -> tuple[Any, dict[str, Any]]:
        """Forward pre-hook: pass ``adapter_names`` to a tensornet layer's forward."""
        kwargs["adapter_names"] = adapter_names
        return args, kwargs
