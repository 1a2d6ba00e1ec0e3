#!/usr/bin/env bash
# The SmolLM2-135M quality study of issue 11 in one command (docs/RESULTS.md): every recipe of
# recipes/quality/ runs at once on the one GPU (each its own process and run directory), then
# decode speed is measured one process at a time, then `linearize compare` writes the table.
#
#   scripts/gpu/quality.sh                 # the study; results under $OUT
#   CALIBRATE=1 scripts/gpu/quality.sh     # all methods at a small budget: tokens/s per stage
#                                          # and a TOKENS_PER_STAGE that fits TRAIN_S seconds
#   DEVICE=cpu SMOKE=1 JOBS=1 scripts/gpu/quality.sh   # the whole path at toy sizes on a CPU
#
# Environment (defaults in brackets):
#   BIN                the linearize binary [target/release/linearize-gpu]
#   OUT                where results go [$OUT of the device machine, else checkpoints/quality-out]
#   WORK               run directories, logs, caches [/tmp/linearize-quality]
#   DEVICE             cuda | cpu [cuda]
#   TOKENS_PER_STAGE   training tokens of each stage, or `auto`: a short calibration of all runs
#                      at once first (CAL_TOKENS per stage), then the largest budget whose
#                      training, evaluation and speed phase fit DEADLINE_S [auto]
#   TEACHER_SEQUENCES  sequences of 1025 tokens sampled from the teacher for the teacher-data
#                      and chatmix variants [1024]
#   TEACHER_WEIGHT     times per epoch chatmix uses each sampled sequence [3.2: with 1024
#                      sequences about half of its training tokens]
#   MODEL              smollm2 | gemma3: the teacher; recipes/quality/<prefix><method>.yaml with
#                      prefix smollm2_ or gemma3_270m_ [smollm2]
#   METHODS            which recipes/quality/<prefix><method>.yaml to run [all of ALL_METHODS]
#   JOBS               runs at once, 0 = all [3 for smollm2, whose LoRA jobs peak at 20-28 GiB
#                      each; 1 for gemma3, whose runs peak above 50 GiB each]
#   SPEED              1: measure decode speed/memory after training, one run at a time [1]
#   SPEED_ONLY         1: no training: only the speed phase, for the layout of every method in
#                      METHODS, and a table of it in $OUT/speed.md [0]
#   SOFTMAX_LAYERS_<m> the softmax layers of method m's layout in the speed phase, e.g. "[23,24]"
#   DEADLINE_S         seconds after start when unfinished runs are stopped (SIGTERM: they save
#                      a state) and what finished is reported [540]
#   CALIBRATE          1: calibration run (see above) [0]; CAL_TOKENS per stage [300000];
#                      TRAIN_S training seconds the suggested budget should fit [300]
#   SMOKE              1: toy sizes (seq_len 64, a few updates, tiny eval) to test the path [0]
#   GGUF               the teacher's GGUF when the cache has no model
#                      [/root/stash/SmolLM2-135M-Instruct.Q4_1.gguf, /root/stash/gemma-3-270m-q4_k_m.gguf]
#   TEXT               the text corpus when the cache has none: a directory or a .tar.xz/.tar.gz
#                      made by scripts/gpu/prepare.sh [target/gpu/text.tar.xz, else
#                      /root/stash/text.tar.xz]
#   LINEARIZE_CACHE    cache of model and text [$WORK/cache]
#   EVAL_S, SPEED_S    seconds `auto` keeps for the evaluation and the speed phase [100, 100]
#   EXTRA_SETS         more `--set k=v` for every training run, space separated
#   RESUME             1: keep $WORK's run directories and continue them (a later device call on
#                      the same warm machine, after an earlier call's deadline stopped them: the
#                      jobs resume from their saved states; give the same TOKENS_PER_STAGE) [0]
set -uo pipefail
START=$(date +%s)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

