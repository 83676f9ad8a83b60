"""DoTA trains with an unchanged Hugging Face ``transformers.Trainer``.

A tiny random LLaMA (:func:`tensornet.adapters.tiny_llama`) gets DoTA adapters through
``peft.get_peft_model`` and is handed to ``Trainer`` as is: no custom trainer, no callback,
no optimizer override. Each run repeats one fixed batch for a few steps and checks that

* the training loss goes down,
* only the MPO cores change (the whole state dict is compared before and after),
* merging the trained adapters into plain ``nn.Linear`` layers gives the unmerged outputs,

with activation (gradient) checkpointing off, on (transformers' default, non-reentrant), on in
the reentrant variant, and with ``bf16=True`` (CPU autocast). Then what the Trainer does with
a peft model's checkpoints: they hold the adapter only, ``resume_from_checkpoint`` continues
to the adapter an uninterrupted run reaches, and ``load_best_model_at_end`` loads the best
checkpoint's adapter.

What gradient checkpointing needs: nothing beyond enabling it. DoTA freezes the embeddings, so
with *reentrant* checkpointing the input of the first checkpointed block does not require
grad and the block would give its cores no gradient. transformers 5.x calls
``model.enable_input_require_grads()`` itself in ``activation_checkpointing_enable`` /
``gradient_checkpointing_enable`` for every model whose input is ``input_ids``, and its
default is non-reentrant checkpointing, which does not need it at all.
``test_reentrant_checkpointing_needs_input_grads`` shows what happens without that hook.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from tensornet.adapters import DoTAConfig, DoTALinear, tiny_llama
from tensornet.adapters.files import MANIFEST_KEY

STEPS = 5
LR = 1e-2
ADAPTER_FILE = "adapter_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _dataset() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": row, "labels": row} for row in _batch()]


def _dota_model(**config) -> PeftModel:
    return get_peft_model(tiny_llama(), DoTAConfig(**config))


def _args(tmp_path, **args) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=LR,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**defaults, **args})


def _train(model, tmp_path, **args) -> list[float]:
    """Train with a stock Trainer on one repeated batch; return the logged losses."""
    trainer = Trainer(model=model, args=_args(tmp_path, **args), train_dataset=_dataset())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == trainer.args.max_steps
    # With bf16, accelerate wraps model.forward in autocast for good; take the wrapper off
    # so that the checks after training compare float32 computations.
    unwrapped = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    assert unwrapped is model
    return losses


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def _q_proj(model: PeftModel) -> DoTALinear:
    return model.get_base_model().model.layers[0].self_attn.q_proj


def _cores(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".dota_cores." in k}


def _check_only_cores_changed(before, model):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    cores = {k for k in before if ".dota_cores." in k}
    assert len(cores) == 10 * 5  # 10 adapted layers x 5 cores
    assert changed == cores  # every core moved; W0, T_init, embeddings did not


def _check_merge_matches(model):
    model.eval()
    ids = _batch()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert not any(isinstance(m, DoTALinear) for m in merged_model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """Reference run without checkpointing: losses and the trained cores."""
    torch.set_num_threads(1)
    model = _dota_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _count_calls(_q_proj(model))
    losses = _train(model, tmp_path_factory.mktemp("plain"))
    return model, before, losses, calls[0], _cores(model)


def test_trainer_plain(plain_run):
    model, before, losses, calls, _ = plain_run
    assert calls == STEPS  # one forward of the layer per step
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.2, losses
    _check_only_cores_changed(before, model)
    _check_merge_matches(model)


@pytest.mark.parametrize("how", ["trainer-argument", "reentrant"])
def test_trainer_with_activation_checkpointing(plain_run, tmp_path, how):
    model = _dota_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _count_calls(_q_proj(model))
    if how == "trainer-argument":
        # TrainingArguments(activation_checkpointing=True) is the new name of
        # gradient_checkpointing=True; the Trainer enables it on the model (non-reentrant).
        losses = _train(model, tmp_path, activation_checkpointing=True)
    else:
        # The model method, reentrant variant: the one that needs input grads (see above).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated alias in 5.x
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": True}
            )
        assert hasattr(model.get_base_model(), "_require_grads_hook")  # transformers did it
        losses = _train(model, tmp_path)
    assert model.get_base_model().is_activation_checkpointing
    # Checkpointing really happened: each layer ran twice per step (forward + recompute).
    assert calls[0] == 2 * STEPS
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    _check_only_cores_changed(before, model)
    # Checkpointing trades memory for compute; the numbers are the same as without it.
    _, _, plain_losses, _, plain_cores = plain_run
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    # AdamW divides each gradient element by its running RMS, so a rounding difference in a
    # near-zero gradient element (the recompute runs the same ops in another order of
    # graph construction) can move that core entry by up to ~lr * 1e-3 over five steps.
    trained = _cores(model)
    for k, v in plain_cores.items():
        torch.testing.assert_close(trained[k], v, rtol=1e-3, atol=1e-4)
    _check_merge_matches(model)


def test_reentrant_checkpointing_needs_input_grads():
    # Without the hook that transformers installs, reentrant checkpointing of a model whose
    # only trainable parameters are inside the checkpointed blocks computes a loss with no
    # graph at all: no core would ever receive a gradient.
    model = _dota_model()
    base = model.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    base.disable_input_require_grads()
    model.train()
    ids = _batch()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        loss = model(input_ids=ids, labels=ids).loss
    assert not loss.requires_grad
    base.enable_input_require_grads()  # the fix (what transformers does by default)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(
        c.grad is not None and c.grad.abs().sum() > 0 for c in model.parameters() if c.requires_grad
    )


def test_trainer_bf16(tmp_path):
    # TrainingArguments(bf16=True, use_cpu=True) runs the forward under
    # torch.autocast("cpu", torch.bfloat16); the cores stay float32 (mixed precision).
    # The planner's choice ("auto") is used: the contract path runs its small products
    # with autocast off (tests/test_autocast.py covers both strategies). Under autocast
    # the dense path forms MPO(T) in bfloat16 (autocast casts the matmuls of
    # cores_to_matrix), as peft's LoRA computes B(A(x)) in bfloat16; merge forms it in
    # float32, so the merge check below runs in float32, outside autocast.
    model = _dota_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model.get_base_model().model.layers[0].mlp.gate_proj.register_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype)
    )
    losses = _train(model, tmp_path, bf16=True)
    assert seen and set(seen) == {torch.bfloat16}  # autocast was on
    assert losses[-1] < losses[0] - 0.2, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= STEPS - 2, losses
    _check_only_cores_changed(before, model)
    layers = [m for m in model.modules() if isinstance(m, DoTALinear)]
    assert {c.dtype for m in layers for c in m.dota_cores["default"]} == {torch.float32}
    _check_merge_matches(model)


# ============================================================ checkpoints


def _file_cores(path) -> dict[str, torch.Tensor]:
    """The cores of an adapter file, keyed as in the model's state dict (adapter "default")."""
    out = {}
    for k, v in load_file(str(path / ADAPTER_FILE)).items():
        if ".dota_cores." in k:
            head, _, index = k.rpartition(".")
            out[f"{head}.default.{index}"] = v
    return out


