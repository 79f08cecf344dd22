"""Kernel microbenchmark: `interchange`, `hidden_loss` (cos) and `interchange_hidden_loss` (cos), forward and
forward+backward, fused path (native C++ on CPU, Triton on CUDA) against the PyTorch reference in eager mode
and under `torch.compile`, over tokens 1k..64k x hidden 384/768/1024 (B = tokens / 128 rows of S = 128).

Reported per point: median time, achieved GB/s against the bytes the op must move (in units of one (N, D)
tensor: interchange fwd 2 (read x, write out), fwd+bwd 4; hidden_loss fwd 2 (read s, t), fwd+bwd 3 (+ write
ds); interchange_hidden_loss fwd 3, fwd+bwd 7 (fwd read x, t, write out; bwd read dout, x, t, write dx)), the
fraction of the machine's copy bandwidth measured in the same run (a 256 MiB tensor copy, read + write
counted; sampled before, between sizes and after the sweep, the largest is used), and peak memory of one call (CPU: jemalloc's
per-thread peak of live bytes, `thread.peak`; CUDA: max_memory_allocated), above the inputs. At 16k x 768
the fused path is also timed against a copy of the same bytes run back to back (`x copy (paired)`).
Also the Triton kernels' registers / spills per thread at sm_80 / sm_90 (compiled ahead of time, no GPU needed).

    python benchmarks/interchange_kernels.py            # CPU: re-executes itself under jemalloc (see below); ~8 min on 2 cores
    python benchmarks/interchange_kernels.py --quick    # 1k / 4k tokens only
    python benchmarks/interchange_kernels.py --device cuda

On CPU it re-executes itself with LD_PRELOAD=libjemalloc.so.2 and MALLOC_CONF=oversize_threshold:0,
dirty_decay_ms:-1,muzzy_decay_ms:-1 (unless LD_PRELOAD is already set or --no-reexec): jemalloc's default
sends blocks over 8 MiB to an arena that returns them to the OS at once, so every fresh (N, D) output would
page-fault again on each call (4x the copy time here), for every contender alike.
Writes benchmarks/results/kernels-<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
MALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def _maybe_reexec(args):
    if args.device != "cpu" or args.no_reexec or os.environ.get("LD_PRELOAD") or not os.path.exists(JEMALLOC):
        return
    env = dict(os.environ, LD_PRELOAD=JEMALLOC, MALLOC_CONF=MALLOC_CONF)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import RESULTS, machine, measure_copy_bandwidth, median_time, sync, write_results  # noqa: E402
from iit_fast.ops.interchange import hidden_loss, interchange, interchange_hidden_loss  # noqa: E402
from iit_fast.ops.interchange.reference import (hidden_loss_reference, interchange_hidden_loss_reference,  # noqa: E402
                                    interchange_reference)

OPS = ("interchange", "hidden_loss", "interchange_hidden_loss")
# bytes the op must move, in (N, D) tensors of the input dtype: (forward, forward + backward)
MUST_MOVE = {"interchange": (2, 4), "hidden_loss": (2, 3), "interchange_hidden_loss": (3, 7)}
SEQ = 128


# ---------------------------------------------------------------------------------------------------------
# Peak memory of one call
# ---------------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak live bytes allocated during a call, above the live bytes at its start."""

    def __init__(self, device):
        self.device = device
        self.mallctl = None
        if device == "cpu" and "jemalloc" in os.environ.get("LD_PRELOAD", ""):
            try:
                lib = ctypes.CDLL(os.environ["LD_PRELOAD"].split(":")[0])
                fn = lib.mallctl
                fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
                v, sz = ctypes.c_uint64(0), ctypes.c_size_t(8)
                if fn(b"thread.peak.read", ctypes.byref(v), ctypes.byref(sz), None, 0) == 0:
                    self.mallctl = fn
            except (OSError, AttributeError):
                pass
        self.how = ("jemalloc thread.peak (main thread)" if self.mallctl else
                    "torch.cuda.max_memory_allocated" if device == "cuda" else "unavailable (no jemalloc)")

    def measure(self, fn) -> int | None:
        if self.device == "cuda":
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync()
            return torch.cuda.max_memory_allocated() - base
        if self.mallctl is None:
            fn()
            return None
        self.mallctl(b"thread.peak.reset", None, None, None, 0)
        fn()
        v, sz = ctypes.c_uint64(0), ctypes.c_size_t(8)
        self.mallctl(b"thread.peak.read", ctypes.byref(v), ctypes.byref(sz), None, 0)
        return int(v.value)


