"""The MPO shapes the CPU benchmarks time: LLaMA-2-7B's matrices and their quick stand-ins.

``bench_decompose.py`` (decomposition) and ``bench_plan.py`` (applying the cores) time the
same three matrices, so that their numbers can be read side by side.
"""

from __future__ import annotations

# (name, out_modes, in_modes); W has shape (prod(out_modes), prod(in_modes)) = (out, in)
FULL_SHAPES = [
    ("a 4096x4096 (q/k/v)", (4, 4, 8, 8, 4), (4, 4, 8, 8, 4)),
    ("b 4096x11008 (down_proj)", (4, 4, 8, 8, 4), (4, 4, 43, 4, 4)),
    ("c 11008x4096 (up_proj)", (4, 4, 43, 4, 4), (4, 4, 8, 8, 4)),
]
QUICK_SHAPES = [
    ("a 1024x1024 (quick)", (4, 4, 4, 4, 4), (4, 4, 4, 4, 4)),
    ("b 1024x2752 (quick)", (4, 4, 4, 4, 4), (4, 4, 43, 2, 2)),
    ("c 2752x1024 (quick)", (4, 4, 43, 2, 2), (4, 4, 4, 4, 4)),
]
