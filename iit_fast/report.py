"""What a run shows and leaves behind besides checkpoints: validation figures, memory, the loss and
validation plots, and the summary table printed at the end."""
from __future__ import annotations

from pathlib import Path

import psutil
import torch

from .eval import lm_metrics

TERMS = ("ce", "mlm", "cos", "iit", "iit_cos", "mse")


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


@torch.no_grad()
def validate(model, batches, device) -> dict:
    """MLM perplexity / top-1 of an HF model on the validation batches (every rank, the same batches).
    A diverged model gives perplexity inf, not an OverflowError."""
    was = model.training
    model.eval()
    try:
        res = lm_metrics(model, [batch_to(b, device) for b in batches])
    except OverflowError:
        res = {"perplexity": float("inf"), "top1": float("nan")}
    model.train(was)
    return res


def write_plots(records, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in ("loss",) + TERMS:
        pts = [(r["step"], r[k]) for r in steps if k in r]
        if pts:
            ax.plot(*zip(*pts), label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("step"), ax.set_ylabel("loss term"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out / "loss.png", dpi=120), plt.close(fig)
    vals = [(r["step"], r["val_perplexity"]) for r in records if "val_perplexity" in r]
    teacher = [r["teacher_val_perplexity"] for r in records if "teacher_val_perplexity" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if vals:
        ax.plot(*zip(*vals), marker="o", label="student")
    if teacher:
        ax.axhline(teacher[0], color="gray", ls="--", label="teacher")
    ax.set_xlabel("step"), ax.set_ylabel("validation perplexity"), ax.set_yscale("log"), ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out / "val.png", dpi=120), plt.close(fig)


def print_summary(records, state, last_val, out: Path, ckpt: Path):
    steps = [r for r in records if "loss" in r]
    tail = steps[-10:]
    tps = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    vals = [r for r in records if "val_perplexity" in r]
    teacher = next((r for r in records if "teacher_val_perplexity" in r), None)
    rows = [("steps", f"{state['step']}"), ("tokens", f"{state['tokens']:,}"),
            ("wall time (train)", f"{state['wall']:.0f} s"),
            ("tokens/s (median)", f"{sorted(tps)[len(tps) // 2]:,.0f}" if tps else "-")]
    for k in ("loss",) + TERMS:
        if tail and k in tail[-1]:
            first = steps[0][k]
            rows.append((f"{k} (first -> last 10 mean)", f"{first:.4f} -> {sum(r[k] for r in tail) / len(tail):.4f}"))
    if vals:
        rows.append(("val perplexity", f"{vals[0]['val_perplexity']:.1f} -> {last_val['val_perplexity']:.1f}"))
        rows.append(("val top-1", f"{vals[0]['val_top1']:.3f} -> {last_val['val_top1']:.3f}"))
    if teacher:
        rows.append(("teacher val perplexity", f"{teacher['teacher_val_perplexity']:.1f}"))
    rows += [("non-finite steps skipped", str(state["nonfinite"])), ("metrics", str(out / "metrics.jsonl")),
             ("checkpoint", str(ckpt)), ("student (HF)", str(out / "student"))]
    if (out / "loss.png").exists():
        rows.append(("plots", f"{out / 'loss.png'}, {out / 'val.png'}"))
    w = max(len(a) for a, _ in rows)
    print("\n" + "-" * (w + 40))
    for a, b in rows:
        print(f"{a:<{w}}  {b}")
    print("-" * (w + 40), flush=True)
