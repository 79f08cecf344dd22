"""Step throughput: naive vs fast vs standard causal distillation, in one run, on the same batch.

    python benchmarks/step.py                          # both shapes, both logit settings, writes results
    python benchmarks/step.py --shapes small --repeats 1 --no-write   # CI smoke run (seconds)

Each (shape, logit_tokens, mode) runs in its own subprocess, so that peak memory (RSS on CPU, CUDA max
allocated on GPU) belongs to that step alone; all of them see the same seeded models, batch and plan.
Reported: median step time over `--repeats` after a warm-up step, tokens/s, the ratios fast/naive and
fast/standard, and beside each the ratio the FLOP model of DESIGN.md section 2 predicts.
Results: benchmarks/results/step-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, median_time, peak_rss_bytes, write_results  # noqa: E402


@dataclass
class Shape:
    name: str
    teacher_layers: int
    student_layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    batch: int


SHAPES = {
    # BERT-base teacher (random weights are fine for speed) into a 6-layer student
    "bert-base": Shape("bert-base", 12, 6, 768, 12, 30522, 128, 8),
    # small enough for CI to run in seconds
    "small": Shape("small", 6, 3, 256, 4, 8000, 64, 16),
}
MODES = ("naive", "fast", "standard")


# ---- the FLOP model (DESIGN.md section 2) ----------------------------------------------------------

def flops_per_step(shape: Shape, mode: str, kd_fraction: float, site_t: int, site_s: int) -> float:
    """Multiply-adds x 2 of one step. Per token: a block 8D^2 + 4DI + 4SD (I = 4D), the head
    2D^2 + 2DV on the tokens that take logits; backward = 2x forward; the teacher has no backward."""
    D, S, V = shape.hidden, shape.seq, shape.vocab
    layer = 8 * D * D + 4 * D * 4 * D + 4 * S * D
    head = kd_fraction * (2 * D * D + 2 * D * V)
    Lt, Ls = shape.teacher_layers, shape.student_layers
    fwd_t_full = Lt * layer + head
    fwd_s_full = Ls * layer + head
    if mode == "naive":
        teacher = 3 * fwd_t_full
        # base and counterfactual: forward + backward; source: forward everything, backward below the site
        student = 2 * 3 * fwd_s_full + fwd_s_full + 2 * (site_s + 1) * layer
    elif mode == "fast":
        teacher = fwd_t_full + (Lt - site_t - 1) * layer + head
        student = 3 * fwd_s_full + 3 * ((Ls - site_s - 1) * layer + head)
    else:  # standard
        teacher = fwd_t_full
        student = 3 * fwd_s_full
    return (teacher + student) * shape.batch * shape.seq


# ---- one measurement, in its own process -------------------------------------------------------------

def build(shape: Shape, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    from iit_fast.models import IntervenableMLM, init_student_from_teacher
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.teacher_layers,
                     num_attention_heads=shape.heads, intermediate_size=4 * shape.hidden,
                     max_position_embeddings=max(512, shape.seq), hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    teacher = BertForMaskedLM(cfg).eval()
    student = init_student_from_teacher(teacher, shape.student_layers)
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if shape.vocab > 2000 else 5, shape.vocab, (shape.batch, shape.seq), generator=g)
    am = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    labels[chosen] = ids[chosen]
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels, "token_type_ids": torch.zeros_like(ids)}
    return IntervenableMLM(teacher), IntervenableMLM(student).train(), batch


def worker(shape: Shape, mode: str, logit_tokens: str, ops: str, repeats: int, device: str) -> dict:
    from iit_fast.config import DistillConfig
    from iit_fast.sampling import make_alignment, sample_plan
    from iit_fast.step import distill_step
    teacher, student, batch = build(shape)
    teacher.to(device), student.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    align = make_alignment("middle", shape.teacher_layers, shape.student_layers)
    plan = sample_plan(batch["attention_mask"], align, torch.Generator().manual_seed(0))
    cfg = DistillConfig(mode=mode, logit_tokens=logit_tokens, ops=ops)
    params = [p for p in student.parameters()]

    def step():
        for p in params:
            p.grad = None
        out = distill_step(teacher, student, batch, plan, cfg)
        out.loss.backward()
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t, times = median_time(step, repeats=repeats, warmup=1)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    kd_fraction = float((batch["labels"] != -100).float().mean()) if logit_tokens == "masked" else 1.0
    return {"seconds": t, "times": times, "peak_bytes": peak, "kd_fraction": kd_fraction,
            "site_t": plan.teacher_layers[0], "site_s": plan.student_layer,
            "loss": float(step().loss.detach())}


def run_isolated(shape_name, mode, logit_tokens, ops, repeats, device) -> dict:
    env = dict(os.environ)
    jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    if device == "cpu" and os.path.exists(jemalloc) and "jemalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = (jemalloc + " " + env.get("LD_PRELOAD", "")).strip()
        # keep freed big blocks: without this jemalloc too re-faults every new >8 MiB tensor
        env.setdefault("MALLOC_CONF", "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1")
    cmd = [sys.executable, __file__, "--worker", json.dumps([shape_name, mode, logit_tokens, ops, repeats, device])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {shape_name}/{mode}/{logit_tokens} failed:\n{res.stderr[-4000:]}")
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["allocator"] = (f"jemalloc (LD_PRELOAD, MALLOC_CONF={env.get('MALLOC_CONF')})"
                        if "jemalloc" in env.get("LD_PRELOAD", "") else "glibc malloc")
    # which implementation each op ran (the dispatchers log it once)
    out["ops_path"] = sorted({l.split(":", 2)[-1].strip() for l in res.stderr.splitlines()
                              if " path (" in l or "impl=" in l})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small,bert-base", help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--logit-tokens", default="all,masked")
    ap.add_argument("--ops", default="fused", choices=["fused", "reference"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only (CI smoke run)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    if args.worker:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s:%(message)s")
        shape_name, mode, lt, ops, repeats, dev = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(SHAPES[shape_name], mode, lt, ops, repeats, dev)), flush=True)
        return

    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        for lt in args.logit_tokens.split(","):
            res = {m: run_isolated(shape_name, m, lt, args.ops, args.repeats, device) for m in MODES}
            tokens = shape.batch * shape.seq
            fl = {m: flops_per_step(shape, m, res[m]["kd_fraction"], res[m]["site_t"], res[m]["site_s"])
                  for m in MODES}
            for m in MODES:
                rows.append({
                    "shape": shape_name, "logit_tokens": lt, "mode": m,
                    "ms/step": 1e3 * res[m]["seconds"], "tokens/s": tokens / res[m]["seconds"],
                    "GFLOP/step (model)": fl[m] / 1e9, "GFLOP/s": fl[m] / res[m]["seconds"] / 1e9,
                    "peak MB": res[m]["peak_bytes"] / 2**20, "loss": res[m]["loss"],
                })
            speed = res["naive"]["seconds"] / res["fast"]["seconds"]
            model = fl["naive"] / fl["fast"]
            cost = res["fast"]["seconds"] / res["standard"]["seconds"]
            cost_model = fl["fast"] / fl["standard"]
            mem = res["fast"]["peak_bytes"] / res["naive"]["peak_bytes"]
            summary = {"shape": shape_name, "logit_tokens": lt, "mode": "summary",
                       "fast/naive speedup": speed, "model speedup": model, "speedup / model": speed / model,
                       "fast/standard time": cost, "model fast/standard": cost_model,
                       "fast/standard / model": cost / cost_model, "fast/naive peak mem": mem}
            rows.append(summary)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}),
                  flush=True)
            for m in MODES:
                print(f"  {shape_name:9s} {lt:6s} {m:8s} {1e3 * res[m]['seconds']:9.1f} ms/step "
                      f"{tokens / res[m]['seconds']:9.0f} tok/s  peak {res[m]['peak_bytes'] / 2**20:7.0f} MB  "
                      f"{res[m]['ops_path']}", flush=True)
    if args.no_write:
        return
    shapes = {n: SHAPES[n].__dict__ for n in args.shapes.split(",")}
    cols = ["shape", "logit_tokens", "mode", "ms/step", "tokens/s", "GFLOP/step (model)", "GFLOP/s", "peak MB"]
    step_rows = [r for r in rows if r["mode"] != "summary"]
    sum_rows = [r for r in rows if r["mode"] == "summary"]
    m = machine()
    if device == "cpu":
        m["allocator"] = res["fast"]["allocator"] + " in every worker"
    from benchmarks.common import markdown_table
    notes = ("## Ratios (measured vs the FLOP model of DESIGN.md section 2)\n\n" +
             markdown_table(sum_rows, ["shape", "logit_tokens", "fast/naive speedup", "model speedup",
                                       "speedup / model", "fast/standard time", "model fast/standard",
                                       "fast/standard / model", "fast/naive peak mem"]) +
             f"\nops: `{args.ops}`; median of {args.repeats} steps after one warm-up; each mode in its own "
             f"process (peak memory = {'CUDA max allocated' if device == 'cuda' else 'peak RSS of the process, models included'}).\n"
             f"Reproduce: `python benchmarks/step.py --shapes {args.shapes} --repeats {args.repeats} --ops {args.ops}`\n")
    write_results(f"step-{device}", {"machine": m, "shapes": shapes, "ops": args.ops, "repeats": args.repeats,
                                     "summary": sum_rows}, step_rows, cols, title=f"Causal-distillation step throughput ({device})", notes=notes)


if __name__ == "__main__":
    main()
