"""Atomic file output of fine-tuning runs: the project's one writer, :mod:`tensornet._atomic`.

Kept so that ``tensornet.finetune.io`` still offers the names it had; the code (files
synced then renamed, folders renamed into place) lives once, in ``tensornet/_atomic.py``.
"""

from .._atomic import atomic_dir, save_figure_atomic, write_text_atomic

__all__ = ["atomic_dir", "write_text_atomic", "save_figure_atomic"]
