"""The data of a fine-tuning run: :class:`Example`, :class:`Splits` and how data is split.

An :class:`Example` is a ``prompt`` and a ``response``; every source (the built-in
``arithmetic`` task of :mod:`.arithmetic`, a user's file read by :mod:`.datafiles`)
produces them, and :func:`split_examples` cuts a list of them into train, validation and
test sets deterministically and without overlap (examples are de-duplicated by prompt
text before they are split). :func:`extract_answer` reads the final number of a
response, which accuracy compares.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import DataError

__all__ = ["DataError", "Example", "Splits", "split_examples", "extract_answer"]


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
