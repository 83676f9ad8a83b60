"""A benchmark run's results as they come: saved after every part, failures kept, not fatal.

A GPU run is scarce: one method that crashes must not cost the others' numbers, and a crash
that kills the process (a segfault in a kernel, the host's OOM killer) must not cost what
was measured before it. :class:`Record` writes the results after every part and measurement
(``_environment.write_json``) and runs each risky call through :meth:`Record.attempt`,
which records an exception's type, message and last traceback lines where it happened and
in the run's ``failures`` list, from which the script's exit status is taken.
"""

from __future__ import annotations

import contextlib
import io
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _environment import write_json
from _measure import best_round_robin


def error_text(exc: BaseException, frames: int = 3) -> str:
    """``Type: message`` and the last ``frames`` traceback entries of ``exc``."""
    tail = "".join(traceback.format_tb(exc.__traceback__)[-frames:]).rstrip()
    return f"{type(exc).__name__}: {exc}\n{tail}"


class Record:
    """``result`` (a JSON-ready dict), where to write it, and its ``failures`` list."""

    def __init__(self, path: Path | None, result: dict[str, Any]) -> None:
        self.path = path
        self.result = result
        result.setdefault("failures", [])

    @property
    def failures(self) -> list[str]:
        """One ``where: Type: message`` line per failure so far."""
        return self.result["failures"]

    def save(self, *, announce: bool = False) -> None:
        """Write the results so far (nothing without a path); ``announce``: say so.

        ``write_json`` prints a line each time; dozens of them between the tables would
        bury the results, so only the last write is announced.
        """
        with contextlib.nullcontext() if announce else contextlib.redirect_stdout(io.StringIO()):
            write_json(self.path, self.result)

    def attempt(self, where: str, record: dict[str, Any], fn: Callable[..., Any],
                *args: Any) -> Any:
        """``fn(*args)``; if it raises, None, with the error in ``record["error"]``.

        A ``record`` that already holds an error is not tried again (its model may be
        half-built or its state broken): the call returns None at once.
        """
        if "error" in record:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - recorded, counted, and the run goes on
            record["error"] = error_text(exc)
        self.failures.append(f"{where}: {record['error'].splitlines()[0]}")
        print(f"  FAILED {where}: {record['error']}", flush=True)
        return None

    def round_robin(self, where: str, fns: dict[str, Callable[[], Any]],
                    records: dict[str, dict[str, Any]], seconds: float,
                    min_rounds: int) -> tuple[dict[str, float], int]:
        """``_measure.best_round_robin`` of ``fns``, each call through :meth:`attempt`.

        A call that raises is recorded in its entry of ``records`` and left out of the
        times (the rounds go on without it). Returns the times of the others and the rounds.
        """
        guarded = {key: partial(self.attempt, f"{where}/{key}", records[key], fn)
                   for key, fn in fns.items()}
        best, rounds = best_round_robin(guarded, seconds, min_rounds)
        return {k: t for k, t in best.items() if "error" not in records[k]}, rounds
