"""benchmarks/bench_create.py --quick: its code paths run and its records are complete."""

import math

from bench_helpers import run_quick


def test_quick_run_records_every_part(tmp_path):
    _, result = run_quick("bench_create.py", tmp_path)
    for part in ("decompose", "fingerprint", "dota", "lora"):
        assert math.isfinite(result["seconds"][part]) and result["seconds"][part] > 0, part
    (goal,) = result["goals"]
    assert goal["name"] == "dota / decompose (median)" and math.isfinite(goal["value"])
