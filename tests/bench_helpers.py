"""What the benchmark smoke tests share: running a script of benchmarks/ in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<name> *args`` on one OpenMP thread, output captured."""
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True,
                          text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_quick(name: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """``name --quick --json``: the finished process (exit 0 checked) and its JSON."""
    out = tmp_path / "result.json"
    proc = run_script(name, "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())
