"""Sphinx configuration for the tensornet documentation.

Build (warnings are errors, as in ``make test``)::

    .venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # import the checkout, installed or not

import tensornet  # noqa: E402

project = "tensornet"
author = "the tensornet developers"
copyright = "2025, the tensornet developers"  # noqa: A001
release = tensornet.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
# sphinx.ext.intersphinx is deliberately not loaded: the build must work offline.

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# autosummary writes one page per public name into api/generated/ (git-ignored).
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# numpydoc-style docstrings, read by napoleon.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes" as fields: no duplicate entries next to :members:

nitpicky = False
# The core's numpydoc "References" sections use numbered citations ([1], [2]) that the
# text does not cite; docutils would flag each as an unreferenced footnote.

html_theme = "furo"
html_title = f"tensornet {release}"
html_static_path = []


def _doc_of_reexported_data(app, what, name, obj, options, lines):
    """Give a re-exported constant (``tensornet.PAPER_SHAPES``) its ``#:`` doc comment.

    autodoc looks for ``#:`` comments in the module it documents (``tensornet``), not in
    the submodule that defines the constant, and falls back to the docstring of the
    value's type (``dict``). Take the comment from the defining submodule instead.
    """
    if what != "data" or not name.startswith("tensornet."):
        return
    from sphinx.pycode import ModuleAnalyzer

    attr = name.rsplit(".", 1)[1]
    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith("tensornet.") or getattr(module, attr, None) is not obj:
            continue
        doc = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", attr))
        if doc:
            lines[:] = list(doc)
            return


def setup(app):
    app.connect("autodoc-process-docstring", _doc_of_reexported_data)
