"""Run peft's own generic tuner tests on tensornet's methods (no peft test code copied here).

peft's source distribution ships its test suite: ``tests/test_custom_models.py`` (the
``TestPeftCustomModel`` class, its mock models and every generic check), with the
``PeftCommonTester`` harness of ``tests/testing_common.py``, and
``tests/test_decoder_models.py`` for causal LMs. :func:`upstream` fetches the sdist of the
*installed* peft version by package name from the package index (``pip download
--no-deps --no-binary :all:``), caches it under the virtual environment and imports its
``tests`` folder as the package ``peft_upstream_tests``.

:func:`rebind` builds a test class from an upstream one: every upstream test that is
parametrized over peft's table of cases (``test_name, model_id, config_cls,
config_kwargs`` or ``model_id`` x ``config_cls, config_kwargs``) is re-parametrized with
tensornet's cases and calls the upstream function unchanged; every other upstream test
(those written for one peft method) is left out. A case an upstream test cannot apply to
is skipped with the reason given in the test module's ``SKIPS`` table.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

PACKAGE = "peft_upstream_tests"


def _cache_dir() -> Path:
    return Path(sys.prefix) / "peft-src"


def upstream() -> Any:
    """Import peft's own tests (fetched on first use) as :data:`PACKAGE`; return the package."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    import peft

    version = peft.__version__
    root = _cache_dir() / f"peft-{version}"
    tests = root / "tests"
    if not (tests / "testing_common.py").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        sdist = root.parent / f"peft-{version}.tar.gz"
        if not sdist.is_file():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                 ":all:", f"peft=={version}", "-d", str(root.parent)],
                check=True,
            )
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{version}/tests/")]
            tar.extractall(root.parent, members=members, filter="data")
    spec = importlib.util.spec_from_file_location(
        PACKAGE, tests / "__init__.py", submodule_search_locations=[str(tests)]
    )
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [str(tests)]
    sys.modules[PACKAGE] = module
    return module


def load(name: str) -> Any:
    """An upstream test module, e.g. ``load("test_custom_models")``."""
    upstream()
    return importlib.import_module(f"{PACKAGE}.{name}")


def _argnames_of(mark: Any) -> list[str]:
    args = mark.args[0]
    return [a.strip() for a in (args.split(",") if isinstance(args, str) else args)]


def _argnames(fn: Callable) -> list[str]:
    names: list[str] = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize":
            names += _argnames_of(mark)
    return names


def generic_tests(cls: type, argnames: Iterable[str]) -> dict[str, Callable]:
    """The upstream tests of ``cls`` parametrized over ``argnames`` (its case table)."""
    want = set(argnames)
    out = {}
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        if name.startswith("test_") and want <= set(_argnames(fn)):
            out[name] = fn
    return out


def rebind(
    upstream_cls: type,
    argnames: str,
    cases: list[tuple],
    skips: dict[str, Callable[..., str | None]],
    *,
    ids: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Class body: ``upstream_cls``'s generic tests over ``cases`` instead of peft's.

    Parameters
    ----------
    upstream_cls : type
        ``TestPeftCustomModel`` or ``TestDecoderModels``.
    argnames : str
        The upstream case signature, e.g. ``"test_name, model_id, config_cls, config_kwargs"``.
    cases : list of tuple
        tensornet's cases, in that signature.
    skips : dict
        test name -> ``f(**case) -> reason or None``; a reason skips that case.
    """
    names = [a.strip() for a in argnames.split(",")]
    body: dict[str, Any] = dict(extra or {})
    generic = generic_tests(upstream_cls, names)
    for test, fn in generic.items():
        body[test] = _wrap(test, fn, names, cases, ids, skips.get(test))
    for name in dir(upstream_cls):  # the method-specific upstream tests are not ours
        if name.startswith("test_") and name not in generic:
            body[name] = None
    return body


def _wrap(test: str, fn: Callable, names: list[str], cases: list[tuple], ids: list[str],
          skip: Callable[..., str | None] | None) -> Callable:
    @functools.wraps(fn)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if skip is not None:
            reason = skip(**{k: kwargs[k] for k in names})
            if reason:
                pytest.skip(reason)
        return fn(self, *args, **kwargs)

    own = set(names)
    run.pytestmark = [
        m for m in getattr(fn, "pytestmark", [])
        if m.name != "parametrize" or not own & set(_argnames_of(m))
    ]
    # pytest reads the signature through __wrapped__: keep the upstream's fixtures
    return pytest.mark.parametrize(",".join(names), cases, ids=ids)(run)
