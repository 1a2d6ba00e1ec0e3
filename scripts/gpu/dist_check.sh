#!/usr/bin/env bash
# Data-parallel check on a 2-GPU machine (issue #10). From the repository root:
#
#   OUT=/tmp/dist-check scripts/gpu/dist_check.sh
#
# Needs the prebuilt binary (BIN, default target/release/linearize-gpu) and a Python with the
# torch wheel (PYTHON, default python3): its lib/ and the wheel's nvidia/nccl/lib go on
# LD_LIBRARY_PATH. No cargo, no network, no tokenizer files: the model is Llama-3.2-1B's shape
# (configs/models/llama3.2_1b/config.json) with random weights (`model.source: random:`), the
# text a synthetic Markov chain over a word-level vocabulary.
#
# 1. stage 1 (LoLCATs attention transfer) + stage 2 (LoRA) on 1 GPU, then on 2 GPUs
#    (`linearize launch --nproc-per-node 2`) with the same global batch;
# 2. 2 GPUs again, rank 1 killed with SIGKILL mid-run: the job must stop with a clear error
#    (the time it took is printed);
# 3. that run resumed on 1 GPU, stopped by SIGTERM (exit 75), resumed on 2 GPUs to the end;
# 4. the loss curves side by side (1 GPU / 2 GPUs / killed+resumed), tokens/s of 1 and 2 GPUs.
# Results: $OUT/dist_check.json, $OUT/curves.csv, logs in $OUT/logs, runs in $OUT/runs.
#
# DIST_CHECK_SMOKE=1 runs the same sequence on the CPU with a tiny model (TCP backend), to check
# the script itself on a machine without GPUs.
set -euo pipefail

OUT=${OUT:?set OUT to the output directory}
PY=${PYTHON:-python3}
SMOKE=${DIST_CHECK_SMOKE:-0}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/logs" "$OUT/runs"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs

if [ "$SMOKE" = 1 ]; then
    BIN=${BIN:-target/release/linearize}
    DEVICE=cpu DTYPE=f32 SEQ=64 BATCH=4 ACCUM=1 S1=12 S2=6 SAVE1=4 SAVE2=3 WORDS=60000
    WINDOW=8 FEATURES=8 KILL_AT=6 STOP_AT=10
else
    BIN=${BIN:-target/release/linearize-gpu}
    # Global batch 8 x 1024 tokens x 2 micro-batches: 4 sequences per GPU on 2 GPUs.
    DEVICE=cuda DTYPE=bf16 SEQ=1024 BATCH=8 ACCUM=2 S1=40 S2=16 SAVE1=10 SAVE2=8 WORDS=1400000
    WINDOW=64 FEATURES=64 KILL_AT=15 STOP_AT=30
    TORCH_DIR=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
    NCCL_DIR=$(cd "$TORCH_DIR/../nvidia/nccl/lib" && pwd)
    export LD_LIBRARY_PATH="$TORCH_DIR/lib:$NCCL_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
export S1_STEPS=$S1
export RUST_LOG=${RUST_LOG:-info}
# A dead rank is noticed at once through its closed socket; this only bounds a hung one.
export LINEARIZE_DIST_TIMEOUT=${LINEARIZE_DIST_TIMEOUT:-120}
export LINEARIZE_DIST_BOOTSTRAP_TIMEOUT=${LINEARIZE_DIST_BOOTSTRAP_TIMEOUT:-120}
START=$(date +%s)

echo "== preparing synthetic data and the model directory"
"$PY" "$HERE/dist_check.py" prepare "$OUT" "$WORDS" "$SMOKE"
RECIPE=$OUT/work/recipe.yaml
cat >"$RECIPE" <<EOF
name: dist-check
output: $OUT/runs
seed: 1
model: {source: "random:$OUT/work/model", device: $DEVICE, dtype: $DTYPE}
conversion:
  attention:
    method: lolcats
    window_shape: sw
    window_size: $WINDOW
    feature_map: {kind: hedgehog, feature_dim: $FEATURES}
data:
  sources: [{kind: text, path: $OUT/work/data/train.txt}]
  val_sources: [{kind: text, path: $OUT/work/data/val.txt}]
  seq_len: $SEQ
  batch_size: $BATCH
  max_val_sequences: 16
attention_transfer:
  max_steps: $S1
  grad_accum: $ACCUM
  schedule: {kind: cosine, warmup_steps: 5}
  eval_every: 0
  eval_batch_size: 4
  save_every: $SAVE1
  log_every: 1
lora:
  max_steps: $S2
  grad_accum: $ACCUM
  eval_every: 0
  eval_batch_size: 4
  save_every: $SAVE2
  log_every: 1
export: {adapters: true, merged: false}
EOF

step_of() { "$PY" "$HERE/dist_check.py" step "$1"; }

