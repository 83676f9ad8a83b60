"""One training run on Hugging Face ``transformers.Trainer``, with the DoTA paper's recipe.

The recipe (appendix B): AdamW, a cosine learning-rate schedule with a warmup ratio of
0.03, no dropout, bf16 computation, the checkpoint with the lowest validation loss kept.
Everything a training loop needs (the optimizer and schedule, mixed precision with float32
master weights, gradient clipping, DDP/FSDP under ``torchrun`` or ``accelerate launch``,
checkpoints with the optimizer/scheduler/RNG states and exact resume) is the Trainer's.
This module is the glue: the run's settings (:class:`TrainConfig`), the Trainer's
arguments, and the run itself (:func:`train`). What the Trainer does not do (the best
model kept by validation loss, step times, peak memory, progress events) is done by the
callbacks of :mod:`tensornet.finetune.callbacks`; which processes train and on which GPU
is :mod:`tensornet.finetune.devices`.

One process trains on one device: ``cuda:N`` (or ``cuda``, the current GPU) is GPU N alone,
never ``torch.nn.DataParallel`` over every visible GPU, which is what transformers does by
default outside ``torchrun`` (see ``_one_gpu``); several GPUs are DDP's, one process
each, under ``torchrun`` or ``accelerate launch``.

Checkpoints are what the Trainer writes under ``out_dir/checkpoints``: for a peft model the
adapter only (``adapter_model.safetensors``) plus ``optimizer.pt``, ``scheduler.pt``,
``rng_state*.pth`` and ``trainer_state.json``; for full fine-tuning the whole model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from .._compat.hf import pin_one_gpu, warmup_steps
from ..errors import ConfigError
from .callbacks import (
    BEST_FILE,
    CHECKPOINT_DIR,
    Callback,
    MemoryMeter,
    callback_classes,
    last_checkpoint,
)
from .devices import (
    DEVICE_PATTERN,
    gpu_index,
    is_launched,
    is_main_process,
    wait_for_everyone,
    world_size,
)
from .evaluate import pad_id
from .examples import Example
from .methods import BuiltMethod, save_trained
from .tokens import collate, encode_all

__all__ = [
    "TrainConfig",
    "TrainResult",
    "MemoryMeter",
    "train",
    "last_checkpoint",
    "world_size",
    "is_launched",
    "is_main_process",
    "wait_for_everyone",
    "CHECKPOINT_DIR",
    "BEST_FILE",
]

Precision = Literal["no", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes
    ----------
    steps : int
        Optimizer steps.
    batch_size : int
        Examples per optimizer step, over all processes (the global batch); under DDP
        each of ``WORLD_SIZE`` processes takes ``batch_size / WORLD_SIZE`` of them.
    lr : float
        Peak learning rate.
    warmup_ratio : float
        Share of the steps with a linear warmup (the paper: 0.03).
    weight_decay : float
        AdamW weight decay.
    max_grad_norm : float
        Gradient clipping (0 disables).
    max_length : int
        Tokens per example, prompt and response together.
    eval_every : int
        Validation loss every this many steps (and at step 0 and at the end).
    checkpoint_every : int
        Write a resumable checkpoint every this many steps (0: never).
    seed : int
        Seed of the data order and of torch's RNG (the Trainer's ``seed``/``data_seed``).
    eval_batch_size : int
        Batch size of the validation loss, per process.
    device : {"cpu", "cuda"} or str
        Where to train; the Trainer moves the model there. ``"cuda:N"`` trains on GPU N
        alone, ``"cuda"`` on the current GPU alone (``torch.cuda.current_device()``, GPU 0
        unless the caller chose another); under torchrun / accelerate launch each process
        takes the GPU of its ``LOCAL_RANK`` and ``device`` must be ``"cuda"``.
    precision : {"no", "bf16", "fp16"}
        Mixed precision (autocast) of the computation; the trainable parameters stay in
        their own dtype (float32 master weights).
    """

    steps: int = 100
    batch_size: int = 4
    lr: float = 3e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    eval_every: int = 10
    checkpoint_every: int = 0
    seed: int = 0
    eval_batch_size: int = 8
    device: str = "cpu"
    precision: Precision = "no"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "eval_every", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"`{name}` must be a positive int; got {v!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(
                f"`checkpoint_every` must be an int >= 0; got {self.checkpoint_every!r}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"`lr` must be a positive number; got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"`warmup_ratio` must be in [0, 1); got {self.warmup_ratio!r}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"`device` must be 'cpu', 'cuda' or 'cuda:N' (N a GPU index, e.g. 'cuda:1'); "
                f"got {self.device!r}"
            )
        if self.precision not in ("no", "bf16", "fp16"):
            raise ConfigError(
                f"`precision` must be 'no', 'bf16' or 'fp16'; got {self.precision!r}"
            )

    def key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one."""
        keep = ("steps", "batch_size", "lr", "warmup_ratio", "weight_decay", "max_grad_norm",
                "max_length", "eval_every", "seed", "precision")
        return {k: getattr(self, k) for k in keep}


@dataclass
class TrainResult:
    """What a run produced; ``to_dict()`` is JSON-ready."""

    method: str
    trainable_params: int
    total_params: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_step: int = 0
    step_time_s: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = "rss"
    resumed_from: int | None = None

    @property
    def final_val_loss(self) -> float:
        """Validation loss at the last evaluation."""
        return self.val_loss[-1][1] if self.val_loss else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        out = dataclasses.asdict(self)
        out["final_val_loss"] = self.final_val_loss
        out["trainable_share"] = (
            self.trainable_params / self.total_params if self.total_params else 0.0
        )
        return out


def _one_gpu(args: Any, index: int) -> None:
    """Make ``args`` train on GPU ``index`` alone, without ``torch.nn.DataParallel``.

    Outside torchrun / accelerate launch, transformers' ``TrainingArguments`` takes
    ``cuda:0`` whatever the current device, sets ``n_gpu`` to every visible GPU, and the
    Trainer then wraps the model in ``torch.nn.DataParallel``: each step would run on all
    of them (and DataParallel does not replicate LoTR's and LoRTA's factors shared between
    layers). transformers has no option for one GPU of several, so its decision is
    overwritten here, once, by :func:`tensornet._compat.hf.pin_one_gpu` (on transformers'
    private names; it refuses where they moved). ``torch.cuda.set_device`` makes GPU
    ``index`` current again: accelerate's device is ``"cuda"`` (the current one), and so
    are the CUDA RNG state a checkpoint saves and the counters of :class:`MemoryMeter`.

    Why not ``CUDA_VISIBLE_DEVICES=index`` set in the process: the CUDA driver reads it
    once, when it is initialized, which has usually happened by now
    (``torch.cuda.is_available()`` initializes it, as does any CUDA work of the caller);
    set later, it silently does nothing. It would also renumber the GPUs (the process's
    ``cuda:0`` being the machine's ``index``), compose badly with a ``CUDA_VISIBLE_DEVICES``
    the user set, and be inherited by child processes.

    Raises
    ------
    TensornetError
        If the installed transformers no longer takes the setting (an upstream change:
        fail rather than train on every GPU).
    """
    target = torch.device("cuda", index)
    pin_one_gpu(args, target)
    torch.cuda.set_device(target)


def _arguments(config: TrainConfig, out: Path, *, evaluate: bool, resume: bool) -> Any:
    from transformers import TrainingArguments

    world = world_size()
    if config.batch_size % world:
        raise ConfigError(
            f"`batch_size` = {config.batch_size} (the global batch) must be a multiple of "
            f"the {world} training processes"
        )
    index = gpu_index(config.device)
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size // world,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        # an integer: a float < 1 is a ratio under transformers 5 only, 0 steps under 4.x
        warmup_steps=warmup_steps(config.warmup_ratio, config.steps),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_every,
        eval_on_start=evaluate and not resume,
        save_strategy="steps" if config.checkpoint_every else "no",
        save_steps=config.checkpoint_every or 1,
        save_total_limit=None,  # BestModel drops the older ones once a save is complete
        logging_strategy="steps",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=config.device == "cpu",
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if config.device == "cpu" and world > 1 else None,
    )
    if index is not None:
        _one_gpu(args, index)
    return args


def train(
    built: BuiltMethod,
    tokenizer: Any,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    callback: Callback | None = None,
    trainer_callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train ``built.model`` with ``transformers.Trainer``; end on the best validation loss.

    Parameters
    ----------
    built : BuiltMethod
        From :func:`tensornet.finetune.methods.build_method`.
    tokenizer
        The model's tokenizer (with a pad or EOS token).
    train_examples, val_examples : sequence of Example
    config : TrainConfig
    out_dir : str or PathLike
        Receives ``adapter/`` (the best model, :func:`~tensornet.finetune.methods.save_trained`,
        written by the main process) and the Trainer's checkpoints under
        ``checkpoints/`` (with ``config.checkpoint_every``).
    resume : bool
        Continue from the newest checkpoint in ``out_dir/checkpoints``; the caller checks
        that it comes from the same model, method, data and settings (the CLI does).
    callback : callable, optional
        ``callback(event, info)`` with events ``"start"`` (``step``, ``steps``), ``"step"``
        (``step``, ``loss``, ``lr``) and ``"eval"`` (``step``, ``val_loss``).
    trainer_callbacks : sequence of transformers.TrainerCallback
        More callbacks for the Trainer.

    Returns
    -------
    TrainResult
        Losses, best validation loss and step, mean step time, peak memory. On return the
        model holds the parameters of the best validation loss (the last ones without a
        validation set).

    Raises
    ------
    ConfigError
        No training examples, no checkpoint to resume, a global batch the processes
        cannot share, or a ``device`` this process cannot train on (no CUDA, ``cuda:N``
        past the last GPU or under torchrun).
    DataError
        A ``max_length`` that leaves an example no response token.
    """
    from transformers import PrinterCallback, ProgressCallback, Trainer

    if not train_examples:
        raise ConfigError("no training examples")
    out = Path(out_dir)
    emit = callback or (lambda event, info: None)
    train_enc = encode_all(tokenizer, train_examples, config.max_length, split="training")
    val_enc = encode_all(tokenizer, val_examples, config.max_length, split="validation")
    checkpoint = last_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint under {out / CHECKPOINT_DIR}")
    args = _arguments(config, out, evaluate=bool(val_enc), resume=resume)
    best_cb, meter_cb = callback_classes()
    best = best_cb(built.trainable_named_parameters())
    meter = meter_cb(args.device, emit)  # the GPU it really is: cuda:N, or LOCAL_RANK's
    if checkpoint is not None:
        best.restore_from(checkpoint)
    trainer = Trainer(
        model=built.model,
        args=args,
        train_dataset=train_enc,
        eval_dataset=val_enc or None,
        data_collator=partial(collate, pad_token_id=pad_id(tokenizer)),
        callbacks=[best, meter, *trainer_callbacks],
    )
    for cb in (PrinterCallback, ProgressCallback):  # the caller draws its own progress
        trainer.remove_callback(cb)
    built.model.train()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    built.model.eval()
    best.load_best()
    result = TrainResult(built.method, built.trainable_params, built.total_params)
    for entry in trainer.state.log_history:
        if "loss" in entry:
            result.train_loss.append((int(entry["step"]), float(entry["loss"])))
        if "eval_loss" in entry:
            result.val_loss.append((int(entry["step"]), float(entry["eval_loss"])))
    result.best_val_loss, result.best_step = best.best, best.best_step
    times = meter.times[1:] if len(meter.times) > 1 else meter.times  # the first warms up
    result.step_time_s = float(sum(times) / len(times)) if times else 0.0
    result.peak_memory_bytes = meter.meter.peak()
    result.memory_kind = meter.meter.kind
    if checkpoint is not None:
        result.resumed_from = int(checkpoint.name.rsplit("-", 1)[1])
    del trainer
    if is_main_process():
        save_trained(built, out / "adapter")
    wait_for_everyone(config.device)
    return result
