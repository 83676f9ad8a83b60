"""Runs the user can always resume or rerun (issue 20, point 7).

Every bad model folder, tokenizer, data file, seed and rank gives one line naming the
option and exit code 2, and leaves ``--out`` as it was: nothing is written before every
argument, the model folder and the targets have been checked, so the corrected command
runs in the same folder. ``--resume`` takes the last complete checkpoint, and refuses a
damaged or diverged one and a model folder whose weights changed. All on tiny local
models (LlamaConfig) and a tiny tokenizer.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_tokenizer import tiny_tokenizer

from tensornet.adapters import tiny_llama
from tensornet.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--n-train", "8", "--n-val", "2", "--n-test", "1", "--steps", "1", "--device", "cpu",
         "--no-progress"]
RUN = ["--method", "lora", "--lora-rank", "4", "--steps", "4", "--batch-size", "2",
       "--max-length", "160", "--eval-every", "2", "--checkpoint-every", "2", "--n-train", "8",
       "--n-val", "2", "--n-test", "1", "--max-new-tokens", "2", "--device", "cpu",
       "--no-progress"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Model folders, good and bad, and data files, built once."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        T5Config,
        T5ForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("inputs")
    tok = tiny_tokenizer()

    def folder(name, model, tokenizer=tok):
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return str(path)

    paths = {
        "MODEL": folder("model", tiny_llama()),
        "GPT2": folder("gpt2", GPT2LMHeadModel(GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=256))),
        "T5": folder("t5", T5ForConditionalGeneration(T5Config(
            d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=128))),
        # a tokenizer of 256 tokens on a model of 128 embedding rows
        "BIGTOK": folder("bigtok", tiny_llama(), tiny_tokenizer(vocab_size=256)),
        # a tokenizer with neither a pad nor an EOS token
        "NOPAD": folder("nopad", tiny_llama(), PreTrainedTokenizerFast(
            tokenizer_object=tok.backend_tokenizer, unk_token="<unk>")),
        "TRUNC": folder("trunc", tiny_llama()),
        "BADCONFIG": folder("badconfig", tiny_llama()),
        "NOWEIGHTS": folder("noweights", tiny_llama()),
    }
    weights = root / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "badconfig" / "config.json").write_text('{"model_type": "llama",')
    (root / "noweights" / "model.safetensors").unlink()
    # pickled weights cut short: only the loader can tell
    paths["BIN"] = folder("bin", tiny_llama())
    (root / "bin" / "model.safetensors").unlink()
    pickled = root / "bin" / "pytorch_model.bin"
    torch.save(tiny_llama().state_dict(), pickled)
    pickled.write_bytes(pickled.read_bytes()[: pickled.stat().st_size // 2])
    latin1 = root / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "café 2 + 2?", "response": "#### 4"}\n'.encode("latin-1"))
    extra = root / "extra.csv"
    extra.write_text("prompt,response\n" + "".join(f"q{i},#### {i},x\n" for i in range(20)))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"prompt": f"Name colour {i}.", "response": "blue"})
                            + "\n" for i in range(30)))
    paths.update({"LATIN1": str(latin1), "EXTRA": str(extra), "TEXT": str(text)})
    return paths


def _one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # (a) refused for the model after the marker had been written, blocking a rerun
        (["compare", "MODEL", "--methods", "dota", "--num-cores", "1"], "--num-cores"),
        (["compare", "MODEL", "--methods", "dota", "--num-cores", "7"], "--num-cores"),
        (["compare", "MODEL", "--methods", "lora,dota", "--targets", "embed_tokens"],
         "--targets"),
        (["compare", "MODEL", "--methods", "lora", "--targets", "no_such_layer"], "--targets"),
        (["compare", "GPT2", "--methods", "lora"], "--targets"),
        (["finetune", "GPT2", "--method", "dota"], "--targets"),
        (["finetune", "MODEL", "--method", "dota", "--num-cores", "1"], "--num-cores"),
        # (b) truncated weights: a SafetensorError traceback
        (["finetune", "TRUNC", "--method", "lora"], "argument MODEL"),
        (["compare", "TRUNC", "--methods", "lora"], "argument MODEL"),
        (["finetune", "BIN", "--method", "lora"], "argument MODEL"),
        (["finetune", "BADCONFIG", "--method", "lora"], "argument MODEL"),
        (["finetune", "NOWEIGHTS", "--method", "lora"], "argument MODEL"),
        # (c) not a causal LM: "Unrecognized configuration class"
        (["finetune", "T5", "--method", "lora"], "argument MODEL"),
        # (d) a tokenizer larger than the embedding: IndexError in the forward pass
        (["finetune", "BIGTOK", "--method", "lora"], "argument MODEL"),
        # (e) neither pad nor EOS: a ValueError from the tokenizer at evaluation
        (["finetune", "NOPAD", "--method", "lora"], "argument MODEL"),
        # (f) non-UTF-8 data: a UnicodeDecodeError
        (["finetune", "MODEL", "--method", "lora", "--data", "LATIN1"], "--data"),
        # (g) seeds numpy cannot take
        (["compare", "MODEL", "--methods", "lora", "--seeds", "-1"], "--seeds"),
        (["finetune", "MODEL", "--method", "lora", "--seed", "-1"], "--seed"),
        # (h) ranks past the layers' shapes: refused before anything is allocated
        (["finetune", "MODEL", "--method", "lotr", "--rank", "99999"], "--rank"),
        (["finetune", "MODEL", "--method", "lorta", "--rank", "99999"], "--rank"),
        (["finetune", "MODEL", "--method", "pissa", "--pissa-rank", "1000"], "--pissa-rank"),
        (["finetune", "MODEL", "--method", "lora", "--lora-rank", "99999"], "--lora-rank"),
        (["compare", "MODEL", "--methods", "lora,pissa", "--pissa-rank", "1000"],
         "--pissa-rank"),
        # (l) malformed CSV rows, one column for both fields
        (["finetune", "MODEL", "--method", "lora", "--data", "EXTRA"], "--data"),
        (["finetune", "MODEL", "--method", "lora", "--data", "TEXT", "--response-field",
          "prompt"], "--response-field"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(argv, needle, folders, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [folders.get(a, a) for a in argv]
    err = _one_line(capsys, main([*argv, *SMALL, "--out", str(out)]))
    assert needle in err
    assert not out.exists()  # the corrected command can run in the same folder


def test_a_refused_compare_leaves_the_folder_free_for_the_corrected_command(
        folders, tmp_path, capsys):
    out = tmp_path / "out"
    bad = ["compare", folders["MODEL"], "--methods", "lora", "--seeds", "0", "--lora-rank",
           "4", "--max-length", "160", "--max-new-tokens", "2", *SMALL, "--data",
           folders["TEXT"], "--out", str(out)]
    _one_line(capsys, main([*bad, "--targets", "no_such_layer"]))
    assert main(bad) == 0
    capsys.readouterr()
    # (l) free-text answers: the table says n/a, not an accuracy of 0
    row = (out / "results.md").read_text().splitlines()[-1]
    assert row.split("|")[6].strip() == "n/a", row


def test_free_text_answers_report_accuracy_as_not_available(folders, tmp_path, capsys):
    # (l) no reference answer is a number: "n/a", not "test accuracy 0.000"
    out = tmp_path / "out"
    assert main(["finetune", folders["MODEL"], "--method", "lora", "--lora-rank", "4",
                 "--data", folders["TEXT"], "--n-val", "2", "--n-test", "2", "--steps", "1",
                 "--max-new-tokens", "2", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    assert "test accuracy         n/a on 2 questions" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["test_accuracy"] is None


# --------------------------------------------------------------------------- --resume


@pytest.fixture(scope="module")
def finished_run(folders, tmp_path_factory):
    """A run of 4 steps with checkpoints every 2: only checkpoint-4 is left."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["finetune", folders["MODEL"], *RUN, "--out", str(out)]) == 0
    return out


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_adapter(path):
    tensors = load_file(path)
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path)


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("trainer_state.json", "trainer_state.json"),
        ("optimizer.pt", "optimizer.pt"),
        ("flip optimizer.pt", "optimizer.pt"),
        ("scheduler.pt", "scheduler.pt"),
        ("tensornet_best.pt", "tensornet_best.pt"),
        ("adapter_model.safetensors", "adapter_model.safetensors"),
        ("nan", "NaN"),
    ],
)
def test_resume_refuses_a_damaged_checkpoint(damage, needle, finished_run, folders, tmp_path,
                                             capsys):
    # (i) a JSONDecodeError or torch.load traceback, or a run that went on with NaN losses
    capsys.readouterr()
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4"]
    if damage == "nan":
        _nan_adapter(checkpoint / "adapter_model.safetensors")
    elif damage.startswith("flip "):
        _flip(checkpoint / damage.split()[1])
    else:
        _truncate(checkpoint / damage)
    before = _snapshot(out)
    err = _one_line(capsys, main(["finetune", folders["MODEL"], *RUN, "--out", str(out),
                                  "--resume"]))
    assert "--resume" in err and needle in err and "checkpoint-4" in err
    assert _snapshot(out) == before


