"""A frozen teacher replicated on every rank vs partitioned across ranks as it is built (ZeRO-3) vs partitioned
with its parameters offloaded to CPU: peak host RSS per rank while loading and during the first steps, the
teacher bytes each rank holds, load and step time; 1 and 2 gloo ranks (CPU).

    python benchmarks/teacher_shard.py            # writes benchmarks/results/teacher-shard.{json,md}
    python benchmarks/teacher_shard.py --report   # rewrites the .md (and .json) from the committed JSON

Shapes: a Llama-shaped teacher, 16 blocks x 1024 (8 heads, MLP 4096, vocabulary 2048, untied head), stored as
bf16 safetensors (0.55 GB), kept in bf16 (--teacher_dtype bfloat16: the checkpoint's dtype); a small student
(2 blocks x 256, the teacher's vocabulary; cos / iit_cos off: the widths differ) under ZeRO-2; batch 2 x 16 per
rank, 4 optimizer steps (fast step: ce, mlm, iit). The teacher's plan: none (replicated, loaded once per rank
by transformers), ds_configs/teacher_zero3.json (sharded) or ds_configs/teacher_zero3_offload.json (sharded +
offload_param cpu). Each (ranks, plan) is its own launch (torch.distributed.run), so each peak (VmHWM) is its
own. The rank side is tests/test_teacher_shard.py's `rss_run` (the test asserts on the same figures).

What is measured: RSS before anything is loaded (the runtime's own: torch, DeepSpeed, transformers, the process
group, and one warm-up step of a tiny pair so that the step's code is loaded) = base; peak RSS (VmHWM) after
the teacher is built = load peak; peak after the steps = step peak. The allocator is glibc with a fixed mmap
threshold (MALLOC_MMAP_THRESHOLD_=131072), so that freed blocks go back to the OS and RSS follows live memory.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("replicated", "sharded", "offload")
RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def main():
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from benchmarks.common import machine
    from iit_fast.engine import free_port
    from test_teacher_shard import BIG, save_big_bf16
    tmp = REPO / ".cache" / "teacher_shard"
    tmp.mkdir(parents=True, exist_ok=True)
    folder = tmp / "llama-16x1024-bf16"
    if not (folder / "model.safetensors").is_file():
        save_big_bf16(folder)
    load_before = os.getloadavg()
    rows = []
    for ranks in (1, 2):
        for variant in VARIANTS:
            out = tmp / f"rows-{ranks}-{variant}.json"
            out.unlink(missing_ok=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)),
                       LOCAL_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), TOKENIZERS_PARALLELISM="false",
                       TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"), **RSS_ENV)
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
                env.pop(k, None)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                   str(free_port()), __file__, "--rank", str(out), variant, str(folder)]
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            per_rank = json.loads(out.read_text())
            worst = lambda k: max(r[k] - r["base_MB"] for r in per_rank)  # noqa: E731
            rows.append({"ranks": ranks, "teacher": variant, "plan": per_rank[0]["plan"],
                         "base_MB": round(max(r["base_MB"] for r in per_rank)),
                         "load_peak_MB": round(worst("load_peak_MB")), "step_peak_MB": round(worst("step_peak_MB")),
                         "teacher_MB": per_rank[0]["teacher_MB"],
                         "teacher_MB_per_rank": max(r["sampled_teacher_MB"] for r in per_rank),
                         "load_s": max(r["load_s"] for r in per_rank),
                         "step_s": max(statistics.median(r["step_times"][1:]) for r in per_rank),
                         "loss": per_rank[0]["losses"][-1]})
    load_after = os.getloadavg()
    m = machine()
    m["load_before"], m["load_after"] = load_before, load_after
    report(rows, m)


def report(rows: list[dict], m: dict):
    """teacher-shard.{json,md} from the rows and the machine (also: `--report` rewrites them from the JSON)."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from benchmarks.common import write_results
    from test_teacher_shard import BIG
    load_before, load_after = m["load_before"], m["load_after"]
    # the ranks' allocator (the launching process does not allocate what is measured)
    m["allocator"] = "glibc malloc, MALLOC_MMAP_THRESHOLD_=131072 in the ranks (freed blocks of 128 KiB or more go back to the OS)"
    m["cpu_flags"] = "avx512_bf16, no AMX" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() and \
        "amx_bf16" not in Path("/proc/cpuinfo").read_text() else m.get("cpu_flags", "")
    for r in rows:  # the ratio the goal reads: sharded peak / replicated peak, same ranks, above base
        rep = next(x for x in rows if x["ranks"] == r["ranks"] and x["teacher"] == "replicated")
        r["peak_vs_replicated"] = round(r["step_peak_MB"] / rep["step_peak_MB"], 3)
    shared = load_before[0] > 0.5
    notes = (
        f"CPU: {m.get('cpu')} ({m.get('cpu_flags') or 'flags not recorded'}). "
        f"Teacher: Llama-shaped {BIG['layers']} x {BIG['hidden']} (MLP {BIG['intermediate']}, vocabulary {BIG['vocab']}), "
        f"bf16 safetensors ({rows[0]['teacher_MB']:.0f} MiB), run in bf16; student 2 x 256 under ZeRO-2; batch 2 x 16 "
        "per rank; 4 steps. *_peak_MB = the worst rank's peak RSS above its own base (base_MB: the runtime, "
        "measured per rank after imports, the process group and a warm-up step of a tiny pair). load_peak = "
        "while the teacher is built; step_peak = through the load and the steps (peak_vs_replicated reads this "
        "one). teacher_MB_per_rank = the largest `engine.local_param_bytes` sampled after every tensor read and "
        "as every module with parameters starts (partition + whatever ZeRO-3 holds gathered then). "
        "step_s = the slowest rank's median over steps 2-4.\n\n"
        "Read with care: the replicated teacher's load peak is small because transformers maps a bf16 "
        "safetensors file read as bf16 without copying it (the pages are counted when the first step touches "
        "them), so the fair figure is the peak through load and steps. A replicated fp32 run (the default on "
        "this CPU) would materialise the teacher at load, at twice the bytes. On a GPU the partitions live in "
        "device memory (host RSS then holds neither) unless offload_param puts them in host memory, as "
        "'offload' does; on this CPU-only machine 'sharded' and 'offload' both keep their partitions in host "
        "memory, so their figures coincide.\n\n"
        f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)}"
        + (": **the machine was shared with other work while this ran**: the times (load_s, step_s) are "
           "contended and indicative only; the memory figures do not depend on load." if shared else "."))
    write_results("teacher-shard", {"machine": m, "shapes": {**BIG, "student": "2 x 256", "batch": "2 x 16",
                                                             "steps": 4, "teacher_dtype": "bfloat16"}},
                  rows, ["ranks", "teacher", "base_MB", "load_peak_MB", "step_peak_MB", "peak_vs_replicated",
                         "teacher_MB", "teacher_MB_per_rank", "load_s", "step_s", "loss"],
                  title="Frozen teacher: replicated vs partitioned as built vs partitioned + CPU offload (CPU, gloo)",
                  notes=notes)


def rank_main(out: Path, variant: str, folder: str):
    sys.path.insert(0, str(REPO / "tests"))
    from test_teacher_shard import rss_run
    rows = rss_run(out, variant, folder, steps=4)
    if rows is not None:
        out.write_text(json.dumps(rows))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif sys.argv[1:] == ["--report"]:  # rewrite the report from the committed JSON (no run)
        saved = json.loads((REPO / "benchmarks/results/teacher-shard.json").read_text())
        report(saved["rows"], saved["machine"])
    else:
        main()
