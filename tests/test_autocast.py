"""DoTA under torch.autocast: both strategies (the planner may pick either) run and train."""

import pytest
import torch
from peft import get_peft_model

from tensornet.adapters import DoTAConfig, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("strategy", ["contract", "dense", "auto"])
def test_bf16_autocast_forward_and_backward(strategy):
    model = get_peft_model(tiny_llama(), DoTAConfig(strategy=strategy))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    cores = [p for n, p in model.named_parameters() if ".dota_cores." in n]
    assert len(cores) == 10 * 5
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in cores)
    assert all(torch.isfinite(p.grad).all() for p in cores)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if ".dota_cores." in n
    }
    # autocast output stays close to the float32 forward
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(input_ids=ids).logits.float()
    assert (low - ref).abs().max() <= 0.05 * ref.abs().max()
