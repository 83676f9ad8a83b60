"""The built-in ``arithmetic`` task: GSM8K-style word problems, generated from a seed.

Each problem takes 2 to 4 reasoning steps; its response works through them and ends with
the final answer in GSM8K's format, ``#### 42``. The splits are disjoint (no question is
drawn twice) and the same seed gives the same splits.
"""

from __future__ import annotations

import random

from ..errors import DataError
from .examples import Example, Splits

__all__ = ["arithmetic_problem", "arithmetic_splits"]

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
