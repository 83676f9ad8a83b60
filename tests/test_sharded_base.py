"""Adapters created on a base whose parameters are already sharded (issue 22, point 8).

Under FSDP2 (``fully_shard``) every weight is a DTensor holding a shard; what an adapter
reads at creation (DoTA's MPO decomposition of ``W0``, the fingerprints) must be the full
weight, gathered, so every rank builds the adapter a single process builds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from tensornet.adapters import DoTAConfig, LoTRConfig, tiny_llama
from tensornet.tensorize import cores_to_matrix

HERE = Path(__file__).resolve().parent


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _mpo(state: dict, layer: str) -> torch.Tensor:
    cores = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in state.items()
                   if k.rsplit(".", 2)[0] == layer)
    return cores_to_matrix([v for _, v in cores])


def test_adapters_created_on_fsdp_sharded_weights_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", _port(),
         str(HERE / "sharded_create_run.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for method, config in (("dota", DoTAConfig(rank=4, target_modules=["q_proj", "down_proj"])),
                           ("lotr", LoTRConfig(rank=4, seed=0))):
        one = get_peft_model(tiny_llama(), config)
        cfg = one.peft_config["default"]
        init = {k: v for k, v in one.state_dict().items() if "dota_init" in k}
        for got in ranks:
            layers = got[method]["base_layers"]
            assert layers.keys() == cfg.base_layers.keys()
            for key, rec in cfg.base_layers.items():  # fingerprints exact; the MPO's error
                mine = dict(layers[key])              # to rounding (other thread counts)
                err = mine.pop("relative_error", None)
                assert mine == {k: v for k, v in rec.items() if k != "relative_error"}, key
                if err is not None:
                    assert err == pytest.approx(rec["relative_error"], rel=1e-4, abs=1e-7)
            assert got[method]["base"] == cfg.base_fingerprint, method
            assert got[method]["init"].keys() == init.keys()
            # the MPO of T_init, not its cores: singular vectors' signs may differ
            for layer in {k.rsplit(".", 2)[0] for k in init}:
                mine = _mpo(got[method]["init"], layer)
                torch.testing.assert_close(mine, _mpo(init, layer), rtol=1e-4, atol=1e-5)
