"""One-line entry points: ``apply_*`` (= ``get_peft_model``) and ``plan_*`` (meta-device counts).

The lifecycle after ``apply_*`` is peft's (``save_pretrained``, ``PeftModel.from_pretrained``,
``merge_and_unload``, ``disable_adapter``, named adapters); nothing here duplicates it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import AdapterReport, count_parameters
from .config import TensornetConfig
from .dota import DoTAConfig
from .lorta import LoRTAConfig
from .lotr import LoTRConfig

__all__ = [
    "apply",
    "apply_dota",
    "apply_lorta",
    "apply_lotr",
    "plan",
    "plan_dota",
    "plan_lorta",
    "plan_lotr",
    "resolve_config",
]


def resolve_config(config: Any, cls: type, overrides: dict[str, Any]) -> Any:
    """``config`` (default ``cls()``) with ``overrides`` applied; refuse another type."""
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"`config` must be a {cls.__name__} or None; got {type(config).__name__}")
    return (config or cls()).replace(**overrides)


def _check_model(model: Any) -> None:
    from peft import PeftModel

    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise ConfigError(
            "`model` already has peft adapters; add another with "
            "model.add_adapter(name, config), or start from the base model"
        )


def _tuner(config: TensornetConfig) -> Any:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]


def apply(
    model: nn.Module,
    config: TensornetConfig,
    *,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
) -> Any:
    """``peft.get_peft_model(model, config)`` for a tensornet config, checked first.

    Every target is validated before the model changes (see
    :class:`~tensornet.adapters.tuner.TensornetTuner`); a failure leaves it as it was.

    Parameters
    ----------
    model : nn.Module
        The base model (not already a ``PeftModel``: add more adapters with
        ``add_adapter``).
    config : DoTAConfig, LoTRConfig or LoRTAConfig
        The adapter.
    adapter_name : str
        Name of the adapter (peft's ``"default"``).
    autocast_adapter_dtype : bool
        peft's option: True upcasts bfloat16/float16 adapter weights to float32 (the
        trained copy; the base keeps its dtype). False keeps them in the dtype the config
        asks for (``DoTAConfig(dtype="bfloat16")``, QDoTA's bfloat16 cores).

    Returns
    -------
    peft.PeftModel

    Examples
    --------
    >>> from tensornet.adapters import LoTRConfig, apply, tiny_llama
    >>> model = apply(tiny_llama(), LoTRConfig(rank=4))
    >>> type(model).__name__, model.active_adapters
    ('PeftModel', ['default'])
    """
    from peft import get_peft_model

    if not isinstance(config, TensornetConfig):
        raise ConfigError(
            f"`config` must be a tensornet adapter config (DoTAConfig, LoTRConfig, "
            f"LoRTAConfig); got {type(config).__name__}"
        )
    _check_model(model)
    return get_peft_model(
        model, config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )


def plan(model: nn.Module, config: TensornetConfig) -> AdapterReport:
    """What :func:`apply` would build, counted without weights and without changes.

    Works on a model built on the meta device (a 7B model costs no memory).

    Returns
    -------
    AdapterReport
        One :class:`LayerReport` per target (modes and ranks for DoTA), the trainable
        parameters and their share of the model.

    Examples
    --------
    >>> import torch
    >>> from tensornet.adapters import DoTAConfig, plan, tiny_llama
    >>> with torch.device("meta"):
    ...     model = tiny_llama()
    >>> report = plan(model, DoTAConfig(rank=8, num_cores=3))
    >>> report.method, len(report.layers), report.trainable_params
    ('dota', 10, 16640)

    The three methods at their defaults on LLaMA-2-7B (as in the tables of
    :doc:`/guide/parameter-counts`):

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from tensornet.adapters import LoRTAConfig, LoTRConfig
    >>> cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    ...                   num_attention_heads=32, vocab_size=32000)
    >>> with torch.device("meta"):
    ...     llama2 = LlamaForCausalLM(cfg)
    >>> [plan(llama2, c).trainable_params for c in (DoTAConfig(), LoTRConfig(), LoRTAConfig())]
    [10043392, 917504, 68672]
    >>> f"{100 * plan(llama2, DoTAConfig()).trainable_share:.3f}%"
    '0.149%'
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
    tuner = _tuner(config)
    targets = tuner.validate(model, config, need_weights=False)
    layers, trainable, extra = tuner.count(model, targets, config)
    _, total = count_parameters(model)
    return AdapterReport(
        config.method, layers, trainable, total + trainable, {"config": config.to_dict(), **extra}
    )


def apply_dota(model: nn.Module, config: DoTAConfig | None = None, **overrides: Any) -> Any:
    """Add DoTA adapters to ``model`` (``get_peft_model`` with a :class:`DoTAConfig`).

    Each target weight ``W0`` is decomposed (MPO, :func:`tensornet.mpo_decompose`); the
    cores train, ``W0`` stays as it is, and the model computes what it computed before.

    Parameters
    ----------
    model : nn.Module
        Any model with ``nn.Linear`` (or bitsandbytes ``Linear4bit``) targets, e.g. a
        transformers LLaMA.
    config : DoTAConfig, optional
        Defaults to the paper's: q, k, v, up, down projections, ``N = 5``, ``R = 16``.
    **overrides
        Fields of :class:`DoTAConfig` to change (``rank=32``, ``quantize="nf4"``, ...).

    Returns
    -------
    peft.PeftModel
        What ``peft.get_peft_model`` returns: save with ``save_pretrained``, reload with
        ``PeftModel.from_pretrained``, merge with ``merge_and_unload``.

    Raises
    ------
    ConfigError
        A bad config value, no matching target, a target that is not linear, a model
        that already has adapters; the model is left untouched.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama, apply_dota
    >>> model = apply_dota(tiny_llama())
    >>> model.get_nb_trainable_parameters()
    (39232, 121472)
    """
    return apply(model, resolve_config(config, DoTAConfig, overrides))


