"""DoTA's layer: ``y = x (W0 + MPO(T) - MPO(T_init))^T + b`` with trainable cores ``T``.

Each adapter holds its cores ``T`` (``dota_cores``, trained) and its initial cores
``T_init`` (``dota_init``, stored, frozen). The base weight ``W0`` is not modified, so the
layer follows peft's semantics (disable, several adapters, unload) exactly; the paper's
``W_res + MPO(T)`` with ``W_res = W0 - MPO(T_init)`` is the same matrix.

The update is a sum of MPO terms (``+T`` and ``-T_init`` per active adapter), computed
by the strategy the cost model picks (:mod:`.cost`):

* ``"contract"``: ``base(x) + sum_i s_i x MPO(term_i)^T``, contracting ``x`` through each
  term's cores (a summed chain of bond ``2R`` would cost ``(2R)^2`` in its middle cores);
* ``"dense"``: ``W = W0 + sum_i s_i MPO(term_i)`` built from the terms' half-chains side
  by side, used for one matmul and dropped (:class:`.kernels.DenseMPOLinear`, with a CPU
  and an accelerator layout behind the device seam); no dense matrix is kept.
* without grad, the update's cached half-chains where they are cheaper (:mod:`.serving`).

What a forward pass needs beyond the tensors (the terms' split, ``T_init``'s halves in
the compute dtype, the strategy per batch size) is prepared once per set of active
adapters, compute dtype and device kind (:class:`.route._Route`) and dropped when the layer's
state changes (an adapter added, loaded, deleted, merged; a move to another device or
dtype; ``train()``/``eval()``), so a call runs only the kernels. Whatever is computed
from the values of the tensors (halves) is reused only behind a bitwise content check
(CPU) or rebuilt on each call (accelerators; in their training steps the frozen
``T_init``'s halves are kept on version counters): :mod:`.serving` says why version
counters cannot decide it in general, and why that one exception stands.

QDoTA stores ``NF4(W0 - MPO(T_init))`` as the base (the paper's form, the only way the
base can be 4-bit) and adds ``MPO(T)``; disabled, it adds ``MPO(T_init)`` back, which gives
``W0`` up to the residual's NF4 rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..._compat.bnb import keep_one_cpu_kernel
from ..._compat.peft import BufferDict, LayerHooks
from ..._compat.torch import ModuleHooks, own_buffers, own_parameters
from ...errors import ConfigError, DTypeError
from ...plan import ContractionPlan, plan_mpo_matmul
from ...tensorize import cores_to_matrix
from ..base import compute_dtype, dense_weight, is_4bit
from ..layer import mixed_batch, shift_weight
from .cores import chain_sum, random_cores
from .cost import profile_for, residual_strategy
from .kernels import DenseMPOLinear, kernels_for, release_scratch
from .route import _contract, _Route
from .serving import _ServingOperands, reuse_policy

__all__ = [
    "DoTALayer",
    "DoTALinear",
    "chain_sum",
    "random_cores",
    "release_scratch",
    "residual_strategy",
]


#: Why QDoTA takes no mixed-adapter batch (the tuner's refusal and the layer's)
QDOTA_MIXED_BATCH = (
    "`adapter_names` (peft's mixed-adapter batches) is not supported by QDoTA: its base "
    "layer holds the NF4 residual NF4(W0 - MPO(T_init)), not W0, so a row without the "
    "adapter ('__base__') has no base to run through, and a layer takes one QDoTA adapter "
    "only; run the adapter with set_adapter(name), or the base model with "
    "`with model.disable_adapter():` (W0 up to the residual's NF4 rounding)"
)


class DoTALayer(LayerHooks):
    """peft tuner-layer state of DoTA: per adapter, trained and initial cores."""

    adapter_layer_names = ("dota_cores",)
    other_param_names = ("dota_init", "dota_strategy")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.dota_cores = nn.ModuleDict({})
        self.dota_init = nn.ModuleDict({})
        self.dota_strategy: dict[str, str] = {}
        self.start_enabled()
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        #: QDoTA: the NF4 residual layer while the base is a merged dense layer
        self._nf4_base: list[nn.Module] = []
        #: QDoTA being restored: the residual is built from the loaded T_init on first use
        self._pending_residual: str | None = None
        #: (adapters, disabled, compute dtype, device, kind) -> what a forward pass needs
        self._routes: dict[tuple[Any, ...], _Route] = {}
        #: (adapters, disabled, compute dtype, kind) -> the cached operands of forward
        #: passes without grad
        self._serving: dict[tuple[Any, ...], _ServingOperands] = {}

    def _forget(self) -> None:
        """Drop what was prepared from the layer's state (routes, serving operands)."""
        self._routes.clear()
        self._serving.clear()

    # -- state ---------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True if the base holds QDoTA's NF4 residual (or, merged, was built from it)."""
        return is_4bit(self.get_base_layer()) or bool(self._nf4_base) or (
            self._pending_residual is not None
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the dense computations: the base weight's (a 4-bit base's compute dtype)."""
        return compute_dtype(self.get_base_layer())

    def compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the update computes in for ``x``.

        Autocast's where it is on for ``x``'s device (as ``nn.Linear`` computes under
        autocast), else :attr:`compute_dtype`.
        """
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return self.compute_dtype

    def cores(self, adapter: str) -> list[nn.Parameter]:
        """The trainable cores ``T`` of ``adapter``."""
        return list(self.dota_cores[adapter])

    def init_cores(self, adapter: str) -> list[torch.Tensor]:
        """The initial cores ``T_init`` of ``adapter``."""
        init = self.dota_init[adapter]
        return [init[str(k)] for k in range(len(init))]

    def update_layer(
        self,
        adapter_name: str,
        config: Any,
        cores: Sequence[torch.Tensor],
        init: Sequence[torch.Tensor],
        *,
        restoring: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` with cores ``cores`` and initial cores ``init``."""
        # (a 4-bit base is QDoTA's to take; a layer that has adapters takes no QDoTA one,
        # and one that has a QDoTA adapter takes nothing else)
        if self.dota_cores and (self.quantized or config.quantize == "nf4"):
            raise ConfigError(
                f"QDoTA replaces the base layer by its NF4 residual: a layer takes one QDoTA "
                f"adapter and nothing else (adapter {adapter_name!r})"
            )
        self._forget()
        base = self.get_base_layer()
        device = dense_device(base)
        self.dota_cores[adapter_name] = nn.ParameterList(
            [nn.Parameter(c.to(device)) for c in cores]
        )
        self.dota_init[adapter_name] = BufferDict(
            {str(k): c.detach().to(device).clone() for k, c in enumerate(init)}, persistent=True
        )
        self.dota_strategy[adapter_name] = config.strategy
        if config.quantize == "nf4":
            # the residual's compute dtype is the cores' dtype as created (bfloat16 by
            # default), before peft upcasts adapter weights to float32
            self._residual_dtype = self.dota_cores[adapter_name][0].dtype
            if restoring:
                self._pending_residual = adapter_name
            else:
                self._build_residual(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _build_residual(self, adapter: str) -> None:
        """Replace the base by ``NF4(W0 - MPO(T_init))`` (QDoTA)."""
        base = self.get_base_layer()
        with torch.no_grad():
            w0 = dense_weight(base)
            init = [c.to(w0.dtype) for c in self.init_cores(adapter)]
            residual = w0 - cores_to_matrix(init)
            compute = self._residual_dtype
            # the dtype a merge gives back: the replaced layer's (an empty buffer, so that
            # a later ``model.to(dtype)`` moves it along with the model)
            dense = torch.empty(0, dtype=self.compute_dtype, device=dense_device(base))
            self.base_layer = nf4_linear(residual, base.bias, compute)
        self.register_buffer("_merge_dtype", dense, persistent=False)
        self._pending_residual = None
        self._forget()

    def _ensure_residual(self) -> None:
        if self._pending_residual is not None:
            self._build_residual(self._pending_residual)

    @staticmethod
    def _after_load(module: Any, incompatible_keys: Any) -> None:
        if getattr(module, "_init_arrives", False):
            module._init_arrives = False
            module._ensure_residual()

    # -- the adapter's matrix --------------------------------------------------------
    def delta_terms(
        self, adapters: Sequence[str], *, disabled: bool = False
    ) -> list[tuple[float, list[torch.Tensor]]]:
        """``(sign, cores)`` of the chains whose sum the ``adapters`` add to the base.

        DoTA: ``+T`` and ``-T_init`` per adapter; QDoTA: ``+T`` (disabled: ``+T_init``).
        """
        if self.quantized:
            (adapter,) = adapters
            return [(1.0, self.init_cores(adapter) if disabled else self.cores(adapter))]
        terms: list[tuple[float, list[torch.Tensor]]] = []
        for a in adapters:
            cores = self.cores(a)
            dt = cores[0].dtype
            terms.append((1.0, cores))
            terms.append((-1.0, [c.to(dt) for c in self.init_cores(a)]))
        return terms

    def delta_chain(self, adapters: Sequence[str], *, disabled: bool = False) -> list[torch.Tensor]:
        """One chain for the update the ``adapters`` add to the base (see the module doc)."""
        return chain_sum(self.delta_terms(adapters, disabled=disabled))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """DoTA: peft's ``convert_to_lora`` may SVD :meth:`get_delta_weight`; QDoTA may not.

        A QDoTA layer's base is the NF4 residual of ``W0 - MPO(T_init)``: its update is
        not relative to the base model's weight.
        """
        return not self.quantized and adapter_name in self.dota_cores

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``MPO(T) - MPO(T_init)`` (QDoTA: ``MPO(T)``) in the base dtype, computed in float32+."""
        cores = self.cores(adapter)
        dt = torch.float64 if cores[0].dtype == torch.float64 else torch.float32
        delta = cores_to_matrix([c.detach().to(dt) for c in cores])
        if not self.quantized:
            delta = delta - cores_to_matrix([c.to(dt) for c in self.init_cores(adapter)])
        return delta.to(self.compute_dtype)

    def _sources(self, adapters: tuple[str, ...], disabled: bool) -> list[torch.Tensor]:
        """The layer's tensors the update of ``adapters`` is computed from (T, T_init)."""
        if self.quantized:
            held = (own_buffers(self.dota_init[adapters[0]]) if disabled
                    else own_parameters(self.dota_cores[adapters[0]]))
            return list(held.values())
        sources: list[torch.Tensor] = []
        for a in adapters:
            sources += own_parameters(self.dota_cores[a]).values()
            sources += own_buffers(self.dota_init[a]).values()
        return sources

    def _serve(self, x: torch.Tensor, adapters: tuple[str, ...], disabled: bool,
               ct: torch.dtype, kind: str) -> torch.Tensor | None:
        """The update for ``x`` from half-chains, or None where another path is cheaper.

        Forward passes without grad only (:class:`.serving._ServingOperands`), in the
        compute dtype ``ct``; the halves are brought up to date with the layer's tensors
        before each use (:mod:`.serving`: a content check on the CPU, a rebuild on an
        accelerator), never trusted on version counters.
        """
        sources = self._sources(adapters, disabled)
        route = self._route(adapters, disabled, ct, x, kind, sources)  # terms, costed plans
        key = (adapters, disabled, ct, kind)
        entry = self._serving.get(key)
        if entry is None or entry.origin is not route:  # (a new route: other tensors)
            if len({tuple(tuple(c.shape) for c in t) for _, t in route.terms}) > 1:
                return None  # adapters of different ranks: the general path
            entry = self._serving[key] = _ServingOperands(
                sources, self.delta_terms(adapters, disabled=disabled), ct,
                reuse=reuse_policy(kind), origin=route)
        operands = entry
        rows = x.numel() // self.in_features
        use = operands.use.get(rows)
        if use is None:
            use = False
            if all(self.dota_strategy.get(a, "auto") == "auto" for a in adapters):
                choice, plan = route.choose(rows, False)  # what the general path would run
                other = plan.build_seconds if choice == "dense" else (  # type: ignore[union-attr]
                    len(route.terms) * plan.contract_seconds)  # type: ignore[union-attr]
                use = operands.seconds(rows, profile_for(kind)) < other
            operands.use[rows] = use
        if not use:
            return None
        operands.refresh(sources, lambda: self.delta_terms(adapters, disabled=disabled))
        return operands(x.to(ct))

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete as peft's layer does, dropping what was prepared for the adapters too."""
        self._forget()
        super().delete_adapter(adapter_name)

    def dense_base(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as a dense ``(out, in)`` tensor, of ``dtype`` if given.

        Without ``dtype``: as stored (a dense weight itself, no copy; a 4-bit one as
        bitsandbytes dequantizes it), for the dense path to cast in its fused add.
        """
        base = self.get_base_layer()
        if dtype is not None:
            return dense_weight(base, dtype)
        if is_4bit(base):  # in its quant state's dtype (the compute dtype: nf4_linear)
            return dense_weight(base, base.weight.quant_state.dtype)
        # (read by the dense path's autograd Function, where no graph is recorded: no
        # detach needed)
        return base.weight

    def _term_counts(self, adapter: str) -> tuple[int, int]:
        """Chains in the active update, and those of them trained (``T``, one per adapter).

        Counted from the active adapters, not from which cores require grad, so that a
        reloaded adapter in inference mode takes the trained model's path.
        """
        active = sum(a in self.dota_cores for a in self.active_adapters) or 1
        return (1 if self.quantized else 2) * active, active

    def choose_strategy(self, chain: Sequence[torch.Tensor], batch: int, training: bool,
                        adapter: str, *, kind: str = "cpu", dtype: torch.dtype | None = None,
                        ) -> tuple[str, ContractionPlan | None]:
        """Dense or contract for ``batch`` rows, and the plan that costed it.

        The plan (of one term's chain, in ``dtype``'s item size, with the constants of the
        device ``kind``: :func:`.cost.profile_for`) is what the contract branch then runs,
        so the path executed is the path costed (None for ``strategy="dense"``, which needs
        none). Plans use fixed constants per device kind, not a per-process calibration,
        so a reloaded adapter picks the same path and computes the same bits as the model
        it was saved from.
        """
        fixed = self.dota_strategy.get(adapter, "auto")
        shapes = tuple(tuple(int(d) for d in c.shape) for c in chain)
        itemsize = (chain[0].dtype if dtype is None else dtype).itemsize
        terms, trainable = self._term_counts(adapter)
        plan = None
        if fixed != "dense":
            plan = plan_mpo_matmul(shapes, max(batch, 1), itemsize=itemsize,
                                   profile=profile_for(kind))
        if fixed != "auto":
            return fixed, plan
        return residual_strategy(plan, training=training, terms=terms, trainable=trainable,
                                 kind=kind), plan

    def _route(self, adapters: tuple[str, ...], disabled: bool, ct: torch.dtype,
               x: torch.Tensor, kind: str, sources: list[torch.Tensor]) -> _Route:
        """The prepared :class:`.route._Route` for these adapters, dtype and device (made once).

        Made again when the layer's tensors (``sources``, :meth:`_sources`) are other
        objects than the route's (cores replaced by new Parameters).
        """
        key = (adapters, disabled, ct, x.device, kind)
        route = self._routes.get(key)
        if route is None or not route.holds(sources):
            route = self._routes[key] = _Route(self, adapters, disabled, ct, kind, sources)
        return route


def dense_device(module: nn.Module) -> torch.device:
    """The device of a layer's weight."""
    return module.weight.device


class DoTALinear(ModuleHooks, DoTALayer):
    """A linear layer plus DoTA adapters (built by peft through :class:`DoTAModel`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        cores: Sequence[torch.Tensor],
        init: Sequence[torch.Tensor],
        *,
        restoring: bool = False,
    ) -> None:
        super().__init__()
        DoTALayer.__init__(self, base_layer)
        self.register_load_state_dict_post_hook(DoTALayer._after_load)
        self.mark_active(adapter_name)
        self.update_layer(adapter_name, config, cores, init, restoring=restoring)

    def before_load_state(self, state_dict: Any, prefix: str) -> None:
        """Drop what was prepared; QDoTA being restored: note whether the load brings T_init.

        The children's buffers are filled after this call; the post-hook registered in
        ``__init__`` builds the residual.
        """
        self._forget()
        pending = self._pending_residual
        self._init_arrives = pending is not None and f"{prefix}dota_init.{pending}.0" in state_dict

    def train(self, mode: bool = True) -> DoTALinear:
        """As ``nn.Module.train``; drops what was prepared (see :class:`_Route`)."""
        self._forget()
        return super().train(mode)

    def before_convert(self) -> None:
        """A move to another device or dtype: the prepared halves were of the old tensors."""
        self._forget()

    # -- merge -------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' ``Delta W`` to the base weight (QDoTA: a dense merged base)."""
        self._ensure_residual()
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if name not in self.dota_cores:
                continue
            base = self.get_base_layer()
            with torch.no_grad():
                if is_4bit(base):  # QDoTA: the merged base is dense, NF4(W_res) + MPO(T)
                    weight = dense_weight(base, torch.float32) + self.get_delta_weight(name).float()
                    marker = own_buffers(self).get("_merge_dtype")
                    merged = nn.Linear(self.in_features, self.out_features,
                                       bias=base.bias is not None, device=weight.device,
                                       dtype=self.compute_dtype if marker is None else marker.dtype)
                    merged.weight.copy_(weight)
                    if base.bias is not None:
                        merged.bias.copy_(base.bias)
                    merged.requires_grad_(False)
                    if safe_merge and not torch.isfinite(merged.weight).all():
                        raise ValueError(f"NaNs in the merged weights of adapter {name!r}")
                    self._nf4_base.append(base)
                    self.base_layer = merged
                else:
                    shift_weight(base, self.get_delta_weight(name),
                                 check=name if safe_merge else None)
            self.merged_adapters.append(name)
        release_scratch()
        self._forget()

    def unmerge(self) -> None:
        """Take the merged adapters' ``Delta W`` out of the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._forget()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.dota_cores:
                continue
            with torch.no_grad():
                if self._nf4_base:
                    self.base_layer = self._nf4_base.pop()
                else:
                    shift_weight(self.get_base_layer(), self.get_delta_weight(name), sign=-1.0)

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x)`` plus the active adapters' update, by the planner's strategy."""
        if not x.is_floating_point():  # (QDoTA's 4-bit base would cast it silently)
            raise DTypeError(
                f"a DoTA layer takes floating input (float32/bfloat16/float16/float64), as "
                f"nn.Linear does; got {str(x.dtype).removeprefix('torch.')}"
            )
        self._ensure_residual()
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            if self.quantized:  # (the tuner refuses first; a layer called directly too)
                raise ConfigError(QDOTA_MIXED_BATCH)
            return mixed_batch(
                self, x, adapter_names,
                lambda rows, name: self._with(rows, (name,), False, *args, **kwargs),
                lambda rows: self.base_layer(rows, *args, **kwargs),
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            if not self.quantized:
                return self.base_layer(x, *args, **kwargs)
            adapters, disabled = tuple(self.dota_cores), True
        elif self.merged:
            return self.base_layer(x, *args, **kwargs)
        else:
            adapters = tuple(a for a in self.active_adapters if a in self.dota_cores)
            disabled = False
        return self._with(x, adapters, disabled, *args, **kwargs)

    def _holds(self, adapter: str) -> bool:
        return adapter in self.dota_cores

    def _with(self, x: torch.Tensor, adapters: tuple[str, ...], disabled: bool, *args: Any,
              **kwargs: Any) -> torch.Tensor:
        """``base(x)`` plus the update of ``adapters`` (``disabled``: QDoTA's ``T_init``)."""
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        kernels = kernels_for(x)
        ct = self.compute_dtype_for(x)
        compiling = torch.compiler.is_compiling()
        if not torch.is_grad_enabled() and not compiling:
            delta = self._serve(x, adapters, disabled, ct, kernels.kind)
            if delta is not None:
                y = self.base_layer(x, *args, **kwargs)
                return y + delta.to(y.dtype)
        # by grad mode only (not by which cores require grad), so a reloaded adapter in
        # inference mode takes the same path as the trained one and gives the same bits
        training = torch.is_grad_enabled()
        prepare = torch.compiler.disable(self._prepare) if compiling else self._prepare
        route, choice, plans = prepare(adapters, disabled, ct, x, kernels.kind, training)
        if choice == "contract":
            # term by term: a summed chain's middle cores are (n R)^2, n^2 times the work
            # (summed before the base output is added: at T = T_init the terms cancel
            # exactly and the layer gives the base's output bit for bit)
            y = self.base_layer(x, *args, **kwargs)
            xc = x.to(route.terms[0][1][0].dtype)
            delta = None
            # the terms as the layer holds them now (a T_init of another dtype than T is
            # cast on each call, never kept from an earlier one)
            terms = self.delta_terms(adapters, disabled=disabled)
            for (sign, cores), plan in zip(terms, plans):
                part = _contract(plan, xc, cores)
                part = part if sign == 1 else -part
                delta = part if delta is None else delta + part
            return y + delta.to(y.dtype)
        y = DenseMPOLinear.apply(x, self.get_base_layer().bias, self, ct, kernels,
                                 route.constant(training), *route.halves(x.device.type))
        # the compute dtype under autocast, as nn.Linear gives; else the input's
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    def _prepare(self, adapters: tuple[str, ...], disabled: bool, ct: torch.dtype,
                 x: torch.Tensor, kind: str, training: bool,
                 ) -> tuple[_Route, str, list[ContractionPlan]]:
        """The route, the strategy for ``x``'s rows, and for contract each term's plan."""
        route = self._route(adapters, disabled, ct, x, kind, self._sources(adapters, disabled))
        rows = x.numel() // self.in_features
        choice, plan = route.choose(rows, training)
        plans: list[ContractionPlan] = []
        if choice == "contract":
            # the costed plan (one term's chain); adapters of other ranks: their own, alike
            found = {plan.core_shapes: plan}  # type: ignore[union-attr]
            for _, cores in route.terms:
                shapes = tuple(tuple(int(d) for d in c.shape) for c in cores)
                if shapes not in found:
                    found[shapes] = self.choose_strategy(
                        cores, rows, training, adapters[0], kind=kind, dtype=ct)[1]
                plans.append(found[shapes])
        return route, choice, plans

    def __repr__(self) -> str:
        return "dota." + super().__repr__()

    def extra_repr(self) -> str:
        """Shapes, modes and ranks for ``print(model)``."""
        parts = []
        for name, cores in self.dota_cores.items():
            ranks = [1, *(int(c.shape[-1]) for c in cores)]
            parts.append(
                f"{name}: out_modes={[int(c.shape[1]) for c in cores]}, "
                f"in_modes={[int(c.shape[2]) for c in cores]}, ranks={ranks}"
            )
        q = ", residual=nf4" if self.quantized else ""
        return "; ".join(parts) + q


def nf4_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> nn.Module:
    """A frozen bitsandbytes NF4 ``Linear4bit`` holding ``weight`` (quantized on creation).

    Quantized from ``weight`` rounded to ``compute_dtype``, on ``weight``'s device: the
    quant state then dequantizes to ``compute_dtype`` (a float32 state would make every
    dequantization, twice per training step, a float32 W-sized temporary), and a CUDA
    weight never makes a host copy.
    """
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    device = weight.device
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
        quant_type="nf4", device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().to(compute_dtype).contiguous(), requires_grad=False, quant_type="nf4",
        compress_statistics=True,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
    keep_one_cpu_kernel(layer)  # same outputs in train and eval mode, and after a reload
    return layer.to(device)  # quantizes there (Params4bit.to)
