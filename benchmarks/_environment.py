"""Where and how benchmark numbers were taken: the header every benchmark prints."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tensornet


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(argv: list[str], versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything needed to tell where and how the numbers were taken.

    ``versions`` adds the versions of the other libraries a benchmark compares with.
    """
    try:
        from threadpoolctl import threadpool_info

        blas = [
            f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
            for p in threadpool_info()
        ]
    except ImportError:
        blas = []
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy": np.__version__,
        **dict(versions or {}),
        "tensornet": tensornet.__version__,
        "thread_pools": blas,
    }


def print_environment(env: dict[str, Any], versions: Mapping[str, str] | None = None) -> None:
    """Print the header lines of ``env`` (``versions`` as passed to :func:`environment`)."""
    print(f"# date              {env['date']}")
    print(f"# command           {env['command']}")
    dirty = " (uncommitted changes)" if env["git_dirty"] else ""
    print(f"# git commit        {env['git_commit']}{dirty}")
    print(f"# platform          {env['platform']}")
    print(f"# cpu               {env['cpu']}; cpu_count={env['cpu_count']}, "
          f"usable={env['cpus_usable']}, load avg at start={env['load_avg_start']}")
    others = "".join(f"  {name} {env[name]}" for name in (versions or {}))
    print(f"# python {env['python']}  torch {env['torch']}  numpy {env['numpy']}{others}  "
          f"tensornet {env['tensornet']}")
    print(f"# torch threads     {env['torch_threads']} (interop {env['torch_interop_threads']})")
    for pool in env["thread_pools"]:
        print(f"# thread pool       {pool}")


def print_overall(env: dict[str, Any], overall: bool, *, quick: bool) -> None:
    """The closing lines: the load average at the end, and the run's verdict."""
    print(f"\n# load avg at end {env['load_avg_end']}")
    print(f"# overall: {'PASS' if overall else 'FAIL'}"
          f"{' (QUICK smoke run: sizes are not the goal sizes)' if quick else ''}")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's options, JSON-ready (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` (if given) as indented JSON and say so."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# wrote {path}")


def finish(benchmark: str, args: argparse.Namespace, env: dict[str, Any], overall: bool,
           **fields: Any) -> int:
    """Close a run: the verdict lines, then, with ``--json``, every number in one file.

    The file holds the benchmark's name, ``env``, the options, ``fields`` (in order) and
    the verdict. Returns the exit status (0: a missed goal is a result, not a failure).
    """
    print_overall(env, overall, quick=args.quick)
    write_json(args.json, {"benchmark": benchmark, "environment": env,
                           "settings": settings(args), **fields, "pass": overall})
    return 0
