"""Exceptions raised by tensornet.

Every error derives from :class:`TensornetError` and from the builtin a caller would
catch anyway (``ValueError`` or ``TypeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "TensornetError",
    "ShapeError",
    "RankError",
    "DTypeError",
    "NonFiniteError",
    "ConfigError",
    "AdapterMismatchError",
    "AdapterFileError",
    "PeftVersionError",
]


class TensornetError(Exception):
    """Base class of every error raised by tensornet."""


class ShapeError(TensornetError, ValueError):
    """An array's shape, or a list of modes, does not fit the request."""


class RankError(TensornetError, ValueError):
    """A rank cap, a rank list or an error tolerance is out of range."""


class DTypeError(TensornetError, TypeError):
    """A value has the wrong type, or an array a dtype the operation cannot take."""


class NonFiniteError(TensornetError, ValueError):
    """An array holds NaN or Inf values."""


class ConfigError(TensornetError, ValueError):
    """An option or an adapter configuration value is invalid."""


class AdapterMismatchError(TensornetError, ValueError):
    """A saved adapter does not match the model or configuration it is loaded into."""


class AdapterFileError(TensornetError, ValueError):
    """A saved adapter file is missing, truncated, damaged or inconsistent with its config."""


class PeftVersionError(TensornetError, ImportError):
    """The installed peft is a version tensornet's methods were not tested with."""
