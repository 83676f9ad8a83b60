"""Helpers shared by every tensornet adapter: layer kinds, dense weights, fingerprints, counts.

Nothing here knows a particular parametrization (DoTA, LoTR, ...), and nothing here
duplicates peft's lifecycle (injection, save/load, merge), which the methods use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._compat.bnb import dequantize_4bit, is_4bit
from .._compat.peft import selects
from .._device import device_kind
from ..errors import ConfigError

__all__ = [
    "AdapterReport",
    "LayerReport",
    "find_targets",
    "set_submodule",
    "dense_weight",
    "fingerprint",
    "base_fingerprint",
    "compute_dtype",
    "count_parameters",
    "is_4bit",
]


@dataclass(frozen=True)
class LayerReport:
    """One adapted layer: where, what shape, how it was tensorized, and how well."""

    name: str
    out_features: int
    in_features: int
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    num_params: int
    relative_error: float | None = None


@dataclass(frozen=True)
class AdapterReport:
    """What an adapter did to a model (or would do, for a model on the meta device).

    Attributes
    ----------
    method : str
        ``"dota"``, ``"dota-random"``, ``"qdota"``, ...
    layers : tuple of LayerReport
        One entry per adapted layer.
    trainable_params : int
        Parameters that receive gradients (the adapter's).
    total_params : int
        Parameters of the adapted model (4-bit weights counted by their logical size).
    """

    method: str
    layers: tuple[LayerReport, ...]
    trainable_params: int
    total_params: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def trainable_share(self) -> float:
        """``trainable_params / total_params`` (a fraction; multiply by 100 for %)."""
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.method}: {len(self.layers)} layers, {self.trainable_params:,} trainable "
            f"parameters of {self.total_params:,} ({100 * self.trainable_share:.4f}%)"
        ]
        for lay in self.layers:
            err = "" if lay.relative_error is None else f"  rel.err {lay.relative_error:.4f}"
            lines.append(
                f"  {lay.name}: {lay.out_features}x{lay.in_features} "
                f"{list(lay.out_modes)}x{list(lay.in_modes)} ranks {list(lay.ranks)} "
                f"params {lay.num_params:,}{err}"
            )
        return "\n".join(lines)


def find_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Qualified names of the modules that ``target_modules`` selects, by peft's own rule.

    peft's ``check_target_module_exists`` decides (a sequence selects a module whose name
    equals an entry or ends with ``"." + entry``; a string is a regular expression matched
    against the whole name), so a baseline built here adapts exactly the layers
    ``LoraConfig(target_modules=...)`` would.
    """
    names = [name for name, _ in model.named_modules()
             if name and selects(target_modules, name)]
    if not names:
        sample = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"`target_modules` matched no module of the model; got {target_modules!r}. "
            f"Linear layer names in this model: {sample[:20]}"
        )
    return names


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_4bit(module)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or a 4-bit layer's compute dtype."""
    if is_4bit(module):
        return module.compute_dtype or torch.float32
    return module.weight.dtype


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``'s full value where it is sharded across processes; ``t`` itself otherwise.

    An FSDP2 (``fully_shard``) parameter is a DTensor holding a shard: it is gathered
    (a collective: every rank must read the same weights in the same order, as creating
    an adapter on every rank does). A DeepSpeed ZeRO-3 parameter is gathered with peft's
    ``gather_params_ctx`` (what peft's own PiSSA/OLoRA initialisations use) and copied.
    """
    if hasattr(t, "full_tensor"):  # torch.distributed.tensor.DTensor
        return t.full_tensor()
    if hasattr(t, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        from peft.utils.integrations import gather_params_ctx

        with gather_params_ctx(t):
            return t.detach().clone()
    return t


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear layer as a dense tensor (4-bit is dequantized).

    The result is computed in at least float32 unless ``dtype`` is given. A weight
    sharded across processes (FSDP2, DeepSpeed ZeRO-3) is gathered (:func:`full_tensor`).
    """
    if is_4bit(module):
        w = dequantize_4bit(module.weight)
    else:
        w = full_tensor(module.weight.detach())
    target = dtype or (w.dtype if w.element_size() >= 4 else torch.float32)
    return w.to(target)


#: The fingerprint format: the prefix of :func:`fingerprint`'s strings. A saved value
#: without a prefix is the legacy BLAKE2b digest (:func:`_legacy_fingerprint`).
FINGERPRINT_VERSION = "v2"
_PERIOD = 1 << 16  # positions j < _PERIOD of a row get a tabulated multiplier a(j)
#: Elements per pass (bounds the temporaries; the result does not depend on it): a
#: cache-sized block on the CPU, larger blocks where every block costs kernel launches.
_BLOCK = {"cpu": 1 << 18, "cuda": 1 << 22}
_MASK64 = (1 << 64) - 1


def _int64(c: int) -> int:
    """The int64 (two's complement) reading of a 64-bit constant."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)
#: Stream keys of the multipliers a(j) (within a row) and b(r) (across rows), one pair a
#: sum: part of the format. One 64-bit sum: a second one doubles the CPU time (measured).
_KEYS_A = (_int64(0x243F6A8885A308D3),)
_KEYS_B = (_int64(0xA4093822299F31D0),)
_SUMS = len(_KEYS_A)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` by ``s`` (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _odd_multipliers(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Odd pseudo-random int64s of ``index * golden + key``: splitmix64's finalizer.

    Every operation wraps modulo 2**64 (two's complement), so the values are the same
    on every device.
    """
    z = index * _GOLDEN + key
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return (z ^ _shr(z, 31)) | 1


def _fold(x: torch.Tensor, shifts: tuple[int, ...], out: torch.Tensor,
          scratch: torch.Tensor) -> torch.Tensor:
    """``y = x ^ (x >>> s)`` for each ``s`` in turn, into ``out`` (a bijection of the bits).

    ``x`` is int32 or int64 (``out`` and ``scratch`` the same); ``>>>`` is the logical
    shift (torch's ``>>`` is arithmetic).
    """
    width = 8 * x.element_size()
    for s in shifts:
        torch.bitwise_right_shift(x, s, out=scratch).bitwise_and_((1 << (width - s)) - 1)
        x = torch.bitwise_xor(x, scratch, out=out)
    return out


def fingerprint(weight: torch.Tensor) -> str:
    r"""Identity of a weight's values, the same in every floating dtype, computed where it lives.

    The values are read rounded to bfloat16 (through float32): a float32 base, its
    bfloat16 copy and a float64 original have one fingerprint, so an adapter trained on
    one loads onto the others (peft users load float32-trained adapters onto bfloat16
    bases), while another checkpoint does not match. Weights that differ only below
    bfloat16's precision (8 significant bits) are taken to be the same base. A float16
    copy does not in general match: its own rounding (11 bits) makes ties that bfloat16
    then rounds the other way. The result is bit-identical on the CPU and on CUDA,
    whatever the weight's memory layout.

    Parameters
    ----------
    weight : torch.Tensor
        A floating tensor on any device.

    Returns
    -------
    str
        ``"v2:bfloat16:<shape>:<hex>"``, e.g. ``"v2:bfloat16:4096x11008:"`` followed by
        16 hex digits (one 64-bit sum).

    Notes
    -----
    Let ``x_i`` be the bits of the ``i``-th value (row-major order) rounded to bfloat16,
    as a signed 16-bit integer, folded onto themselves: ``y_i = x_i ^ (x_i >>> 8)``, a
    bijection that brings changes of the high byte (sign, exponent) into the low one.
    Split the flat index as ``i = P r + j`` (``P = 2**16``); the fingerprint is

    .. math:: h = \sum_i b(r)\, a(j)\, y_i \bmod 2^{64}

    with odd multipliers ``a(j)``, ``b(r)`` from a fixed integer mixer (splitmix64's
    finalizer) of the position. Integer addition and multiplication modulo 2**64 are
    exact, associative and commutative, so every device and every reduction order gives
    the same bits (floating sums would not). It runs on the weight's device in blocks (no
    host copy; temporaries of a few MB) and reads back one int64: one host
    synchronisation. One sum, not several: on the CPU the int64 products are most of the
    cost (a second sum took DoTA's creation on LLaMA-2-7B-shaped layers from 1.11x to
    1.19x its decompositions, ``benchmarks/bench_create.py``).

    What it proves, treating the multipliers as independent uniformly random odd
    numbers (so, for changes made without looking at them): two weights whose bfloat16
    values differ get the same ``h`` with probability at most ``64 * 2**(v - 63)``, where
    ``v`` is the lowest bit position in which some ``y_i`` differs (``2**v`` divides every
    difference ``y_i - y'_i``; ``v`` is at most 15, and 0 for half of the changes of a
    value's low bits). A change of a single value is always detected (an odd multiple of
    a nonzero difference below ``2**16`` is not 0 modulo ``2**64``). So a different
    checkpoint, one value off by one bfloat16 ulp, two values swapped or a transposed
    matrix give another fingerprint except with probability about ``2**-57`` (at worst
    ``2**-42``). What it does not prove: it is not a cryptographic hash. Its multipliers
    are public, and a weight forged to have a given fingerprint is easy to construct: it
    identifies a base against accidents (the wrong checkpoint), it does not authenticate
    one.

    Examples
    --------
    >>> w = torch.arange(6.0).reshape(2, 3) / 3
    >>> fp = fingerprint(w)
    >>> fp.split(":")[:3]
    ['v2', 'bfloat16', '2x3']
    >>> fingerprint(w.bfloat16()) == fp, fingerprint(w.double()) == fp
    (True, True)
    >>> fingerprint(w.T.contiguous().T) == fp, fingerprint(w.reshape(3, 2)) == fp
    (True, False)
    """
    return _fingerprint(weight, block=_BLOCK[device_kind(weight)])


def _fingerprint(weight: torch.Tensor, *, block: int) -> str:
    """:func:`fingerprint` in passes of about ``block`` elements (the result is the same)."""
    w = weight.detach()
    shifts = (8,)  # the bfloat16 word's high byte (sign, exponent) folded onto its low one
    flat = w.reshape(-1)  # row-major order: a strided view reads as its contiguous copy
    n, dev = flat.numel(), flat.device
    full, tail = divmod(n, _PERIOD)
    width = min(_PERIOD, n)
    keys_a = torch.tensor(_KEYS_A, dtype=torch.int64, device=dev)
    keys_b = torch.tensor(_KEYS_B, dtype=torch.int64, device=dev)
    a = _odd_multipliers(torch.arange(width, device=dev)[None, :], keys_a[:, None])
    sums = torch.empty((full + (tail > 0), _SUMS), dtype=torch.int64, device=dev)
    rows = max(min(block // _PERIOD, full + (tail > 0)), 1)  # rows of P values per pass
    bits = torch.empty((2, rows, 1, width), dtype=torch.int16, device=dev)  # y, scratch
    product = torch.empty((rows, _SUMS, width), dtype=torch.int64, device=dev)
    for r0 in range(0, full, rows):
        r1 = min(r0 + rows, full)
        x = _bfloat16_bits(flat[r0 * _PERIOD : r1 * _PERIOD])
        y = _fold(x.view(r1 - r0, 1, _PERIOD), shifts, bits[0, : r1 - r0], bits[1, : r1 - r0])
        torch.sum(torch.mul(y, a, out=product[: r1 - r0]), dim=2, out=sums[r0:r1])
    if tail:
        x = _bfloat16_bits(flat[full * _PERIOD :])
        y = _fold(x, shifts, bits[0, 0, 0, :tail], bits[1, 0, 0, :tail])
        torch.sum(torch.mul(y, a[:, :tail], out=product[0, :, :tail]), dim=1, out=sums[full])
    b = _odd_multipliers(torch.arange(len(sums), device=dev)[:, None], keys_b[None, :])
    h = (b * sums).sum(dim=0).tolist()  # the one host synchronisation (one int per sum)
    shape = "x".join(str(d) for d in w.shape)
    digits = "".join(f"{v & _MASK64:016x}" for v in h)
    return f"{FINGERPRINT_VERSION}:bfloat16:{shape}:{digits}"


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of ``model``'s base, by its name in the base, without any adapter's.

    peft moves an adapted layer's own weights under ``base_layer`` and a
    ``modules_to_save`` module's under ``original_module``: those names are read as the
    base's (``...q_proj.base_layer.weight`` -> ``...q_proj.weight``); the adapters'
    tensors and the trainable copies of ``modules_to_save`` are left out. Tied weights
    appear once (under their first name). Buffers are left out: they are not weights a
    checkpoint differs in (rotary tables are computed from the config).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = [k + "." for k, m in model.named_modules() if k and isinstance(m, BaseTunerLayer)]
    out = {}
    for name, p in model.named_parameters():
        owner = max((t for t in tuners if name.startswith(t)), key=len, default=None)
        if owner is not None:
            rest = name[len(owner):]
            if not rest.startswith("base_layer."):
                continue  # an adapter's tensor
            name = owner + rest.replace("base_layer.", "")
        if ".modules_to_save." in f".{name}":
            continue  # peft's trainable copy of a modules_to_save module
        out[name.replace("original_module.", "")] = p
    return out


def base_fingerprint(model: nn.Module) -> str | None:
    """The identity of every weight of ``model``'s base: embeddings, norms, every linear.

    One :func:`fingerprint` per weight of :func:`base_weights` (bfloat16-rounded values,
    so float32, bfloat16 and float64 copies of a base share it), combined with the
    weight's name and shape into one BLAKE2b digest. It covers everything the adapted
    model's output depends on besides the adapter, so an adapter is refused on a base
    whose embeddings, norms, non-target layers or ``lm_head`` differ from the one it was
    trained on. ``None`` when some weight is on the meta device (nothing to read).

    Returns
    -------
    str or None
        ``"v2:base:<32 hex digits>"``.
    """
    weights = base_weights(model)
    if any(p.device.type == "meta" for p in weights.values()):
        return None
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        p = full_tensor(weights[name].detach())
        values = p if p.is_floating_point() else p.to(torch.float32)
        digest.update(f"{name}={fingerprint(values)};".encode())
    return f"{FINGERPRINT_VERSION}:base:{digest.hexdigest()}"


def _bfloat16_bits(values: torch.Tensor) -> torch.Tensor:
    """The bits of ``values`` rounded to bfloat16 (through float32), as int16.

    Rounding through float32 gives a float64 weight and its float32 copy the same words
    (rounding float64 straight to bfloat16 could round a tie the other way).
    """
    return values.to(torch.float32).to(torch.bfloat16).view(torch.int16)


def _legacy_fingerprint(weight: torch.Tensor) -> str:
    """The fingerprint of adapters saved before ``v2``: BLAKE2b of a host copy (32 hex digits).

    Only to check such an adapter's base (slow: a host copy and a cryptographic hash of
    every value).
    """
    w = weight.detach()
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32).contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(w.shape), str(w.dtype))).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit weights count by logical size.

    A parameter shared by several modules (tied input and output embeddings) counts once.
    """
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if is_4bit(module) and name == "weight":
                n = module.in_features * module.out_features
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total
