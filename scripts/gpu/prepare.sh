#!/usr/bin/env bash
# Builds what scripts/gpu/quality.sh needs on the GPU machine, as ignored paths to carry:
#   target/release/linearize-gpu   the binary (links libtorch_cuda; LD_LIBRARY_PATH finds torch)
#   target/gpu/text.tar.gz         the offline text corpus (train/validation/test + documents)
# Run it in the checkout the GPU call carries from.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
cargo build --release -p linearize-cli
mkdir -p target/release target/gpu
cp "$TARGET/release/linearize" target/release/linearize-gpu
# `offline:text` resolves in LINEARIZE_CACHE (.cache here, see .cargo/config.toml); building it
# the first time fetches the packages.
LINEARIZE_CACHE=${LINEARIZE_CACHE:-$ROOT/.cache} target/release/linearize-gpu fetch text
CORPUS=${LINEARIZE_CACHE:-$ROOT/.cache}/text
[ -f "$CORPUS/manifest.json" ] || { echo "no corpus in $CORPUS: run \`linearize fetch\` first" >&2; exit 1; }
tar -czf target/gpu/text.tar.gz -C "$CORPUS" .
ls -la target/release/linearize-gpu target/gpu/text.tar.gz
du -ch target/release/linearize-gpu target/gpu/text.tar.gz | tail -1