BIN=${BIN:-target/release/linearize-gpu}
WORK=${WORK:-/tmp/linearize-quality}
OUT=${OUT:-$ROOT/checkpoints/quality-out}
DEVICE=${DEVICE:-cuda}
CALIBRATE=${CALIBRATE:-0}
SMOKE=${SMOKE:-0}
SPEED=${SPEED:-1}
SPEED_ONLY=${SPEED_ONLY:-0}
[ "$SPEED_ONLY" = 1 ] && SPEED=1
DEADLINE_S=${DEADLINE_S:-540}
CAL_TOKENS=${CAL_TOKENS:-300000}
TRAIN_S=${TRAIN_S:-300}
MODEL=${MODEL:-smollm2}
case "$MODEL" in
    smollm2)
        PREFIX=smollm2_ GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf MODEL_NAME=SmolLM2-135M-Instruct
        GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
        # A LoRA job peaks at 20-28 GiB (session 11: seven at once ran out of memory on an
        # 80 GB H100 when they reached LoRA together).
        JOBS=${JOBS:-3}
        ALL_METHODS="hedgehog lolcats_sw lolcats_tk lolcats_tk_xent lolcats_tk_sinks lolcats_tk_sinks_stage1 lolcats_tk_sinks_chatmix lolcats_tk_sinks_s1kl lolcats_tk_sinks_heads5 lolcats_tk_sinks_heads10 lolcats_tk_sinks_kv10 lolcats_tk_sinks_kv10_long lolcats_tk_sinks_layers3 lizard gated_deltanet gdn_window liger t2r hybrid2 hybrid4 lolcats_sw_teacher_data untrained liger_untrained swa_sinks" ;;
    gemma3)
        PREFIX=gemma3_270m_ GGUF_NAME=gemma-3-270m-q4_k_m.gguf MODEL_NAME=gemma-3-270m
        GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
        ALL_METHODS="lolcats_tk_global lolcats_tk_all swa_sinks"
        # One Gemma run peaks above 50 GiB (262k-token logits): three at once ran out of memory
        # on an 80 GB H100.
        JOBS=${JOBS:-1} ;;
    *) echo "quality.sh: MODEL=$MODEL: expected smollm2 or gemma3" >&2; exit 1 ;;
esac
JOBS=${JOBS:-0}
GGUF=${GGUF:-/root/stash/$GGUF_NAME}
if [ -z "${TEXT:-}" ]; then
    TEXT=target/gpu/text.tar.xz
    [ -f "$TEXT" ] || TEXT=/root/stash/text.tar.xz
fi
EVAL_S=${EVAL_S:-100}
SPEED_S=${SPEED_S:-100}
METHODS=${METHODS:-$ALL_METHODS}
if [ "$SMOKE" = 1 ]; then
    export TOKENS_PER_STAGE=${TOKENS_PER_STAGE:-256} TEACHER_SEQUENCES=${TEACHER_SEQUENCES:-4}
    CAL_TOKENS=${CAL_TOKENS_SMOKE:-512}
fi
export TOKENS_PER_STAGE=${TOKENS_PER_STAGE:-auto}
export TEACHER_SEQUENCES=${TEACHER_SEQUENCES:-1024}
# Plain log lines (the throughput summary parses them).
export NO_COLOR=1
export LINEARIZE_CACHE=${LINEARIZE_CACHE:-$WORK/cache}
# Ten processes share 16 cores; libtorch's default of one CPU thread per core each would only
# contend (the work is on the GPU).
if [ "$DEVICE" != cpu ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}; fi
if [ "$CALIBRATE" = 1 ]; then
    export TOKENS_PER_STAGE=$CAL_TOKENS
    export TEACHER_SEQUENCES=${CAL_TEACHER_SEQUENCES:-128}
    SPEED=0
fi

log() { echo "[$(( $(date +%s) - START ))s] $*"; }
die() { echo "quality.sh: $*" >&2; exit 1; }

[ -x "$BIN" ] || die "$BIN: no such executable (build it: scripts/gpu/prepare.sh)"
if [ -z "${LD_LIBRARY_PATH:-}" ] && command -v python3 >/dev/null; then
    TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib
    [ -d "$TORCH_LIB" ] && export LD_LIBRARY_PATH=$TORCH_LIB
