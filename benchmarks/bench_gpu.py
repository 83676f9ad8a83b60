"""CUDA benchmark: DoTA, QDoTA, peft LoRA / QLoRA and full fine-tuning side by side.

Every method is built in one process and measured round-robin (one call of each method
per round, best of the rounds: :func:`_measure.best_round_robin`), so the compared numbers
share the machine's conditions. Workloads, with random weights (the GPU machine has no
model files):

* ``layer``: ``--layers`` (2) LLaMA-2-7B-shaped decoder layers (transformers'
  ``LlamaModel``: hidden 4096, MLP 11008, 32 heads, SDPA attention) fed ``inputs_embeds``
  of batch 4 x 512, loss ``sum(y * g)`` for a fixed random ``g``;
* ``smollm2``: ``LlamaForCausalLM`` with SmolLM2-135M's shapes (hidden 576, MLP 1536, 30
  layers, 9 heads, 3 key/value heads, vocabulary 49152), batch 8 x 128, causal-LM loss;
* ``inference``: greedy generation tokens/s on the smollm2 model (16-token random prompt,
  32 new tokens, batch 1 and 8) for the base, DoTA unmerged and DoTA merged
  (``merge_and_unload()`` of a copy).

Methods: ``full`` (every weight trains, in the model's dtype), peft ``lora`` (r = 32),
``dota`` (N = 5, R = 16, float32 cores, the planner's strategy), ``qdota``
(``quantize="nf4"``, the residual computing in the model's dtype) and peft ``qlora``
(r = 32 on bitsandbytes NF4 bases); targets q, k, v, up, down (``LLAMA_TARGETS``), AdamW.
Frozen weights are bfloat16 on CUDA and float32 on the CPU (``--dtype``); the adapters'
trainable weights are float32 (peft's ``autocast_adapter_dtype``). Without bitsandbytes,
QDoTA and QLoRA are skipped.

Memory: a method's peak is what it holds after its warm-up step (weights, optimizer
state; the allocated bytes before and after building it) plus the most its step
allocates above that (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``). The methods live in one process, so the process-wide peak
would mix them; this sum is each method's own. On the CPU the same sum comes from the
resident set size, which freed memory from the other methods blurs: indicative only.

Goals on CUDA (issue): DoTA step <= 1.0x full fine-tuning and <= 1.5x LoRA; QDoTA peak
memory <= 1.1x QLoRA; merged generation at the base's speed, checked as merged / base
tokens/s >= 0.95 because timing noise makes exactly 1.0 unverifiable. ``--device cpu
--quick`` (tiny shapes, one round) is the smoke test that ``make test`` runs; its verdicts
are printed but mean nothing. The script exits 0 whatever the verdicts.

    cd benchmarks && python bench_gpu.py --json results/gpu.json | tee results/gpu.txt
    python benchmarks/bench_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from _environment import environment, print_environment, write_json
from _measure import PeakRSS, best_round_robin, rss
from bench_speed import prepare

METHODS = ("full", "lora", "dota", "qdota", "qlora")
QUANTIZED = ("qdota", "qlora")
#: (workload-level goals) ours, reference, measured quantity, comparison, limit
GOALS = (("dota", "full", "step_s", "<=", 1.0), ("dota", "lora", "step_s", "<=", 1.5),
         ("qdota", "qlora", "peak_mb", "<=", 1.1))
GOAL_MERGED = 0.95  # merged / base tokens/s, at least (1.0 within timing noise)
CPU_NOTE = "  (cpu smoke run: goals are for CUDA)"


# ----------------------------------------------------------------------------- models


def llama_config(workload: str, quick: bool, layers: int) -> Any:
    """The workload's ``LlamaConfig``: LLaMA-2-7B's layer, SmolLM2-135M, or tiny ones."""
    from transformers import LlamaConfig

    if workload == "layer":
        sizes = (dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=1) if quick else
                 dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, num_hidden_layers=layers))
        # inputs_embeds only: a token-sized embedding table would be dead weight
        sizes.update(vocab_size=32, max_position_embeddings=4096)
    else:
        sizes = (dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=128) if quick else
                 dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152))
        sizes.update(max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    # a config built by hand has no attention implementation, and eager attention without
    # a mask would not be causal; SDPA with no mask is (and is what a loaded model uses)
    return LlamaConfig(**sizes, rms_norm_eps=1e-5, attn_implementation="sdpa")


def batch_shape(workload: str, quick: bool) -> tuple[int, int]:
    """Sequences and tokens per sequence of a training step."""
    return (2, 16) if quick else {"layer": (4, 512), "smollm2": (8, 128)}[workload]


def build_model(workload: str, args: argparse.Namespace) -> Any:
    """A random model of the workload on ``args.device`` in ``args.dtype`` (seed 0)."""
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(0)  # every method starts from the same weights
    cls = LlamaModel if workload == "layer" else LlamaForCausalLM
    with torch.device(args.device):
        model = cls(llama_config(workload, args.quick, args.layers))
    return model.to(args.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling configs and the header use."""
    return str(dtype).removeprefix("torch.")


