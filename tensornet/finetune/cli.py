"""The fine-tuning subcommands of ``tensornet``: decompose, finetune, compare, demo.

Registered by :func:`tensornet.cli.build_parser`; this is the only module of the package
that prints. Bad input raises :class:`tensornet.cli.UsageError` or a
:class:`tensornet.TensornetError`, which ``tensornet.cli.main`` reports as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cli import UsageError, _positive_int_arg, _print_table, _rank_arg, _rank_list_arg, _tol_arg
from .names import DEFAULT_MODEL_NAME, METHODS

__all__ = ["add_commands"]

RUN_MARKER = "tensornet-run.json"
DEMO_OUT = "runs/demo"

_DATA_HELP = (
    "a JSONL file of your own data instead of the built-in task: one JSON object per line "
    'with string fields "prompt" and "response", e.g. {"prompt": "2 + 3?", "response": '
    '"2 + 3 = 5.\\n#### 5"}; blank lines are skipped; examples are de-duplicated by prompt '
    "and split deterministically (by a hash of the seed and the prompt) into --n-val "
    "validation and --n-test test examples, the rest for training; accuracy compares the "
    "final number (after '####' if present) of the generated and the reference response"
)


# --------------------------------------------------------------------------- shared helpers


def _quiet() -> None:
    """Silence library chatter (weight-loading bars, deprecation warnings) on the terminal."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _threads(args: argparse.Namespace) -> None:
    _check_model(args.model)
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _check_model(model: str | None) -> None:
    """Fail fast (before torch is imported) on a MODEL that is neither built in nor a folder."""
    if model is None or model == DEFAULT_MODEL_NAME:
        return
    if not (Path(model) / "config.json").is_file():
        why = "no such folder" if not Path(model).is_dir() else "the folder has no config.json"
        raise UsageError(
            f"argument MODEL: {model!r} is not a local Hugging Face model folder ({why}); "
            f"give a folder with config.json, or omit MODEL for the built-in "
            f"{DEFAULT_MODEL_NAME}"
        )


def _load(model: str | None, dtype: str = "float32") -> tuple[Any, Any]:
    import torch

    from ..adapters import load_pretrained

    return load_pretrained(model, dtype=getattr(torch, dtype))


def _model_name(model: str | None) -> str:
    return DEFAULT_MODEL_NAME if model is None else os.fspath(model)


def _check_out(out: Path, *, overwrite: bool, resume: bool | None = None) -> None:
    """Refuse a folder that holds another run unless ``overwrite`` (or ``resume``)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} exists and is not a folder")
    if not resume and not overwrite and out.is_dir() and any(out.iterdir()):
        hint = "--resume to continue it, " if resume is not None else ""
        raise UsageError(
            f"argument --out: {out} already holds another run; pass --overwrite to "
            f"replace it (or {hint}or another --out)"
        )


def _prepare_out(out: Path, *, overwrite: bool, resume: bool | None = None) -> None:
    """:func:`_check_out`, then empty a previous run's folder (``overwrite``) and mark it."""
    _check_out(out, overwrite=overwrite, resume=resume)
    if resume:
        return
    if out.is_dir() and any(out.iterdir()):
        if (out / RUN_MARKER).is_file():
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text(json.dumps({"argv": sys.argv[1:], "time": time.time()}))


def _splits(args: argparse.Namespace) -> Any:
    from .tasks import arithmetic_splits, load_jsonl, split_examples

    if args.data:
        return split_examples(load_jsonl(args.data), validation=args.n_val, test=args.n_test,
                              seed=args.data_seed)
    return arithmetic_splits(args.n_train, args.n_val, args.n_test, seed=args.data_seed,
                             max_steps=args.max_reasoning_steps)


def _options(args: argparse.Namespace, seed: int) -> Any:
    from .methods import MethodOptions

    return MethodOptions(rank=args.rank, num_cores=args.num_cores, lora_rank=args.lora_rank,
                         pissa_rank=args.pissa_rank, target_modules=tuple(args.targets),
                         seed=seed)


def _train_config(args: argparse.Namespace, lr: float, seed: int) -> Any:
    from .training import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr,
                       max_length=args.max_length, eval_every=args.eval_every,
                       checkpoint_every=getattr(args, "checkpoint_every", 0), seed=seed)


