"""A user's data file: JSONL, or any JSON, JSON Lines, CSV or Parquet file ``datasets`` reads.

:func:`load_jsonl` reads one ``{"prompt": ..., "response": ...}`` object per line;
:func:`load_data_file` reads any of :data:`DATA_SUFFIXES` through Hugging Face
``datasets``, offline, with named prompt and response columns. Every refusal is one
:class:`~tensornet.errors.DataError` line that names the file and the line or row, checked
before ``datasets`` would fail later or read the file wrongly (not UTF-8, CSV rows with
more cells than the header).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from .examples import Example, extract_answer

__all__ = ["DATA_SUFFIXES", "load_jsonl", "load_data_file"]


def load_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read a JSONL file of ``{"prompt": str, "response": str}`` objects, one per line.

    Blank lines are skipped. The final number of a response written as ``#### 42`` is
    kept as the expected answer (used for accuracy).

    Raises
    ------
    DataError
        If the file cannot be read, or a line is not a JSON object with non-empty string
        ``prompt`` and ``response`` fields (the message gives the line number).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the data file {os.fspath(path)!r}: {exc}") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{os.fspath(path)}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with 'prompt' and 'response'")
        for key in ("prompt", "response"):
            value = obj.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string")
        out.append(Example(obj["prompt"], obj["response"], extract_answer(obj["response"])))
    if not out:
        raise DataError(f"the data file {os.fspath(path)!r} holds no examples")
    return out


#: The data file suffixes :func:`load_data_file` reads, and the ``datasets`` builder of each.
DATA_SUFFIXES: dict[str, str] = {
    ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
}


def load_data_file(
    path: str | os.PathLike[str],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> list[Example]:
    r"""Read prompt/response examples from a JSON, JSON Lines, CSV or Parquet file.

    The file is read by Hugging Face ``datasets`` (what ``load_dataset(<builder>,
    data_files=path, split="train")`` does, the builder chosen by the suffix, see
    :data:`DATA_SUFFIXES`) offline and into memory; its cache goes to a temporary folder
    that is removed afterwards. A ``.json`` file may hold one list of objects or one
    object per line; blank lines are skipped. CSV cells are read as text, as written
    (``007`` stays ``007``). Columns other than the two fields are ignored. As with
    :func:`load_jsonl`, the final number of a response written as ``#### 42`` is kept as
    the expected answer, and duplicates are removed later, by :func:`split_examples`.

    Parameters
    ----------
    path : str or path-like
        The data file.
    prompt_field, response_field : str
        The columns (JSON keys) holding the prompt and the response.

    Returns
    -------
    list of Example
        In the file's order.

    Raises
    ------
    DataError
        One line naming the file and the problem: the file is missing, its suffix is not
        one of :data:`DATA_SUFFIXES`, a text file (JSON, CSV) is not UTF-8 (the line is
        named), a CSV row has more cells than the header, it cannot be parsed, it holds
        no rows, a field is not among its columns (the columns are listed), or a value is
        not a non-empty string (the row is named, counting from 1).

    Examples
    --------
    >>> folder = tempfile.mkdtemp()
    >>> path = os.path.join(folder, "data.csv")
    >>> with open(path, "w") as fh:
    ...     _ = fh.write("question,answer\n2 + 2?,#### 4\n")
    >>> load_data_file(path, prompt_field="question", response_field="answer")
    [Example(prompt='2 + 2?', response='#### 4', answer='4')]
    >>> import shutil; shutil.rmtree(folder)
    """
    file = Path(path)
    name = os.fspath(path)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise DataError(f"the data file {name!r} {what}")
    builder = DATA_SUFFIXES.get(file.suffix.lower())
    if builder is None:
        raise DataError(
            f"the data file {name!r} has the suffix {file.suffix!r}; expected one of "
            f"{', '.join(DATA_SUFFIXES)}"
        )
    if prompt_field == response_field:
        raise DataError(
            f"`prompt_field` and `response_field` name the same column {prompt_field!r}: the "
            f"model would learn to repeat its prompt; name two columns"
        )
    if _is_blank(file):
        raise DataError(f"the data file {name!r} holds no examples (it is empty)")
    if builder != "parquet":
        _check_utf8(file)
    if builder == "csv":
        _check_csv_rows(file)
    columns = _read_columns(file, builder, (prompt_field, response_field))
    if columns is None or not columns[prompt_field]:
        raise DataError(f"the data file {name!r} holds no examples")
    out = []
    for row, (prompt, response) in enumerate(
        zip(columns[prompt_field], columns[response_field]), start=1
    ):
        for field, value in ((prompt_field, prompt), (response_field, response)):
            if not isinstance(value, str) or not value.strip():
                got = "an empty string" if isinstance(value, str) else (
                    f"{type(value).__name__} {value!r}"[:80]
                )
                raise DataError(
                    f"{name}, row {row}: field {field!r} must be a non-empty string; got {got}"
                )
        out.append(Example(prompt, response, extract_answer(response)))
    return out


def _check_csv_rows(file: Path) -> None:
    """Refuse a CSV row with another number of cells than its header.

    pandas (behind ``datasets``' CSV reader) takes a first column more than the header
    names as the index, so a file whose rows all carry an extra cell is read shifted,
    every field one column off, without an error.
    """
    import csv

    with open(file, newline="", encoding="utf-8", errors="replace") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header is None:
            return
        for number, row in enumerate(rows, start=1):
            if row and len(row) != len(header):
                raise DataError(
                    f"{os.fspath(file)}, row {number}: {len(row)} cells where the header "
                    f"names {len(header)} ({', '.join(map(repr, header))}); quote cells "
                    f"that hold commas"
                )


def _check_utf8(file: Path) -> None:
    """Refuse a text file that is not UTF-8 (read in blocks, nothing kept).

    ``datasets``' JSON reader takes such a file without an error and fails only when a
    value is read out of its table; the line is named here instead.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    done, lines = 0, 1
    with open(file, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = exc.start - len(exc.object) + len(chunk)  # in this chunk (< 0: before)
                line = lines + chunk[:max(at, 0)].count(b"\n")
                raise DataError(
                    f"{os.fspath(file)}, line {line}: not UTF-8 text (byte "
                    f"0x{exc.object[exc.start]:02x} at offset {done + at}); save the file "
                    f"as UTF-8"
                ) from None
            if not chunk:
                return
            done += len(chunk)
            lines += chunk.count(b"\n")


def _is_blank(file: Path) -> bool:
    """Whether ``file`` holds nothing but whitespace (read until the first other byte)."""
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _read_columns(
    file: Path, builder: str, fields: tuple[str, str]
) -> dict[str, list[Any]] | None:
    """The ``fields`` columns of ``file`` read by ``datasets``; ``None`` when it has no rows.

    This is ``load_dataset(builder, data_files=file, split="train", keep_in_memory=True)``
    in its three steps, so that a file without rows is told apart from a broken one
    (``load_dataset`` raises the same ``ValueError`` for an empty split as for a bad
    split name).
    """
    import datasets

    name = os.fspath(file)
    options: dict[str, Any] = {}
    if builder == "csv":  # every cell as the text written, "" for an empty cell
        options = {"converters": {f: str for f in fields}, "keep_default_na": False}
    offline = datasets.DownloadConfig(local_files_only=True, disable_tqdm=True)
    with tempfile.TemporaryDirectory(prefix="tensornet-data-") as cache, _quiet_datasets():
        try:
            if builder == "parquet" and _parquet_rows(file) == 0:
                return None  # datasets' parquet reader fails on a file without rows
            reader = datasets.load_dataset_builder(
                builder, data_files=name, cache_dir=cache, download_config=offline, **options
            )
            reader.download_and_prepare(download_config=offline)
            if not reader.info.splits["train"].num_examples:
                return None
            table = reader.as_dataset(split="train", in_memory=True)
        except Exception as exc:  # noqa: BLE001 - any parser's error becomes one line
            raise DataError(
                f"the data file {name!r} cannot be read as {builder.upper()}: "
                f"{_root_message(exc)}"
            ) from None
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise DataError(
            f"the data file {name!r} has no field {' or '.join(map(repr, missing))}; its "
            f"columns are {', '.join(map(repr, table.column_names))} (name the fields with "
            f"--prompt-field and --response-field)"
        )
    return {f: table[f] for f in fields}


def _parquet_rows(file: Path) -> int:
    """The number of rows a Parquet file's footer declares."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).metadata.num_rows


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets``' progress bars and log messages off for the block, then as they were."""
    from datasets import config
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from datasets.utils import logging as datasets_logging

    forced = config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None  # the environment decides
    turn_off = not forced and not are_progress_bars_disabled()
    verbosity = datasets_logging.get_verbosity()
    if turn_off:
        disable_progress_bars()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # its errors become ours
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if turn_off:
            enable_progress_bars()


def _root_message(exc: BaseException) -> str:
    """The first line of the innermost cause of ``exc`` (``datasets`` wraps parser errors)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
