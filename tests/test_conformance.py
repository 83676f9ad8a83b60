"""The adapters' conformance table (peft's ``TEST_CASES``): method x check x device path x dtype.

Every method of :data:`dota_helpers.ALL_METHODS` (DoTA, DoTA-Random, QDoTA, LoTR with normal
and orthogonal init, LoRTA) goes through every check of :data:`CHECKS` on a tiny LLaMA:
unchanged output at init, only the adapter's parameters train, an optimizer step helps,
merge == unmerged (against plain ``nn.Linear`` weights), merge / unmerge round trip,
``disable_adapter`` and ``unload`` give the base, dtype / device follow the base,
``generate`` works, and save / load in a fresh process is bit for bit. Each case runs on
the ``"cpu"`` and on the ``"cuda"`` code path (:func:`tensornet._device.device_path` makes
CPU tensors take the accelerator one), in the dtypes :data:`CHECKS` lists for it (float32,
bfloat16, and float16 where nothing trains). :func:`cases` leaves out, with the reason,
what a method does not support; a refusal that is the contract (QDoTA's ``unload``) is
checked as such. The method-specific tests stay in ``test_adapters.py`` (DoTA) and
``test_lotr_lorta.py``; the tolerances are explained in :mod:`dota_helpers`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from dota_helpers import (
    ALL_METHODS,
    FLOAT32_ATOL,
    IDS,
    TINY_TARGETS,
    adapted,
    adapter_layers,
    assert_untouched,
    base_logits,
    cores,
    dtype_tolerance,
    expected_trainable,
    lm_loss,
    logits,
    snapshot,
    to_nf4_base,
    train,
)
from torch import nn
from transformers import LlamaForCausalLM

from tensornet._device import DEVICE_KINDS, device_path
from tensornet.adapters import tiny_llama
from tensornet.adapters.base import is_4bit
from tensornet.errors import ConfigError
from tensornet.tensorize import cores_to_matrix

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

pytestmark = pytest.mark.usefixtures("one_thread")


def family(method: str) -> str:
    """``"dota"`` (DoTA, DoTA-Random, QDoTA), ``"lotr"`` or ``"lorta"``."""
    return "lotr" if method.startswith("lotr") else "lorta" if method == "lorta" else "dota"


def nf4_bound(out: torch.Tensor, dt: torch.dtype) -> None:
    """QDoTA at init loses no more than QLoRA's base (W0 itself in NF4), in norm and at max."""
    base = base_logits(dt)
    qlora = logits(to_nf4_base(tiny_llama(dtype=dt)))
    assert (out - base).norm() <= (qlora - base).norm()
    assert (out - base).abs().max() <= (qlora - base).abs().max()


def merged_tolerance(method: str, dt: torch.dtype) -> float:
    # QDoTA computes in bf16 (its residual's compute dtype) before the merge.
    return dtype_tolerance(torch.bfloat16 if method == "qdota" else dt)


# ============================================================ the checks


def check_unchanged_at_init(method: str, dt: torch.dtype) -> None:
    out = logits(adapted(method, dt))
    if method == "qdota":
        nf4_bound(out, dt)
    elif family(method) == "dota":  # MPO(T) - MPO(T_init): zero up to rounding
        assert (out - base_logits(dt)).abs().max().item() <= dtype_tolerance(dt)
    else:  # G = 0 / B = 0: exactly zero
        assert torch.equal(out, base_logits(dt))


