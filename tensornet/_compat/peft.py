"""peft: the private hooks of its tuner framework, under names of tensornet's own.

A peft method subclasses ``BaseTuner`` / ``BaseTunerLayer`` and overrides private methods
that peft calls at fixed points: ``_create_and_replace`` to build a layer,
``_unload_and_optionally_merge`` on ``merge_and_unload()`` / ``unload()``,
``_get_adapter_state_dict`` on every save, ``_remap_adapter_state_dict_for_load`` on every
load, ... :class:`TunerHooks` and :class:`LayerHooks` are the only places tensornet names
them. Each override forwards to a method named by tensornet (``create_and_replace``,
``before_unload``, ``before_save`` / ``after_save``, ``check_loaded`` /
``check_remapped``, ...), which the tuners and layers override in turn; each default does
what peft does. A hook peft renames or re-signs is so fixed here, once.

An override peft no longer calls would be silently dead code (a save without the
manifest, a load without its checks), and a read of peft's private state could read a
name peft stopped writing. The tables below (:data:`TUNER_HOOKS`, :data:`TUNER_CALLS`,
:data:`LAYER_HOOKS`, :data:`LAYER_CALLS`, :data:`LAYER_STATE`, :data:`CALLED_BY_NAME`)
list every such name with the parameters tensornet relies on, and
``tests/test_compat_peft.py`` checks each against the installed peft, so that an upgrade
that moves one fails there, naming the shim.

This module imports peft when it is imported (its classes subclass peft's); only
:mod:`tensornet.adapters` imports it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

# A ModuleDict of buffers (DoTA keeps T_init in one per adapter, so that it is saved,
# moved and cast with the layer but never trained). Private module: if it moves, the
# import fails at ``import tensornet.adapters``, loudly.
from peft.tuners._buffer_dict import BufferDict

# _ExcludedModule: what _check_target_module_exists returns for a key that
# ``exclude_modules`` removes (truthy, so it must be told apart from a match). If it
# moves, the import fails; if peft returned something else, excluded modules would be
# validated as targets (test_target_matching_and_exclusion).
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule

__all__ = [
    "selects",
    "CALLED_BY_NAME",
    "LAYER_CALLS",
    "LAYER_HOOKS",
    "LAYER_STATE",
    "TUNER_CALLS",
    "TUNER_HOOKS",
    "BufferDict",
    "LayerHooks",
    "TunerHooks",
    "adapter_names_of",
    "add_enum_member",
    "add_peft_type",
    "is_excluded",
]

#: peft's private ``BaseTuner`` hooks :class:`TunerHooks` overrides, with the parameters
#: peft passes (the first ones; further ones must be optional)
TUNER_HOOKS: dict[str, tuple[str, ...]] = {
    "_create_and_replace": ("peft_config", "adapter_name", "target", "target_name", "parent",
                            "current_key"),
    "_pre_injection_hook": ("model", "config", "adapter_name"),
    "_enable_adapter_layers": ("enabled",),
    "_cast_adapter_dtype": ("adapter_name", "autocast_adapter_dtype"),
    "_unload_and_optionally_merge": ("merge", "progressbar", "safe_merge", "adapter_names"),
    "_get_adapter_state_dict": ("model", "config", "adapter_name", "state_dict",
                                "unwanted_adapter_names"),
    "_remap_adapter_state_dict_for_load": ("model", "config", "adapter_name", "state_dict"),
}
#: peft's private ``BaseTuner`` methods :class:`TunerHooks` calls, with the arguments given
TUNER_CALLS: dict[str, tuple[str, ...]] = {
    "_replace_module": ("parent", "child_name", "new_module", "child"),
    "_check_target_module_exists": ("peft_config", "key"),
    "_remove_adapter_name_from_key": ("key", "adapter_name"),
}
#: peft's private ``BaseTunerLayer`` hooks :class:`LayerHooks` overrides
LAYER_HOOKS: dict[str, tuple[str, ...]] = {
    "_move_adapter_to_device_of_base_layer": ("adapter_name", "device"),
}
#: peft's private ``BaseTunerLayer`` methods called here
LAYER_CALLS: dict[str, tuple[str, ...]] = {
    "_all_available_adapter_names": (),
}
#: instance state of a peft layer that :class:`LayerHooks` sets -> the property reading it
LAYER_STATE: dict[str, str] = {
    "_active_adapter": "active_adapter",
    "_disable_adapters": "disable_adapters",
}
#: hooks peft looks up by name on any object (``hasattr``), not on ``BaseTuner``: name ->
#: the peft functions whose source must still call it (``module:qualified.name``)
CALLED_BY_NAME: dict[str, tuple[str, ...]] = {
    "_enable_peft_forward_hooks": ("peft.peft_model:PeftModel._enable_peft_forward_hooks",),
    # on the tuner as well as on the layers, after a low_cpu_mem_usage load
    "_move_adapter_to_device_of_base_layer": (
        "peft.utils.save_and_load:set_peft_model_state_dict",
    ),
}


def is_excluded(match: Any) -> bool:
    """True where peft's target matching says ``exclude_modules`` removes a module."""
    return isinstance(match, _ExcludedModule)


