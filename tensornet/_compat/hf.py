"""transformers: a GGUF model's quantization config, one GPU of several, the warmup length.

Each shim names the transformers internal it relies on and what breaks if that moves;
``tests/test_compat.py`` checks each against the installed transformers. The declared
minimum is ``transformers>=4.45`` (``pyproject.toml``): a shim either works on every
release from there or refuses with an error that names it.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["drop_quantization_config", "pin_one_gpu", "warmup_steps"]


def drop_quantization_config(model: Any) -> None:
    """Forget that ``model`` was loaded through a quantizer (its weights are dense now).

    ``save_pretrained`` refuses a model that still carries ``hf_quantizer`` or
    ``config.quantization_config``. transformers' quantizer offers
    ``remove_quantization_config`` (not part of its documented API); older releases had
    no quantizer on GGUF models, where the config entry is removed by hand.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
        model.is_quantized = False


def pin_one_gpu(args: Any, device: Any) -> None:
    """Make ``TrainingArguments`` ``args`` train on ``device`` alone, without DataParallel.

    Outside torchrun / accelerate launch, ``TrainingArguments`` (4.45 to 5.x, in its
    private ``_setup_devices``) takes ``cuda:0`` whatever the current device and sets
    ``n_gpu`` to every visible GPU; the Trainer then wraps the model in
    ``torch.nn.DataParallel`` over all of them. transformers has no option for one GPU of
    several, so its decision is overwritten on two private names: the device
    ``_setup_devices`` computed, cached by ``functools.cached_property`` in the instance's
    ``__dict__`` (what the public ``args.device`` returns), and ``_n_gpu`` (what
    ``args.n_gpu`` returns), set to 1 as the Trainer itself does for a model spread over
    GPUs by ``device_map``.

    If either name moves (``_setup_devices`` no longer a cached property read by
    ``device``, ``n_gpu`` no longer reading ``_n_gpu``), the overwrite silently does
    nothing and the run would go to every GPU: the result is read back through the public
    properties and refused instead.

    Raises
    ------
    TensornetError
        If the installed transformers does not take the setting.
    """
    vars(args)["_setup_devices"] = device
    args._n_gpu = 1
    if args.device != device or args.n_gpu != 1:
        import transformers

        from ..errors import TensornetError

        raise TensornetError(
            f"transformers {transformers.__version__} ignores tensornet's one-GPU setting "
            f"(TrainingArguments' private _setup_devices / _n_gpu moved; the shim to fix is "
            f"pin_one_gpu in tensornet/_compat/hf.py): it would train on {args.device} with "
            f"n_gpu = {args.n_gpu} instead of {device} alone; run under "
            f"CUDA_VISIBLE_DEVICES=<the GPU's index> or report it"
        )


def warmup_steps(ratio: float, max_steps: int) -> int:
    """The number of warmup steps of a warmup ``ratio`` of ``max_steps``, for ``warmup_steps``.

    transformers 5 reads a float ``warmup_steps`` below 1 as a ratio of the steps and has
    no ``warmup_ratio``; 4.x (the declared minimum is 4.45) reads ``warmup_steps`` as a
    count, where 0.03 would mean no warmup at all, and has ``warmup_ratio`` instead. An
    integer is a count on every release, so the ratio is turned into steps here, rounded
    up as transformers 5 rounds a ratio (``math.ceil(max_steps * ratio)``, in
    ``TrainingArguments.get_warmup_steps``): the same schedule on every version.

    Examples
    --------
    >>> warmup_steps(0.03, 100), warmup_steps(0.03, 10), warmup_steps(0.0, 10)
    (3, 1, 0)
    """
    return math.ceil(max_steps * ratio)
