"""tensornet's peft methods: their registration with peft, and the peft versions tested.

The methods are the tensornet rows of :data:`tensornet.method_table.METHOD_TABLE`; each
method's folder registers its tuner with one line, ``register(name, Config, Model)``.

peft's ``register_peft_method`` accepts only names that are members of its ``PeftType``
enum, which lists peft's own methods. tensornet adds its members to that enum (a
``str`` enum: a member is the string of its value, so configs serialize as plain
``"DOTA"`` and ``PeftType("DOTA")`` finds it) and then registers through peft's own
function, so peft's mappings are filled exactly as for a built-in method.

Adding members to an existing enum uses the enum's internal tables, and the tuners use
peft's ``BaseTuner`` / ``BaseTunerLayer``; both were tested with the peft releases in
:data:`TESTED_PEFT` (``make test-peft-range``; the same list is ``[tool.tensornet]
tested-peft`` in ``pyproject.toml``) on CPython 3.10-3.12. :func:`check_peft` refuses a peft
older than the oldest of them with a message, and warns on one newer than the newest (it
may work; the enum post-check of :func:`peft_type` still refuses one where it cannot).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PeftVersionError
from ..method_table import METHOD_TABLE

__all__ = [
    "INSTALL_HINT", "TESTED_PEFT", "METHODS", "Method", "check_peft", "peft_type", "register",
]

#: peft releases whose tuner framework tensornet's methods are tested on, oldest first. A
#: peft between the first and the last is accepted, an older one refused, a newer one warned.
#: 0.21.0 is the first whose tuner has the save and load hooks through which every adapter
#: file gets its manifest and every load its checks (``tensornet._compat.peft.TunerHooks``:
#: ``after_save``, ``check_loaded``); under 0.20 both would be skipped silently.
TESTED_PEFT: tuple[str, ...] = ("0.21.0", "0.21.1", "0.21.2")

#: What to run to get a peft tensornet works with, for the messages.
INSTALL_HINT = (
    f'pip install "peft>={TESTED_PEFT[0]}" (or, from a tensornet checkout, '
    f'pip install -e ".[adapters]")'
)


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


#: name -> Method, filled by :func:`register` from the method table (in registration order).
METHODS: dict[str, Method] = {}


def check_peft() -> str:
    """Return the installed peft version; refuse an older peft than tested, warn on a newer.

    Raises
    ------
    PeftVersionError
        If peft is missing or older than ``TESTED_PEFT[0]``.

    Warns
    -----
    UserWarning
        If peft is newer than ``TESTED_PEFT[-1]``.
    """
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is in the adapters extra
        raise PeftVersionError(
            f"tensornet.adapters needs peft {TESTED_PEFT[0]} or newer ({exc}): {INSTALL_HINT}"
        ) from None
    version = peft.__version__
    tested = ", ".join(TESTED_PEFT)
    if _release(version) < _release(TESTED_PEFT[0]):
        raise PeftVersionError(
            f"tensornet's methods are registered as peft methods and need peft "
            f"{TESTED_PEFT[0]} or newer (tested: {tested}); the installed peft is {version}: "
            f"{INSTALL_HINT}"
        )
    if _release(version) > _release(TESTED_PEFT[-1]):
        warnings.warn(
            f"tensornet's methods are tested with peft {tested}; the installed peft is "
            f"{version}, newer and untested: they may work. If they do not, install a tested "
            f"one: pip install \"peft=={TESTED_PEFT[-1]}\"",
            UserWarning,
            stacklevel=2,
        )
    return version


def _release(version: str) -> tuple[int, ...]:
    """``"0.21.2"`` -> ``(0, 21, 2)``; a pre-release counts as its release (``0.22.0.dev0``)."""
    from packaging.version import Version

    return Version(version).release


def peft_type(name: str) -> Any:
    """The ``PeftType`` member ``name`` (upper case), added to the enum if it is new."""
    from peft.utils.peft_types import PeftType

    from .._compat.peft import add_peft_type

    member = add_peft_type(name)
    if PeftType(name) is not member or member not in list(PeftType):  # pragma: no cover
        raise PeftVersionError(
            f"could not add {name!r} to peft's PeftType enum on this Python/peft; tensornet "
            f"is tested with peft {', '.join(TESTED_PEFT)} on CPython 3.10-3.12: "
            f'pip install "peft=={TESTED_PEFT[-1]}"'
        )
    return member


def register(name: str, config_cls: Any, model_cls: Any) -> None:
    """Register one peft tuner; the method table's rows on it become :data:`METHODS`.

    The one registration line of a method's folder (``tensornet/adapters/<name>/``).

    Parameters
    ----------
    name : str
        The peft method name, lower case (``"dota"``): ``PeftType.DOTA``; the table's
        ``peft_type`` of the methods built on it.
    config_cls, model_cls
        The config (a ``PeftConfig``) and tuner (a ``BaseTuner``) classes.

    Raises
    ------
    ConfigError
        If no row of :data:`tensornet.method_table.METHOD_TABLE` is a tensornet method on
        ``name`` (a tuner nothing would use), a row's targets are not the config's, or
        the config's ``peft_name`` is not ``name`` in upper case.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    rows = [s for s in METHOD_TABLE if s.kind == "tensornet" and s.peft_type == name]
    if not rows:
        raise ConfigError(f"no row of tensornet.method_table.METHOD_TABLE is a tensornet "
                          f"method on the peft method {name!r}: add one there")
    if getattr(config_cls, "peft_name", None) != name.upper():
        raise ConfigError(f"{config_cls.__name__}.peft_name must be {name.upper()!r}, the "
                          f"PeftType member of the peft method {name!r}")
    for spec in rows:
        if tuple(config_cls.default_targets) != spec.targets:
            raise ConfigError(f"{config_cls.__name__}.default_targets is not the targets of "
                              f"{spec.name!r} in tensornet.method_table.METHOD_TABLE")
    member = peft_type(name.upper())
    known = PEFT_TYPE_TO_TUNER_MAPPING.get(member)
    if known is None:
        register_peft_method(
            name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix
        )
    elif known is not model_cls:  # pragma: no cover - another package took the name
        raise ConfigError(f"peft already has a method {name!r} ({known.__qualname__})")
    for spec in rows:
        METHODS[spec.name] = Method(spec.name, name, config_cls, model_cls, spec.settings)
