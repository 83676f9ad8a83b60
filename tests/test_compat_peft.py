"""The compatibility layer for peft and torch: every private name tensornet uses, checked upstream.

tensornet reaches peft's and torch's underscore names only through
``tensornet/_compat/peft.py`` and ``tensornet/_compat/torch.py``. Each test here names the
shim to fix when it fails, so that an upgrade which renames, removes or re-signs one of
them fails here, loudly, instead of leaving an override peft no longer calls (dead code)
or a read of an attribute that no longer changes. The last test keeps those names out of
the rest of ``tensornet/``.
"""

from __future__ import annotations

import enum
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "tensornet"


def _names(callable_: object) -> list[str]:
    """Parameter names of a function or method, without ``self`` / ``cls``."""
    params = list(inspect.signature(callable_).parameters.values())
    return [p.name for p in params if p.name not in ("self", "cls")]


def _check_signature(owner: type, name: str, expected: tuple[str, ...], shim: str) -> list:
    """peft's/torch's ``owner.name`` exists and begins with ``expected``; the rest is optional."""
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    assert hasattr(owner, name), (
        f"{where} is gone from the installed {owner.__module__.split('.')[0]}: {shim} "
        f"relies on it; find what replaced it and fix the shim"
    )
    upstream = list(inspect.signature(getattr(owner, name)).parameters.values())
    upstream = [p for p in upstream if p.name not in ("self", "cls")]
    got = tuple(p.name for p in upstream[: len(expected)])
    assert got == expected, (
        f"{where} now takes {[p.name for p in upstream]}, {shim} expects {list(expected)} "
        f"first: fix the shim to the new parameters"
    )
    extra = [p.name for p in upstream[len(expected):]
             if p.default is inspect.Parameter.empty
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not extra, f"{where} gained required parameters {extra}: fix {shim}"
    return upstream


# ---------------------------------------------------------------------- peft (_compat/peft)


def test_every_tuner_hook_tensornet_overrides_is_peft_s():
    from tensornet._compat.peft import TUNER_HOOKS, TunerHooks

    for name, params in TUNER_HOOKS.items():
        shim = f"tensornet._compat.peft.TunerHooks.{name}"
        upstream = _check_signature(BaseTuner, name, params, shim)
        ours = inspect.getattr_static(TunerHooks, name)
        theirs = inspect.getattr_static(BaseTuner, name)
        assert type(ours) is type(theirs), (
            f"peft's BaseTuner.{name} is now a {type(theirs).__name__}, {shim} a "
            f"{type(ours).__name__}: make them the same kind"
        )
        # whatever peft may pass, the override accepts (by keyword, as peft passes them)
        inspect.signature(getattr(TunerHooks, name)).bind_partial(
            **{p.name: None for p in upstream if p.kind is not p.VAR_KEYWORD
               and p.kind is not p.VAR_POSITIONAL})


def test_every_tuner_method_tensornet_calls_is_peft_s():
    from tensornet._compat.peft import TUNER_CALLS

    for name, params in TUNER_CALLS.items():
        _check_signature(BaseTuner, name, params, f"tensornet._compat.peft ({name})")


def test_every_layer_hook_and_call_is_peft_s():
    from tensornet._compat.peft import LAYER_CALLS, LAYER_HOOKS, LAYER_STATE, LayerHooks

    for name, params in LAYER_HOOKS.items():
        shim = f"tensornet._compat.peft.LayerHooks.{name}"
        upstream = _check_signature(BaseTunerLayer, name, params, shim)
        inspect.signature(getattr(LayerHooks, name)).bind_partial(
            None, **{p.name: None for p in upstream})
    for name, params in LAYER_CALLS.items():
        _check_signature(BaseTunerLayer, name, params, f"tensornet._compat.peft ({name})")
    # the state peft's layer properties read (``active_adapter``, ``disable_adapters``)
    for name, read_by in LAYER_STATE.items():
        source = inspect.getsource(getattr(BaseTunerLayer, read_by).fget)
        assert f"self.{name}" in source, (
            f"peft's BaseTunerLayer.{read_by} no longer reads {name}: "
            f"tensornet._compat.peft.LayerHooks sets it; fix the shim"
        )


def test_hooks_peft_looks_up_by_name_are_still_called():
    import importlib

    from tensornet._compat.peft import CALLED_BY_NAME

    for name, callers in CALLED_BY_NAME.items():
        for caller in callers:
            module, _, attr = caller.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            assert name in inspect.getsource(obj), (
                f"peft's {caller} no longer calls {name}: tensornet._compat.peft's override "
                f"of it is dead code now; find where peft moved the call and fix the shim"
            )


def test_tensornet_s_names_shadow_nothing_of_peft_or_torch():
    """A name of the shims' own, added upstream later, would silently override upstream's."""
    from tensornet._compat.peft import LayerHooks, TunerHooks
    from tensornet._compat.torch import ModuleHooks

    for ours, theirs in ((TunerHooks, BaseTuner), (LayerHooks, BaseTunerLayer),
                         (ModuleHooks, nn.Module)):
        own = [n for n in vars(ours) if not n.startswith("_")]
        clash = [n for n in own if hasattr(theirs, n)]
        assert not clash, (
            f"{theirs.__qualname__} now has {clash}, names tensornet._compat gives its own "
            f"hooks ({ours.__qualname__}): rename tensornet's"
        )


def test_target_matching_and_exclusion():
    from peft import LoraConfig

    from tensornet._compat.peft import TunerHooks, is_excluded

    config = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.q_proj"])
    hit = TunerHooks.target_matches(config, "model.layers.0.q_proj")
    assert hit and not is_excluded(hit)
    assert is_excluded(TunerHooks.target_matches(config, "model.layers.1.q_proj"))
    assert not TunerHooks.target_matches(config, "model.layers.0.k_proj")


def test_buffer_dict_is_peft_s_and_holds_buffers():
    from tensornet._compat.peft import BufferDict
    from tensornet._compat.torch import own_buffers

    held = BufferDict({"0": torch.ones(2), "1": torch.zeros(3)}, persistent=True)
    assert isinstance(held, nn.Module) and list(held.state_dict()) == ["0", "1"]
    assert list(own_buffers(held)) == ["0", "1"] and not list(held.parameters())


def test_enum_members_can_be_added():
    from tensornet._compat.peft import add_enum_member

    class Probe(str, enum.Enum):
        OLD = "OLD"

    member = add_enum_member(Probe, "NEW")
    assert Probe("NEW") is member and Probe.NEW is member and Probe["NEW"] is member
    assert member in list(Probe) and member.value == "NEW" and member.name == "NEW"
    assert add_enum_member(Probe, "NEW") is member and add_enum_member(Probe, "OLD") is Probe.OLD


def test_peft_knows_tensornet_s_types():
    from peft.utils.peft_types import PeftType

    import tensornet.adapters  # noqa: F401

    for name in ("DOTA", "LOTR", "LORTA"):
        assert PeftType(name) is getattr(PeftType, name) and PeftType[name] in list(PeftType)


# --------------------------------------------------------------------- torch (_compat/torch)


def test_version_of_counts_in_place_writes():
    from tensornet._compat.torch import version_of

    t = torch.zeros(3)
    before = version_of(t)
    t.add_(1)
    assert version_of(t) == before + 1, (
        "torch.Tensor._version no longer counts in-place writes: "
        "tensornet._compat.torch.version_of (DoTA's serving stamps) needs another way"
    )


def test_raise_recompile_limit_sets_dynamos_limit():
    import torch._dynamo

    from tensornet._compat.torch import raise_recompile_limit

    config = torch._dynamo.config
    assert hasattr(config, "recompile_limit"), (
        "torch._dynamo.config.recompile_limit moved: tensornet._compat.torch."
        "raise_recompile_limit (benchmarks/bench_speed.py's compile check) needs the new name"
    )
    before = config.recompile_limit
    try:
        raise_recompile_limit(before + 5)
        assert config.recompile_limit == before + 5
        raise_recompile_limit(1)  # never lowers it
        assert config.recompile_limit == before + 5
    finally:
        config.recompile_limit = before


def test_own_parameters_and_buffers_are_the_live_dicts():
    from tensornet._compat.torch import own_buffers, own_parameters

    layer = nn.Linear(2, 3)
    layer.register_buffer("scale", torch.ones(1))
    child = nn.Linear(2, 2)
    layer.add_module("child", child)
    assert list(own_parameters(layer)) == ["weight", "bias"]  # not the child's
    assert own_parameters(layer)["weight"] is layer.weight
    assert list(own_buffers(layer)) == ["scale"]
    layer.register_parameter("extra", nn.Parameter(torch.zeros(1)))
    assert "extra" in own_parameters(layer)  # the module's own dict, not a copy


def test_module_hooks_run_on_conversion_and_load():
    from tensornet._compat.torch import MODULE_HOOKS, ModuleHooks

    for name, params in MODULE_HOOKS.items():
        _check_signature(nn.Module, name, params, f"tensornet._compat.torch.ModuleHooks.{name}")

    calls = []

    class Probe(ModuleHooks):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def before_convert(self) -> None:
            calls.append("convert")

        def before_load_state(self, state_dict, prefix) -> None:
            calls.append(("load", prefix, sorted(state_dict)))

    outer = nn.Sequential(Probe())
    outer.to(torch.float64)
    assert calls == ["convert"], (
        "nn.Module.to() no longer reaches a child's _apply: "
        "tensornet._compat.torch.ModuleHooks.before_convert is not called"
    )
    outer.load_state_dict(outer.state_dict())
    assert calls[1] == ("load", "0.", ["0.lin.bias", "0.lin.weight"]), (
        "nn.Module.load_state_dict no longer calls _load_from_state_dict per module: "
        "tensornet._compat.torch.ModuleHooks.before_load_state is not called"
    )


# ------------------------------------------------------------------ the layer is the only way


def _private(names: object) -> set[str]:
    return {n for n in names if re.fullmatch(r"_[A-Za-z]\w*", n) and not n.startswith("__")}


def _foreign_private_names() -> dict[str, str]:
    """Every underscore name of peft's tuner framework and of torch's modules and tensors."""
    import peft.utils.save_and_load as save_and_load
    from peft import PeftConfig, PeftModel
    from peft.tuners import tuners_utils

    torch_names = (_private(dir(nn.Module)) | _private(vars(nn.Module()))
                   | _private(dir(torch.Tensor)))
    peft_names = (_private(dir(BaseTuner)) | _private(dir(BaseTunerLayer))
                  | _private(dir(PeftModel)) | _private(dir(PeftConfig))
                  | _private(vars(tuners_utils)) | _private(vars(save_and_load))
                  # instance state of peft's layers, its private modules, and the enum
                  # internals tensornet's peft types are added through
                  | {"_active_adapter", "_disable_adapters", "_buffer_dict",
                     "_member_map_", "_value2member_map_", "_member_names_", "_name_",
                     "_value_", "_sort_order_"}) - torch_names
    return {**{n: "torch" for n in torch_names}, **{n: "peft" for n in peft_names}}


#: private module paths and names imported from peft or torch (``peft.tuners._buffer_dict``,
#: ``torch._dynamo``, ``from peft... import _ExcludedModule``)
_PRIVATE_PATH = re.compile(r"\b(?:peft|torch)(?:\.\w+)*\._[A-Za-z]\w*")
_PRIVATE_IMPORT = re.compile(r"from\s+(?:peft|torch)[\w.]*\s+import\s+[^\n]*\b_[A-Za-z]\w*")


def test_no_peft_or_torch_private_name_outside_the_compat_layer():
    """Whole words, in code, comments and docstrings alike (a comment that names peft's
    hook is where the next reader would put the call); ``tensornet/_compat/`` excepted."""
    foreign = _foreign_private_names()
    offenders = []
    # the package and the benchmarks that ship with it (the tests may reach torch's
    # dispatch internals to count kernels)
    for path in sorted([*ROOT.rglob("*.py"), *(ROOT.parent / "benchmarks").glob("*.py")]):
        if "_compat" in path.relative_to(ROOT.parent).parts:
            continue
        rel = path.relative_to(ROOT.parent)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found = {m.group(0) for p in (_PRIVATE_PATH, _PRIVATE_IMPORT) for m in p.finditer(line)}
            found |= {f"{foreign[w]} {w}" for w in re.findall(r"\b_[A-Za-z]\w*\b", line)
                      if w in foreign}
            offenders += [f"{rel}:{number}: {name}" for name in sorted(found)]
    assert not offenders, (
        "peft/torch private names outside tensornet/_compat/ (reach them through "
        "tensornet._compat.peft / tensornet._compat.torch):\n" + "\n".join(offenders)
    )
