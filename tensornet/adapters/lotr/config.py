"""LoTR's peft config: rank, scale and the initialization of the shared pair."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from ..._validate import check_modes, check_positive_int, check_rank_int
from ...errors import ConfigError, ShapeError
from ..config import (
    LLAMA_TARGETS,
    MODEL_PREFIX,
    TUNER_PREFIX,
    TensornetConfig,
    check_scale,
    check_seed,
)

__all__ = ["LoTRConfig", "lotr_num_params"]

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

    peft_name: ClassVar[str] = "LOTR"
    prefix: ClassVar[str] = "lotr_"
    default_targets: ClassVar[tuple[str, ...]] = LLAMA_TARGETS

    rank: int = 16
    scale: float = 1.0
    init: Literal["normal", "orthogonal"] = "normal"
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rank = check_rank_int(self.rank, "rank")
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


def lotr_num_params(
    shapes_by_kind: Mapping[str, tuple[int, int]], num_layers: int, rank: int
) -> int:
    """Trainable parameters of LoTR: ``sum over kinds of r (out + in) + L r^2``.

    LoTR shares ``A`` (out x r) and ``B`` (r x in) among the layers of one kind of matrix
    (every ``q_proj``, say) and gives each of the ``L`` layers its own ``G_l`` (r x r).

    Parameters
    ----------
    shapes_by_kind : mapping of str to (int, int)
        ``(out_features, in_features)`` of each kind of adapted matrix.
    num_layers : int
        ``L``, the number of layers holding each kind.
    rank : int
        ``r``.

    Returns
    -------
    int
        The number of trainable parameters (``A``, ``B`` per kind, ``G_l`` per layer and kind).

    Raises
    ------
    RankError
        If ``rank`` is not an int >= 1.
    ShapeError
        If ``shapes_by_kind`` is empty or not a mapping, a shape is not two ints >= 1, or
        ``num_layers`` is < 1.
    DTypeError
        If ``num_layers`` is not an int.

    Examples
    --------
    LLaMA-2-7B's q, k, v (4096 x 4096), up (11008 x 4096) and down (4096 x 11008) in its
    32 layers, at r = 16:

    >>> shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
    ...           "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    >>> lotr_num_params(shapes, 32, 16)
    917504
    """
    num_layers = check_positive_int(num_layers, "num_layers")
    rank = check_rank_int(rank, "rank")
    if not isinstance(shapes_by_kind, Mapping) or not shapes_by_kind:
        raise ShapeError(
            f"`shapes_by_kind` must be a non-empty mapping of kind -> (out, in); got "
            f"{shapes_by_kind!r}"
        )
    total = 0
    for kind, shape in shapes_by_kind.items():
        dims = check_modes(shape, f"shapes_by_kind[{kind!r}]")
        if len(dims) != 2:
            raise ShapeError(f"`shapes_by_kind[{kind!r}]` must be (out_features, in_features); "
                             f"got {shape!r}")
        out_f, in_f = dims
        total += rank * (out_f + in_f) + num_layers * rank * rank
    return int(total)