CHECKPOINTED = dict(max_steps=6, save_strategy="steps", save_steps=3)


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """6 steps, a checkpoint every 3; R=4 so that the adapter is small next to the model."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("checkpointed")
    model = _dota_model(rank=4)
    _train(model, out, **CHECKPOINTED)
    return out, _cores(model)


def test_checkpoints_hold_the_adapter_only(checkpointed_run, tmp_path):
    out, final = checkpointed_run
    folders = sorted(p.name for p in out.glob("checkpoint-*"))
    assert folders == ["checkpoint-3", "checkpoint-6"]
    tiny_llama().save_pretrained(tmp_path / "full")
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    for name in folders:
        folder = out / name
        files = {p.name for p in folder.iterdir()}
        assert {ADAPTER_FILE, "adapter_config.json"} <= files, files
        assert not {"model.safetensors", "pytorch_model.bin"} & files, files
        assert not list(folder.glob("model-*.safetensors"))
        assert (folder / ADAPTER_FILE).stat().st_size < full / 5
        keys = set(load_file(str(folder / ADAPTER_FILE))) - {MANIFEST_KEY}
        assert keys and all(".dota_cores." in k or ".dota_init." in k for k in keys)
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "DOTA"
    # the last checkpoint is the trained adapter
    last = _file_cores(out / "checkpoint-6")
    assert last.keys() == final.keys()
    assert all(torch.equal(v, final[k]) for k, v in last.items())


def test_resume_from_checkpoint_reaches_the_uninterrupted_adapter(checkpointed_run, tmp_path):
    out, final = checkpointed_run
    model = _dota_model(rank=4)  # a fresh start; the checkpoint supplies cores and optimizer
    trainer = Trainer(model=model, args=_args(tmp_path, **CHECKPOINTED),
                      train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert trainer.state.global_step == 6
    resumed = _cores(model)
    assert resumed.keys() == final.keys()
    # same seed, data, optimizer state and RNG state: the same bits as never stopping
    for k, v in final.items():
        assert torch.equal(resumed[k], v), (k, (resumed[k] - v).abs().max())
    at_three = _file_cores(out / "checkpoint-3")
    assert any(not torch.equal(at_three[k], v) for k, v in final.items())  # it did train on


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    # Eval on the training batch, whose loss falls at every step (test_trainer_plain), and
    # call the *highest* eval loss best: the best checkpoint is then the first one, not the
    # last, so loading it at the end is visible in the model's cores.
    model = _dota_model(rank=4)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2,
                   save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                   metric_for_best_model="eval_loss", greater_is_better=True),
        train_dataset=_dataset(),
        eval_dataset=_dataset(),
    )
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2], evals
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert trainer.state.best_metric == evals[0]
    best = _file_cores(tmp_path / "checkpoint-2")
    last = _file_cores(tmp_path / "checkpoint-6")
    now = _cores(model)
    assert now.keys() == best.keys()
    assert all(torch.equal(now[k], v) for k, v in best.items())
    assert any(not torch.equal(now[k], v) for k, v in last.items())
    # and the model evaluates as the best checkpoint did
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[0], rel=1e-6)


def test_resume_skips_a_checkpoint_whose_save_was_interrupted(tmp_path):
    # a run killed while the Trainer writes checkpoint-K leaves checkpoint-K without its
    # state: --resume picked it and failed on the missing tensornet_best.pt
    from tensornet.finetune.trainer import BEST_FILE, CHECKPOINT_DIR, last_checkpoint

    root = tmp_path / CHECKPOINT_DIR
    assert last_checkpoint(tmp_path) is None
    for step, files in ((3, ("trainer_state.json", BEST_FILE)), (10, ("trainer_state.json",)),
                        (12, ()), (6, ("trainer_state.json", BEST_FILE, "optimizer.pt"))):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        for name in files:
            (root / f"checkpoint-{step}" / name).write_text("{}")
    (root / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == root / "checkpoint-6"
    (root / "checkpoint-10" / BEST_FILE).write_text("{}")  # its save completed
    assert last_checkpoint(tmp_path) == root / "checkpoint-10"
