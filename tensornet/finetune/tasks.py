"""Fine-tuning data: the built-in ``arithmetic`` task, JSONL files, tokenization, batches.

An :class:`Example` is a ``prompt`` and a ``response``. The built-in task generates
GSM8K-style word problems of 2 to 4 reasoning steps whose response ends with the final
answer in GSM8K's format, ``#### 42``. A user's own data is a JSONL file with one
``{"prompt": ..., "response": ...}`` object per line (:func:`load_jsonl`), or any JSON,
JSON Lines, CSV or Parquet file that Hugging Face ``datasets`` reads, with named prompt
and response columns (:func:`load_data_file`). Both are split into train,
validation and test sets deterministically and without overlap (examples are
de-duplicated by prompt text before they are split).

Tokenization formats a prompt with the tokenizer's chat template when it has one, and
masks the prompt tokens with ``-100`` so that the loss is taken on the response only.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

__all__ = [
    "DataError",
    "Example",
    "Splits",
    "SYSTEM_PROMPT",
    "arithmetic_problem",
    "arithmetic_splits",
    "DATA_SUFFIXES",
    "load_jsonl",
    "load_data_file",
    "split_examples",
    "extract_answer",
    "format_prompt",
    "encode_example",
    "collate",
]

#: The system message used with chat templates: asks for GSM8K's answer format.
SYSTEM_PROMPT = "Solve step by step; end with '#### N'."

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One prompt/response pair; ``answer`` is the expected final number, if known."""

    prompt: str
    response: str
    answer: str | None = None


@dataclass(frozen=True)
class Splits:
    """Disjoint train / validation / test examples."""

    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
        }


# --------------------------------------------------------------------------- arithmetic

_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack",
          "Kate", "Leo", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Omar")
_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "cards", "shells",
          "stickers", "cookies")
_ADD = ("buys {n} more", "finds {n} more", "gets {n} more from a friend", "wins {n} more")
_SUB = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}")
_MUL = {2: "doubles them", 3: "triples them"}


def arithmetic_problem(rng: random.Random, *, max_steps: int = 4) -> Example:
    """Draw one word problem of 2 to ``max_steps`` steps from ``rng``.

    Every intermediate result stays a positive integer below 1000; the response works
    through each step (``12 + 5 = 17.``) and ends with ``#### <answer>``.

    Parameters
    ----------
    rng : random.Random
        Source of randomness; the same state gives the same problem.
    max_steps : int
        Most reasoning steps (2 to 4; the built-in task uses 4, the demo 3 for shorter
        sequences).

    Returns
    -------
    Example
        With ``answer`` set to the final number as a string.

    Examples
    --------
    >>> ex = arithmetic_problem(random.Random(0))
    >>> ex.response.endswith("#### " + ex.answer)
    True
    """
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 40)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(rng.randint(2, max_steps)):
        kind = rng.choice(("add", "add", "sub", "sub", "mul"))
        if kind == "mul" and value * 3 < 1000:
            n = rng.choice((2, 3))
            sentences.append(f"Then {name} {_MUL[n]}.")
            steps.append(f"{value} * {n} = {value * n}.")
            value *= n
        elif kind == "sub" and value > 2:
            n = rng.randint(1, value - 1)
            sentences.append(f"Then {name} {rng.choice(_SUB).format(n=n)}.")
            steps.append(f"{value} - {n} = {value - n}.")
            value -= n
        else:
            n = rng.randint(1, 30)
            sentences.append(f"Then {name} {rng.choice(_ADD).format(n=n)}.")
            steps.append(f"{value} + {n} = {value + n}.")
            value += n
    sentences.append(f"How many {item} does {name} have now?")
    return Example(" ".join(sentences), " ".join(steps) + f"\n#### {value}", str(value))


