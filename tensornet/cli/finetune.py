"""``tensornet finetune``, ``compare`` and ``demo``: the main job on transformers' Trainer.

Bad input raises :class:`tensornet.errors.UsageError` (or another
:class:`tensornet.TensornetError`), which :func:`tensornet.cli.main` reports as one line.
Under ``torchrun`` / ``accelerate launch`` every process runs the same command; only the
main process (rank 0) writes the run folder and prints, the others wait for it. The run
folder (its checks, marker and run key), ``--resume``'s checks and the progress bars are
:mod:`tensornet.cli._run`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TensornetError, UsageError
from ..finetune.defaults import (
    DEFAULT_LR,
    DEFAULT_OPTIONS,
    METHOD_OPTIONS,
    METHODS,
)
from ..method_table import method_spec
from ._args import (
    device_arg,
    int_list_arg,
    nonnegative_int_arg,
    positive_int_arg,
    seed_arg,
    set_shown_defaults,
)
from ._model import add_model_args, load, model_name, setup
from ._run import (
    RUN_MARKER,
    Progress,
    check_model_arg,
    check_out,
    check_resume,
    data_digest,
    format_accuracy,
    is_main,
    model_digest,
    prepare_out,
    silence_other_ranks,
)
from .decompose import add_decompose_args, decompose

__all__ = ["add_commands", "RUN_MARKER"]

DEMO_OUT = "runs/demo"

_DATA_HELP = (
    "your own data instead of the built-in task: a local .jsonl, .json, .csv or .parquet "
    "file (read with the datasets library) with a prompt and a response column, e.g. "
    '{"prompt": "2 + 3?", "response": "2 + 3 = 5.\\n#### 5"}; examples are de-duplicated '
    "by prompt and split deterministically into --n-val validation and --n-test test "
    "examples, the rest for training; accuracy compares the final number (after '####' "
    "if present) of the generated and the reference response"
)

_OPTION_FLAGS = {"rank": "--rank", "num_cores": "--num-cores", "lora_rank": "--lora-rank",
                 "pissa_rank": "--pissa-rank", "targets": "--targets"}


# --------------------------------------------------------------------------- checks


def resolve_options(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, Any]:
    """The method options of ``args``, defaults filled in; refuse one no method reads."""
    used = {opt for m in methods for opt in METHOD_OPTIONS[m]}
    values = {}
    for opt, flag in _OPTION_FLAGS.items():
        given = getattr(args, opt, None)
        if given is not None and opt not in used:
            readers = [m for m in METHODS if opt in METHOD_OPTIONS[m]]
            what = "method" if len(methods) == 1 else "methods"
            extra = (" (LoRTA adapts q_proj, k_proj, v_proj and o_proj)"
                     if opt == "targets" and "lorta" in methods else "")
            raise UsageError(
                f"argument {flag}: not read by the {what} {', '.join(methods)}{extra}; it "
                f"applies to {', '.join(readers)}; drop it"
            )
        values[opt] = DEFAULT_OPTIONS[opt] if given is None else given
    values["targets"] = tuple(values["targets"])
    return values


def resolve_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` for :class:`~tensornet.finetune.trainer.TrainConfig`.

    ``auto`` is ``cuda`` when torch finds CUDA, else ``cpu``. One process trains on one GPU:
    ``cuda:N`` on GPU N, ``cuda`` on the current one (GPU 0), never on several at once
    (the trainer pins it: ``tensornet.finetune.trainer._one_gpu``); under torchrun /
    accelerate launch each process takes the GPU of its ``LOCAL_RANK``, and ``cuda:N`` is
    refused. Checked here, before anything is loaded or written.
    """
    import torch

    from ..finetune.devices import is_launched

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise UsageError(f"argument --device: {text!r} asked for, but torch finds no CUDA "
                         f"device on this machine; use --device cpu (or auto)")
    if ":" in text:
        index = int(text.split(":", 1)[1])
        if is_launched():
            raise UsageError(f"argument --device: {text!r} under torchrun/accelerate; each "
                             f"process takes the GPU of its LOCAL_RANK, give --device cuda")
        count = torch.cuda.device_count()
        if index >= count:
            raise UsageError(f"argument --device: {text!r}, but this machine has {count} "
                             f"CUDA device(s): cuda:0 to cuda:{count - 1}")
        return f"cuda:{index}"
    return "cuda"


