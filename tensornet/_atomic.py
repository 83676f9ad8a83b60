"""Atomic output, the project's one writer: a reader never sees a half-written file or folder.

A file is written under a temporary name beside its target, flushed to disk, and renamed
over the target (``os.replace``: one step on POSIX and Windows). A folder is written
under a temporary name beside its target and renamed into place; an existing target is
first renamed aside, then deleted. An error (or a kill) before the rename leaves the
target as it was, plus at most a hidden temporary beside it.

Used by every tensornet path that saves: adapter configs, the CLI's run folders, results
and plots, exported adapters and models, the offline model cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_figure", "write_text_atomic", "save_figure_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: str | os.PathLike[str], mode: int) -> None:
    """Give a temporary file or folder the permissions a plain ``open``/``mkdir`` would."""
    os.chmod(path, mode & ~_umask())


@contextmanager
def _temporary_file(path: Path) -> Iterator[str]:
    """A temporary file name beside ``path`` that replaces ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a synced temporary file and ``os.replace``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_text_atomic(folder / "a.json", "{}").read_text()
    '{}'
    >>> sorted(p.name for p in folder.iterdir())  # no temporary left behind
    ['a.json']
    """
    path = Path(path)
    with _temporary_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def save_figure_atomic(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """``fig.savefig`` into a temporary file, then ``os.replace`` it to ``path``."""
    path = Path(path)
    with _temporary_file(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


@contextmanager
def atomic_figure(path: str | os.PathLike[str], *, dpi: int = 120) -> Iterator[Any]:
    """Yield the axes of a new 6.5 x 4.2 in matplotlib figure (Agg backend).

    When the block succeeds the figure is saved to ``path`` (:func:`save_figure_atomic`);
    it is closed in any case.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    try:
        yield ax
        save_figure_atomic(fig, path, dpi=dpi)
    finally:
        plt.close(fig)


@contextmanager
def atomic_dir(
    path: str | os.PathLike[str], *, keep_theirs: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block succeeds it becomes ``path``.

    On success an existing ``path`` is replaced (renamed aside, then deleted); on error the
    temporary folder is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : path
        The folder to write.
    keep_theirs : callable, optional
        For folders several processes may write at once (a cache): when the final rename
        fails because another process put its folder in place meanwhile,
        ``keep_theirs(path)`` says whether that folder is complete, in which case it is
        kept and ours discarded (otherwise the error propagates).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with atomic_dir(target) as tmp:
    ...     _ = (tmp / "x.txt").write_text("1")
    >>> (target / "x.txt").read_text()
    '1'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    _publish(tmp, 0o777)
    try:
        yield tmp
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / target.name)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if keep_theirs is None or not keep_theirs(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
