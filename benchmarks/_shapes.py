"""What the core's CPU benchmarks share: the shapes they time and their common options.

``bench_decompose.py`` (decomposition) and ``bench_plan.py`` (applying the cores) time the
same three matrices (LLaMA-2-7B's, and quick stand-ins), so that their numbers can be read
side by side, and take the same ``--quick``, ``--rank``, ``--threads``, ``--seed`` and
``--json`` options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def parser(doc: str, *, quick: str, rank: str) -> argparse.ArgumentParser:
    """An argument parser with the options both core benchmarks take.

    ``doc`` is the script's docstring (its first paragraph is the description); ``quick``
    and ``rank`` are the help texts of ``--quick`` and ``--rank``.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--rank", type=int, default=16, help=rank)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                   "leave torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write all numbers to this file")
    return p
