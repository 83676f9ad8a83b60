"""tensornet.finetune: the arithmetic task, JSONL data, methods, Trainer runs, resume, compare, CLI.

Everything runs on ``tiny_llama`` with a tiny byte-level BPE tokenizer trained in-process
(deterministic, 128 tokens), so the whole file takes well under a minute.
"""

import json
import math
import random
import re
import subprocess
import sys

import pytest
import torch
from tiny_tokenizer import tiny_tokenizer

from tensornet.adapters import tiny_llama
from tensornet.cli import main
from tensornet.finetune import (
    DataError,
    Example,
    MethodOptions,
    TrainConfig,
    arithmetic_splits,
    build_method,
    extract_answer,
    load_jsonl,
    run_compare,
    split_examples,
    train,
)
from tensornet.finetune.tasks import IGNORE_INDEX, arithmetic_problem, encode_example

TINY_OPTS = MethodOptions(rank=4, num_cores=3, lora_rank=4, pissa_rank=4)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def splits():
    return arithmetic_splits(24, 8, 4, seed=0)


def _config(**kw):
    base = dict(steps=5, batch_size=4, max_length=96, eval_every=5, seed=0, lr=1e-2)
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------- data


def test_arithmetic_is_deterministic_and_disjoint():
    a = arithmetic_splits(200, 50, 50, seed=3)
    assert a == arithmetic_splits(200, 50, 50, seed=3)
    assert a != arithmetic_splits(200, 50, 50, seed=4)
    prompts = [{e.prompt for e in part} for part in (a.train, a.validation, a.test)]
    assert sum(map(len, prompts)) == 300  # no duplicate inside a split either
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_arithmetic_answers_are_correct():
    rng = random.Random(7)
    for _ in range(300):
        ex = arithmetic_problem(rng)
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", ex.response)
        assert 2 <= len(steps) <= 4
        value = int(re.search(r"has (\d+) ", ex.prompt).group(1))
        for a, op, b, c in steps:
            assert int(a) == value
            value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
            assert value == int(c) and value > 0
        assert ex.answer == str(value)
        assert ex.response.endswith(f"\n#### {value}")
        assert extract_answer(ex.response) == ex.answer


def test_extract_answer():
    assert extract_answer("3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,200") == "1200"
    assert extract_answer("#### -3.0 then 9") == "-3"
    assert extract_answer("it is 12, no 13") == "13"
    assert extract_answer("nothing") is None


def test_prompt_is_masked(tokenizer, splits):
    ex = splits.train[0]
    enc = encode_example(tokenizer, ex, max_length=512)
    n_masked = sum(1 for x in enc["labels"] if x == IGNORE_INDEX)
    assert n_masked > 0
    response = enc["input_ids"][n_masked:]
    assert response == enc["labels"][n_masked:]
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response, skip_special_tokens=True) == ex.response


def test_jsonl_loader_and_split(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a\n#### {i}"} for i in range(20)]
    rows.append(rows[0])  # a duplicate prompt is dropped
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = load_jsonl(path)
    assert len(examples) == 21 and examples[3].answer == "3"
    s = split_examples(examples, validation=0.2, test=2, seed=1)
    assert s.sizes() == {"train": 14, "validation": 4, "test": 2}
    assert s == split_examples(list(reversed(examples)), validation=0.2, test=2, seed=1)
    names = [{e.prompt for e in p} for p in (s.train, s.validation, s.test)]
    assert len(set.union(*names)) == 20


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a", "b"]', "line 2: expected a JSON object"),
        ('{"prompt": "q"}', "line 2: field 'response'"),
        ('{"prompt": "", "response": "r"}', "line 2: field 'prompt'"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "response": "r"}\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(needle)):
        load_jsonl(path)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["dota", "lora"])
def test_short_finetune_lowers_loss_and_saves(method, tokenizer, splits, tmp_path):
    built = build_method(tiny_llama(), method, TINY_OPTS)
    assert 0 < built.trainable_params < built.total_params
    result = train(built, tokenizer, splits.train, splits.validation, _config(steps=6),
                   tmp_path)
    losses = [loss for _, loss in result.train_loss]
    assert len(losses) == 6
    assert min(losses[-2:]) < losses[0]
    assert result.best_val_loss < result.val_loss[0][1]  # step 0 is the untrained model
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()  # peft's format, both methods
    assert not (adapter / "model.safetensors").exists()  # adapter-only
    from peft import PeftModel

    again = PeftModel.from_pretrained(tiny_llama(), adapter)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, built.model(input_ids=ids).logits)


def _trainable(built):
    return {n: p.detach().clone() for n, p in built.trainable_named_parameters()}


