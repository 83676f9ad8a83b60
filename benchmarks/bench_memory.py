"""Peak memory of one training step: DoTA, QDoTA, peft LoRA / QLoRA, full fine-tuning.

Each (model, method) runs in a fresh subprocess, so one method's freed memory cannot
hide another's. In the worker: build the model, apply the method, run one warm-up step
(AdamW creates its state lazily), then run the measured step while a thread samples the
process's resident set size (RSS) every 0.5 ms. Reported:

* ``step_peak``  peak RSS during the measured step minus the RSS after importing the
  libraries (before the model existed): weights, optimizer state, gradients and
  activations — everything the method holds at its peak.
* ``persistent`` RSS just before the measured step minus the same baseline.

CPU only (RSS); on a GPU the same comparison would use torch.cuda.max_memory_allocated.

    python benchmarks/bench_memory.py --models tiny smollm2 --json benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from _measure import PeakRSS, rss

METHODS = ("full", "lora", "dota", "qlora", "qdota")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _quantize_targets(model, torch, nn):
    """QLoRA's base: every target nn.Linear replaced by a bitsandbytes NF4 Linear4bit."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features,
                                  bias=module.bias is not None, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(module.weight.detach().float().cpu(),
                                         requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            q = q.to("cpu")
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, q)


def worker(model_name: str, method: str, batch: int, seq: int) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    base_rss = rss()
    from tensornet.adapters import apply_dota, load_pretrained, tiny_llama

    if model_name == "tiny":
        model = tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, vocab_size=512)
    else:
        model, _ = load_pretrained()
    model.train()
    vocab = model.config.vocab_size
    if method == "full":
        params = [p for p in model.parameters()]
    elif method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if method == "qlora":
            _quantize_targets(model, torch, nn)
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model = apply_dota(model, quantize="nf4" if method == "qdota" else None)
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()
    before = rss()
    sampler = PeakRSS()
    sampler.start()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    trainable = sum(p.numel() for p in params)
    return {"model": model_name, "method": method, "batch": batch, "seq": seq,
            "trainable_params": trainable,
            "persistent_mb": (before - base_rss) / 2**20,
            "step_peak_mb": (sampler.peak - base_rss) / 2**20,
            "step_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "METHOD", "BATCH", "SEQ"))
    args = ap.parse_args(argv)
    if args.worker:
        m, meth, b, s = args.worker
        print(json.dumps(worker(m, meth, int(b), int(s))))
        return 0
    import torch

    print(f"# bench_memory  {time.strftime('%Y-%m-%d %H:%M')}  python {platform.python_version()}"
          f"  torch {torch.__version__}  cpus {os.cpu_count()}")
    print(f"# command: python benchmarks/bench_memory.py {' '.join(argv or sys.argv[1:])}")
    shapes = {"tiny": (8, 128), "smollm2": (4, 128)}
    rows = []
    for model_name in args.models:
        b, s = shapes[model_name]
        for method in args.methods:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", model_name, method, str(b), str(s)],
                capture_output=True, text=True, check=False,
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{model_name:8s} {method:6s} trainable {r['trainable_params']:>11,}  "
                  f"persistent {r['persistent_mb']:8.1f} MB  step peak {r['step_peak_mb']:8.1f} MB"
                  f"  step {r['step_seconds']:.2f} s", flush=True)
    verdicts = []
    for model_name in args.models:
        peak = {r["method"]: r["step_peak_mb"] for r in rows if r["model"] == model_name}
        for ours, ref in (("dota", "lora"), ("qdota", "qlora")):
            if ours in peak and ref in peak:
                ratio = peak[ours] / peak[ref]
                ok = "PASS" if ratio <= 1.10 else "FAIL"
                verdicts.append({"model": model_name, "ours": ours, "ref": ref, "ratio": ratio,
                                 "verdict": ok})
                print(f"{model_name}: {ours} / {ref} step peak = {ratio:.3f}  (goal <= 1.10) {ok}")
        if "full" in peak and "dota" in peak:
            print(f"{model_name}: dota / full step peak = {peak['dota'] / peak['full']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "verdicts": verdicts}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
