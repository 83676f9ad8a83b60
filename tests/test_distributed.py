"""DoTA under torch.distributed on CPU: DDP and FSDP2 with the gloo backend, two processes.

Each process builds the same tiny LLaMA and applies DoTA (``peft.get_peft_model``). The
decomposition is deterministic (same weights in, same cores out), so the ranks start
identical without a broadcast. Each rank trains on its half of a global batch; the wrapper
averages the gradients. The tests check that

(a) after training the adapter is bit-identical on both ranks (``all_gather`` and compare),
(b) it equals a single-process run on the whole global batch, with the same optimizer, lr
    and number of steps, up to float summation order (1e-6),

for ``DistributedDataParallel`` and for FSDP2's ``fully_shard``, which in torch 2.13 works on
CPU with gloo (parameters become ``DTensor`` shards, gradients are reduce-scattered).
FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``) also runs on CPU/gloo in torch
2.13; FSDP2 is the one torch recommends, so it is the one tested.

The processes are started with ``torch.multiprocessing.spawn`` (fresh interpreters, so no
state of the pytest process leaks in), with ``MASTER_ADDR=127.0.0.1`` and a free port; every
worker destroys its process group in a ``finally``. Both wrappers run in one spawn to pay
the interpreter start-up (importing torch and transformers) once.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import PeftModel, get_peft_model

from tensornet.adapters import DoTAConfig, DoTALinear, tiny_llama

WORLD = 2
STEPS = 3
LR = 0.1
MODES = ("ddp", "fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _dota_model() -> PeftModel:
    # strategy="dense": "auto" plans per batch size, and a rank's shard (2 rows) and the
    # reference run's global batch (4 rows) could then take different paths; the results
    # would agree only to rounding.
    model = get_peft_model(tiny_llama(), DoTAConfig(strategy="dense"))
    return model.train()


def _train(model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    # SGD with momentum: the update is linear in the gradient, so a DDP-averaged gradient
    # and the global-batch gradient give the same parameters up to summation order. (AdamW
    # divides by the running RMS per element and turns 1e-9 gradient noise on near-zero
    # elements into ~3e-6 parameter differences after three steps.)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss  # mean over the (equal-length) tokens
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) cores and init buffers; a collective under FSDP."""
    out = {}
    for k, v in model.state_dict().items():
        if ".dota_cores." in k or ".dota_init." in k:
            full = v.full_tensor() if hasattr(v, "full_tensor") else v  # DTensor -> tensor
            out[k] = full.detach().clone()
    return out


def _wrap(model: torch.nn.Module, mode: str) -> tuple[torch.nn.Module, dict]:
    info: dict = {}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), info
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    core = model.get_base_model().model.layers[0].self_attn.q_proj.dota_cores["default"][1]
    info["core_is_dtensor"] = isinstance(core, DTensor)
    info["core_local_rows"] = core.to_local().shape[0]
    info["core_global_rows"] = core.shape[0]
    return model, info


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # 2 processes on a small shared machine; also reproducible
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        shard = _global_batch().chunk(WORLD)[rank]
        results = {}
        for mode in MODES:
            model, info = _wrap(_dota_model(), mode)
            losses = _train(model, shard)
            state = _adapter_state(model.module if mode == "ddp" else model)
            flat = torch.cat([v.flatten() for v in state.values()])
            gathered = [torch.empty_like(flat) for _ in range(WORLD)]
            dist.all_gather(gathered, flat)
            results[mode] = {
                "losses": losses,
                "identical_across_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
                "state": state,
                **info,
            }
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    reference = _dota_model()
    ref_losses = _train(reference, _global_batch())
    return per_rank, ref_losses, _adapter_state(reference)


def test_no_process_group_left_behind(runs):
    assert not dist.is_initialized()  # the workers ran in their own processes and cleaned up


@pytest.mark.parametrize("mode", MODES)
def test_adapter_identical_across_ranks(runs, mode):
    # Under DDP each rank holds a full replica, so this is the real check. Under FSDP each
    # rank holds a shard and the full tensors are gathered (``full_tensor``) before the
    # comparison, so equality is by construction; what makes FSDP right is that the
    # gathered adapter equals the single-process run (next test).
    per_rank, _, _ = runs
    assert all(r[mode]["identical_across_ranks"] for r in per_rank)
    # ... and not trivially: the ranks saw different data (different local losses) and
    # the cores moved away from their initial values.
    assert per_rank[0][mode]["losses"] != per_rank[1][mode]["losses"]
    state = per_rank[0][mode]["state"]
    moved = [k for k in state
             if ".dota_cores." in k and not torch.equal(state[k], _init_of(state, k))]
    assert len(moved) == 10 * 5


def _init_of(state: dict, core_key: str) -> torch.Tensor:
    return state[core_key.replace(".dota_cores.", ".dota_init.")]


@pytest.mark.parametrize("mode", MODES)
def test_distributed_matches_single_process(runs, mode):
    per_rank, ref_losses, ref_state = runs
    state = per_rank[0][mode]["state"]
    assert state.keys() == ref_state.keys()
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6, msg=k)
    # The global loss is the mean of the two shard losses (equal token counts per shard).
    mean = [sum(r[mode]["losses"][s] for r in per_rank) / WORLD for s in range(STEPS)]
    assert mean == pytest.approx(ref_losses, abs=1e-5)
    assert ref_losses[-1] < ref_losses[0]


def test_fsdp_really_shards_the_cores(runs):
    per_rank, _, _ = runs
    for r in per_rank:
        info = r["fsdp"]
        assert info["core_is_dtensor"]
        # Shard(0) over 2 ranks: each holds half of the core's first dimension.
        assert info["core_local_rows"] * WORLD == info["core_global_rows"]


def test_all_adapter_state_is_registered():
    # What DDP broadcasts and FSDP shards is what the module registers: every core is a
    # parameter, every initial core a buffer, and no DoTA layer keeps a tensor elsewhere.
    model = _dota_model()
    state = model.state_dict()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DoTALinear)]
    assert len(layers) == 10
    for name, layer in layers:
        for k in range(len(layer.dota_cores["default"])):
            assert f"{name}.dota_cores.default.{k}" in params
            assert f"{name}.dota_init.default.{k}" in buffers
        stray = [a for a, v in vars(layer).items() if isinstance(v, torch.Tensor)]
        assert stray == [], (name, stray)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in state if ".dota_cores." in k}
