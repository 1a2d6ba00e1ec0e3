#!/usr/bin/env bash
# Builds what scripts/gpu/quality.sh needs on the GPU machine, as ignored paths to carry:
#   target/release/linearize-gpu   the binary, stripped (~16 MiB; links libtorch_cuda, and
#                                  LD_LIBRARY_PATH finds torch there)
#   target/gpu/text.tar.xz         the offline text corpus (~4.3 MiB: xz's large window stores the
#                                  split files and the per-document files, the same text, once)
# Run it in the checkout the GPU call carries from.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
cargo build --release -p linearize-cli
mkdir -p target/release target/gpu
strip -o target/release/linearize-gpu "$TARGET/release/linearize"
# `offline:text` resolves in LINEARIZE_CACHE (.cache here, see .cargo/config.toml); building it
# the first time fetches the packages.
LINEARIZE_CACHE=${LINEARIZE_CACHE:-$ROOT/.cache} target/release/linearize-gpu fetch text
CORPUS=${LINEARIZE_CACHE:-$ROOT/.cache}/text
[ -f "$CORPUS/manifest.json" ] || { echo "no corpus in $CORPUS: run \`linearize fetch\` first" >&2; exit 1; }
tar -cf - -C "$CORPUS" . | xz -9 -T2 >target/gpu/text.tar.xz
ls -la target/release/linearize-gpu target/gpu/text.tar.xz
