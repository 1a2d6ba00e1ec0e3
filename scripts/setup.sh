#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv with torch==2.11.0 (libtorch for tch 0.24), then build the
# workspace. Safe to re-run: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  # torch (4.7 GB installed) plus a release build need about 12 GB: say so plainly rather than
  # let pip stop half way with ENOSPC.
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4/1048576)}')
  if [ "$free_gb" -lt 12 ]; then
    echo "setup: only ${free_gb} GB free in $(pwd); torch and the build need about 12 GB" >&2
    exit 1
  fi
  echo "setup: installing torch==$TORCH_VERSION (about 4.7 GB)" >&2
  "$VENV/bin/pip" install --quiet --no-cache-dir "torch==$TORCH_VERSION"
fi
torch_dir=$("$VENV/bin/python" -c 'import torch,os;print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" "$VENV/libtorch"
# The torch wheel's CUDA runtime headers lack crt/ (shipped with nvcc), which libtorch's CUDA
# graph header includes: the small nvidia-cuda-crt package of the same CUDA release adds it.
if [ -d "$torch_dir/../nvidia/cu13/include" ] && [ ! -e "$torch_dir/../nvidia/cu13/include/crt/host_config.h" ]; then
  echo "setup: installing the CUDA crt headers (nvidia-cuda-crt 13.0)" >&2
  "$VENV/bin/pip" install --quiet --no-cache-dir "nvidia-cuda-crt==13.0.*"
fi

# Triton (installed with the CUDA torch wheel) compiles the fused kernels at build time; its
# interpreter, which checks them on the CPU in the tests, needs numpy and fails with numpy 2.4.
if ! "$VENV/bin/python" -c "import numpy,sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" 2>/dev/null; then
  echo "setup: installing numpy<2.4 (Triton's interpreter)" >&2
  "$VENV/bin/pip" install --quiet --no-cache-dir "numpy<2.4"
fi

# pins_installed FILE [SITE]: whether every `name==version` of FILE is installed (in SITE first,
# when given), so that a set-up machine does not wait on pip.
pins_installed() {
  PYTHONPATH=${2:-} "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
pins = [l.split("#")[0].strip() for l in open(sys.argv[1])]
sys.exit(any(version(name) != want for name, want in (p.split("==") for p in pins if p)))
PY
}

# transformers, PEFT and lm-evaluation-harness for the export tests (scripts/requirements-hf.txt).
if ! pins_installed scripts/requirements-hf.txt; then
  echo "setup: installing transformers, PEFT and lm-eval (scripts/requirements-hf.txt)" >&2
  "$VENV/bin/pip" install --quiet --no-cache-dir -r scripts/requirements-hf.txt "numpy<2.4" "torch==$TORCH_VERSION"
fi

# transformers 5 (and a PEFT that imports with it) into .venv/hf5, beside .venv's transformers 4:
# the export tests load every export in both (scripts/requirements-hf5.txt).
HF5=$VENV/hf5
if ! pins_installed scripts/requirements-hf5.txt "$HF5"; then
  echo "setup: installing transformers 5 and PEFT into $HF5 (scripts/requirements-hf5.txt)" >&2
  rm -rf "$HF5"
  "$VENV/bin/pip" install --quiet --no-cache-dir --target "$HF5" "numpy<2.4" \
    "$(grep -o '^transformers==[^ ]*' scripts/requirements-hf5.txt)"
  "$VENV/bin/pip" install --quiet --no-cache-dir --no-deps --target "$HF5" \
    "$(grep -o '^peft==[^ ]*' scripts/requirements-hf5.txt)"
fi

# Python packages used only by the scripts that make test fixtures and reference numbers.
if [ "${LINEARIZE_SETUP_PY_TOOLS:-0}" = 1 ]; then
  "$VENV/bin/pip" install --quiet -r scripts/requirements-tools.txt
fi

# .cargo/config.toml points LIBTORCH at .venv/libtorch; LIBTORCH_USE_PYTORCH=1 with this venv
# active is equivalent.
echo "setup: building linearize (release)" >&2
cargo build --release --locked --bin linearize
echo "setup: done: target/release/linearize" >&2
