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
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peft.config import PeftConfig

from ..errors import AdapterFileError, ConfigError
from .files import WEIGHTS_NAME, check_adapter_file, write_model_card

__all__ = [
    "LLAMA_TARGETS",
    "MODEL_PREFIX",
    "TUNER_PREFIX",
    "TensornetConfig",
    "check_positive_int",
    "check_scale",
    "check_seed",
]

#: The paper's targets on LLaMA: q_proj, k_proj, v_proj, up_proj and down_proj.
LLAMA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

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
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    base_layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    #: the method's default targets and its peft prefix (class attributes, not fields)
    default_targets: ClassVar[tuple[str, ...]] = ()
    prefix: ClassVar[str] = ""

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
        """As peft's, then a tensornet section in the folder's model card (``README.md``)."""
        super().save_pretrained(save_directory, **kwargs)
        write_model_card(save_directory, self)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> TensornetConfig:
        """Read the config (peft's loader), plus a check of the weights file next to the config.

        peft calls this before it builds the adapter, so a damaged file is refused while
        the model is still untouched.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)
        folder = Path(os.fspath(pretrained_model_name_or_path))
        if subfolder:
            folder = folder / subfolder
        file = folder / WEIGHTS_NAME
        if folder.is_dir():
            if file.exists():
                check_adapter_file(file, config.expected_tensors(), prefix=cls.prefix)
            elif not (folder / "adapter_model.bin").exists():  # peft's pickle format
                raise AdapterFileError(
                    f"{folder} holds an adapter_config.json but no {WEIGHTS_NAME}: the "
                    f"adapter's weights are missing (save it again with save_pretrained)"
                )
        config._restoring = True  # not a field: never saved, cleared by the injection
        return config


_PEFT_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)} | {"base_layers"}


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