# ---------------------------------------------------------------------------------------------------------
# Inputs and calls
# ---------------------------------------------------------------------------------------------------------
def make_inputs(tokens, D, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = max(2, tokens // SEQ)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (B,), generator=g)
    mask = torch.arange(SEQ)[None] < lengths[:, None]
    pi = torch.randperm(B, generator=g)
    while (pi == torch.arange(B)).any():
        pi = torch.randperm(B, generator=g)
    k = (0.3 * torch.minimum(lengths, lengths[pi])).long().clamp_min(1)
    bs = (torch.rand(B, generator=g) * (lengths - k + 1)).long()
    ss = (torch.rand(B, generator=g) * (lengths[pi] - k + 1)).long()
    x = torch.randn(B, SEQ, D, generator=g).to(device=device, dtype=dtype)
    t = torch.randn(B, SEQ, D, generator=g).to(device=device, dtype=dtype)
    go = torch.randn(B, SEQ, D, generator=g).to(device=device, dtype=dtype)
    return dict(x=x, t=t, mask=mask.to(device), pi=pi.to(device), bs=bs.to(device), ss=ss.to(device),
                k=k.to(device), go=go)


def op_fns(op: str, fused_impl: str, compiled: dict):
    """contender -> f(x, inp) returning (outputs, grad_outputs)."""
    if op == "interchange":
        def mk(f):
            return lambda x, a: ([f(x, a["pi"], a["bs"], a["ss"], a["k"], None)], [a["go"]])
        ref, fused = interchange_reference, lambda *a: interchange(*a, impl=fused_impl)
    elif op == "hidden_loss":
        def mk(f):
            return lambda x, a: ([f(x, a["t"], a["mask"], "cos")], [None])
        ref, fused = hidden_loss_reference, lambda *a: hidden_loss(*a, impl=fused_impl)
    else:
        def mk(f):
            def call(x, a):
                out, loss = f(x, a["t"], a["mask"], a["pi"], a["bs"], a["ss"], a["k"], None, "cos")
                return [out, loss], [a["go"], None]
            return call
        ref, fused = interchange_hidden_loss_reference, lambda *a: interchange_hidden_loss(*a, impl=fused_impl)
    if op not in compiled:
        compiled[op] = torch.compile(ref, dynamic=True)
    return {fused_impl: mk(fused), "eager": mk(ref), "compile": mk(compiled[op])}


def runner(call, inp, backward: bool):
    """One call: forward (x requires grad, as in training), and with `backward` the gradient of x through
    torch.autograd.grad (nothing accumulates in x.grad, so one call's memory does not depend on the last)."""
    x = inp["x"].detach().requires_grad_(True)

    def run():
        outs, grads = call(x, inp)
        if backward:
            return torch.autograd.grad(outs, x, grads)
        return outs
    return run


def paired_copy_ratio(run, nbytes: int, device: str, rounds: int = 11) -> float:
    """Median over rounds of time(op) / time(a copy moving the same bytes), the two run back to back: the
    distance to the copy-bandwidth bound, robust to the load of a shared machine drifting during the sweep."""
    import statistics
    a = torch.empty(max(1, nbytes // 8), dtype=torch.float32, device=device).normal_()   # read + write = nbytes
    b = torch.empty_like(a)
    copy = lambda: b.copy_(a)  # noqa: E731
    run(), copy()
    ratios = []
    for _ in range(rounds):
        t_op, _ = median_time(run, repeats=1, warmup=0)
        t_cp, _ = median_time(copy, repeats=1, warmup=0)
        ratios.append(t_op / t_cp)
    return statistics.median(ratios)


# ---------------------------------------------------------------------------------------------------------
def aot_registers() -> list[dict]:
    try:
        from iit_fast.ops.aot import run_in_subprocess
        rows = run_in_subprocess("iit_fast.ops.aot", "compile_configs", ["iit_fast.ops.interchange.triton"],
                                 [80, 90], timeout=600)
        return [{k: r[k] for k in ("kernel", "arch", "dtype", "constexprs", "num_warps", "registers", "spills",
                                   "local_bytes")} for r in rows]
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return [{"error": f"{type(e).__name__}: {e}"}]


def sizes(quick: bool):
    pts = []
    for tokens in (1024, 4096) if quick else (1024, 4096, 16384, 65536):
        for D in (384, 768, 1024):
            if tokens == 65536 and D != 768:
                continue   # 2 cores: one point at 64k keeps the sweep under ~10 min
            pts.append((tokens, D))
    return pts


def plot(rows, path, device):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, op in zip(axes, OPS):
        for contender, style in (("fused", "-o"), ("eager", "--s"), ("compile", ":^")):
            pts = sorted((r["tokens"], r["GB/s"]) for r in rows
                         if r["op"] == op and r["mode"] == "fwd+bwd" and r["hidden"] == 768
                         and r["contender"].startswith(contender if contender != "fused" else ("native", "triton")))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=contender)
        bw = [r["copy GB/s"] for r in rows][:1]
        if bw:
            ax.axhline(bw[0], color="gray", lw=0.8, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op}, fwd+bwd, D=768")
        ax.set_xlabel("tokens")
        ax.set_ylabel("GB/s (bytes the op must move)")
        ax.legend()
    fig.suptitle(f"kernels on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-reexec", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    _maybe_reexec(args)

    device, dtype = args.device, getattr(torch, args.dtype)
    fused_impl = "triton" if device == "cuda" else "native"
    elem = torch.empty((), dtype=dtype).element_size()
    t_start = time.time()
    bw0 = measure_copy_bandwidth(device=device)
    bws = [bw0]
    peak = PeakMemory(device)
    compiled: dict = {}
    compile_s: dict = {}
    rows = []
    for tokens, D in sizes(args.quick):
        inp = make_inputs(tokens, D, device, dtype)
        N = inp["x"].shape[0] * SEQ
        repeats, warmup = (5, 1) if N * D >= 65536 * 768 else (7, 2)
        for op in OPS:
            fns = op_fns(op, fused_impl, compiled)
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                nbytes = MUST_MOVE[op][backward] * N * D * elem
                times = {}
                for contender, call in fns.items():
                    if contender == "compile" and args.no_compile:
                        continue
                    run = runner(call, inp, backward)
                    if contender == "compile" and (op, mode) not in compile_s:
                        t0 = time.perf_counter()
                        run()
                        compile_s[(op, mode)] = time.perf_counter() - t0
                    t, _ = median_time(run, repeats=repeats, warmup=warmup)
                    mem = peak.measure(run)
                    times[contender] = t
                    paired = (paired_copy_ratio(run, nbytes, device)
                              if contender == fused_impl and (N, D) == (16384, 768) else None)
                    rows.append({"op": op, "mode": mode, "tokens": N, "hidden": D, "contender": contender,
                                 "ms": t * 1e3, "GB/s": nbytes / t / 1e9, "bytes": nbytes,
                                 "peak MiB": None if mem is None else mem / 2**20,
                                 **({"x copy (paired)": paired} if paired is not None else {})})
                for r in rows[-len(times):]:
                    r["speedup vs eager"] = times["eager"] / (r["ms"] / 1e3)
                    if "compile" in times:
                        r["speedup vs compile"] = times["compile"] / (r["ms"] / 1e3)
                print(f"{op:24s} {mode:8s} N={N:6d} D={D:5d} " +
                      "  ".join(f"{c}={t * 1e3:8.2f}ms" for c, t in times.items()), flush=True)
        del inp
        bws.append(measure_copy_bandwidth(device=device))   # the machine is shared: sample it throughout
    bw1 = measure_copy_bandwidth(device=device)
    bws.append(bw1)
    bw = max(bws)
    for r in rows:
        r["copy GB/s"] = bw / 1e9
        r["frac of copy bw"] = r["GB/s"] * 1e9 / bw
        r["x copy bound"] = (r["ms"] / 1e3) / (r["bytes"] / bw)
    regs = aot_registers()
    m = machine()
    m["malloc_conf"] = os.environ.get("MALLOC_CONF", "")
    m["peak_memory"] = peak.how
    wall = time.time() - t_start

    # the headline: 16k x 768, fused fwd+bwd vs eager / compile, against the copy bound
    head = [r for r in rows if r["tokens"] == 16384 and r["hidden"] == 768]
    name = args.name or f"kernels-{device}"
    columns = ["op", "mode", "tokens", "hidden", "contender", "ms", "GB/s", "frac of copy bw", "x copy bound",
               "speedup vs eager", "speedup vs compile", "peak MiB"]
    head_columns = columns + ["x copy (paired)"]
    reg_rows = [r for r in regs if "error" not in r]
    reg_summary = {}
    for r in reg_rows:
        key = (r["kernel"], r["arch"])
        cur = reg_summary.setdefault(key, {"max registers": 0, "spills": 0, "local bytes": 0, "configs": 0})
        cur["max registers"] = max(cur["max registers"], r["registers"])
        cur["spills"] += r["spills"]
        cur["local bytes"] += r["local_bytes"]
        cur["configs"] += 1
    from benchmarks.common import markdown_table
    notes = (f"Copy bandwidth (256 MiB copy, read + write), sampled before, between the sizes and after the "
             f"sweep: {', '.join(f'{b / 1e9:.1f}' for b in bws)} GB/s; the largest ({bw / 1e9:.2f} GB/s) is the "
             f"bound. The machine (2 cores) is shared with other jobs: single points are noisy. dtype {args.dtype}; fused path = {fused_impl}; "
             f"hidden_loss and interchange_hidden_loss with kind='cos'. Peak memory: {peak.how}, live bytes "
             f"allocated by one call above those at its start. MALLOC_CONF={m['malloc_conf']!r}. "
             f"torch.compile (dynamic=True) first-call seconds: "
             + ", ".join(f"{k[0]} {k[1]} {v:.1f}" for k, v in compile_s.items())
             + f". Sweep wall time {wall:.0f} s.\n\n## 16k tokens x 768\n\n"
             + markdown_table(head, head_columns)
             + "\n`x copy (paired)`: the fused call's time over that of a copy moving the same bytes, run back to "
               "back 11 times (median of the ratios): the distance to the copy bound with the load drift removed.\n"
             + "\n## Triton kernels compiled ahead of time (per kernel and arch, over every config the launchers "
               "use)\n\n"
             + markdown_table([{"kernel": k[0], "arch": k[1], **v} for k, v in sorted(reg_summary.items())])
             + ("" if reg_rows else f"\nAOT failed: {regs}\n"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot(rows, RESULTS / f"{name}.png", device)
    payload = {"machine": m, "copy_bandwidth_GBps": [b / 1e9 for b in bws],
               "compile_seconds": {f"{k[0]} {k[1]}": v for k, v in compile_s.items()},
               "triton_aot": regs, "plot": str(png) if png else None, "wall_s": wall,
               "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    jpath, mpath = write_results(name, payload, rows, columns,
                                 title=f"Fused interchange / hidden-loss kernels vs PyTorch ({device})", notes=notes)
    print(f"wrote {jpath}, {mpath}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
