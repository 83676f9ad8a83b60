"""What the core's tests share: random MPO cores and a hypothesis strategy of MPO shapes."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st


def random_cores(rng: np.random.Generator, out_modes: Any, in_modes: Any,
                 ranks: Any) -> list[np.ndarray]:
    """Standard normal float64 cores ``(R_{k-1}, I_k, J_k, R_k)`` drawn from ``rng``."""
    return [
        rng.standard_normal((ranks[k], out_modes[k], in_modes[k], ranks[k + 1]))
        for k in range(len(out_modes))
    ]


@st.composite
def mpo_shapes(draw: Any) -> tuple[list[int], list[int], list[int]]:
    """``(out_modes, in_modes, ranks)`` of 1 to 4 cores, modes and bonds of 1 to 4."""
    n = draw(st.integers(1, 4))
    out_modes = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    in_modes = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    inner = draw(st.lists(st.integers(1, 4), min_size=n - 1, max_size=n - 1))
    return out_modes, in_modes, [1, *inner, 1]
