"""The compatibility layer: every foreign private name tensornet uses, checked upstream.

Each test names the shim in tensornet/_compat/ to fix when it fails: an upgrade of peft,
transformers, bitsandbytes or torch that moves a name fails here, loudly.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1] / "tensornet"


# ------------------------------------------------------------------ bitsandbytes (_compat/bnb)


def test_bnb_names_the_shims_use_exist():
    bnb = pytest.importorskip("bitsandbytes")
    # _compat.bnb.dequantize_4bit: restores the canonical layout of a CPU-repacked weight
    assert callable(bnb.functional._convert_weight_packed_for_cpu_inverse)
    # _compat.bnb.keep_one_cpu_kernel: the instance attribute Linear4bit.forward reads
    assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit)


def _nf4_layer():
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64, generator=gen), requires_grad=False,
                                     quant_type="nf4")
    return layer.to("cpu")


def test_bnb_is_4bit_and_dequantize_after_an_inference_forward():
    pytest.importorskip("bitsandbytes")
    from tensornet._compat.bnb import dequantize_4bit, is_4bit, keep_one_cpu_kernel

    layer = _nf4_layer()
    assert is_4bit(layer) and not is_4bit(torch.nn.Linear(2, 2))
    before = dequantize_4bit(layer.weight).clone()
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = layer(x)  # may repack the weight for another CPU kernel
    assert torch.equal(dequantize_4bit(layer.weight), before)  # read back canonically
    keep_one_cpu_kernel(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ before.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first, x @ before.T, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------- transformers (_compat/hf)


def test_transformers_quantizer_can_drop_its_config():
    from transformers.quantizers.base import HfQuantizer

    # _compat.hf.drop_quantization_config
    assert callable(HfQuantizer.remove_quantization_config)


def test_drop_quantization_config_without_a_quantizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tensornet._compat.hf import drop_quantization_config

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         vocab_size=32))
    model.config.quantization_config = {"quant_method": "gguf"}
    drop_quantization_config(model)
    assert not hasattr(model.config, "quantization_config")


def test_training_arguments_names_pin_one_gpu_uses_exist(tmp_path):
    from transformers import TrainingArguments

    # _compat.hf.pin_one_gpu overwrites the device TrainingArguments computed once, cached
    # by functools.cached_property in the instance's __dict__, and the GPU count beside it
    assert isinstance(inspect.getattr_static(TrainingArguments, "_setup_devices"),
                      functools.cached_property)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert args.device == torch.device("cpu") and args.n_gpu == 0
    assert vars(args)["_setup_devices"] == torch.device("cpu")  # cached where we write
    assert vars(args)["_n_gpu"] == 0  # the attribute the n_gpu property reads
    # the public properties read them
    assert "_setup_devices" in inspect.getsource(TrainingArguments.device.fget)
    assert "_n_gpu" in inspect.getsource(TrainingArguments.n_gpu.fget)


def test_pin_one_gpu_takes_on_the_installed_transformers(tmp_path):
    from transformers import TrainingArguments

    from tensornet._compat.hf import pin_one_gpu

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    pin_one_gpu(args, torch.device("cuda", 1))  # nothing runs on the GPU: no CUDA needed
    assert (args.device, args.n_gpu) == (torch.device("cuda", 1), 1)


def test_pin_one_gpu_fails_loudly_where_transformers_ignores_it():
    from tensornet._compat.hf import pin_one_gpu
    from tensornet.errors import TensornetError

    class MovedUpstream:  # a TrainingArguments whose device no longer reads _setup_devices
        device = torch.device("cuda", 0)
        n_gpu = 2

    with pytest.raises(TensornetError, match=r"_setup_devices.*_compat/hf\.py.*cuda:0.*n_gpu = 2"):
        pin_one_gpu(MovedUpstream(), torch.device("cuda", 1))


@pytest.mark.parametrize(("ratio", "max_steps", "steps"),
                         [(0.03, 100, 3), (0.03, 10, 1), (0.03, 1, 1), (0.0, 100, 0),
                          (0.07, 100, 8), (0.5, 7, 4), (0.1, 1000, 100), (0.999, 3, 3)])
def test_warmup_steps_are_what_the_ratio_means(tmp_path, ratio, max_steps, steps):
    import transformers
    from transformers import TrainingArguments

    from tensornet._compat.hf import warmup_steps

    got = warmup_steps(ratio, max_steps)
    assert type(got) is int and got == steps == math.ceil(ratio * max_steps)
    # transformers reads the integer as steps (on every version since 4.45) ...
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             warmup_steps=got)
    assert args.get_warmup_steps(max_steps) == steps
    # ... and it is the warmup a float ratio gives where transformers reads one (5.x)
    if int(transformers.__version__.split(".")[0]) >= 5:
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                 warmup_steps=ratio)
        assert args.get_warmup_steps(max_steps) == steps


def test_the_trainer_passes_an_integer_warmup(tmp_path):
    from tensornet.finetune.trainer import TrainConfig, _arguments

    args = _arguments(TrainConfig(steps=10, warmup_ratio=0.03), tmp_path, evaluate=False,
                      resume=False)
    assert type(args.warmup_steps) is int and args.warmup_steps == 1


# ------------------------------------------------------------------- the layer is the only way

#: module paths whose private names tensornet must reach only through tensornet/_compat
FOREIGN = ("bitsandbytes", "transformers")
_PRIVATE_IMPORT = re.compile(
    r"from\s+(?:" + "|".join(FOREIGN) + r")[\w.]*\s+import\s+[^\n]*\b_[a-z]\w*")
_PRIVATE_ATTR = re.compile(r"\b(?:bnb|bnbf|bitsandbytes|transformers)(?:\.\w+)*\.(_[a-z]\w*)")
#: transformers' internals the shims of _compat/hf.py reach, on objects of any name
#: (``args._n_gpu``, ``vars(args)["_setup_devices"]``, ``model.hf_quantizer.remove_...``)
HF_INTERNALS = ("_setup_devices", "_n_gpu", "remove_quantization_config")
#: bitsandbytes' internal switches of a CPU Linear4bit (not underscored, still internal)
BNB_INTERNALS = ("support_avx512bf16_for_cpu", "packing_format_for_cpu")
_HF_INTERNAL = re.compile(
    r"""(?:\.|\[\s*["'])(""" + "|".join(HF_INTERNALS + BNB_INTERNALS) + r")\b")


def test_no_foreign_private_name_outside_the_compat_layer():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if "_compat" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (_PRIVATE_IMPORT, _PRIVATE_ATTR, _HF_INTERNAL):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not offenders, offenders
