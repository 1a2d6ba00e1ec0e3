#!/usr/bin/env bash
# CUDA against CPU on the GPU machine (issue 2): the decoder tests of `tests/cuda_parity.rs`
# (the HF fixtures in f32 and bf16, cached decoding), then the imported SmolLM2 scored by
# `linearize eval --perplexity` (ctx 512, 64 windows of the test split) on the CPU and on CUDA in
# f32 and bf16 against the transformers reference, and a greedy chat answer on CUDA.
#
# Carry the test binary and the linearize binary:
#   cargo test --release -p linearize-models --test cuda_parity --no-run   # prints its path
#   strip -o target/gpu/cuda_parity <that path>
#   scripts/gpu/prepare.sh
# and have the model imported where LINEARIZE_CACHE points (scripts/gpu/quality.sh does it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BIN=${BIN:-target/release/linearize-gpu}
TEST_BIN=${TEST_BIN:-target/gpu/cuda_parity}
OUT=${OUT:-$ROOT/checkpoints/cuda-parity-out}
LINEARIZE_CACHE=${LINEARIZE_CACHE:-/tmp/linearize-quality/cache}
MODEL=$LINEARIZE_CACHE/models/SmolLM2-135M-Instruct
TEXT=$LINEARIZE_CACHE/text/test.txt
mkdir -p "$OUT"
if [ -z "${LD_LIBRARY_PATH:-}" ]; then
    LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
    export LD_LIBRARY_PATH
fi

LINEARIZE_MODEL_FIXTURES=$ROOT/crates/linearize-models/tests/fixtures \
    "$TEST_BIN" --ignored --nocapture --test-threads 1 2>&1 | tee "$OUT/cuda_parity_tests.txt"

[ -f "$MODEL/config.json" ] || { echo "no imported model in $MODEL" >&2; exit 1; }
for run in "cpu f32" "cuda f32" "cuda bf16"; do
    set -- $run
    "$BIN" eval --device "$1" --dtype "$2" --ctx 512 --max-windows 64 --batch-size 4 \
        --model "$MODEL" --perplexity "$TEXT" >"$OUT/ppl_$1_$2.json"
    echo "$1 $2: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["perplexity"])' "$OUT/ppl_$1_$2.json")"
done | tee "$OUT/ppl.txt"
"$BIN" generate --device cuda --model "$MODEL" --chat \
    --prompt "What is the capital of France?" | tee "$OUT/generate_cuda.txt"
