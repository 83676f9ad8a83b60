"""Run by tests/test_sharded_base.py under torch.distributed.run (2 processes, gloo, CPU).

Shards tiny_llama with FSDP2 (``fully_shard``) first, then creates adapters on it: the
weights they read at creation (DoTA's decomposition, the fingerprints) are DTensor
shards, which must be gathered. Writes what each rank built to ``<out>/rank<k>.pt``.
"""

import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard

from tensornet.adapters import DoTAConfig, LoTRConfig, tiny_llama


def main() -> None:
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    record = {}
    for method, config in (("dota", DoTAConfig(rank=4, target_modules=["q_proj", "down_proj"])),
                           ("lotr", LoTRConfig(rank=4, seed=0))):
        model = tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        peft_model = get_peft_model(model, config)
        cfg = peft_model.peft_config["default"]
        tensors = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                   for k, v in peft_model.state_dict().items() if "dota_init" in k}
        record[method] = {"base_layers": cfg.base_layers, "base": cfg.base_fingerprint,
                          "init": tensors}
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
