"""The acceptance goals of ``bench_gpu.py`` and their verdicts, from its results.

A goal compares two numbers of one workload's results, ours against a reference measured
in the same run (or against an absolute limit), so that a verdict never mixes machines.
Verdicts: PASS or FAIL; SKIPPED where a method was skipped (bitsandbytes not installed);
ERROR where a number is missing because a method or part failed; N/A where a CPU reading
of the reference is 0 (the CPU smoke run's memory is indicative only).
"""

from __future__ import annotations

from typing import Any

#: workload -> goals: (name, ours, reference, comparison, limit), where ours and the
#: reference are key paths into the workload's results (a method's row first); a goal
#: without a reference is an absolute limit
_DOTA_LORA = ("dota / lora step", ("dota", "step_s"), ("lora", "step_s"), "<=", 1.5)
_QDOTA_PEAK = ("qdota / qlora peak memory", ("qdota", "peak_mb"), ("qlora", "peak_mb"), "<=",
               1.1)
_SMALL = (("dota / full step", ("dota", "step_s"), ("full", "step_s"), "<=", 1.0), _DOTA_LORA,
          _QDOTA_PEAK)
GOALS = {"layer": _SMALL, "smollm2": _SMALL, "llama7b": (
    _DOTA_LORA,
    ("qdota / qlora step", ("qdota", "step_s"), ("qlora", "step_s"), "<=", 1.5),
    _QDOTA_PEAK,
    ("dota creation s", ("dota", "create_s"), None, "<=", 5.0),
    ("dota unmerged / base prefill", ("prefill", "unmerged", "dota"),
     ("prefill", "unmerged", "base"), ">=", 0.5),
    ("qdota unmerged / base prefill", ("prefill", "unmerged", "qdota"),
     ("prefill", "unmerged", "base"), ">=", 0.5),
    ("dota merged / base prefill", ("prefill", "merged", "dota"),
     ("prefill", "merged", "base"), ">=", 0.95),
)}
GOALS_GENERATION = (("unmerged", 0.7), ("merged", 0.95))  # / base tokens/s, at least
CPU_NOTE = "  (cpu smoke run: goals are for CUDA)"


def verdict(name: str, value: float | None, op: str, limit: float, cpu: bool,
            why: str = "") -> dict[str, Any]:
    """Print and return one goal line: PASS or FAIL, else ``why`` (SKIPPED or N/A and the
    reason) or, without a reason, ERROR: a value is missing because something failed."""
    if value is None:
        mark, shown = why or "ERROR (not measured: see the failures)", "   n/a"
    else:
        ok = value <= limit if op == "<=" else value >= limit
        mark, shown = ("PASS" if ok else "FAIL"), f"{value:6.3f}"
    print(f"  {name:46s} {shown}  (goal {op} {limit:.2f}) {mark}{CPU_NOTE if cpu else ''}")
    return {"name": name, "value": value, "op": op, "goal": limit, "verdict": mark.split()[0]}


def _lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def goals(result: dict[str, Any], cpu: bool) -> list[dict[str, Any]]:
    """The issue's goals for every measured workload and batch size."""
    print("\n## goals")
    out = []
    for group in result["training"]:
        rows = {r["method"]: r for r in group.get("rows", [])}
        tree = {**group, **rows}
        for name, ours, ref, op, limit in GOALS[group["workload"]]:
            a = _lookup(tree, ours)
            b = _lookup(tree, ref) if ref else 1.0
            skipped = [rows[k]["skipped"] for k in (*ours, *(ref or ()))
                       if "skipped" in rows.get(k, {})]
            value, why = None, f"SKIPPED ({skipped[0]})" if skipped else ""
            if isinstance(a, float) and isinstance(b, float):
                # the CPU's RSS readings can be 0 (indicative only); CUDA's never are
                value, why = (a / b, "") if b > 0 else (None, "N/A (reference measured 0)")
            out.append(verdict(f"{group['workload']}: {name}", value, op, limit, cpu, why))
    inference = result.get("inference")
    if inference is not None:
        batches = {r["batch"]: r for r in inference.get("batches", [])}
        for batch in (1, 8):
            rec = batches.get(batch, {})
            for kind, limit in GOALS_GENERATION:
                value = (rec[f"{kind}_tokens_per_s"] / rec["base_tokens_per_s"]
                         if rec else None)
                out.append(verdict(f"generation: {kind} / base tokens/s, batch {batch}",
                                   value, ">=", limit, cpu))
    return out