def apply_method(model: Any, method: str, workload: str, dtype: torch.dtype) -> Any:
    """``bench_speed.prepare``, except QDoTA's residual computes in the model's dtype.

    ``prepare`` creates QDoTA's cores in float32, which makes its NF4 residual dequantize
    to float32 while QLoRA's dequantizes to the model's dtype (bfloat16 on CUDA); here
    both compute in the model's dtype and peft upcasts the trainable cores to float32.
    """
    from tensornet.adapters import LLAMA_TARGETS, apply_dota

    if method == "qdota":
        return apply_dota(model, target_modules=list(LLAMA_TARGETS), quantize="nf4",
                          dtype=dtype_name(dtype))
    return prepare(model, method, LLAMA_TARGETS, causal_lm=workload == "smollm2")


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall time covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    """Bytes held now: the CUDA allocator's live tensors, or the CPU's resident set."""
    sync(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss()


def peak_above(device: torch.device, fn: Callable[[], Any]) -> int:
    """The most ``fn`` allocates above what is held when it starts, in bytes."""
    start = allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    sampler = PeakRSS()
    sampler.start()
    fn()
    sampler.done.set()
    sampler.join()
    return max(sampler.peak - start, 0)


def make_step(workload: str, method: str, args: argparse.Namespace) -> tuple[Any, Any, int]:
    """Build one (workload, method): its model, training step (synchronized) and trainables."""
    dev = args.device
    model = apply_method(build_model(workload, args), method, workload, args.dtype)
    model.train()
    gen = torch.Generator(device=dev).manual_seed(1)
    batch, seq = batch_shape(workload, args.quick)
    if workload == "layer":
        hidden = model.config.hidden_size
        x = torch.randn(batch, seq, hidden, generator=gen, device=dev, dtype=args.dtype)
        g = torch.randn(batch, seq, hidden, generator=gen, device=dev)

        def loss() -> torch.Tensor:
            return (model(inputs_embeds=x, use_cache=False).last_hidden_state.float() * g).sum()
    else:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen, device=dev)

        def loss() -> torch.Tensor:
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)

    return model, step, sum(p.numel() for p in params)


