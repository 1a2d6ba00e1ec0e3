#!/usr/bin/env bash
# Every test that needs a CUDA device (`#[ignore = "needs a CUDA device"]`), in one step: run it
# first in every GPU session, before any study. A CUDA-only defect (a read from the device inside
# a CUDA graph's capture, in session 11) otherwise surfaces only in the middle of a long run.
#
#   scripts/gpu/cuda_tests.sh pack   # here: builds the test binaries and the CLI, strips them
#                                    # into target/gpu/cuda_tests.tar.xz (~9 MB) to carry
#   scripts/gpu/cuda_tests.sh run    # on the GPU machine: runs each with --ignored; exit 1 if any
#                                    # fails; the output also goes to $OUT/cuda_tests.txt; the CLI
#                                    # lands in target/release/linearize-gpu (quality.sh, bench.sh)
#
# The binaries share most of their code: compressed one by one they are ~25 MB, beyond what one
# call can carry beside a model part; in one stream with a dictionary larger than each (256 MiB)
# the repeats compress away.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
# Every test file with a CUDA-only test, as crate:name (found, so that a new one is not missed).
cuda_test_files() {
    grep -l 'ignore = "needs a CUDA device"' crates/*/tests/*.rs |
        sed -E 's|crates/([^/]+)/tests/([^/]+)\.rs|\1:\2|'
}
ARCHIVE=${ARCHIVE:-target/gpu/cuda_tests.tar.xz}
case "${1:-}" in
pack)
    set -e
    DIR=$(mktemp -d)
    cuda_test_files >"$DIR/tests.txt"
    for t in $(cat "$DIR/tests.txt"); do
        crate=${t%%:*} name=${t##*:}
        path=$(cargo test --release -p "$crate" --test "$name" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["executable"])')
        [ -n "$path" ] || { echo "no test binary for $t" >&2; exit 1; }
        strip -o "$DIR/$name" "$path"
    done
    cargo build --release -p linearize-cli
    strip -o "$DIR/linearize-gpu" target/release/linearize
    mkdir -p target/gpu
    tar -C "$DIR" -cf - . | xz -T1 --lzma2=preset=6,dict=256MiB >"$ARCHIVE"
    rm -rf "$DIR"
    ls -la "$ARCHIVE"
    ;;
run)
    OUT=${OUT:-$ROOT/checkpoints/cuda-tests-out}
    mkdir -p "$OUT" /tmp/cuda-tests
    xz -dc "$ARCHIVE" | tar -xf - -C /tmp/cuda-tests || exit 1
    mkdir -p target/release && cp /tmp/cuda-tests/linearize-gpu target/release/linearize-gpu || exit 1
    TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
    export LD_LIBRARY_PATH=$TORCH_LIB:${LD_LIBRARY_PATH:-}
    export LINEARIZE_MODEL_FIXTURES=$ROOT/crates/linearize-models/tests/fixtures
    TESTS=$(cat /tmp/cuda-tests/tests.txt)
    for t in $TESTS; do
        crate=${t%%:*} name=${t##*:}
        echo "== $crate --test $name -- --ignored"
        (cd "crates/$crate" && timeout 300 /tmp/cuda-tests/$name --ignored --test-threads 1 2>&1 | tail -15)
    done | tee "$OUT/cuda_tests.txt"
    # A failed or timed-out binary prints no "test result: ok".
    [ "$(grep -c "^test result: ok" "$OUT/cuda_tests.txt")" -eq "$(echo $TESTS | wc -w)" ] ||
        { echo "cuda_tests: a test binary failed (above)" >&2; exit 1; }
    echo "cuda_tests: all passed"
    ;;
*)
    echo "usage: $0 pack|run" >&2
    exit 2
    ;;
esac
