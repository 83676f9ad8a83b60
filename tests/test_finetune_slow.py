"""One short fine-tuning run on the real SmolLM2-135M-Instruct (chat template, bf16)."""

import json

import pytest
import torch
from peft import PeftModel

from tensornet.adapters import DoTALinear, load_pretrained
from tensornet.cli import main


@pytest.mark.slow
def test_finetune_dota_on_smollm2_and_reload(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--method", "dota", "--steps", "2", "--batch-size", "2",
                 "--n-train", "8", "--n-val", "2", "--n-test", "1", "--max-new-tokens", "8",
                 "--max-length", "96", "--eval-every", "2", "--dtype", "bfloat16",
                 "--threads", "1", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "result.json").read_text())
    assert record["model"] == "smollm2-135m-instruct" and record["lr"] == 3e-4
    assert 0 < record["trainable_share"] < 0.02
    assert record["best_val_loss"] <= record["val_loss"][0][1]
    model, _ = load_pretrained(dtype=torch.bfloat16)  # the base it was trained on
    again = PeftModel.from_pretrained(model, out / "adapter")
    assert sum(isinstance(m, DoTALinear) for m in again.modules()) == 150