def test_resume_skips_partial_checkpoints(finished_run, folders, tmp_path, capsys):
    # (j) a save cut short leaves a folder without the completion marker: never chosen
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "checkpoints" / "checkpoint-6").mkdir()
    partial = out / "checkpoints" / "checkpoint-8"
    shutil.copytree(out / "checkpoints" / "checkpoint-4", partial)
    (partial / "tensornet_best.pt").unlink()
    capsys.readouterr()
    assert main(["finetune", folders["MODEL"], *RUN, "--out", str(out), "--resume"]) == 0
    assert "resumed from step 4" in capsys.readouterr().out


def test_resume_refuses_a_model_folder_whose_weights_changed(folders, tmp_path, capsys):
    # (k) the run key hashed config.json only: other weights under the same config passed
    model, out = tmp_path / "model", tmp_path / "run"
    shutil.copytree(folders["MODEL"], model)
    argv = ["finetune", str(model), *RUN, "--out", str(out)]
    assert main(argv) == 0
    config = (model / "config.json").read_bytes()
    tiny_llama(seed=1).save_pretrained(model)
    (model / "config.json").write_bytes(config)  # byte for byte the same config
    capsys.readouterr()
    before = _snapshot(out)
    err = _one_line(capsys, main([*argv, "--resume"]))
    assert "--resume" in err and "model" in err
    assert _snapshot(out) == before


