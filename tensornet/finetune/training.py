"""The training loop: AdamW + cosine schedule with warmup, evaluation, checkpoint/resume.

The recipe is the DoTA paper's (appendix B): AdamW, a cosine learning-rate schedule with
a warmup ratio of 0.03, no dropout, the checkpoint with the lowest validation loss kept.

Resuming is exact: a checkpoint holds the trainable parameters, the optimizer and
scheduler states, the step, the RNG states and the training history, and the data order
is a function of the seed and the step alone. A run interrupted after a checkpoint and
resumed from it reaches the same parameters as an uninterrupted run with the same seed;
at most the steps since the last checkpoint are lost.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from ..errors import ConfigError
from .methods import BuiltMethod, save_trained
from .tasks import IGNORE_INDEX, Example, collate, encode_example, extract_answer, format_prompt

__all__ = [
    "TrainConfig",
    "TrainResult",
    "MemoryMeter",
    "train",
    "evaluate_loss",
    "evaluate_accuracy",
    "CHECKPOINT_FILE",
]

CHECKPOINT_FILE = "checkpoint.pt"

#: A progress callback receives an event name and a dict of numbers.
Callback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes
    ----------
    steps : int
        Optimizer steps.
    batch_size : int
        Examples per step.
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
        Seed of the data order and of torch's RNG.
    eval_batch_size : int
        Batch size of the validation loss.
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


class MemoryMeter:
    """Peak memory of a run: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS on CPU.

    On Linux the kernel's peak RSS (``VmHWM``) is reset at :meth:`start` when
    ``/proc/self/clear_refs`` allows it; otherwise the RSS is sampled at each
    :meth:`sample` call and the maximum kept.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss"
        self._hwm = False
        self._max = 0

    @staticmethod
    def _status(field_name: str) -> int:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def start(self) -> None:
        """Reset the peak."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            self._hwm = True
        except OSError:
            self._hwm = False
        self._max = self._status("VmRSS")

    def sample(self) -> None:
        """Record the current memory (no-op where the kernel tracks the peak)."""
        if not self.cuda and not self._hwm:
            self._max = max(self._max, self._status("VmRSS"))

    def peak(self) -> int:
        """Peak bytes since :meth:`start`."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        if self._hwm:
            return max(self._status("VmHWM"), self._max)
        self.sample()
        return self._max


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _encode(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[dict]:
    return [encode_example(tokenizer, ex, max_length=max_length) for ex in examples]


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    encoded: Sequence[dict[str, list[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
) -> float:
    """Mean cross-entropy per response token over ``encoded`` examples.

    Examples are encoded with :func:`tensornet.finetune.tasks.encode_example`; prompt
    tokens (label ``-100``) do not count.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i : i + batch_size], pad_token_id=pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(loss)
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> tuple[float, list[dict[str, Any]]]:
    """Exact-match accuracy of the final number under greedy decoding.

    Returns
    -------
    accuracy : float
        Share of ``examples`` whose generated final number (:func:`extract_answer`)
        equals the expected one (``example.answer``, or the number of the reference
        response).
    predictions : list of dict
        ``prompt``, ``generated``, ``predicted`` and ``expected`` per example.
    """
    if not examples:
        return math.nan, []
    was_training = model.training
    model.eval()
    device = _device_of(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    preds: list[dict[str, Any]] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            enc = tokenizer(
                [format_prompt(tokenizer, ex.prompt) for ex in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=_pad_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            )
            width = enc["input_ids"].shape[1]
            for ex, seq in zip(chunk, out):
                text = tokenizer.decode(seq[width:], skip_special_tokens=True)
                expected = ex.answer if ex.answer is not None else extract_answer(ex.response)
                preds.append(
                    {
                        "prompt": ex.prompt,
                        "generated": text,
                        "predicted": extract_answer(text),
                        "expected": expected,
                    }
                )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    correct = sum(p["predicted"] is not None and p["predicted"] == p["expected"] for p in preds)
    return correct / len(preds), preds


class _Order:
    """The data order: a fresh permutation per epoch, a function of the seed alone."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen).tolist()
        return self._perms[epoch]

    def batch(self, step: int, size: int) -> list[int]:
        return [self._perm(p // self.n)[p % self.n] for p in range(step * size, (step + 1) * size)]


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global RNG is what we restore
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _config_key(config: TrainConfig, method: str) -> dict[str, Any]:
    keep = ("steps", "batch_size", "lr", "warmup_ratio", "weight_decay", "max_length", "seed")
    return {"method": method, **{k: getattr(config, k) for k in keep}}


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
) -> TrainResult:
    """Train ``built.model`` on ``train_examples``; keep the best model by validation loss.

    Parameters
    ----------
    built : BuiltMethod
        From :func:`tensornet.finetune.methods.build_method`.
    tokenizer
        The model's tokenizer (with a pad or EOS token).
    train_examples, val_examples : sequence of Example
    config : TrainConfig
    out_dir : str or PathLike
        Receives ``adapter/`` (the best model's adapter, rewritten atomically at each
        improvement) and ``checkpoint.pt`` (with ``config.checkpoint_every``).
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` (which must come from the same method
        and settings).
    callback : callable, optional
        ``callback(event, info)`` with events ``"start"``, ``"step"`` (``step``, ``loss``,
        ``lr``), ``"eval"`` (``step``, ``val_loss``), ``"checkpoint"`` (``step``).

    Returns
    -------
    TrainResult
        Losses, best validation loss and step, mean step time, peak memory. On return
        the model holds the parameters of the best validation loss.

    Raises
    ------
    ConfigError
        No training examples, or a checkpoint that does not match the settings.
    """
    if not train_examples:
        raise ConfigError("no training examples")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emit = callback or (lambda event, info: None)
    model = built.model
    device = _device_of(model)
    pad = _pad_id(tokenizer)
    train_enc = _encode(tokenizer, train_examples, config.max_length)
    val_enc = _encode(tokenizer, val_examples, config.max_length)
    named = built.trainable_named_parameters()
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    warmup = math.ceil(config.warmup_ratio * config.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
    result = TrainResult(built.method, built.trainable_params, built.total_params)
    order = _Order(len(train_enc), config.seed)
    best_state: dict[str, torch.Tensor] | None = None
    start = 0
    ckpt_path = out / CHECKPOINT_FILE
    if resume:
        start, best_state = _restore(ckpt_path, config, built, optimizer, scheduler, result)
        result.resumed_from = start
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)  # noqa: NPY002
    meter = MemoryMeter(device)
    meter.start()
    emit("start", {"step": start, "steps": config.steps})

    def evaluate(step: int) -> None:
        nonlocal best_state
        loss = evaluate_loss(model, val_enc, pad_token_id=pad, batch_size=config.eval_batch_size)
        result.val_loss.append((step, loss))
        improved = loss < result.best_val_loss
        if improved:
            result.best_val_loss, result.best_step = loss, step
            best_state = {n: p.detach().clone() for n, p in named}
            save_trained(built, out / "adapter")
        emit("eval", {"step": step, "val_loss": loss, "best": improved})

    if start == 0 and val_enc and not result.val_loss:
        evaluate(0)
    step_times = []
    model.train()
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        batch = collate([train_enc[i] for i in order.batch(step, config.batch_size)],
                        pad_token_id=pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        meter.sample()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        done = step + 1
        value = float(loss.detach())
        result.train_loss.append((done, value))
        emit("step", {"step": done, "loss": value, "lr": scheduler.get_last_lr()[0]})
        if val_enc and (done % config.eval_every == 0 or done == config.steps):
            evaluate(done)
            model.train()
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            _save_checkpoint(ckpt_path, done, config, built, optimizer, scheduler, result,
                             best_state)
            emit("checkpoint", {"step": done})
    model.eval()
    result.step_time_s = float(np.mean(step_times)) if step_times else 0.0
    result.peak_memory_bytes = meter.peak()
    result.memory_kind = meter.kind
    if best_state is not None:
        with torch.no_grad():
            for n, p in named:
                p.copy_(best_state[n])
    else:  # no validation set: the final model is the one kept
        save_trained(built, out / "adapter")
    return result


def _save_checkpoint(
    path: Path,
    step: int,
    config: TrainConfig,
    built: BuiltMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    result: TrainResult,
    best_state: dict[str, torch.Tensor] | None,
) -> None:
    state = {
        "step": step,
        "key": _config_key(config, built.method),
        "params": {n: p.detach().clone() for n, p in built.trainable_named_parameters()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "train_loss": list(result.train_loss),
        "val_loss": list(result.val_loss),
        "best_val_loss": result.best_val_loss,
        "best_step": result.best_step,
        "best_state": best_state,
    }
    _atomic_torch_save(state, path)


def _restore(
    path: Path,
    config: TrainConfig,
    built: BuiltMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    result: TrainResult,
) -> tuple[int, dict[str, torch.Tensor] | None]:
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path} (was --checkpoint-every set?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a user-facing error
        raise ConfigError(f"--resume: cannot read the checkpoint {path}: {exc}") from None
    key = _config_key(config, built.method)
    if state.get("key") != key:
        raise ConfigError(
            f"--resume: the checkpoint {path} was written with other settings "
            f"({state.get('key')}); this run has {key}"
        )
    named = dict(built.trainable_named_parameters())
    if set(named) != set(state["params"]):
        raise ConfigError(f"--resume: the checkpoint {path} holds other trainable parameters")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(state["params"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    result.train_loss = [tuple(x) for x in state["train_loss"]]
    result.val_loss = [tuple(x) for x in state["val_loss"]]
    result.best_val_loss = state["best_val_loss"]
    result.best_step = state["best_step"]
    return int(state["step"]), state["best_state"]