def check_only_adapter_trains(method: str, dt: torch.dtype) -> None:
    model = adapted(method, dt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(method, model)
    if family(method) == "dota":
        assert len(trainable) == 10 * 5  # 10 layers of 5 cores
    # the embeddings (tied with lm_head), norms, untargeted linears and T_init are frozen
    base = model.get_base_model()
    assert not base.model.embed_tokens.weight.requires_grad
    assert not base.model.layers[0].self_attn.o_proj.weight.requires_grad
    assert not base.model.layers[0].mlp.gate_proj.weight.requires_grad
    assert not any(b.requires_grad for b in model.buffers())
    lm_loss(model).backward()  # at init: every trainable tensor gets a finite gradient
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(torch.isfinite(model.get_parameter(n).grad).all() for n in trainable)
    assert sum(model.get_parameter(n).grad.float().norm() ** 2 for n in trainable) > 0
    train(model, steps=1)  # B = 0 / G = 0: some factors get a zero gradient at step 0 only
    for p in model.parameters():
        p.grad = None
    lm_loss(model).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert model.get_nb_trainable_parameters()[0] == sum(
        model.get_parameter(n).numel() for n in trainable)


def check_steps_lower_the_loss(method: str, dt: torch.dtype) -> None:
    losses = train(adapted(method, dt), steps=4, lr=1e-2)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


def _reference_weights(method: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """``W0 + Delta W`` of every adapted layer, in float64 (DoTA) or as peft forms it."""
    refs = {}
    for name, layer in adapter_layers(model).items():
        w0 = layer.get_base_layer().weight
        if method == "qdota":
            continue  # W0 is NF4(W0 - MPO(T_init)): no dense reference to hold it to
        if family(method) == "dota":  # W0 + MPO(T) - MPO(T_init) from the layer's tensors
            t = [c.detach().double() for c in cores(layer)]
            t0 = [c.double() for c in layer.init_cores("default")]
            refs[name] = w0.detach().double() + cores_to_matrix(t) - cores_to_matrix(t0)
        else:  # the plain nn.Linear weight W0 + Delta W, summed in float32
            refs[name] = (w0.float() + layer.get_delta_weight("default").float()).to(w0.dtype)
    return refs


def check_merge_and_unload_equals_unmerged(method: str, dt: torch.dtype) -> None:
    model = adapted(method, dt)
    train(model, steps=3)
    before = logits(model)
    assert (before - base_logits(dt)).abs().max() > 1e-3  # training changed something
    refs = _reference_weights(method, model)
    merged = model.merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM) and not adapter_layers(merged)
    assert not hasattr(merged, "peft_config")
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3)).to(dt)
    for name in (TINY_TARGETS if family(method) != "lorta" else refs):
        layer = merged.get_submodule(name)
        # the dtype the layer had before it was adapted (QDoTA too: bf16 cores merged into
        # a float32 model must give float32 layers, or the model's forward breaks)
        assert type(layer) is nn.Linear and layer.weight.dtype == dt, name
        if name not in refs:
            continue
        if family(method) == "dota":
            # both products (each of the weights' scale, a few roundings along the chain)
            # formed in float32, subtracted and added: within 8 units in the last place at
            # the weights' scale (measured: ~2 in float32, ~0.5 in bf16)
            ulp = torch.finfo(dt).eps * refs[name].abs().max().item()
            assert (layer.weight.double() - refs[name]).abs().max() <= 8 * ulp, name
        else:  # bit for bit the plain nn.Linear holding W0 + Delta W
            ref = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=dt)
            with torch.no_grad():
                ref.weight.copy_(refs[name])
                xi = x[..., : layer.in_features]
                assert torch.equal(layer.weight, ref.weight), name
                assert torch.equal(layer(xi), ref(xi)), name
    assert (logits(merged) - before).abs().max().item() <= merged_tolerance(method, dt)


def check_merge_then_unmerge(method: str, dt: torch.dtype) -> None:
    model = adapted(method, dt, init_weights=False, seed=0)
    unmerged = logits(model)
    assert not torch.equal(unmerged, base_logits(dt))  # init_weights=False: not the base
    model.merge_adapter()
    assert all(layer.merged for layer in adapter_layers(model).values())
    tol = merged_tolerance(method, dt)
    assert (logits(model) - unmerged).abs().max().item() <= tol
    model.unmerge_adapter()
    assert not any(layer.merged for layer in adapter_layers(model).values())
    again = logits(model)
    if method == "qdota":  # unmerge puts the very NF4 residual layer back
        assert torch.equal(again, unmerged)
    else:  # W0 + dW - dW: one rounding per weight in the base's dtype
        assert (again - unmerged).abs().max().item() <= tol


