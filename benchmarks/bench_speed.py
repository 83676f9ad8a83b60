"""Adapter speed: training-step time and memory against the frozen-base floor, and inference.

Training steps (forward + loss, backward, optimizer) for every method on two workloads:

* ``stack``: LLaMA-2-7B-shaped linear layers ``q_proj`` 4096x4096, ``up_proj`` 4096->11008
  and ``down_proj`` 11008->4096 applied in sequence to ``tokens`` rows (default 256 and
  2048), loss ``sum(y * g)`` for a fixed random ``g``;
* ``smollm2``: the offline SmolLM2-135M-Instruct, batch 8 x 128 tokens, causal-LM loss,
  targets q, k, v, up, down.

Methods: ``floor`` (the frozen base, no adapter: forward and backward to the inputs only),
``full`` (every weight trains), peft ``lora`` (r=32), ``dota`` (N=5, R=16, the planner's
strategy) and, on the stack, ``dota-dense`` / ``dota-contract`` (the strategy pinned, to
show where each wins), ``dota-random``; the quantized trio ``floor-nf4`` (the same base in
bitsandbytes NF4, frozen), ``qdota`` and peft ``qlora``. Everything computes in float32
(QDoTA's cores too), so the floors are comparable.

Each (workload, method) runs in a fresh subprocess: build, one warm-up step (AdamW creates
its state lazily), then ``--steps`` timed steps (medians reported) while a thread samples
the resident set size (peak memory = peak RSS minus the RSS after importing the libraries).
The floor, full fine-tuning and DoTA run first and again at the end; ratios use the mean
of both readings, and the floor's two readings show the machine's drift.

Inference (``--inference``): forward rows per second through the stack and through a
SmolLM2-sized stack (4 blocks of q 576x576, up 576->1536, down 1536->576) at generation
batch sizes (1, 4, 16 rows), and greedy-generation tokens per second on SmolLM2 (batch 1
and 8), for the base, a DoTA model unmerged (cores moved off their initial values, as
after training; the layer's cached no-grad path or the planner's strategy) and the same
model merged (``merge_and_unload()``); measured round-robin in one process. Goal (issue
14): unmerged >= 0.8x the base for one row of the SmolLM2-sized stack and for generation.

torch.compile (``--compile``): the DoTA stack's training step and unmerged forward,
eager against ``torch.compile`` (inductor), in one process; the compile time is reported.

Goals (issue 6): DoTA and QDoTA steps within 1.6x of their floors; DoTA no slower than full
fine-tuning; a merged model at the base's speed.

    python benchmarks/bench_speed.py --json benchmarks/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _measure import PeakRSS, best_round_robin, rss

GOAL_FLOOR = 1.6  # DoTA / floor and QDoTA / floor-nf4 step time, at most
GOAL_FULL = 1.0  # DoTA / full fine-tuning step time, at most
GOAL_SERVING = 0.8  # unmerged DoTA / base throughput without grad (issue 14), at least
STACK_METHODS = ("floor", "full", "lora", "dota", "dota-dense", "dota-contract",
                 "dota-random", "floor-nf4", "qdota", "qlora")
SMOLLM2_METHODS = ("floor", "full", "lora", "dota", "dota-random", "floor-nf4", "qdota",
                   "qlora")
STACK_TARGETS = ("q_proj", "up_proj", "down_proj")
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- workloads


def build_stack(hidden: int, mlp: int) -> Any:
    """q_proj (hidden x hidden), up_proj (hidden -> mlp), down_proj (mlp -> hidden), float32."""
    import torch
    from torch import nn

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(hidden, hidden, bias=False)
            self.up_proj = nn.Linear(hidden, mlp, bias=False)
            self.down_proj = nn.Linear(mlp, hidden, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.up_proj(self.q_proj(x)))

    gen = torch.Generator().manual_seed(0)
    model = Stack()
    with torch.no_grad():
        for layer in (model.q_proj, model.up_proj, model.down_proj):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen)
                               / math.sqrt(layer.in_features))
    return model


def prepare(model: Any, method: str, targets: tuple[str, ...], *, causal_lm: bool) -> Any:
    """Apply ``method`` to ``model``; returns the model to train (peft wraps it)."""
    from tensornet.adapters import apply_dota
    from tensornet.finetune.methods import quantize_linears_nf4

    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method in ("floor", "full"):
        return model
    if method == "floor-nf4":
        quantize_linears_nf4(model, targets)
        return model
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if method == "qlora":
            quantize_linears_nf4(model, targets)
        cfg = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=list(targets),
                         task_type="CAUSAL_LM" if causal_lm else None)
        return get_peft_model(model, cfg)
    strategy = {"dota-dense": "dense", "dota-contract": "contract"}.get(method, "auto")
    return apply_dota(model, target_modules=list(targets), rank=16, num_cores=5,
                      init="random" if method == "dota-random" else "mpo",
                      quantize="nf4" if method == "qdota" else None, dtype="float32",
                      strategy=strategy)


def make_step(workload: str, method: str, tokens: int, quick: bool) -> tuple[Any, int]:
    """Build one (workload, method); returns its training step (phase times) and trainables."""
    import torch

    torch.manual_seed(0)
    if workload == "stack":
        hidden, mlp = (512, 1376) if quick else (4096, 11008)
        model = prepare(build_stack(hidden, mlp), method, STACK_TARGETS, causal_lm=False)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, hidden, generator=gen)
        g = torch.randn(tokens, hidden, generator=gen)

        def forward() -> Any:
            xin = x.requires_grad_(True) if method.startswith("floor") else x
            return (model(xin).float() * g).sum()

        leaf = x
    else:
        from tensornet.adapters import load_pretrained, tiny_llama

        if quick:
            base = tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
        else:
            base, _ = load_pretrained()
        base.train()
        model = prepare(base, method, LLM_TARGETS, causal_lm=True)
        batch, seq = (2, 16) if quick else (8, 128)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=gen)
        embed = base.get_input_embeddings()
        with torch.no_grad():
            embeds = embed(ids)
        leaf = embeds

        def forward() -> Any:
            if method.startswith("floor"):  # backward to the inputs only
                return model(inputs_embeds=embeds.requires_grad_(True), labels=ids).loss
            return model(input_ids=ids, labels=ids).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        leaf.grad = None
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    return step, sum(p.numel() for p in params)


def worker(workload: str, method: str, tokens: int, steps: int, quick: bool) -> dict[str, Any]:
    """Build one (workload, method), time ``steps`` training steps; one JSON record."""
    base_rss = rss()
    step, trainable = make_step(workload, method, tokens, quick)
    step()  # warm-up: AdamW state, the planner's calibration, peft's lazy setup
    before = rss()
    sampler = PeakRSS()
    sampler.start()
    phases = [step() for _ in range(steps)]
    sampler.done.set()
    sampler.join()
    fwd, bwd, opt_t = (statistics.median(p[i] for p in phases) for i in range(3))
    totals = [sum(p) for p in phases]
    return {
        "workload": workload, "method": method, "tokens": tokens if workload == "stack" else
        (2 * 16 if quick else 8 * 128), "trainable_params": trainable,
        "forward_s": fwd, "backward_s": bwd, "optimizer_s": opt_t,
        "step_s": statistics.median(totals), "step_all_s": totals,
        "persistent_mb": (before - base_rss) / 2**20,
        "peak_mb": (sampler.peak - base_rss) / 2**20,
    }


RATIOS = (("dota", "floor", GOAL_FLOOR), ("qdota", "floor-nf4", GOAL_FLOOR),
          ("dota", "full", GOAL_FULL), ("lora", "floor", None), ("qlora", "floor-nf4", None),
          ("full", "floor", None), ("dota-random", "floor", None), ("dota-dense", "floor", None),
          ("dota-contract", "floor", None), ("floor-nf4", "floor", None))


def check_ratios(t: dict[str, float]) -> list[dict[str, Any]]:
    """The ratios of :data:`RATIOS` whose two methods were measured, printed with verdicts."""
    checks = []
    for a, b, goal in RATIOS:
        if a in t and b in t:
            value = t[a] / t[b]
            ok = None if goal is None else value <= goal
            checks.append({"name": f"{a} / {b}", "ratio": value, "goal": goal, "pass": ok})
            mark = "" if goal is None else f"  (goal <= {goal:.2f}) {'PASS' if ok else 'FAIL'}"
            print(f"  {a + ' / ' + b:26s} {value:6.3f}{mark}", flush=True)
    return checks


PAIRED_METHODS = ("floor", "full", "dota", "floor-nf4", "qdota")


def paired(args: argparse.Namespace) -> dict[str, Any]:
    """The goal ratios with every method in one process, steps alternating round-robin.

    Separate processes see the machine at different moments; here floor, full, DoTA, the NF4
    floor and QDoTA take turns, one step each per round, so they share its conditions.
    """
    tokens = 256 if args.quick else max(args.tokens)
    steps = {m: make_step("stack", m, tokens, args.quick)[0] for m in PAIRED_METHODS}
    for fn in steps.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.paired_rounds):
        for m, fn in steps.items():
            times[m].append(sum(fn()))
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"  stack, {tokens} tokens, median of {args.paired_rounds} rounds (s): "
          + ", ".join(f"{m} {v:.3f}" for m, v in med.items()))
    checks = check_ratios(med)
    return {"tokens": tokens, "rounds": args.paired_rounds, "times": times, "median": med,
            "checks": checks}


# ----------------------------------------------------------------------------- inference


def perturb_cores(model: Any) -> None:
    """Move every adapter off its initial cores, as training does (``T != T_init``)."""
    import torch

    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dota_cores" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3)


def unmerged_path(model: Any, rows: int) -> str:
    """The forward path the unmerged DoTA layers take without grad at ``rows`` rows."""
    paths = set()
    for m in model.modules():
        if not hasattr(m, "choose_strategy"):
            continue
        served = [e.use.get(rows) for e in m._serving.values()]
        if any(served):
            paths.add("cached")
        else:
            paths.add(m.choose_strategy(m.delta_terms(["default"])[0][1], rows, False,
                                        "default")[0])
    return "/".join(sorted(paths))


def inference_checks(inf: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's serving goals: unmerged >= 0.8x the base, one row and generation."""
    picks = [("stack-smollm2 1 row unmerged / base", r["unmerged_over_base"])
             for r in inf["stack-smollm2"] if r["rows"] == 1]
    picks += [(f"smollm2 batch {r['batch']} unmerged / base tok/s", r["unmerged_over_base"])
              for r in inf["smollm2"]]
    checks = []
    for name, value in picks:
        check = {"name": name, "value": value, "goal": GOAL_SERVING,
                 "pass": value >= GOAL_SERVING}
        checks.append(check)
        print(f"  {name:38s} {value:.3f}  (goal >= {GOAL_SERVING:.2f}) "
              f"{'PASS' if check['pass'] else 'FAIL'}")
    return checks


