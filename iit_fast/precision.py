"""Which precision a run computes in, and why: the bf16 decision (a GEMM probe on CPUs, the device's
support on GPUs), the dtype names of the configs, and the student's autocast region.

`--precision auto` picks bf16 only where a bf16 GEMM is measurably faster than fp32 (AMX CPUs, GPUs); an
instruction-set flag alone is not enough (avx512_bf16 without AMX can run bf16 GEMMs at half the fp32 speed).
The main job (`train.py`), the default-teacher builder and the cache builder share this decision.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_MIN_SPEEDUP = 1.3  # bf16 pays when its GEMM is at least this much faster than the fp32 one


def student_autocast(cfg, device: torch.device):
    """The autocast region of the student's passes (`DistillConfig.student_autocast`); losses stay fp32."""
    if cfg.student_autocast == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.student_autocast])


def bf16_gemm_speedup(m: int = 1024, k: int = 768, n: int = 3072, repeats: int = 3) -> float:
    """fp32 time / bf16 time of an (m, k) x (k, n) GEMM (a BERT-base MLP's shape), best of `repeats`,
    the dtypes alternating so that a loaded machine slows both alike."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = {dt: float("inf") for dt in pairs}
    for _ in range(repeats + 1):  # the first round warms up
        for dt, (x, y) in pairs.items():
            t0 = time.perf_counter()
            x @ y
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def native_bf16() -> tuple[bool, str]:
    """(does bf16 pay on this machine, why we think so). A GPU: its bf16 support. A CPU: a 0.1 s probe
    times a GEMM of the step's shape in both dtypes; bf16 must be at least BF16_MIN_SPEEDUP x faster."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {torch.cuda.get_device_name()} {'has' if ok else 'has no'} native bf16"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if not found:
        return False, "this CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated)"
    ratio = bf16_gemm_speedup()
    return ratio >= BF16_MIN_SPEEDUP, f"{found[0]}: a bf16 GEMM measured {ratio:.2f}x the fp32 one here"


def resolve(precision: str) -> tuple[str, str]:
    """("bf16" | "fp32", why) for a tool that runs one model outside DeepSpeed (the default-teacher builder,
    the cache builder): "auto" asks `native_bf16`, "bf16" / "fp32" are taken as given."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision, f"--precision {precision}"
    native, why = native_bf16()
    return ("bf16" if native else "fp32"), why


def choose_precision(cfg, ds: dict) -> str:
    """Apply the run's --precision (`cfg`: a TrainConfig) to the DeepSpeed config `ds` (bf16: DeepSpeed's
    bf16 mode, i.e. bf16 weights and activations with fp32 master weights in the optimizer; the teacher in
    bf16) and return the line that says what was chosen and why."""
    if ds.get("fp16", {}).get("enabled"):
        return "precision: fp16 (the DeepSpeed config enables it)"
    native, hw = native_bf16()
    asked = ds.get("bf16", {}).get("enabled", False)
    if cfg.precision == "fp32":
        ds["bf16"] = {"enabled": False}
        return f"precision: fp32 (--precision fp32{'; overrides the config bf16' if asked else ''})"
    if cfg.precision == "auto" and not native and not asked:
        return f"precision: fp32 ({hw}; --precision bf16 forces bf16)"
    if not native:
        print(f"warning: bf16 asked, but {hw}: it will run slower than fp32 (--precision fp32 is faster)",
              flush=True)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    cfg.distill.teacher_dtype = "bfloat16"
    src = "--precision bf16" if cfg.precision == "bf16" else ("the DeepSpeed config" if asked else hw)
    return f"precision: bf16, fp32 master weights ({src}; --precision fp32 forces fp32)"