def check_disable_adapter_gives_the_base(method: str, dt: torch.dtype) -> None:
    model = adapted(method, dt)
    at_init = logits(model)
    train(model, steps=2)
    trained = logits(model)
    with model.disable_adapter():
        disabled = logits(model)
    assert torch.equal(logits(model), trained)  # enabled again on leaving the context
    if method != "qdota":  # W0 is never modified: exactly the base
        assert torch.equal(disabled, base_logits(dt))
        return
    # QDoTA: NF4(W0 - MPO(T_init)) + MPO(T_init), which is QDoTA at init (T == T_init)
    # and W0 up to the residual's NF4 rounding (no worse than QLoRA's base)
    assert torch.equal(disabled, at_init)
    nf4_bound(disabled, dt)


def check_unload_gives_back_the_base(method: str, dt: torch.dtype) -> None:
    model = adapted(method, dt)
    base_layers = {name: layer.get_base_layer() for name, layer in adapter_layers(model).items()}
    train(model, steps=2)
    if method == "qdota":  # the base was replaced by NF4(W0 - MPO(T_init)): refused
        before, out = snapshot(model), logits(model)
        with pytest.raises(ConfigError, match="merge_and_unload"):
            model.unload()
        assert_untouched(model, before)
        assert torch.equal(logits(model), out)
        return
    unloaded = model.unload()
    assert not adapter_layers(unloaded)
    for name, original_layer in base_layers.items():
        layer = unloaded.get_submodule(name)
        assert layer is original_layer  # the original layer object, back in place
        assert type(layer) is nn.Linear and layer.weight.dtype == dt
    # bit for bit: every tensor of the model, and its output
    state, ref = unloaded.state_dict(), tiny_llama(dtype=dt).state_dict()
    assert state.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(logits(unloaded), base_logits(dt))


def check_dtype_and_device_follow_the_base(method: str, dt: torch.dtype) -> None:
    config_dtype = torch.bfloat16 if method == "qdota" else dt  # DoTAConfig(dtype=None)
    # peft's default upcasts adapter weights to float32 (autocast_adapter_dtype=True);
    # without it they keep the config's dtype. DoTA's T_init is a buffer peft leaves alone.
    for autocast, expected in ((True, torch.float32), (False, config_dtype)):
        model = adapted(method, dt, autocast_adapter_dtype=autocast)
        for name in expected_trainable(method, model):
            p = model.get_parameter(name)
            assert (p.dtype, p.device.type) == (expected, "cpu"), (name, autocast)
            assert p.requires_grad, name
        for name, layer in adapter_layers(model).items():
            base = layer.get_base_layer()
            assert base.weight.device.type == "cpu", name
            if family(method) == "dota":
                assert all(b.dtype == config_dtype for b in layer.init_cores("default")), name
                assert layer.quantized == (method == "qdota")
            if method == "qdota":
                assert is_4bit(base) and base.compute_dtype == config_dtype
            else:
                assert base.weight.dtype == dt, name
        out = model(input_ids=IDS).logits
        assert out.shape == (2, 8, 128)
        assert out.dtype == dt  # activations keep the base model's dtype
        lm_loss(model).backward()
        assert all(model.get_parameter(n).grad is not None
                   for n in expected_trainable(method, model))


def check_generate_matches_base_at_init(method: str, dt: torch.dtype) -> None:
    prompt = IDS[:1, :4]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                  pad_token_id=2)
    with torch.no_grad():
        base = tiny_llama(dtype=dt).generate(input_ids=prompt, **kwargs)
        out = adapted(method, dt).generate(input_ids=prompt, **kwargs)
    assert out.shape[0] == 1 and out.shape[1] > prompt.shape[1]
    assert torch.equal(out[:, :4], prompt)
    if method != "qdota":  # W0 + a zero update (to ~1e-7 for DoTA): greedy tokens agree
        assert torch.equal(out, base)


