"""The config base of every tensornet peft method, and the checks its fields share.

A method's config (``DoTAConfig``, ``LoTRConfig``, ``LoRTAConfig``) is a peft
``PeftConfig`` dataclass with the fields of :class:`TensornetConfig` (peft's target
selection, ``modules_to_save``, ``init_weights``) plus ``base_layers``: the record of the
base each adapter was built on (shape, dtype and fingerprint of every adapted layer),
written by the tuner and saved in ``adapter_config.json``. Reading a saved config
(:meth:`TensornetConfig.from_pretrained`, which peft calls before it builds the adapter)
also checks the weights file beside it (:func:`~tensornet.adapters.files.check_adapter_file`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peft.config import PeftConfig

from .._atomic import write_text_atomic
from ..errors import AdapterFileError, ConfigError
from ..method_table import LLAMA_TARGETS
from ._registry import peft_type
from .files import (
    MANIFEST_KEY,
    WEIGHTS_NAME,
    check_adapter_file,
    manifest_digest,
    read_adapter_tensors,
    weights_file,
    write_model_card,
)

__all__ = [
    "LLAMA_TARGETS",
    "MODEL_PREFIX",
    "TUNER_PREFIX",
    "TensornetConfig",
    "check_positive_int",
    "check_scale",
    "check_seed",
]


#: Keys of the saved tensors start with this (``PeftModel`` -> ``BaseTuner`` -> model).
MODEL_PREFIX = "base_model.model."
TUNER_PREFIX = "base_model."


@dataclass
class TensornetConfig(PeftConfig):
    """Fields every tensornet method has (see the method configs for the rest).

    Parameters
    ----------
    target_modules : list of str or str, optional
        peft's rule: a list selects a module whose qualified name equals an entry or ends
        with ``"." + entry``; a string is a regular expression matched against the whole
        name. Default: the method's own (the paper's q, k, v, up, down for DoTA).
    exclude_modules : list of str or str, optional
        Modules never adapted, by the same rule.
    modules_to_save : list of str, optional
        Other modules to train fully and store in the adapter file (peft's meaning).
    init_weights : bool
        True (default): the adapted model computes exactly what the base computed. False:
        start from a perturbed adapter (peft's convention, used by its tests to see that
        merge, disable and save act on something).
    base_layers : dict, optional
        Filled in by tensornet when the adapter is created: for every adapted layer its
        ``shape``, ``dtype`` and ``fingerprint`` (a hash of the weight's values). Leave
        it empty; a config that has it describes a trained adapter to restore.
    base_fingerprint : str, optional
        Filled in by tensornet: the fingerprint of the whole base model (every weight,
        :func:`~tensornet.adapters.base.base_fingerprint`). Leave it None.
    adapter_digest : str, optional
        Written by ``save_pretrained``: the SHA-256 of the weights file's manifest, which
        ties this config to the weights saved with it. Leave it None.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    base_layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_fingerprint: str | None = None
    adapter_digest: str | None = None

    #: what a method's config class sets (class attributes, not fields): the member of
    #: peft's ``PeftType`` it adds, the prefix of its parameters' names, its default targets
    peft_name: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    default_targets: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is None:
            self.target_modules = list(self.default_targets)
        self.target_modules = _check_targets(self.target_modules, "target_modules")
        if self.exclude_modules is not None:
            self.exclude_modules = _check_targets(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            m = self.modules_to_save
            if isinstance(m, str) or not all(isinstance(t, str) and t for t in m):
                raise ConfigError(
                    f"`modules_to_save` must be a list of module names; got {m!r}"
                )
            self.modules_to_save = list(m)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"`init_weights` must be True or False; got {self.init_weights!r}")
        if not isinstance(self.base_layers, Mapping):
            raise ConfigError(
                f"`base_layers` is written by tensornet (leave it empty); got {self.base_layers!r}"
            )
        for name in ("base_fingerprint", "adapter_digest"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(
                    f"`{name}` is written by tensornet (leave it None); got "
                    f"{getattr(self, name)!r}"
                )
        if self.peft_name:
            self.peft_type = peft_type(self.peft_name)

    # -- what a method supplies -------------------------------------------------------
    @property
    def method(self) -> str:
        """The method's name in tensornet's table (``"dota"``, ``"qdota"``, ...)."""
        raise NotImplementedError

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape of every tensor of the saved adapter (from ``base_layers``)."""
        raise NotImplementedError

    # -- peft hooks -----------------------------------------------------------------
    def replace(self, **overrides: Any) -> TensornetConfig:
        """A copy with ``overrides`` applied; the config itself is left unchanged.

        Raises
        ------
        ConfigError
            If an override names no field of the config.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown {type(self).__name__} field(s) {unknown}; valid fields: "
                f"{sorted(n for n in names if n not in _PEFT_FIELDS)}"
            )
        return dataclasses.replace(self, **overrides)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """As peft's, written atomically and tied to the weights beside it; then the model card.

        peft's ``PeftModel.save_pretrained`` writes the weights file, then calls this.
        The config records the digest of the weights' manifest (``adapter_digest``), so
        the pair is verified on load, and it replaces the old ``adapter_config.json`` in
        one rename: a crash leaves the old config or the new one, never a torn file (and
        an old config beside new weights is refused on load by the digest).
        """
        folder = Path(os.fspath(save_directory))
        folder.mkdir(parents=True, exist_ok=True)
        digest = _weights_digest(folder)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".tensornet-config-") as tmp:
            super().save_pretrained(tmp, **kwargs)  # peft's serialization, then ours
            record = json.loads((Path(tmp) / CONFIG_NAME).read_text(encoding="utf-8"))
        record["adapter_digest"] = digest
        write_text_atomic(folder / CONFIG_NAME, json.dumps(record, indent=2, sort_keys=True))
        write_model_card(folder, self)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> TensornetConfig:
        """Read the config (peft's loader), plus a check of the weights file next to the config.

        peft calls this before it builds the adapter, so a damaged file is refused while
        the model is still untouched.
        """
        folder = Path(os.fspath(pretrained_model_name_or_path))
        if subfolder:
            folder = folder / subfolder
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)
        except (AdapterFileError, OSError):
            raise
        except Exception as exc:  # JSONDecodeError, KeyError, TypeError, ConfigError, ...
            raise AdapterFileError(
                f"{folder / CONFIG_NAME} is not a valid {cls.__name__} "
                f"({type(exc).__name__}: {exc}); it is damaged or was edited: save the "
                f"adapter again"
            ) from None
        if folder.is_dir():  # a local folder (peft also reads from the Hub)
            file = weights_file(folder)
            if file is None:
                raise AdapterFileError(
                    f"{folder} holds an adapter_config.json but no {WEIGHTS_NAME}: the "
                    f"adapter's weights are missing (save it again with save_pretrained)"
                )
            try:
                expected = config.expected_tensors()
            except Exception as exc:  # a base_layers record that was edited
                raise AdapterFileError(
                    f"{folder / CONFIG_NAME}: its base_layers do not describe an adapter "
                    f"({type(exc).__name__}: {exc}); it is damaged or was edited"
                ) from None
            check_adapter_file(
                file, expected, prefix=cls.prefix, method=config.method,
                extra=lambda key: saves_module(key, config.modules_to_save),
                digest=config.adapter_digest,
            )
        config._restoring = True  # not a field: never saved, cleared by the injection
        return config


