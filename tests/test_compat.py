"""The compatibility layer: every foreign private name tensornet uses, checked upstream.

Each test names the shim in tensornet/_compat/ to fix when it fails: an upgrade of peft,
transformers, bitsandbytes or torch that moves a name fails here, loudly.
"""

from __future__ import annotations

import inspect
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


# ------------------------------------------------------------------- the layer is the only way

#: module paths whose private names tensornet must reach only through tensornet/_compat
FOREIGN = ("bitsandbytes",)
_PRIVATE_IMPORT = re.compile(
    r"from\s+(?:" + "|".join(FOREIGN) + r")[\w.]*\s+import\s+[^\n]*\b_[a-z]\w*")
_PRIVATE_ATTR = re.compile(r"\b(?:bnb|bnbf|bitsandbytes)(?:\.\w+)*\.(_[a-z]\w*)")


def test_no_foreign_private_name_outside_the_compat_layer():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if "_compat" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (_PRIVATE_IMPORT, _PRIVATE_ATTR):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not offenders, offenders
