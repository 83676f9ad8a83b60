"""DoTA's peft tuner: which layers it takes, and how their initial cores are made."""

from __future__ import annotations

import torch
from torch import nn

from ...decompose import mpo_decompose
from ...errors import ConfigError
from ...params import mpo_num_params
from ..base import LayerReport, compute_dtype, dense_weight, is_4bit
from ..tuner import Target, TensornetTuner
from .config import DoTAConfig
from .cores import random_cores
from .layer import DoTALayer, DoTALinear

__all__ = ["DoTAModel"]

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


class DoTAModel(TensornetTuner):
    """peft tuner of DoTA, DoTA-Random and QDoTA (``PeftType.DOTA``).

    Built by ``peft.get_peft_model(model, DoTAConfig(...))``; the rest of its surface is
    peft's (``merge_and_unload``, ``disable_adapter``, named adapters, ...).
    """

    prefix: str = "dota_"
    tuner_layer_cls = DoTALayer
    target_module_mapping: dict[str, list[str]] = {}
    supported_types = ("nn.Linear", "bitsandbytes Linear4bit")

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        """``nn.Linear`` (not 8-bit) and bitsandbytes 4-bit layers."""
        return (isinstance(module, nn.Linear) and "8bit" not in type(module).__name__) or (
            is_4bit(module)
        )

    @classmethod
    def check_target(cls, model: nn.Module, target: Target, config: DoTAConfig) -> None:
        """Modes and ranks of the layer; 4-bit bases need QDoTA; QDoTA takes a layer alone."""
        out_f, in_f = target.record["shape"]
        out_modes, in_modes, ranks = config.layer_modes(out_f, in_f, layer=target.key)
        target.record["modes"] = [list(out_modes), list(in_modes)]
        target.record["ranks"] = list(ranks)
        # first the layer's adapters: a QDoTA layer's base is 4-bit, and the message below
        # would send its user to quantize='nf4', which that layer refuses as well
        layer = model.get_submodule(target.key)
        if isinstance(layer, DoTALayer) and (layer.quantized or config.quantize == "nf4"):
            raise ConfigError(
                f"target {target.key!r} already has a DoTA adapter; QDoTA replaces the base "
                f"layer by its NF4 residual, so a QDoTA layer takes no other adapter"
            )
        if is_4bit(target.module) and config.quantize != "nf4":
            raise ConfigError(
                f"target {target.key!r} is 4-bit quantized; use quantize='nf4' (QDoTA "
                f"dequantizes, decomposes at full precision and re-quantizes the residual)"
            )
        if config.quantize == "nf4":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                raise ConfigError(
                    f"quantize='nf4' needs bitsandbytes (pip install 'bitsandbytes>=0.45', or "
                    f"pip install -e '.[adapters]' in a tensornet checkout): {exc}"
                ) from None

    @classmethod
    def count(cls, model: nn.Module, targets: list[Target], config: DoTAConfig) -> tuple:
        """One report per layer; the cores' sizes (paper's rho)."""
        layers = []
        for t in targets:
            (out_modes, in_modes), ranks = t.record["modes"], t.record["ranks"]
            n = mpo_num_params(out_modes, in_modes, config.rank)
            layers.append(LayerReport(t.key, *t.record["shape"], tuple(out_modes),
                                      tuple(in_modes), tuple(ranks), n,
                                      t.record.get("relative_error")))
        return tuple(layers), sum(lay.num_params for lay in layers), {}

    def build_layer(self, config: DoTAConfig, adapter_name: str, target: nn.Module,
                    key: str) -> DoTALinear | None:
        """The DoTA layer of ``target`` (or the adapter added to it): cores from its record."""
        restoring = self._placeholders
        cores, init = _initial_cores(self._targets[key], config, restoring=restoring)
        if isinstance(target, DoTALinear):
            target.update_layer(adapter_name, config, cores, init, restoring=restoring)
            return None
        return DoTALinear(target, adapter_name, config, cores, init, restoring=restoring)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete as peft's ``delete_adapter`` does; a QDoTA adapter is refused first.

        peft drops the adapter's config before it visits the layers, so the layers' own
        refusal alone would leave a model without the config of an adapter it still runs.
        """
        if any(
            isinstance(m, DoTALayer) and m.quantized and adapter_name in m.dota_cores
            for m in self.model.modules()
        ):
            raise ConfigError(
                f"cannot delete QDoTA adapter {adapter_name!r}: the base layers were replaced "
                f"by NF4(W0 - MPO(T_init)) and the original weights are not kept; use "
                f"merge_and_unload() for a plain model"
            )
        super().delete_adapter(adapter_name)

    def before_unload(self, *, merge: bool, safe_merge: bool,
                      adapter_names: list[str] | None) -> None:
        """Refuse ``unload()`` of QDoTA (its base is the NF4 residual); then the merge check."""
        if not merge and any(
            isinstance(m, DoTALayer) and m.quantized for m in self.model.modules()
        ):
            raise ConfigError(
                "unload() would give back QDoTA's NF4 residual NF4(W0 - MPO(T_init)), not the "
                "original base (which QDoTA does not keep); use merge_and_unload() for a "
                "plain model, or reload the base model"
            )
        super().before_unload(merge=merge, safe_merge=safe_merge, adapter_names=adapter_names)


def _cores_dtype(module: nn.Module, config: DoTAConfig) -> torch.dtype:
    if config.dtype:
        return _DTYPES[config.dtype]
    if config.quantize == "nf4":
        return torch.bfloat16
    return compute_dtype(module)


def _initial_cores(
    t: Target, config: DoTAConfig, *, restoring: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(T, T_init)`` for target ``t``: decomposed, drawn, or (restoring) placeholders."""
    out_modes, in_modes = t.record["modes"]
    ranks = t.record["ranks"]
    dtype = _cores_dtype(t.module, config)
    if restoring:  # the file supplies both; nothing to decompose or draw
        n = len(ranks) - 1
        shapes = [(ranks[k], out_modes[k], in_modes[k], ranks[k + 1]) for k in range(n)]
        init = [torch.zeros(s, dtype=dtype) for s in shapes]
        return [c.clone() for c in init], init
    gen = None
    if config.seed is not None:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + t.index)
    if config.init == "random":
        init = random_cores(out_modes, in_modes, ranks, generator=gen)
    else:
        w0 = dense_weight(t.module)
        mpo = mpo_decompose(w0, (tuple(out_modes), tuple(in_modes)), config.rank)
        init = [c.cpu() for c in mpo.cores]
        t.record["relative_error"] = float(mpo.relative_error)
    init = [c.to(dtype) for c in init]
    cores = [c.clone() for c in init]
    if not config.init_weights:  # peft's convention: start away from the identity
        for k, c in enumerate(cores):
            scale = float(c.float().abs().mean()) or 0.1
            noise = torch.randn(c.shape, generator=gen) if gen else torch.randn(c.shape)
            cores[k] = c + (0.3 * scale * noise).to(dtype)
    return cores, init
