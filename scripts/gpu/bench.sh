#!/usr/bin/env bash
# GPU benchmarks of issue #9 on one H100/H200 with random weights (no weights travel).
#   scripts/gpu/bench.sh kernels-stages   # kernels at 1k..64k, then stage 1/2 vs teacher forward
#   scripts/gpu/bench.sh stages-batched   # stage 1 at batch 8 x 1024, stage 2 at 2 x 2048
#   scripts/gpu/bench.sh decode           # decoding at 4k, 32k, 128k: teacher vs student (eager
#                                         # and by CUDA graph replays), batches up to what the
#                                         # memory left beside the model holds (MAX_BATCH caps)
#   scripts/gpu/bench.sh profile          # the stages-batched cases under libtorch's profiler
#   scripts/gpu/bench.sh gated-deltanet   # chunked Gated DeltaNet at 16k, 64k (bf16, 32 heads,
#                                         # d 128) beside fla's chunk_gated_delta_rule (needs fla)
#   scripts/gpu/bench.sh lizard           # chunked Lizard tk64 beside LoLCATs tk64 (libtorch
#                                         # chunked form and fused kernels) at 4k, 16k, 64k
#   scripts/gpu/bench.sh gla              # GLA and Liger at 16k, 64k (bf16, 32 heads, d 128),
#                                         # libtorch-chunked and fused, beside fla's chunk_gla
#                                         # (needs fla: its wheels unpacked on PYTHONPATH)
#   scripts/gpu/bench.sh linear           # normalised linear attention at 16k, 64k (bf16, 32
#                                         # heads, d 128, f 128), libtorch-chunked and fused,
#                                         # beside fla's chunk_linear_attn (needs fla)
#   scripts/gpu/bench.sh sinks            # LoLCATs tk64 + 4 sinks: the kernels (32 heads, d 128,
#                                         # f 128) libtorch-chunked vs fused at 4k, 16k, 64k, and
#                                         # stage 1 on SmolLM2-135M at 8 x 1024 with
#                                         # configs/attention/lolcats_tk_sinks.yaml, fused
#                                         # kernels on and off
#   scripts/gpu/bench.sh loss-chunk       # stage 2 (KL) at 8 x 1024 on SmolLM2-135M and
#                                         # Gemma-3-270M: peak memory with the loss in one piece
#                                         # and in chunks of 1024 tokens (lora.loss_chunk)
# The binary is target/release/linearize-gpu (built on the CPU machine, carried); results and
# logs go to $OUT (default ./bench-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
BIN=${BIN:-target/release/linearize-gpu}
torch_lib=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
MODEL=${MODEL:-configs/models/llama3.1_8b/config.json}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

