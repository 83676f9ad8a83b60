"""benchmarks/bench_create.py --quick: its code paths run and its records are complete."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_create.py"


def test_quick_run_records_every_part(tmp_path):
    out = tmp_path / "create.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for part in ("decompose", "fingerprint", "dota", "lora"):
        assert math.isfinite(result["seconds"][part]) and result["seconds"][part] > 0, part
    (goal,) = result["goals"]
    assert goal["name"] == "dota / decompose (median)" and math.isfinite(goal["value"])
