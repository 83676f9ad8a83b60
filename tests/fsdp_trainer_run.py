"""Run by tests/test_main_job.py under torchrun: DoTA trained by ``transformers.Trainer``
with its ``fsdp`` option (FSDP1, ``use_orig_params``) on CPU/gloo, or in one process.

Usage: python fsdp_trainer_run.py OUT [--fsdp]; writes OUT/adapter (``trainer.save_model``)
and OUT/losses-<rank>.json.
"""

import json
import os
import sys

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from tensornet.adapters import DoTAConfig, tiny_llama


def main(out: str, fsdp: bool) -> None:
    torch.set_num_threads(1)
    model = get_peft_model(tiny_llama(), DoTAConfig(rank=4, num_cores=3, strategy="dense"))
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {}
    if fsdp:
        extra = {"fsdp": True, "ddp_backend": "gloo",
                 "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                 "use_orig_params": True, "reshard_after_forward": True}}
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), max_steps=3,
        per_device_train_batch_size=4 // world, learning_rate=1e-2, optim="sgd",
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, seed=0, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(os.path.join(out, "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(out, f"losses-{rank}.json"), "w") as fh:
        json.dump(losses, fh)


if __name__ == "__main__":
    main(sys.argv[1], "--fsdp" in sys.argv[2:])
