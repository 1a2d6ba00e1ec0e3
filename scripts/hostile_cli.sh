#!/usr/bin/env bash
# Bad inputs through the real CLI: every case must end in a clear error (exit 1) or success,
# never a panic (101) or a signal (>= 128). Prints one line per case and fails if any case
# crashed. Uses the tiny test model and, for a tokenizer, the offline SmolLM2 in the cache.
#
#   scripts/hostile_cli.sh [target/release/linearize]
set -u
bin=${1:-target/release/linearize}
root=$(cd "$(dirname "$0")/.." && pwd)
fixture="$root/crates/linearize-models/tests/fixtures/llama3_tied_sharded"
gguf="$root/crates/linearize-models/tests/fixtures/gguf/tiny-spm.gguf"
cache=${LINEARIZE_CACHE:-$root/.cache}
smollm2="$cache/models/SmolLM2-135M-Instruct"
[ -f "$smollm2/tokenizer.json" ] || "$bin" fetch smollm2 >/dev/null 2>&1 || true
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 RUST_LOG=error

crashed=0
total=0
# case NAME COMMAND...: runs it, prints its status and first error line.
case_() {
    local name=$1
    shift
    total=$((total + 1))
    timeout 120 "$@" >"$work/out" 2>"$work/err"
    local rc=$?
    local line
    line=$(grep -v '^\s*$' "$work/err" | head -n 1 | cut -c1-150)
    if [ "$rc" -eq 101 ] || [ "$rc" -ge 124 ]; then
        crashed=$((crashed + 1))
        echo "CRASH rc=$rc $name: $line"
    else
        echo "ok    rc=$rc $name: $line"
    fi
}

# A model directory: the tiny checkpoint with SmolLM2's tokenizer (vocabulary 49152 > 128).
model() {
    local dir="$work/$1"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$fixture"/config.json "$fixture"/model*.safetensors* "$dir"/
    cp "$smollm2"/tokenizer.json "$smollm2"/tokenizer_config.json "$dir"/ 2>/dev/null
    echo "$dir"
}
set_key() { # set_key DIR KEY JSON_VALUE
    python3 -c "import json,sys; p=sys.argv[1]+'/config.json'; c=json.load(open(p)); c[sys.argv[2]]=json.loads(sys.argv[3]); json.dump(c,open(p,'w'))" "$@"
}

m=$(model plain)
case_ "generate: tokenizer larger than the vocabulary" "$bin" generate --model "$m" --prompt hello --max-new-tokens 2 --device cpu
case_ "inspect: plain" "$bin" inspect --model "$m"
for kv in 'vocab_size 1000000000000' 'vocab_size -5' 'hidden_size 0' 'hidden_size 33' \
    'num_hidden_layers 100000' 'num_hidden_layers 0' 'max_position_embeddings 1000000000000' \
    'num_attention_heads 0' 'num_key_value_heads 3' 'head_dim 0' 'intermediate_size 1' \
    'rope_theta -1' 'rms_norm_eps "x"' 'tie_word_embeddings false' 'rope_scaling {"rope_type":"nope"}'; do
    set -- $kv
    m=$(model "cfg-$1")
    set_key "$m" "$1" "$2"
    case_ "generate: config $1=$2" "$bin" generate --model "$m" --prompt hi --max-new-tokens 2 --device cpu
    case_ "eval: config $1=$2" "$bin" eval --model "$m" --perplexity "$fixture/config.json" --ctx 8 --device cpu
done

m=$(model truncated)
truncate -s 100 "$m/model-00002-of-00002.safetensors"
case_ "inspect: truncated shard" "$bin" inspect --model "$m"
case_ "generate: truncated shard" "$bin" generate --model "$m" --prompt hi --device cpu
m=$(model badheader)
printf '\xff\xff\xff\xff\xff\xff\xff\x7f{}' >"$m/model-00001-of-00002.safetensors"
case_ "generate: header length 2^63" "$bin" generate --model "$m" --prompt hi --device cpu
m=$(model badindex)
echo '{"weight_map": {"model.norm.weight": "../../../../etc/passwd"}}' >"$m/model.safetensors.index.json"
case_ "inspect: index escapes" "$bin" inspect --model "$m"
m=$(model template)
python3 - "$m" <<'EOF'
import json, sys
p = sys.argv[1] + "/tokenizer_config.json"
c = json.load(open(p))
c["chat_template"] = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
json.dump(c, open(p, "w"))
EOF
case_ "generate --chat: looping template" "$bin" generate --model "$m" --prompt hi --chat --device cpu
m=$(model plain2)
case_ "eval: ctx 0" "$bin" eval --model "$m" --perplexity "$fixture/config.json" --ctx 0 --device cpu
case_ "eval: ctx 2^40" "$bin" eval --model "$m" --perplexity "$fixture/config.json" --ctx 1099511627776 --device cpu
case_ "generate: max-new-tokens 2^40" "$bin" generate --model "$m" --prompt hi --max-new-tokens 1099511627776 --device cpu
case_ "generate: top-p -1" "$bin" generate --model "$m" --prompt hi --temperature 1 --top-p -1 --device cpu
case_ "generate: temperature NaN" "$bin" generate --model "$m" --prompt hi --temperature NaN --device cpu

for cut in 0 4 24 200 4000; do
    head -c "$cut" "$gguf" >"$work/cut.gguf"
    case_ "import gguf: first $cut bytes" "$bin" import gguf "$work/cut.gguf" --out "$work/imported-$cut"
done
python3 - "$gguf" "$work/flipped.gguf" <<'EOF'
import sys, random
data = bytearray(open(sys.argv[1], "rb").read())
random.seed(7)
for _ in range(40):
    data[random.randrange(0, 1024)] ^= 1 << random.randrange(8)
open(sys.argv[2], "wb").write(data)
EOF
case_ "import gguf: 40 bit flips in the header" "$bin" import gguf "$work/flipped.gguf" --out "$work/imported-flipped"

mkdir -p "$work/data"
printf 'ok text\n\xff\xfe not utf-8\n' >"$work/data/bad.txt"
mkdir -p "$work/data/loop" && ln -s .. "$work/data/loop/up"
for set in 'data.seq_len=-1' 'data.seq_len=0' 'data.batch_size=0' 'attention_transfer.max_steps=0' \
    "data.sources=[{kind: text, path: $work/data}]" 'conversion.attention.window_size=-3' \
    'model.source=../nowhere' 'model.source=org/x@/etc' 'seed=-1'; do
    case_ "recipe --set $set --dry-run" "$bin" --recipe "$root/recipes/quickstart.yaml" --set "$set" --dry-run
done

echo "$total cases, $crashed crashed"
[ "$crashed" -eq 0 ]