case "${1:-}" in
  kernels-stages)
    "$BIN" bench kernels --device cuda --dtype bf16 --lengths 1024,4096,16384,65536 \
      --forms chunked --heads 32 --head-dim 128 --json "$OUT/kernels.json" 2>"$OUT/kernels.log" \
      | tee "$OUT/kernels.md"
    "$BIN" bench stages --device cuda --dtype bf16 --config "$MODEL" --ctx 1024,2048,4096 \
      --steps ${STEPS:-6} --warmup 2 --json "$OUT/stages.json" 2>"$OUT/stages.log" \
      | tee "$OUT/stages.md"
    ;;
  stages-batched)
    # Larger batches amortise the per-operation launch cost of the student's kernels.
    "$BIN" bench stages --device cuda --dtype bf16 --config "$MODEL" --ctx 1024 --batch 8 \
      --cases teacher,stage1 --steps 4 --warmup 2 --json "$OUT/stages_b8.json" \
      2>"$OUT/stages_b8.log" | tee "$OUT/stages_b8.md"
    "$BIN" bench stages --device cuda --dtype bf16 --config "$MODEL" --ctx 2048 --batch 2 \
      --cases teacher,stage2 --steps 4 --warmup 2 --json "$OUT/stages_b2.json" \
      2>"$OUT/stages_b2.log" | tee "$OUT/stages_b2.md"
    ;;
  profile)
    # Device time per range, operator and kernel of one update (summaries printed to the .md
    # files; traces, summaries and logs in profile.tar.xz).
    P=$(mktemp -d)
    "$BIN" bench stages --device cuda --dtype bf16 --config "$MODEL" --ctx 1024 --batch 8 \
      --cases teacher,stage1 --steps 2 --warmup 2 --profile "$P" --json "$P/stages_b8.json" \
      2>"$P/stages_b8.log" | tee "$OUT/profile_b8.md"
    "$BIN" bench stages --device cuda --dtype bf16 --config "$MODEL" --ctx 2048 --batch 2 \
      --cases teacher,stage2 --steps 2 --warmup 2 --profile "$P" --json "$P/stages_b2.json" \
      2>"$P/stages_b2.log" | tee "$OUT/profile_b2.md"
    tar -cf - -C "$P" . | xz -6 -T0 >"$OUT/profile.tar.xz"
    ;;
  decode)
    "$BIN" bench decode --device cuda --dtype bf16 --config "$MODEL" ${ATTENTION:+--attention "$ATTENTION"} \
      --models ${MODELS:-teacher,student,student-graph} ${MAX_BATCH:+--max-batch "$MAX_BATCH"} \
      --contexts ${CONTEXTS:-4096,32768,131072} --tokens ${TOKENS:-8} --refine 2 \
      --json "$OUT/decode.json" --plot "$OUT/decode.png" 2>"$OUT/decode.log" | tee "$OUT/decode.md"
    ;;
  gated-deltanet)
    "$BIN" bench kernels --device cuda --dtype bf16 --methods gated-deltanet --forms chunked \
      --lengths ${LENGTHS:-16384,65536} --heads 32 --head-dim 128 --json "$OUT/gdn.json" \
      2>"$OUT/gdn.log" | tee "$OUT/gdn.md"
    python3 scripts/gpu/fla_ops.py --op gated_delta_rule --lengths ${LENGTHS:-16384,65536} --heads 32 \
      --head-dim 128 --dtype bf16 2>"$OUT/gdn_fla.log" | tee "$OUT/gdn_fla.jsonl"
    ;;
  lizard)
    "$BIN" bench kernels --device cuda --dtype bf16 --methods lolcats-tk,lizard-tk \
      --forms chunked,fused --lengths ${LENGTHS:-4096,16384,65536} --heads 32 --head-dim 128 \
      --json "$OUT/lizard.json" 2>"$OUT/lizard.log" | tee "$OUT/lizard.md"
    ;;
  gla)
    "$BIN" bench kernels --device cuda --dtype bf16 --methods gla,liger --forms chunked,fused \
      --lengths ${LENGTHS:-16384,65536} --heads 32 --head-dim 128 --json "$OUT/gla.json" \
      2>"$OUT/gla.log" | tee "$OUT/gla.md"
    python3 scripts/gpu/fla_ops.py --op gla --lengths ${LENGTHS:-16384,65536} --heads 32 --head-dim 128 \
      --dtype bf16 2>"$OUT/gla_fla.log" | tee "$OUT/gla_fla.jsonl"
    ;;
  linear)
    "$BIN" bench kernels --device cuda --dtype bf16 --methods linear --forms chunked,fused \
      --lengths ${LENGTHS:-16384,65536} --heads 32 --head-dim 128 --features 128 \
      --json "$OUT/linear.json" 2>"$OUT/linear.log" | tee "$OUT/linear.md"
    python3 scripts/gpu/fla_ops.py --op linear_attn --lengths ${LENGTHS:-16384,65536} --heads 32 \
      --head-dim 128 --features 128 --dtype bf16 2>"$OUT/linear_fla.log" \
      | tee "$OUT/linear_fla.jsonl"
    ;;
  sinks)
    "$BIN" bench kernels --device cuda --dtype bf16 --methods lolcats-tk --sinks 4 \
      --forms chunked,fused,transfer --lengths ${LENGTHS:-4096,16384,65536} --heads 32 \
      --head-dim 128 --json "$OUT/sinks_kernels.json" 2>"$OUT/sinks_kernels.log" \
      | tee "$OUT/sinks_kernels.md"
    # The preset with `fused_kernels` set each way (the libtorch chunked form is what sinks took
    # before the fused kernels knew them).
    for fused in true false; do
      preset="$OUT/lolcats_tk_sinks_fused_$fused.yaml"
      sed "s/^    method: lolcats$/&\n    fused_kernels: $fused/" \
        configs/attention/lolcats_tk_sinks.yaml >"$preset"
      grep -q "fused_kernels: $fused" "$preset"
      "$BIN" bench stages --device cuda --dtype bf16 --config configs/models/smollm2_135m/config.json \
        --attention "$preset" --ctx 1024 --batch 8 --cases stage1 --steps ${STEPS:-6} --warmup 2 \
        --json "$OUT/sinks_stage1_fused_$fused.json" 2>"$OUT/sinks_stage1_fused_$fused.log" \
        | tee "$OUT/sinks_stage1_fused_$fused.md"
    done
    ;;
  loss-chunk)
    # A chunk of 1000000 tokens holds the micro-batch's whole logits, as before lora.loss_chunk.
    for model in smollm2_135m gemma3_270m; do
      for chunk in 1000000 1024; do
        "$BIN" bench stages --device cuda --dtype bf16 --config "configs/models/$model/config.json" \
          --ctx 1024 --batch 8 --cases stage2 --stage2-loss kl --loss-chunk "$chunk" --steps 4 \
          --warmup 2 --json "$OUT/loss_chunk_${model}_$chunk.json" \
          2>"$OUT/loss_chunk_${model}_$chunk.log" | tee "$OUT/loss_chunk_${model}_$chunk.md"
      done
    done
    ;;
  *)
    echo "usage: $0 kernels-stages|stages-batched|profile|decode|gated-deltanet|lizard|gla|linear|sinks|loss-chunk" >&2
    exit 2
    ;;
esac