def inference(quick: bool) -> dict[str, Any]:
    """Rows/s through the stack and generated tokens/s on SmolLM2: base, unmerged, merged."""
    import copy

    import torch

    from tensornet.adapters import apply_dota, load_pretrained, tiny_llama

    out: dict[str, Any] = {"stack": [], "stack-smollm2": [], "smollm2": []}
    gen = torch.Generator().manual_seed(2)
    # the LLaMA-2-7B stack (one block) and a SmolLM2-sized one (4 blocks of q, up, down)
    sizes = {"stack": ((512, 1376) if quick else (4096, 11008), 1),
             "stack-smollm2": ((128, 256) if quick else (576, 1536), 4)}
    for workload, ((hidden, mlp), blocks) in sizes.items():
        base = torch.nn.Sequential(*[build_stack(hidden, mlp) for _ in range(blocks)])
        base.requires_grad_(False)
        unmerged = apply_dota(copy.deepcopy(base), target_modules=list(STACK_TARGETS))
        perturb_cores(unmerged)
        merged = copy.deepcopy(unmerged).merge_and_unload().requires_grad_(False)
        stacks = {"base": base, "unmerged": unmerged, "merged": merged}
        with torch.inference_mode():
            for rows in (1, 4, 16):
                x = torch.randn(rows, hidden, generator=gen)
                t, _ = best_round_robin(
                    {k: (lambda x=x, m=m: m(x)) for k, m in stacks.items()}, 1.0, 5)
                rec = {"rows": rows, "unmerged_path": unmerged_path(unmerged, rows),
                       **{f"{k}_rows_per_s": rows / v for k, v in t.items()}}
                rec["unmerged_over_base"] = rec["unmerged_rows_per_s"] / rec["base_rows_per_s"]
                out[workload].append(rec)
                print(f"  {workload:13s} {rows:3d} rows  base {rec['base_rows_per_s']:9.1f}/s  "
                      f"unmerged {rec['unmerged_rows_per_s']:9.1f}/s ({rec['unmerged_path']}, "
                      f"{rec['unmerged_over_base']:.2f}x)  merged "
                      f"{rec['merged_rows_per_s']:9.1f}/s", flush=True)
        del stacks, base, unmerged, merged

    if quick:
        model = tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
        vocab, new = 512, 8
    else:
        model, _ = load_pretrained()
        vocab, new = model.config.vocab_size, 32
    model.eval()
    dota = apply_dota(copy.deepcopy(model))
    perturb_cores(dota)
    dota_merged = copy.deepcopy(dota).merge_and_unload()
    models = {"base": model, "unmerged": dota, "merged": dota_merged}
    with torch.inference_mode():
        for batch in (1, 8):
            ids = torch.randint(0, vocab, (batch, 16), generator=gen)

            def generate(m: Any, ids: torch.Tensor = ids) -> Any:
                return m.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=0)

            t, _ = best_round_robin({k: (lambda m=m: generate(m)) for k, m in models.items()},
                                  2.0, 3)
            rec = {"batch": batch, "new_tokens": new,
                   **{f"{k}_tokens_per_s": batch * new / v for k, v in t.items()}}
            rec["unmerged_over_base"] = rec["unmerged_tokens_per_s"] / rec["base_tokens_per_s"]
            out["smollm2"].append(rec)
            print(f"  smollm2 batch {batch}  base {rec['base_tokens_per_s']:7.1f} tok/s  unmerged "
                  f"{rec['unmerged_tokens_per_s']:7.1f} tok/s "
                  f"({rec['unmerged_over_base']:.2f}x)  merged "
                  f"{rec['merged_tokens_per_s']:7.1f} tok/s", flush=True)
    return out


