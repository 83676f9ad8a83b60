"""What a training run measures and keeps beside ``transformers.Trainer``, as its callbacks.

The Trainer does the training loop (optimizer and schedule, mixed precision, DDP,
checkpoints with exact resume); these callbacks add what it does not do:

* keeping the best model by validation loss *in memory* (the Trainer only loads the best
  checkpoint back, which needs a checkpoint at every evaluation; a full fine-tuning
  checkpoint of SmolLM2 is 1.6 GB with its optimizer state) and persisting it into each
  checkpoint (:data:`BEST_FILE`, the last file of a save), so that a resumed run ends on
  the same best model; a checkpoint is complete once it is there (:func:`last_checkpoint`);
* the step time (measured after the GPU has finished the step's work) and peak memory of
  the run (:class:`MemoryMeter`);
* the events a progress display needs (:data:`Callback`).

transformers is imported when :func:`callback_classes` is first called, not with this
module.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Callback",
    "MemoryMeter",
    "callback_classes",
    "last_checkpoint",
    "CHECKPOINT_DIR",
    "BEST_FILE",
]

#: Folder (under a run's folder) of the Trainer's checkpoints.
CHECKPOINT_DIR = "checkpoints"
#: The best trainable state so far, written into every checkpoint by the best-model callback.
BEST_FILE = "tensornet_best.pt"

#: A progress callback receives an event name and a dict of numbers.
Callback = Callable[[str, dict[str, Any]], None]


def _step_clock(device: str | torch.device) -> Callable[[], float]:
    """``time.perf_counter``, read once ``device`` has finished the work queued on it.

    CUDA kernels run asynchronously: without the synchronization a step's time would be the
    time to queue its kernels, and whatever the GPU had not finished would be charged to
    the next step or to none. On the CPU the plain clock. Chosen once, per run.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


class MemoryMeter:
    """Peak memory of a run: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS on CPU.

    On Linux the kernel's peak RSS (``VmHWM``) is reset at :meth:`start` when
    ``/proc/self/clear_refs`` allows it; otherwise the RSS is sampled at each
    :meth:`sample` call and the maximum kept. On a GPU the counters are those of
    ``device`` (of the current GPU for ``"cuda"`` without an index).
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
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
            torch.cuda.reset_peak_memory_stats(self.device)
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
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._hwm:
            return max(self._status("VmHWM"), self._max)
        self.sample()
        return self._max


def callback_classes() -> tuple[type, type]:
    """The Trainer callbacks ``(BestModel, Meter)``: the best model kept, the run measured.

    ``BestModel(named_parameters)`` keeps (``load_best``) and checkpoints the trainable
    parameters of the lowest validation loss; ``Meter(device, emit)`` times the steps on
    ``device``, samples its peak memory (``meter``) and relays the progress events to
    ``emit``. Classes made on first call, so that transformers is imported only then.
    """
    from transformers import TrainerCallback

    class BestModel(TrainerCallback):
        """Keep the trainable parameters of the lowest validation loss; persist them."""

        def __init__(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
            self.named = named
            self.best = math.inf
            self.best_step = 0
            self.state: dict[str, torch.Tensor] | None = None

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                        **kwargs: Any) -> None:
            loss = (metrics or {}).get("eval_loss")
            if loss is not None and loss < self.best:
                self.best, self.best_step = float(loss), int(state.global_step)
                self.state = {n: p.detach().to("cpu", copy=True) for n, p in self.named}

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # the last file of a checkpoint, and atomic: its presence marks the checkpoint
            # complete (last_checkpoint)
            part = folder / (BEST_FILE + ".part")
            torch.save({"best": self.best, "best_step": self.best_step, "state": self.state},
                       part)
            os.replace(part, folder / BEST_FILE)
            _drop_other_checkpoints(folder)

        def restore_from(self, checkpoint: Path) -> None:
            saved = torch.load(checkpoint / BEST_FILE, map_location="cpu", weights_only=True)
            self.best, self.best_step, self.state = (
                saved["best"], saved["best_step"], saved["state"]
            )

        def load_best(self) -> None:
            if self.state is None:
                return
            with torch.no_grad():
                for n, p in self.named:
                    p.copy_(self.state[n].to(p.device))

    class Meter(TrainerCallback):
        """Step times and peak memory; relays the events to a progress callback."""

        def __init__(self, device: str | torch.device, emit: Callback) -> None:
            self.meter = MemoryMeter(device)
            self.clock = _step_clock(device)
            self.emit = emit
            self.times: list[float] = []
            self.t0 = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.meter.start()
            self.emit("start", {"step": state.global_step, "steps": state.max_steps})

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = self.clock()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(self.clock() - self.t0)
            self.meter.sample()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                self.emit("step", {"step": state.global_step, "loss": float(logs["loss"]),
                                   "lr": float(logs.get("learning_rate", math.nan))})
            if "eval_loss" in logs:
                self.emit("eval", {"step": state.global_step,
                                   "val_loss": float(logs["eval_loss"])})

    return BestModel, Meter


def last_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete Trainer checkpoint of the run in ``out_dir``, or None.

    A checkpoint is complete once the Trainer has written its state
    (``trainer_state.json``) and the best-model callback its :data:`BEST_FILE`, the last file of
    a save, written atomically. A save interrupted half-way (a killed run) leaves a folder
    without them; it is skipped, so ``--resume`` takes the last complete one (transformers'
    ``get_last_checkpoint`` picks the newest folder whatever it holds).
    """
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        step = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if step and (path / "trainer_state.json").is_file() and (path / BEST_FILE).is_file():
            found.append((int(step.group(1)), path))
    return max(found)[1] if found else None


def _drop_other_checkpoints(kept: Path) -> None:
    """Remove every checkpoint folder beside ``kept``, once ``kept`` is complete.

    The Trainer's own rotation (``save_total_limit``) deletes the previous checkpoint
    before the best-model callback has marked the new one complete: a run killed in between
    would have none to resume from. Here the previous one goes only after the new one is
    whole; a stale, partial folder of an interrupted save goes too. Each is renamed out of
    sight first, so a removal cut short leaves no half-deleted checkpoint behind.
    """
    for path in kept.parent.iterdir():
        if path != kept and re.fullmatch(r"checkpoint-\d+", path.name) and path.is_dir():
            trash = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
