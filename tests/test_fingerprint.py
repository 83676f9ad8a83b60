"""The base fingerprint (``tensornet.adapters.base.fingerprint``) and the legacy digest.

What the design promises:

* the fingerprint is the documented sum, computed exactly in integers modulo ``2**64``
  (checked against a pure-Python evaluation of the formula), so it is the same for every
  block size, memory layout and device path;
* values are read rounded to bfloat16: float32, bfloat16 and float64 copies of one weight
  share the fingerprint (a float16 copy in general does not);
* accidental changes are detected: one bfloat16 ulp, a sign flip, a swap (within a row of the
  multiplier table and across rows), a transpose, another shape;
* torch's int64 arithmetic wraps modulo ``2**64`` as the formula assumes (an upstream
  change of overflow semantics fails here, loudly);
* an adapter saved with the legacy BLAKE2b digest still loads into its base, and is
  refused by another base; a fingerprint of an unknown format is refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from dota_helpers import assert_load_refused, dota_layers, logits, train
from peft import PeftModel, get_peft_model

from tensornet._device import device_path
from tensornet.adapters import DoTAConfig, tiny_llama
from tensornet.adapters.base import (
    _KEYS_A,
    _KEYS_B,
    _PERIOD,
    _fingerprint,
    _legacy_fingerprint,
    dense_weight,
    fingerprint,
)
from tensornet.errors import AdapterMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores (conftest.py)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
M64 = (1 << 64) - 1


def weight(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def digits(fp: str) -> str:
    return fp.rsplit(":", 1)[1]


# ============================================================ the formula, by hand


def _mix(z: int) -> int:
    """splitmix64's finalizer on Python ints, made odd (the reference of the multipliers)."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return (z ^ (z >> 31)) | 1


def reference(w: torch.Tensor) -> str:
    """The docstring's formula on Python integers (torch only rounds the values to bf16)."""
    words = []
    for x in w.to(torch.float32).to(torch.bfloat16).view(torch.int16).reshape(-1).tolist():
        x &= 0xFFFF  # the bits, unsigned
        x ^= x >> 8  # logical shift of the unsigned word
        words.append(x - (1 << 16) if x >> 15 else x)  # signed reading
    golden = 0x9E3779B97F4A7C15
    out = []
    for key_a, key_b in zip(_KEYS_A, _KEYS_B):
        h = 0
        for i, y in enumerate(words):
            r, j = divmod(i, _PERIOD)
            a = _mix(j * golden + key_a)
            b = _mix(r * golden + key_b)
            h = (h + a * b * y) & M64
        out.append(f"{h:016x}")
    return f"v2:bfloat16:{'x'.join(map(str, w.shape))}:{''.join(out)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fingerprint_is_the_documented_sum(dtype):
    # two full rows of the multiplier table and a partial third: both levels and the tail
    w = weight(2 * _PERIOD + 37, seed=3, dtype=dtype)
    w[:5] = torch.tensor([0.0, -0.0, float("inf"), -1.5, 2.0**-140])  # sign, inf, subnormal
    assert fingerprint(w) == reference(w)


def test_fingerprint_of_a_fixed_tensor_is_pinned():
    # the format is stored in saved adapters: changed constants or order must fail here
    # (the reference above imports the keys, so it would follow such a change)
    w = (torch.arange(3 * 5 * 7, dtype=torch.float32) / 7).reshape(3, 5, 7)
    assert fingerprint(w) == "v2:bfloat16:3x5x7:be6fb977031c6260"
    assert fingerprint(w.double()) == fingerprint(w.bfloat16()) == fingerprint(w)
    # the legacy digest, as tensornet wrote it before v2 (BLAKE2b of the float32 bytes)
    assert _legacy_fingerprint(w) == "82b8449d210ed4f8a790cfcb0e79744b"


@pytest.mark.parametrize("block", [1, _PERIOD, 3 * _PERIOD, 1 << 30])
def test_fingerprint_does_not_depend_on_the_block_size(block):
    w = weight(5 * _PERIOD + 11, seed=1)
    assert _fingerprint(w, block=block) == fingerprint(w)


