"""This machine's matmul peak, measured: the denominator of every model-FLOPs-utilisation (MFU) figure.

    python benchmarks/peak.py                 # fp32 and bf16 on the default device, prints GFLOP/s
    python benchmarks/peak.py --step-gemms    # fp32 vs bf16 at the BERT-base step's GEMM shapes, interleaved

A few large square-ish GEMMs per dtype, each timed `repeats` times into a preallocated output; the peak is
the best single call over all of them (best of N, not the median: the machine is shared and the question
is what the hardware and its BLAS can do, not what the load left over). The step benchmark calls
`matmul_peak` in the same run as the steps it divides by it, so both see the same machine and load.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import sync  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (M, K, N): a square GEMM and the two BERT-base FFN shapes at 4k tokens (D=768, I=3072)
CPU_SHAPES = ((2048, 2048, 2048), (4096, 768, 3072), (4096, 3072, 768))
CUDA_SHAPES = ((8192, 8192, 8192), (16384, 768, 3072), (16384, 3072, 768))


def matmul_peak(dtype: str, device: str = "cpu", repeats: int = 5, shapes=None) -> dict:
    """Best achieved GFLOP/s of `torch.mm` in `dtype` ("fp32" | "bf16" | "fp16") on `device`.

    Returns {"dtype", "gflops" (the best over every shape), "per_shape": {"MxKxN": GFLOP/s}, "repeats"}.
    """
    if dtype not in DTYPES:
        raise ValueError(f"matmul_peak: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if repeats < 1:
        raise ValueError(f"matmul_peak: repeats must be >= 1, got {repeats}")
    dt = DTYPES[dtype]
    shapes = shapes or (CUDA_SHAPES if device == "cuda" else CPU_SHAPES)
    g = torch.Generator().manual_seed(0)
    per_shape = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g).to(device=device, dtype=dt)   # (M, K)
        b = torch.randn(k, n, generator=g).to(device=device, dtype=dt)   # (K, N)
        c = torch.empty(m, n, device=device, dtype=dt)                   # (M, N)
        torch.mm(a, b, out=c)  # first call: BLAS / oneDNN kernel selection and weight packing, not timed
        sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            sync()
            best = min(best, time.perf_counter() - t0)
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
        del a, b, c
    return {"dtype": dtype, "gflops": max(per_shape.values()), "per_shape": per_shape, "repeats": repeats}


# The GEMMs of the BERT-base step (1024 tokens = 8 x 128): (name, M, K, N, kind). kind: "linear" = x W^T + b
# (the forward of nn.Linear), "dgrad" = g W (its input gradient), "wgrad" = g^T x (its weight gradient).
STEP_GEMMS = (("linear 768->768", 1024, 768, 768, "linear"), ("linear 768->3072", 1024, 768, 3072, "linear"),
              ("linear 3072->768", 1024, 3072, 768, "linear"), ("dgrad 3072->768", 1024, 3072, 768, "dgrad"),
              ("wgrad 768x3072", 1024, 768, 3072, "wgrad"), ("head 768->30522", 1024, 768, 30522, "linear"))


def _gemm(kind: str, m: int, k: int, n: int, dtype: torch.dtype, device: str, fused: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)     # (M, K) activations
    w = torch.randn(n, k, generator=g).to(device=device, dtype=dtype)     # (N, K) nn.Linear weight
    b = torch.randn(n, generator=g).to(device=device, dtype=dtype)        # (N,)
    gy = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)    # (M, N) output gradient
    if fused:  # iit_fast.compile.linear: the bias in oneDNN's GEMM epilogue instead of addmm's copy into the output
        from iit_fast.compile import linear
        return lambda: linear(x, w, b)
    return {"linear": lambda: torch.nn.functional.linear(x, w, b), "dgrad": lambda: gy @ w,
            "wgrad": lambda: gy.t() @ x}[kind]


def compare_step_gemms(device: str = "cpu", repeats: int = 7) -> list[dict]:
    """fp32 vs bf16 GFLOP/s at the step's GEMM shapes, the two dtypes interleaved call by call (best of
    `repeats`), so that load from other work on a shared machine hits both alike. Linear rows also time
    `iit_fast.compile.linear` (--compile linear / blocks: the bias in the GEMM's epilogue) in each dtype."""
    rows = []
    for name, m, k, n, kind in STEP_GEMMS:
        fns = {d: _gemm(kind, m, k, n, DTYPES[d], device) for d in ("fp32", "bf16")}
        if kind == "linear" and device == "cpu":
            fns.update({f"{d} bias-epilogue": _gemm(kind, m, k, n, DTYPES[d], device, fused=True)
                        for d in ("fp32", "bf16")})
        best = dict.fromkeys(fns, float("inf"))
        for f in fns.values():
            f()  # kernel selection and packing, not timed
        for _ in range(repeats):
            for d, f in fns.items():
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                best[d] = min(best[d], time.perf_counter() - t0)
        flops = 2 * m * k * n
        rows.append({"gemm": name, "MxKxN": f"{m}x{k}x{n}", **{f"{d} GFLOP/s": flops / t / 1e9 for d, t in best.items()},
                     "bf16 / fp32": best["fp32"] / best["bf16"]})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {list(DTYPES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step-gemms", action="store_true", help="fp32 vs bf16 at the step's GEMM shapes instead")
    args = ap.parse_args()
    if args.step_gemms:
        from benchmarks.common import markdown_table
        print(f"torch threads: {torch.get_num_threads()}")
        print(markdown_table(compare_step_gemms(args.device, max(args.repeats, 7))), flush=True)
        return
    for d in args.dtypes.split(","):
        r = matmul_peak(d, args.device, args.repeats)
        shapes = ", ".join(f"{s} {v:.0f}" for s, v in r["per_shape"].items())
        print(f"{d}: peak {r['gflops']:.0f} GFLOP/s ({shapes}; best of {r['repeats']})", flush=True)


if __name__ == "__main__":
    main()