fi
mkdir -p "$OUT" "$WORK" || die "cannot create $OUT or $WORK"
RUNS=$WORK/runs
LOGS=$WORK/logs
RESUME=${RESUME:-0}
if [ "$RESUME" = 1 ]; then
    [ -d "$RUNS" ] || { echo "quality.sh: RESUME=1 but $RUNS does not exist (the machine was given back?)" >&2; exit 1; }
    [ "$TOKENS_PER_STAGE" != auto ] || { echo "quality.sh: RESUME=1 needs the TOKENS_PER_STAGE of the first call" >&2; exit 1; }
else
    rm -rf "$RUNS" "$LOGS" "$WORK/calibration"
fi
mkdir -p "$RUNS" "$LOGS" "$LINEARIZE_CACHE/gguf"

# --- the offline model and corpus, where `offline:smollm2` and `offline:text` look ---------
MODEL_GGUF=$LINEARIZE_CACHE/gguf/$GGUF_NAME
if [ ! -s "$MODEL_GGUF" ] && [ ! -f "$LINEARIZE_CACHE/models/$MODEL_NAME/config.json" ]; then
    [ -f "$GGUF" ] || die "$GGUF missing (join the two parts first; docs/RESULTS.md)"
    got=$(sha256sum "$GGUF" | cut -d' ' -f1)
    [ "$got" = "$GGUF_SHA256" ] || die "$GGUF: sha256 $got, expected $GGUF_SHA256"
    ln -sf "$(readlink -f "$GGUF")" "$MODEL_GGUF"
fi
if [ ! -f "$LINEARIZE_CACHE/text/manifest.json" ]; then
    if [ -d "$TEXT" ]; then
        ln -sfn "$(readlink -f "$TEXT")" "$LINEARIZE_CACHE/text"
    elif [ -f "$TEXT" ]; then
        mkdir -p "$LINEARIZE_CACHE/text" && tar -xaf "$TEXT" -C "$LINEARIZE_CACHE/text" \
            || die "unpacking $TEXT"
    else
        die "no text corpus: $TEXT is neither a directory nor an archive (scripts/gpu/prepare.sh)"
    fi
fi

# --- what every run gets ---------------------------------------------------------------------
SETS=(--set "model.device=$DEVICE" --set "data.cache_dir=$WORK/token-cache")
# bf16 only pays on the GPU; f32 on a CPU.
[ "$DEVICE" = cpu ] && SETS+=(--set model.dtype=f32)
if [ "$SMOKE" = 1 ]; then
    SETS+=(--set data.seq_len=64 --set data.batch_size=2 --set data.max_val_sequences=2
        --set "eval.perplexity={files: [\"offline:text/heldout\", \"offline:text/test\"], ctx: 64, max_windows: 2}"
        --set "eval.attention_error={ctx: 64, max_windows: 1}"
        --set "eval.passkey={min_length: 128, max_length: 128, depths: [0.5], trials: 1}"
        --set "eval.multikey={min_length: 256, max_length: 256, keys: 2, trials: 1}"
        --set "eval.mqar={num_pairs: 4, trials: 1}"
        --set "eval.retrieval_heads={passkey_length: 256, passkey_probes: 1, mqar_probes: 1, mqar_pairs: 4}"
        --set "eval.speed={context_lengths: [64, 128], decode_tokens: 4}"
        --set "eval.generations.max_new_tokens=4" --set eval.multiple_choice.limit=2
        --set eval.decode_check.new_tokens=4)
fi
# Speed is measured afterwards, one process at a time (device memory is measured device-wide).
TRAIN_SETS=("${SETS[@]}" --set eval.speed.enabled=false)
for s in ${EXTRA_SETS:-}; do TRAIN_SETS+=(--set "$s"); done

