"""MPO decomposition benchmark: tensornet.mpo_decompose vs tensorly, same inputs, one process.

Measures, for LLaMA-2-7B-sized weight matrices with a power-law singular spectrum:

* the wall time of ``tensornet.mpo_decompose`` and of tensorly's ``tensor_train_matrix``
  (pytorch backend; numpy backend with ``--tensorly-numpy``) at the same modes and rank;
* the relative Frobenius error of both, computed the same way in float64 outside the
  timed region;
* the time to decompose the five DoTA target matrices of one LLaMA-2-7B layer, projected
  to the 32 layers of the model.

Goals: tensorly/tensornet time ratio >= 20; tensornet's error at most 0.1% (relative)
above tensorly's; all 32 layers in under 2 minutes.

``--device cuda`` runs both libraries on the GPU (the matrices are generated on the CPU,
with the same seeds, and moved there before any timed region; every timed call ends with
``torch.cuda.synchronize()``, so a time is the work done, not the work queued); the goal
is the same ratio, measured on the same GPU.

Run ``python benchmarks/bench_decompose.py --help`` for the options; ``--quick`` is a smoke
test on small matrices (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorly as tl
import torch
from _environment import environment, finish, print_environment
from _shapes import FULL_SHAPES, QUICK_SHAPES, parser
from tensorly.decomposition import tensor_train_matrix
from tensorly.tt_matrix import tt_matrix_to_matrix

import tensornet
from tensornet import factorize, mpo_decompose

GOAL_SPEEDUP = 20.0  # tensorly time / tensornet time, at least
GOAL_ERR_DIFF_PCT = 0.1  # (tensornet_err - tensorly_err) / tensorly_err * 100, at most
GOAL_MODEL_SECONDS = 120.0  # all layers of LLaMA-2-7B, at most
LLAMA_LAYERS = 32

# The five DoTA target matrices of one LLaMA-2-7B layer: (name, out_features, in_features).
FULL_LAYER = [
    ("q_proj", 4096, 4096),
    ("k_proj", 4096, 4096),
    ("v_proj", 4096, 4096),
    ("up_proj", 11008, 4096),
    ("down_proj", 4096, 11008),
]
# --quick: the same five matrices at a quarter of each side (1024 and 2752).
QUICK_LAYER = [(name, rows // 4, cols // 4) for name, rows, cols in FULL_LAYER]

ALPHA_NOTE = """\
Test matrices: W = U diag(s) V^T with s_i = i^(-alpha), i = 1..min(out, in), U and V
random orthonormal (Haar, from the QR of a Gaussian matrix, float32); W is float32 like
LLM weights. alpha sets how fast the spectrum decays: alpha = 0 is a flat spectrum (no
low-rank structure, the hardest case); alpha = 0.5 (the default) is a slow, heavy-tailed
decay, the regime reported for trained transformer weights (their leading singular
values stand out, the tail is long); larger alpha concentrates the energy in fewer
directions. Because U and V are random, the MPO unfoldings do not inherit W's decay, so a
rank-16 MPO keeps little of W and both libraries' errors are large: the goal is parity
of the error with tensorly at the same modes and rank, not a small error. Generation
time is not part of any timed region."""


# ----------------------------------------------------------------------------- inputs


def random_orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``n x k`` matrix with orthonormal columns, Haar-distributed (QR of a Gaussian)."""
    q, r = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float32))
    return q * torch.sign(torch.diagonal(r))


def power_law_matrix(rows: int, cols: int, alpha: float, seed: int) -> torch.Tensor:
    """``W = U diag(s) V^T`` (float32) with ``s_i = i^(-alpha)`` and random orthonormal U, V.

    Two reduced QRs (``rows x k`` and ``cols x k``, ``k = min(rows, cols)``) and one matmul:
    the singular values of W are ``s`` to float32 rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-alpha).to(torch.float32)
    u = random_orthonormal(rows, k, gen)
    v = random_orthonormal(cols, k, gen)
    return (u * s) @ v.T


def spectrum_check(W: torch.Tensor, alpha: float) -> float:
    """Largest ``|sigma_i / s_i - 1|`` over the spectrum (float64 SVD; slow on big W)."""
    sigma = torch.linalg.svdvals(W.double())
    s = torch.arange(1, sigma.numel() + 1, dtype=torch.float64).pow(-alpha)
    return float((sigma / s - 1).abs().max())


# ----------------------------------------------------------------------------- measuring


def _synchronize() -> None:
    """Wait for the GPU's queued work (when one is in use), so that a time is work done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_of(fn: Callable[[], Any], repeats: int, *, warmup: bool) -> tuple[float, list[float], Any]:
    """Best wall time of ``repeats`` calls (after one untimed call if ``warmup``)."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(repeats):
        _synchronize()
        t0 = time.perf_counter()
        result = fn()
        _synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), times, result


def rel_error(W64: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - approx||_F / ||W||_F`` in float64."""
    diff = approx.to(torch.float64) - W64
    return float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(W64))