def check_save_load_in_a_fresh_process(method: str, dt: torch.dtype, fresh: dict) -> None:
    here, there = fresh
    assert there["peft_type"] == here["peft_type"]  # the right method's file came back
    assert (here["logits"] - base_logits(dt)).abs().max() > 1e-3  # trained, not the base
    # Same file, same base, same deterministic CPU kernels, same plan: bit for bit.
    assert torch.equal(here["logits"], there["logits"]), (
        (here["logits"] - there["logits"]).abs().max())
    # the adapter's tensors (DoTA: T and T_init) come back as they were, same dtype and device
    assert here["state"] and here["state"].keys() == there["state"].keys()
    if family(method) == "dota":
        assert any(".dota_init." in k for k in here["state"])
    for k, v in here["state"].items():
        w = there["state"][k]
        assert (w.dtype, w.device) == (v.dtype, v.device), k
        assert torch.equal(w, v), k


#: check name -> (function, dtypes it runs in).
CHECKS: dict[str, tuple[Callable[..., None], tuple[str, ...]]] = {
    "unchanged-at-init": (check_unchanged_at_init, ("float32", "bfloat16", "float16")),
    "only-adapter-trains": (check_only_adapter_trains, ("float32", "bfloat16")),
    "steps-lower-the-loss": (check_steps_lower_the_loss, ("float32", "bfloat16")),
    "merge-and-unload": (check_merge_and_unload_equals_unmerged, ("float32", "bfloat16")),
    "merge-unmerge": (check_merge_then_unmerge, ("float32", "bfloat16")),
    "disable-adapter": (check_disable_adapter_gives_the_base, ("float32", "bfloat16")),
    "unload": (check_unload_gives_back_the_base, ("float32", "bfloat16")),
    "dtype-device": (check_dtype_and_device_follow_the_base,
                     ("float32", "bfloat16", "float16")),
    # generate: peft's generation plumbing, the same in every dtype (the numbers at init
    # in each dtype are unchanged-at-init's)
    "generate": (check_generate_matches_base_at_init, ("float32",)),
    "save-load-fresh-process": (check_save_load_in_a_fresh_process, ("float32", "bfloat16")),
}
# float16 only where nothing trains: a float16 training step needs a loss scaler
# (GradScaler), which is the trainer's business (tests/test_device_paths.py runs DoTA's
# float16 numerics with one).


def cases() -> list:
    """method x check x device path x dtype, less what a method does not support."""
    out = []
    for method in ALL_METHODS:
        for check, (_, dtypes) in CHECKS.items():
            for kind in DEVICE_KINDS:
                # LoTR and LoRTA compute the same way on every device: the device seam
                # reaches them only through the base-weight fingerprint, written at save
                # and checked at load, which the fresh-process case covers on both paths.
                if kind == "cuda" and family(method) != "dota" and check != (
                        "save-load-fresh-process"):
                    continue
                for dtype in dtypes:
                    out.append(pytest.param(method, check, kind, dtype,
                                            id=f"{method}-{check}-{kind}-{dtype}"))
    # the fresh interpreter loads while the other checks run: its cases go last
    return sorted(out, key=lambda p: p.values[1] == "save-load-fresh-process")


CASES = cases()

# ============================================================ save / load, one fresh process

_FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from peft import PeftModel
    from tensornet._device import device_path
    from tensornet.adapters import tiny_llama
    spec = json.loads(sys.argv[1])
    ids = torch.tensor(spec["ids"])
    for job in spec["jobs"]:
        with device_path(job["kind"]):
            base = tiny_llama(dtype=getattr(torch, job["dtype"]))
            model = PeftModel.from_pretrained(base, job["path"])
            with torch.no_grad():
                out = model(input_ids=ids).logits
        state = {k: v for k, v in model.state_dict().items() if job["prefix"] in k}
        torch.save({"logits": out, "state": state, "peft_type": str(model.peft_type)},
                   job["out"])
    """
)

#: DoTA's forced strategies, saved and loaded beside the table's cases: the planner of
#: ``strategy="auto"`` picks one of them, so a reload must reproduce each.
STRATEGY_CASES = {f"dota-{s}-{k}": ("dota", k, "float32", {"strategy": s})
                  for s in ("dense", "contract") for k in DEVICE_KINDS}
FRESH_CASES = {
    **{f"{p.values[0]}-{p.values[2]}-{p.values[3]}": (p.values[0], p.values[2], p.values[3], {})
       for p in CASES if p.values[1] == "save-load-fresh-process"},
    **STRATEGY_CASES,
}
_PREFIX = {"dota": ".dota_", "lotr": ".lotr_", "lorta": ".lorta_"}


class FreshRun:
    """Adapters trained and saved here, loaded by ONE fresh interpreter running meanwhile.

    ``run[case]`` is ``(here, there)``, each ``{"logits", "state", "peft_type"}``
    (``state``: the adapter's tensors as they sit in the model); the first look waits for
    the interpreter. It starts when the table does and loads while the other checks run
    (its imports alone take seconds), which is why the table puts these cases last.
    """

    def __init__(self, root: Path, here: dict, proc: subprocess.Popen, log: Path) -> None:
        self.root, self.here, self.proc, self.log = root, here, proc, log
        self.there: dict | None = None

    def __getitem__(self, case: str) -> tuple[dict, dict]:
        if self.there is None:
            returncode = self.proc.wait(timeout=300)
            assert returncode == 0, self.log.read_text()[-3000:]
            self.there = {}
            for name in self.here:
                there = torch.load(self.root / f"{name}.pt")
                there["logits"] = there["logits"].float()
                self.there[name] = there
        return self.here[case], self.there[case]


def _needs_fresh_process(item: pytest.Item) -> bool:
    name, callspec = getattr(item, "originalname", ""), getattr(item, "callspec", None)
    return name == "test_dota_forced_strategy_reloads_bit_for_bit" or (
        name == "test_conformance" and callspec.params["check"] == "save-load-fresh-process")


@pytest.fixture(scope="module")
def fresh_process(request, tmp_path_factory):
    """Train and save every :data:`FRESH_CASES` here; start the fresh interpreter on them.

    The planner of ``strategy="auto"`` uses fixed machine constants, so both processes
    pick the same contraction and compute the same bits. Nothing is done when no selected
    test needs it (``-k``).
    """
    if not any(_needs_fresh_process(item) for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("conformance")
    here, jobs = {}, []
    for case, (method, kind, dtype, overrides) in FRESH_CASES.items():
        prefix = _PREFIX[family(method)]
        with device_path(kind):
            model = adapted(method, DTYPES[dtype], **overrides)
            train(model, steps=1)  # one AdamW step moves every factor away from the init
            model.save_pretrained(root / case)
            state = {k: v.detach().clone() for k, v in model.state_dict().items() if prefix in k}
            here[case] = {"logits": logits(model), "state": state,
                          "peft_type": str(model.peft_type)}
        jobs.append({"dtype": dtype, "kind": kind, "prefix": prefix, "path": str(root / case),
                     "out": str(root / f"{case}.pt")})
    log = root / "stderr.txt"
    spec = json.dumps({"ids": IDS.tolist(), "jobs": jobs})
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _FRESH_SCRIPT, spec], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield FreshRun(root, here, proc, log)
    finally:
        if proc.poll() is None:  # a failure before the run was read: do not leave it behind
            proc.kill()
            proc.wait()


# ============================================================ the table, run


@pytest.mark.parametrize(("method", "check", "kind", "dtype"), CASES)
def test_conformance(method, check, kind, dtype, fresh_process):
    run, _ = CHECKS[check]
    dt = DTYPES[dtype]
    if check == "save-load-fresh-process":
        run(method, dt, fresh_process[f"{method}-{kind}-{dtype}"])
        return
    with device_path(kind):
        run(method, dt)


@pytest.mark.parametrize("case", list(STRATEGY_CASES))
def test_dota_forced_strategy_reloads_bit_for_bit(case, fresh_process):
    method, _, dtype, _ = STRATEGY_CASES[case]
    check_save_load_in_a_fresh_process(method, DTYPES[dtype], fresh_process[case])


def test_the_table_covers_every_method_and_check():
    seen = {(p.values[0], p.values[1]) for p in CASES}
    assert seen == {(m, c) for m in ALL_METHODS for c in CHECKS}
    assert {p.values[2] for p in CASES if family(p.values[0]) == "dota"} == set(DEVICE_KINDS)
    assert FLOAT32_ATOL < dtype_tolerance(torch.float16) < dtype_tolerance(torch.bfloat16)
