"""DoTA trains with an unchanged Hugging Face ``transformers.Trainer``.

A tiny random LLaMA (:func:`tensornet.adapters.tiny_llama`) gets DoTA adapters and is handed
to ``Trainer`` as is: no custom trainer, no callback, no optimizer override. Each run repeats
one fixed batch for a few steps and checks that

* the training loss goes down,
* only the MPO cores change (the whole state dict is compared before and after),
* merging the trained adapters into plain ``nn.Linear`` layers gives the unmerged outputs,

with activation (gradient) checkpointing off, on (transformers' default, non-reentrant), on in
the reentrant variant, and with ``bf16=True`` (CPU autocast).

What gradient checkpointing needs: nothing beyond enabling it. DoTA freezes the embeddings, so
with *reentrant* checkpointing the input of the first checkpointed block does not require
grad and the block would give its cores no gradient. transformers 5.x calls
``model.enable_input_require_grads()`` itself in ``activation_checkpointing_enable`` /
``gradient_checkpointing_enable`` for every model whose input is ``input_ids`` (4.x did so only
for models with PEFT adapters loaded through its integration), and its default is
non-reentrant checkpointing, which does not need it at all.
``test_reentrant_checkpointing_needs_input_grads`` shows what happens without that hook.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments

from tensornet.adapters import DoTALinear, apply_dota, merge, tiny_llama

STEPS = 5
LR = 1e-2


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine has 2 cores shared with other jobs; torch's intra-op threads then
    # oversubscribe them and a 20 ms step takes seconds. One thread is also bit-reproducible.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _dota_model(*, strategy: str = "auto") -> torch.nn.Module:
    model = tiny_llama()
    apply_dota(model, progress=False, strategy=strategy)
    return model


def _train(model, tmp_path, **args):
    """Train with a stock Trainer on one repeated batch; return the logged losses."""
    ids = _batch()
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    targs = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=len(dataset),
        learning_rate=LR,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **args,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
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


def _check_only_cores_changed(before, model):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    cores = {k for k in before if ".cores." in k}
    assert len(cores) == 10 * 5  # 10 adapted layers x 5 cores
    assert changed == cores  # every core moved; residuals, init buffers, embeddings did not


def _check_merge_matches(model):
    model.eval()
    ids = _batch()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merge(model)
        merged = model(input_ids=ids).logits
    assert not any(isinstance(m, DoTALinear) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """Reference run without checkpointing: losses and the trained cores."""
    torch.set_num_threads(1)
    model = _dota_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _count_calls(model.model.layers[0].self_attn.q_proj)
    losses = _train(model, tmp_path_factory.mktemp("plain"))
    cores = {k: v.clone() for k, v in model.state_dict().items() if ".cores." in k}
    return model, before, losses, calls[0], cores


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
    calls = _count_calls(model.model.layers[0].self_attn.q_proj)
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
        assert hasattr(model, "_require_grads_hook")  # transformers installed it for us
        losses = _train(model, tmp_path)
    assert model.is_activation_checkpointing
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
    trained = model.state_dict()
    for k, v in plain_cores.items():
        torch.testing.assert_close(trained[k], v, rtol=1e-3, atol=1e-4)
    _check_merge_matches(model)


def test_reentrant_checkpointing_needs_input_grads():
    # Without the hook that transformers installs, reentrant checkpointing of a model whose
    # only trainable parameters are inside the checkpointed blocks computes a loss with no
    # graph at all: no core would ever receive a gradient.
    model = _dota_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    model.train()
    ids = _batch()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        loss = model(input_ids=ids, labels=ids).loss
    assert not loss.requires_grad
    model.enable_input_require_grads()  # the fix (what transformers does by default)
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
    # cores_to_matrix), as peft's LoRA computes B(A(x)) in bfloat16; merge() forms it in
    # float32, so the merge check below runs in float32, outside autocast.
    model = _dota_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype)
    )
    losses = _train(model, tmp_path, bf16=True)
    assert seen and set(seen) == {torch.bfloat16}  # autocast was on
    assert losses[-1] < losses[0] - 0.2, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= STEPS - 2, losses
    _check_only_cores_changed(before, model)
    assert {c.dtype for m in model.modules() if isinstance(m, DoTALinear) for c in m.cores} == {
        torch.float32
    }
    _check_merge_matches(model)