def adapter_names_of(layer: BaseTunerLayer) -> list[str]:
    """Every adapter name a peft tuner layer holds, in any of its containers."""
    # (peft: what its delete_adapter uses to pick the adapter left active; if it moves,
    # undoing a failed injection and the tuner's device move raise AttributeError)
    return layer._all_available_adapter_names()


def add_enum_member(enum_cls: type[enum.Enum], name: str) -> Any:
    """The member ``name`` (value ``name``) of the ``str`` enum ``enum_cls``, added if new.

    Python's ``Enum`` has no public way to add a member to an existing class; this writes
    the member tables ``Enum`` keeps (``_member_map_``, ``_value2member_map_``,
    ``_member_names_``; CPython 3.10-3.13), so that lookup by value, by name, as an
    attribute and iteration all find it. If those tables change, the test of this shim
    fails (and :func:`tensornet.adapters._registry.peft_type` checks the result).
    """
    member = enum_cls._value2member_map_.get(name)
    if member is not None:
        return member
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def add_peft_type(name: str) -> Any:
    """The ``PeftType`` member ``name``, added to peft's enum if new.

    peft's ``register_peft_method`` accepts only a name its ``PeftType`` enum has, and
    has no way to add one: a method outside peft has to add it.
    """
    from peft.utils.peft_types import PeftType

    return add_enum_member(PeftType, name)


class TunerHooks(BaseTuner):
    """``BaseTuner`` whose private hooks forward to methods named by tensornet.

    Subclasses override the tensornet names; each default does what peft does.
    """

    # -- building ----------------------------------------------------------------------
    def _create_and_replace(self, peft_config: Any, adapter_name: str, target: Any,
                            target_name: str, parent: Any, current_key: str,
                            **optional_kwargs: Any) -> None:
        # (peft: inject_adapter calls it once per matched module, to build or update that
        # module's tuner layer; abstract in BaseTuner, so a rename fails every build)
        self.create_and_replace(peft_config, adapter_name, target, target_name, parent,
                                current_key, **optional_kwargs)

    def create_and_replace(self, config: Any, adapter_name: str, target: Any,
                           target_name: str, parent: Any, current_key: str,
                           **optional_kwargs: Any) -> None:
        """Build the tuner layer of ``target`` (or add the adapter to it), as peft asks."""
        raise NotImplementedError

    def replace_module(self, parent: Any, child_name: str, new_module: Any, child: Any) -> None:
        """Put ``new_module`` in ``child``'s place as peft does (device, state, hooks)."""
        # (peft: the swap every built-in method uses; if it moves, every build fails)
        self._replace_module(parent, child_name, new_module, child)

    @classmethod
    def target_matches(cls, config: Any, key: str) -> Any:
        """The match of module ``key`` against the config's targets and exclusions (peft's rule).

        Truthy for a match; an excluded module is truthy too (:func:`is_excluded`).
        """
        # (peft: the rule inject_adapter selects modules with; tensornet validates the
        # same modules before peft touches any. If it moved, validation would fail with
        # AttributeError; if its rule changed, peft's own matching changes with it)
        return cls._check_target_module_exists(config, key)

    def _pre_injection_hook(self, model: Any, config: Any, adapter_name: str) -> None:
        # (peft: inject_adapter, before the first layer of a new adapter is built; if
        # peft stops calling it, LoTR/LoRTA find no shared containers and fail to build)
        super()._pre_injection_hook(model, config, adapter_name)
        self.before_injection(model, config, adapter_name)

    def before_injection(self, model: Any, config: Any, adapter_name: str) -> None:
        """Called before the layers of a new adapter are built."""

    # -- running -----------------------------------------------------------------------
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> AbstractContextManager:
        # (peft: PeftModel.forward / generate enter it, with the call's arguments, where
        # the tuner has it; returned, not wrapped: one plain call per model call. If peft
        # stops calling it, ``adapter_names`` (mixed batches) silently stops reaching the
        # layers: CALLED_BY_NAME's test)
        return self.forward_context(*args, **kwargs)

    @contextmanager
    def forward_context(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Context of one ``PeftModel.forward`` / ``generate`` call, given its arguments."""
        yield

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        # (peft: enable_adapter_layers(), disable_adapter_layers(), disable_adapter(); if
        # peft stops calling it, LoTR/LoRTA's shared factors keep training while disabled)
        super()._enable_adapter_layers(enabled)
        self.after_enable(enabled)

    def after_enable(self, enabled: bool) -> None:
        """Called after the layers' adapters were enabled or disabled."""

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # (peft: inject_adapter, after building an adapter; if peft stops calling it,
        # LoTR/LoRTA's shared bf16/fp16 factors stay uncast and the layers' flags change)
        self.cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """Upcast the adapter's float16/bfloat16 weights to float32 (peft's rule)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Any = None) -> None:
        # (peft: set_peft_model_state_dict calls it on every module that has it, the tuner
        # included, after a low_cpu_mem_usage load; if peft stops, LoTR/LoRTA's shared
        # factors stay on the device they were read to: CALLED_BY_NAME's test)
        self.move_to_base_device(adapter_name, device)

    def move_to_base_device(self, adapter_name: str, device: Any = None) -> None:
        """Put the adapter's model-level state on its layers' device (nothing by default)."""

    # -- unloading ---------------------------------------------------------------------
    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> Any:
        # (peft: merge_and_unload() and unload() come here; if peft stops, safe_merge
        # checks layer by layer again and QDoTA's unload() is no longer refused)
        self.before_unload(merge=merge, safe_merge=safe_merge, adapter_names=adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge,
            adapter_names=adapter_names,
        )

    def before_unload(self, *, merge: bool, safe_merge: bool,
                      adapter_names: list[str] | None) -> None:
        """Called by ``merge_and_unload()`` / ``unload()`` before anything changes."""

    # -- saving and loading ------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model: Any, config: Any, adapter_name: str,
                                state_dict: Any, unwanted_adapter_names: Any) -> Any:
        # (peft: save_pretrained / get_peft_model_state_dict select the adapter's tensors
        # through it, before the config is written; peft >= 0.21. If peft stops, files are
        # saved without the manifest (loads then skip its digests) and with the base
        # records of whichever model the config object last described)
        cls.before_save(model, config, adapter_name)
        tensors = super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        return cls.after_save(model, config, adapter_name, tensors)

    @classmethod
    def before_save(cls, model: Any, config: Any, adapter_name: str) -> None:
        """Called before the adapter's tensors are selected for saving (config not written)."""

    @classmethod
    def after_save(cls, model: Any, config: Any, adapter_name: str, tensors: Any) -> Any:
        """The tensors to save, given those peft selected (keys still name the adapter)."""
        return tensors

    @classmethod
    def saved_key(cls, key: str, adapter_name: str) -> str:
        """The key a tensor is saved under: peft removes the adapter's name from it."""
        return cls._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: Any, config: Any, adapter_name: str,
                                           state_dict: Any) -> Any:
        # (peft: set_peft_model_state_dict calls it on every load path, before the first
        # load_state_dict; peft >= 0.21. If peft stops, files load unchecked: no manifest,
        # base, shape or finiteness check)
        tensors = cls.check_loaded(model, config, adapter_name, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=tensors
        )
        cls.check_remapped(model, config, adapter_name, remapped)
        return remapped

    @classmethod
    def check_loaded(cls, model: Any, config: Any, adapter_name: str, tensors: Any) -> Any:
        """The tensors read from a file, checked, before peft maps their keys."""
        return tensors

    @classmethod
    def check_remapped(cls, model: Any, config: Any, adapter_name: str, tensors: Any) -> None:
        """Check the tensors under the keys they will be loaded into the model with."""


