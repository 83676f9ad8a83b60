"""Contraction-planner benchmark: does ``mpo_matmul(strategy="auto")`` pick the faster strategy?

For the MPO shapes of LLaMA-2-7B's matrices (rank 16) and batch sizes 1..8192, measures the
wall time of ``tensornet.mpo_matmul(x, cores, strategy=...)`` for ``"dense"`` (contract the
cores into W, then one matmul) and ``"contract"`` (contract x through the cores), and
records what the two planned strategies pick: ``"auto"`` plans with the fixed constants of
the device kind (``plan_mpo_matmul(cores, batch, profile=profile_for("cpu"))``, the default,
as DoTA's layers decide) and ``"calibrated"`` with this machine's measured profile
(``profile=calibrate(x)``), exactly the plans ``mpo_matmul`` follows. Both are timed as well.

Goal: for every (shape, batch), time of the strategy ``"auto"`` picks / min(t_dense,
t_contract) <= 1.10 (the calibrated pick is reported beside it).

Run ``python benchmarks/bench_plan.py --help`` for the options; ``--quick`` is a smoke test
on small shapes (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _environment import environment, finish, print_environment
from _measure import best_round_robin
from _shapes import FULL_SHAPES, QUICK_SHAPES, parser

from tensornet import calibrate, mpo_matmul, plan_mpo_matmul, profile_for

GOAL_RATIO = 1.10  # t_picked / min(t_dense, t_contract), at most
CHECK_BATCH = 32  # rows of x for the correctness check against x @ W.T
CHECK_RTOL = 1e-4  # relative Frobenius error allowed against the float64 reference

FULL_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
QUICK_BATCHES = [1, 8, 64, 512]


# ----------------------------------------------------------------------------- inputs


def random_cores(out_modes: tuple[int, ...], in_modes: tuple[int, ...], rank: int,
                 seed: int) -> list[torch.Tensor]:
    """Float32 cores ``(R_{k-1}, I_k, J_k, R_k)``; entries scaled so that W ~ N(0, 1/in)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(out_modes)
    ranks = [1] + [rank] * (n - 1) + [1]
    cores = []
    for k in range(n):
        shape = (ranks[k], out_modes[k], in_modes[k], ranks[k + 1])
        scale = 1.0 / math.sqrt(ranks[k] * in_modes[k])
        cores.append(torch.randn(*shape, generator=gen, dtype=torch.float32) * scale)
    return cores


def reference_matrix(cores: list[torch.Tensor]) -> np.ndarray:
    """W (float64) from the cores by ``np.einsum``, independently of tensornet."""
    n = len(cores)
    acc = cores[0].double().numpy()[0]  # (I_1, J_1, R_1)
    for core in cores[1:]:
        c = core.double().numpy()
        acc = np.einsum("...a,aijb->...ijb", acc, c)
    t = acc[..., 0]  # (I_1, J_1, I_2, J_2, ..., I_N, J_N)
    perm = [2 * k for k in range(n)] + [2 * k + 1 for k in range(n)]
    rows = math.prod(int(c.shape[1]) for c in cores)
    return np.ascontiguousarray(t.transpose(perm)).reshape(rows, -1)


# ----------------------------------------------------------------------------- measuring


def time_interleaved(fns: dict[str, Callable[[], Any]],
                     args: argparse.Namespace) -> tuple[dict[str, float], int]:
    """Best wall time of each strategy, round-robin (:func:`_measure.best_round_robin`)."""
    if args.quick:
        return best_round_robin(fns, 0.0, 1, 1)
    return best_round_robin(fns, args.target_seconds, args.min_repeats, args.max_repeats)


