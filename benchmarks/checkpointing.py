"""What activation checkpointing saves: peak memory of one fast step with and without it, in one run.

    python benchmarks/checkpointing.py                                   # gpt2-small and llama-style, seq 1024
    python benchmarks/checkpointing.py --shapes gpt2-small --seq 512 --no-write

Each (shape, checkpointing) runs in its own subprocess (a fresh process: its peak RSS is that step's), on
benchmarks/step.py's seeded models and batch, the fast step with IIT (the plain passes, the counterfactual
suffix passes over the cached keys/values, the head losses), precision as train.py runs it on this CPU
(`bf16`: teacher bf16, student fp32 weights under bf16 autocast) or `--precision fp32`. Reported: the RSS
with the models loaded, the peak RSS of the step, their difference (what the step itself holds at its
peak: activations, the head-loss buffers, gradients), and the step-time ratio on/off (one step each, the
machine is shared: a ratio, not a speed). Results: benchmarks/results/checkpointing-cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import current_rss_bytes, machine, peak_rss_bytes, write_results  # noqa: E402
from benchmarks.step import PRECISIONS, SHAPES, build, worker_env  # noqa: E402

GIB = 2 ** 30
PRECISION_NOTE = {"bf16": "teacher bf16, student fp32 weights under bf16 autocast", "fp32": "fp32 throughout"}


def worker(shape_name: str, seq: int, batch: int, precision: str, ckpt: str) -> dict:
    from iit_fast.config import DistillConfig
    from iit_fast.sampling import make_alignment, sample_plan
    from iit_fast.step import distill_step, step_index
    shape = dataclasses.replace(SHAPES[shape_name], seq=seq, batch=batch)
    teacher_dtype, autocast, weights, _ = PRECISIONS[precision]
    teacher, student, data = build(shape, attn="sdpa")
    teacher.to(dtype=getattr(torch, teacher_dtype))
    student.to(dtype=weights)
    if ckpt != "off":
        student.enable_activation_checkpointing(ckpt)
    plan = sample_plan(data["attention_mask"], make_alignment("middle", shape.teacher_layers, shape.student_layers),
                       torch.Generator().manual_seed(0))
    cfg = DistillConfig(mode="fast", teacher_dtype=teacher_dtype, student_autocast=autocast)
    index = step_index(data, plan, cfg, teacher.kind)
    before = current_rss_bytes()
    t0 = time.perf_counter()
    out = distill_step(teacher, student, data, plan, cfg, index=index)
    out.loss.backward()
    seconds = time.perf_counter() - t0
    return {"rss_models": before, "peak": peak_rss_bytes(), "seconds": seconds, "loss": float(out.loss.detach()),
            "site": plan.student_layer, "student_layers": shape.student_layers}


def weight_bytes(shape_name: str, precision: str) -> int:
    """Bytes of the teacher's and the student's parameters as the step holds them (built on the meta device)."""
    from benchmarks.step import _teacher_model
    from iit_fast.models import IntervenableLM
    shape = SHAPES[shape_name]
    teacher_dtype, _, weights, _ = PRECISIONS[precision]
    with torch.device("meta"):
        teacher = IntervenableLM(_teacher_model(shape))
    block = sum(p.numel() for p in teacher.blocks[0].parameters())
    total = sum(p.numel() for p in teacher.parameters())                      # tied weights counted once
    student = total - (shape.teacher_layers - shape.student_layers) * block
    return total * getattr(torch, teacher_dtype).itemsize + student * weights.itemsize


def rows_from(raw: dict, args) -> list[dict]:
    rows = []
    for name, res in raw.items():
        s = SHAPES[name]
        off, on = res["off"], res["torch"]
        w = weight_bytes(name, args.precision)
        rows.append({"shape": f"{name}: {s.teacher_layers} -> {s.student_layers} blocks, D {s.hidden}, V {s.vocab}",
                     "seq x batch": f"{args.seq} x {args.batch}", "weights GiB": round(w / GIB, 2),
                     "peak GiB off": round(off["peak"] / GIB, 2), "peak GiB on": round(on["peak"] / GIB, 2),
                     "peak on/off": round(on["peak"] / off["peak"], 3),
                     "above weights GiB off": round((off["peak"] - w) / GIB, 2),
                     "above weights GiB on": round((on["peak"] - w) / GIB, 2),
                     "above weights on/off": round((on["peak"] - w) / (off["peak"] - w), 3),
                     "time on/off": round(on["seconds"] / off["seconds"], 2),
                     "loss equal": abs(on["loss"] - off["loss"]) <= 1e-3 * abs(off["loss"])})
    return rows


def run_isolated(shape_name, seq, batch, precision, ckpt) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([shape_name, seq, batch, precision, ckpt])]
    res = subprocess.run(cmd, env=worker_env("cpu"), capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"worker {shape_name} {ckpt} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="gpt2-small,llama-style")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--name", default="checkpointing-cpu")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rerender", action="store_true", help="rewrite the results from their JSON's raw figures")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.rerender:
        raw = json.loads((Path(__file__).parent / "results" / f"{args.name}.json").read_text())["raw"]
    else:
        raw = {}
        for name in args.shapes.split(","):
            raw[name] = {c: run_isolated(name, args.seq, args.batch, args.precision, c) for c in ("off", "torch")}
            print(name, raw[name], flush=True)
    rows = rows_from(raw, args)
    print(rows, flush=True)
    if args.no_write:
        return
    env = worker_env("cpu")
    alloc = (f"jemalloc (LD_PRELOAD, MALLOC_CONF={env.get('MALLOC_CONF')})" if "jemalloc" in env.get("LD_PRELOAD", "")
             else "glibc malloc")
    write_results(args.name, {"machine": dict(machine(), allocator=alloc, cpu_note="AMD EPYC Zen 4, avx512_bf16, "
                                              "no AMX; 2 cores shared with ~6 other jobs"),
                              "precision": args.precision, "raw": raw}, rows,
                  title="Activation checkpointing: peak memory of one fast step, on and off",
                  notes=f"One fast step with IIT (forward + backward, `middle` alignment, logits at every real "
                        f"token), precision {args.precision} ({PRECISION_NOTE[args.precision]}), "
                        "sdpa attention, each configuration in a fresh process (its peak RSS is the step's). "
                        "'above weights' = peak RSS minus the bytes of both models' parameters (it includes the "
                        "~0.3-0.4 GiB of the interpreter and its libraries, the same in both). Checkpointing: "
                        "torch.utils.checkpoint, non-reentrant, every student block of every pass with grad; the "
                        "plain pass's keys/values of the blocks the suffix passes run stay resident. Time: one step "
                        "each on a machine shared with other jobs (AMD EPYC Zen 4, avx512_bf16, no AMX, 2 cores, ~6 "
                        "agents): only the ratio means "
                        "anything, and only roughly.")


if __name__ == "__main__":
    main()
