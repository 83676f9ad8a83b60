"""lm-evaluation-harness on a saved DoTA adapter (issue 22, point 7).

lm-eval's ``hf`` model loads ``peft=<folder>`` with ``PeftModel.from_pretrained``, which
finds DoTA in peft's tables only once ``tensornet.adapters`` has been imported in that
process: by the user, or by the peft hook of an installed tensornet
(docs/guide/loading.rst). Checked here on a tiny LLaMA folder and the local task of
``tests/data/lm_eval_task`` (a multiple-choice YAML reading a JSONL file):

* the Python API, ``lm_eval.simple_evaluate(model="hf", model_args="pretrained=...,
  peft=...")`` with a ``TaskManager(include_path=...)``, scores exactly what the adapter
  computes (the log-likelihoods of the same model object held in memory), not the base;
* the command line, started through Python so that tensornet is imported first, gives the
  same numbers; the plain ``lm_eval`` command works where the hook is installed and on, and
  fails with peft's ``KeyError: 'DOTA'`` where it is not (``TENSORNET_NO_PEFT_HOOK=1``).

The user-facing version of this is ``docs/guide/trl-lm-eval.rst``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from peft import get_peft_model
from tiny_tokenizer import save_tiny_model, tiny_tokenizer

from tensornet.adapters import DoTAConfig, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# The task YAML names its JSONL file relative to the checkout's root (lm-eval resolves a
# relative data_files path against the working directory), so lm-eval runs from there.
TASK_DIR = "tests/data/lm_eval_task"
TASK = "tensornet_arith"
N_DOCS = len((ROOT / TASK_DIR / f"{TASK}.jsonl").read_text().splitlines())
# The wrapper a user runs instead of `lm_eval` (docs/guide/trl-lm-eval.rst).
WRAPPER = "import tensornet.adapters; from lm_eval.__main__ import cli_evaluate; cli_evaluate()"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaMA folder, a DoTA adapter saved from it, and that adapter in memory."""
    root = tmp_path_factory.mktemp("lm_eval")
    base = root / "base"
    save_tiny_model(base)
    # init_weights=False: random cores (peft's test convention), so the adapter changes
    # the model's outputs without a training run
    model = get_peft_model(tiny_llama(), DoTAConfig(num_cores=3, rank=4, seed=0,
                                                    init_weights=False))
    model.save_pretrained(root / "adapter")
    return {"base": base, "adapter": root / "adapter", "model": model.eval()}


def _evaluate(model, tasks: TaskManager, **kwargs):
    # the seeds None: lm-eval leaves the global RNGs of random, numpy and torch alone (a
    # zero-shot log-likelihood task draws nothing)
    return lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=tasks,
                                   log_samples=True, random_seed=None, numpy_random_seed=None,
                                   torch_random_seed=None, **kwargs)


def _loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """Per document (in document order), the log-likelihood of each choice."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [[float(resp[0]) for resp in s["filtered_resps"]] for s in ordered]


@pytest.fixture(scope="module")
def api_results(saved, tmp_path_factory):
    """``simple_evaluate`` on ``peft=<adapter folder>``, on the in-memory model, on the base."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE",
                   str(tmp_path_factory.mktemp("datasets")))
        # include_defaults=False: only the local task, without indexing lm-eval's
        # thousands of built-in task files (about 6 s of CPU time each time)
        tasks = TaskManager(include_path=TASK_DIR, include_defaults=False)
        common = {"tasks": tasks, "device": "cpu", "batch_size": 4}
        return {
            "peft": _evaluate(
                "hf", model_args=f"pretrained={saved['base']},peft={saved['adapter']}",
                **common),
            "memory": _evaluate(HFLM(pretrained=saved["model"], tokenizer=tiny_tokenizer(),
                                     batch_size=4), tasks),
            "base": _evaluate("hf", model_args=f"pretrained={saved['base']}", **common),
        }


def test_simple_evaluate_scores_the_saved_adapter(api_results):
    result = api_results["peft"]["results"][TASK]
    assert result["sample_len"] == N_DOCS
    assert 0.0 <= result["acc,none"] <= 1.0
    got = _loglikelihoods(api_results["peft"]["samples"][TASK])
    assert len(got) == N_DOCS and all(len(doc) == 3 for doc in got)
    # bit for bit what the adapter computes in memory, and not what the base computes
    assert got == _loglikelihoods(api_results["memory"]["samples"][TASK])
    assert got != _loglikelihoods(api_results["base"]["samples"][TASK])


def _command(prefix: list[str], saved, out: Path) -> list[str]:
    return [*prefix, "--model", "hf",
            "--model_args", f"pretrained={saved['base']},peft={saved['adapter']}",
            "--include_path", TASK_DIR, "--tasks", TASK, "--device", "cpu",
            "--batch_size", "4", "--output_path", str(out), "--log_samples"]


def _hook_installed() -> bool:
    """Whether this environment registers tensornet's methods whenever peft is imported."""
    return importlib.util.find_spec("_tensornet_peft_hook") is not None and os.environ.get(
        "TENSORNET_NO_PEFT_HOOK", "") in ("", "0")


def test_command_line_through_python_gives_the_api_numbers(saved, api_results, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = {  # both at once: each is mostly its imports, on one thread
        "wrapped": _command([sys.executable, "-c", WRAPPER], saved, tmp_path / "wrapped"),
        "plain": _command([sys.executable, "-m", "lm_eval"], saved, tmp_path / "plain"),
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, cmd in runs.items()}
    try:
        output = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = {name: proc.returncode for name, proc in procs.items()}

    assert codes["wrapped"] == 0, output["wrapped"][-3000:]
    results = json.loads(next((tmp_path / "wrapped").rglob("results_*.json")).read_text())
    assert results["results"][TASK]["acc,none"] == (
        api_results["peft"]["results"][TASK]["acc,none"])
    samples = [json.loads(line) for line in
               next((tmp_path / "wrapped").rglob(f"samples_{TASK}_*.jsonl")).open()]
    assert _loglikelihoods(samples) == _loglikelihoods(api_results["peft"]["samples"][TASK])

    if _hook_installed():  # tensornet registers itself when peft is imported
        assert codes["plain"] == 0, output["plain"][-3000:]
    else:  # the plain command never imports tensornet: peft does not know DOTA
        assert codes["plain"] != 0
        assert "KeyError: 'DOTA'" in output["plain"], output["plain"][-3000:]