def _precision(args: argparse.Namespace, device: str) -> str:
    if args.dtype == "float16" and device == "cpu":
        raise UsageError("argument --dtype: float16 mixed precision needs a CUDA device (the "
                         "CPU's autocast is bfloat16); use --dtype bfloat16 or float32")
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]


def _load_dtype(method: str, dtype: str) -> str:
    """Full fine-tuning trains every weight: float32 master weights, autocast computes."""
    return "float32" if method_spec(method).kind == "full" else dtype


def _load(model: str | None, dtype: str) -> tuple[Any, Any]:
    """:func:`load`, with whatever the loader raises on a bad folder as one MODEL line."""
    from ..finetune.checks import check_tokenizer

    try:
        loaded, tokenizer = load(model, dtype)
    except (TensornetError, ImportError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any of transformers' errors becomes one line
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
        raise UsageError(f"argument MODEL: cannot load {model_name(model)!r} "
                         f"({type(exc).__name__}: {first[:300]}); check its weights files, "
                         f"or save the model again") from None
    try:
        check_tokenizer(tokenizer, loaded)
    except TensornetError as exc:
        raise UsageError(f"argument MODEL: {model_name(model)}: {exc}") from None
    return loaded, tokenizer


def _check_method(model: Any, method: str, opts: dict[str, Any], seed: int) -> None:
    """:func:`~tensornet.finetune.methods.check_method` as a usage error naming the option."""
    from ..finetune.methods import check_method

    try:
        check_method(model, method, _method_options(opts, seed))
    except TensornetError as exc:
        raise _method_error(method, exc) from None


def _method_error(method: str, exc: Exception) -> UsageError:
    """A method's refusal, prefixed with the option it names (``--method`` if none)."""
    text = str(exc)
    names = {"target_modules": "--targets", "target": "--targets", **_OPTION_FLAGS}
    flag = next((f for o, f in sorted(names.items(), key=lambda kv: -len(kv[0]))
                 if o in text), "--method")
    return UsageError(f"argument {flag}: {method} on this model: {text}")


def _splits(args: argparse.Namespace) -> Any:
    from ..errors import DataError
    from ..finetune.arithmetic import arithmetic_splits
    from ..finetune.datafiles import load_data_file
    from ..finetune.examples import split_examples

    if args.data:
        fields = (args.prompt_field or "prompt", args.response_field or "response")
        if fields[0] == fields[1]:
            flag = "--response-field" if args.response_field else "--prompt-field"
            raise UsageError(f"argument {flag}: the prompt and the response would both be "
                             f"the column {fields[0]!r} (the model would learn to repeat its "
                             f"prompt); name two columns")
        try:
            examples = load_data_file(args.data, prompt_field=fields[0],
                                      response_field=fields[1])
            return split_examples(examples, validation=args.n_val, test=args.n_test,
                                  seed=args.data_seed)
        except DataError as exc:
            raise UsageError(f"argument --data: {exc}") from None
    for flag in ("prompt_field", "response_field"):
        if getattr(args, flag) is not None:
            raise UsageError(f"argument --{flag.replace('_', '-')}: only read with --data "
                             f"FILE (the built-in task has its own fields)")
    return arithmetic_splits(args.n_train, args.n_val, args.n_test, seed=args.data_seed,
                             max_steps=args.max_reasoning_steps)


def _check_max_length(tokenizer: Any, splits: Any, max_length: int) -> None:
    """Refuse a --max-length that leaves a split no response token, before any output."""
    from ..errors import DataError
    from ..finetune.tokens import encode_all

    for name, part in (("training", splits.train), ("validation", splits.validation)):
        try:
            encode_all(tokenizer, part, max_length, split=name)
        except DataError as exc:
            raise UsageError(f"argument --max-length: {exc}") from None


def _method_options(opts: dict[str, Any], seed: int) -> Any:
    from ..finetune.methods import MethodOptions

    return MethodOptions(rank=opts["rank"], num_cores=opts["num_cores"],
                         lora_rank=opts["lora_rank"], pissa_rank=opts["pissa_rank"],
                         target_modules=opts["targets"], seed=seed)


def _train_config(args: argparse.Namespace, lr: float, seed: int, device: str) -> Any:
    from ..finetune.trainer import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr,
                       max_length=args.max_length, eval_every=args.eval_every,
                       checkpoint_every=getattr(args, "checkpoint_every", 0), seed=seed,
                       device=device, precision=_precision(args, device))  # type: ignore[arg-type]