class _Progress:
    """tqdm bars with the running loss, driven by the training callbacks."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.label = ""
        self.postfix: dict[str, str] = {}

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "run":
            self.label = f"{info['method']} seed {info['seed']}"
            if not self.enabled:
                print(f"  {self.label}: lr {info['lr']:g}", flush=True)
        elif event == "start" and self.enabled:
            from tqdm.auto import tqdm

            self.postfix = {}
            self.bar = tqdm(total=info["steps"], initial=info["step"], unit="step",
                            desc=self.label or "training", dynamic_ncols=True, leave=True)
        elif event == "step" and self.bar is not None:
            self.bar.update(1)
            self.postfix["loss"] = f"{info['loss']:.3f}"
            self.bar.set_postfix(self.postfix, refresh=False)
        elif event == "eval" and self.bar is not None:
            self.postfix["val"] = f"{info['val_loss']:.3f}"
            self.bar.set_postfix(self.postfix)
        elif event == "run_done":
            self.close()
            print(f"  {self.label}: best val loss {info['best_val_loss']:.4f} (step "
                  f"{info['best_step']}), test accuracy {info['test_accuracy']:.3f}, "
                  f"{info['step_time_s']:.2f} s/step", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _methods_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad) or repr(text)}; choose from {', '.join(METHODS)}"
        )
    return names


def _int_list_arg(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of ints; got {text!r}")
    return values


def _targets_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"must name at least one module; got {text!r}")
    return names


# --------------------------------------------------------------------------- decompose


def _print_decomposition(report: Any, *, full: bool) -> None:
    if full:
        rows = [
            [lay.name, f"{lay.out_features}x{lay.in_features}", "x".join(map(str, lay.out_modes)),
             "x".join(map(str, lay.in_modes)), "-".join(map(str, lay.ranks)),
             f"{lay.num_params:,}", f"{lay.relative_error:.4f}"]
            for lay in report.layers
        ]
        _print_table(["layer", "shape", "out modes", "in modes", "ranks", "params",
                      "rel. error"], rows)
        print()
    by_kind: dict[str, list[Any]] = {}
    for lay in report.layers:
        by_kind.setdefault(lay.kind, []).append(lay)
    rows = []
    for kind, lays in by_kind.items():
        first, errs = lays[0], [x.relative_error for x in lays]
        rows.append([
            kind, str(len(lays)), f"{first.out_features}x{first.in_features}",
            "x".join(map(str, first.out_modes)), "x".join(map(str, first.in_modes)),
            "-".join(map(str, first.ranks)), f"{first.num_params:,}",
            f"{sum(errs) / len(errs):.4f}", f"{min(errs):.4f}", f"{max(errs):.4f}",
        ])
    _print_table(["kind", "layers", "shape", "out modes", "in modes", "ranks", "params/layer",
                  "mean err", "min err", "max err"], rows)
    share = 100 * report.mpo_params / report.total_params if report.total_params else 0
    print(f"\n{report.mpo_params:,} MPO parameters in {len(report.layers)} layers "
          f"({share:.3f}% of the model's {report.total_params:,})")
    if report.sweep:
        ranks = [r for r, _, _ in next(iter(report.sweep.values()))]
        print("\nerror vs rank (first layer of each kind):")
        _print_table(["kind", *[f"R={r}" for r in ranks]],
                     [[k, *[f"{e:.4f}" for _, _, e in pts]] for k, pts in report.sweep.items()])


def _decompose(args: argparse.Namespace, model: Any, out: Path, *, full: bool) -> Any:
    from .analysis import decompose_model, write_report

    report = decompose_model(
        model, model_name=_model_name(args.model), num_cores=args.num_cores, rank=args.rank,
        tol=args.tol, target_modules=args.targets, sweep_ranks=args.sweep_ranks,
    )
    rank = "full" if args.rank is None else args.rank
    tol = "" if args.tol is None else f", tol={args.tol:g}"
    print(f"MPO decomposition of {report.model}: {len(report.layers)} target layers, "
          f"N={args.num_cores}, R={rank}{tol}; W is (out_features, in_features)\n")
    _print_decomposition(report, full=full)
    paths = write_report(report, out)
    print("\nfiles: " + ", ".join(str(p) for p in paths.values()))
    return report


def _cmd_decompose(args: argparse.Namespace) -> int:
    _quiet()
    _threads(args)
    out = Path(args.out)
    model, _ = _load(args.model, args.dtype)
    _decompose(args, model, out, full=True)
    return 0


# --------------------------------------------------------------------------- finetune


def _warn_low_precision_full(methods: Sequence[str], dtype: str) -> None:
    """Full fine-tuning in bfloat16 updates the weights in bfloat16: say what that costs."""
    if "full" in methods and dtype == "bfloat16":
        print("tensornet: warning: full fine-tuning with --dtype bfloat16 keeps no float32 "
              "copy of the weights; AdamW updates smaller than bfloat16's resolution "
              "(~0.4% of a weight) are lost at small learning rates. Use --dtype float32 "
              "for a faithful full fine-tuning baseline.", file=sys.stderr, flush=True)


def _cmd_finetune(args: argparse.Namespace) -> int:
    _quiet()
    _threads(args)
    from .io import write_text_atomic
    from .methods import DEFAULT_LR, build_method
    from .training import CHECKPOINT_FILE, evaluate_accuracy, train

    out = Path(args.out)
    if args.resume and not (out / CHECKPOINT_FILE).is_file():
        raise UsageError(f"argument --resume: no checkpoint at {out / CHECKPOINT_FILE} "
                         f"(train with --checkpoint-every N first)")
    _check_out(out, overwrite=args.overwrite, resume=args.resume)
    splits = _splits(args)
    _warn_low_precision_full([args.method], args.dtype)
    model, tokenizer = _load(args.model, args.dtype)
    _prepare_out(out, overwrite=args.overwrite, resume=args.resume)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    t0 = time.perf_counter()
    built = build_method(model, args.method, _options(args, args.seed))
    print(f"{args.method} on {_model_name(args.model)}: {built.trainable_params:,} trainable "
          f"parameters ({100 * built.trainable_share:.3f}% of {built.total_params:,}); "
          f"lr {lr:g}, {args.steps} steps of {args.batch_size}; data {splits.sizes()}",
          flush=True)
    progress = _Progress(not args.no_progress)
    try:
        result = train(built, tokenizer, splits.train, splits.validation,
                       _train_config(args, lr, args.seed), out, resume=args.resume,
                       callback=progress)
    except KeyboardInterrupt:
        progress.close()
        where = ("; continue from the last checkpoint with the same command and --resume"
                 if (out / CHECKPOINT_FILE).is_file() else " (no checkpoint was written)")
        print(f"tensornet finetune: interrupted{where}", file=sys.stderr)
        return 130
    finally:
        progress.close()
    acc, preds = evaluate_accuracy(built.model, tokenizer, splits.test,
                                   max_new_tokens=args.max_new_tokens)
    record = {**result.to_dict(), "lr": lr, "seed": args.seed, "test_accuracy": acc,
              "test_predictions": preds, "adapter": str(out / "adapter"),
              "model": _model_name(args.model), "wall_s": time.perf_counter() - t0}
    write_text_atomic(out / "result.json", json.dumps(record, indent=2) + "\n")
    resumed = "" if result.resumed_from is None else f" (resumed from step {result.resumed_from})"
    print(f"\nsummary{resumed}:")
    print(f"  best validation loss  {result.best_val_loss:.4f} at step {result.best_step} "
          f"(final {result.final_val_loss:.4f}); kept: the best")
    print(f"  test accuracy         {acc:.3f} on {len(splits.test)} questions")
    print(f"  step time             {result.step_time_s:.2f} s; peak memory "
          f"{result.peak_memory_bytes / 2**20:.0f} MiB ({result.memory_kind})")
    print(f"  adapter               {out / 'adapter'}")
    print(f"  results               {out / 'result.json'}")
    return 0


# --------------------------------------------------------------------------- compare


def _compare(args: argparse.Namespace, out: Path, methods: Sequence[str],
             seeds: Sequence[int]) -> dict[str, Any]:
    from .compare import run_compare

    splits = _splits(args)
    _warn_low_precision_full(methods, args.dtype)
    lr = {m: args.lr for m in methods} if args.lr is not None else None
    print(f"comparing {', '.join(methods)} with seeds {', '.join(map(str, seeds))}: "
          f"{args.steps} steps of {args.batch_size}, data {splits.sizes()}", flush=True)
    progress = _Progress(not args.no_progress)
    try:
        results = run_compare(
            lambda: _load(args.model, args.dtype), methods, seeds, splits,
            _train_config(args, 1e-4, seeds[0]), out, options=_options(args, seeds[0]),
            lr=lr, max_new_tokens=args.max_new_tokens, callback=progress,
        )
    finally:
        progress.close()
    from .compare import markdown_table

    print("\n" + markdown_table(results["summary"]))
    print("\nfiles: " + ", ".join(results["files"].values()))
    return results


def _cmd_compare(args: argparse.Namespace) -> int:
    _quiet()
    _threads(args)
    out = Path(args.out)
    _check_out(out, overwrite=args.overwrite)
    _splits(args)  # bad data fails before any output is written
    _load(args.model, args.dtype)  # and so does a bad MODEL
    _prepare_out(out, overwrite=args.overwrite)
    _compare(args, out, args.methods, args.seeds)
    return 0


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    _quiet()
    _threads(args)
    import torch
    from peft import PeftModel

    from .tasks import format_prompt

    start = time.perf_counter()
    out = Path(args.out)
    _prepare_out(out, overwrite=args.overwrite or args.out == DEMO_OUT)
    print("== 1/3 decomposition report ==", flush=True)
    model, _ = _load(args.model)  # decomposed at float32, as `tensornet decompose` does
    _decompose(args, model, out / "decompose", full=False)
    del model
    print(f"({time.perf_counter() - start:.0f} s)\n\n== 2/3 comparison on the built-in "
          f"arithmetic task ==", flush=True)
    results = _compare(args, out / "compare", args.methods, [args.seed])
    print(f"({time.perf_counter() - start:.0f} s)\n\n== 3/3 the saved DoTA adapter, loaded "
          f"into a fresh model ==", flush=True)
    run = next((r for r in results["runs"] if r["method"] == "dota"), None)
    if run is not None:
        base, tokenizer = _load(args.model, args.dtype)
        fresh = PeftModel.from_pretrained(base, run["adapter"])  # exact: T and T_init from file
        splits = _splits(args)
        ex = splits.test[0]
        enc = tokenizer(format_prompt(tokenizer, ex.prompt), return_tensors="pt",
                        add_special_tokens=False)
        with torch.no_grad():
            gen = fresh.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"adapter:  {run['adapter']}\nquestion: {ex.prompt}\nanswer:   "
              f"{answer.strip()}\nexpected: {ex.response.splitlines()[-1]}")
    print(f"\nplots and files under {out}/:")
    for p in sorted(out.rglob("*")):
        if p.suffix in (".png", ".md", ".json", ".csv") and p.name != RUN_MARKER \
                and "seed" not in p.parent.name and p.parent.name != "adapter":
            print(f"  {p}")
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s")
    return 0


# --------------------------------------------------------------------------- parsers


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a local Hugging Face model folder (with config.json); default: the "
                   "built-in offline SmolLM2-135M-Instruct")
    p.add_argument("--targets", type=_targets_arg, default=list(_targets()),
                   metavar="NAME,...", help="layers to adapt (default: "
                   "q_proj,k_proj,v_proj,up_proj,down_proj, the paper's)")
    p.add_argument("--num-cores", type=_positive_int_arg, default=5, metavar="N",
                   help="MPO cores N (default: 5)")
    p.add_argument("--threads", type=_positive_int_arg, default=None, metavar="T",
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the model's weights (the paper trains in bf16; default: "
                   "float32)")


def _targets() -> tuple[str, ...]:
    return ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def _add_decompose_args(p: argparse.ArgumentParser, *, with_rank: bool = True) -> None:
    if with_rank:
        p.add_argument("--rank", type=_rank_arg, default=16, metavar="R",
                       help="rank cap R of every bond, or 'full' (default: 16)")
    p.add_argument("--tol", type=_tol_arg, default=None, metavar="EPS",
                   help="relative error target in (0, 1), the rank cap still applies")
    p.add_argument("--sweep-ranks", type=_rank_list_arg, default=(4, 8, 16, 32, 64),
                   metavar="R,R,...", help="ranks of the error-vs-rank plot (default: "
                   "4,8,16,32,64)")


def _add_train_args(p: argparse.ArgumentParser, *, steps: int, n_train: int, n_val: int,
                    n_test: int, out: str, max_length: int = 256,
                    max_new_tokens: int = 64, max_steps: int = 4, eval_every: int = 10) -> None:
    p.add_argument("--task", choices=["arithmetic"], default="arithmetic",
                   help="built-in task: GSM8K-style word problems of 2-4 steps, answer "
                   "'#### N', generated from --data-seed (default)")
    p.add_argument("--data", default=None, metavar="FILE.jsonl", help=_DATA_HELP)
    p.add_argument("--n-train", type=_positive_int_arg, default=n_train, metavar="K",
                   help=f"training problems of the built-in task (default: {n_train})")
    p.add_argument("--n-val", type=_positive_int_arg, default=n_val, metavar="K",
                   help=f"validation examples (default: {n_val})")
    p.add_argument("--n-test", type=_positive_int_arg, default=n_test, metavar="K",
                   help=f"test examples for the accuracy (default: {n_test})")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data (default: 0)")
    p.add_argument("--max-reasoning-steps", type=int, choices=[2, 3, 4], default=max_steps,
                   help=f"most steps per built-in problem (default: {max_steps})")
    p.add_argument("--rank", type=_positive_int_arg, default=16, metavar="R",
                   help="rank of the tensor adapters: DoTA's R, LoTR's and LoRTA's r (default: 16)")
    p.add_argument("--lora-rank", type=_positive_int_arg, default=32, metavar="r",
                   help="LoRA/QLoRA rank, alpha = r (default: 32)")
    p.add_argument("--pissa-rank", type=_positive_int_arg, default=16, metavar="r",
                   help="PiSSA rank, alpha = r (default: 16)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the "
                   "paper's per method: dota 3e-4, lora 3e-4, pissa 1e-4, qdota 1e-4, "
                   "qlora 1e-5, full 1e-5; lotr and lorta 3e-4, not from the paper)")
    p.add_argument("--steps", type=_positive_int_arg, default=steps,
                   help=f"optimizer steps (default: {steps})")
    p.add_argument("--batch-size", type=_positive_int_arg, default=4, help="default: 4")
    p.add_argument("--max-length", type=_positive_int_arg, default=max_length,
                   help=f"tokens per example (default: {max_length})")
    p.add_argument("--eval-every", type=_positive_int_arg, default=eval_every, metavar="K",
                   help=f"validation loss every K steps (default: {eval_every})")
    p.add_argument("--max-new-tokens", type=_positive_int_arg, default=max_new_tokens,
                   help=f"generation budget for test accuracy (default: {max_new_tokens})")
    p.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default: {out})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that holds another run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_commands(sub: Any) -> None:
    """Register ``decompose``, ``finetune``, ``compare`` and ``demo`` on ``sub``."""
    dec = sub.add_parser("decompose", help="MPO report of a causal LM's target layers",
                         description="For every target layer: modes, ranks, parameters and "
                         "relative reconstruction error at N and R (or --tol); a table, "
                         "decompose.json, decompose.csv and error_vs_rank.png.")
    _add_model(dec)
    _add_decompose_args(dec)
    dec.add_argument("--out", default="runs/decompose", metavar="DIR",
                     help="folder for the JSON, CSV and plot (default: runs/decompose)")
    dec.set_defaults(func=_cmd_decompose)

    ft = sub.add_parser("finetune", help="fine-tune with one method",
                        description="Fine-tune with the DoTA paper's recipe (AdamW, cosine "
                        "schedule, warmup ratio 0.03, no dropout), keep the best model by "
                        "validation loss, save its adapter and report test accuracy.")
    _add_model(ft)
    ft.add_argument("--method", required=True, choices=METHODS, metavar="METHOD",
                    help=f"one of {', '.join(METHODS)}")
    _add_train_args(ft, steps=100, n_train=800, n_val=64, n_test=50, out="runs/finetune")
    ft.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    ft.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                    help="write a resumable checkpoint every K steps (default: 0, never)")
    ft.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint")
    ft.set_defaults(func=_cmd_finetune)

    cmp_ = sub.add_parser("compare", help="compare methods on the same data, budget, seeds",
                          description="Train every method with every seed on the same data "
                          "and budget; results.json, results.md and two PNG plots.")
    _add_model(cmp_)
    cmp_.add_argument("--methods", type=_methods_arg, default=["dota", "dota-random", "lora"],
                      metavar="A,B,...", help=f"methods, from {', '.join(METHODS)} "
                      "(default: dota,dota-random,lora)")
    cmp_.add_argument("--seeds", type=_int_list_arg, default=[0, 1, 2], metavar="S,S,...",
                      help="seeds (default: 0,1,2, as the paper)")
    _add_train_args(cmp_, steps=100, n_train=800, n_val=64, n_test=50, out="runs/compare")
    cmp_.set_defaults(func=_cmd_compare)

    demo = sub.add_parser("demo", help="decomposition report, a short DoTA/LoRA comparison "
                          "and a saved adapter answering a question (SmolLM2-135M, < 10 min)",
                          description="The decomposition report of SmolLM2-135M-Instruct, "
                          "a short comparison of DoTA, DoTA-Random and LoRA on the built-in "
                          "arithmetic task, then the saved DoTA adapter loaded into a fresh "
                          "model answers a test question.")
    _add_model(demo)
    _add_decompose_args(demo, with_rank=False)  # --rank is DoTA's R, for both parts
    demo.set_defaults(sweep_ranks=(4, 8, 16, 32), func=_cmd_demo)
    demo.add_argument("--methods", type=_methods_arg, default=["dota", "dota-random", "lora"],
                      metavar="A,B,...", help="methods (default: dota,dota-random,lora)")
    demo.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    _add_train_args(demo, steps=20, n_train=400, n_val=8, n_test=10, out=DEMO_OUT,
                    max_length=128, max_new_tokens=32, max_steps=3, eval_every=5)
    demo.set_defaults(dtype="bfloat16", threads=1)