def test_fingerprint_is_the_same_on_the_accelerator_path():
    w = weight(300, 500, seed=2)
    with device_path("cuda"):  # the accelerator's block size, on CPU tensors
        on_cuda_path = fingerprint(w)
    assert on_cuda_path == fingerprint(w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fingerprint_is_the_same_on_cuda():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        w = weight(300, 500, seed=4, dtype=dtype)
        assert fingerprint(w.cuda()) == fingerprint(w)


# ============================================================ what is the same


def test_float32_bfloat16_and_float64_copies_share_the_fingerprint():
    w = weight(64, 96, seed=5, dtype=torch.float64)
    fp = fingerprint(w)
    assert fp.startswith("v2:bfloat16:64x96:")
    assert fingerprint(w.float()) == fp == fingerprint(w.float().bfloat16())
    b = weight(64, 96, seed=6, dtype=torch.bfloat16)
    assert fingerprint(b.float()) == fingerprint(b) == fingerprint(b.double())


def test_a_float16_copy_does_not_share_it():
    # float16 rounds to 11 bits first: the ties it makes round to bfloat16 the other way
    w = weight(64, 96, seed=7)
    assert fingerprint(w.half()) != fingerprint(w)


def test_a_change_below_bfloat16_precision_is_the_same_base():
    w = weight(64, 96, seed=8)
    w[3, 4] = 1.0
    changed = w.clone()
    changed[3, 4] = 1.0 + 2.0**-23  # one float32 ulp, rounded away in bfloat16
    assert not torch.equal(changed, w)
    assert fingerprint(changed) == fingerprint(w)
    changed[3, 4] = 1.0 + 2.0**-7  # one bfloat16 ulp
    assert fingerprint(changed) != fingerprint(w)


def test_a_strided_view_has_its_contiguous_copy_fingerprint():
    w = weight(80, 1000, seed=7)  # 80000 values: more than one row of the table
    view = w.T
    assert not view.is_contiguous()
    assert fingerprint(view) == fingerprint(view.contiguous())
    sliced = w[::2, 3:]
    assert fingerprint(sliced) == fingerprint(sliced.contiguous())


def test_fingerprint_is_deterministic_and_leaves_the_weight_alone():
    w = weight(300, 500, seed=8)
    before = w.clone()
    assert fingerprint(w) == fingerprint(w) == fingerprint(w.clone())
    assert torch.equal(w, before)


# ============================================================ what differs


def _changed(w: torch.Tensor, change) -> torch.Tensor:
    out = w.clone()
    change(out)
    return out


def _one_ulp(w):
    # the next bfloat16 value (the fingerprint reads values rounded to bfloat16)
    b = w[17, 3].bfloat16()
    w[17, 3] = torch.nextafter(b, torch.tensor(float("inf"), dtype=torch.bfloat16)).float()


def _swap_in_row(w):
    w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()


def _swap_across_rows(w):
    # flat positions j and j + P: same a(j), different b(r)
    flat = w.view(-1)
    flat[5], flat[5 + _PERIOD] = flat[5 + _PERIOD].clone(), flat[5].clone()


def _two_sign_flips(w):
    w[1, 1] = -w[1, 1]
    w[2, 2] = -w[2, 2]


CHANGES = {
    "one ulp": _one_ulp,
    "swap within a row": _swap_in_row,
    "swap across rows": _swap_across_rows,
    "two sign flips": _two_sign_flips,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_of_the_values_changes_the_fingerprint(change):
    w = weight(300, 500, seed=9)
    changed = _changed(w, CHANGES[change])
    assert not torch.equal(changed, w)
    assert fingerprint(changed) != fingerprint(w)


def test_a_bfloat16_change_of_one_ulp_changes_the_fingerprint():
    # an upcast bfloat16 weight has 16 zero low bits: the fold brings its changes down
    w = weight(64, 96, seed=10, dtype=torch.bfloat16)
    changed = w.clone()
    changed.view(torch.int16)[3, 4] += 1  # the next bfloat16 (away from 0)
    changed.view(torch.int16)[5, 6] += 1
    assert not torch.equal(changed, w)
    assert fingerprint(changed) != fingerprint(w)


def test_transpose_and_shape_change_the_fingerprint():
    w = weight(64, 64, seed=11)
    assert fingerprint(w.T.contiguous()) != fingerprint(w)
    assert fingerprint(w.T) != fingerprint(w)
    assert fingerprint(w.reshape(32, 128)) != fingerprint(w)
    assert digits(fingerprint(w.reshape(32, 128))) == digits(fingerprint(w))  # same values
    assert fingerprint(weight(64, 64, seed=12)) != fingerprint(w)


# ============================================================ torch's integer semantics


def signed(v: int) -> int:
    """``v`` modulo ``2**64``, read as a two's complement int64."""
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


@pytest.mark.parametrize("device", DEVICES)
def test_int64_arithmetic_wraps_modulo_2_to_the_64(device):
    """The fingerprint is exact only if int64 overflow wraps (two's complement)."""

    def t(*values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    big, golden = (1 << 63) - 1, signed(0x9E3779B97F4A7C15)
    assert (t(1 << 62) * 4).tolist() == [0]
    assert (t(big) * t(big)).tolist() == [1]  # (2**63 - 1)**2 = 2**126 - 2**64 + 1
    assert (t(-(1 << 63)) * -1).tolist() == [-(1 << 63)]
    assert (t(golden, 12345) * golden).tolist() == [signed(golden**2), signed(12345 * golden)]
    assert (t(big) + 1).tolist() == [-(1 << 63)]
    # reductions wrap too, whatever their order
    many = torch.full((1000,), big, dtype=torch.int64, device=device)
    assert many.sum().tolist() == signed(1000 * big)
    assert many.view(10, 100).sum(dim=1).sum().tolist() == signed(1000 * big)
    # int32 * int64 widens before multiplying (the fingerprint multiplies its int32 bits)
    x32 = torch.tensor([-(1 << 31), (1 << 31) - 1], dtype=torch.int32, device=device)
    assert torch.mul(x32, t(golden)).tolist() == [signed(-(1 << 31) * golden),
                                                  signed(((1 << 31) - 1) * golden)]


@pytest.mark.parametrize("device", DEVICES)
def test_right_shift_is_arithmetic_and_the_mask_makes_it_logical(device):
    x64 = torch.tensor([-8, -(1 << 63)], dtype=torch.int64, device=device)
    assert (x64 >> 1).tolist() == [-4, -(1 << 62)]
    assert ((x64 >> 1) & ((1 << 63) - 1)).tolist() == [((1 << 64) - 8) >> 1, 1 << 62]
    x32 = torch.tensor([-8], dtype=torch.int32, device=device)
    assert (x32 >> 16).tolist() == [-1]
    assert ((x32 >> 16) & 0xFFFF).tolist() == [0xFFFF]


# ============================================================ saved adapters


def _save(tmp_path):
    model = get_peft_model(tiny_llama(), DoTAConfig())
    train(model, steps=1)
    model.save_pretrained(tmp_path)
    return model


def _rewrite_fingerprints(folder, new) -> None:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    for key, rec in config["base_layers"].items():
        rec["fingerprint"] = new(key, rec["fingerprint"])
    file.write_text(json.dumps(config))


def test_a_new_adapter_records_v2_fingerprints(tmp_path):
    _save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    base = tiny_llama()
    for key, rec in config["base_layers"].items():
        assert rec["fingerprint"] == fingerprint(dense_weight(base.get_submodule(key)))
        assert rec["fingerprint"].startswith("v2:bfloat16:")


def test_an_adapter_with_legacy_fingerprints_still_loads(tmp_path):
    model = _save(tmp_path)
    base = tiny_llama()
    legacy = {k: _legacy_fingerprint(dense_weight(base.get_submodule(k)))
              for k in dota_layers(model)}
    assert all(len(v) == 32 and ":" not in v for v in legacy.values())
    _rewrite_fingerprints(tmp_path, lambda key, _: legacy[key])
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(again), logits(model))


def test_a_wrong_legacy_fingerprint_is_refused_and_model_untouched(tmp_path):
    _save(tmp_path)
    base = tiny_llama()
    wrong = "model.layers.1.mlp.down_proj"  # the last target: nothing may be installed first

    def legacy(key, _):
        if key == wrong:
            return "0" * 32
        return _legacy_fingerprint(dense_weight(base.get_submodule(key)))

    _rewrite_fingerprints(tmp_path, legacy)
    error = assert_load_refused(tmp_path, AdapterMismatchError, "fingerprint mismatch")
    assert wrong in str(error)
    # and the legacy digest of another base is refused as well
    _rewrite_fingerprints(tmp_path, lambda key, _: _legacy_fingerprint(
        dense_weight(tiny_llama(seed=1).get_submodule(key))))
    with pytest.raises(AdapterMismatchError, match="fingerprint mismatch"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_fingerprint_of_an_unknown_format_is_refused(tmp_path):
    _save(tmp_path)
    _rewrite_fingerprints(tmp_path, lambda _, fp: "v9:" + fp.partition(":")[2])
    assert_load_refused(tmp_path, AdapterMismatchError, "'v9'.*upgrade tensornet")


def test_many_small_changes_give_distinct_fingerprints():
    w = weight(300, 500, seed=13)
    gen = torch.Generator().manual_seed(14)
    seen = {fingerprint(w)}
    for _ in range(100):
        changed = w.clone()
        flat = changed.view(-1).view(torch.int32)
        where = torch.randint(0, flat.numel(), (2,), generator=gen)
        flat[where] ^= torch.tensor([-(1 << 31), 1], dtype=torch.int32)  # a sign, an ulp
        seen.add(fingerprint(changed))
    assert len(seen) == 101