def _methods_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad) or repr(text)}; choose from {', '.join(METHODS)}"
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise argparse.ArgumentTypeError(
            f"lists {', '.join(dup)} more than once; each method trains once per seed"
        )
    return names


# --------------------------------------------------------------------------- finetune


def _cmd_finetune(args: argparse.Namespace) -> int:
    silence_other_ranks()
    setup(args)
    from ..finetune.devices import wait_for_everyone

    device = resolve_device(args.device)
    opts = resolve_options(args, [args.method])
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    cfg = _train_config(args, lr, args.seed, device)
    out = Path(args.out)
    check_out(out, overwrite=args.overwrite, resume=args.resume)
    splits = _splits(args)
    key = {"model": model_digest(args.model), "method": args.method, "options": opts,
           "dtype": args.dtype, "train": cfg.key(), "data": data_digest(splits)}
    key = json.loads(json.dumps(key))  # tuples -> lists, as the marker file holds them
    if args.resume:
        check_resume(out, key)
    model, tokenizer = _load(args.model, _load_dtype(args.method, args.dtype))
    _check_max_length(tokenizer, splits, args.max_length)
    t0 = time.perf_counter()
    from ..finetune.methods import build_method

    # checked against the model's shapes before the adapter is allocated (build_method
    # starts with check_method), and built before --out is written: a method refused for
    # this model (targets, modes, a rank past the layers' sizes) leaves no run marker
    # behind that would block the corrected command
    try:
        built = build_method(model, args.method, _method_options(opts, args.seed))
    except TensornetError as exc:
        raise _method_error(args.method, exc) from None
    wait_for_everyone(device)  # every process has checked --out before rank 0 writes it
    if is_main():
        prepare_out(out, overwrite=args.overwrite, key=key, resume=args.resume)
    print(f"{args.method} on {model_name(args.model)}: {built.trainable_params:,} trainable "
          f"parameters ({100 * built.trainable_share:.3f}% of {built.total_params:,}); "
          f"lr {lr:g}, {args.steps} steps of {args.batch_size} on {device} "
          f"({os.environ.get('WORLD_SIZE', '1')} process(es)); data {splits.sizes()}",
          flush=True)
    progress = Progress(not args.no_progress)
    from ..finetune.trainer import train

    try:
        result = train(built, tokenizer, splits.train, splits.validation, cfg, out,
                       resume=args.resume, callback=progress)
    except KeyboardInterrupt:
        progress.close()
        from ..finetune.callbacks import last_checkpoint

        where = ("; continue from the last checkpoint with the same command and --resume"
                 if last_checkpoint(out) is not None else " (no checkpoint was written)")
        print(f"tensornet finetune: interrupted{where}", file=sys.stderr)
        return 130
    finally:
        progress.close()
    if is_main():
        _finish_finetune(args, built, tokenizer, splits, result, lr, out, t0)
    wait_for_everyone(device)
    return 0


