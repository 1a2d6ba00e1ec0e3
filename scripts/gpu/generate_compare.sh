#!/usr/bin/env bash
# transformers' `generate` on a linearize export beside `linearize generate` on the same export,
# prompt and device (issue 23, docs/BENCHMARKS.md): greedy, CTX prompt tokens, NEW new tokens.
#
#   scripts/gpu/generate_compare.sh EXPORT_DIR TEXT_FILE OUT_DIR
#
# Environment: BIN (the linearize binary) [target/release/linearize-gpu], CTX [4096], NEW [256],
# DTYPES ["bf16 f32"]. Writes OUT_DIR/generate_compare.md (the table) and the per-run JSON/logs.
set -euo pipefail
EXPORT=$1 TEXT=$2 OUT=$3
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/linearize-gpu}
CTX=${CTX:-4096} NEW=${NEW:-256}
DTYPES=${DTYPES:-bf16 f32}
mkdir -p "$OUT"
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH} NO_COLOR=1
if [ -z "${LD_LIBRARY_PATH:-}" ]; then
    LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
    export LD_LIBRARY_PATH
fi
for dtype in $DTYPES; do
    for loader in import remote; do
        flag=$([ $loader = remote ] && echo --remote || true)
        python3 "$ROOT/scripts/gpu/hf_generate.py" --model "$EXPORT" --text "$TEXT" --ctx "$CTX" \
            --new "$NEW" --dtype "$dtype" $flag --prompt-out "$OUT/prompt.txt" \
            --json "$OUT/hf_${dtype}_${loader}.json"
    done
    # One warm-up run (CUDA graph capture, allocator), then the timed one.
    for run in warmup timed; do
        "$BIN" generate --model "$EXPORT" --device cuda --dtype "$dtype" --max-new-tokens "$NEW" \
            --prompt "$(cat "$OUT/prompt.txt")" >"$OUT/linearize_${dtype}.txt" \
            2>"$OUT/linearize_${dtype}.log"
    done
done
python3 - "$OUT" $DTYPES <<'PY' | tee "$OUT/generate_compare.md"
import json, os, re, sys
out, dtypes = sys.argv[1], sys.argv[2:]
print("| runtime | dtype | prompt tokens | new tokens | tokens/s end to end | decode tokens/s | same text as linearize |")
print("|---|---|---:|---:|---:|---:|---|")
for dtype in dtypes:
    log = open(os.path.join(out, f"linearize_{dtype}.log")).read()
    m = re.search(r"(\d+) prompt tokens, (\d+) generated in ([\d.]+) s \(([\d.]+) tokens/s\)", log)
    ours = open(os.path.join(out, f"linearize_{dtype}.txt")).read().strip()
    if m:
        print(f"| linearize generate (CUDA graphs) | {dtype} | {m[1]} | {m[2]} | {float(m[4]):,.1f} | – | – |")
    else:
        print(f"| linearize generate | {dtype} | failed: see linearize_{dtype}.log | | | | |")
    for loader in ("import", "remote"):
        r = json.load(open(os.path.join(out, f"hf_{dtype}_{loader}.json")))
        theirs = r["text"].strip()
        # Where the two greedy continuations part, in characters of the shorter one.
        common = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        same = "yes" if ours == theirs else f"first {common} of {len(theirs)} chars"
        print(f"| transformers generate ({r['loader']}) | {dtype} | {r['prompt_tokens']} | {r['new_tokens']} | "
              f"{r['end_to_end_tokens_per_s']:,.1f} | {r['decode_tokens_per_s']:,.1f} | {same} |")
PY