recipe() { echo "recipes/quality/$PREFIX$1.yaml"; }
# The stages a recipe keeps (untrained and Liger recipes set some to null; a --set into a null
# stage would create it).
stages_of() {
    local s
    for s in attention_transfer lora; do
        grep -q "^$s: null" "$(recipe "$1")" || echo "$s"
    done
}
# --set of a stage key for each stage the recipe has.
stage_sets() {
    local m=$1 s
    shift
    for s in $(stages_of "$m"); do
        for kv in "$@"; do printf -- '--set\n%s.%s\n' "$s" "$kv"; done
    done
}
method_sets() {
    if [ "$SMOKE" = 1 ]; then stage_sets "$1" eval_every=0 schedule.warmup_steps=1; fi
}
for m in $METHODS; do
    [ -f "$(recipe "$m")" ] || die "no recipe $(recipe "$m") (METHODS: $ALL_METHODS)"
done

# Validates every recipe, and imports the model from the GGUF once, before anything runs.
log "checking $(echo $METHODS | wc -w) recipes; TOKENS_PER_STAGE=$TOKENS_PER_STAGE, TEACHER_SEQUENCES=$TEACHER_SEQUENCES, device $DEVICE"
for m in $METHODS; do
    mapfile -t MSETS < <(method_sets "$m")
    TOKENS_PER_STAGE=$([ "$TOKENS_PER_STAGE" = auto ] && echo "$CAL_TOKENS" || echo "$TOKENS_PER_STAGE") \
        "$BIN" --recipe "$(recipe "$m")" --output "$RUNS/$m" "${TRAIN_SETS[@]}" "${MSETS[@]}" --dry-run \
        >"$LOGS/$m.plan" 2>&1 || { cat "$LOGS/$m.plan"; die "recipe $m does not validate"; }
done
log "model ready in $LINEARIZE_CACHE/models"

