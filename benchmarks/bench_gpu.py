"""CUDA acceptance run: DoTA, QDoTA, peft LoRA / QLoRA and full fine-tuning side by side.

Every method of a workload is built in one process and measured round-robin (one call of
each method per round, best of the rounds: :func:`_measure.best_round_robin`), so the
compared numbers share the machine's conditions. Workloads, with random weights (the GPU
machine has no model files), in the order they run:

* ``layer``: ``--layers`` (2) LLaMA-2-7B-shaped decoder layers (``LlamaModel``: hidden 4096,
  MLP 11008, 32 heads, SDPA attention) fed ``inputs_embeds`` of batch 4 x 512, loss
  ``sum(y * g)`` for a fixed random ``g``;
* ``smollm2``: ``LlamaForCausalLM`` with SmolLM2-135M's shapes (hidden 576, MLP 1536, 30
  layers, 9 heads, 3 key/value heads, vocabulary 49152), batch 8 x 128, causal-LM loss;
* ``inference``: greedy generation tokens/s on the smollm2 model (16-token prompt, 32 new
  tokens, batch 1 and 8): the base, DoTA unmerged and DoTA merged (a copy);
* ``llama7b``: a whole LLaMA-2-7B-shaped ``LlamaForCausalLM`` (``--layers7b`` (32) layers,
  vocabulary 32000) built directly in the model's dtype on the device, batch 2 x 1024,
  causal-LM loss, without full fine-tuning (its gradients and AdamW state do not fit every
  GPU); then the prefill of one 128-token sequence without grad: tokens/s of the base and
  each method unmerged, then of the base and DoTA merged in place.

Methods: ``full`` (every weight trains, in the model's dtype), peft ``lora`` (r = 32),
``dota`` (N = 5, R = 16, float32 cores, the planner's strategy), ``qdota``
(``quantize="nf4"``, the residual computing in the model's dtype) and peft ``qlora``
(r = 32 on bitsandbytes NF4 bases); targets q, k, v, up, down, AdamW. Frozen weights are
bfloat16 on CUDA, float32 on the CPU (``--dtype``); trainable adapter weights float32
(peft's ``autocast_adapter_dtype``). Creation time: turning the base model into the one to
train (``get_peft_model`` or ``apply_dota``, NF4 quantization included).

Memory: a method's peak is what it holds after its warm-up step (the allocated bytes
before and after building it) plus the most its step allocates above that
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``): the process-wide
peak would mix the methods that share the process. On the CPU the same sum comes from the
resident set size, which the other methods' freed memory blurs: indicative only.

Goals on CUDA (``_gpu_goals``): on ``layer`` and ``smollm2``, DoTA step <= 1.0x full
fine-tuning and <= 1.5x LoRA, QDoTA peak <= 1.1x QLoRA; on ``llama7b``, DoTA step <= 1.5x
LoRA, QDoTA step <= 1.5x QLoRA and peak <= 1.1x, DoTA creation <= 5 s, unmerged prefill
(DoTA, QDoTA) >= 0.5x the base, merged DoTA >= 0.95x; generation (batch 1 and 8) unmerged
>= 0.7x the base, merged >= 0.95x (1.0 within timing noise).

The results are written to ``--json`` after every part and measurement, so a crash keeps what
came before. A method or part that raises is recorded (type, message, last traceback
lines) in its place and in ``failures``, and the run goes on; the exit status is then 1,
else 0 whatever the verdicts. Only without bitsandbytes installed are QDoTA and QLoRA
skipped. ``--device cpu --quick`` (tiny shapes, one round) is the smoke test that ``make
test`` runs; its verdicts mean nothing. A GPU machine without internet: benchmarks/README.md.

    python benchmarks/bench_gpu.py --json benchmarks/results/gpu.json \\
        | tee benchmarks/results/gpu.txt
    python benchmarks/bench_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from _environment import environment, print_environment
from _gpu_goals import CPU_NOTE, goals
from _measure import PeakRSS, rss
from _record import Record
from bench_speed import prepare

METHODS = ("full", "lora", "dota", "qdota", "qlora")
QUANTIZED = ("qdota", "qlora")
#: the methods of each training workload; the first is the reference of the "x" column
WORKLOAD_METHODS = {"layer": METHODS, "smollm2": METHODS, "llama7b": METHODS[1:]}
WORKLOADS = ("layer", "smollm2", "inference", "llama7b")  # in the order they run


# ----------------------------------------------------------------------------- models


def llama_config(workload: str, args: argparse.Namespace) -> Any:
    """The workload's ``LlamaConfig``: LLaMA-2-7B's, SmolLM2-135M's, or tiny ones."""
    from transformers import LlamaConfig

    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=4, num_hidden_layers=2, vocab_size=128)
    llama2 = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096)
    if workload == "layer":
        sizes = {**tiny, "num_hidden_layers": 1} if args.quick else {
            **llama2, "num_hidden_layers": args.layers}
        # inputs_embeds only: a token-sized embedding table would be dead weight
        sizes.update(vocab_size=32)
    elif workload == "llama7b":
        sizes = tiny if args.quick else {**llama2, "num_hidden_layers": args.layers7b,
                                         "vocab_size": 32000}
    else:
        sizes = {**tiny, "num_key_value_heads": 2} if args.quick else dict(
            hidden_size=576, intermediate_size=1536, num_attention_heads=9,
            num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152)
        sizes.update(max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True)
    # a config built by hand has no attention implementation, and eager attention without
    # a mask would not be causal; SDPA with no mask is (and is what a loaded model uses)
    return LlamaConfig(**sizes, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       attn_implementation="sdpa")