def arithmetic_splits(
    n_train: int, n_validation: int, n_test: int, *, seed: int = 0, max_steps: int = 4
) -> Splits:
    """Generate the built-in ``arithmetic`` task: disjoint, deterministic splits.

    Problems are drawn from ``random.Random(seed)``; a problem whose question text was
    already drawn is skipped, so no question appears in two splits (or twice in one).

    Parameters
    ----------
    n_train, n_validation, n_test : int
        Sizes of the splits (non-negative).
    seed : int
        The same seed gives the same splits.
    max_steps : int
        Most reasoning steps per problem, 2 to 4 (see :func:`arithmetic_problem`).

    Returns
    -------
    Splits

    Raises
    ------
    DataError
        If a size is negative.

    Examples
    --------
    >>> s = arithmetic_splits(20, 5, 5, seed=1)
    >>> s.sizes()
    {'train': 20, 'validation': 5, 'test': 5}
    >>> s == arithmetic_splits(20, 5, 5, seed=1)
    True
    """
    sizes = (n_train, n_validation, n_test)
    if any(not isinstance(n, int) or n < 0 for n in sizes):
        raise DataError(f"split sizes must be non-negative ints; got {sizes}")
    if max_steps not in (2, 3, 4):
        raise DataError(f"`max_steps` must be 2, 3 or 4; got {max_steps!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    total = sum(sizes)
    attempts = 0
    while len(out) < total:
        attempts += 1
        if attempts > 50 * total + 1000:  # pragma: no cover - the space is far larger
            raise DataError(f"cannot draw {total} distinct problems")
        ex = arithmetic_problem(rng, max_steps=max_steps)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    a, b = n_train, n_train + n_validation
    return Splits(tuple(out[:a]), tuple(out[a:b]), tuple(out[b:]))


# --------------------------------------------------------------------------- JSONL


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


def split_examples(
    examples: Iterable[Example],
    *,
    validation: int | float = 0.1,
    test: int | float = 0.1,
    seed: int = 0,
) -> Splits:
    """Split ``examples`` deterministically into disjoint train/validation/test sets.

    Examples are de-duplicated by prompt (the first one is kept), ordered by a hash of
    ``(seed, prompt)`` (so the split of an example does not depend on the file's order),
    and cut into test, validation and train.

    Parameters
    ----------
    examples : iterable of Example
    validation, test : int or float
        A count, or a fraction of the examples in [0, 1).
    seed : int

    Raises
    ------
    DataError
        If the sizes do not leave at least one training example.
    """
    unique: dict[str, Example] = {}
    for ex in examples:
        unique.setdefault(ex.prompt, ex)
    items = list(unique.values())

    def key(ex: Example) -> str:
        return hashlib.sha256(f"{seed}\0{ex.prompt}".encode()).hexdigest()

    items.sort(key=key)
    n = len(items)

    def count(v: int | float, name: str) -> int:
        if isinstance(v, float) and 0.0 <= v < 1.0:
            return round(v * n)
        if isinstance(v, int) and v >= 0:
            return v
        raise DataError(f"`{name}` must be a count >= 0 or a fraction in [0, 1); got {v!r}")

    n_test, n_val = count(test, "test"), count(validation, "validation")
    if n_test + n_val >= n:
        raise DataError(
            f"{n} distinct examples cannot give {n_val} validation and {n_test} test "
            f"examples and still leave some for training"
        )
    return Splits(
        tuple(items[n_test + n_val :]), tuple(items[n_test : n_test + n_val]),
        tuple(items[:n_test]),
    )


_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalize(number: str) -> str:
    number = number.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return number
    return str(int(value)) if value.is_integer() else str(value)


def extract_answer(text: str) -> str | None:
    r"""The final number of a response: after ``####`` if present, else the last number.

    Commas are dropped and ``42.0`` becomes ``42``, so answers compare by exact match.

    Examples
    --------
    >>> extract_answer("5 + 7 = 12.\n#### 12")
    '12'
    >>> extract_answer("so the answer is 1,234.0"), extract_answer("no idea")
    ('1234', None)
    """
    m = _ANSWER.search(text)
    if m:
        return _normalize(m.group(1))
    numbers = _NUMBER.findall(text)
    return _normalize(numbers[-1]) if numbers else None


# --------------------------------------------------------------------------- tokenization


def format_prompt(tokenizer: Any, prompt: str) -> str:
    r"""The text the model sees before its response.

    With a chat template: a system message (:data:`SYSTEM_PROMPT`), the user's prompt
    and the assistant header. Without one: ``"Question: ...\nAnswer: "``.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
        ]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    return f"Question: {prompt}\nAnswer: "


def encode_example(tokenizer: Any, example: Example, *, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one example; the prompt's labels are ``-100``.

    The response is followed by the EOS token (so the model learns to stop). A sequence
    longer than ``max_length`` is truncated from the right (the prompt is kept whole
    when it fits).
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, example.prompt), add_special_tokens=False)[
        "input_ids"
    ]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    ids = (list(prompt_ids) + list(response_ids))[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(response_ids))[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(
    items: Sequence[dict[str, list[int]]], *, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels``."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(it["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
