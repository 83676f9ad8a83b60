"""Register tensornet's peft methods when peft is imported, with no ``import tensornet``.

A saved DoTA, LoTR or LoRTA adapter names its method in ``adapter_config.json``
(``"peft_type": "DOTA"``), and peft's own loaders (``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM.from_pretrained``, ``PeftConfig.from_pretrained``) look that name
up in peft's tables, which hold tensornet's methods only once ``tensornet.adapters`` has been
imported. So that those loaders work in a process that never imports tensornet, an install
of tensornet puts two files beside the package in ``site-packages`` (``setup.py``):

``tensornet-peft-hook.pth``
    One line, :data:`PTH_LINE`, run by :mod:`site` at interpreter start: unless the
    environment variable ``TENSORNET_NO_PEFT_HOOK`` is set (to anything but ``""`` or
    ``"0"``), it imports ``_tensornet_peft_hook`` and calls :func:`install`.
``_tensornet_peft_hook.py``
    A three-line module that runs this file (the package's copy, or the checkout's for an
    editable install) in its own namespace, without importing the ``tensornet`` package.

:func:`install` puts a :class:`PeftFinder` first on :data:`sys.meta_path`. It answers no
import but the first of ``peft`` itself, whose loader it wraps: once peft's
``__init__`` has run, the wrapper imports ``tensornet.adapters``, which registers the
methods (``tensornet/adapters/_registry.py``), and the finder removes itself. A process that
never imports peft pays for reading this file and one string comparison per import: no
torch, numpy, peft or tensornet module is loaded (see ``docs/guide/loading.rst`` for
measured numbers). This file must therefore import nothing beyond the standard modules
already loaded at start-up (``sys``, ``os``): not even ``typing`` or ``__future__``.

If the registration fails (peft older than tensornet supports, a missing dependency),
``import peft`` still succeeds and a :class:`RuntimeWarning` says why, and how to turn the
hook off.
"""

import os
import sys

__all__ = ["ENV_OFF", "PTH_LINE", "PeftFinder", "enabled", "install"]

#: Set to anything but ``""`` or ``"0"``: the ``.pth`` file loads nothing.
ENV_OFF = "TENSORNET_NO_PEFT_HOOK"

#: The line of ``tensornet-peft-hook.pth`` (``site`` runs a ``.pth`` line that starts with
#: ``import``).
PTH_LINE = (
    f'import os; os.environ.get("{ENV_OFF}", "") in ("", "0") and '
    f'__import__("_tensornet_peft_hook").install()\n'
)


def enabled() -> bool:
    """Whether the hook is on: ``TENSORNET_NO_PEFT_HOOK`` is unset, empty or ``"0"``."""
    return os.environ.get(ENV_OFF, "") in ("", "0")


class PeftFinder:
    """A :data:`sys.meta_path` finder that calls ``after()`` once ``module`` is imported.

    Parameters
    ----------
    module : str
        The top-level module to watch: ``"peft"``.
    after : callable
        Called with no argument right after the module's own code has run: :func:`register`.
    """

    def __init__(self, module: str = "peft", after: object = None) -> None:
        self.module = module
        self.after = register if after is None else after

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        """The module's spec with its loader wrapped; ``None`` for every other module.

        A lookup alone (``importlib.util.find_spec("peft")``, as transformers does to see
        whether peft is installed) leaves the finder in place: only running the module's
        code takes it off :data:`sys.meta_path`.
        """
        if fullname != self.module:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RunAfter(spec.loader, self)
        return spec

    def remove(self) -> None:
        """Take this finder off :data:`sys.meta_path` (it serves one import)."""
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]


class _RunAfter:
    """The module's own loader, then the finder's ``after()``; the module keeps its loader."""

    def __init__(self, loader: object, finder: PeftFinder) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: object) -> object:
        return self.loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        # from here on peft.__spec__.loader and peft.__loader__ are peft's own loader
        module.__spec__.loader = module.__loader__ = self.loader
        self.finder.remove()
        self.loader.exec_module(module)
        self.finder.after()


def register() -> None:
    """Import ``tensornet.adapters`` (which registers the methods); warn if that fails."""
    if sys.modules.get("tensornet.adapters") is not None:  # imported or being imported
        return
    try:
        __import__("tensornet.adapters")
    except Exception as exc:  # noqa: BLE001 - import peft must not fail because of tensornet
        import warnings

        warnings.warn(
            f"tensornet could not register its peft methods (DoTA, LoTR, LoRTA), so peft "
            f"cannot load their adapters in this process: {type(exc).__name__}: {exc}. "
            f"Set {ENV_OFF}=1 to stop trying at every import of peft.",
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> PeftFinder | None:
    """Put a :class:`PeftFinder` first on :data:`sys.meta_path`, unless off or peft is in.

    Returns the finder, or ``None`` when the hook is off (:func:`enabled`), peft is already
    imported (too late to watch) or a finder is already installed.
    """
    if not enabled() or "peft" in sys.modules:
        return None
    if any(isinstance(f, PeftFinder) or type(f).__name__ == "PeftFinder" for f in sys.meta_path):
        return None
    finder = PeftFinder()
    sys.meta_path.insert(0, finder)
    return finder