def tensorly_decompose(W: Any, out_modes: tuple[int, ...], in_modes: tuple[int, ...],
                       rank: int) -> list[Any]:
    # tensorly's TT-matrix takes the (I_1..I_N, J_1..J_N) tensor and interleaves it itself
    return list(tensor_train_matrix(W.reshape(*out_modes, *in_modes), rank))


def run_case(name: str, out_modes: tuple[int, ...], in_modes: tuple[int, ...], W: torch.Tensor,
             args: argparse.Namespace) -> dict[str, Any]:
    rows, cols = W.shape
    rank = args.rank
    W64 = W.double()

    t_tn, times_tn, mpo = best_of(
        lambda: mpo_decompose(W, (out_modes, in_modes), rank), args.repeats, warmup=True
    )
    # full_spectrum=True: every singular value of every unfolding (to choose a rank from),
    # at the cost of full eigendecompositions of the large Gram matrices; not a goal
    t_full, _, full = best_of(
        lambda: mpo_decompose(W, (out_modes, in_modes), rank, full_spectrum=True),
        args.repeats, warmup=False,
    )
    cores64 = [c.double() for c in mpo.cores]
    dense_tn = tensornet.MPO(tuple(cores64)).to_dense()
    err_tn = rel_error(W64, dense_tn)

    tl.set_backend("pytorch")
    t_tl, times_tl, factors = best_of(
        lambda: tensorly_decompose(W, out_modes, in_modes, rank), args.tensorly_repeats,
        warmup=False,
    )
    err_tl = rel_error(W64, tt_matrix_to_matrix([f.double() for f in factors]))
    # the two libraries read the same core layout: tensornet's cores through tensorly
    layout_diff = rel_error(dense_tn, tt_matrix_to_matrix(cores64))

    result: dict[str, Any] = {
        "case": name,
        "shape": [rows, cols],
        "out_modes": list(out_modes),
        "in_modes": list(in_modes),
        "rank": rank,
        "tensornet_seconds": t_tn,
        "tensornet_times": times_tn,
        "tensornet_full_spectrum_seconds": t_full,
        "full_spectrum_lengths": [len(v) for v in full.singular_values],
        "default_spectrum_lengths": [len(v) for v in mpo.singular_values],
        "tensorly_seconds": t_tl,
        "tensorly_times": times_tl,
        "speedup": t_tl / t_tn,
        "tensornet_error": err_tn,
        "tensorly_error": err_tl,
        "error_diff_pct": (err_tn - err_tl) / err_tl * 100.0,
        "tensornet_reported_error": mpo.relative_error,
        "tensornet_error_bound": mpo.error_bound,
        "tensornet_ranks": list(mpo.ranks),
        "tensorly_ranks": [1] + [int(f.shape[-1]) for f in factors],
        "num_params": mpo.num_params,
        "layout_check": layout_diff,
    }
    if args.tensorly_numpy:
        tl.set_backend("numpy")
        Wn = W.cpu().numpy()
        t_np, times_np, fnp = best_of(
            lambda: tensorly_decompose(Wn, out_modes, in_modes, rank), args.tensorly_repeats,
            warmup=False,
        )
        dense_np = tt_matrix_to_matrix([f.astype(np.float64) for f in fnp])
        tl.set_backend("pytorch")
        err_np = rel_error(W64, torch.from_numpy(dense_np).to(W64.device))
        result.update(
            tensorly_numpy_seconds=t_np,
            tensorly_numpy_times=times_np,
            speedup_numpy=t_np / t_tn,
            tensorly_numpy_error=err_np,
        )
    result["pass_speed"] = result["speedup"] >= GOAL_SPEEDUP
    result["pass_error"] = result["error_diff_pct"] <= GOAL_ERR_DIFF_PCT
    return result


