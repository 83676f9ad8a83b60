"""DoTA's per-layer cost model against measured training steps: does ``"auto"`` pick well?

For one adapted linear layer of each LLaMA-2-7B shape (q 4096x4096, up 4096->11008, down
11008->4096; DoTA N = 5, R = 16, float32) and batch sizes 32..2048 rows, times one training
step (forward, loss ``sum(y * g)``, backward to the input and to the cores) of

* ``floor``: the frozen base layer alone (backward to the input only);
* ``dense`` and ``contract``: DoTA with the strategy pinned;
* ``auto``: DoTA with the layer's own pick (:func:`residual_strategy`, fixed machine
  constants), reported as ``picked``.

The four take turns round by round in one process (:func:`_measure.best_round_robin`), so
they share the machine's conditions. Printed per row: the measured times, the modelled
dense / contract step times next to them, ``picked / min`` (the time of the picked
strategy over the faster of the two; goal <= 1.10 at every batch size) and
``dense / floor`` (the issue-14 goal: DoTA's step within 1.6x of the frozen-base floor at
256 and 2048 rows).

On a GPU (``--device cuda``, bfloat16 weights by default there: ``--dtype``) the same
table checks the accelerator's cost model (:data:`tensornet.adapters.dota.cost.CUDA_PROFILE`,
estimated without a GPU) against both pinned strategies; each step ends in a
synchronization.

    python benchmarks/bench_layer.py --threads 1 --json benchmarks/results/layer.json
    python benchmarks/bench_layer.py --device cuda --json benchmarks/results/layer-gpu.json
    python benchmarks/bench_layer.py --quick     # smoke test: small shapes, one round
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from _environment import environment, print_environment, write_json
from _measure import best_round_robin
from torch import nn

from tensornet import factorize, plan_mpo_matmul
from tensornet.adapters import apply_dota
from tensornet.adapters.dota.cost import _strategy_seconds, profile_for

GOAL_PICK = 1.10  # time of the picked strategy / the faster one, at most
GOAL_FLOOR = 1.6  # DoTA step / frozen-base floor at 256 and 2048 rows, at most
FULL_SHAPES = [("q_proj", 4096, 4096), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096)]
QUICK_SHAPES = [("q (quick)", 256, 256), ("up (quick)", 256, 688)]
FULL_ROWS = [32, 64, 128, 256, 512, 1024, 2048]
QUICK_ROWS = [4, 64]


def layer_models(in_f: int, out_f: int, device: str, dtype: torch.dtype,
                 ) -> tuple[dict[str, nn.Module], nn.Module]:
    """The frozen base and DoTA copies of it: pinned dense, pinned contract, auto."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).requires_grad_(False)
    base = base.to(device, dtype)
    models: dict[str, nn.Module] = {"floor": base}
    for name, strategy in (("dense", "dense"), ("contract", "contract"), ("auto", "auto")):
        models[name] = apply_dota(copy.deepcopy(base), target_modules=["0"], rank=16,
                                  num_cores=5, dtype="float32", strategy=strategy)
    layer = next(m for m in models["auto"].modules() if hasattr(m, "choose_strategy"))
    return models, layer


def modelled(in_f: int, out_f: int, rows: int, kind: str, itemsize: int) -> tuple[float, float]:
    """The layer model's (dense, contract) training-step seconds for one DoTA adapter."""
    out_modes, in_modes = factorize(out_f, 5), factorize(in_f, 5)
    ranks = [1, 16, 16, 16, 16, 1]
    shapes = [(ranks[k], out_modes[k], in_modes[k], ranks[k + 1]) for k in range(5)]
    plan = plan_mpo_matmul(shapes, rows, itemsize=itemsize, profile=profile_for(kind))
    return _strategy_seconds(plan, training=True, terms=2, trainable=1, kind=kind)


def run_shape(name: str, in_f: int, out_f: int, rows_list: list[int],
              args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    models, layer = layer_models(in_f, out_f, args.device, dtype)
    kind = "cpu" if args.device == "cpu" else "cuda"
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    out = []
    for rows in rows_list:
        gen = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, in_f, generator=gen).to(args.device, dtype)
        g = torch.randn(rows, out_f, generator=gen).to(args.device, dtype)

        def step(model: nn.Module, x: torch.Tensor = x, g: torch.Tensor = g) -> None:
            xx = x.clone().requires_grad_(True)
            (model(xx) * g).sum().backward()
            for p in model.parameters():
                p.grad = None
            sync()

        fns = {k: (lambda m=m: step(m)) for k, m in models.items()}
        t, rounds = best_round_robin(fns, args.target_seconds, args.min_rounds, args.max_rounds)
        chain = layer.delta_terms(["default"])[0][1]
        picked = layer.choose_strategy(chain, rows, True, "default", kind=kind,
                                       dtype=dtype)[0]
        model_dense, model_contract = modelled(in_f, out_f, rows, kind, dtype.itemsize)
        rec = {
            "shape": name, "rows": rows, "rounds": rounds, "picked": picked,
            **{f"{k}_s": v for k, v in t.items()},
            "model_dense_s": model_dense, "model_contract_s": model_contract,
            "picked_over_min": t[picked] / min(t["dense"], t["contract"]),
            "dota_over_floor": t["auto"] / t["floor"],
        }
        out.append(rec)
        print(f"  {name:10s} {rows:5d}  floor {t['floor']*1e3:8.1f}  dense {t['dense']*1e3:8.1f}"
              f" ({model_dense*1e3:7.1f})  contract {t['contract']*1e3:8.1f}"
              f" ({model_contract*1e3:7.1f})  auto {t['auto']*1e3:8.1f}  picked {picked:8s}"
              f"  picked/min {rec['picked_over_min']:.3f}  auto/floor {rec['dota_over_floor']:.3f}",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, one round (smoke test)")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="batch sizes (rows)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--target-seconds", type=float, default=2.0,
                   help="work per strategy aimed at by the round count (default 2)")
    p.add_argument("--min-rounds", type=int, default=3, help="default 3")
    p.add_argument("--max-rounds", type=int, default=20, help="default 20")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and inputs (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--json", type=Path, default=None, help="also write all numbers here")
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"bench_layer.py: --device {args.device}, but torch finds no CUDA device",
              file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.min_rounds = args.max_rounds = 1
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    env = environment(sys.argv if argv is None else ["bench_layer.py", *argv])
    print(f"# DoTA layer: training step per strategy, measured and modelled ({args.dtype}, "
          f"{args.device})")
    print_environment(env)
    print("\n## step seconds x 1e3 (modelled in parentheses), best of round-robin")
    records = [r for name, i, o in shapes for r in run_shape(name, i, o, rows, args)]
    worst = max(r["picked_over_min"] for r in records)
    verdicts = [{"goal": "picked / min", "value": worst, "limit": GOAL_PICK,
                 "pass": worst <= GOAL_PICK}]
    for n in (256, 2048):
        at = [r["dota_over_floor"] for r in records if r["rows"] == n]
        if at:
            verdicts.append({"goal": f"DoTA / floor at {n} rows", "value": max(at),
                             "limit": GOAL_FLOOR, "pass": max(at) <= GOAL_FLOOR})
    print()
    for v in verdicts:
        print(f"  {v['goal']:28s} {v['value']:.3f}  (goal <= {v['limit']:.2f}, worst shape) "
              f"{'PASS' if v['pass'] else 'FAIL'}")
    if args.quick:
        print("# QUICK smoke run: the numbers mean nothing")
    write_json(args.json, {"environment": env, "records": records, "goals": verdicts})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
