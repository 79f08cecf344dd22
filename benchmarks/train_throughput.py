"""Tokens/s of the main job (iit_fast/train.py with the default teacher, corpus and student), 1 rank and
2 ranks (ZeRO-2), through the deepspeed launcher, exactly as a user runs it.

    python benchmarks/train_throughput.py                       # 1 and 2 ranks, 12 steps each
    python benchmarks/train_throughput.py --steps 20 --teacher runs/my_teacher --no-write

Each run is a fresh `deepspeed [--num_gpus 2] iit_fast/train.py --deepspeed_config ds_configs/zero2.json`;
the figure is the median of the per-step tokens/s in its metrics.jsonl (real, non-pad tokens of all ranks,
wall clock between steps), first step excluded (warm-up). Writes benchmarks/results/train-cpu.{json,md}
(train-gpu on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarise(out: Path, ranks: int, command: str) -> dict:
    """One row from a finished run's metrics.jsonl."""
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in rows if "loss" in r]
    tps = [r["tokens_per_s"] for r in steps_[1:]]
    cfg = json.loads((out / "train_config.json").read_text())
    ds_cfg = json.loads(Path(cfg["deepspeed_config"]).read_text() if Path(cfg["deepspeed_config"]).is_file()
                        else (REPO / cfg["deepspeed_config"]).read_text())
    tokens_per_step = statistics.median([r["tokens"] - p["tokens"] for p, r in zip(steps_, steps_[1:])])
    return {"ranks": ranks, "zero": ds_cfg["zero_optimization"]["stage"], "steps": len(steps_),
            "micro_batch": ds_cfg["train_micro_batch_size_per_gpu"],
            "global_batch": ds_cfg["train_micro_batch_size_per_gpu"] * ranks, "max_length": cfg["max_length"],
            "tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            "s_per_step": tokens_per_step / statistics.median(tps), "memory_mb_rank0": steps_[-1]["memory_mb"],
            "load_avg_1min_after": round(os.getloadavg()[0], 1), "command": command}


def run(ranks: int, steps: int, extra: list[str], out: Path) -> dict:
    ds = str(Path(sys.executable).parent / "deepspeed")
    cmd = [ds] + (["--num_gpus", str(ranks)] if ranks > 1 else []) + ["--master_port", str(free_port()),
           str(REPO / "iit_fast" / "train.py"), "--deepspeed_config", "ds_configs/zero2.json",
           "--max_steps", str(steps), "--eval_interval", "0", "--eval_sequences", "32", "--plots", "false",
           "--out_dir", str(out)] + extra
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                   env={**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get(
                       "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))})
    shown = " ".join(["deepspeed"] + cmd[1:]).replace(str(REPO) + "/", "").replace(str(out), "<a temporary folder>")
    return summarise(out, ranks, shown)  # no path of this machine in the results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--teacher", default=None, help="default: the embedded default teacher")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--include_run", action="append", default=[], metavar="OUT_DIR:RANKS:COMMAND",
                   help="also report a finished run (e.g. the full default run) from its metrics.jsonl")
    a = p.parse_args()
    extra = (["--teacher", a.teacher] if a.teacher else []) + (["--cache_dir", a.cache_dir] if a.cache_dir else [])
    rows = []
    for spec in a.include_run:
        out, ranks, command = spec.split(":", 2)
        rows.append(summarise(Path(out), int(ranks), command))
        print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in [int(x) for x in a.ranks.split(",") if x]:
            rows.append(run(r, a.steps, extra, Path(tmp) / f"r{r}"))
            print(json.dumps(rows[-1]), flush=True)
    if not a.no_write:
        m = machine()
        name = "train-gpu" if m["device"] == "cuda" else "train-cpu"
        notes = ("Default run (MiniLM-L6 teacher, 6 x 384 -> 3-layer student, vocab 30,522, fast step, all four "
                 "losses, logits on all real tokens, seq <= 128, micro-batch 16 per rank, torch AdamW), "
                 "DeepSpeed ZeRO-2, gloo on CPU. tokens/s = real (non-pad) tokens of all ranks per second of "
                 "wall clock, median over the steps after the first. On a 2-core machine 2 ranks share the "
                 "same 2 cores (1 thread each) that 1 rank uses with 2 threads: the 2-rank figure shows the "
                 "cost of the data-parallel machinery, not a speed-up. load_avg_1min_after above the core count means "
                 "other jobs shared the cores during the run: the figure is then a lower bound. The allocator line "
                 "above is the benchmark driver's; train.py tunes glibc malloc in-process (iit_fast/allocator.py).")
        write_results(name, {"machine": m, "steps": a.steps}, rows,
                      ["ranks", "zero", "global_batch", "max_length", "steps", "tokens_per_s", "tokens_per_s_min",
                       "tokens_per_s_max", "s_per_step", "memory_mb_rank0", "load_avg_1min_after", "command"],
                      title="Main job throughput (iit_fast/train.py)", notes=notes)


if __name__ == "__main__":
    main()
