"""peft's own loaders read a saved tensornet adapter in a process that never imports tensornet.

The hook of ``tensornet/_peft_hook.py`` (installed as ``tensornet-peft-hook.pth`` and
``_tensornet_peft_hook.py`` in ``site-packages`` by ``setup.py``) registers the methods when
peft is imported. Every check runs in a fresh interpreter whose script never names tensornet
(cwd is a temporary folder, so the checkout is not on ``sys.path`` either: what is imported
is what is installed). The checks need tensornet installed (``pip install -e .``, as
``make venv`` does); in a plain ``PYTHONPATH`` checkout they are skipped.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from tensornet import _peft_hook
from tensornet.adapters import DoTAConfig, tiny_llama

SITE = Path(sysconfig.get_paths()["purelib"])
if not list(SITE.glob("tensornet-*.dist-info")):  # pragma: no cover - a PYTHONPATH checkout
    pytest.skip(f"tensornet is not installed in {SITE} (pip install -e .): no hook files",
                allow_module_level=True)

IDS = [[5, 17, 3, 99, 42, 8, 11, 64]]

#: load the adapter with peft's loaders; print what came back
LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM  # looks peft up before peft is imported
    from peft import AutoPeftModelForCausalLM, PeftModel

    base_dir, adapter_dir, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
    out = {}
    for how in ("PeftModel", "AutoPeftModelForCausalLM"):
        if how == "PeftModel":
            base = AutoModelForCausalLM.from_pretrained(base_dir)
            model = PeftModel.from_pretrained(base, adapter_dir)
        else:
            model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        config = model.peft_config["default"]
        out[how] = {"config": type(config).__module__ + "." + type(config).__name__,
                    "logits": logits.flatten().tolist()}
    print(json.dumps(out))
    """
)

#: with the hook off: peft's own failure, then the one line that fixes it
OFF = textwrap.dedent(
    """
    import sys
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = sys.argv[1], sys.argv[2]
    try:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    except KeyError as exc:
        print("KeyError", exc)
    import tensornet.adapters
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    print("loaded", type(model.peft_config["default"]).__name__)
    """
)


def _run(code: str, *args: str, cwd: Path, off: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", _peft_hook.ENV_OFF)}
    if off:
        env[_peft_hook.ENV_OFF] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaMA saved as a model folder, a DoTA adapter of it and its logits."""
    root = tmp_path_factory.mktemp("load-without-import")
    tiny_llama().save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    model = get_peft_model(base, DoTAConfig(rank=4, num_cores=3, init="random", seed=0))
    model.save_pretrained(root / "adapter")  # its config names the base folder
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(IDS)).logits
    return root, logits


def test_peft_loads_a_dota_adapter_without_import_tensornet(saved):
    root, logits = saved
    run = _run(LOAD, str(root / "base"), str(root / "adapter"), json.dumps(IDS), cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for how in ("PeftModel", "AutoPeftModelForCausalLM"):
        assert out[how]["config"] == "tensornet.adapters.dota.config.DoTAConfig", how
        there = torch.tensor(out[how]["logits"]).reshape(logits.shape)
        assert (there - logits).abs().max() < 1e-5, how  # the random-init adapter's update


def test_with_the_hook_off_peft_fails_and_one_import_fixes_it(saved):
    root, _ = saved
    run = _run(OFF, str(root / "base"), str(root / "adapter"), cwd=root, off=True)
    assert run.returncode == 0, run.stderr[-3000:]
    # peft's own message, which tensornet cannot change from outside a process it is not in
    assert "KeyError 'DOTA'" in run.stdout
    assert "loaded DoTAConfig" in run.stdout


def test_a_process_without_peft_loads_only_the_hook(tmp_path):
    code = "import sys; print(' '.join(sorted(sys.modules)))"
    on = _run(code, cwd=tmp_path)
    off = _run(code, cwd=tmp_path, off=True)
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    # nothing but the hook itself: no tensornet, torch, numpy or peft module, not even typing
    assert set(on.stdout.split()) - set(off.stdout.split()) == {"_tensornet_peft_hook"}


def test_the_hook_files_are_in_site_packages():
    # the installed distribution's RECORD (a stale tensornet.egg-info of the checkout may be
    # what importlib.metadata.distribution finds first)
    dist = importlib.metadata.PathDistribution(next(SITE.glob("tensornet-*.dist-info")))
    files = {str(f) for f in dist.files}
    assert {"tensornet-peft-hook.pth", "_tensornet_peft_hook.py"} <= files
    assert (SITE / "tensornet-peft-hook.pth").read_text() == _peft_hook.PTH_LINE


# ---------------------------------------------------------------- the finder, in this process


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package ``fakepeft_tn`` on ``sys.path`` that records when its code ran."""
    (tmp_path / "fakepeft_tn").mkdir()
    (tmp_path / "fakepeft_tn" / "__init__.py").write_text("import sys\nsys._fakepeft_ran = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fakepeft_tn"
    sys.modules.pop("fakepeft_tn", None)
    if hasattr(sys, "_fakepeft_ran"):
        del sys._fakepeft_ran


def test_the_finder_runs_after_the_module_once_then_leaves(fake_package, monkeypatch):
    calls = []
    finder = _peft_hook.PeftFinder(fake_package, after=lambda: calls.append(sys._fakepeft_ran))
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    module = __import__(fake_package)
    assert calls == [1]  # after the package's own code
    assert finder not in sys.meta_path
    assert type(module.__loader__).__name__ == "SourceFileLoader"  # its own loader
    assert module.__spec__.loader is module.__loader__


def test_a_lookup_alone_keeps_the_finder_for_the_import(fake_package, monkeypatch):
    calls = []
    finder = _peft_hook.PeftFinder(fake_package, after=lambda: calls.append(1))
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    assert importlib.util.find_spec(fake_package) is not None  # transformers' is_peft_available
    assert finder in sys.meta_path and calls == []
    __import__(fake_package)
    assert finder not in sys.meta_path and calls == [1]


def test_the_finder_ignores_every_other_module():
    finder = _peft_hook.PeftFinder("peft", after=lambda: None)
    assert finder.find_spec("json") is None and finder.find_spec("peft.tuners") is None


def test_a_failed_registration_warns_and_does_not_raise(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensornet.adapters", None)  # its import now fails
    with pytest.warns(RuntimeWarning, match=r"tensornet could not register its peft methods "
                                            r".*TENSORNET_NO_PEFT_HOOK=1"):
        _peft_hook.register()


@pytest.mark.parametrize(("value", "on"), [(None, True), ("", True), ("0", True), ("1", False),
                                           ("yes", False)])
def test_the_off_switch(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(_peft_hook.ENV_OFF, raising=False)
    else:
        monkeypatch.setenv(_peft_hook.ENV_OFF, value)
    assert _peft_hook.enabled() is on
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path
                                           if type(f).__name__ != "PeftFinder"])
    monkeypatch.delitem(sys.modules, "peft")
    finder = _peft_hook.install()
    assert (finder is not None) is on
    assert (finder in sys.meta_path) is on