# --- running many jobs at once ----------------------------------------------------------------
declare -A PID
# run_one DIR METHOD [--set ...]: one job, its log, its pid (for the deadline) and timing.json.
run_one() {
    local dir=$1 m=$2 t0 t1 rc sets
    shift 2
    mapfile -t sets < <(method_sets "$m")
    t0=$(date +%s%N)
    "$BIN" --recipe "$(recipe "$m")" --output "$dir/runs/$m" "${TRAIN_SETS[@]}" "${sets[@]}" "$@" \
        >>"$dir/logs/$m.log" 2>&1 &
    echo $! >"$dir/logs/$m.pid"
    wait $!
    rc=$?
    t1=$(date +%s%N)
    mkdir -p "$dir/runs/$m"
    echo "{\"wall_s\": $(( (t1 - t0) / 1000000000 )).$(printf %03d $(( (t1 - t0) / 1000000 % 1000 ))), \"exit\": $rc}" >"$dir/runs/$m/timing.json"
    return $rc
}
running() { local n=0 p; for p in "${PID[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
deadline_passed() { [ $(( $(date +%s) - START )) -ge "$DEADLINE_S" ]; }
# run_all DIR "METHODS" [--set ...]: every method at once (JOBS at a time), until done or the
# deadline, which stops the rest with SIGTERM (they save a state and exit). Sets FAILED.
run_all() {
    local dir=$1 methods=$2 m
    shift 2
    mkdir -p "$dir/runs" "$dir/logs"
    PID=()
    for m in $methods; do
        while [ "$JOBS" -gt 0 ] && [ "$(running)" -ge "$JOBS" ]; do
            sleep 1
            deadline_passed && break
        done
        deadline_passed && { log "deadline: $m not started"; continue; }
        run_one "$dir" "$m" "$@" &
        PID[$m]=$!
    done
    log "running: ${!PID[*]}"
    while [ "$(running)" -gt 0 ]; do
        if deadline_passed; then
            log "deadline of ${DEADLINE_S}s: stopping $(running) unfinished run(s)"
            for m in "${!PID[@]}"; do
                kill -0 "${PID[$m]}" 2>/dev/null && kill -TERM "$(cat "$dir/logs/$m.pid")" 2>/dev/null
            done
            # Training saves a state and exits within a step; the evaluation does not stop on
            # SIGTERM, so whatever still runs after the grace period is killed.
            for _ in $(seq 30); do [ "$(running)" -eq 0 ] && break; sleep 1; done
            for m in "${!PID[@]}"; do
                kill -0 "${PID[$m]}" 2>/dev/null && kill -KILL "$(cat "$dir/logs/$m.pid")" 2>/dev/null
            done
            break
        fi
        sleep 2
    done
    FAILED=()
    for m in "${!PID[@]}"; do
        wait "${PID[$m]}" 2>/dev/null || FAILED+=("$m")
    done
}
# throughput DIR "METHODS" TOKENS: tokens/s per stage of each run, and in $DIR/budget the
# largest TOKENS_PER_STAGE whose training (teacher sampling included) fits $TRAIN_BUDGET_S.
throughput() {
    python3 - "$1" "$2" "$3" "${TRAIN_BUDGET_S:-$TRAIN_S}" "$TEACHER_SEQUENCES" <<'PY'
import json, os, re, statistics, sys
root, methods, tokens, budget_s, teacher_seqs = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(f"throughput with {len(methods)} runs at once, {tokens} tokens per stage "
      "(median of the train records after the first)")
print(f"{'run':<26} {'stage 1 tok/s':>14} {'LoRA tok/s':>12} {'train s':>8} {'job s':>7} {'s per 1M tok/stage':>19}")
best = None
for m in methods:
    path = os.path.join(root, "runs", m, "metrics.jsonl")
    rates, elapsed = {}, 0.0
    if os.path.exists(path):
        for line in open(path):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            elapsed = max(elapsed, r.get("elapsed_s", 0.0))
            if r.get("split") == "train" and r.get("tokens_per_s"):
                rates.setdefault(r["stage"], []).append(r["tokens_per_s"])
    med = {s: statistics.median(v[1:] or v) for s, v in rates.items()}
    s1, s2 = med.get("attention_transfer"), med.get("lora")
    spt = sum(1.0 / v for v in (s1, s2) if v)
    job = ""
    tpath = os.path.join(root, "runs", m, "timing.json")
    if os.path.exists(tpath):
        job = f"{json.load(open(tpath))['wall_s']:.0f}"
    fmt = lambda v: f"{v:,.0f}" if v else "-"
    print(f"{m:<26} {fmt(s1):>14} {fmt(s2):>12} {elapsed:>8.0f} {job:>7} {fmt(spt * 1e6):>19}")
    gen_s = 0.0
    log = os.path.join(root, "logs", m + ".log")
    if os.path.exists(log):
        hits = re.findall(r"teacher samples .*?tokens_per_s=([0-9.e+]+)", open(log, errors="replace").read())
        if hits:
            rate = float(hits[-1])
            gen_s = teacher_seqs * 1025 / rate
            print(f"{'':<26} teacher sampling {rate:,.0f} tok/s: {gen_s:.0f} s for {teacher_seqs} sequences")
    if spt:
        fit = (budget_s - gen_s) / spt
        best = fit if best is None else min(best, fit)
if best is not None:
    # Two significant digits (4,372,118 -> 4,300,000).
    step = 10 ** max(0, len(str(int(max(best, 1)))) - 2)
    best = max(0, int(best // step * step))
    print(f"TOKENS_PER_STAGE that fits {budget_s:.0f} s of training at this concurrency: {best}")
    open(os.path.join(root, "budget"), "w").write(str(best))
PY
}

# --- calibration (TOKENS_PER_STAGE=auto or CALIBRATE=1) ----------------------------------------
TRAINED=""
for m in $METHODS; do [ -n "$(stages_of "$m")" ] && TRAINED="$TRAINED $m"; done
if [ "$SPEED_ONLY" != 1 ] && { [ "$CALIBRATE" = 1 ] || [ "$TOKENS_PER_STAGE" = auto ]; }; then
    log "calibration: $CAL_TOKENS tokens per stage of every trained method at once, no evaluation"
    (
        export TOKENS_PER_STAGE=$CAL_TOKENS
        [ "$CALIBRATE" = 1 ] || export TEACHER_SEQUENCES=${CAL_TEACHER_SEQUENCES:-128}
        run_all "$WORK/calibration" "$TRAINED" --set eval=null --set export=null
        log "calibration runs failed: ${FAILED[*]:-none}"
        # A failed run has no rate for some stage: a budget fitted without it would be too big.
        [ ${#FAILED[@]} -eq 0 ]
    ) || die "calibration failed (logs in $WORK/calibration/logs); the budget cannot be fitted"

    now=$(( $(date +%s) - START ))
    # What is left for training once the jobs start, evaluate, the speed phase runs and the
    # results are packed; 80 % of it, for the estimate's error.
    TRAIN_BUDGET_S=$(( (DEADLINE_S - now - 30 - EVAL_S - (SPEED == 1 ? SPEED_S : 0)) * 8 / 10 ))
    [ "$CALIBRATE" = 1 ] && TRAIN_BUDGET_S=$TRAIN_S
    export TRAIN_BUDGET_S
    throughput "$WORK/calibration" "$TRAINED" "$CAL_TOKENS" | tee "$OUT/calibration.txt"
    if [ "$CALIBRATE" = 1 ]; then
        log "calibration only (CALIBRATE=1): see $OUT/calibration.txt"
        exit 0
    fi
    budget=$(cat "$WORK/calibration/budget" 2>/dev/null || echo 0)
    [ "$budget" -ge "$CAL_TOKENS" ] || die "calibration leaves no time to train (budget $budget tokens); raise DEADLINE_S or set TOKENS_PER_STAGE"
    export TOKENS_PER_STAGE=$budget
    log "TOKENS_PER_STAGE=$TOKENS_PER_STAGE (training budget ${TRAIN_BUDGET_S}s)"
fi

# --- phase 1: every run at once, training and evaluation ---------------------------------------
FAILED=()
if [ "$SPEED_ONLY" != 1 ]; then
    log "phase 1: $(echo $METHODS | wc -w) runs, TOKENS_PER_STAGE=$TOKENS_PER_STAGE"
    run_all "$WORK" "$METHODS"
    log "training and evaluation done; failed or stopped: ${FAILED[*]:-none}"

    throughput "$WORK" "$TRAINED" "$TOKENS_PER_STAGE" >"$OUT/throughput.txt" || true
    cat "$OUT/throughput.txt"
fi

# --- phase 2: speed and memory, one process at a time -----------------------------------------
# Speed does not depend on weights: the untrained conversion of the same layout is measured
# (no stages, no data-dependent eval). Runs of the same layout share one measurement.
speed_recipe() {
    case $1 in
    untrained | lolcats_sw_teacher_data) echo lolcats_sw ;;
    lolcats_tk_xent) echo lolcats_tk ;;
    lolcats_tk_sinks_s1kl | lolcats_tk_sinks_chatmix) echo lolcats_tk_sinks ;;
    liger_untrained) echo liger ;;
    *) echo "$1" ;;
    esac
}
# The softmax layers of a run's layout, as a YAML list: SOFTMAX_LAYERS_<method> if set (e.g.
# SOFTMAX_LAYERS_hybrid2="[23,24]", the layers an earlier run chose), else those its report lists
# (hybrids keep the layers stage 1 chose), else for a hybrid recipe that did not run (SPEED_ONLY)
# its count of layers spread evenly over the depth (speed depends on how many, not which).
softmax_layers() {
    local m=$1 n override="SOFTMAX_LAYERS_$1"
    if [ -n "${!override:-}" ]; then
        echo "${!override}"
        return
    fi
    if [ -f "$RUNS/$m/report/eval.json" ]; then
        python3 -c "
import json,sys; r=json.load(open(sys.argv[1]))
print([i for i,(s,t) in enumerate(zip(r['student']['attention'], r['teacher']['attention'])) if s==t])" \
            "$RUNS/$m/report/eval.json" | tr -d ' '
        return
    fi
    n=$(sed -n 's/.*softmax_by_error: *\([0-9]*\).*/\1/p' "$(recipe "$m")")
    python3 -c "
import sys; n, depth = int(sys.argv[1] or 0), 30
print([round((i + 0.5) * depth / n) for i in range(n)] if n else [])" "$n" | tr -d ' '
}
# measure_speed METHOD: decode speed and memory of its layout, into $RUNS/METHOD/speed.
declare -A MEASURED
measure_speed() {
    local m=$1 base layers key
    base=$(speed_recipe "$m")
    layers=$(softmax_layers "$m")
    key="$base:$layers"
    if [ -n "${MEASURED[$key]:-}" ]; then
        mkdir -p "$RUNS/$m" && cp -r "${MEASURED[$key]}" "$RUNS/$m/speed"
        return
    fi
    "$BIN" --recipe "$(recipe "$base")" --output "$RUNS/$m/speed" "${SETS[@]}" \
        --set attention_transfer=null --set lora=null --set conversion.softmax_by_error=null \
        --set "conversion.softmax_layers=$layers" --set data.teacher_samples=null \
        --set 'data.sources=[{kind: text, path: "offline:text", split: train}]' \
        --set eval.perplexity.enabled=false --set eval.attention_error.enabled=false \
        --set eval.passkey.enabled=false --set eval.multikey.enabled=false \
        --set eval.mqar.enabled=false --set eval.retrieval_heads.enabled=false \
        --set eval.multiple_choice.enabled=false --set eval.generations.enabled=false \
        --set eval.decode_check.enabled=false --set export=null >"$LOGS/$m.speed.log" 2>&1 \
        && MEASURED[$key]=$RUNS/$m/speed \
        || { log "speed of $m failed (see $m.speed.log)"; return; }
    log "speed of $m measured (softmax layers $layers)"
}
if [ "$SPEED" = 1 ]; then
    for m in $METHODS; do
        [ -f "$RUNS/$m/report/eval.json" ] || [ "$SPEED_ONLY" = 1 ] || continue
        if [ $(( $(date +%s) - START + 30 )) -ge "$DEADLINE_S" ]; then
            log "deadline: speed of $m not measured"
            continue
        fi
        measure_speed "$m"
    done
