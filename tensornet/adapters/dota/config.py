"""DoTA's peft config: DoTA, DoTA-Random and QDoTA are one method with options."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..._validate import as_int_list, is_int
from ...errors import ConfigError, ShapeError
from ...params import Rank, check_rank, mpo_ranks
from ...tensorize import factorize
from ..config import LLAMA_TARGETS, MODEL_PREFIX, TensornetConfig

__all__ = ["DoTAConfig", "LLAMA_TARGETS"]


_INITS = ("mpo", "random")
_QUANTIZE = (None, "nf4")
_DTYPES = (None, "float32", "bfloat16", "float16", "float64")
_STRATEGIES = ("auto", "dense", "contract")


@dataclass
class DoTAConfig(TensornetConfig):
    """Configuration of DoTA, DoTA-Random and QDoTA (a peft config).

    Parameters
    ----------
    target_modules : list of str or str, optional
        peft's rule (see :class:`~tensornet.adapters.config.TensornetConfig`); default the
        paper's q_proj, k_proj, v_proj, up_proj, down_proj.
    num_cores : int
        Number of MPO cores ``N`` (the paper: 5).
    rank : None, int or sequence of int
        The core's rank specification (:mod:`tensornet.params`): a bond cap ``R`` for
        every bond (the paper: 16), ``N-1`` caps, the ``N+1`` form with boundary 1s
        (``MPO.ranks``), or None for the exact ranks (no truncation: cores as large as
        the matrix, for analysis). A bad value raises
        :class:`~tensornet.errors.RankError`, a :class:`~tensornet.errors.ConfigError`.
    modes : mapping of int to sequence of int, optional
        Modes to use for a dimension, e.g. ``{4096: (4, 4, 8, 8, 4)}``; other dimensions
        use :func:`tensornet.factorize` (the paper's Table 2 for ``N = 5``).
    init : {"mpo", "random"}
        ``"mpo"``: cores from the MPO decomposition of the pretrained weight (DoTA).
        ``"random"``: the paper's DoTA-Random baseline, Gaussian cores with the last core
        zero.
    quantize : {"nf4"} or None
        ``"nf4"``: QDoTA, the frozen residual ``W0 - MPO(T_init)`` stored as bitsandbytes
        NF4 in place of the base weight (decomposed at full precision first).
    dtype : {"float32", "bfloat16", "float16", "float64"} or None
        Dtype the cores are created in (and ``T_init`` stored in); None: the base weight's
        dtype, or bfloat16 with ``quantize="nf4"`` (the paper's QDoTA setting). peft then
        upcasts bfloat16/float16 adapter weights to float32 unless
        ``autocast_adapter_dtype=False`` is passed to ``get_peft_model`` /
        :func:`~tensornet.adapters.apply`.
    strategy : {"auto", "dense", "contract"}
        How the layer computes its output: ``"auto"`` asks the contraction planner per
        batch size with the fixed constants of the device kind
        (:func:`tensornet.profile_for`, what ``mpo_matmul(strategy="auto")`` uses too), so
        every process decides alike.
    seed : int or None
        Seed of the Gaussian cores of ``init="random"`` (and of ``init_weights=False``);
        None uses torch's global RNG.

    Notes
    -----
    The adapted weight is ``W0 + MPO(T) - MPO(T_init)``: ``T`` trains, ``T_init`` is stored
    in the adapter and ``W0`` is never modified, so ``disable_adapter()``, several named
    adapters and ``unload()`` behave as with LoRA. The paper's form ``W_res + MPO(T)`` with
    ``W_res = W0 - MPO(T_init)`` is the same matrix. QDoTA keeps the paper's form (the
    base *is* the NF4 residual); see the QDoTA guide for what disable and unload mean there.

    Examples
    --------
    >>> cfg = DoTAConfig(rank=32)
    >>> cfg.num_cores, cfg.rank, cfg.target_modules
    (5, 32, ['q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj'])
    >>> cfg.peft_type
    <PeftType.DOTA: 'DOTA'>
    >>> DoTAConfig(num_cores=3, rank=[1, 8, 4, 1]).rank
    [1, 8, 4, 1]
    >>> DoTAConfig(init="svd")
    Traceback (most recent call last):
    ...
    tensornet.errors.ConfigError: `init` must be one of 'mpo', 'random'; got 'svd'
    """

    peft_name: ClassVar[str] = "DOTA"
    prefix: ClassVar[str] = "dota_"
    default_targets: ClassVar[tuple[str, ...]] = LLAMA_TARGETS

    num_cores: int = 5
    rank: Rank = 16
    modes: Mapping[int, Sequence[int]] | None = None
    init: Literal["mpo", "random"] = "mpo"
    quantize: Literal["nf4"] | None = None
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    strategy: Literal["auto", "dense", "contract"] = "auto"
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_cores
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
            raise ConfigError(
                f"`num_cores` must be an int >= 2 (an MPO of one core is the matrix); got {n!r}"
            )
        self.num_cores = n = int(n)
        caps = check_rank(self.rank, n)  # the core's one rank specification (RankError)
        if caps is not None and not is_int(self.rank):
            self.rank = [int(v) for v in as_int_list(self.rank)]  # JSON-ready, as given
        elif caps is not None:
            self.rank = int(self.rank)
        if self.modes is not None:
            self.modes = _check_modes(self.modes, n)
        for name, value, options in (
            ("init", self.init, _INITS),
            ("quantize", self.quantize, _QUANTIZE),
            ("dtype", self.dtype, _DTYPES),
            ("strategy", self.strategy, _STRATEGIES),
        ):
            if value not in options:
                valid = ", ".join(repr(o) for o in options if o is not None)
                raise ConfigError(f"`{name}` must be one of {valid}; got {value!r}")
        if self.quantize == "nf4" and self.dtype == "float64":
            raise ConfigError(
                "`dtype` = 'float64' cannot go with quantize='nf4': bitsandbytes' NF4 kernels "
                "compute in 'float32', 'bfloat16' or 'float16' (QDoTA's residual computes in "
                "`dtype`); choose one of those"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise ConfigError(f"`seed` must be None or an int; got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """Peft's dictionary, JSON-ready (``modes`` keyed by strings)."""
        out = super().to_dict()
        if out.get("modes") is not None:
            out["modes"] = {str(k): list(v) for k, v in out["modes"].items()}
        return out

    @property
    def method(self) -> str:
        """``"dota"``, ``"dota-random"``, ``"qdota"`` or ``"qdota-random"``."""
        stem = "dota" if self.init == "mpo" else "dota-random"
        return "q" + stem if self.quantize == "nf4" else stem

    def layer_modes(self, out_features: int, in_features: int, *, layer: str = "") -> tuple:
        """``(out_modes, in_modes, ranks)`` of a layer of this shape.

        Raises
        ------
        ConfigError
            If a dimension cannot be split into ``num_cores`` modes.
        """
        out_modes = self._modes(out_features, layer, "out_features")
        in_modes = self._modes(in_features, layer, "in_features")
        return out_modes, in_modes, mpo_ranks(out_modes, in_modes, self.rank)

    def _modes(self, dim: int, layer: str, which: str) -> tuple[int, ...]:
        if self.modes and dim in self.modes:
            return tuple(self.modes[dim])
        try:
            return factorize(dim, self.num_cores)
        except ShapeError as exc:
            raise ConfigError(
                f"layer {layer!r}: {which}={dim} cannot be split into num_cores="
                f"{self.num_cores} modes ({exc}); give `modes={{{dim}: [...]}}` or another "
                f"num_cores"
            ) from None

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape of the saved cores and initial cores."""
        out = {}
        for key, rec in self.base_layers.items():
            out_modes, in_modes, ranks = self.layer_modes(*rec["shape"], layer=key)
            for k in range(self.num_cores):
                shape = (ranks[k], out_modes[k], in_modes[k], ranks[k + 1])
                out[f"{MODEL_PREFIX}{key}.dota_cores.{k}"] = shape
                out[f"{MODEL_PREFIX}{key}.dota_init.{k}"] = shape
        return out


def _check_modes(modes: Any, n: int) -> dict[int, tuple[int, ...]]:
    if not isinstance(modes, Mapping):
        raise ConfigError(f"`modes` must be a mapping from a dimension to its modes; got {modes!r}")
    fixed = {}
    for dim, ms in modes.items():
        try:
            d = int(dim)  # JSON keys come back as strings
        except (TypeError, ValueError):
            d = None
        ok = (
            d is not None
            and isinstance(ms, Sequence)
            and len(ms) == n
            and all(isinstance(m, numbers.Integral) and m >= 1 for m in ms)
        )
        prod = 1
        for m in ms if ok else ():
            prod *= int(m)
        if not ok or prod != d:
            raise ConfigError(
                f"`modes[{dim!r}]` must be {n} positive ints whose product is {dim!r}; got {ms!r}"
            )
        fixed[d] = tuple(int(m) for m in ms)
    return fixed
