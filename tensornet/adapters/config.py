"""Adapter configurations: plain dataclasses, validated, never mutated after creation."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError

__all__ = ["DoTAConfig", "LoTRConfig", "LoRTAConfig", "LLAMA_TARGETS", "ATTENTION_TARGETS"]

#: The paper's targets on LLaMA: q_proj, k_proj, v_proj, up_proj and down_proj.
LLAMA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

#: LoRTA's targets: the four attention projections, in the order of ``C_matrix``'s rows.
ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

Init = Literal["mpo", "random"]
LoTRInit = Literal["normal", "orthogonal"]
Quantize = Literal["nf4"]
DType = Literal["float32", "bfloat16", "float16", "float64"]
Strategy = Literal["auto", "dense", "contract"]

_INITS = ("mpo", "random")
_QUANTIZE = (None, "nf4")
_DTYPES = (None, "float32", "bfloat16", "float16", "float64")
_STRATEGIES = ("auto", "dense", "contract")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"`{name}` must be a positive int; got {value!r}")
    return int(value)


def _check_targets(tm: Any) -> Sequence[str] | str:
    """``target_modules`` validated: a tuple of names or a compiled-checked regex string."""
    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as exc:
            raise ConfigError(
                f"`target_modules` as a string must be a valid regular expression; got "
                f"{tm!r} ({exc})"
            ) from None
        return tm
    if (
        not isinstance(tm, Sequence)
        or len(tm) == 0
        or not all(isinstance(t, str) and t for t in tm)
    ):
        raise ConfigError(
            f"`target_modules` must be a non-empty list of module names or a regex string; "
            f"got {tm!r}"
        )
    return tuple(tm)


def _check_scale(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value == 0
    ):
        raise ConfigError(f"`scale` must be a finite nonzero number; got {value!r}")
    return float(value)


def _check_seed(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ConfigError(f"`seed` must be None or an int; got {value!r}")


class _ConfigIO:
    """``replace`` / ``to_dict`` / ``from_dict`` of the adapter configs."""

    def replace(self, **overrides: Any) -> Any:
        """Return a copy with ``overrides`` applied (this config is left unchanged).

        Raises
        ------
        ConfigError
            If an override names no field of the config.
        """
        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown {type(self).__name__} field(s) {unknown}; valid fields: {sorted(names)}"
            )
        return dataclasses.replace(self, **overrides)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of the fields."""
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        tm = out["target_modules"]
        out["target_modules"] = tm if isinstance(tm, str) else list(tm)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class DoTAConfig(_ConfigIO):
    """Configuration of DoTA, DoTA-Random and QDoTA adapters.

    Parameters
    ----------
    target_modules : sequence of str or str
        Module names to adapt. A sequence matches a module whose qualified name equals an
        entry or ends with ``"." + entry`` (peft's rule); a string is a regular expression
        that must match the whole qualified name.
    num_cores : int
        Number of MPO cores ``N`` (the paper: 5).
    rank : int or sequence of int
        Bond cap ``R`` for every bond, or ``N-1`` caps (the paper: 16).
    modes : mapping of int to sequence of int, optional
        Modes to use for a dimension, e.g. ``{4096: (4, 4, 8, 8, 4)}``; other dimensions
        use :func:`tensornet.factorize` (the paper's Table 2 for ``N = 5``).
    init : {"mpo", "random"}
        ``"mpo"``: cores from the MPO decomposition of the pretrained weight, residual
        ``W_res = W0 - MPO(T)`` frozen (DoTA). ``"random"``: the paper's DoTA-Random
        baseline, Gaussian cores with the last core zero and no residual subtracted.
    quantize : {"nf4"} or None
        ``"nf4"``: QDoTA, the frozen residual stored as bitsandbytes NF4 (decomposed at
        full precision first).
    dtype : {"float32", "bfloat16", "float16", "float64"} or None
        Dtype of the trainable cores; None: the base weight's dtype, or bfloat16 with
        ``quantize="nf4"`` (the paper's QDoTA setting).
    strategy : {"auto", "dense", "contract"}
        How the adapted layer computes ``x @ (W_res + MPO(T)).T``: ``"auto"`` asks the
        contraction planner per batch size.
    seed : int or None
        Seed of the Gaussian cores of ``init="random"``; None uses torch's global RNG.

    Examples
    --------
    >>> cfg = DoTAConfig(rank=32)
    >>> cfg.num_cores, cfg.rank, cfg.target_modules
    (5, 32, ('q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj'))
    >>> DoTAConfig(init="svd")
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: `init` must be one of 'mpo', 'random'; got 'svd'
    """

    target_modules: Sequence[str] | str = LLAMA_TARGETS
    num_cores: int = 5
    rank: int | Sequence[int] = 16
    modes: Mapping[int, Sequence[int]] | None = field(default=None)
    init: Init = "mpo"
    quantize: Quantize | None = None
    dtype: DType | None = None
    strategy: Strategy = "auto"
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules))
        n = _positive_int(self.num_cores, "num_cores")
        if n < 2:
            raise ConfigError(
                f"`num_cores` must be >= 2 (an MPO of one core is the matrix); got {n}"
            )
        r = self.rank
        if (
            isinstance(r, bool)
            or not isinstance(r, (numbers.Integral, Sequence))
            or isinstance(r, str)
        ):
            raise ConfigError(
                f"`rank` must be a positive int or a list of {n - 1} positive ints; got {r!r}"
            )
        if isinstance(r, Sequence):
            if len(r) != n - 1 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in r
            ):
                raise ConfigError(
                    f"`rank` must be a positive int or a list of {n - 1} positive ints (one "
                    f"per bond of {n} cores); got {list(r)!r}"
                )
            object.__setattr__(self, "rank", tuple(int(v) for v in r))
        elif r < 1:
            raise ConfigError(
                f"`rank` must be a positive int or a list of {n - 1} positive ints; got {r!r}"
            )
        if self.modes is not None:
            if not isinstance(self.modes, Mapping):
                raise ConfigError(
                    f"`modes` must be a mapping from a dimension to its modes; got {self.modes!r}"
                )
            fixed = {}
            for dim, ms in self.modes.items():
                ok = (
                    isinstance(dim, numbers.Integral)
                    and isinstance(ms, Sequence)
                    and len(ms) == n
                    and all(isinstance(m, numbers.Integral) and m >= 1 for m in ms)
                )
                prod = 1
                for m in ms if ok else ():
                    prod *= int(m)
                if not ok or prod != dim:
                    raise ConfigError(
                        f"`modes[{dim!r}]` must be {n} positive ints whose product is {dim!r}; "
                        f"got {ms!r}"
                    )
                fixed[int(dim)] = tuple(int(m) for m in ms)
            object.__setattr__(self, "modes", fixed)
        for name, value, options in (
            ("init", self.init, _INITS),
            ("quantize", self.quantize, _QUANTIZE),
            ("dtype", self.dtype, _DTYPES),
            ("strategy", self.strategy, _STRATEGIES),
        ):
            if value not in options:
                valid = ", ".join(repr(o) for o in options)
                raise ConfigError(f"`{name}` must be one of {valid}; got {value!r}")
        _check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of the fields."""
        out = super().to_dict()
        out["rank"] = self.rank if isinstance(self.rank, int) else list(self.rank)
        out["modes"] = (
            None if self.modes is None else {str(k): list(v) for k, v in self.modes.items()}
        )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DoTAConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        if isinstance(data.get("modes"), Mapping):
            data["modes"] = {int(k): tuple(v) for k, v in data["modes"].items()}
        if isinstance(data.get("rank"), list):
            data["rank"] = tuple(data["rank"])
        return super().from_dict(data)


@dataclass(frozen=True)
class LoTRConfig(_ConfigIO):
    """Configuration of LoTR adapters (Bershatsky et al., 2024).

    For each kind of target (the last component of its name: every ``q_proj`` of the
    model is one kind) one pair ``A`` (out x r), ``B`` (r x in) is shared by the ``L``
    layers of that kind, and each layer has its own core ``G_l`` (r x r):
    ``Delta W_l = s A G_l B``.

    Parameters
    ----------
    target_modules : sequence of str or str
        As in :class:`DoTAConfig` (peft's rule); default the paper's q, k, v, up, down.
    rank : int
        ``r`` (default 16).
    scale : float
        ``s``, multiplies the update (LoRA's ``alpha / r``); default 1.0.
    init : {"normal", "orthogonal"}
        ``A`` and ``B``: Gaussian with LoRA-like scaling (``B`` entries of variance
        ``1 / in_features``, ``A`` of variance ``1 / r``), or orthonormal columns of ``A``
        and rows of ``B``. Every ``G_l`` starts at zero, so the model is unchanged.
    seed : int or None
        Seed of ``A`` and ``B``; None uses torch's global RNG.

    Examples
    --------
    >>> cfg = LoTRConfig(rank=8)
    >>> cfg.rank, cfg.scale, cfg.init
    (8, 1.0, 'normal')
    >>> LoTRConfig(init="uniform")
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: `init` must be one of 'normal', 'orthogonal'; got 'uniform'
    """

    target_modules: Sequence[str] | str = LLAMA_TARGETS
    rank: int = 16
    scale: float = 1.0
    init: LoTRInit = "normal"
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules))
        object.__setattr__(self, "rank", _positive_int(self.rank, "rank"))
        object.__setattr__(self, "scale", _check_scale(self.scale))
        if self.init not in ("normal", "orthogonal"):
            raise ConfigError(
                f"`init` must be one of 'normal', 'orthogonal'; got {self.init!r}"
            )
        _check_seed(self.seed)


@dataclass(frozen=True)
class LoRTAConfig(_ConfigIO):
    """Configuration of LoRTA adapters (Hounie et al., 2024).

    One rank-``r`` CP decomposition of the 5-way tensor of all attention updates,
    indexed by (d_model, d_head, head, matrix, layer).

    Parameters
    ----------
    target_modules : sequence of str
        Which attention projections to adapt, a non-empty subset of ``("q_proj",
        "k_proj", "v_proj", "o_proj")`` (the default, all four; the paper's Q, K, V, O).
        Each selects that projection in every decoder layer; ``C_matrix`` has one row
        per entry, in this order.
    rank : int
        CP rank ``r``. Default 16, the rank DoTA and LoTR default to, so the three
        methods meet at the same ``r`` (LoRTA then trains far fewer parameters: 10,976 on
        SmolLM2-135M).
    scale : float
        Multiplies the update; default 1.0.
    seed : int or None
        Seed of the random factors; None uses torch's global RNG.

    Examples
    --------
    >>> LoRTAConfig().target_modules
    ('q_proj', 'k_proj', 'v_proj', 'o_proj')
    >>> LoRTAConfig(target_modules=["q_proj", "up_proj"])
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: `target_modules` must be a non-empty subset of ...; got
    ['q_proj', 'up_proj']
    """

    target_modules: Sequence[str] = ATTENTION_TARGETS
    rank: int = 16
    scale: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        tm = self.target_modules
        if (
            isinstance(tm, str)
            or not isinstance(tm, Sequence)
            or not tm
            or len(set(tm)) != len(tm)
            or not all(t in ATTENTION_TARGETS for t in tm)
        ):
            valid = ", ".join(repr(t) for t in ATTENTION_TARGETS)
            shown = list(tm) if isinstance(tm, Sequence) and not isinstance(tm, str) else tm
            raise ConfigError(
                f"`target_modules` must be a non-empty subset of {valid} without repeats; "
                f"got {shown!r}"
            )
        object.__setattr__(self, "target_modules", tuple(tm))
        object.__setattr__(self, "rank", _positive_int(self.rank, "rank"))
        object.__setattr__(self, "scale", _check_scale(self.scale))
        _check_seed(self.seed)
