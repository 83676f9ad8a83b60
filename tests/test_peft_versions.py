"""One list of tested peft releases: pyproject.toml, the package, the Makefile agree.

``pyproject.toml``'s ``[tool.tensornet] tested-peft`` is what ``make test-peft-range``
installs and tests, one virtual environment per release;
:data:`tensornet.adapters.TESTED_PEFT` is what :func:`~tensornet.adapters._registry.check_peft`
accepts (older: refused, newer: warned); the ``peft`` requirement of the ``adapters`` extra
must admit every tested release and nothing older than the oldest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tensornet.adapters import TESTED_PEFT
from tensornet.adapters._registry import INSTALL_HINT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _peft_requirement() -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["adapters"]]
    (peft,) = [r for r in reqs if r.name == "peft"]
    return peft


def test_pyproject_lists_the_tested_releases_of_the_package():
    assert tuple(PYPROJECT["tool"]["tensornet"]["tested-peft"]) == TESTED_PEFT


def test_the_tested_releases_are_sorted_oldest_first():
    from packaging.version import Version

    assert list(TESTED_PEFT) == sorted(TESTED_PEFT, key=Version)


def test_the_requirement_admits_the_tested_releases_and_nothing_older():
    spec = _peft_requirement().specifier
    assert all(spec.contains(v) for v in TESTED_PEFT)
    assert str(spec) == f">={TESTED_PEFT[0]}"  # newer releases: a warning, not a refusal


def test_the_install_hint_names_peft_and_the_checkout_not_a_pypi_name():
    assert f'"peft>={TESTED_PEFT[0]}"' in INSTALL_HINT
    assert 'pip install -e ".[adapters]"' in INSTALL_HINT
    # "tensornet" on PyPI is an unrelated project: never recommend installing it by name
    assert not re.search(r"pip install ['\"]?tensornet", INSTALL_HINT)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_test_peft_range_tests_the_same_releases():
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "--eval", "print-peft: ; @echo $(PEFT_VERSIONS)",
         "print-peft"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert tuple(out) == TESTED_PEFT