def training(workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every method of ``workload`` built in turn, then timed round-robin; the table rows."""
    rows: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], None]] = {}
    models = []
    for method in METHODS:
        if method in QUANTIZED and not args.have_bnb:
            rows[method] = {"method": method, "skipped": "bitsandbytes not installed"}
            continue
        before = allocated(args.device)
        try:
            model, step, trainable = make_step(workload, method, args)
            step()  # warm-up: AdamW's state, peft's and the planner's lazy setup
        except Exception as exc:  # noqa: BLE001 - a scarce GPU run reports and goes on
            rows[method] = {"method": method,
                            "skipped": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
            continue
        models.append(model)
        steps[method] = step
        rows[method] = {"method": method, "trainable_params": trainable,
                        "held_mb": (allocated(args.device) - before) / 2**20}
    best, rounds = best_round_robin(steps, args.seconds, args.steps)
    for method, step in steps.items():
        row = rows[method]
        row["step_s"] = best[method]
        row["peak_mb"] = row["held_mb"] + peak_above(args.device, step) / 2**20
    full = rows["full"].get("step_s", math.nan)
    memory = "" if args.device.type == "cuda" else " (RSS, shared process: indicative)"
    cfg = llama_config(workload, args.quick, args.layers)
    batch, seq = batch_shape(workload, args.quick)
    print(f"\n## {workload}: {cfg.num_hidden_layers} decoder layer(s), hidden {cfg.hidden_size}, "
          f"MLP {cfg.intermediate_size}, batch {batch} x {seq}\n  best of {rounds} round(s) "
          f"after a warm-up; x full = step / full fine-tuning's; MB{memory}")
    print(f"  {'method':8s} {'trainable':>13} {'step s':>9} {'x full':>7} {'held MB':>9} "
          f"{'peak MB':>9}")
    for method, r in rows.items():
        if "skipped" in r:
            print(f"  {method:8s} skipped: {r['skipped']}")
            continue
        print(f"  {method:8s} {r['trainable_params']:>13,} {r['step_s']:9.4f} "
              f"{r['step_s'] / full:7.2f} {r['held_mb']:9.1f} {r['peak_mb']:9.1f}")
    del models, steps
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"workload": workload, "layers": cfg.num_hidden_layers, "batch": batch, "seq": seq,
            "rounds": rounds, "rows": list(rows.values())}


def inference(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Greedy tokens/s on the smollm2 model: base, DoTA unmerged, DoTA merged."""
    from tensornet.adapters import apply_dota

    base = build_model("smollm2", args).eval().requires_grad_(False)
    unmerged = apply_dota(copy.deepcopy(base), dtype="float32").eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    models = {"base": base, "unmerged": unmerged, "merged": merged}
    new = 4 if args.quick else 32
    gen = torch.Generator(device=args.device).manual_seed(2)
    out = []
    print(f"\n## inference: greedy generation, 16-token prompt + {new} new tokens, best of "
          f"round-robin (tokens/s)")
    for batch in (1, 8):
        ids = torch.randint(0, base.config.vocab_size, (batch, 16), generator=gen,
                            device=args.device)

        def generate(m: Any, ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                m.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
            sync(args.device)

        t, rounds = best_round_robin({k: (lambda m=m: generate(m)) for k, m in models.items()},
                                     args.seconds, args.steps)
        rec = {"batch": batch, "new_tokens": new, "rounds": rounds,
               **{f"{k}_tokens_per_s": batch * new / v for k, v in t.items()}}
        out.append(rec)
        print(f"  batch {batch}  base {rec['base_tokens_per_s']:9.1f}  unmerged "
              f"{rec['unmerged_tokens_per_s']:9.1f}  merged {rec['merged_tokens_per_s']:9.1f}"
              f"  ({rounds} round(s))")
    return out


# ----------------------------------------------------------------------------- goals


def verdict(name: str, value: float | None, op: str, limit: float, cpu: bool,
            why: str = "") -> dict[str, Any]:
    """Print and return one goal line; None (a method skipped) is SKIPPED."""
    if value is None or not math.isfinite(value):
        mark, shown = "SKIPPED" + (f" ({why})" if why else ""), "   n/a"
    else:
        ok = value <= limit if op == "<=" else value >= limit
        mark, shown = ("PASS" if ok else "FAIL"), f"{value:6.3f}"
    print(f"  {name:34s} {shown}  (goal {op} {limit:.2f}) {mark}{CPU_NOTE if cpu else ''}")
    return {"name": name, "value": value, "op": op, "goal": limit, "verdict": mark.split()[0]}


def goals(result: dict[str, Any], cpu: bool) -> list[dict[str, Any]]:
    """The issue's goals for every measured workload and batch size."""
    print("\n## goals")
    out = []
    for group in result["training"]:
        rows = {r["method"]: r for r in group["rows"]}
        for ours, ref, key, op, limit in GOALS:
            a, b = rows[ours], rows[ref]
            value = a[key] / b[key] if key in a and key in b else None
            why = a.get("skipped") or b.get("skipped") or ""
            label = "step" if key == "step_s" else "peak memory"
            out.append(verdict(f"{group['workload']}: {ours} / {ref} {label}", value, op, limit,
                               cpu, why))
    for rec in result.get("inference", []):
        out.append(verdict(f"merged / base tokens/s, batch {rec['batch']}",
                           rec["merged_tokens_per_s"] / rec["base_tokens_per_s"], ">=",
                           GOAL_MERGED, cpu))
    return out


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="dtype of the frozen weights (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--workloads", nargs="+", default=["layer", "smollm2", "inference"],
                   choices=["layer", "smollm2", "inference"])
    p.add_argument("--layers", type=int, default=2,
                   help="LLaMA-2-7B-shaped decoder layers of the layer workload (default 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="rounds at least (default 5; --quick: 1)")
    p.add_argument("--seconds", type=float, default=None,
                   help="aim for this much work per method, in rounds (default 2; --quick: 0)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny shapes, one round (the numbers mean nothing)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu.py: --device cuda needs a CUDA GPU, and torch {torch.__version__} "
              f"sees none (torch.cuda.is_available() is False); use --device cpu --quick for "
              f"the smoke run", file=sys.stderr)
        return 2
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda"
                                               else "float32"))
    args.steps = args.steps or (1 if args.quick else 5)
    args.seconds = (0.0 if args.quick else 2.0) if args.seconds is None else args.seconds
    try:
        import bitsandbytes  # noqa: F401
        args.have_bnb = True
    except (ImportError, OSError, RuntimeError):  # missing, or a broken CUDA setup
        args.have_bnb = False
    cpu = args.device.type == "cpu"

    versions = {}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    env = environment([sys.argv[0], *argv], versions)
    env["gpu"] = None if cpu else (
        f"{torch.cuda.get_device_name(args.device)} "
        f"({torch.cuda.get_device_properties(args.device).total_memory / 2**30:.0f} GiB), "
        f"CUDA {torch.version.cuda}")
    print(f"# DoTA, QDoTA, peft LoRA / QLoRA and full fine-tuning side by side on "
          f"{args.device.type} (base weights {dtype_name(args.dtype)}, adapters float32)")
    print_environment(env, versions)
    print(f"# device            {env['gpu'] or 'cpu'}")
    if args.quick:
        print("# QUICK smoke run: tiny shapes, one round; the numbers mean nothing")
    if not args.have_bnb:
        print("# qdota, qlora: skipped: bitsandbytes not installed")

    result: dict[str, Any] = {
        "benchmark": "bench_gpu", "environment": env,
        "settings": {**{k: (str(v) if isinstance(v, (Path, torch.device)) else v)
                        for k, v in vars(args).items()}, "dtype": dtype_name(args.dtype)},
        "training": [training(w, args) for w in ("layer", "smollm2") if w in args.workloads],
    }
    if "inference" in args.workloads:
        result["inference"] = inference(args)
    result["goals"] = goals(result, cpu)
    checked = [g for g in result["goals"] if g["verdict"] != "SKIPPED"]
    result["pass"] = all(g["verdict"] == "PASS" for g in checked) if checked else None
    print(f"\n# load avg at end {[round(v, 2) for v in os.getloadavg()]}")
    overall = {True: "PASS", False: "FAIL", None: "none checked"}[result["pass"]]
    print(f"# goals: {overall}{CPU_NOTE if cpu else ''}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
