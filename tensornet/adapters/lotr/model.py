"""LoTR's peft tuner: the shared pairs ``A``, ``B`` per kind, and the layers' cores."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ConfigError
from ..base import LayerReport
from ..shared_state import SharedStateTuner
from ..tuner import Target
from .config import LoTRConfig, kind_of, lotr_num_params
from .layer import LoTRLayer, LoTRLinear

__all__ = ["LoTRModel"]


class LoTRModel(SharedStateTuner):
    """peft tuner of LoTR (``PeftType.LOTR``).

    Built by ``peft.get_peft_model(model, LoTRConfig(...))``. The pairs shared by the
    layers of a kind are the tuner's: ``lotr_A[adapter][kind]`` (out x r) and
    ``lotr_B[adapter][kind]`` (r x in), saved as ``base_model.lotr_A.<kind>`` and
    ``base_model.lotr_B.<kind>``; each layer's core is its ``lotr_G[adapter]``.
    """

    prefix: str = "lotr_"
    tuner_layer_cls = LoTRLayer
    target_module_mapping: dict[str, list[str]] = {}
    shared_containers = {"lotr_A": nn.ModuleDict, "lotr_B": nn.ModuleDict}

    @classmethod
    def check_targets(cls, model: nn.Module, targets: list[Target], config: LoTRConfig) -> None:
        """Layers of one kind share a pair: one shape, one dtype and device per kind."""
        kinds: dict[str, list[Target]] = {}
        for t in targets:
            kinds.setdefault(kind_of(t.key), []).append(t)
        for kind, items in kinds.items():
            shapes = {tuple(t.record["shape"]) for t in items}
            if len(shapes) > 1:
                listed = ", ".join(f"{t.key}: {t.record['shape'][0]}x{t.record['shape'][1]}"
                                   for t in items)
                raise ConfigError(
                    f"LoTR shares A and B among the layers of one kind, so every {kind!r} "
                    f"target must have one shape; got {listed}. Narrow `target_modules`"
                )
            found = {(t.module.weight.dtype, t.module.weight.device) for t in items}
            if len(found) > 1:
                raise ConfigError(
                    f"every {kind!r} target must have one dtype and device (they share "
                    f"factors); got {sorted(str(k) for k in found)}"
                )
            out_f, in_f = shapes.pop()
            if config.init == "orthogonal" and config.rank > min(out_f, in_f):
                raise ConfigError(
                    f"`rank` must be <= min(out_features, in_features) = {min(out_f, in_f)} "
                    f"for init='orthogonal' (the {kind!r} layers are {out_f}x{in_f}); got "
                    f"{config.rank}"
                )
            if config.rank * config.rank > out_f * in_f:
                # each layer's G (rank x rank) would outgrow the layer it adapts, whose
                # update A G B has rank at most min(out, in) anyway (rank 100000 asked
                # for 40 GB before anything was checked)
                raise ConfigError(
                    f"`rank` must be <= {math.isqrt(out_f * in_f)} for the {kind!r} layers "
                    f"({out_f}x{in_f}): each layer's rank x rank core would be larger than "
                    f"the layer itself (min(out_features, in_features) = {min(out_f, in_f)} "
                    f"is the most any rank can express); got {config.rank}"
                )

    @classmethod
    def count(cls, model: nn.Module, targets: list[Target], config: LoTRConfig) -> tuple:
        """One report per layer (its ``G``); the total adds each kind's pair."""
        r = config.rank
        kinds: dict[str, list[Target]] = {}
        for t in targets:
            kinds.setdefault(kind_of(t.key), []).append(t)
        layers = tuple(
            LayerReport(t.key, *t.record["shape"], (t.record["shape"][0],),
                        (t.record["shape"][1],), (r,), r * r)
            for t in targets
        )
        total = sum(
            lotr_num_params({kind: tuple(items[0].record["shape"])}, len(items), r)
            for kind, items in kinds.items()
        )
        return layers, total, {"shared_params": total - r * r * len(targets)}

    def build_layer(self, config: LoTRConfig, adapter_name: str, target: nn.Module,
                    key: str) -> LoTRLinear | None:
        """The LoTR layer of ``target`` (or the adapter added to it); pairs made once."""
        if adapter_name not in self.lotr_A:
            self._build_pairs(config, adapter_name)
        core = _initial_core(self._targets[key], config, placeholder=self._placeholders)
        kind = kind_of(key)
        if isinstance(target, LoTRLinear):
            target.update_layer(adapter_name, config, kind, core)
            return None
        return LoTRLinear(target, adapter_name, (self.lotr_A, self.lotr_B), config, kind, core)

    def _build_pairs(self, config: LoTRConfig, adapter_name: str) -> None:
        """``A`` and ``B`` of every kind the adapter's targets hold (drawn, or placeholders)."""
        kinds: dict[str, Target] = {}
        for t in self._targets.values():
            kinds.setdefault(kind_of(t.key), t)
        pairs_a, pairs_b = nn.ParameterDict({}), nn.ParameterDict({})
        for index, (kind, t) in enumerate(kinds.items()):
            out_f, in_f = t.record["shape"]
            weight = t.module.weight
            if self._placeholders:  # the weights file supplies them
                a, b = torch.zeros(out_f, config.rank), torch.zeros(config.rank, in_f)
            else:
                gen = None
                if config.seed is not None:
                    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
                a, b = _initial_pair(out_f, in_f, config.rank, config.init, gen)
            pairs_a[kind] = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
            pairs_b[kind] = nn.Parameter(b.to(device=weight.device, dtype=weight.dtype))
        self.lotr_A[adapter_name] = pairs_a
        self.lotr_B[adapter_name] = pairs_b


def _initial_pair(
    out_f: int, in_f: int, rank: int, init: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (out x r) and ``B`` (r x in), float32 on the CPU."""
    if init == "orthogonal":
        qa, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=generator))
        qb, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=generator))
        return qa, qb.T.contiguous()
    # LoRA-like: x B^T has entries of unit scale, A maps r of them to unit scale
    b = torch.randn(rank, in_f, generator=generator) / in_f**0.5
    a = torch.randn(out_f, rank, generator=generator) / rank**0.5
    return a, b


def _initial_core(t: Target, config: LoTRConfig, *, placeholder: bool) -> torch.Tensor:
    """``G_l``: zero (the model is unchanged), or random with ``init_weights=False``."""
    r = config.rank
    weight = t.module.weight
    core = torch.zeros(r, r)
    if not config.init_weights and not placeholder:  # peft's convention: away from identity
        gen = None
        if config.seed is not None:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 500_009 + t.index)
        core = torch.randn(r, r, generator=gen) / r**0.5
    return core.to(dtype=weight.dtype)