@pytest.mark.parametrize("method", ["dota-random", "lora"])
def test_resume_reaches_the_same_parameters(method, tokenizer, splits, tmp_path):
    cfg = _config(steps=6, eval_every=2, checkpoint_every=2, batch_size=3)
    full = build_method(tiny_llama(), method, TINY_OPTS)
    ref = train(full, tokenizer, splits.train, splits.validation, cfg, tmp_path / "a")

    class Interrupt(Exception):
        pass

    def stop_at_5(event, info):
        if event == "step" and info["step"] == 5:
            raise Interrupt

    first = build_method(tiny_llama(), method, TINY_OPTS)
    with pytest.raises(Interrupt):
        train(first, tokenizer, splits.train, splits.validation, cfg, tmp_path / "b",
              callback=stop_at_5)
    again = build_method(tiny_llama(), method, MethodOptions(**{**TINY_OPTS.__dict__, "seed": 9}))
    resumed = train(again, tokenizer, splits.train, splits.validation, cfg, tmp_path / "b",
                    resume=True)
    assert resumed.resumed_from == 4
    assert resumed.train_loss == ref.train_loss
    assert resumed.val_loss == ref.val_loss
    a, b = _trainable(full), _trainable(again)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_compare_writes_results_table_and_plots(tokenizer, splits, tmp_path):
    def load(method):
        return tiny_llama(), tokenizer

    results = run_compare(load, ["dota", "lora"], [0, 1], splits,
                          _config(steps=2, eval_every=1), tmp_path, options=TINY_OPTS,
                          max_new_tokens=8)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["summary"]] == ["dota", "lora"]
    assert len(saved["runs"]) == 4 and saved["runs"][0]["lr"] == 3e-4
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in saved["runs"])
    assert all(r["peak_memory_bytes"] > 0 for r in saved["runs"])
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 4 and "| dota |" in table and "±" in table
    for png in ("val_loss_vs_step.png", "accuracy_vs_params.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert results["summary"][0]["trainable_params"] > 0


def test_every_method_of_a_plot_has_its_own_style():
    # eleven methods in the experiment: the tenth color repeats the first, so a line's
    # style must tell them apart (lorta once shared dota's blue solid line)
    from tensornet.finetune.compare import plot_style

    styles = [plot_style(i) for i in range(40)]
    assert len(set(styles)) == 40
    assert plot_style(0)[0] == "C0" and plot_style(10)[0] == "C0"  # tab10, then ...
    assert plot_style(0)[1:] != plot_style(10)[1:]  # ... another line style and marker


def test_build_method_rejects_bad_shapes():
    from tensornet import TensornetError

    model = tiny_llama()
    with pytest.raises(TensornetError):
        build_method(model, "dota", MethodOptions(num_cores=9))
    with pytest.raises(TensornetError, match="method"):
        build_method(model, "nope")


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _one_error_line(capsys, code):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_cli_finetune_and_resume_flags(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", str(model_dir), "--method", "lora", "--lora-rank", "4", "--steps", "4",
            "--batch-size", "2", "--max-length", "96", "--eval-every", "2",
            "--checkpoint-every", "2", "--n-train", "16", "--n-val", "4", "--n-test", "2",
            "--max-new-tokens", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "best validation loss" in text
    summary = json.loads((out / "result.json").read_text())
    assert summary["method"] == "lora" and summary["lr"] == 3e-4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # the folder holds a run: refused without --overwrite or --resume
    err = _one_error_line(capsys, main(argv))
    assert "--overwrite" in err
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["finetune", "--method", "nope"], "--method"),
        (["finetune", "/no/such/model", "--method", "dota"], "/no/such/model"),
        (["finetune", "MODEL", "--method", "dota", "--num-cores", "9"], "num_cores=9"),
        (["finetune", "MODEL", "--method", "dota", "--data", "BAD"], "cannot be read as JSON"),
        (["compare", "MODEL", "--methods", "dota,nope"], "nope"),
        (["decompose", "MODEL", "--num-cores", "9"], "9"),
        (["finetune", "MODEL", "--method", "lora", "--resume", "--out", "EMPTY"], "--resume"),
    ],
)
def test_cli_bad_input_one_line(argv, needle, model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "r"}\n{oops\n')
    argv = [
        {"MODEL": str(model_dir), "BAD": str(bad), "EMPTY": str(tmp_path / "e")}.get(a, a)
        for a in argv
    ]
    err = _one_error_line(capsys, main([*argv, "--out", str(tmp_path / "o")]
                                       if "--out" not in argv else argv))
    assert needle in err


def test_cli_decompose_writes_table_json_csv_png(model_dir, tmp_path, capsys):
    assert main(["decompose", str(model_dir), "--num-cores", "3", "--rank", "4",
                 "--sweep-ranks", "2,4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out
    rows = json.loads((tmp_path / "decompose.json").read_text())["layers"]
    assert len(rows) == 10 and all(0 <= r["relative_error"] <= 1 for r in rows)
    assert (tmp_path / "decompose.csv").read_text().count("\n") == 11
    assert (tmp_path / "error_vs_rank.png").is_file()


def test_cli_bad_input_in_a_subprocess_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "tensornet", "finetune", "--method", "qlora", "/no/such/dir"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_trainconfig_validates():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    assert not math.isnan(TrainConfig().lr)
    assert Example("p", "r").answer is None


@pytest.mark.parametrize("method", ["dota", "dota-random", "qdota", "lotr", "lorta", "lora",
                                    "pissa", "qlora", "full"])
def test_every_method_trains_and_saves(method, tokenizer, splits, tmp_path):
    built = build_method(tiny_llama(), method, TINY_OPTS)
    before = _trainable(built)
    assert 0 < built.trainable_params <= built.total_params
    assert sum(p.numel() for p in before.values()) == built.trainable_params
    result = train(built, tokenizer, splits.train, splits.validation[:2],
                   _config(steps=2, eval_every=2, lr=1e-3), tmp_path)
    assert all(math.isfinite(loss) for _, loss in result.train_loss)
    after = _trainable(built)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert any((tmp_path / "adapter").iterdir())


def test_accuracy_is_not_a_number_when_the_answers_are_not_numbers(tokenizer):
    # free-text responses have no final number to compare: "n/a", not "0.000"
    from tensornet.finetune.evaluate import evaluate_accuracy
    from tensornet.finetune.tasks import Example

    model = tiny_llama()
    texts = [Example("Name a colour.", "blue", None), Example("Say hi.", "hello", None)]
    acc, preds = evaluate_accuracy(model, tokenizer, texts, max_new_tokens=2)
    assert math.isnan(acc) and len(preds) == 2
    mixed = [*texts, Example("What is 1 + 1?", "2", 2.0)]
    acc, _ = evaluate_accuracy(model, tokenizer, mixed, max_new_tokens=2)
    assert acc in (0.0, 1.0)  # scored on the one example with a number
