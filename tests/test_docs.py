"""The documentation stays true: API page coverage, README example, doctests of the guides."""

import contextlib
import doctest
import io
import re
from pathlib import Path

import pytest

import tensornet

ROOT = Path(__file__).resolve().parents[1]


def test_api_page_lists_every_public_name():
    api = (ROOT / "docs" / "api.rst").read_text()
    listed = set(re.findall(r"^   (\w+)$", api, flags=re.M))
    assert set(tensornet.__all__) <= listed, sorted(set(tensornet.__all__) - listed)


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


@pytest.mark.parametrize("page", ["getting-started.rst", "algorithms.rst"])
def test_guide_doctests(page):
    result = doctest.testfile(
        str(ROOT / "docs" / page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.attempted > 0
    assert result.failed == 0
