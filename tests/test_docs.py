"""The documentation stays true: API page coverage, README example, doctests of the guides."""

import contextlib
import doctest
import importlib.util
import io
import re
from pathlib import Path

import pytest

import tensornet
import tensornet.adapters

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide"


def test_api_page_lists_every_public_name():
    api = (ROOT / "docs" / "api.rst").read_text()
    core, adapters = api.split(".. module:: tensornet.adapters")
    names = re.compile(r"^   (\w+)$|^\.\. data:: (\w+)$", flags=re.M)

    def listed(text):
        return {a or b for a, b in names.findall(text)}

    assert set(tensornet.__all__) <= listed(core), sorted(set(tensornet.__all__) - listed(core))
    missing = set(tensornet.adapters.__all__) - listed(adapters)
    assert not missing, sorted(missing)


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def test_cross_references_name_existing_objects():
    # The build is not nitpicky (torch and peft types in signatures have no target), so a
    # role naming a removed function (``:func:`~tensornet.adapters.save_adapter```) would
    # render as plain text without a warning; check every tensornet target here instead.
    role = re.compile(r":(?:func|class|data|attr|meth|exc|mod|obj):`~?(tensornet[\w.]*)`")
    pages = [p for p in (ROOT / "docs").rglob("*.rst") if "generated" not in p.parts]
    broken = [
        (page.relative_to(ROOT).as_posix(), name)
        for page in sorted(pages)
        for name in role.findall(page.read_text())
        if not _resolves(name)
    ]
    assert not broken, broken


def test_readme_example_runs_and_prints_what_it_says():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, flags=re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    claimed = [
        line.split("#", 1)[1].strip() for line in code.splitlines() if line.startswith("print(")
    ]
    assert len(printed) == len(claimed)
    for got, says in zip(printed, claimed):
        assert says.startswith(got), (got, says)


def test_readme_adapter_example_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    for code in blocks[1:]:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    fresh = namespace["fresh"]
    assert not any(type(m).__name__ == "DoTALinear" for m in fresh.modules())


# Every page with ``>>>`` examples; guide/distributed.rst (several processes: its runnable
# counterpart is tests/test_distributed.py) and guide/parameter-counts.rst (a generated
# table, checked below) have none.
DOCTEST_PAGES = [
    "getting-started.rst",
    "algorithms.rst",
    "guide/decompose.rst",
    "guide/analyse.rst",
    "guide/finetune.rst",
    "guide/qdota.rst",
    "guide/save-load.rst",
    "guide/lotr-lorta.rst",
]


@pytest.mark.parametrize("page", DOCTEST_PAGES)
def test_guide_doctests(page, one_thread):
    result = doctest.testfile(
        str(ROOT / "docs" / page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.attempted > 0
    assert result.failed == 0


def test_every_guide_page_is_in_the_toctree_and_tested_or_explained():
    index = (ROOT / "docs" / "index.rst").read_text()
    for page in sorted(GUIDE.glob("*.rst")):
        assert f"   guide/{page.stem}\n" in index, page.name
        text = page.read_text()
        if f"guide/{page.name}" in DOCTEST_PAGES:
            assert ">>> " in text, page.name
        else:
            assert ">>> " not in text, f"{page.name} has examples that no test runs"


def _gen_param_table():
    spec = importlib.util.spec_from_file_location(
        "gen_param_table", ROOT / "docs" / "gen_param_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parameter_count_table_is_up_to_date():
    gen = _gen_param_table()
    committed = (GUIDE / "parameter-counts.txt").read_text()
    assert committed == gen.table(), "run: python docs/gen_param_table.py --write"
    assert ".. include:: parameter-counts.txt" in (GUIDE / "parameter-counts.rst").read_text()
    # The paper's figures (METHODS.md): DoTA R=16 is 0.15% of LLaMA-2-7B, 0.06% of
    # LLaMA-3-8B; R=32 is 0.2% of LLaMA-3-8B.
    matrix_table, cross_layer_table = committed.split("\n\n")

    def rows(text):
        return {line.split("|")[1].strip(): line for line in text.splitlines() if "| " in line}

    first, second = rows(matrix_table), rows(cross_layer_table)
    assert "10,043,392 (0.149%)" in first["LLaMA-2-7B"]
    assert "(0.065%)" in first["LLaMA-3-8B"] and "(0.201%)" in first["LLaMA-3-8B"]
    # LoTR r=16 on LLaMA-2-7B: q, k, v 16 (4096 + 4096) each, up and down 16 (4096 + 11008)
    # each, plus 32 layers of 16 x 16 cores for each of the 5 kinds
    lotr = 3 * 16 * 8192 + 2 * 16 * 15104 + 5 * 32 * 16 * 16
    # LoRTA r=16: 16 (d_model + d_head + H + 4 + L); LLaMA-2 has no grouped-query attention
    lorta = 16 * (4096 + 128 + 32 + 4 + 32)
    assert f"{lotr:,} (" in second["LLaMA-2-7B"] and f"{lorta:,} (" in second["LLaMA-2-7B"]
    # LLaMA-3-8B: 8 K/V heads get their own head factor (16 * 8 more)
    assert f"{16 * (4096 + 128 + 32 + 8 + 4 + 32):,} (" in second["LLaMA-3-8B"]


def test_parameter_count_formulas():
    # LoRA by its formula, checked here against peft on a tiny model with the same targets.
    from peft import LoraConfig, get_peft_model

    gen = _gen_param_table()
    from tensornet.adapters import LLAMA_TARGETS, plan_dota, tiny_llama

    model = tiny_llama()
    lora_formula = sum(32 * (lay.in_features + lay.out_features) for lay in plan_dota(model).layers)
    peft_model = get_peft_model(model, LoraConfig(r=32, target_modules=list(LLAMA_TARGETS)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == lora_formula
    assert [title for title, _, _ in gen.METHODS] == [
        "LoRA r=32",
        "PiSSA r=16",
        "DoTA N=5 R=16",
        "DoTA N=5 R=32",
    ]


