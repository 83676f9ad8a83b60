"""DoTA under torch.autocast: both strategies (the planner may pick either) run and train."""

import pytest
import torch

from tensornet.adapters import apply_dota, tiny_llama


@pytest.mark.parametrize("strategy", ["contract", "dense", "auto"])
def test_bf16_autocast_forward_and_backward(strategy):
    model = tiny_llama()
    apply_dota(model, progress=False, strategy=strategy)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    cores = [p for n, p in model.named_parameters() if ".cores." in n]
    assert cores and all(p.grad is not None and p.grad.dtype == p.dtype for p in cores)
    assert all(torch.isfinite(p.grad).all() for p in cores)
    # autocast output stays close to the float32 forward
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).logits.float()
    assert (low - ref).abs().max() <= 0.05 * ref.abs().max()
