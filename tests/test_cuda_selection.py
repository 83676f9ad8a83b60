"""One process trains on one GPU: ``--device cuda:N`` is GPU N alone, never DataParallel.

Outside torchrun, transformers' ``TrainingArguments`` take ``cuda:0`` and count every
visible GPU in ``n_gpu``, and the Trainer then wraps the model in ``torch.nn.DataParallel``
over all of them. These tests pretend to have two GPUs (``torch.cuda`` patched, no CUDA
work is done) and check the arguments the Trainer receives: the asked-for GPU, ``n_gpu``
1, not parallel. The step meter waits for the GPU before reading the clock.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from transformers import TrainingArguments
from transformers.training_args import ParallelMode

from tensornet.cli._args import device_arg
from tensornet.cli.finetune import resolve_device
from tensornet.errors import ConfigError, UsageError
from tensornet.finetune.callbacks import callback_classes
from tensornet.finetune.trainer import TrainConfig, _arguments


@pytest.fixture
def two_gpus(monkeypatch):
    """``torch.cuda`` as on a machine with two GPUs; returns the current device (a list)."""
    current = [0]

    def set_device(device):
        current[0] = device if isinstance(device, int) else torch.device(device).index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return current


def _args(tmp_path, device: str) -> TrainingArguments:
    return _arguments(TrainConfig(device=device, batch_size=4), tmp_path, evaluate=False,
                      resume=False)


def test_transformers_alone_would_use_every_gpu(two_gpus, tmp_path):
    # why tensornet pins the device: without it, DataParallel over both GPUs on cuda:0
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=False)
    assert (args.device, args.n_gpu) == (torch.device("cuda", 0), 2)
    assert args.parallel_mode == ParallelMode.NOT_DISTRIBUTED


@pytest.mark.parametrize(("device", "current", "index"),
                         [("cuda:1", 0, 1), ("cuda:0", 1, 0), ("cuda", 0, 0), ("cuda", 1, 1)])
def test_one_process_trains_on_one_gpu(two_gpus, tmp_path, device, current, index):
    two_gpus[0] = current  # the caller's torch.cuda.set_device
    args = _args(tmp_path, device)
    assert args.device == torch.device("cuda", index)
    assert args.n_gpu == 1 and args.parallel_mode == ParallelMode.NOT_PARALLEL
    assert args.train_batch_size == 4  # the whole batch on that one GPU
    assert two_gpus[0] == index  # and it is the current device (accelerate's "cuda")


def test_cpu_stays_on_the_cpu(two_gpus, tmp_path):
    args = _args(tmp_path, "cpu")
    assert (args.device, args.n_gpu) == (torch.device("cpu"), 0)


def test_torchrun_keeps_its_own_gpu_per_process(two_gpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"`device` = 'cuda:1' under torchrun.*give 'cuda'"):
        _args(tmp_path, "cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun --nproc-per-node 1
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        _args(tmp_path, "cuda:1")


@pytest.mark.parametrize(("device", "needle"), [
    ("cuda:2", r"`device` = 'cuda:2', but torch sees 2 CUDA device\(s\): 'cuda:0' to 'cuda:1'"),
])
def test_a_gpu_past_the_last_is_refused(two_gpus, tmp_path, device, needle):
    with pytest.raises(ConfigError, match=needle):
        _args(tmp_path, device)


def test_cuda_on_a_machine_without_it_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="`device` = 'cuda:0', but torch finds no CUDA"):
        _args(tmp_path, "cuda:0")


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "CUDA", "cuda:1 ", 1])
def test_config_names_the_devices_it_takes(device):
    with pytest.raises(ConfigError, match=r"`device` must be 'cpu', 'cuda' or 'cuda:N'.*got"):
        TrainConfig(device=device)


# ------------------------------------------------------------------ the command line


def test_cli_device_keeps_the_index(two_gpus):
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"
    assert two_gpus[0] == 0  # nothing chosen yet: the trainer pins the GPU


def test_cli_device_refusals_name_the_option(two_gpus, monkeypatch):
    with pytest.raises(UsageError, match=r"--device: 'cuda:2', but this machine has 2 CUDA"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--device: 'cuda:1' under torchrun"):
        resolve_device("cuda:1")
    assert resolve_device("cuda") == "cuda"


@pytest.mark.parametrize(("text", "value"),
                         [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"),
                          ("cuda:1", "cuda:1"), ("cuda:01", "cuda:1")])
def test_device_arg_takes(text, value):
    assert device_arg(text) == value


@pytest.mark.parametrize("text", ["CUDA", "Cpu", "gpu", "cuda:", "cuda:x", "cuda:-1", " cpu"])
def test_device_arg_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="choose auto.*cuda:N"):
        device_arg(text)


# ------------------------------------------------------------------ the step meter


class _State:
    global_step = 0
    max_steps = 1


@pytest.mark.parametrize(("device", "syncs"), [("cuda:1", 2), ("cpu", 0)])
def test_step_times_wait_for_the_gpu(monkeypatch, device, syncs):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _, meter_cls = callback_classes()
    meter = meter_cls(torch.device(device), lambda event, info: None)
    meter.on_step_begin(None, _State(), None)
    meter.on_step_end(None, _State(), None)
    # at the start and at the end of the step, on the training GPU (not the current one)
    assert calls == [torch.device(device)] * syncs
    assert len(meter.times) == 1 and math.isfinite(meter.times[0]) and meter.times[0] >= 0
