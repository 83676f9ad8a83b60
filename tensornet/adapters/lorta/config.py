"""LoRTA's peft config: the attention projections, the CP rank and the scale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..._validate import check_positive_int, check_rank_int
from ...errors import ConfigError
from ...method_table import ATTENTION_TARGETS  # in the order of ``C_matrix``'s rows
from ..config import (
    TUNER_PREFIX,
    TensornetConfig,
    check_scale,
    check_seed,
)

__all__ = ["ATTENTION_TARGETS", "FACTORS", "LoRTAConfig", "lorta_num_params"]

#: The CP factors, in the order they are drawn (``C_kv_head`` only with grouped-query
#: attention and K or V adapted).
FACTORS: tuple[str, ...] = ("A", "B", "C_head", "C_kv_head", "C_matrix", "C_layer")


@dataclass
class LoRTAConfig(TensornetConfig):
    """Configuration of LoRTA adapters (Hounie et al., 2024), a peft config.

    One rank-``r`` CP decomposition of the 5-way tensor of all attention updates,
    indexed by (d_model, d_head, head, matrix, layer).

    Parameters
    ----------
    target_modules : list of str
        Which attention projections to adapt, a non-empty subset of ``["q_proj",
        "k_proj", "v_proj", "o_proj"]`` (the default, all four; the paper's Q, K, V, O).
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
    ['q_proj', 'k_proj', 'v_proj', 'o_proj']
    >>> LoRTAConfig(target_modules=["q_proj", "up_proj"])
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: `target_modules` must be a non-empty subset of ...; got
    ['q_proj', 'up_proj']
    """

    peft_name: ClassVar[str] = "LORTA"
    prefix: ClassVar[str] = "lorta_"
    default_targets: ClassVar[tuple[str, ...]] = ATTENTION_TARGETS

    rank: int = 16
    scale: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        tm = self.target_modules
        if (
            isinstance(tm, str)
            or not isinstance(tm, Sequence)
            or len(set(tm)) != len(tm)
            or not all(t in ATTENTION_TARGETS for t in tm)
        ):
            valid = ", ".join(repr(t) for t in ATTENTION_TARGETS)
            raise ConfigError(
                f"`target_modules` must be a non-empty subset of {valid} without repeats; "
                f"got {tm!r}"
            )
        self.rank = check_rank_int(self.rank, "rank")
        self.scale = check_scale(self.scale)
        self.seed = check_seed(self.seed)

    @property
    def method(self) -> str:
        """``"lorta"``."""
        return "lorta"

    def factor_shapes(self) -> dict[str, tuple[int, int]]:
        """Factor name -> shape, from the dimensions recorded in ``base_layers``."""
        return factor_shapes([rec["lorta"] for rec in self.base_layers.values()], self.rank,
                             len(self.target_modules))

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape of the CP factors (``base_model.lorta_<factor>``)."""
        return {f"{TUNER_PREFIX}lorta_{k}": v for k, v in self.factor_shapes().items()}


def factor_shapes(records: Sequence[dict[str, Any]], rank: int, num_matrices: int
                  ) -> dict[str, tuple[int, int]]:
    """Shapes of the CP factors for the adapted projections described by ``records``.

    Each record is a target's ``"lorta"`` entry: its ``proj`` and the model's
    ``d_model``, ``d_head``, ``heads``, ``kv_heads`` and ``layers``.
    """
    if not records:
        return {}
    d = records[0]
    gqa = d["kv_heads"] != d["heads"] and any(r["proj"] in ("k_proj", "v_proj") for r in records)
    shapes = {
        "A": (d["d_model"], rank),
        "B": (rank, d["d_head"]),
        "C_head": (d["heads"], rank),
        "C_kv_head": (d["kv_heads"], rank),
        "C_matrix": (num_matrices, rank),
        "C_layer": (d["layers"], rank),
    }
    if not gqa:
        del shapes["C_kv_head"]
    return shapes


def lorta_num_params(
    d_model: int,
    d_head: int,
    num_heads: int,
    num_kv_heads: int,
    num_layers: int,
    rank: int,
    *,
    num_matrices: int = 4,
) -> int:
    """Trainable parameters of LoRTA: ``r (d_model + d_head + H + H_kv + M + L)``.

    The five CP factors ``A`` (d_model x r), ``B`` (r x d_head), ``C_head`` (H x r),
    ``C_matrix`` (M x r, M = 4 for Q, K, V, O) and ``C_layer`` (L x r). With grouped-query
    attention (``num_kv_heads < num_heads``) K and V have their own head factor
    ``C_kv_head`` (H_kv x r); without it (``num_kv_heads == num_heads``) they share
    ``C_head`` and the count is the paper's ``r (d_model + d_head + H + 4 + L)``.

    Parameters
    ----------
    d_model, d_head : int
        Model width and width of one attention head.
    num_heads, num_kv_heads : int
        Query heads ``H`` and key/value heads ``H_kv`` (``H_kv == H`` without GQA).
    num_layers : int
        ``L``.
    rank : int
        CP rank ``r``.
    num_matrices : int, default 4
        ``M``, how many of Q, K, V, O are adapted. Pass ``num_kv_heads=num_heads`` when
        neither K nor V is adapted.

    Returns
    -------
    int
        The number of trainable parameters.

    Raises
    ------
    RankError
        If ``rank`` is not an int >= 1.
    ShapeError, DTypeError
        If another dimension is not an int >= 1.

    Examples
    --------
    LLaMA-2-7B (no GQA) at r = 16, and SmolLM2-135M (9 heads, 3 key/value heads):

    >>> lorta_num_params(4096, 128, 32, 32, 32, 16)
    68672
    >>> lorta_num_params(576, 64, 9, 3, 30, 16)
    10976
    """
    rank = check_rank_int(rank, "rank")
    dims = [
        check_positive_int(v, name)
        for v, name in (
            (d_model, "d_model"),
            (d_head, "d_head"),
            (num_heads, "num_heads"),
            (num_kv_heads, "num_kv_heads"),
            (num_layers, "num_layers"),
            (num_matrices, "num_matrices"),
        )
    ]
    d_model, d_head, num_heads, num_kv_heads, num_layers, num_matrices = dims
    kv = num_kv_heads if num_kv_heads != num_heads else 0
    return int(rank * (d_model + d_head + num_heads + kv + num_matrices + num_layers))
