"""``tensornet export``: folders that plain transformers / peft load, and refusals first.

References: the adapted PeftModel's logits (the merged folder loaded with
AutoModelForCausalLM must give them), and the conversion error the command reports (the
LoRA folder loaded with plain peft must be within it).
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_tokenizer import save_tiny_model
from transformers import AutoModelForCausalLM

from tensornet.adapters import DoTAConfig, LoTRConfig
from tensornet.cli import main

TARGETS = ["q_proj", "v_proj", "up_proj"]
IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 7]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base"), seed=3)


def _trained(model_dir, folder, config):
    """An adapter whose update is not zero (cores moved as training would), saved."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.save_pretrained(folder)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("config", [
    DoTAConfig(rank=4, num_cores=2, target_modules=TARGETS),
    LoTRConfig(rank=4, target_modules=TARGETS),
], ids=["dota", "lotr"])
def test_export_writes_folders_plain_libraries_load(model_dir, tmp_path, capsys, config):
    adapted = _trained(model_dir, tmp_path / "adapter", config)
    want = _logits(adapted)
    merged, lora = tmp_path / "merged", tmp_path / "lora"
    rc = main(["export", str(tmp_path / "adapter"), str(model_dir), "--merged", str(merged),
               "--lora", str(lora), "--lora-rank", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    # merged: a plain transformers folder with the adapted model's outputs
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("dota" in n or "lotr" in n for n in plain.state_dict())
    torch.testing.assert_close(_logits(plain), want, rtol=1e-5, atol=1e-5)
    # lora: plain peft LoRA, within the reported conversion error of the update
    assert LoraConfig.from_pretrained(str(lora)).r == 2
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                         str(lora)).eval()
    assert "relative error of the conversion at most" in out
    reported = float(out.split("at most ")[1].split()[0])
    base = _logits(AutoModelForCausalLM.from_pretrained(model_dir))
    got = _logits(reloaded)
    assert 0 < reported < 1
    # the logits' change is linear in small updates: the LoRA's change is the adapter's,
    # up to the share of the update the conversion drops (loose factor for nonlinearity)
    assert (got - want).norm() <= 3 * reported * (want - base).norm() + 1e-4
    for layer in ("q_proj", "v_proj", "up_proj"):
        assert layer in out  # the per-layer table


def test_export_keeps_the_full_rank_exactly(model_dir, tmp_path, capsys):
    adapted = _trained(model_dir, tmp_path / "adapter",
                       DoTAConfig(rank=4, num_cores=2, target_modules=TARGETS))
    lora = tmp_path / "lora"
    assert main(["export", str(tmp_path / "adapter"), str(model_dir), "--lora", str(lora),
                 "--lora-rank", "1.0"]) == 0
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                         str(lora)).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(adapted), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def saved(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    _trained(model_dir, folder, DoTAConfig(rank=4, num_cores=2, target_modules=TARGETS))
    return folder


def _lora_adapter(model_dir, folder):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=2, target_modules=TARGETS))
    model.save_pretrained(folder)
    return folder


BAD = [
    ("no-output", lambda a, m, t: [a, m], "nothing to write"),
    ("lora-no-rank", lambda a, m, t: [a, m, "--lora", t / "l"], "--lora-rank"),
    ("rank-no-lora", lambda a, m, t: [a, m, "--merged", t / "x", "--lora-rank", "2"],
     "--lora-rank"),
    ("rank-zero", lambda a, m, t: [a, m, "--lora", t / "l", "--lora-rank", "0"], "--lora-rank"),
    ("rank-float", lambda a, m, t: [a, m, "--lora", t / "l", "--lora-rank", "1.5"],
     "--lora-rank"),
    ("not-adapter", lambda a, m, t: [t, m, "--merged", t / "x"], "ADAPTER"),
    ("same-outputs", lambda a, m, t: [a, m, "--merged", t / "x", "--lora", t / "x",
                                      "--lora-rank", "2"], "two different folders"),
    ("onto-adapter", lambda a, m, t: [a, m, "--merged", a], "ADAPTER's folder"),
    ("into-model", lambda a, m, t: [a, m, "--merged", m / "sub"], "MODEL's folder"),
    ("not-empty", lambda a, m, t: [a, m, "--merged", t / "full"], "--overwrite"),
    ("bad-model", lambda a, m, t: [a, t / "nomodel", "--merged", t / "x"], "MODEL"),
    ("other-base", lambda a, m, t: [a, t / "other", "--merged", t / "x"], "ADAPTER"),
    ("lora-adapter", lambda a, m, t: [t / "lora_in", m, "--merged", t / "x"], "LORA"),
]


@pytest.mark.parametrize("name,argv,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(model_dir, saved, tmp_path, capsys,
                                                  name, argv, needle):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "nomodel").mkdir()
    if name == "other-base":
        save_tiny_model(tmp_path / "other", seed=4)
    if name == "lora-adapter":
        _lora_adapter(model_dir, tmp_path / "lora_in")
    before = {p: os.stat(p).st_mtime_ns for p in (saved, model_dir)}
    listing = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # what the set-up printed (transformers' progress bars)
    rc = main(["export", *(str(x) for x in argv(saved, model_dir, tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("tensornet export: error: "), err
    assert needle in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing written
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert {p: os.stat(p).st_mtime_ns for p in (saved, model_dir)} == before


def test_overwrite_replaces_a_folder(model_dir, saved, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("old")
    assert main(["export", str(saved), str(model_dir), "--merged", str(tmp_path / "full"),
                 "--overwrite"]) == 0
    assert not (tmp_path / "full" / "keep.txt").exists()
    assert (tmp_path / "full" / "config.json").is_file()