# ----------------------------------------------------------------------------- torch.compile


def compile_check(tokens: int, quick: bool) -> dict[str, Any]:
    """DoTA stack: eager against torch.compile, training step and unmerged forward."""
    import torch

    from tensornet._compat.torch import raise_recompile_limit
    from tensornet.adapters import apply_dota

    # one DoTALinear.forward code object serves layers of three shapes, in training and in
    # inference: more compiled versions than dynamo keeps by default
    raise_recompile_limit(64)
    hidden, mlp = (512, 1376) if quick else (4096, 11008)
    eager = build_stack(hidden, mlp)
    for p in eager.parameters():
        p.requires_grad_(False)
    eager = apply_dota(eager, target_modules=list(STACK_TARGETS), dtype="float32")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, hidden, generator=gen)
    g = torch.randn(tokens, hidden, generator=gen)
    x1 = torch.randn(1, hidden, generator=gen)
    rec: dict[str, Any] = {"tokens": tokens}
    try:
        compiled = torch.compile(eager)
        t0 = time.perf_counter()
        (compiled(x) * g).sum().backward()
        with torch.inference_mode():
            compiled(x1)
        rec["compile_s"] = time.perf_counter() - t0
        with torch.inference_mode():
            rec["forward1_max_abs_diff"] = float((compiled(x1) - eager(x1)).abs().max())
    except Exception as exc:  # noqa: BLE001 - report whatever inductor raises
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"  torch.compile failed: {rec['error']}", flush=True)
        return rec

    def train_step(m: Any) -> None:
        (m(x) * g).sum().backward()
        for p in eager.parameters():
            p.grad = None

    t, _ = best_round_robin({"eager": lambda: train_step(eager),
                           "compiled": lambda: train_step(compiled)}, 3.0, 3)
    with torch.inference_mode():
        f, _ = best_round_robin({"eager": lambda: eager(x1), "compiled": lambda: compiled(x1)},
                              1.0, 5)
    rec.update({"train_eager_s": t["eager"], "train_compiled_s": t["compiled"],
                "forward1_eager_s": f["eager"], "forward1_compiled_s": f["compiled"]})
    print(f"  compile {rec['compile_s']:.1f} s; training step ({tokens} rows, forward + "
          f"backward) eager {t['eager']:.3f} s, compiled {t['compiled']:.3f} s "
          f"(x{t['eager'] / t['compiled']:.2f}); forward of 1 row eager "
          f"{f['eager'] * 1e3:.2f} ms, compiled {f['compiled'] * 1e3:.2f} ms "
          f"(x{f['eager'] / f['compiled']:.2f})", flush=True)
    return rec


