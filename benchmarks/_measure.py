"""Measuring helpers the benchmark scripts share: paired wall times and peak RSS."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


def best_round_robin(fns: dict[str, Callable[[], Any]], seconds: float, min_rounds: int,
                     max_rounds: int = 200) -> tuple[dict[str, float], int]:
    """Best wall time of each call, measured round-robin after one warm-up call each.

    Interleaving puts the calls under the same machine conditions (another process's load,
    frequency changes), which matters more than the number of repeats when two calls are
    within a few percent. The number of rounds aims at ``seconds`` of work for the slowest
    call, between ``min_rounds`` and ``max_rounds``. Returns the times and the rounds.
    """
    warm = 0.0
    for fn in fns.values():
        t0 = time.perf_counter()
        fn()
        warm = max(warm, time.perf_counter() - t0)
    rounds = int(min(max(math.ceil(seconds / max(warm, 1e-7)), min_rounds), max_rounds))
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best, rounds


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRSS(threading.Thread):
    """Samples the process's RSS every 0.5 ms until ``done`` is set; the maximum in ``peak``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.0005)
