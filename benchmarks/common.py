"""Shared plumbing for the benchmarks: machine description, timing, peak memory, result files.

Every benchmark compares its contenders in one run (ratios), names the machine and the shapes, and writes
`benchmarks/results/<name>.json` and `<name>.md` through `write_results`.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def allocator() -> str:
    """Which malloc this process runs on: jemalloc (LD_PRELOAD), glibc with tunables, or plain glibc."""
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return "jemalloc (LD_PRELOAD)"
    tun = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    return f"glibc malloc {tun}" if tun else "glibc malloc (defaults)"


def machine() -> dict:
    info = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "allocator": allocator(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in cpu.splitlines()
                            if l.startswith("Model name")), platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    return info


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def measure_copy_bandwidth(nbytes: int = 1 << 28, device: str = "cpu") -> float:
    """Achieved bytes/s of a large tensor copy (read + write counted): the machine's practical bound."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    t, _ = median_time(lambda: b.copy_(a), repeats=5, warmup=2)
    return 2 * nbytes / t


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_results(name: str, payload: dict, rows: list[dict], columns: list[str] | None = None,
                  title: str = "", notes: str = "") -> tuple[Path, Path]:
    """Write `results/<name>.json` (everything) and `results/<name>.md` (machine + table + notes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": payload.get("machine", machine()), **payload, "rows": rows}
    jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    jpath.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    m = payload["machine"]
    head = f"# {title or name}\n\nMachine: {m.get('gpu') or m.get('cpu')} ({m.get('cores')} cores, " \
           f"{m.get('threads')} torch threads), torch {m.get('torch')}, allocator: {m.get('allocator')}, " \
           f"measured {m.get('date')}.\n\n"
    mpath.write_text(head + markdown_table(rows, columns) + ("\n" + notes + "\n" if notes else ""))
    return jpath, mpath


def sweep_ds_config(runs_dir: Path, batch_size: int) -> Path:
    """The DeepSpeed config every train.py run of a sweep shares, written to runs_dir/ds-micro<B>.json:
    micro-batch `batch_size`, no accumulation, ZeRO-2, gradient clipping 1.0, DeepSpeed's step prints off."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / f"ds-micro{batch_size}.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
                                "gradient_clipping": 1.0, "steps_per_print": 10 ** 6,
                                "zero_optimization": {"stage": 2, "overlap_comm": False,
                                                      "contiguous_gradients": True}}, indent=1))
    return path