# ----------------------------------------------------------------------------- driver


def run_worker(args: argparse.Namespace, workload: str, method: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", workload, method, str(tokens),
           "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_row(r: dict[str, Any], floor: float) -> None:
    print(f"  {r['method']:14s} {r['trainable_params']:>12,} {r['forward_s']:8.3f} "
          f"{r['backward_s']:8.3f} {r['optimizer_s']:8.3f} {r['step_s']:8.3f} "
          f"{r['step_s'] / floor:7.2f} {r['peak_mb']:9.0f}", flush=True)


def training(args: argparse.Namespace) -> list[dict[str, Any]]:
    groups = []
    for workload in args.workloads:
        methods = STACK_METHODS if workload == "stack" else SMOLLM2_METHODS
        if args.methods:
            methods = tuple(m for m in methods if m in args.methods)
        token_list = args.tokens if workload == "stack" else [0]
        for tokens in token_list:
            what = f"{tokens} tokens" if workload == "stack" else "batch 8 x 128"
            print(f"\n## {workload}, {what}: median of {args.steps} steps (s); x floor = step "
                  f"/ its floor (floor-nf4 for the quantized)")
            print(f"  {'method':14s} {'trainable':>12} {'forward':>8} {'backward':>8} "
                  f"{'optim':>8} {'step':>8} {'x floor':>7} {'peak MB':>9}")
            rows = []
            # the floor, full fine-tuning and DoTA again at the end: ratios use the mean of
            # both readings, and the floor's two readings show the machine's drift
            order = [*methods, *(m for m in ("floor", "full", "dota") if m in methods)]
            for i, method in enumerate(order):
                r = run_worker(args, workload, method, tokens)
                r["repeat"] = method in order[:i]
                rows.append(r)
                floor = "floor-nf4" if method in ("qdota", "qlora") else "floor"
                ref = next((x["step_s"] for x in rows if x["method"] == floor), math.nan)
                print_row(r, ref)
            groups.append(verdicts(workload, tokens, rows))
    return groups


def verdicts(workload: str, tokens: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    step = {}
    for r in rows:
        step.setdefault(r["method"], []).append(r["step_s"])
    t = {m: sum(v) / len(v) for m, v in step.items()}
    drift = max(step["floor"]) / min(step["floor"]) if "floor" in step else math.nan
    print(f"  floor drift (first vs last reading): {drift:.3f}")
    checks = check_ratios(t)
    return {"workload": workload, "tokens": tokens, "rows": rows, "floor_drift": drift,
            "checks": checks}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["stack", "smollm2"],
                   choices=["stack", "smollm2"])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 2048],
                   help="rows per step of the stack workload (default 256 2048)")
    p.add_argument("--methods", nargs="+", default=None,
                   choices=sorted(set(STACK_METHODS) | set(SMOLLM2_METHODS)),
                   help="only these methods (default: all of the workload's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-training", action="store_true", help="skip the training steps")
    p.add_argument("--paired", action="store_true",
                   help="also the goal ratios in one process, steps alternating (stack)")
    p.add_argument("--paired-rounds", type=int, default=3, help="default 3")
    p.add_argument("--inference", action="store_true", help="measure inference speed")
    p.add_argument("--compile", action="store_true", help="measure torch.compile")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small shapes, a tiny LLaMA (numbers are meaningless)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "METHOD", "TOKENS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        workload, method, tokens = args.worker
        print(json.dumps(worker(workload, method, int(tokens), args.steps, args.quick)))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _environment import environment, print_environment, write_json

    env = environment([sys.argv[0], *argv])
    print("# tensornet adapter speed: training step vs the frozen-base floor, inference, "
          "torch.compile (float32, CPU)")
    print_environment(env)
    if args.quick:
        print("# QUICK smoke run: small shapes; the numbers mean nothing")
    result: dict[str, Any] = {"benchmark": "bench_speed", "environment": env,
                              "settings": {k: (str(v) if isinstance(v, Path) else v)
                                           for k, v in vars(args).items()}}
    if not args.no_training:
        result["training"] = training(args)
    if args.paired:
        print("\n## goal ratios, methods alternating step by step in one process")
        result["paired"] = paired(args)
    if args.inference:
        print("\n## inference (best of round-robin; unmerged = the planner's strategy)")
        result["inference"] = inference(args.quick)
    if args.compile:
        print("\n## torch.compile of the DoTA stack (inductor)")
        result["compile"] = compile_check(256 if args.quick else 2048, args.quick)
    checks = [c for g in result.get("training", []) for c in g["checks"] if c["goal"]]
    checks += [c for c in result.get("paired", {}).get("checks", []) if c["goal"]]
    if args.inference:
        checks += inference_checks(result["inference"])
    result["pass"] = all(c["pass"] for c in checks) if checks else None
    print(f"\n# load avg at end {[round(v, 2) for v in os.getloadavg()]}")
    print(f"# goals: {'PASS' if result['pass'] else 'FAIL' if checks else 'none checked'}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
