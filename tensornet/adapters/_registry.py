"""The one table of tensornet's peft methods, and their registration with peft.

peft's ``register_peft_method`` accepts only names that are members of its ``PeftType``
enum, which lists peft's own methods. tensornet adds its members to that enum (a
``str`` enum: a member is the string of its value, so configs serialize as plain
``"DOTA"`` and ``PeftType("DOTA")`` finds it) and then registers through peft's own
function, so peft's mappings are filled exactly as for a built-in method.

Adding members to an existing enum uses the enum's internal tables; this was tested with
the peft versions in :data:`TESTED_PEFT` (pinned in ``pyproject.toml``) on CPython 3.10-3.12,
and :func:`check_peft` refuses any other peft with a message instead of misbehaving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PeftVersionError

__all__ = ["TESTED_PEFT", "METHODS", "Method", "check_peft", "peft_type", "register"]

#: peft releases whose tuner framework tensornet's methods are tested on.
TESTED_PEFT: tuple[str, ...] = ("0.21.2",)


@dataclass(frozen=True)
class Method:
    """A tensornet fine-tuning method: its name, its peft type and config overrides.

    Several methods can share one peft type (DoTA, DoTA-Random and QDoTA are one
    tuner with different ``init`` / ``quantize``), as PiSSA is LoRA with another init.
    """

    name: str
    peft_type: str
    config_cls: Any
    model_cls: Any
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self, **fields: Any) -> Any:
        """The method's config with ``fields`` set (its own overrides first)."""
        return self.config_cls(**{**dict(self.overrides), **fields})


#: name -> Method, filled by :func:`register` (in the order the methods were registered).
METHODS: dict[str, Method] = {}


def check_peft() -> str:
    """Return the installed peft version, or raise if it is not a tested one."""
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is in the adapters extra
        raise PeftVersionError(
            f"tensornet.adapters needs peft (one of {', '.join(TESTED_PEFT)}): "
            f"pip install 'tensornet[adapters]' ({exc})"
        ) from None
    version = peft.__version__
    if version not in TESTED_PEFT:
        raise PeftVersionError(
            f"tensornet's methods are registered as peft methods and tested with peft "
            f"{', '.join(TESTED_PEFT)}; the installed peft is {version}. Install a tested "
            f"one: pip install 'peft=={TESTED_PEFT[-1]}'"
        )
    return version


def peft_type(name: str) -> Any:
    """The ``PeftType`` member ``name`` (upper case), added to the enum if it is new."""
    from peft.utils.peft_types import PeftType

    member = PeftType._value2member_map_.get(name)
    if member is not None:
        return member
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    if PeftType(name) is not member or member not in list(PeftType):  # pragma: no cover
        raise PeftVersionError(
            f"could not add {name!r} to peft's PeftType enum on this Python/peft; tensornet "
            f"is tested with peft {', '.join(TESTED_PEFT)} on CPython 3.10-3.12"
        )
    return member


def register(
    name: str, config_cls: Any, model_cls: Any, *, methods: dict[str, dict[str, Any]]
) -> None:
    """Register one peft tuner and the tensornet methods built on it.

    Parameters
    ----------
    name : str
        The peft method name, lower case (``"dota"``): ``PeftType.DOTA``.
    config_cls, model_cls
        The config (a ``PeftConfig``) and tuner (a ``BaseTuner``) classes.
    methods : dict
        tensornet method name -> config overrides, e.g. ``{"qdota": {"quantize": "nf4"}}``.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    member = peft_type(name.upper())
    known = PEFT_TYPE_TO_TUNER_MAPPING.get(member)
    if known is None:
        register_peft_method(
            name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix
        )
    elif known is not model_cls:  # pragma: no cover - another package took the name
        raise ConfigError(f"peft already has a method {name!r} ({known.__qualname__})")
    for method, overrides in methods.items():
        METHODS[method] = Method(method, name, config_cls, model_cls, tuple(overrides.items()))
