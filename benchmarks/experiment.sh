#!/usr/bin/env bash
# The comparison on the offline SmolLM2-135M-Instruct: every method with seeds 0,1,2 on the
# same data and budget (transformers' Trainer, bf16 autocast, float32 trained weights),
# plus a DoTA rank sweep (R = 8, 16, 32). Every method of tensornet.method_table has its
# line (tests/test_method_table.py checks it).
# One `tensornet compare` process per method (a crash loses one method, not the run); a
# method whose results.json exists is skipped, so re-running the script resumes.
# Usage: benchmarks/experiment.sh [OUT]   (default runs/experiment), then
#        python benchmarks/summarize_experiment.py OUT benchmarks/results/experiment
# CPU pinning: CORES (default "0") and 1 torch thread, so a second core stays free.
# LABELS="dota-r8 dota-r32" runs only those labels (e.g. a second instance on CORES=1, with
# another OUT: two instances must not share a label in one OUT).
set -euo pipefail
OUT=${1:-runs/experiment}
CORES=${CORES:-0}
BIN=${BIN:-.venv/bin}
COMMON=(--dtype bfloat16 --threads 1 --seeds 0,1,2 --steps 40 --batch-size 4
        --max-length 128 --eval-every 5 --n-train 800 --n-val 32 --n-test 25
        --max-new-tokens 48 --data-seed 0 --device cpu --no-progress)
LABELS=${LABELS:-}
run() {  # label, then extra arguments
    local label=$1; shift
    if [[ -n "$LABELS" && " $LABELS " != *" $label "* ]]; then return; fi
    if [[ -f "$OUT/$label/results.json" ]]; then echo "skip $label (done)"; return; fi
    echo "== $label: $(date -u +%H:%M:%S)"
    taskset -c "$CORES" "$BIN/tensornet" compare "${COMMON[@]}" "$@" \
        --out "$OUT/$label" --overwrite
}
run dota        --methods dota --rank 16
run dota-random --methods dota-random --rank 16
run lora        --methods lora --lora-rank 32
run dora        --methods dora --lora-rank 32
run pissa       --methods pissa --pissa-rank 16
# full fine-tuning keeps float32 master weights under --dtype bfloat16 (bf16 autocast)
run full        --methods full
run qdota       --methods qdota --rank 16
run qlora       --methods qlora --lora-rank 32
run qpissa      --methods qpissa --lora-rank 32
run lotr        --methods lotr --rank 16
run lorta       --methods lorta --rank 16
run dota-r8     --methods dota --rank 8
run dota-r32    --methods dota --rank 32
echo "== done: $(date -u +%H:%M:%S)"
