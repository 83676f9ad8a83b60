"""The tuner base of the methods whose factors are shared by several layers (LoTR, LoRTA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .._compat.peft import adapter_names_of
from .base import compute_dtype
from .tuner import TensornetTuner

__all__ = ["SharedStateTuner"]


class SharedStateTuner(TensornetTuner):
    """A tuner whose adapters keep factors on the tuner, shared by several layers.

    LoTR's ``A`` and ``B`` (one pair per kind of layer) and LoRTA's CP factors (one set per
    model) belong to no single layer. They live in the containers named by
    :attr:`shared_containers`, attributes of the tuner (``PeftModel.base_model``) keyed by
    adapter name at the top level, e.g. ``lotr_A = ModuleDict({adapter: ParameterDict({kind:
    A})})``: peft's default key handling then saves each factor once, with the adapter name
    removed (``base_model.lotr_A.q_proj``), and reloads it under any adapter name. The
    layers reference the containers through a plain Python list, so a factor is registered
    (in ``parameters()``, ``state_dict()``) once, on the tuner.

    peft's trainable marking visits only the layers; this class applies the same rules to
    the shared factors: an adapter's factors train while it is active and not in inference
    mode (``set_adapter``), disabling freezes them and enabling makes the active ones
    trainable again (``disable_adapter``), ``set_requires_grad`` and ``delete_adapter``
    act on them, an added non-active adapter starts frozen and adding one leaves the flags
    of the others alone. ``autocast_adapter_dtype`` casts them with the layers' parameters,
    and after a ``low_cpu_mem_usage`` load they follow their layers' device.
    """

    uses_shared_state = True
    #: attribute name -> container type: ``nn.ModuleDict`` (of ``nn.ParameterDict``, one per
    #: adapter) or ``nn.ParameterDict`` (one parameter per adapter)
    shared_containers: ClassVar[dict[str, type[nn.Module]]] = {}

    def before_injection(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        """Add the shared containers the tuner does not have yet."""
        super().before_injection(model, config, adapter_name)
        for name, kind in self.shared_containers.items():
            if self._container(name) is None:
                self.add_module(name, kind())

    def _container(self, name: str) -> nn.Module | None:
        """The tuner's shared container ``name``, if it has one yet.

        Not ``getattr``: peft's ``BaseTuner`` reads an attribute it lacks from the model.
        """
        return dict(self.named_children()).get(name)

    def shared_parameters(self, adapter_name: str) -> list[tuple[nn.Module, str, nn.Parameter]]:
        """``(container, key, parameter)`` of every shared factor of ``adapter_name``."""
        out = []
        for name in self.shared_containers:
            container = self._container(name)
            if container is None or adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Parameter):
                out.append((container, adapter_name, entry))
            else:
                out.extend((entry, key, p) for key, p in entry.items())
        return out

    def _shared_adapters(self) -> list[str]:
        containers = [self._container(n) for n in self.shared_containers]
        return sorted({a for c in containers if c is not None for a in c})

    def _set_shared_grad(self, rule: Any) -> None:
        """``requires_grad = rule(adapter)`` on each adapter's factors (None: leave them)."""
        for adapter in self._shared_adapters():
            flag = rule(adapter)
            if flag is not None:
                for _, _, p in self.shared_parameters(adapter):
                    p.requires_grad_(flag)

    def _drop_shared(self, adapter_name: str) -> None:
        for name in self.shared_containers:
            container = self._container(name)
            if container is not None and adapter_name in container:
                del container[adapter_name]

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Inject as peft does; the other adapters' shared factors keep their flags."""
        before = [
            (p, p.requires_grad)
            for a in self._shared_adapters() for _, _, p in self.shared_parameters(a)
        ]
        super().inject_adapter(model, adapter_name, **kwargs)
        for p, flag in before:
            p.requires_grad_(flag)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate as peft's ``set_adapter`` does, the shared factors included."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._set_shared_grad(lambda a: a in names and not inference_mode)

    def after_enable(self, enabled: bool) -> None:
        """Enabling makes the active adapters' factors trainable again; disabling freezes all."""
        super().after_enable(enabled)
        active = self.active_adapters  # as the layers do: enabling re-activates these
        self._set_shared_grad(lambda a: enabled and a in active)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True
                          ) -> None:
        """Set flags as peft's ``set_requires_grad`` does, the shared factors included."""
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        self._set_shared_grad(lambda a: requires_grad if a in names else None)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete as peft's ``delete_adapter`` does, the shared factors included."""
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        if was_active:  # the layers have made the adapters now active trainable
            active = self.active_adapters
            self._set_shared_grad(lambda a: a in active)

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """Cast as peft does (flags kept), then the shared factors the same way."""
        # peft re-wraps a ParameterDict entry it casts as a new (trainable) Parameter: keep
        # every flag as it was
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        super().cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for n, p in self.model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        if not autocast_adapter_dtype:
            return
        for owner, key, p in self.shared_parameters(adapter_name):
            if p.dtype in (torch.float16, torch.bfloat16):
                owner[key] = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)

    def move_to_base_device(self, adapter_name: str, device: Any = None) -> None:
        """Put the shared factors on their layers' device, in their dtype (as peft's layers do).

        peft asks every module for this after loading with ``low_cpu_mem_usage=True`` (the
        factors then hold the loaded tensors as they were read).
        """
        base = next(
            (m.get_base_layer() for m in self.model.modules()
             if isinstance(m, self.tuner_layer_cls)
             and adapter_name in adapter_names_of(m)),
            None,
        )
        if base is None:
            return
        device = device if device is not None else base.weight.device
        for owner, key, p in self.shared_parameters(adapter_name):
            if p.device.type != "meta":
                owner[key] = nn.Parameter(
                    p.detach().to(device, compute_dtype(base)), requires_grad=p.requires_grad
                )