def plan_dota(
    model: nn.Module, config: DoTAConfig | None = None, **overrides: Any
) -> AdapterReport:
    """Report what :func:`apply_dota` would do, without weights and without changes.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama
    >>> report = plan_dota(tiny_llama(), num_cores=3)   # LLaMA-2-7B: see :func:`plan`
    >>> report.layers[0].out_modes, report.layers[0].in_modes, report.trainable_params
    ((4, 4, 4), (4, 4, 4), 53504)
    """
    return plan(model, resolve_config(config, DoTAConfig, overrides))


def apply_lotr(model: nn.Module, config: LoTRConfig | None = None, **overrides: Any) -> Any:
    """Add LoTR adapters to ``model`` (``get_peft_model`` with a :class:`LoTRConfig`).

    Every target keeps its weight and gains ``s A G_l B``: ``A`` and ``B`` are shared by the
    layers of one kind (every ``q_proj``, ...), ``G_l`` is the layer's own. Only these
    train; ``G_l = 0`` at start, so the model computes what it computed before.

    Parameters
    ----------
    model : nn.Module
        A model with ``nn.Linear`` targets, e.g. a transformers LLaMA.
    config : LoTRConfig, optional
        Default: q, k, v, up, down projections, ``r = 16``, ``s = 1``, normal init.
    **overrides
        Fields of :class:`LoTRConfig` to change (``rank=8``, ``init="orthogonal"``, ...).

    Returns
    -------
    peft.PeftModel
        What ``peft.get_peft_model`` returns; the shared pairs are
        ``model.base_model.lotr_A`` / ``lotr_B`` (adapter -> kind -> factor).

    Raises
    ------
    ConfigError
        A bad config value, no matching target, a target that is not ``nn.Linear``,
        layers of one kind with different shapes, a model that already has adapters; the
        model is left untouched.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama, apply_lotr
    >>> model = apply_lotr(tiny_llama(), rank=4)
    >>> model.get_nb_trainable_parameters()
    (2976, 85216)
    >>> sorted(model.base_model.lotr_A["default"])
    ['down_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj']
    """
    return apply(model, resolve_config(config, LoTRConfig, overrides))


def plan_lotr(
    model: nn.Module, config: LoTRConfig | None = None, **overrides: Any
) -> AdapterReport:
    """Report what :func:`apply_lotr` would do, without weights and without changes.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama
    >>> report = plan_lotr(tiny_llama(), rank=4)   # LLaMA-2-7B: see :func:`plan`
    >>> report.trainable_params, report.extra["shared_params"]
    (2976, 2816)
    """
    return plan(model, resolve_config(config, LoTRConfig, overrides))


def apply_lorta(model: nn.Module, config: LoRTAConfig | None = None, **overrides: Any) -> Any:
    """Add LoRTA adapters to the attention projections of ``model`` (``get_peft_model``).

    Reads ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``
    and ``num_hidden_layers`` from ``model.config`` and the layer index from each module
    name (``model.layers.<l>.self_attn.<q|k|v|o>_proj``). The base weights are not
    modified; only the CP factors train, and ``B = 0`` keeps the outputs unchanged at start.

    Parameters
    ----------
    model : nn.Module
        A transformers LLaMA-style model (``model.config`` and the module names above).
    config : LoRTAConfig, optional
        Default: q, k, v, o; ``r = 16``; ``scale = 1``.
    **overrides
        Fields of :class:`LoRTAConfig` to change.

    Returns
    -------
    peft.PeftModel
        What ``peft.get_peft_model`` returns; the CP factors are
        ``model.base_model.lorta_A``, ``lorta_B``, ``lorta_C_head``, ... (adapter -> factor).

    Raises
    ------
    ConfigError
        A bad config value, a model without the config fields or projections, a
        projection whose shape does not fit the config, a model that already has
        adapters; the model is left untouched.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama, apply_lorta
    >>> model = apply_lorta(tiny_llama(), rank=4)   # 4 heads, 2 key/value heads: C_kv_head
    >>> model.get_nb_trainable_parameters()
    (368, 82608)
    """
    return apply(model, resolve_config(config, LoRTAConfig, overrides))


def plan_lorta(
    model: nn.Module, config: LoRTAConfig | None = None, **overrides: Any
) -> AdapterReport:
    """Report what :func:`apply_lorta` would do, without weights and without changes.

    Examples
    --------
    >>> from tensornet.adapters import tiny_llama
    >>> plan_lorta(tiny_llama(), rank=4).trainable_params   # 4 (64 + 16 + 4 + 2 + 4 + 2)
    368
    """
    return plan(model, resolve_config(config, LoRTAConfig, overrides))