def _finish_finetune(args: argparse.Namespace, built: Any, tokenizer: Any, splits: Any,
                     result: Any, lr: float, out: Path, t0: float) -> None:
    from .._atomic import write_text_atomic
    from ..finetune.evaluate import evaluate_accuracy

    acc, preds = evaluate_accuracy(built.model, tokenizer, splits.test,
                                   max_new_tokens=args.max_new_tokens)
    record = {**result.to_dict(), "lr": lr, "seed": args.seed,
              "test_accuracy": acc if acc == acc else None,  # NaN: none scored
              "test_predictions": preds, "adapter": str(out / "adapter"),
              "model": model_name(args.model), "device": args.device,
              "world_size": int(os.environ.get("WORLD_SIZE", "1")),
              "wall_s": time.perf_counter() - t0}
    write_text_atomic(out / "result.json", json.dumps(record, indent=2) + "\n")
    resumed = "" if result.resumed_from is None else f" (resumed from step {result.resumed_from})"
    print(f"\nsummary{resumed}:")
    print(f"  best validation loss  {result.best_val_loss:.4f} at step {result.best_step} "
          f"(final {result.final_val_loss:.4f}); kept: the best")
    tested = f"on {len(splits.test)} questions" if splits.test else "(--n-test 0)"
    print(f"  test accuracy         {format_accuracy(acc)} {tested}")
    print(f"  step time             {result.step_time_s:.2f} s; peak memory "
          f"{result.peak_memory_bytes / 2**20:.0f} MiB ({result.memory_kind})")
    print(f"  adapter               {out / 'adapter'}")
    print(f"  results               {out / 'result.json'}")


# --------------------------------------------------------------------------- compare


def _compare(args: argparse.Namespace, out: Path, methods: Sequence[str],
             seeds: Sequence[int], opts: dict[str, Any], device: str) -> dict[str, Any]:
    from ..finetune.compare import markdown_table, run_compare

    splits = _splits(args)
    lr = {m: args.lr for m in methods} if args.lr is not None else None
    print(f"comparing {', '.join(methods)} with seeds {', '.join(map(str, seeds))}: "
          f"{args.steps} steps of {args.batch_size} on {device}, data {splits.sizes()}",
          flush=True)
    progress = Progress(not args.no_progress)
    try:
        results = run_compare(
            lambda method: _load(args.model, _load_dtype(method, args.dtype)), methods,
            seeds, splits, _train_config(args, 1e-4, seeds[0], device), out,
            options=_method_options(opts, seeds[0]), lr=lr,
            max_new_tokens=args.max_new_tokens, callback=progress,
        )
    finally:
        progress.close()
    print("\n" + markdown_table(results["summary"]))
    print("\nfiles: " + ", ".join(results["files"].values()))
    return results


def _cmd_compare(args: argparse.Namespace) -> int:
    silence_other_ranks()
    setup(args)
    from ..finetune.devices import wait_for_everyone

    device = resolve_device(args.device)
    opts = resolve_options(args, args.methods)
    _train_config(args, 1e-4, args.seeds[0], device)  # bad settings fail before any output
    out = Path(args.out)
    check_out(out, overwrite=args.overwrite)
    splits = _splits(args)  # and so does bad data
    check_model_arg(args.model)  # and a bad MODEL folder,
    model, tokenizer = _load(args.model, args.dtype)  # one its loader refuses,
    _check_max_length(tokenizer, splits, args.max_length)
    for method in args.methods:  # and a method this model cannot take (targets, ranks)
        _check_method(model, method, opts, args.seeds[0])
    del model
    wait_for_everyone(device)
    if is_main():
        prepare_out(out, overwrite=args.overwrite, key={"methods": args.methods})
    _compare(args, out, args.methods, args.seeds, opts, device)
    return 0


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    setup(args)
    import torch
    from peft import PeftModel

    from ..finetune.tokens import format_prompt

    start = time.perf_counter()
    device = resolve_device(args.device)
    opts = resolve_options(args, args.methods)
    out = Path(args.out)
    overwrite = args.overwrite or args.out == DEMO_OUT
    check_out(out, overwrite=overwrite)
    check_model_arg(args.model)
    model, _ = _load(args.model, "float32")  # decomposed at float32, as `decompose` does
    for method in args.methods:  # refused before --out is written
        _check_method(model, method, opts, args.seed)
    prepare_out(out, overwrite=overwrite, key={"demo": True})
    print("== 1/3 decomposition report ==", flush=True)
    decompose(args, model, out / "decompose", full=False, rank=opts["rank"])
    del model
    print(f"({time.perf_counter() - start:.0f} s)\n\n== 2/3 comparison on the built-in "
          f"arithmetic task ==", flush=True)
    results = _compare(args, out / "compare", args.methods, [args.seed], opts, device)
    print(f"({time.perf_counter() - start:.0f} s)\n\n== 3/3 the saved DoTA adapter, loaded "
          f"into a fresh model ==", flush=True)
    run = next((r for r in results["runs"] if r["method"] == "dota"), None)
    if run is not None:
        base, tokenizer = load(args.model, args.dtype)
        fresh = PeftModel.from_pretrained(base, run["adapter"])  # exact: T and T_init from file
        ex = _splits(args).test[0]
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
                and "seed" not in p.parent.name and p.parent.name != "adapter" \
                and "checkpoint" not in str(p):
            print(f"  {p}")
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s")
    return 0