def test_a_save_cut_short_leaves_the_previous_checkpoint(folders, tmp_path, monkeypatch):
    # the Trainer's rotation (save_total_limit) deleted checkpoint-2 before checkpoint-4 was
    # marked complete: a run killed in between had no checkpoint left to resume from
    from tensornet.finetune import MethodOptions, TrainConfig, arithmetic_splits, build_method
    from tensornet.finetune.trainer import BEST_FILE, last_checkpoint, train

    real_save = torch.save

    class Killed(Exception):
        pass

    def save(obj, path, *args, **kwargs):
        if str(path).endswith(f"checkpoint-4/{BEST_FILE}.part"):
            raise Killed  # the last file of checkpoint-4 never arrives
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    splits = arithmetic_splits(8, 2, 0, seed=0)
    built = build_method(tiny_llama(), "lora", MethodOptions(lora_rank=4))
    config = TrainConfig(steps=4, batch_size=2, max_length=160, eval_every=2,
                         checkpoint_every=2)
    with pytest.raises(Killed):
        train(built, tiny_tokenizer(), splits.train, splits.validation, config, tmp_path)
    kept = last_checkpoint(tmp_path)
    assert kept is not None and kept.name == "checkpoint-2"
    monkeypatch.setattr(torch, "save", real_save)
    again = build_method(tiny_llama(), "lora", MethodOptions(lora_rank=4))
    result = train(again, tiny_tokenizer(), splits.train, splits.validation, config, tmp_path,
                   resume=True)
    assert result.resumed_from == 2
    # once checkpoint-4 is complete, the older and the partial folders are gone
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-4"]