def check_shape(cores: list[torch.Tensor], in_features: int, seed: int) -> dict[str, float]:
    """Relative error of each strategy against ``x @ W.T`` computed in float64."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(CHECK_BATCH, in_features, generator=gen, dtype=torch.float32)
    ref = x.double().numpy() @ reference_matrix(cores).T
    errors = {}
    for strategy in ("dense", "contract", "auto", "calibrated"):
        y = mpo_matmul(x, cores, strategy=strategy).double().numpy()
        errors[strategy] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    return errors


def run_shape(name: str, out_modes: tuple[int, ...], in_modes: tuple[int, ...],
              args: argparse.Namespace) -> dict[str, Any]:
    cores = random_cores(out_modes, in_modes, args.rank, args.seed)
    in_features = math.prod(in_modes)
    errors = check_shape(cores, in_features, args.seed)
    check_ok = all(e <= CHECK_RTOL for e in errors.values())
    gen = torch.Generator().manual_seed(args.seed + 2)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, in_features, generator=gen, dtype=torch.float32)
        plan = plan_mpo_matmul(cores, batch, profile=profile_for("cpu"))  # what "auto" runs
        # "calibrated" plans with the measured profile; flag when its path differs
        cal_plan = plan_mpo_matmul(cores, batch, profile=calibrate(x))
        times, rounds = time_interleaved({
            "dense": lambda x=x: mpo_matmul(x, cores, strategy="dense"),
            "contract": lambda x=x: mpo_matmul(x, cores, strategy="contract"),
            "auto": lambda x=x: mpo_matmul(x, cores),
            "calibrated": lambda x=x: mpo_matmul(x, cores, strategy="calibrated"),
        }, args)
        t_dense, t_contract, t_auto = times["dense"], times["contract"], times["auto"]
        best = min(t_dense, t_contract)

        row = {
            "batch": batch,
            "t_dense": t_dense,
            "t_contract": t_contract,
            "t_auto": t_auto,
            "t_calibrated": times["calibrated"],
            "repeats": rounds,
            "picked": plan.strategy,
            "picked_calibrated": cal_plan.strategy,
            "faster": "dense" if t_dense < t_contract else "contract",
            "ratio_picked": times[plan.strategy] / best,
            "ratio_picked_calibrated": times[cal_plan.strategy] / best,
            "ratio_auto": t_auto / best,
            "ratio_calibrated": times["calibrated"] / best,
            "model_dense_seconds": plan.dense_seconds,
            "model_contract_seconds": plan.contract_seconds,
            "contract_path": [list(s) for s in plan.path],
            "contract_path_same_as_calibrated": plan.path == cal_plan.path,
            "dense_peak_elements": plan.dense_peak,
            "contract_peak_elements": plan.contract_peak,
        }
        row["pass"] = row["ratio_picked"] <= GOAL_RATIO
        rows.append(row)
        print_row(row)
        sys.stdout.flush()
        del x
    worst = max(rows, key=lambda r: r["ratio_picked"])
    return {
        "shape_name": name,
        "shape": [math.prod(out_modes), in_features],
        "out_modes": list(out_modes),
        "in_modes": list(in_modes),
        "rank": args.rank,
        "core_shapes": [list(c.shape) for c in cores],
        "check_errors": errors,
        "check_pass": check_ok,
        "rows": rows,
        "worst_ratio": worst["ratio_picked"],
        "worst_batch": worst["batch"],
        "pass": all(r["pass"] for r in rows) and check_ok,
    }


HEADER = (f"  {'batch':>5} {'t_dense':>10} {'t_contract':>10} {'t_auto':>10}  {'picked':8} "
          f"{'cal.pick':8} {'faster':8} {'picked/min':>10} {'cal/min':>7} {'auto/min':>8}  "
          f"{'model d/c':>9}  {'rounds':>6}")


def print_row(r: dict[str, Any]) -> None:
    mark = "ok" if r["pass"] else "FAIL"
    model = r["model_dense_seconds"] / r["model_contract_seconds"]
    reps = str(r["repeats"])
    note = "" if r["contract_path_same_as_calibrated"] else "  (path differs)"
    print(f"  {r['batch']:5d} {r['t_dense'] * 1e3:8.3f}ms {r['t_contract'] * 1e3:8.3f}ms "
          f"{r['t_auto'] * 1e3:8.3f}ms  {r['picked']:8} {r['picked_calibrated']:8} "
          f"{r['faster']:8} {r['ratio_picked']:10.3f} {r['ratio_picked_calibrated']:7.3f} "
          f"{r['ratio_auto']:8.3f}  {model:9.3f}  {reps:>6}  {mark}{note}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser(__doc__, rank="MPO bond rank (default 16)",
               quick="smoke test: small shapes and batches, 1 repeat (numbers are meaningless)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help=f"batch sizes (rows of x); default {FULL_BATCHES}")
    p.add_argument("--target-seconds", type=float, default=0.5,
                   help="aim for this much timed work per strategy (default 0.5)")
    p.add_argument("--min-repeats", type=int, default=7,
                   help="fewest rounds (one call of each strategy per round; default 7)")
    p.add_argument("--max-repeats", type=int, default=200, help="default 200")
    args = p.parse_args(argv)
    if args.batches is None:
        args.batches = QUICK_BATCHES if args.quick else FULL_BATCHES
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    env = environment([sys.argv[0], *argv])
    print("# tensornet contraction-planner benchmark: mpo_matmul dense vs contract vs auto "
          "(float32 torch, forward, no autograd)")
    print_environment(env)
    print(f"# goal              t_picked / min(t_dense, t_contract) <= {GOAL_RATIO:.2f} for "
          f"every shape and batch")
    print(f"# settings          rank {args.rank}, seed {args.seed}, batches {args.batches}, "
          f"repeats {'1 (QUICK smoke test, not a measurement)' if args.quick else ''}"
          f"{'' if args.quick else 'interleaved rounds, adaptive: '}"
          f"{'' if args.quick else f'~{args.target_seconds} s per strategy, '}"
          f"{'' if args.quick else f'{args.min_repeats}..{args.max_repeats}'}, best taken "
          f"after one warm-up call of each")
    print("# columns           times are best-of wall times; picked = plan_mpo_matmul(cores, "
          "batch, profile=profile_for('cpu')).strategy (what auto runs); cal.pick = the plan "
          "with profile=calibrate(x) (what strategy='calibrated' runs); faster = measured "
          "winner; (path differs) = the two plans contract along different paths;")
    print("#                   model d/c = modelled dense / contract time (< 1: model prefers "
          "dense); rounds = timed calls of each strategy, round-robin")
    x0 = torch.zeros(1, 8)
    t0 = time.perf_counter()
    profile = calibrate(x0)
    print(f"# calibrated        {profile} ({time.perf_counter() - t0:.2f} s, once per process)")
    print(f"# fixed profile     {profile_for('cpu')} (strategy='auto', and 'contract' for its "
          "path)")
    env["calibrated_profile"] = dataclasses.asdict(profile)
    sys.stdout.flush()

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    results = []
    for name, out_modes, in_modes in shapes:
        print(f"\n## {name}: out_modes {list(out_modes)} x in_modes {list(in_modes)}, "
              f"rank {args.rank}")
        print(HEADER)
        r = run_shape(name, out_modes, in_modes, args)
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["check_errors"].items())
        print(f"  check vs float64 x @ W.T (batch {CHECK_BATCH}): {errs} "
              f"(tol {CHECK_RTOL:g}): {'ok' if r['check_pass'] else 'FAIL'}")
        print(f"  worst picked/min {r['worst_ratio']:.3f} at batch {r['worst_batch']}: "
              f"{'PASS' if r['pass'] else 'FAIL'}")
        results.append(r)

    worst = max(results, key=lambda r: r["worst_ratio"])
    worst_auto = max(((r["shape_name"], row) for r in results for row in r["rows"]),
                     key=lambda t: t[1]["ratio_auto"])
    overall = all(r["pass"] for r in results)
    env["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print("\n## summary")
    for r in results:
        print(f"  {r['shape_name']:28s} worst picked/min {r['worst_ratio']:.3f} "
              f"(batch {r['worst_batch']}): {'PASS' if r['pass'] else 'FAIL'}")
    print(f"  worst overall: {worst['worst_ratio']:.3f} ({worst['shape_name']}, batch "
          f"{worst['worst_batch']}); goal <= {GOAL_RATIO:.2f}")
    print(f"  worst auto/min (auto timed directly): {worst_auto[1]['ratio_auto']:.3f} "
          f"({worst_auto[0]}, batch {worst_auto[1]['batch']})")
    return finish(
        "bench_plan", args, env, overall,
        goals={"ratio_max": GOAL_RATIO, "check_rtol": CHECK_RTOL}, shapes=results,
        worst_ratio=worst["worst_ratio"], worst_auto_ratio=worst_auto[1]["ratio_auto"],
    )


if __name__ == "__main__":
    sys.exit(main())