# wait_step RUN_DIR STEP PID: until the run logged run-wide STEP (fails if PID ends first).
wait_step() {
    local deadline=$(($(date +%s) + 300))
    while [ "$(step_of "$1")" -lt "$2" ]; do
        # (An exited child stays a zombie until `wait`: kill -0 alone would not notice.)
        if ! kill -0 "$3" 2>/dev/null || [ "$(awk '{print $3}' "/proc/$3/stat" 2>/dev/null)" = Z ]; then
            echo "the job ended before step $2" >&2
            return 1
        fi
        if [ "$(date +%s)" -gt "$deadline" ]; then
            echo "no step $2 within 300 s" >&2
            return 1
        fi
        sleep 0.2
    done
}

# The child of PID whose environment has RANK=$2.
child_with_rank() {
    local stat pid
    for stat in /proc/[0-9]*/stat; do
        pid=${stat#/proc/}
        pid=${pid%/stat}
        if [ "$(awk '{print $4}' "$stat" 2>/dev/null)" = "$1" ] &&
            tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "RANK=$2"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

timed() { # NAME CMD...: runs CMD with its log in $LOGS/NAME.log, prints the wall time
    local name=$1
    shift
    local t0 t1
    t0=$(date +%s.%N)
    if ! "$@" >"$LOGS/$name.log" 2>&1; then
        echo "FAILED: $name (see $LOGS/$name.log)"
        tail -n 30 "$LOGS/$name.log"
        exit 1
    fi
    t1=$(date +%s.%N)
    printf '%s: %.1f s\n' "$name" "$(echo "$t1 - $t0" | bc -l 2>/dev/null || "$PY" -c "print($t1-$t0)")"
}

echo "== 1 GPU"
timed one "$BIN" --recipe "$RECIPE" --output "$OUT/runs/one"
echo "== 2 GPUs (linearize launch --nproc-per-node 2), same global batch"
timed two "$BIN" launch --nproc-per-node 2 -- --recipe "$RECIPE" --output "$OUT/runs/two"

echo "== 2 GPUs, rank 1 killed with SIGKILL after step $KILL_AT"
KILL_DIR=$OUT/runs/kill
"$BIN" launch --nproc-per-node 2 -- --recipe "$RECIPE" --output "$KILL_DIR" >"$LOGS/kill.log" 2>&1 &
LAUNCHER=$!
wait_step "$KILL_DIR" "$KILL_AT" "$LAUNCHER"
VICTIM=$(child_with_rank "$LAUNCHER" 1)
KILLED_AT_STEP=$(step_of "$KILL_DIR")
T0=$(date +%s.%N)
kill -9 "$VICTIM"
set +e
wait "$LAUNCHER"
RC=$?
set -e
T1=$(date +%s.%N)
STOP_S=$("$PY" -c "print(round($T1 - $T0, 2))")
echo "killed rank 1 (pid $VICTIM) at step $KILLED_AT_STEP; the launcher exited with status $RC after $STOP_S s"
echo "--- what the job said:"
grep -E "linearize launch|error|lost|failed|abandoned" "$LOGS/kill.log" | grep -v "^\s*$" | tail -n 12 || true
"$PY" - "$OUT/kill.json" "$RC" "$STOP_S" "$KILLED_AT_STEP" "$LOGS/kill.log" <<'EOF'
import json, sys
path, rc, secs, step, log = sys.argv[1:]
lines = [l.rstrip() for l in open(log, errors="replace") if "error" in l or "lost" in l or "linearize launch" in l]
json.dump({"exit_status": int(rc), "seconds_to_stop": float(secs), "killed_at_step": int(step),
           "messages": lines[-12:]}, open(path, "w"), indent=1)
EOF
if [ "$RC" -eq 0 ]; then
    echo "FAILED: the job did not notice the killed rank"
    exit 1
fi

# Until the resumed job opens metrics.jsonl, the file still shows the killed run's last steps:
# wait for a step the killed run never reached.
STOP_AT=$((STOP_AT > KILLED_AT_STEP + 2 ? STOP_AT : KILLED_AT_STEP + 2))
echo "== resume on 1 GPU, SIGTERM after run step $STOP_AT (expect status 75)"
"$BIN" resume "$KILL_DIR" >"$LOGS/resume1.log" 2>&1 &
PID=$!
wait_step "$KILL_DIR" "$STOP_AT" "$PID"
kill -TERM "$PID"
set +e
wait "$PID"
RC=$?
set -e
echo "status $RC at step $(step_of "$KILL_DIR")"
grep -E "stopped by|resumed" "$LOGS/resume1.log" | tail -n 3 || true
[ "$RC" -eq 75 ] || { echo "FAILED: expected status 75"; tail -n 20 "$LOGS/resume1.log"; exit 1; }
echo "== resume on 2 GPUs to the end"
timed resume2 "$BIN" launch --nproc-per-node 2 -- resume "$KILL_DIR"
grep -E "resumed" "$LOGS/resume2.log" | head -n 2 || true

echo "== loss curves (train records) and throughput"
"$PY" "$HERE/dist_check.py" report "$OUT" | tee "$OUT/report.txt"
echo "total: $(($(date +%s) - START)) s; results in $OUT (dist_check.json, curves.csv, report.txt, logs/)"
