"""What a DoTA layer's forward pass runs for a set of active adapters, prepared once.

:class:`_Route` holds what does not change from call to call while the layer's state
does not (the terms' split, the trainable cores, the constant halves of ``T_init`` behind
the check :mod:`.serving` chooses, the strategy and plan per batch size); :func:`_contract`
runs the contraction path a route's plan costed, in plain torch calls where
``torch.compile`` traces the call. The layer (:mod:`.layer`) makes routes and drops them
whenever its state changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..._chain import halves_split, mpo_halves
from ...plan import ContractionPlan
from .serving import reuse_policy, validator

if TYPE_CHECKING:
    from .layer import DoTALayer

__all__: list[str] = []


def _run_path(equation: str, path: Sequence[Sequence[int]], operands: Sequence[Any]) -> Any:
    """Contract ``operands`` pairwise along ``path`` with ``torch.einsum``.

    The contraction a :class:`~tensornet.ContractionPlan` runs (path in opt_einsum's
    linear format), in plain torch calls that torch.compile traces; opt_einsum's own
    dispatch does not trace.
    """
    inputs, out = equation.split("->")
    terms, ops = inputs.split(","), list(operands)
    for pair in path:
        picked = sorted(pair, reverse=True)
        group_ops = [ops.pop(k) for k in picked]
        group_terms = [terms.pop(k) for k in picked]
        keep = set("".join(terms)) | set(out)
        joined = dict.fromkeys("".join(group_terms))
        result = "".join(ch for ch in joined if ch in keep)
        ops.append(torch.einsum(f"{','.join(group_terms)}->{result}", *group_ops))
        terms.append(result)
    return ops[0] if terms[0] == out else torch.einsum(f"{terms[0]}->{out}", ops[0])


def _contract(
    plan: ContractionPlan, x: torch.Tensor, cores: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``x @ MPO(cores).T`` along ``plan``'s path (the plan the layer costed)."""
    if not torch.compiler.is_compiling():
        return plan(x, cores, strategy="contract")
    in_modes = [s[2] for s in plan.core_shapes]
    lead = x.shape[:-1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = _run_path(plan.equation, plan.path, (x.reshape(-1, *in_modes), *cores))
    return y.reshape(*lead, plan.out_features)


class _Route:
    """What a forward pass of a set of active adapters needs, prepared once.

    The terms' common split (so that their halves concatenate along the bond), the
    trainable terms' cores, the constant terms' halves (DoTA's ``-T_init``, or QDoTA's
    ``+T_init`` when disabled), signs folded in, in the compute dtype, and per ``(rows,
    grad mode)`` the strategy and plan the cost model picks. The layer drops its routes
    whenever its state changes (:meth:`DoTALayer._forget`), and makes one again when its
    tensors are other objects (:meth:`holds`).

    The constant halves are read through :meth:`constant`, which keeps them only as
    long as the stored ``T_init`` holds the very bits they were built from (on the CPU;
    on an accelerator they are rebuilt on each call): :mod:`.serving` says why neither
    identity nor version counters can tell (a write through ``.data`` bumps none).
    """

    __slots__ = ("layer", "adapters", "disabled", "ct", "kind", "split", "trainable",
                 "const", "terms", "choices", "sources")

    def __init__(self, layer: DoTALayer, adapters: tuple[str, ...], disabled: bool,
                 ct: torch.dtype, kind: str, sources: list[torch.Tensor]) -> None:
        self.layer, self.adapters, self.disabled, self.ct, self.kind = (
            layer, adapters, disabled, ct, kind)
        self.sources = tuple(sources)
        self.terms = layer.delta_terms(adapters, disabled=disabled)
        first = self.terms[0][1]
        self.split = halves_split([tuple(int(d) for d in c.shape) for c in first])
        # a term is trainable where it is the adapter's own T (a Parameter), constant
        # where it is a stored T_init buffer
        self.trainable = [cores for _, cores in self.terms
                          if isinstance(cores[0], nn.Parameter)]
        #: per grad mode: the constant halves and what checks them (None: rebuilt)
        self.const: dict[bool, tuple[Any, Any]] = {}
        self.choices: dict[tuple[int, bool], tuple[str, ContractionPlan | None]] = {}

    def holds(self, sources: list[torch.Tensor]) -> bool:
        """True while the layer's tensors are the objects this route was made from."""
        return len(sources) == len(self.sources) and all(
            a is b for a, b in zip(sources, self.sources))

    def _const_sources(self) -> list[torch.Tensor]:
        """The stored tensors the constant halves are built from (``T_init``)."""
        if self.layer.quantized:
            return self.layer.init_cores(self.adapters[0]) if self.disabled else []
        return [t for a in self.adapters for t in self.layer.init_cores(a)]

    def _build_const(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The constant terms' halves side by side, signs folded in, in the compute dtype.

        Contracted in at least float32 from the stored tensors as they are now.
        """
        const = [(sign, cores) for sign, cores in
                 self.layer.delta_terms(self.adapters, disabled=self.disabled)
                 if not isinstance(cores[0], nn.Parameter)]
        if not const:
            return None
        with torch.no_grad(), torch.autocast(device_type=const[0][1][0].device.type,
                                             enabled=False):
            halves = [mpo_halves([c.detach().to(_wide(c.dtype)) for c in cores], self.split)
                      for _, cores in const]
            left = torch.cat([h[0] for h in halves], 2).to(self.ct)
            right = torch.cat([h[1] if s == 1 else h[1] * s
                               for (s, _), h in zip(const, halves)], 0).to(self.ct)
        return left.contiguous(), right.contiguous()

    def constant(self, grad: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The constant halves of the stored ``T_init`` as it is now.

        Kept across calls as :func:`.serving.reuse_policy` says for the device kind and
        grad mode: behind a bitwise content check on the CPU, rebuilt on each call on an
        accelerator without grad, kept on version counters there in training steps.
        """
        policy = reuse_policy(self.kind, grad=grad)
        if policy == "rebuild":
            return self._build_const()
        sources = self._const_sources()
        kept = self.const.get(grad)
        if kept is None or not kept[1].same(sources):
            kept = self.const[grad] = (self._build_const(), validator(policy, sources))
        return kept[0]

    def choose(self, rows: int, training: bool) -> tuple[str, ContractionPlan | None]:
        """The strategy and plan for ``rows`` rows (costed once per size and grad mode)."""
        found = self.choices.get((rows, training))
        if found is None:
            found = self.choices[(rows, training)] = self.layer.choose_strategy(
                self.terms[0][1], rows, training, self.adapters[0], kind=self.kind, dtype=self.ct
            )
        return found

    def halves(self, device_type: str) -> list[torch.Tensor]:
        """The trainable terms' halves ``L_1, R_1, ...`` in the compute dtype (autograd).

        Contracted in the cores' dtype (autocast off: it would round the small products
        to its dtype), then rounded once to the compute dtype.
        """
        out = []
        with torch.autocast(device_type=device_type, enabled=False):
            for cores in self.trainable:
                left, right = mpo_halves(list(cores), self.split)
                out += (left.to(self.ct), right.to(self.ct))
        return out


def _wide(dtype: torch.dtype) -> torch.dtype:
    """At least float32: the precision the halves are contracted in before rounding."""
    return torch.promote_types(dtype, torch.float32)