def batch_shape(workload: str, quick: bool) -> tuple[int, int]:
    """Sequences and tokens per sequence of a training step."""
    return (2, 16) if quick else {"layer": (4, 512), "smollm2": (8, 128),
                                  "llama7b": (2, 1024)}[workload]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside are ``dtype`` (a 7B model never exists in float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(workload: str, args: argparse.Namespace) -> Any:
    """A random model of the workload on ``args.device`` in ``args.dtype`` (seed 0)."""
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(0)  # every method starts from the same weights
    cls = LlamaModel if workload == "layer" else LlamaForCausalLM
    with torch.device(args.device), default_dtype(args.dtype):
        return cls(llama_config(workload, args))


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
    return prepare(model, method, LLAMA_TARGETS, causal_lm=workload != "layer")


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
    try:
        fn()
    finally:
        sampler.done.set()
        sampler.join()
    return max(sampler.peak - start, 0)


def make_step(workload: str, method: str, args: argparse.Namespace) -> tuple[Any, Any, int, float]:
    """Build one (workload, method): model, training step (synchronized), trainables, seconds
    taken to create the method on the base model."""
    dev = args.device
    base = build_model(workload, args)
    sync(dev)
    t0 = time.perf_counter()
    model = apply_method(base, method, workload, args.dtype)
    sync(dev)
    create_s = time.perf_counter() - t0
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

    return model, step, sum(p.numel() for p in params), create_s


def _num(value: float | None, spec: str) -> str:
    """``value`` formatted, or ``-`` where it was not measured."""
    return "-" if value is None else format(value, spec)


def training(workload: str, args: argparse.Namespace, run: Record,
             group: dict[str, Any]) -> None:
    """Every method of ``workload`` built in turn, then timed round-robin, into ``group``."""
    cfg = llama_config(workload, args)
    batch, seq = batch_shape(workload, args.quick)
    group.update(layers=cfg.num_hidden_layers, batch=batch, seq=seq)
    rows = {m: {"method": m} for m in WORKLOAD_METHODS[workload]}
    group["rows"] = list(rows.values())  # the same dicts: filled in as they are measured
    models: dict[str, Any] = {}
    steps: dict[str, Callable[[], None]] = {}
    for method, row in rows.items():
        if method in QUANTIZED and not args.have_bnb:
            row["skipped"] = "bitsandbytes not installed"
            continue
        before = allocated(args.device)
        built = run.attempt(f"{workload}/{method}", row, make_step, workload, method, args)
        if built is not None:
            model, step, row["trainable_params"], row["create_s"] = built
            run.attempt(f"{workload}/{method}", row, step)  # warm-up: AdamW's state, lazy setup
            if "error" not in row:
                models[method], steps[method] = model, step
                row["held_mb"] = (allocated(args.device) - before) / 2**20
            del model, step, built
        run.save()
    best, group["rounds"] = run.round_robin(workload, steps, rows, args.seconds, args.steps)
    for method, t in best.items():
        rows[method]["step_s"] = t
        peak = run.attempt(f"{workload}/{method}", rows[method], peak_above, args.device,
                           steps[method])
        if peak is not None:
            rows[method]["peak_mb"] = rows[method]["held_mb"] + peak / 2**20
        run.save()
    for method in [m for m in models if "error" in rows[m]]:  # free what failed
        del models[method], steps[method]
    ref = WORKLOAD_METHODS[workload][0]
    memory = "" if args.device.type == "cuda" else " (RSS, shared process: indicative)"
    print(f"\n## {workload}: {cfg.num_hidden_layers} decoder layer(s), hidden {cfg.hidden_size}, "
          f"MLP {cfg.intermediate_size}, vocabulary {cfg.vocab_size}, batch {batch} x {seq}\n"
          f"  best of {group['rounds']} round(s) after a warm-up; x {ref} = step / {ref}'s; "
          f"create s = building the method on the base; MB{memory}")
    print(f"  {'method':8s} {'trainable':>13} {'create s':>9} {'step s':>9} {'x ' + ref:>7} "
          f"{'held MB':>9} {'peak MB':>9}")
    for method, r in rows.items():
        if "skipped" in r or "error" in r:
            what = (f"skipped: {r['skipped']}" if "skipped" in r
                    else f"FAILED: {r['error'].splitlines()[0]}")
            print(f"  {method:8s} {what[:150]}")
            continue
        x = r["step_s"] / rows[ref]["step_s"] if "step_s" in rows[ref] else None
        print(f"  {method:8s} {r['trainable_params']:>13,} {r['create_s']:9.3f} "
              f"{r['step_s']:9.4f} {_num(x, '7.2f'):>7} {r['held_mb']:9.1f} "
              f"{_num(r.get('peak_mb'), '9.1f'):>9}")
    if workload == "llama7b":
        steps.clear()  # their closures hold the models, which prefill frees as it goes
        prefill(workload, args, run, group, models)


def prefill(workload: str, args: argparse.Namespace, run: Record, group: dict[str, Any],
            models: dict[str, Any]) -> None:
    """Prefill tokens/s of one sequence without grad: the base and each method unmerged,
    round-robin; then DoTA merged in place against the base. Empties ``models``."""
    tokens = 16 if args.quick else 128
    rec: dict[str, Any] = {"tokens": tokens}
    group["prefill"] = rec
    rows = {r["method"]: r for r in group["rows"]}
    base = run.attempt(f"{workload}/prefill base", rec, build_model, workload, args)
    if base is None:
        return
    gen = torch.Generator(device=args.device).manual_seed(3)
    ids = torch.randint(0, base.config.vocab_size, (1, tokens), generator=gen, device=args.device)

    def forward(m: Any) -> None:
        with torch.no_grad():
            m(input_ids=ids)
        sync(args.device)

    def measure(kind: str, contenders: dict[str, Any]) -> None:
        records = {"base": rec, **{k: rows[k] for k in contenders}}
        t, rounds = run.round_robin(f"{workload}/prefill {kind}", {
            k: partial(forward, m) for k, m in {"base": base, **contenders}.items()},
            records, args.seconds, args.steps)
        speeds = {k: tokens / v for k, v in t.items()}
        rec[kind] = {"rounds": rounds, **speeds}
        run.save()
        base_speed = speeds.pop("base", None)
        shown = "  ".join(f"{k} {v:.1f} ({_num(base_speed and v / base_speed, '.2f')}x)"
                          for k, v in speeds.items())
        print(f"  prefill 1 x {tokens} tokens, {kind}, tokens/s (x base), best of {rounds} "
              f"round(s): base {_num(base_speed, '.1f')}  {shown}")

    for model in models.values():
        model.eval()
    measure("unmerged", dict(models))
    dota = models.pop("dota", None)
    models.clear()  # free the others before the merged round
    if dota is not None:
        merged = run.attempt(f"{workload}/dota merge", rows["dota"],
                             lambda: dota.merge_and_unload().eval())
        del dota
        if merged is not None:
            measure("merged", {"dota": merged})


def inference(args: argparse.Namespace, run: Record, part: dict[str, Any]) -> None:
    """Greedy tokens/s on the smollm2 model: base, DoTA unmerged, DoTA merged."""
    from tensornet.adapters import apply_dota

    base = build_model("smollm2", args).eval().requires_grad_(False)
    unmerged = apply_dota(copy.deepcopy(base), dtype="float32").eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    models = {"base": base, "unmerged": unmerged, "merged": merged}
    new = 4 if args.quick else 32
    gen = torch.Generator(device=args.device).manual_seed(2)
    part["batches"] = []
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

        t, rounds = run.round_robin(f"inference batch {batch}",
                                    {k: partial(generate, m) for k, m in models.items()},
                                    dict.fromkeys(models, part), args.seconds, args.steps)
        if "error" in part:
            return
        rec = {"batch": batch, "new_tokens": new, "rounds": rounds,
               **{f"{k}_tokens_per_s": batch * new / v for k, v in t.items()}}
        part["batches"].append(rec)
        run.save()
        print(f"  batch {batch}  base {rec['base_tokens_per_s']:9.1f}  unmerged "
              f"{rec['unmerged_tokens_per_s']:9.1f}  merged {rec['merged_tokens_per_s']:9.1f}"
              f"  ({rounds} round(s))")


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="dtype of the frozen weights (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--layers", type=int, default=2,
                   help="LLaMA-2-7B-shaped decoder layers of the layer workload (default 2)")
    p.add_argument("--layers7b", type=int, default=32,
                   help="decoder layers of the llama7b workload (default 32, LLaMA-2-7B's)")
    p.add_argument("--steps", type=int, default=None,
                   help="rounds at least (default 5; --quick: 1)")
    p.add_argument("--seconds", type=float, default=None,
                   help="aim for this much work per method, in rounds (default 2; --quick: 0)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny shapes, one round (the numbers mean nothing)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def cleanup(device: torch.device) -> None:
    """Return what a finished (or failed) part held to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
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
    # skipped only when not installed: an installed one that fails to import is a failure
    args.have_bnb = importlib.util.find_spec("bitsandbytes") is not None
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

    run = Record(args.json, {
        "benchmark": "bench_gpu", "environment": env,
        "settings": {**{k: (str(v) if isinstance(v, (Path, torch.device)) else v)
                        for k, v in vars(args).items()}, "dtype": dtype_name(args.dtype)},
        "training": [],
    })
    result = run.result
    run.save()  # the environment, even if the first part kills the process
    for workload in (w for w in WORKLOADS if w in args.workloads):
        if workload == "inference":
            part = result["inference"] = {}
            run.attempt("inference", part, inference, args, run, part)
        else:
            part = {"workload": workload}
            result["training"].append(part)
            run.attempt(workload, part, training, workload, args, run, part)
        cleanup(args.device)
        run.save()
    result["goals"] = run.attempt("goals", result, goals, result, cpu) or []
    checked = [g for g in result["goals"] if g["verdict"] in ("PASS", "FAIL")]
    result["pass"] = all(g["verdict"] == "PASS" for g in checked) if checked else None
    print(f"\n# load avg at end {[round(v, 2) for v in os.getloadavg()]}")
    overall = {True: "PASS", False: "FAIL", None: "none checked"}[result["pass"]]
    print(f"# goals: {overall}{CPU_NOTE if cpu else ''}")
    for failure in run.failures:
        print(f"# FAILED {failure}")
    run.save(announce=True)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
