"""TRL's ``SFTTrainer(peft_config=...)`` with tensornet's methods (issue 22, point 7).

``SFTTrainer`` calls peft's ``get_peft_model`` on the config it is given, so a
:class:`~tensornet.adapters.DoTAConfig` (or LoTR's, LoRTA's) works there once
``tensornet.adapters`` is imported. Checked here on a tiny LLaMA folder and a tiny local
dataset, a few steps on the CPU: only adapter parameters train, the final save and the
step checkpoint hold the adapter and no base weight, and ``PeftModel.from_pretrained`` on
a base freshly read from disk computes bit for bit what the trained model computes.

The user-facing version of this is ``docs/guide/trl-lm-eval.rst``.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import trl
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from tiny_tokenizer import save_tiny_model
from transformers import AutoModelForCausalLM

from tensornet.adapters import DoTAConfig, LoRTAConfig, LoTRConfig, tiny_llama
from tensornet.adapters.files import MANIFEST_KEY
from tensornet.finetune import arithmetic_splits

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
CONFIGS = {
    "dota": lambda: DoTAConfig(num_cores=3, rank=4, seed=0),
    "qdota": lambda: DoTAConfig(num_cores=3, rank=4, seed=0, quantize="nf4"),
    "lotr": lambda: LoTRConfig(rank=4, seed=0),
    "lorta": lambda: LoRTAConfig(rank=4, seed=0),
}
IDS = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA and its tokenizer, saved as a local model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def dataset():
    """Eight prompt/completion pairs (TRL's prompt-completion format: loss on completions)."""
    rows = [
        {"prompt": f"Question: {e.prompt}\nAnswer:", "completion": f" {e.response}"}
        for e in arithmetic_splits(8, 0, 0, seed=0).train
    ]
    return datasets.Dataset.from_list(rows)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _sft_trainer(base_dir, dataset, out, config, *, steps=STEPS):
    args = trl.SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=128,
        save_strategy="steps",
        save_steps=STEPS,
        logging_steps=1,
        # TRL defaults bf16=True; float32 keeps the test independent of the CPU's bf16
        # support (the saved cores are float32 master weights either way)
        bf16=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    return trl.SFTTrainer(model=str(base_dir), args=args, train_dataset=dataset,
                          peft_config=config)


def _assert_adapter_only(folder, prefix: str, base_names: set[str]) -> None:
    """The folder holds an adapter (config + weights) and no copy of the base model."""
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}, files
    assert not any(name.startswith("model-0") for name in files), files  # sharded base
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors.pop(MANIFEST_KEY)  # tensornet's manifest of the adapter's tensors
    assert tensors and all(prefix in key for key in tensors), sorted(tensors)[:5]
    assert not set(tensors) & base_names
    # no base-sized tensor either: the largest saved tensor is far smaller than the embedding
    embedding = tiny_llama().model.embed_tokens.weight.numel()
    assert max(t.numel() for t in tensors.values()) < embedding
    peft_type = json.loads((folder / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == prefix.rstrip("_").upper()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_sft_trainer_trains_saves_and_reloads_bit_exactly(method, base_dir, dataset, tmp_path):
    config = CONFIGS[method]()
    trainer = _sft_trainer(base_dir, dataset, tmp_path / "run", config)
    model = trainer.model
    assert isinstance(model, PeftModel)
    assert model.peft_config["default"].peft_type == config.peft_type
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(config.prefix in n for n in trainable), sorted(trainable)[:5]

    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable  # the adapter trained, the base did not

    final = tmp_path / "final"
    trainer.save_model(str(final))
    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS}"
    base_names = {n for n, _ in tiny_llama().named_parameters()}
    for folder in (final, checkpoint):
        _assert_adapter_only(folder, config.prefix, base_names)

    trained = _logits(model)
    for folder in (final, checkpoint):
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        again = PeftModel.from_pretrained(base, folder)
        assert torch.equal(_logits(again), trained), folder.name
    # the adapter config names the base folder SFTTrainer loaded, so one call reloads both
    assert torch.equal(_logits(AutoPeftModelForCausalLM.from_pretrained(final)), trained)
    # and the adapter matters: the base alone computes something else
    assert not torch.equal(_logits(AutoModelForCausalLM.from_pretrained(base_dir)), trained)


def test_sft_trainer_resumes_from_a_checkpoint_bit_exactly(base_dir, dataset, tmp_path):
    # a checkpoint is the adapter plus the Trainer's state: resuming from the step-3
    # checkpoint of a 6-step run ends where the uninterrupted run ends
    whole = _sft_trainer(base_dir, dataset, tmp_path, CONFIGS["dota"](), steps=2 * STEPS)
    whole.train()
    expected = {n: p.detach().clone() for n, p in whole.model.named_parameters()
                if p.requires_grad}
    resumed = _sft_trainer(base_dir, dataset, tmp_path, CONFIGS["dota"](), steps=2 * STEPS)
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{STEPS}"))
    got = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