# --------------------------------------------------------------------------- parsers


def _add_train_args(p: argparse.ArgumentParser, *, steps: int, n_train: int, n_val: int,
                    n_test: int, out: str, max_length: int = 256,
                    max_new_tokens: int = 64, max_steps: int = 4, eval_every: int = 10,
                    with_rank: bool = True) -> None:
    p.add_argument("--task", choices=["arithmetic"], default="arithmetic",
                   help="built-in task: GSM8K-style word problems of 2-4 steps, answer "
                   "'#### N', generated from --data-seed (default)")
    p.add_argument("--data", default=None, metavar="FILE", help=_DATA_HELP)
    p.add_argument("--prompt-field", default=None, metavar="NAME",
                   help="column of --data holding the prompt (default: prompt)")
    p.add_argument("--response-field", default=None, metavar="NAME",
                   help="column of --data holding the response (default: response)")
    p.add_argument("--n-train", type=positive_int_arg, default=n_train, metavar="K",
                   help=f"training problems of the built-in task (default: {n_train})")
    p.add_argument("--n-val", type=positive_int_arg, default=n_val, metavar="K",
                   help=f"validation examples (default: {n_val})")
    p.add_argument("--n-test", type=nonnegative_int_arg, default=n_test, metavar="K",
                   help=f"test examples for the accuracy; 0 for none, e.g. for non-numeric "
                   f"answers (default: {n_test})")
    p.add_argument("--data-seed", type=seed_arg, default=0, help="seed of the data (default: 0)")
    p.add_argument("--max-reasoning-steps", type=int, choices=[2, 3, 4], default=max_steps,
                   help=f"most steps per built-in problem (default: {max_steps})")
    if with_rank:
        p.add_argument("--rank", type=positive_int_arg, default=None, metavar="R",
                       help="rank of the tensor adapters: DoTA's R, LoTR's and LoRTA's r "
                       f"(default: {DEFAULT_OPTIONS['rank']})")
    p.add_argument("--lora-rank", type=positive_int_arg, default=None, metavar="r",
                   help="rank of LoRA, DoRA, QLoRA and QPiSSA, alpha = r (default: "
                   f"{DEFAULT_OPTIONS['lora_rank']})")
    p.add_argument("--pissa-rank", type=positive_int_arg, default=None, metavar="r",
                   help=f"PiSSA rank, alpha = r (default: {DEFAULT_OPTIONS['pissa_rank']})")
    rates = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: "
                   f"the paper's per method: {rates}; lotr, lorta and dora are not from it)")
    p.add_argument("--steps", type=positive_int_arg, default=steps,
                   help=f"optimizer steps (default: {steps})")
    p.add_argument("--batch-size", type=positive_int_arg, default=4,
                   help="examples per step over all processes (default: 4)")
    p.add_argument("--max-length", type=positive_int_arg, default=max_length,
                   help=f"tokens per example (default: {max_length})")
    p.add_argument("--eval-every", type=positive_int_arg, default=eval_every, metavar="K",
                   help=f"validation loss every K steps (default: {eval_every})")
    p.add_argument("--max-new-tokens", type=positive_int_arg, default=max_new_tokens,
                   help=f"generation budget for test accuracy (default: {max_new_tokens})")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda (one GPU: the "
                   "current one, GPU 0) or cuda:N (GPU N alone); for several GPUs run "
                   "under torchrun (default: auto)")
    p.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default: {out})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that holds another run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_commands(sub: Any) -> None:
    """Register ``finetune``, ``compare`` and ``demo`` on ``sub``."""
    ft = sub.add_parser(
        "finetune", help="fine-tune with one method",
        description="Fine-tune on transformers' Trainer with the DoTA paper's recipe "
        "(AdamW, cosine schedule, warmup ratio 0.03, no dropout, mixed precision with "
        "float32 trained weights), keep the best model by validation loss, save its adapter "
        "and report test accuracy. Runs with DDP under `torchrun --nproc-per-node N -m "
        "tensornet finetune ...` or `accelerate launch -m tensornet finetune ...`.")
    add_model_args(ft)
    ft.add_argument("--method", required=True, choices=METHODS, metavar="METHOD",
                    help=f"one of {', '.join(METHODS)}")
    _add_train_args(ft, steps=100, n_train=800, n_val=64, n_test=50, out="runs/finetune")
    ft.add_argument("--seed", type=seed_arg, default=0, help="training seed (default: 0)")
    ft.add_argument("--checkpoint-every", type=nonnegative_int_arg, default=0, metavar="K",
                    help="write a resumable checkpoint (adapter, optimizer and scheduler "
                    "state) every K steps (default: 0, never)")
    ft.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint (the same "
                    "command: another model, method, data or setting is refused)")
    ft.set_defaults(func=_cmd_finetune)

    cmp_ = sub.add_parser("compare", help="compare methods on the same data, budget, seeds",
                          description="Train every method with every seed on the same data "
                          "and budget; results.json, results.md and two PNG plots.")
    add_model_args(cmp_)
    cmp_.add_argument("--methods", type=_methods_arg, default=["dota", "dota-random", "lora"],
                      metavar="A,B,...", help=f"methods, from {', '.join(METHODS)} "
                      "(default: dota,dota-random,lora)")
    cmp_.add_argument("--seeds", type=int_list_arg, default=[0, 1, 2], metavar="S,S,...",
                      help="seeds (default: 0,1,2, as the paper)")
    _add_train_args(cmp_, steps=100, n_train=800, n_val=64, n_test=50, out="runs/compare")
    cmp_.set_defaults(func=_cmd_compare)

    demo = sub.add_parser("demo", help="decomposition report, a short DoTA/LoRA comparison "
                          "and a saved adapter answering a question (SmolLM2-135M, < 10 min)",
                          description="The decomposition report of SmolLM2-135M-Instruct, "
                          "a short comparison of DoTA, DoTA-Random and LoRA on the built-in "
                          "arithmetic task, then the saved DoTA adapter loaded into a fresh "
                          "model answers a test question.")
    add_model_args(demo)
    add_decompose_args(demo, with_rank=False)  # --rank is DoTA's R, for both parts
    demo.set_defaults(func=_cmd_demo)
    demo.add_argument("--methods", type=_methods_arg, default=["dota", "dota-random", "lora"],
                      metavar="A,B,...", help="methods (default: dota,dota-random,lora)")
    demo.add_argument("--seed", type=seed_arg, default=0, help="training seed (default: 0)")
    demo.add_argument("--rank", type=positive_int_arg, default=None, metavar="R",
                      help=f"DoTA's rank R (default: {DEFAULT_OPTIONS['rank']})")
    _add_train_args(demo, steps=20, n_train=400, n_val=8, n_test=10, out=DEMO_OUT,
                    max_length=128, max_new_tokens=32, max_steps=3, eval_every=5,
                    with_rank=False)
    set_shown_defaults(demo, dtype="bfloat16", threads=1, sweep_ranks=(4, 8, 16, 32))
