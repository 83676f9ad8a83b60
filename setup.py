"""Build step of tensornet's peft hook; everything else is configured in ``pyproject.toml``.

``tensornet/_peft_hook.py`` explains the hook. It needs two files in the root of
``site-packages`` (where ``site`` reads ``.pth`` files), beside the package, which no
``pyproject.toml`` setting can put there: package data lands inside ``tensornet/`` and
``data-files`` under the environment's prefix. So ``build_py`` writes them into the wheel's
root, whose contents pip installs into ``site-packages``:

* a regular wheel (``pip install .``): ``tensornet-peft-hook.pth`` and
  ``_tensornet_peft_hook.py``, a copy of ``tensornet/_peft_hook.py``;
* an editable wheel (``pip install -e .``): the same ``.pth`` and a
  ``_tensornet_peft_hook.py`` that runs the checkout's ``tensornet/_peft_hook.py``, so an
  edit of the hook needs no reinstall.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = Path(__file__).resolve().parent / "tensornet" / "_peft_hook.py"
PTH = "tensornet-peft-hook.pth"
MODULE = "_tensornet_peft_hook.py"

EDITABLE_MODULE = '''"""tensornet's peft hook (editable install): runs the checkout's copy."""
import sys
from importlib.machinery import SourceFileLoader

SourceFileLoader(__name__, {path!r}).exec_module(sys.modules[__name__])
'''


def _pth_line() -> str:
    spec = importlib.util.spec_from_file_location("_tensornet_peft_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PTH_LINE


class BuildPyWithPeftHook(build_py):
    """``build_py``, plus the ``.pth`` file and the hook module in the wheel's root."""

    def run(self) -> None:
        """Build the package, then write the two files into the wheel's root."""
        super().run()
        if self.editable_mode:
            # setuptools' editable_wheel installs into the unpacked editable wheel here
            root = Path(self.get_finalized_command("install").install_lib)
            module = EDITABLE_MODULE.format(path=str(HOOK))
        else:
            root = Path(self.build_lib)
            module = HOOK.read_text(encoding="utf-8")
        root.mkdir(parents=True, exist_ok=True)
        (root / PTH).write_text(_pth_line(), encoding="utf-8")
        (root / MODULE).write_text(module, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        """``build_py``'s outputs and, in a regular build, the two files."""
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs += [str(Path(self.build_lib) / PTH), str(Path(self.build_lib) / MODULE)]
        return outputs


setup(cmdclass={"build_py": BuildPyWithPeftHook})