fi
if [ "$SPEED_ONLY" = 1 ]; then
    python3 - "$RUNS" $METHODS <<'PY' | tee "$OUT/speed.md"
import json, os, sys
runs, methods = sys.argv[1], sys.argv[2:]
print("| layout | context | prefill tok/s | decode tok/s | prefill MiB | decode MiB | cache MiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
teacher_done = False
mib = lambda b: "–" if b is None else f"{b / 2**20:,.1f}"
for m in methods:
    path = os.path.join(runs, m, "speed", "report", "eval.json")
    if not os.path.exists(path):
        print(f"| {m} | not measured | | | | | |")
        continue
    speed = json.load(open(path))["speed"]
    for model in ("student", "teacher"):
        if model == "teacher" and teacher_done:
            continue
        name = "teacher (softmax, KV cache)" if model == "teacher" else m
        for p in speed[model]["points"]:
            print(f"| {name} | {p['context']} | {p['prefill_tokens_per_s']:,.0f} | "
                  f"{p['decode_tokens_per_s']:,.1f} | {mib(p.get('prefill_peak_bytes'))} | "
                  f"{mib(p.get('decode_peak_bytes'))} | {mib(p.get('cache_bytes'))} |")
    teacher_done = True
PY
fi

# --- the comparison ---------------------------------------------------------------------------
DONE=()
for m in $METHODS; do [ -f "$RUNS/$m/report/eval.json" ] && DONE+=("$RUNS/$m"); done
if [ ${#DONE[@]} -gt 0 ]; then
    "$BIN" compare "${DONE[@]}" --out "$OUT" || log "compare failed"
else
    log "no run finished its evaluation"
fi

# Each run's small files (no weights, no states) in one archive: $OUT returns at most 8 files.
(cd "$WORK" && find runs logs -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \
    -o -name '*.png' -o -name '*.yaml' -o -name '*.log' -o -name '*.plan' \) \
    -not -path '*/state/*' -not -path '*/teacher-samples/*' -print0 |
    tar --null -czf "$OUT/runs.tar.gz" -T -)
ls -la "$OUT"
log "done: ${#DONE[@]} of $(echo $METHODS | wc -w) runs compared; failed or stopped: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