class LayerHooks(BaseTunerLayer):
    """``BaseTunerLayer`` whose private state and hooks tensornet's layers use by its names."""

    def start_enabled(self) -> None:
        """Start with the adapters enabled (what peft's ``disable_adapters`` reads)."""
        # (peft: the property reads it; the class default is False too, so a rename would
        # only show when a layer is disabled: LAYER_STATE's test)
        self._disable_adapters = False

    def mark_active(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` what ``active_adapter(s)`` returns; flags untouched.

        peft's public ``set_adapter`` also sets ``requires_grad``; a layer being built
        names its first adapter before that adapter's weights exist.
        """
        # (peft: ``active_adapter(s)`` read it; if renamed, a new layer would report
        # peft's default "default" and run the wrong adapter: LAYER_STATE's test)
        self._active_adapter = adapter_name

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Any = None) -> None:
        # (peft: its layers' update_layer and set_peft_model_state_dict call it, to put
        # an adapter's weights on the base layer's device and float dtype; if it is
        # renamed, LoTR's cores lose their requires_grad flags after such a move)
        self.move_to_base_device(adapter_name, device)

    def move_to_base_device(self, adapter_name: str, device: Any = None) -> None:
        """Move the adapter's weights to the base layer's device (and dtype), as peft does."""
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)


def selects(target_modules: Any, key: str) -> bool:
    """True if peft's target rule selects the module named ``key`` for ``target_modules``.

    peft's public ``check_target_module_exists`` takes a whole config; this passes an object
    holding only the fields it reads (in peft 0.21), every one but ``target_modules`` off.
    If peft reads another field, the call raises AttributeError, loudly
    (tests/test_baselines.py compares the rule with the layers ``LoraConfig`` adapts).
    """
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    selection = SimpleNamespace(
        target_modules=target_modules, target_parameters=None, exclude_modules=None,
        modules_to_save=None, layers_to_transform=None, layers_pattern=None,
    )
    return bool(check_target_module_exists(selection, key))
