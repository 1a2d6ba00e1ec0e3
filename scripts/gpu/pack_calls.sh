#!/usr/bin/env bash
# Files larger than one device call can carry (the working tree plus carried paths: 64 MiB), cut
# into as few calls as the limit allows, and put back together on the GPU machine.
#
#   scripts/gpu/pack_calls.sh pack FILE...   # here: target/gpu/calls/c1, c2, ... each to be
#                                            # carried by one call, back to back
#   scripts/gpu/pack_calls.sh stash DIR      # there, in each call: keeps DIR's parts in $STASH
#                                            # and joins every file whose parts have all arrived
#
# Files are cut in the order given, so list first what the first calls need (the test and CLI
# archive of cuda_tests.sh, the text corpus, then the models). Compress models first with
# `xz -3 -T2 -k` (a GGUF shrinks by 5-7%): `stash` decompresses a joined NAME.gguf.xz to NAME.gguf;
# every other file is kept as it came.
# The limit counts the working tree as `du` does (whole blocks): the room per call is measured
# from the tree as it is now, so pack after the last commit that travels.
#
# Environment: STASH where parts and joined files live on the GPU machine [/root/stash];
# MARGIN bytes left free in each call [131072].
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
STASH=${STASH:-/root/stash}
LIMIT=$((64 * 1024 * 1024))

case "${1:-}" in
pack)
    shift
    [ $# -gt 0 ] || { echo "pack_calls.sh pack: name the files to carry" >&2; exit 2; }
    for f in "$@"; do [ -f "$f" ] || { echo "pack_calls.sh: $f: no such file" >&2; exit 1; }; done
    tree=$(git ls-files -z | xargs -0 du -cB1 | tail -1 | cut -f1)
    # The manifest and block rounding of each part take the margin.
    room=$((LIMIT - tree - ${MARGIN:-131072}))
    rm -rf target/gpu/calls && mkdir -p target/gpu/calls
    python3 - "$room" "$@" <<'PY'
import hashlib, json, os, sys
room, files = int(sys.argv[1]), sys.argv[2:]
calls, left, parts = [], 0, {}
for path in files:
    name, size, off = os.path.basename(path), os.path.getsize(path), 0
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    parts[name] = {"sha256": digest, "parts": 0}
    with open(path, "rb") as f:
        while off < size:
            if left == 0:
                calls.append([])
                left = room
            n = min(left, size - off)
            calls[-1].append((name, parts[name]["parts"], f.read(n)))
            parts[name]["parts"] += 1
            off, left = off + n, left - n
for i, call in enumerate(calls, start=1):
    d = f"target/gpu/calls/c{i}"
    os.makedirs(d)
    for name, k, data in call:
        with open(f"{d}/{name}.part{k}", "wb") as out:
            out.write(data)
    json.dump(parts, open(f"{d}/manifest.json", "w"), indent=1)
print(f"{len(calls)} calls of at most {room} bytes each: carry target/gpu/calls/c1 ... c{len(calls)} in turn")
PY
    ;;
stash)
    dir=${2:?pack_calls.sh stash DIR}
    mkdir -p "$STASH/parts"
    cp "$dir"/*.part* "$STASH/parts/"
    python3 - "$STASH" "$dir/manifest.json" <<'PY'
import hashlib, json, lzma, os, shutil, sys
stash, manifest = sys.argv[1], json.load(open(sys.argv[2]))
for name, m in manifest.items():
    unpack = name.endswith(".gguf.xz")
    final = name[:-3] if unpack else name
    if os.path.exists(os.path.join(stash, final)):
        continue
    paths = [os.path.join(stash, "parts", f"{name}.part{k}") for k in range(m["parts"])]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"{name}: {m['parts'] - len(missing)} of {m['parts']} parts here")
        continue
    h = hashlib.sha256()
    for p in paths:
        h.update(open(p, "rb").read())
    if h.hexdigest() != m["sha256"]:
        sys.exit(f"{name}: joined parts have sha256 {h.hexdigest()}, expected {m['sha256']}")
    tmp = os.path.join(stash, final + ".tmp")
    with open(tmp, "wb") as out:
        if unpack:
            dec = lzma.LZMADecompressor()
            for p in paths:
                out.write(dec.decompress(open(p, "rb").read()))
        else:
            for p in paths:
                shutil.copyfileobj(open(p, "rb"), out)
    os.replace(tmp, os.path.join(stash, final))
    for p in paths:
        os.remove(p)
    print(f"{final}: joined from {m['parts']} parts")
PY
    ;;
*)
    echo "usage: $0 pack FILE... | stash DIR" >&2
    exit 2
    ;;
esac