def print_case(r: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    print(f"\n## case {r['case']}: W {r['shape'][0]}x{r['shape'][1]}, out_modes {r['out_modes']},"
          f" in_modes {r['in_modes']}, rank {r['rank']}")
    print(f"  ranks            tensornet {r['tensornet_ranks']}  tensorly {r['tensorly_ranks']}"
          f"  ({r['num_params']} params)")
    print(f"  tensornet        {r['tensornet_seconds']:9.4f} s  (best of "
          f"{len(r['tensornet_times'])}, after a warm-up call)")
    print(f"  tensornet full   {r['tensornet_full_spectrum_seconds']:9.4f} s  (full_spectrum="
          f"True: {r['full_spectrum_lengths']} singular values per sweep, default "
          f"{r['default_spectrum_lengths']}; informative, not a goal)")
    print(f"  tensorly/torch   {r['tensorly_seconds']:9.4f} s  (best of "
          f"{len(r['tensorly_times'])}, no warm-up)")
    if "tensorly_numpy_seconds" in r:
        print(f"  tensorly/numpy   {r['tensorly_numpy_seconds']:9.4f} s  "
              f"(ratio {r['speedup_numpy']:.1f}x, error {r['tensorly_numpy_error']:.6e})")
    print(f"  speed ratio      tensorly/tensornet = {r['speedup']:.1f}x   "
          f"goal >= {GOAL_SPEEDUP:g}x: {verdict(r['pass_speed'])}")
    print(f"  rel. error       tensornet {r['tensornet_error']:.6e}  tensorly "
          f"{r['tensorly_error']:.6e}  (float64, ||W - W_mpo||_F / ||W||_F)")
    print(f"  error diff       {r['error_diff_pct']:+.4f}%   goal <= +{GOAL_ERR_DIFF_PCT:g}%: "
          f"{verdict(r['pass_error'])}")
    print(f"  tensornet says   relative_error {r['tensornet_reported_error']:.6e}, "
          f"error_bound {r['tensornet_error_bound']:.6e}")
    print(f"  layout check     tensornet cores via tensorly vs MPO.to_dense: "
          f"{r['layout_check']:.1e}")


def run_layer(matrices: list[tuple[str, torch.Tensor, tuple[int, ...], tuple[int, ...]]],
              args: argparse.Namespace) -> dict[str, Any]:
    def decompose_layer() -> list[Any]:
        return [mpo_decompose(W, (om, im), args.rank) for _, W, om, im in matrices]

    t_layer, times, _ = best_of(decompose_layer, args.repeats, warmup=True)
    per_matrix = {}
    for name, W, om, im in matrices:
        t, _, _ = best_of(lambda W=W, om=om, im=im: mpo_decompose(W, (om, im), args.rank),
                          args.repeats, warmup=False)
        per_matrix[name] = {"shape": list(W.shape), "out_modes": list(om),
                            "in_modes": list(im), "seconds": t}
    projected = t_layer * args.layers
    return {
        "layer_seconds": t_layer,
        "layer_times": times,
        "layers": args.layers,
        "projected_seconds": projected,
        "per_matrix": per_matrix,
        "pass": projected < GOAL_MODEL_SECONDS,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser(__doc__, rank="MPO bond rank cap (default 16)",
               quick="smoke test: small matrices, 1 repeat (numbers are meaningless)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="power-law exponent of the test spectrum s_i = i^-alpha (default 0.5)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed tensornet calls per case, best taken (default 3)")
    p.add_argument("--tensorly-repeats", type=int, default=1,
                   help="timed tensorly calls per case, best taken (default 1: it is slow)")
    p.add_argument("--tensorly-numpy", action="store_true",
                   help="also time tensorly's numpy backend (slower)")
    p.add_argument("--layers", type=int, default=LLAMA_LAYERS,
                   help=f"layers to project the one-layer time to (default {LLAMA_LAYERS})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where both libraries decompose (default cpu); cuda: the current GPU")
    p.add_argument("--check-spectrum", action="store_true",
                   help="verify the generated singular values by a float64 SVD (on in --quick)")
    p.add_argument("--skip-layer", action="store_true", help="skip the LLaMA-layer section")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here (torch "
                f"{torch.__version__}, built with CUDA {torch.version.cuda})")
    if args.quick:
        args.repeats = args.tensorly_repeats = 1
        args.check_spectrum = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tl.set_backend("pytorch")

    versions = {"tensorly": tl.__version__}
    env = environment([sys.argv[0], *argv], versions)
    print("# tensornet MPO decomposition benchmark: tensornet.mpo_decompose vs "
          "tensorly.decomposition.tensor_train_matrix")
    print_environment(env, versions)
    env["device"] = (torch.cuda.get_device_name() if args.device == "cuda"
                     else f"cpu ({env['cpu']})")
    print(f"# device            {env['device']}")
    print(f"# goals             speed ratio tensorly/tensornet >= {GOAL_SPEEDUP:g}; error diff "
          f"<= +{GOAL_ERR_DIFF_PCT:g}%; {args.layers} LLaMA-2-7B layers < "
          f"{GOAL_MODEL_SECONDS:g} s")
    print(f"# settings          rank {args.rank}, alpha {args.alpha}, seed {args.seed}, "
          f"repeats tensornet {args.repeats} / tensorly {args.tensorly_repeats}"
          f"{', QUICK (smoke test, not a measurement)' if args.quick else ''}")
    for line in ALPHA_NOTE.splitlines():
        print(f"# {line}")
    sys.stdout.flush()

    cases = QUICK_SHAPES if args.quick else FULL_SHAPES
    layer_spec = QUICK_LAYER if args.quick else FULL_LAYER
    matrices: dict[tuple[int, int, int], torch.Tensor] = {}
    generation: dict[str, float] = {}

    def get_matrix(rows: int, cols: int, index: int) -> torch.Tensor:
        key = (rows, cols, index)
        if key not in matrices:
            t0 = time.perf_counter()
            seed = args.seed * 1_000_003 + rows * 7 + cols * 13 + index * 101
            # generated on the CPU (the same seeds give the same matrices on every machine)
            matrices[key] = power_law_matrix(rows, cols, args.alpha, seed).to(args.device)
            generation[f"{rows}x{cols}#{index}"] = time.perf_counter() - t0
            if args.check_spectrum:
                dev = spectrum_check(matrices[key], args.alpha)
                print(f"# spectrum check {rows}x{cols}#{index}: max |sigma_i/s_i - 1| = "
                      f"{dev:.1e}")
        return matrices[key]

    results = []
    for name, out_modes, in_modes in cases:
        W = get_matrix(math.prod(out_modes), math.prod(in_modes), 0)
        r = run_case(name, out_modes, in_modes, W, args)
        print_case(r)
        sys.stdout.flush()
        results.append(r)

    layer = None
    if not args.skip_layer:
        layer_mats = []
        seen: dict[tuple[int, int], int] = {}
        for name, rows, cols in layer_spec:
            index = seen.get((rows, cols), 0)
            seen[(rows, cols)] = index + 1
            om, im = factorize(rows, 5), factorize(cols, 5)
            layer_mats.append((name, get_matrix(rows, cols, index), om, im))
        layer = run_layer(layer_mats, args)
        print(f"\n## one LLaMA-2-7B layer (q, k, v, up, down), N=5 cores (tensornet.factorize), "
              f"rank {args.rank}, tensornet")
        for name, m in layer["per_matrix"].items():
            print(f"  {name:10s} {m['shape'][0]:5d}x{m['shape'][1]:<5d} "
                  f"{str(m['out_modes']):18s} x {str(m['in_modes']):18s} {m['seconds']:8.4f} s")
        print(f"  five matrices    {layer['layer_seconds']:.4f} s (best of "
              f"{len(layer['layer_times'])}, after a warm-up pass)")
        verdict = "PASS" if layer["pass"] else "FAIL"
        print(f"  x{layer['layers']} layers       {layer['projected_seconds']:.2f} s   goal < "
              f"{GOAL_MODEL_SECONDS:g} s: {verdict}")
        if not args.quick:
            by_shape = {tuple(r["shape"]): r["tensorly_seconds"] for r in results}
            est = sum(by_shape.get(tuple(m["shape"]), math.nan)
                      for m in layer["per_matrix"].values())
            layer["tensorly_projected_seconds_estimate"] = est * args.layers
            print(f"  (tensorly, estimated from the cases above: {est:.2f} s per layer, "
                  f"{est * args.layers:.0f} s for {args.layers} layers)")

    print("\n## generation of the test matrices (not timed above)")
    for key, t in generation.items():
        print(f"  {key:18s} {t:7.2f} s")
    env["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    verdicts = [r["pass_speed"] and r["pass_error"] for r in results]
    if layer is not None:
        verdicts.append(layer["pass"])
    overall = all(verdicts)
    return finish(
        "bench_decompose", args, env, overall,
        goals={"speedup_min": GOAL_SPEEDUP, "error_diff_pct_max": GOAL_ERR_DIFF_PCT,
               "model_seconds_max": GOAL_MODEL_SECONDS},
        alpha_note=ALPHA_NOTE, cases=results, layer=layer, generation_seconds=generation,
    )


if __name__ == "__main__":
    sys.exit(main())
