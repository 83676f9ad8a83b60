"""torch: the private names of ``nn.Module`` and ``Tensor`` that tensornet's adapters use.

Two kinds: reads of a module's own tensors and of a tensor's version counter, each a
plain function call where a forward pass uses it (DoTA's serving stamps and the list of
tensors a cached update was built from: the public ``parameters(recurse=False)`` walks a
generator with a memo set per call), and two hooks ``nn.Module`` calls on every module
(:class:`ModuleHooks`), forwarded to names of tensornet's own. ``tests/test_compat_peft.py``
checks each against the installed torch, so that a rename fails there, naming the shim.

This module imports torch when it is imported (:class:`ModuleHooks` subclasses
``nn.Module``); only :mod:`tensornet.adapters` imports it, never tensornet's core.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "MODULE_HOOKS",
    "ModuleHooks",
    "own_buffers",
    "own_parameters",
    "raise_recompile_limit",
    "version_of",
]

#: ``nn.Module``'s private hooks :class:`ModuleHooks` overrides, with the parameters used
MODULE_HOOKS: dict[str, tuple[str, ...]] = {
    "_apply": ("fn",),
    "_load_from_state_dict": ("state_dict", "prefix", "local_metadata", "strict",
                              "missing_keys", "unexpected_keys", "error_msgs"),
}


def version_of(tensor: torch.Tensor) -> int:
    """The tensor's version counter: bumped by every in-place write through autograd.

    Not by a write through ``.data`` or a ``no_grad`` ``.copy_`` into ``.data``: see
    :mod:`tensornet.adapters.dota.serving` for where that is safe. If torch renamed it,
    this raises AttributeError (the shim's test fails first).
    """
    return tensor._version


def own_parameters(module: nn.Module) -> dict[str, Any]:
    """The module's own parameters by name (not its children's): the module's live dict."""
    # (if renamed: AttributeError on DoTA's forward pass, at once, not a silent error)
    return module._parameters


def own_buffers(module: nn.Module) -> dict[str, Any]:
    """The module's own buffers by name (not its children's): the module's live dict."""
    # (if renamed: AttributeError on DoTA's forward pass and merge, at once)
    return module._buffers


def raise_recompile_limit(limit: int) -> None:
    """Let ``torch.compile`` keep at least ``limit`` compiled versions of one function.

    dynamo's default (8) is too few for one ``DoTALinear.forward`` serving layers of
    several shapes in training and inference (``benchmarks/bench_speed.py``); past it
    dynamo falls back to eager for that function, silently. If dynamo renamed its
    setting, this raises AttributeError (the shim's test fails first).
    """
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)


class ModuleHooks(nn.Module):
    """``nn.Module`` whose private per-module hooks forward to names of tensornet's own."""

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # (torch: .to(), .cuda(), .cpu(), .half(), .float(), ... call it on every module,
        # with the function that converts a tensor; if torch stopped, DoTA would keep
        # routes prepared for the old device or dtype)
        self.before_convert()
        return super()._apply(fn, *args, **kwargs)

    def before_convert(self) -> None:
        """Called before ``.to()`` / ``.cuda()`` / ``.half()`` ... convert the module's tensors."""

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # (torch: load_state_dict calls it on every module with the whole state dict and
        # the module's key prefix, before the module's children; if torch stopped, DoTA
        # would keep routes of the old tensors and a restored QDoTA never builds its
        # residual)
        self.before_load_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def before_load_state(self, state_dict: Any, prefix: str) -> None:
        """Called when ``load_state_dict`` reaches this module, before its tensors are copied."""
