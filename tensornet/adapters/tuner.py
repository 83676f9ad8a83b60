"""The tuner base of every tensornet peft method: validation, base records, undo, shared state.

peft's tuner framework (``PeftConfig``, ``BaseTunerLayer``, ``BaseTuner``) does the
lifecycle: injection, trainable marking, ``save_pretrained`` / ``from_pretrained``, named
adapters, ``disable_adapter``, merge plumbing, ``unload``. This module adds only what peft
does not do and every tensornet method needs:

* **Validate before touching the model.** :meth:`TensornetTuner.inject_adapter` finds
  every target first and checks it (layer type, shapes, the method's own rules, and for
  a saved adapter the base fingerprints); only then does peft swap layers. Should a
  layer fail anyway while being built, every swap of that call is undone, so a failed
  ``get_peft_model`` / ``add_adapter`` / ``load_adapter`` leaves the model as it was.
* **Record the base.** A new adapter's config gets ``base_layers``: for every adapted
  layer its shape, dtype and a content hash of its weight. ``PeftModel.from_pretrained``
  refuses a base whose layers differ, with a message saying which layer and how (another
  dtype gets its own message). A config with ``base_layers`` also tells the method that
  the adapter is being restored: its initial state comes from the weights file, so
  nothing is decomposed or drawn at random again (DoTA's ``T_init`` is read, not
  recomputed, which is what makes a reload exact).
* **Check the weights file** (:mod:`tensornet.adapters.files`, called by
  :meth:`~tensornet.adapters.config.TensornetConfig.from_pretrained` before peft builds
  the adapter).
* **Share state** (:class:`~tensornet.adapters.shared_state.SharedStateTuner`, its own
  module): factors that belong to no single layer (LoTR, LoRTA) live on the tuner, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._compat.peft import TunerHooks, adapter_names_of, is_excluded
from ..errors import AdapterFileError, AdapterMismatchError, ConfigError, NonFiniteError
from .base import (
    FINGERPRINT_VERSION,
    _legacy_fingerprint,
    base_fingerprint,
    compute_dtype,
    dense_weight,
    fingerprint,
)
from .config import TensornetConfig
from .files import MANIFEST_KEY, check_state, make_manifest
from .mixed import MixedBatches, adapters_of

__all__ = ["Target", "TensornetTuner"]


#: The fields of a target's record every method has; the others are the method's own.
_BASE_FIELDS = ("shape", "dtype", "fingerprint")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Target:
    """One layer an adapter will adapt, validated."""

    key: str
    module: nn.Module  # the base layer (the original, or the base of a tuner layer)
    index: int  # position among the adapter's targets, in model order
    record: dict[str, Any]


class TensornetTuner(MixedBatches, TunerHooks):
    """peft's ``BaseTuner`` with validation before injection and undo on failure.

    peft's private hooks reach it under tensornet's names (``tensornet._compat.peft.
    TunerHooks``): ``create_and_replace``, ``forward_context``, ``before_unload``,
    ``before_save`` / ``after_save``, ``check_loaded`` / ``check_remapped``, ...
    """

    #: the layer class of the method (peft's ``tuner_layer_cls``)
    tuner_layer_cls: type[BaseTunerLayer]
    #: module types the method adapts, for the error message
    supported_types: tuple[str, ...] = ("nn.Linear",)

    # -- what a method supplies -------------------------------------------------------
    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str,
                 **kwargs: Any) -> None:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            # peft's BaseTuner would write the new config into the PeftModel's own
            # peft_config (it reads attributes through to the wrapped model) before
            # anything can fail: refused first
            raise ConfigError(
                f"the model is already a PeftModel (adapters {sorted(model.peft_config)}); "
                f"PeftModel.from_pretrained / get_peft_model take the base model. Add a "
                f"saved adapter to it with model.load_adapter(folder, adapter_name=...) "
                f"or a new one with model.add_adapter(name, config)"
            )
        super().__init__(model, peft_config, adapter_name, **kwargs)

    @classmethod
    def check_target(cls, model: nn.Module, target: Target, config: TensornetConfig) -> None:
        """Raise ConfigError if the method cannot adapt ``target`` (model still untouched).

        May add what it works out to ``target.record`` (saved in ``base_layers``).
        """

    @classmethod
    def check_targets(cls, model: nn.Module, targets: list[Target], config: Any) -> None:
        """Checks across all targets (shared factors need consistent layers)."""

    @classmethod
    def count(cls, model: nn.Module, targets: list[Target], config: Any) -> tuple:
        """``(layer reports, trainable parameters, extra)`` of the adapter on ``targets``."""
        raise NotImplementedError

    def build_layer(self, config: Any, adapter_name: str, target: nn.Module,
                    key: str) -> nn.Module | None:
        """The method's layer around ``target`` (module ``key``) with the new adapter.

        None when ``target`` is such a layer already: the adapter is added to it.
        """
        raise NotImplementedError

    def _drop_shared(self, adapter_name: str) -> None:
        """Remove the adapter's model-level (shared) state, if the method has any."""

    # -- the framework ------------------------------------------------------------------
    def create_and_replace(self, config: Any, adapter_name: str, target: nn.Module,
                           target_name: str, parent: nn.Module, current_key: str,
                           **optional_kwargs: Any) -> None:
        """Build the layer of ``target`` (:meth:`build_layer`) and put it in its place."""
        new = self.build_layer(config, adapter_name, target, current_key)
        if new is None:  # the adapter went into the layer ``target`` already is
            return
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an added adapter is not trainable until activated
        self.replace_module(parent, target_name, new, target)

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        """True for a layer type the method adapts."""
        return type(module) is nn.Linear

    @classmethod
    def matched_targets(cls, model: nn.Module, config: TensornetConfig) -> list[tuple[str, Any]]:
        """``(key, module)`` of every module ``config`` selects, as peft will match them."""
        tuner_keys = [k + "." for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        out = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(p) for p in tuner_keys):
                continue
            hit = cls.target_matches(config, key)
            if hit and not is_excluded(hit):
                out.append((key, module))
        return out

    @classmethod
    def validate(
        cls, model: nn.Module, config: TensornetConfig, *, restoring: bool = False,
        need_weights: bool = True,
    ) -> list[Target]:
        """Every target of ``config`` in ``model``, checked; nothing is changed.

        Raises
        ------
        ConfigError
            A target the method cannot adapt, or none at all.
        AdapterMismatchError
            ``restoring`` a saved adapter and ``model`` is not the base it was trained on.
        """
        found = cls.matched_targets(model, config)
        if not found:
            names = sorted(
                {k.rsplit(".", 1)[-1] for k, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise ConfigError(
                f"`target_modules` matched no module of the model; got {config.target_modules!r}. "
                f"Linear layer names in this model: {names[:20]}"
            )
        targets = []
        for index, (key, module) in enumerate(found):
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not cls.is_supported(base):
                kind = type(base).__name__
                raise ConfigError(
                    f"target {key!r} is a {kind}; {config.method} adapts "
                    f"{' and '.join(cls.supported_types)} layers"
                )
            if isinstance(module, BaseTunerLayer) and module.merged:
                raise ConfigError(
                    f"target {key!r} has merged adapters {module.merged_adapters}; call "
                    f"unmerge_adapter() before adding another adapter"
                )
            shared = _sharers(model, key, base)
            if shared:
                raise ConfigError(
                    f"target {key!r} shares its weight with {shared[0]!r} (tied weights, "
                    f"e.g. tie_word_embeddings): merging an adapter into it would change "
                    f"{shared[0]!r} too; leave {key!r} out of `target_modules`, or untie the "
                    f"weights first (give the layer a copy of its own)"
                )
            record = {
                "shape": [int(base.out_features), int(base.in_features)],
                "dtype": _dtype_name(compute_dtype(base)),
            }
            targets.append(Target(key, base, index, record))
        for t in targets:
            cls.check_target(model, t, config)
        cls.check_targets(model, targets, config)
        if restoring:
            cls._check_same_base(targets, config)
        elif need_weights:
            for t in targets:
                if t.module.weight.device.type == "meta":
                    raise ConfigError(
                        f"target {t.key!r} is on the meta device (no weights); count the "
                        f"adapter with tensornet.adapters.plan(model, config) instead"
                    )
                t.record["fingerprint"] = fingerprint(dense_weight(t.module))
        return targets

    @classmethod
    def _check_same_base(cls, targets: list[Target], config: TensornetConfig) -> None:
        saved = config.base_layers
        keys = [t.key for t in targets]
        if sorted(keys) != sorted(saved):
            missing = sorted(set(saved) - set(keys))
            extra = sorted(set(keys) - set(saved))
            raise AdapterMismatchError(
                f"the adapter was trained on other layers than `target_modules` selects in this "
                f"model (another base model?): in the adapter only {missing[:3]}, in the model "
                f"only {extra[:3]}"
            )
        for t in targets:
            rec = saved[t.key]
            if list(rec.get("shape", [])) != t.record["shape"]:
                raise AdapterMismatchError(
                    f"layer {t.key!r} is {t.record['shape'][0]}x{t.record['shape'][1]} in this "
                    f"model but {rec.get('shape')} in the adapter: another base model"
                )
            saved_fp = str(rec.get("fingerprint"))
            version = saved_fp.partition(":")[0] if ":" in saved_fp else None
            other_dtype = rec.get("dtype") != t.record["dtype"]
            if other_dtype and version is None:
                # the legacy digest is of the values in the saved dtype; a v2 fingerprint
                # is the same for float32, bfloat16 and float64 copies of one base
                raise AdapterMismatchError(
                    f"layer {t.key!r} is {t.record['dtype']} in this model but the adapter was "
                    f"trained on a {rec.get('dtype')} base: load the base model in "
                    f"{rec.get('dtype')} (the weights' values differ between dtypes)"
                )
            for name, value in t.record.items():  # what check_target(s) worked out
                if name not in _BASE_FIELDS and name in rec and rec[name] != value:
                    raise AdapterMismatchError(
                        f"layer {t.key!r} has {name} {value!r} in this model but {rec[name]!r} "
                        f"in the adapter: another base model"
                    )
            if t.module.weight.device.type == "meta":
                continue  # nothing to compare; from_pretrained with low_cpu_mem_usage
            weight = dense_weight(t.module)
            fp = fingerprint(weight)
            if version not in (None, FINGERPRINT_VERSION):
                raise AdapterMismatchError(
                    f"layer {t.key!r}: the adapter's base fingerprint has format "
                    f"{version!r}, which this tensornet does not know (it writes "
                    f"{FINGERPRINT_VERSION!r}); upgrade tensornet to load this adapter"
                )
            # an adapter saved before v2 holds the legacy digest (no prefix): checked as such
            same = saved_fp == (fp if version else _legacy_fingerprint(weight))
            if not same:
                hint = (f"; this model's layer is {t.record['dtype']}, the adapter's base was "
                        f"{rec.get('dtype')}: float32, bfloat16 and float64 copies of a base "
                        f"match, a float16 copy does not" if other_dtype else "")
                raise AdapterMismatchError(
                    f"layer {t.key!r} of this model has other weights than the base the "
                    f"adapter was trained on (fingerprint mismatch): load it into the same base "
                    f"model{hint}"
                )
            t.record["fingerprint"] = fp

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Validate every target, then let peft inject; undo everything if a layer fails.

        ``config.base_layers`` is written for a new adapter. A config read from a saved
        adapter (:meth:`TensornetConfig.from_pretrained`) is *restored*: its base is
        checked against the fingerprints and the method builds placeholders that the
        weights file fills (as it does with ``low_cpu_mem_usage=True``, on meta).
        """
        # peft keeps the caller's config object (its tests check the identity), and the
        # caller may pass it to get_peft_model again for another model: the base records
        # are kept per adapter on the tuner and written into the config when it is saved
        config = self.peft_config[adapter_name]
        holders = [k for k, m in model.named_modules()
                   if isinstance(m, BaseTunerLayer) and adapter_name in adapters_of(m)]
        if holders:
            raise ConfigError(
                f"the model already carries an adapter named {adapter_name!r} (in "
                f"{holders[0]!r}, ...): a second get_peft_model would re-initialise it in "
                f"place, losing its training; add another one with "
                f"peft_model.add_adapter(name, config) under a new name, or load one with "
                f"load_adapter"
            )
        restoring = bool(getattr(config, "_restoring", False) and config.base_layers)
        targets = self.validate(model, config, restoring=restoring)
        identity = base_fingerprint(model)  # every weight of the base, not only the targets
        if restoring and None not in (identity, config.base_fingerprint) and (
            identity != config.base_fingerprint
        ):
            raise AdapterMismatchError(
                f"this model's weights outside the adapted layers (embeddings, norms, "
                f"non-target layers, lm_head) differ from those of the base the adapter "
                f"was trained on (base fingerprint {identity}, the adapter's "
                f"{config.base_fingerprint}): load it into the same base model"
            )
        self._targets = {t.key: t for t in targets}
        self._placeholders = restoring or low_cpu_mem_usage
        with _undo_on_error(self, model, adapter_name):
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        records = config.base_layers if restoring else {t.key: t.record for t in targets}
        if not hasattr(self, "_base_records"):
            self._base_records: dict[str, dict[str, Any]] = {}
            self._base_identity: dict[str, str | None] = {}
        self._base_records[adapter_name] = config.base_layers = records
        if not restoring or config.base_fingerprint is None:
            config.base_fingerprint = identity
        self._base_identity[adapter_name] = config.base_fingerprint
        config._restoring = False  # one load; the config now describes this model's adapter
        if self._placeholders:  # the weights must come from a file before the model runs
            self._awaiting_weights().add(adapter_name)
        del self._targets, self._placeholders

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused: combining adapters is peft's LoRA feature, not implemented here."""
        raise ConfigError(
            f"add_weighted_adapter is not implemented for {type(self).__name__}: tensornet's "
            f"methods do not combine trained adapters yet; merge_adapter(adapter_names=[...]) "
            f"adds several adapters' updates to the base"
        )

    # -- merges: all or nothing ------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None,
                      safe_merge: bool = False) -> None:
        """As peft's; with ``safe_merge`` every layer is checked before any is merged."""
        if safe_merge:
            self._check_merges(adapter_names)
        super().merge_adapter(adapter_names, safe_merge=safe_merge)

    def before_unload(self, *, merge: bool, safe_merge: bool,
                      adapter_names: list[str] | None) -> None:
        """``merge_and_unload(safe_merge=True)`` checks every layer before merging any."""
        if merge and safe_merge:
            self._check_merges(adapter_names)

    def _check_merges(self, adapter_names: list[str] | None) -> None:
        """Raise NonFiniteError if merging would give any layer NaN/Inf weights.

        peft's ``safe_merge`` checks each layer as it merges it, so a broken last layer
        leaves the earlier ones merged; this runs first, over every layer (one layer's
        merged weight at a time, in the dtype it would be stored in), and nothing is
        merged if one fails.
        """
        with torch.no_grad():
            for key, module in self.model.named_modules():
                if not isinstance(module, BaseTunerLayer) or not hasattr(
                        module, "get_delta_weight"):
                    continue
                names = module.active_adapters if adapter_names is None else adapter_names
                names = [n for n in names
                         if n in adapters_of(module) and n not in module.merged_adapters]
                if not names:
                    continue
                base = module.get_base_layer()
                weight = dense_weight(base, torch.float32)
                for name in names:
                    weight = weight + module.get_delta_weight(name).float()
                    if not torch.isfinite(weight.to(compute_dtype(base))).all():
                        raise NonFiniteError(
                            f"NaNs detected in the merged weights. The adapter {name} seems "
                            f"to be broken (layer {key!r}); nothing was merged: safe_merge "
                            f"checks every layer before merging any"
                        )

    @classmethod
    def before_save(cls, model: nn.Module, config: Any, adapter_name: str) -> None:
        """Write the adapter's base records to the config, before peft selects its tensors.

        ``save_pretrained`` gets here before it writes the config, so the saved
        ``base_layers`` always describe the base of the model being saved, even when the
        caller's config object was used for another model since.
        """
        tuner = getattr(model, "base_model", model)
        records = getattr(tuner, "_base_records", {}).get(adapter_name)
        if records is not None:
            config.base_layers = records
            config.base_fingerprint = tuner._base_identity.get(adapter_name)

    @classmethod
    def after_save(cls, model: nn.Module, config: Any, adapter_name: str,
                   tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's tensors as peft selected them, plus the manifest.

        The manifest (:mod:`tensornet.adapters.files`): digests of the tensors under the
        keys they are saved with, and the base's fingerprint; verified on every load.
        """
        saved = {cls.saved_key(k, adapter_name): v for k, v in tensors.items()}
        tensors[MANIFEST_KEY] = make_manifest(saved, method=config.method,
                                              base=config.base_fingerprint)
        return tensors

    @classmethod
    def check_loaded(cls, model: nn.Module, config: Any, adapter_name: str,
                     tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check the tensors on their way in (every peft load path), before peft's remap.

        ``set_peft_model_state_dict`` gets here before the first ``load_state_dict``,
        for a new adapter and for an existing name alike (peft reads no config then):
        the manifest's digests and base fingerprint, and every tensor must be one of the
        adapter's own (:meth:`check_remapped`), with its shape, floating and finite. A
        refusal leaves the model as it was.
        """
        tuner = getattr(model, "base_model", None)
        base = getattr(tuner, "_base_identity", {}).get(adapter_name)
        where = f"the weights loaded into adapter {adapter_name!r}"
        return check_state(tensors, where=where, method=config.method,
                           prefix=cls.prefix, base=base)

    @classmethod
    def check_remapped(cls, model: nn.Module, config: Any, adapter_name: str,
                       remapped: dict[str, torch.Tensor]) -> None:
        """Every tensor, under the key it will be loaded with, is the adapter's own, in shape."""
        where = f"the weights loaded into adapter {adapter_name!r}"
        own = model.state_dict(keep_vars=True)
        named = f".{adapter_name}"  # the adapter's tensors carry its name as a component
        for key, value in remapped.items():
            target = own.get(key, own.get(key.removeprefix("base_model.model.")))
            mine = (key.endswith(named) or named + "." in key) and (
                f".{cls.prefix}" in key or ".modules_to_save." in key
            )
            if target is None or not mine:
                raise AdapterFileError(
                    f"{where} hold tensor {key!r}, which is not a tensor of that adapter (a "
                    f"base model's weight there would overwrite the model's): an adapter "
                    f"file holds the adapter and nothing else; nothing was loaded"
                )
            if tuple(target.shape) != tuple(value.shape):
                raise AdapterFileError(
                    f"{where}: tensor {key!r} has shape {list(value.shape)}, the adapter in "
                    f"the model has {list(target.shape)} (another rank or base?); nothing "
                    f"was loaded"
                )

    def _awaiting_weights(self) -> set[str]:
        """Adapters built as placeholders whose weights no state-dict load has brought yet.

        While the set is not empty, the model refuses to run (a forward pre-hook on it):
        placeholders are zeros, and a model with zero cores would neither compute the saved
        adapter nor train.
        """
        if not hasattr(self, "_awaiting"):
            self._awaiting: set[str] = set()
            self.register_load_state_dict_post_hook(_weights_arrived)
            self.model.register_forward_pre_hook(self._refuse_placeholders)
        return self._awaiting

    def _refuse_placeholders(self, module: nn.Module, args: Any) -> None:
        if self._awaiting:
            raise ConfigError(
                f"adapter(s) {sorted(self._awaiting)} were built for a saved adapter (a config "
                f"from {type(self).__name__.removesuffix('Model')}Config.from_pretrained, or "
                f"low_cpu_mem_usage=True) and hold placeholder weights that were never "
                f"loaded: load them with PeftModel.from_pretrained(base, folder) or "
                f"model.load_adapter(folder, name), or pass a new config to train a new adapter"
            )

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the adapter (peft's ``delete_adapter``), plus the adapter's model-level state."""
        super().delete_adapter(adapter_name)
        self._drop_shared(adapter_name)
        getattr(self, "_base_records", {}).pop(adapter_name, None)
        getattr(self, "_base_identity", {}).pop(adapter_name, None)
        if hasattr(self, "_awaiting"):
            self._awaiting.discard(adapter_name)


def _weights_arrived(tuner: TensornetTuner, incompatible_keys: Any) -> None:
    """State-dict post-hook: an awaited adapter none of whose tensors is missing has arrived."""
    missing = [k for k in incompatible_keys.missing_keys if tuner.prefix in k]
    for name in list(tuner._awaiting):
        if not any(f".{name}." in k or k.endswith(f".{name}") for k in missing):
            tuner._awaiting.discard(name)


class _undo_on_error:
    """Context manager: if the body raises, put the model's modules and flags back."""

    def __init__(self, tuner: TensornetTuner, model: nn.Module, adapter_name: str) -> None:
        self.tuner = tuner
        self.model = model
        self.adapter_name = adapter_name

    def __enter__(self) -> None:
        self.modules = dict(self.model.named_modules())
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            return
        with torch.no_grad():
            for name, original in self.modules.items():
                if not name:
                    continue
                parent_name, _, child = name.rpartition(".")
                try:
                    parent = self.model.get_submodule(parent_name) if parent_name else self.model
                except AttributeError:
                    continue
                if getattr(parent, child, None) is not original:
                    setattr(parent, child, original)
            for module in self.model.modules():
                if isinstance(module, BaseTunerLayer) and self.adapter_name in (
                    adapter_names_of(module)
                ):
                    module.delete_adapter(self.adapter_name)
            self.tuner._drop_shared(self.adapter_name)
            for p, flag in self.flags:
                p.requires_grad_(flag)


def _sharers(model: nn.Module, key: str, base: nn.Module) -> list[str]:
    """Qualified names of the other parameters that are ``base``'s weight (tied weights)."""
    weight = getattr(base, "weight", None)
    if weight is None:
        return []
    prefix = key + "."
    return [name for name, p in model.named_parameters(remove_duplicate=False)
            if p is weight and not name.startswith(prefix)]

