#!/usr/bin/env bash
# The GPU run kit (issue 15 item 5): every CUDA check and measurement in one call, at most 8 minutes on one GPU.
#
#     bash benchmarks/gpu.sh            # from the repository root, on a machine with one CUDA GPU
#
# Stages, each under its own time limit (the limits add up to 8 min, ~30 s more for setup; a stage that
# fails or runs out of time is reported and the next one runs):
#   1. pytest -m gpu: the CUDA tests, i.e. the Triton kernels against their PyTorch references on CUDA, fp32
#      and bf16 (interchange / hidden_loss / head loss)                               -> gpu-tests-cuda.log
#   2. benchmarks/interchange_kernels.py fp32 (with torch.compile) and bf16, GB/s against the copy bandwidth measured in
#      the same run                                                      -> kernels-cuda{,-bf16}.{json,md,png}
#   3. benchmarks/head_loss.py at 16k tokens x BERT-base vocab, against liger-kernel's fused linear JSD where
#      installed                                                                          -> head_loss-cuda.*
#   4. benchmarks/step.py at BERT-base, fp32 and bf16, MFU against the matmul peak of the same run -> step-cuda.*
#   4b. benchmarks/sync_debug.py: one fast step (masked and causal, padded and not) under
#      torch.cuda.set_sync_debug_mode("warn" then "error"): no host sync in the step          -> sync-cuda.*
#   5. a 2-minute main job: python iit_fast/train.py, one process, ds_configs/zero2_bf16.json, a BERT-base-shaped
#      random teacher and a synthetic corpus made here (no network); stopped by SIGTERM at the time limit
#      (train.py saves and exits 143) unless --max_steps comes first                 -> train-cuda.{json,md}
# Results go to benchmarks/results/ and, when $OUT is set, are copied there too (with the logs).
# Without CUDA it stops at once with exit 2. If deepspeed is not importable it installs the wheel in
# benchmarks/wheels/ (no network needed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
RES=benchmarks/results
LOGS=$(mktemp -d /tmp/gpu_kit.XXXXXX)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # the Triton kernels must compile for the GPU, not run in the interpreter

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu.sh: no CUDA device visible to torch ($PY); this kit needs one GPU. Nothing was run." >&2
    exit 2
fi
if ! "$PY" -c 'import deepspeed' >/dev/null 2>&1; then
    wheel=$(ls benchmarks/wheels/deepspeed-*.whl 2>/dev/null | head -n 1)
    if [ -z "$wheel" ]; then
        echo "gpu.sh: deepspeed is not importable and benchmarks/wheels/ holds no deepspeed wheel" >&2
        exit 2
    fi
    echo "== installing $wheel (deepspeed was not importable)"
    "$PY" -m pip install --no-deps --no-index "$wheel" >"$LOGS/pip.log" 2>&1 || { cat "$LOGS/pip.log" >&2; exit 2; }
    # the wheel comes without its dependencies: say which one is missing rather than fail later
    "$PY" -c 'import deepspeed' || { echo "gpu.sh: deepspeed installed from $wheel but not importable" >&2; exit 2; }
fi
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__,
                               "| CUDA", torch.version.cuda)'
mkdir -p "$RES"

declare -a SUMMARY
stage() {  # stage NAME SECONDS OKCODES COMMAND...: run under a time limit, log, record the outcome
    local name=$1 limit=$2 ok=$3; shift 3
    local t0=$SECONDS rc
    echo "== $name (limit ${limit}s): $*"
    # a stage that accepts 143 (SIGTERM) stops gracefully at the limit: keep its own exit status
    local keep=""; case " $ok " in *" 143 "*) keep=--preserve-status ;; esac
    timeout $keep -s TERM -k 15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    tail -n 15 "$LOGS/$name.log"
    local verdict=FAILED
    case " $ok " in *" $rc "*) verdict=ok ;; esac
    [ "$rc" = 124 ] && verdict="TIMED OUT"
    SUMMARY+=("$(printf '%-10s %-9s rc=%-3s %4ss' "$name" "$verdict" "$rc" "$((SECONDS - t0))")")
}

stage tests 60 "0" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
cp "$LOGS/tests.log" "$RES/gpu-tests-cuda.log"
stage kernels 100 "0" "$PY" benchmarks/interchange_kernels.py --device cuda --name kernels-cuda
stage kernels16 40 "0" "$PY" benchmarks/interchange_kernels.py --device cuda --dtype bfloat16 --no-compile --name kernels-cuda-bf16
stage head_loss 60 "0" "$PY" benchmarks/head_loss.py --only "bert-base 16k" --name head_loss-cuda
stage step 80 "0" "$PY" benchmarks/step.py --shapes bert-base --logit-tokens all --precisions fp32,bf16 \
    --repeats 5 --name step-cuda
stage sync 40 "0" "$PY" benchmarks/sync_debug.py

# 5. the main job: a BERT-base-shaped random teacher (the embedded default would be built first: too long here)
WORK=$(mktemp -d /tmp/gpu_kit_run.XXXXXX)
"$PY" - "$WORK" <<'EOF' >"$LOGS/train-prep.log" 2>&1
import random, sys
from pathlib import Path
from transformers import BertConfig, BertForMaskedLM
sys.path.insert(0, ".")
from tests.tiny import tiny_bert_tokenizer, tiny_words
work = Path(sys.argv[1])
vocab = 30522
tok = tiny_bert_tokenizer(vocab)
cfg = BertConfig(vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
BertForMaskedLM(cfg).save_pretrained(work / "teacher")
tok.save_pretrained(work / "teacher")
words, rng = tiny_words(vocab)[6:], random.Random(0)
(work / "corpus").mkdir()
for split, n in (("train", 6000), ("validation", 200)):
    lines = (" ".join(rng.choices(words, k=rng.randint(40, 160))) for _ in range(n))
    (work / "corpus" / f"{split}.txt").write_text("\n\n".join(lines) + "\n")
print("teacher and corpus in", work)
EOF
stage train 100 "0 143" "$PY" iit_fast/train.py --teacher "$WORK/teacher" --corpus "$WORK/corpus" \
    --deepspeed_config ds_configs/zero2_bf16.json --max_steps 3000 --eval_interval 100000 --eval_sequences 64 \
    --plots false --out_dir "$WORK/run"
"$PY" - "$WORK/run" "$LOGS/train.log" <<'EOF' >>"$LOGS/train.log" 2>&1
import json, statistics, sys
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.common import machine, write_results
run = Path(sys.argv[1])
metrics = run / "metrics.jsonl"
rows = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
steps = [r for r in rows if "loss" in r]
tps = [r["tokens_per_s"] for r in steps[1:] if "tokens_per_s" in r]
row = {"run": "train.py, 1 process, zero2_bf16, BERT-base-shaped random teacher -> 3 layers", "steps": len(steps),
       "median tokens/s": statistics.median(tps) if tps else None, "last loss": steps[-1]["loss"] if steps else None}
write_results("train-cuda", {"machine": machine(), "metrics_tail": rows[-5:]}, [row],
              title="Main job on one GPU (gpu.sh stage 5)",
              notes="Stopped by SIGTERM at the stage's time limit (exit 143 is expected) or at --max_steps; "
                    "tokens/s: median over logged steps, the first excluded. Log: " + sys.argv[2])
print(row)
EOF

echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" "$OUT/logs"
    cp "$RES"/*-cuda* "$OUT/results/" 2>/dev/null
    cp "$LOGS"/*.log "$OUT/logs/" 2>/dev/null
fi
case "${SUMMARY[*]}" in *FAILED*|*"TIMED OUT"*) exit 1 ;; esac
exit 0
