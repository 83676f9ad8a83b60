"""The core's public surface: what ``tensornet`` exports, how it is documented and called.

The core (``tensornet/*.py``) is what an analysis user calls; DoTA's helpers, its training
cost model and the adapters' parameter formulas live in :mod:`tensornet.adapters`.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tensornet

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    # decomposition and results
    "mpo_decompose", "tt_decompose", "MPO", "TensorTrain",
    # counting
    "mpo_ranks", "mpo_num_params", "tt_ranks", "tt_num_params", "compression_ratio",
    "rank_for_budget",
    # planning and running
    "plan_mpo_matmul", "mpo_matmul", "ContractionPlan", "MachineProfile", "calibrate",
    "profile_for",
    # tensorization
    "factorize", "mpo_modes", "matrix_to_tensor", "tensor_to_matrix", "cores_to_matrix",
    # errors
    "TensornetError", "ShapeError", "ConfigError", "RankError", "ToleranceError",
    "DTypeError", "NonFiniteError",
}

#: the positional (data) parameters of each public function; every other is keyword-only
POSITIONAL = {
    "mpo_decompose": ["W", "shape", "rank"],
    "tt_decompose": ["x", "rank"],
    "mpo_ranks": ["out_modes", "in_modes", "rank"],
    "mpo_num_params": ["out_modes", "in_modes", "rank"],
    "tt_ranks": ["shape", "rank"],
    "tt_num_params": ["shape", "rank"],
    "compression_ratio": ["out_modes", "in_modes", "rank"],
    "rank_for_budget": ["out_modes", "in_modes", "budget"],
    "plan_mpo_matmul": ["cores", "batch_size"],
    "mpo_matmul": ["x", "cores"],
    "calibrate": ["like"],
    "profile_for": ["kind"],
    "factorize": ["n", "num_factors"],
    "mpo_modes": ["out_features", "in_features", "num_cores"],
    "matrix_to_tensor": ["matrix", "out_modes", "in_modes"],
    "tensor_to_matrix": ["tensor"],
    "cores_to_matrix": ["cores"],
}


def test_public_surface_is_what_an_analysis_user_calls():
    assert set(tensornet.__all__) == PUBLIC
    assert len(tensornet.__all__) == len(set(tensornet.__all__))
    for name in ("combine_halves", "mpo_halves", "lotr_num_params", "lorta_num_params",
                 "PAPER_SHAPES", "DataError", "UsageError"):
        assert name not in tensornet.__all__
    for name in ("combine_halves", "mpo_halves", "lotr_num_params", "lorta_num_params"):
        assert not hasattr(tensornet, name), name


def test_adapter_formulas_and_dota_helpers_live_in_the_adapters():
    import tensornet.adapters as adapters
    from tensornet.adapters.dota import layer as dota_layer

    assert {"lotr_num_params", "lorta_num_params"} <= set(adapters.__all__)
    assert adapters.lotr_num_params.__module__ == "tensornet.adapters.lotr.config"
    assert adapters.lorta_num_params.__module__ == "tensornet.adapters.lorta.config"
    assert callable(dota_layer.residual_strategy)
    # the core knows neither DoTA's training cost model nor torch.compile
    plan_src = (ROOT / "tensornet" / "plan.py").read_text()
    assert "residual" not in plan_src and "torch.compiler" not in plan_src
    assert not hasattr(tensornet.ContractionPlan, "residual_strategy")


def test_the_core_imports_neither_the_adapters_nor_torch():
    code = (
        "import sys, numpy as np, tensornet as tn\n"
        "m = tn.mpo_decompose(np.ones((8, 8)), 2, 2)\n"
        "tn.mpo_matmul(np.ones((3, 8)), m, strategy='contract')\n"
        "bad = [k for k in sys.modules if k.startswith(('tensornet.adapters', 'torch', "
        "'transformers', 'peft'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _public_objects():
    for name in sorted(PUBLIC):
        obj = getattr(tensornet, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            continue
        yield name, obj


def _sections(doc: str) -> set[str]:
    return set(re.findall(r"^(\w[\w ]*)\n-{3,}$", doc, flags=re.M))


@pytest.mark.parametrize(("name", "obj"), list(_public_objects()))
def test_numpydoc_sections_of_every_public_function_and_class(name, obj):
    doc = inspect.getdoc(obj)
    assert doc, name
    sections = _sections(doc)
    assert "Parameters" in sections, (name, sections)
    assert "Examples" in sections and ">>> " in doc, (name, sections)
    if not isinstance(obj, type):
        assert "Returns" in sections, (name, sections)
    # every parameter of the signature is documented
    target = obj.__init__ if isinstance(obj, type) else obj
    params = [p for p in inspect.signature(target).parameters if p not in ("self",)]
    block = doc.split("Parameters\n----------", 1)[1]
    for p in params:
        assert re.search(rf"(^|, ){re.escape(p)}\b", block, flags=re.M), (name, p)


def test_plan_call_is_documented():
    doc = inspect.getdoc(tensornet.ContractionPlan.__call__)
    assert {"Parameters", "Returns", "Examples"} <= _sections(doc)


@pytest.mark.parametrize("name", sorted(POSITIONAL))
def test_data_positional_options_keyword_only(name):
    sig = inspect.signature(getattr(tensornet, name))
    positional = [p.name for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional == POSITIONAL[name]
    assert not any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())


def test_every_public_function_is_in_the_positional_table():
    functions = {n for n, o in _public_objects() if not isinstance(o, type)}
    assert functions == set(POSITIONAL)


def test_api_page_lists_exactly_the_core_names_and_every_error():
    import tensornet.errors

    api = (ROOT / "docs" / "api.rst").read_text()
    core = api.split(".. module:: tensornet.adapters")[0]
    listed = set(re.findall(r"^   (\w+)$", core, flags=re.M))
    assert listed == PUBLIC | set(tensornet.errors.__all__), sorted(
        listed ^ (PUBLIC | set(tensornet.errors.__all__))
    )