_PEFT_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)} | {
    "base_layers", "base_fingerprint", "adapter_digest"}
#: peft's config file name (``peft.utils.CONFIG_NAME``).
CONFIG_NAME = "adapter_config.json"


def _weights_digest(folder: Path) -> str | None:
    """The ``adapter_digest`` of the weights file in ``folder`` (None: no manifest there)."""
    file = weights_file(folder)
    if file is None:
        return None
    if file.name == WEIGHTS_NAME:  # read the one tensor, not the file
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as fh:
            if MANIFEST_KEY not in fh.keys():
                return None
            return manifest_digest(fh.get_tensor(MANIFEST_KEY))
    manifest = read_adapter_tensors(file).get(MANIFEST_KEY)
    return None if manifest is None else manifest_digest(manifest)


def saves_module(key: str, modules_to_save: Sequence[str] | None) -> bool:
    """True when checkpoint ``key`` is a tensor of a ``modules_to_save`` module (peft's rule)."""
    if not modules_to_save:
        return False
    parts = key.removeprefix(MODEL_PREFIX).split(".")[:-1]
    paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p == t or p.endswith("." + t) for p in paths for t in modules_to_save)


def _check_targets(tm: Any, name: str) -> list[str] | str:
    import re

    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as exc:
            raise ConfigError(
                f"`{name}` as a string must be a valid regular expression; got {tm!r} ({exc})"
            ) from None
        return tm
    if (
        not isinstance(tm, (Sequence, set, frozenset))
        or len(tm) == 0
        or not all(isinstance(t, str) and t for t in tm)
    ):
        raise ConfigError(
            f"`{name}` must be a non-empty list of module names or a regex string; got {tm!r}"
        )
    return sorted(tm) if isinstance(tm, (set, frozenset)) else list(tm)


def check_positive_int(value: Any, name: str) -> int:
    """A config field that must be a positive int (``rank``); ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"`{name}` must be a positive int; got {value!r}")
    return int(value)


def check_scale(value: Any, name: str = "scale") -> float:
    """A config field that must be a finite nonzero number (an update's scale)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value == 0
    ):
        raise ConfigError(f"`{name}` must be a finite nonzero number; got {value!r}")
    return float(value)


def check_seed(value: Any, name: str = "seed") -> int | None:
    """A config field that must be None or an int (a seed)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ConfigError(f"`{name}` must be None or an int; got {value!r}")
    return None if value is None else int(value)
