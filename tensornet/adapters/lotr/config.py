"""LoTR's peft config: rank, scale and the initialization of the shared pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...errors import ConfigError
from .._registry import peft_type
from ..config import (
    LLAMA_TARGETS,
    MODEL_PREFIX,
    TUNER_PREFIX,
    TensornetConfig,
    check_positive_int,
    check_scale,
    check_seed,
)

__all__ = ["LoTRConfig"]

_INITS = ("normal", "orthogonal")


@dataclass
class LoTRConfig(TensornetConfig):
    """Configuration of LoTR adapters (Bershatsky et al., 2024), a peft config.

    For each kind of target (the last component of its name: every ``q_proj`` of the
    model is one kind) one pair ``A`` (out x r), ``B`` (r x in) is shared by the ``L``
    layers of that kind, and each layer has its own core ``G_l`` (r x r):
    ``Delta W_l = s A G_l B``.

    Parameters
    ----------
    target_modules : list of str or str, optional
        peft's rule (see :class:`~tensornet.adapters.config.TensornetConfig`); default the
        paper's q, k, v, up, down.
    rank : int
        ``r`` (default 16).
    scale : float
        ``s``, multiplies the update (LoRA's ``alpha / r``); default 1.0.
    init : {"normal", "orthogonal"}
        ``A`` and ``B``: Gaussian with LoRA-like scaling (``B`` entries of variance
        ``1 / in_features``, ``A`` of variance ``1 / r``), or orthonormal columns of ``A``
        and rows of ``B``. Every ``G_l`` starts at zero, so the model is unchanged
        (``init_weights=False``: ``G_l`` random, peft's test convention).
    seed : int or None
        Seed of ``A`` and ``B`` (and of ``G_l`` with ``init_weights=False``); None uses
        torch's global RNG.

    Examples
    --------
    >>> cfg = LoTRConfig(rank=8)
    >>> cfg.rank, cfg.scale, cfg.init, cfg.peft_type
    (8, 1.0, 'normal', <PeftType.LOTR: 'LOTR'>)
    >>> LoTRConfig(init="uniform")
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: `init` must be one of 'normal', 'orthogonal'; got 'uniform'
    """

    rank: int = 16
    scale: float = 1.0
    init: Literal["normal", "orthogonal"] = "normal"
    seed: int | None = None

    default_targets: ClassVar[tuple[str, ...]] = LLAMA_TARGETS
    prefix: ClassVar[str] = "lotr_"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type("LOTR")
        self.rank = check_positive_int(self.rank, "rank")
        self.scale = check_scale(self.scale)
        if self.init not in _INITS:
            valid = ", ".join(repr(o) for o in _INITS)
            raise ConfigError(f"`init` must be one of {valid}; got {self.init!r}")
        self.seed = check_seed(self.seed)

    @property
    def method(self) -> str:
        """``"lotr"``."""
        return "lotr"

    def kinds(self) -> dict[str, tuple[int, int]]:
        """Kind -> ``(out_features, in_features)`` of the adapted layers (from ``base_layers``)."""
        out: dict[str, tuple[int, int]] = {}
        for key, rec in self.base_layers.items():
            out.setdefault(kind_of(key), (int(rec["shape"][0]), int(rec["shape"][1])))
        return out

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape: each kind's ``A`` and ``B``, each layer's ``G``."""
        r = self.rank
        out: dict[str, tuple[int, ...]] = {}
        for kind, (out_f, in_f) in self.kinds().items():
            out[f"{TUNER_PREFIX}lotr_A.{kind}"] = (out_f, r)
            out[f"{TUNER_PREFIX}lotr_B.{kind}"] = (r, in_f)
        for key in self.base_layers:
            out[f"{MODEL_PREFIX}{key}.lotr_G"] = (r, r)
        return out


def kind_of(key: str) -> str:
    """The kind of layer ``key`` (its last name component: ``"q_proj"``)."""
    return key.rsplit(".", 1)[-1]
