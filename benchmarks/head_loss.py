"""Benchmark of `distill_head_loss` (LM head + temperature KL + MLM CE): forward + backward time and peak
memory, chunked vs the unfused PyTorch loss, on BERT-base shapes and a large-vocabulary shape.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/head_loss.py
    python benchmarks/head_loss.py --only "llama-1b head 4k" --only "llama-1b head 8k" --only "D=4096 head 8k"

(the script sets LD_PRELOAD=jemalloc for its workers itself when the library exists; --quick for a smoke
run on small shapes). Results: benchmarks/results/head_loss-<device>.{json,md}.

Contenders, all on the same inputs (N tokens, hidden D=768, vocab V, T=2, 15% of tokens labelled, every
token in the KL; the loss is 0.25 ce + 0.25 mlm as in the step):
- `unfused`: full logits `F.linear`, `log_softmax` at T for both, `kl_div(log_target=True)`, `cross_entropy`,
  autograd backward: what a plain PyTorch distillation loss does.
- `native`: `iit_fast.ops.distill_head_loss(impl="native")`, the CPU default (chunk loop, BLAS matmuls,
  C++/OpenMP inner step), default chunk size from the 256 MB budget; `native-256` with 256-row chunks;
  `native-held` (`llama-1b head 1k`): `resident_grad_bytes=2 GiB`, so the op forms the gradients in the forward
  and holds the (V, D) fp32 weight gradient until the backward (4 GEMMs a call, like `unfused`), 512-row chunks.
- `chunked`: the same chunk loop with the plain-torch inner step (`impl="chunked"`).
  (On CUDA every non-unfused contender runs `impl="triton"`.)
- `today`: the op as of `--today REV` (default 529489e, the last commit whose op formed the gradient in the
  forward and kept the (V, D) fp32 weight gradient until backward), run from that commit's files (`git
  archive`) in the same run, with its own TORCH_EXTENSIONS_DIR.
- `before`: the op as of `--before REV` (default abcb559, the last commit whose native forward went over row
  chunks, each 128-row chunk recasting the fp32 master weight slice by slice; its backward already over
  vocabulary slices), run the same way: what the forward over vocabulary slices changed. (Rows measured
  before 2026-12-03 07:40 UTC used db5a941, whose backward went over row chunks too; each row names its `rev`.)
- `liger`: liger-kernel's fused linear JSD (`LigerFusedLinearJSD(jsd_beta=0.5, temperature=T)`: the same four
  GEMMs, a JSD in place of the KL, no bias, no CE), on CUDA where liger-kernel is installed; otherwise the row
  says why it was not run.

The LLM-head shapes (V = 128256, D = 2048 / 4096; `llama-1b head 1k`: 1,024 tokens, the time row that fits beside
other work on the shared machine, every contender incl. unfused) run bf16 as the step does: bf16 hidden states and teacher,
fp32 master decoder weight, the forward under bf16 autocast; the op gets the loss weights (kd_weight =
lm_weight = 0.25), as the step passes them. The 8k-token shapes are memory rows (no unfused contender: its
(N, V) fp32 buffers would need > 12 GB on this shared 24 GB machine); of their 8192 rows the first 256
count (kd_mask, labels), which keeps the run short on the shared 2 cores; the loss's working memory (the
chunk buffers and everything (V, D)-sized) does not depend on how many rows count.

Memory columns: `extra_peak` = peak RSS (VmHWM, reset after the inputs are built: building them has its own
transient peak; rows measured before 2026-12-03 used the process's ru_maxrss) - RSS after the inputs; `beyond_grads` = extra_peak minus
the bytes of the gradients the loss must return (decoder weight (V, D) fp32, hidden (N, D), bias (V,)):
the loss's own working memory (the weight gradient itself is the same for every implementation); `held` =
RSS after the forward - RSS after the inputs: what the loss keeps from forward to backward (jemalloc with
dirty/muzzy decay 0 in the memory rows, so freed pages leave RSS; the time rows keep freed pages, as the main
job's allocator does, so no contender pays page faults of its temporaries on every call).

Method: every (shape, contender) runs in fresh subprocesses, so its peak memory is its own: the peak RSS
high-water mark (`getrusage` ru_maxrss) minus the RSS after the inputs are built (`extra peak`), and the
absolute peak. Contenders run in interleaved rounds (one timed fwd+bwd per worker after its warm-up call), so
load from other work on the shared 2 cores hits all of them alike. Time: median wall clock over the rounds
(`time_ratio`), the ratio of the fastest rounds (`min_ratio`), and the process CPU time (user + sys,
`cpu_ratio`), which is less sensitive to being descheduled. Ratios are against `unfused` of the same shape.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, sync, write_results  # noqa: E402

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
T = 2.0

# (name, tokens, hidden, vocab, warm-up calls per worker, rounds)
SHAPES = [
    ("bert-base 4k", 4096, 768, 30522, 1, 2),
    ("bert-base 16k", 16384, 768, 30522, 0, 2),
    ("large vocab 128k", 1024, 768, 128256, 1, 2),
    ("llama-1b head 8k", 8192, 2048, 128256, 0, 1),
    ("D=4096 head 8k", 8192, 4096, 128256, 0, 1),
    ("llama-1b head 4k", 4096, 2048, 128256, 0, 1),
    ("llama-1b head 1k", 1024, 2048, 128256, 1, 2),   # the time row (unfused fits): warm calls, 2 rounds
]
# the LLM-head shapes: bf16 as the step runs them, and their contenders
BF16_SHAPES = {"llama-1b head 4k", "llama-1b head 1k", "llama-1b head 8k", "D=4096 head 8k"}
MEMORY_SHAPES = {"llama-1b head 8k", "D=4096 head 8k"}
SHAPE_CONTENDERS = {"llama-1b head 4k": [("unfused", None), ("native", None), ("before", None), ("today", None)],
                    "llama-1b head 1k": [("unfused", None), ("native", None), ("before", None), ("today", None),
                                         ("native-held", 512)],
                    "llama-1b head 8k": [("native", None), ("before", None), ("today", None)],
                    "D=4096 head 8k": [("native", None), ("before", None), ("today", None)]}
QUICK_SHAPES = [("quick", 512, 128, 5000, 1, 2)]
# contenders that hold the (V, D) fp32 gradient from forward to backward (`resident_grad_bytes`): 4 GEMMs a call,
# the fewest the loss can do; with 512-row chunks the per-chunk accumulation into it is a small share
RESIDENT_BYTES = {"native-held": 2 ** 31}
TODAY_REV = "529489e"
BEFORE_REV = "abcb559"


def unfused_loss(hs, ht, ws, bs, wt, bt, y):
    z_s = F.linear(hs, ws, bs)                                   # (N, V)
    with torch.no_grad():
        z_t = F.linear(ht, wt, bt)                               # (N, V)
    ce = F.kl_div(F.log_softmax(z_s / T, -1), F.log_softmax(z_t / T, -1), reduction="batchmean",
                  log_target=True) * (T * T)
    mlm = F.cross_entropy(z_s, y, ignore_index=-100)
    return ce, mlm


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: clear_refs 5 resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    """VmHWM of this process in bytes: the peak RSS since the last _reset_peak_rss."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(spec: dict) -> dict:
    """One contender on one shape, in this (fresh) process."""
    import resource

    import psutil
    from iit_fast.ops import distill_head_loss

    torch.manual_seed(0)
    n, d, v = spec["tokens"], spec["hidden"], spec["vocab"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    low = torch.bfloat16 if spec.get("bf16") else torch.float32     # activations and teacher; master weights fp32
    hs = torch.randn(n, d, device=dev).to(low).requires_grad_()
    ht = torch.randn(n, d, device=dev).to(low)
    ws = (torch.randn(v, d, device=dev) * 0.05).requires_grad_()
    bs = torch.zeros(v, device=dev).requires_grad_()
    wt = (torch.randn(v, d, device=dev) * 0.05).to(low)
    bt = torch.zeros(v, device=dev).to(low)
    y = torch.randint(0, v, (n,), device=dev)
    y[torch.rand(n, device=dev) > 0.15] = -100
    # memory rows: only the first `active` rows count (kd_mask; no labels after them), so the run is short;
    # the loss's working memory (chunk buffers, (V, D) terms) does not depend on how many rows count
    active = spec.get("active")
    kd_mask = None
    if active:
        kd_mask = torch.arange(n, device=dev) < active
        y[active:] = -100
    weights = dict(kd_weight=0.25, lm_weight=0.25) if spec.get("bf16") else {}
    name = spec["contender"]
    if name not in ("unfused", "liger") and dev == "cpu":
        from iit_fast.ops.head_loss.native import native_step
        native_step()   # a first-use build is not timed
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD
        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=T)

        def loss():
            return jsd(hs, ws, ht, wt), torch.zeros((), device=dev)
    elif name == "unfused":
        def loss():
            return unfused_loss(hs, ht, ws, bs, wt, bt, y)
    else:
        chunk = spec.get("chunk")
        impl = "triton" if dev == "cuda" else name

        div = None
        if spec.get("divergence"):
            from iit_fast.ops.head_loss.divergence import Divergence
            div = Divergence.of(spec["divergence"], beta=spec.get("param", 0.5), alpha=spec.get("param", 0.1))
            if dev == "cpu":
                from iit_fast.ops.head_loss.native import _div_step, native_step
                native_step()   # the libraries' loads are not timed
                if not div.is_forward_kl:
                    _div_step()

        def loss():
            return distill_head_loss(hs, ht, ws, bs, wt, bt, y, kd_mask, T, chunk_size=chunk, impl=impl, **weights,
                                     **({"divergence": div} if div is not None else {}),
                                     **({"resident_grad_bytes": spec["resident"]} if spec.get("resident") else {}))
    out = {}

    def step():
        for p in (hs, ws, bs):
            p.grad = None
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bool(spec.get("bf16"))):
            ce, mlm = loss()
        out["held_bytes"] = max(out.get("held_bytes", 0), psutil.Process().memory_info().rss - base)
        (0.25 * ce + 0.25 * mlm).backward()
        out["ce"], out["mlm"] = ce.item(), mlm.item()

    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # the peak from here on: building the inputs (fp32 randn cast to bf16) had its own transient peak
        import gc
        gc.collect()
        _reset_peak_rss()
        base = psutil.Process().memory_info().rss
    import time
    for _ in range(spec["warmup"]):
        step()
    if spec.get("profile"):
        return profile_step(step)
    times, cpus = [], []
    for _ in range(spec["repeats"]):
        sync()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        sync()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        times.append(t1 - t0)
        cpus.append((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime))
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss()
    grads = sum(p.numel() * p.element_size() for p in (hs, ws, bs))   # the gradients' bytes (same dtypes)
    return {"times_s": times, "cpu_s": cpus, "peak_bytes": peak, "base_bytes": base,
            "extra_peak_bytes": peak - base, "grad_bytes": grads, **out}


def profile_step(step, top: int = 14) -> dict:
    """torch.profiler (CPU) over one forward + backward call: the ops with the most self time (the native
    C++ steps, called through ctypes, count as the self time of the autograd Function's forward / backward
    ranges), each op's share of the total self time, and the copies' share (aten::copy_: casts of weights
    and logits, layout copies)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ka = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in ka)
    rows = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total} for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)]
    copies = sum(r["self_s"] for r in rows if r["op"] == "aten::copy_")
    return {"total_self_s": total / 1e6, "copy_share": copies * 1e6 / total, "top": rows[:top]}


def profile_main(args):
    """--profile: one profiled call of `native` and `before` per --only shape (fresh processes, one warm-up
    call first), written to head_loss-profile-<device>.{json,md}."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = QUICK_SHAPES if args.quick else [sh for sh in SHAPES if sh[0] in (args.only or ["llama-1b head 1k"])]
    trees = {"before": today_tree(args.before)}
    load_before, rows = os.getloadavg(), []
    for sname, n, d, v, _, _ in shapes:
        for cname in ("before", "native"):
            r = run_one({"tokens": n, "hidden": d, "vocab": v, "contender": cname, "chunk": None, "warmup": 1,
                         "repeats": 0, "bf16": sname in BF16_SHAPES, "profile": True}, trees)
            if "error" in r:
                rows.append({"shape": sname, "contender": cname, "op": "(failed)", "note": r["error"]})
                continue
            print(sname, cname, f"total self {r['total_self_s']:.1f} s, copies {r['copy_share']:.1%}", flush=True)
            rows.append({"shape": sname, "contender": cname, "op": "(all ops)", "self_s": r["total_self_s"],
                         "share": 1.0, "copy_share": r["copy_share"]})
            rows += [{"shape": sname, "contender": cname, **t} for t in r["top"]]
    m = machine()
    m["cpu"] = f"{m.get('cpu')}, {cpu_note()}"
    m["load_average_1_5_15_before_after"] = [load_before, os.getloadavg()]
    m["allocator"] = "jemalloc (LD_PRELOAD) in every worker" if os.path.exists(JEMALLOC) else m["allocator"]
    notes = (f"torch.profiler (CPU activities) over one forward + backward call of `0.25 ce + 0.25 mlm` after one "
             f"warm-up call, each contender in a fresh process: `native` = this tree's op, `before` = the op of "
             f"commit {args.before}. `self_s` = the op's self time on the calling thread (wall-clock: on the shared "
             "2 cores it includes waiting for a core; OpenMP / BLAS worker threads are counted in the op that "
             "waits for them); the native C++ steps (ctypes) count in the autograd Function's forward / "
             "backward range. `copy_share` = aten::copy_'s share of all self time (weight casts, logit casts). "
             "Reproduce: `python benchmarks/head_loss.py --profile --only 'llama-1b head 1k'`. Load average (1, 5, "
             f"15 min) before: {', '.join(f'{x:.1f}' for x in load_before)}; after: "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores).")
    write_results(args.name or f"head_loss-profile-{dev}", {"machine": m, "shapes": shapes}, rows,
                  ["shape", "contender", "op", "calls", "self_s", "share", "copy_share", "note"],
                  title="distill_head_loss: where one call's time goes (torch.profiler)", notes=notes)


def cpu_note() -> str:
    """What decides bf16 speed on this CPU (AMX or not), and that the cores were shared."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    zen4 = "AuthenticAMD" in info and "cpu family\t: 25" in info and "avx512f" in info
    return ((("AMD Zen 4 (family 25, AVX-512), " if zen4 else "")
             + ("avx512_bf16" if "avx512_bf16" in info else "no avx512_bf16")
             + (", AMX" if "amx_bf16" in info else ", no AMX (bf16 GEMMs through AVX-512 BF16)"))
            + "; the cores were shared with other work (load averages below)")


def today_tree(rev: str) -> str:
    """The package as of commit `rev` (git archive of iit_fast/) in a temporary folder; its path."""
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="head_loss_today_"))
    repo = Path(__file__).resolve().parent.parent
    tar = subprocess.run(["git", "-C", str(repo), "archive", rev, "iit_fast"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)
    (root / "ext").mkdir()
    return str(root)


def run_one(spec: dict, trees: dict | None = None) -> dict:
    env = dict(os.environ)
    if os.path.exists(JEMALLOC) and "jemalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = (JEMALLOC + " " + env.get("LD_PRELOAD", "")).strip()
    if spec.get("memory"):
        env["MALLOC_CONF"] = "dirty_decay_ms:0,muzzy_decay_ms:0"   # freed pages leave RSS at once
    elif spec.get("keep_pages") and "MALLOC_CONF" not in env:
        # main()'s time rows: freed pages are kept, as in the main job (iit_fast/allocator.py, or jemalloc):
        # otherwise every call re-faults its big temporaries, ~6 s of the unfused loss's call at 1k x 128k
        env["MALLOC_CONF"] = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
    if spec["contender"] in ("today", "before"):
        # the old package first on the path (the worker puts it before this checkout); its own native build
        tree = trees[spec["contender"]]
        env["IIT_FAST_TODAY_TREE"] = tree
        env["TORCH_EXTENSIONS_DIR"] = os.path.join(tree, "ext")
        spec = dict(spec, contender="native")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--divergences", action="store_true",
                    help="each divergence of the ce term against forward KL (divergences_main); results "
                         "head_loss-divergences-<device>.{json,md}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over one call of native and before per --only shape (default 'llama-1b "
                         "head 1k'); results head_loss-profile-<device>.{json,md}")
    ap.add_argument("--name", default=None, help="results file name (default head_loss-<cpu|cuda>[-quick])")
    ap.add_argument("--today", default=TODAY_REV, help="the commit whose op is the `today` contender")
    ap.add_argument("--before", default=BEFORE_REV, help="the commit whose op is the `before` contender")
    ap.add_argument("--only", action="append", default=None,
                    help="run only these shapes (e.g. --only 'bert-base 4k'); their rows replace those in the "
                         "existing results file, the other shapes' rows are kept")
    args = ap.parse_args()
    if args.worker:
        if os.environ.get("IIT_FAST_TODAY_TREE"):
            sys.path.insert(0, os.environ["IIT_FAST_TODAY_TREE"])   # before this checkout (sys.path[1])
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.divergences:
        divergences_main(args)
        return
    if args.profile:
        profile_main(args)
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.only:
        shapes = [sh for sh in shapes if sh[0] in args.only]
    import importlib.util
    liger_missing = ("not run: liger-kernel's fused linear losses need CUDA" if dev == "cpu" else
                     None if importlib.util.find_spec("liger_kernel") else
                     "not run: liger-kernel is not installed in this environment")
    load_before = os.getloadavg()
    rows = []
    trees = ({"today": today_tree(args.today), "before": today_tree(args.before)}
             if any(sh[0] in SHAPE_CONTENDERS for sh in shapes) else None)
    for sname, n, d, v, warmup, rounds in shapes:
        contenders = [("unfused", None), ("native", None)]
        if sname.startswith("bert-base 4k") or args.quick:
            contenders += [("chunked", None), ("native-256", 256)]
        if liger_missing is None and sname not in BF16_SHAPES:
            contenders.append(("liger", None))
        contenders = SHAPE_CONTENDERS.get(sname, contenders)
        # interleaved rounds (A B C, A B C, ...): load from other work on the machine hits every contender
        res = {c: {"times_s": [], "cpu_s": [], "peak_bytes": 0, "extra_peak_bytes": 0, "held_bytes": 0}
               for c, _ in contenders}
        def spec_of(cname, chunk, memory=sname in MEMORY_SHAPES):
            return {"tokens": n, "hidden": d, "vocab": v, "contender": cname.split("-")[0], "chunk": chunk,
                    "resident": RESIDENT_BYTES.get(cname), "warmup": warmup, "repeats": 1,
                    "bf16": sname in BF16_SHAPES, "memory": memory, "keep_pages": not memory,
                    "active": 256 if sname in MEMORY_SHAPES else None}
        for _ in range(rounds):
            for cname, chunk in contenders:
                r = run_one(spec_of(cname, chunk), trees)
                acc = res[cname]
                if "error" in r:
                    acc["error"] = r["error"]
                    continue
                acc["times_s"] += r["times_s"]
                acc["cpu_s"] += r["cpu_s"]
                for k in ("peak_bytes", "extra_peak_bytes", "held_bytes"):
                    acc[k] = max(acc[k], r[k])
                acc["grad_bytes"] = r["grad_bytes"]
                acc["ce"], acc["mlm"] = r["ce"], r["mlm"]
                print(sname, cname, r.get("times_s"), r.get("cpu_s"), r.get("extra_peak_bytes"), flush=True)
        if sname not in MEMORY_SHAPES and dev == "cpu" and os.path.exists(JEMALLOC):
            # a time row's workers keep freed pages, so pages freed before the baseline (building the inputs)
            # serve the loss unseen by RSS: its memory columns come from one more call per contender in a
            # worker that returns freed pages at once (as the memory rows do)
            for cname, chunk in contenders:
                r = run_one(dict(spec_of(cname, chunk, memory=True), warmup=0), trees)
                if "error" not in r and "error" not in res[cname]:
                    res[cname].update({k: r[k] for k in ("peak_bytes", "extra_peak_bytes", "held_bytes")})
        flops = 4 * 2 * n * d * v  # logits s, logits t, dh, dW (the teacher has no backward)
        for acc in res.values():
            if acc["times_s"]:
                acc["time_s"] = statistics.median(acc["times_s"])
                acc["min_s"] = min(acc["times_s"])
                acc["cpu_med_s"] = statistics.median(acc["cpu_s"])
        # ratios against unfused where it runs, else against today's op (the memory rows)
        bname = "unfused" if "unfused" in res else "today"
        base = res[bname]
        for cname, _ in contenders:
            r = res[cname]
            row = {"shape": sname, "N": n, "D": d, "V": v, "contender": cname, "vs": bname,
                   "dtype": "bf16" if sname in BF16_SHAPES else "fp32",
                   "rev": {"today": args.today, "before": args.before}.get(cname, "")}
            if "time_s" not in r or "time_s" not in base:
                row["note"] = r.get("error") or base.get("error", "failed")
                rows.append(row)
                continue
            row.update({
                "time_s": r["time_s"], "time_ratio": r["time_s"] / base["time_s"],
                "min_ratio": r["min_s"] / base["min_s"],
                "cpu_s": r["cpu_med_s"], "cpu_ratio": r["cpu_med_s"] / base["cpu_med_s"],
                "GFLOP/s": flops / r["min_s"] / 1e9,
                "extra_peak_MB": r["extra_peak_bytes"] / 2**20,
                "extra_peak_ratio": r["extra_peak_bytes"] / base["extra_peak_bytes"],
                "beyond_grads_MB": (r["extra_peak_bytes"] - r["grad_bytes"]) / 2**20,
                "beyond_grads_ratio": (r["extra_peak_bytes"] - r["grad_bytes"])
                / max(1, base["extra_peak_bytes"] - base["grad_bytes"]),
                "held_MB": r["held_bytes"] / 2**20,
                "peak_MB": r["peak_bytes"] / 2**20, "peak_ratio": r["peak_bytes"] / base["peak_bytes"],
                "ce": r["ce"], "mlm": r["mlm"], "times_s": r["times_s"], "cpu_times_s": r["cpu_s"],
            })
            rows.append(row)
        if liger_missing is not None:
            rows.append({"shape": sname, "N": n, "D": d, "V": v, "contender": "liger (fused linear JSD)",
                         "note": liger_missing})
    load_after = os.getloadavg()
    # the machine's GEMM peak in each dtype, measured in this run: the 4 GEMMs' FLOPs over a row's time against it
    from benchmarks.peak import matmul_peak
    peaks = {dt: matmul_peak(dt, dev)["gflops"] for dt in sorted({r["dtype"] for r in rows if "dtype" in r})}
    for r in rows:
        if "GFLOP/s" in r:
            r["of_peak"] = r["GFLOP/s"] / peaks[r["dtype"]]
    m = machine()
    m["load_average_1_5_15_before_after"] = [load_before, load_after]
    m["matmul_peak_gflops"] = peaks
    m["allocator"] = ("jemalloc (LD_PRELOAD) in every worker; time rows keep freed pages (MALLOC_CONF="
                      "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1, as the main job's allocator "
                      "does), memory rows return them at once (dirty_decay_ms:0,muzzy_decay_ms:0)"
                      if os.path.exists(JEMALLOC) else m["allocator"])
    m["cpu"] = f"{m.get('cpu')}, {cpu_note()}"
    notes = (
        "Forward + backward of `0.25 ce + 0.25 mlm` (T=2, 15% of tokens labelled, all tokens in the KL). "
        "Each contender runs in a fresh subprocess with LD_PRELOAD=jemalloc; `extra_peak_MB` = peak RSS "
        "(getrusage ru_maxrss) minus the RSS after the inputs were built, i.e. what the loss itself needs "
        "(logits, softmax buffers, gradients); `peak_MB` is the process's absolute high-water mark (incl. "
        "torch, the inputs and the weight gradient). Ratios are against `unfused` of the same shape. "
        "Contenders run in interleaved rounds, one fresh worker per round (warm-up call, then one timed call); "
        "`time_ratio` = median wall-clock ratio, `min_ratio` = ratio of the fastest rounds, `cpu_ratio` = ratio "
        "of process CPU time (user+sys). The 2 CPU cores are shared with other work, so wall times are noisy; "
        "liger-kernel's fused linear losses (JSD, beta 0.5: same GEMMs as the KL) run only on CUDA. "
        "`beyond_grads_MB` = extra_peak minus the bytes of the returned gradients (the loss's own working "
        "memory); `held_MB` = RSS after the forward minus RSS after the inputs (kept from forward to backward). "
        "Time rows' workers keep freed pages (as the main job's allocator does); their memory columns come "
        "from one more call per contender in a worker that returns freed pages at once. "
        f"`today` = the op of commit {args.today} (gradient formed in the forward, (V, D) fp32 kept to "
        "backward), run from that commit's files in the same run; "
        "`before` = the op of the commit in the row's `rev` (db5a941: gradient formed in the backward over "
        "128-row chunks; abcb559: backward over vocabulary slices, forward over 128-row chunks recasting the "
        "fp32 master weight per chunk), likewise. Ratios are against `vs` (unfused, or today "
        "where unfused would not fit). The LLM-head shapes are bf16 (bf16 states and teacher, fp32 master "
        "decoder weight, forward under autocast, kd_weight = lm_weight = 0.25 passed to the op). "
        "`GFLOP/s`: the 4 GEMMs a head loss needs at least (student and teacher logits, dh, dW: 8 N D V FLOPs) "
        "over the fastest round; `of_peak`: that against the best torch.mm of the row's dtype measured in the "
        "same run (benchmarks/peak.py; " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()) + "). "
        "Reproduce: `python benchmarks/head_loss.py`.")
    name = args.name or f"head_loss-{dev}" + ("-quick" if args.quick else "")
    cols = ["shape", "dtype", "contender", "rev", "vs", "time_s", "time_ratio", "min_ratio", "cpu_s", "cpu_ratio",
            "GFLOP/s", "of_peak", "extra_peak_MB", "extra_peak_ratio", "beyond_grads_MB", "beyond_grads_ratio",
            "held_MB",
            "peak_MB", "peak_ratio", "note"]
    notes += (f" Load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in load_before)}; after: "
              f"{', '.join(f'{x:.1f}' for x in load_after)} (2 cores).")
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    if args.only and path.exists():
        # keep the other shapes' rows (and say when they were measured)
        old = json.loads(path.read_text())
        kept = [r for r in old["rows"] if r["shape"] not in args.only]
        for r in kept:
            r.setdefault("measured", old["machine"].get("date"))
            r.setdefault("rev", {"before": "db5a941", "today": TODAY_REV}.get(r["contender"], ""))   # older runs'
            r.setdefault("N", next((sh[1] for sh in SHAPES if sh[0] == r["shape"]), None))
        rows = [dict(r, measured=m["date"]) for r in rows] + kept
        order = [sh[0] for sh in SHAPES]
        rows.sort(key=lambda r: order.index(r["shape"]) if r["shape"] in order else 99)
        cols = cols + ["measured"]
        notes += " Rows carry the time they were measured (`--only` re-runs replace a shape's rows)."
    write_results(name, {"machine": m, "temperature": T, "shapes": shapes}, rows, cols,
                  title="distill_head_loss: chunked vs unfused (forward + backward)", notes=notes)


# ----------------------------------------------------------------------------------------------------
# --divergences: each divergence of the ce term against forward KL (issue 26)
# ----------------------------------------------------------------------------------------------------

# (divergence, its parameter): jsd's beta, the skew ones' alpha (DistiLLM's default 0.1)
DIVERGENCES = [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5), ("skew_kl", 0.1),
               ("skew_reverse_kl", 0.1), ("tvd", None)]
DIV_HIDDEN = 768
# the shapes (tokens, vocab): the inner step over every row, per divergence
DIV_SHAPES = [(4096, 32000), (16384, 32000), (4096, 128256), (16384, 128256)]
# the whole op (forward + backward), every divergence in its own fresh process: time and peak memory
DIV_OP_SHAPES = [(4096, 32000), (1024, 128256)]
DIV_QUICK = ([(512, 5000)], [(512, 5000)])


def _div(k, p):
    from iit_fast.ops.head_loss.divergence import Divergence
    return Divergence.of(k, beta=p or 0.5, alpha=p or 0.1)


def inner_step_cpu(tokens: int, vocab: int, rounds: int = 2) -> dict:
    """Process CPU seconds of the inner step alone over `tokens` rows (no GEMMs), per divergence: the op's
    chunk size for this vocabulary, one chunk of logits copied in before each call (the copy not timed),
    the divergences interleaved, the median of `rounds`. What a divergence adds to the op at this shape."""
    import resource

    from iit_fast.ops.head_loss.chunked import INNER, default_chunk_size
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inner = INNER["triton" if dev == "cuda" else "native"]
    c = default_chunk_size(tokens, vocab)
    g = torch.Generator(device=dev).manual_seed(0)
    zs0 = torch.randn(c, vocab, generator=g, device=dev) * 3
    zt0 = zs0 + torch.randn(c, vocab, generator=g, device=dev)
    y = torch.randint(0, vocab, (c,), generator=g, device=dev)
    y[torch.rand(c, generator=g, device=dev) > 0.15] = -100
    w = torch.full((c,), 1.0 / tokens, device=dev)
    zs, zt = torch.empty_like(zs0), torch.empty_like(zt0)
    cpu = {k: [] for k, _ in DIVERGENCES}
    for k, p in DIVERGENCES:   # warm-up: the native libraries' loads are not timed
        inner(zs0[:1].clone(), zt0[:1].clone(), y[:1], w[:1], w[:1], T, divergence=_div(k, p))

    def now():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    for _ in range(rounds):
        for k, p in DIVERGENCES:
            div, total = _div(k, p), 0.0
            for s in range(0, tokens, c):
                e = min(s + c, tokens)
                zs[: e - s].copy_(zs0[: e - s])
                zt[: e - s].copy_(zt0[: e - s])
                sync()
                t0 = now()
                inner(zs[: e - s], zt[: e - s], y[: e - s], w[: e - s], w[: e - s], T, divergence=div)
                sync()
                total += now() - t0
            cpu[k].append(total)
    return {k: statistics.median(v) for k, v in cpu.items()}


def divergences_main(args):
    """Each divergence against forward KL: (1) the whole op, forward + backward, in fresh processes (time
    and extra peak memory) at DIV_OP_SHAPES; (2) the inner step alone over every row at the issue's shapes
    (DIV_SHAPES), and from it the op's time ratio there: (T_op(forward KL) + inner_div - inner_fwd) /
    T_op(forward KL), with T_op(forward KL) measured at 4k tokens and scaled linearly in tokens for 16k."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inner_shapes, op_shapes = DIV_QUICK if args.quick else (DIV_SHAPES, DIV_OP_SHAPES)
    d = 128 if args.quick else DIV_HIDDEN
    load_before = os.getloadavg()
    rows, op_cpu = [], {}
    # (1) the whole op, one fresh process per divergence (no warm-up: the same cold start for each)
    for n, v in op_shapes:
        res = {}
        for k, p in DIVERGENCES:
            r = run_one({"tokens": n, "hidden": d, "vocab": v, "contender": "native", "chunk": None, "warmup": 0,
                         "repeats": 1, "divergence": k, "param": p})
            print(f"op {n} x {v}", k, r.get("times_s"), r.get("cpu_s"), r.get("extra_peak_bytes"), flush=True)
            res[k] = r
        base = res["forward_kl"]
        if "error" not in base:
            op_cpu[v] = (n, base["cpu_s"][0])
        for k, p in DIVERGENCES:
            r = res[k]
            row = {"part": "whole op", "tokens": n, "vocab": v, "divergence": str(_div(k, p))}
            if "error" in r or "error" in base:
                row["note"] = r.get("error") or base.get("error")
            else:
                row.update({"time_s": r["times_s"][0], "cpu_s": r["cpu_s"][0],
                            "time_ratio": r["times_s"][0] / base["times_s"][0],
                            "cpu_ratio": r["cpu_s"][0] / base["cpu_s"][0],
                            "extra_peak_MB": r["extra_peak_bytes"] / 2**20,
                            "extra_peak_ratio": r["extra_peak_bytes"] / base["extra_peak_bytes"], "ce": r["ce"]})
            rows.append(row)
    # (2) the inner step over every row of the shapes
    for n, v in inner_shapes:
        cpu = inner_step_cpu(n, v, rounds=1 if args.quick else 2)
        print(f"inner {n} x {v}", cpu, flush=True)
        op = op_cpu.get(v)
        t_op = op[1] * n / op[0] if op else None
        for k, p in DIVERGENCES:
            row = {"part": "inner step", "tokens": n, "vocab": v, "divergence": str(_div(k, p)),
                   "inner_cpu_s": cpu[k], "inner_ratio": cpu[k] / cpu["forward_kl"]}
            if t_op is not None:
                row["op_cpu_ratio_est"] = (t_op + cpu[k] - cpu["forward_kl"]) / t_op
                row["fwd_op_cpu_s"] = t_op
            rows.append(row)
    load_after = os.getloadavg()
    m = machine()
    m["load_average_1_5_15_before_after"] = [load_before, load_after]
    m["allocator"] = "jemalloc (LD_PRELOAD) in every worker" if os.path.exists(JEMALLOC) else m["allocator"]
    impl = "triton" if dev == "cuda" else "native"
    notes = (
        f"`distill_head_loss(impl='{impl}', divergence=...)`, hidden {d}, T=2, 15% of tokens labelled, every "
        "token in the divergence, default chunk size; jsd beta 0.5, skew alpha 0.1. Part `whole op`: forward + "
        "backward of `0.25 ce + 0.25 mlm`, each divergence in its own fresh process (no warm-up, the same cold "
        "start for each), one call: wall `time_s`, process CPU `cpu_s` (user+sys: less sensitive to the shared "
        "cores), ratios against forward KL; `extra_peak_MB` = peak RSS minus the RSS after the inputs were "
        "built. Part `inner step`: the per-chunk step alone (no GEMMs) over every row of the shape, process CPU "
        "seconds, divergences interleaved, median of 2 rounds: what a divergence adds; `op_cpu_ratio_est` = "
        "(forward KL's whole-op CPU time + inner_div - inner_fwd) / forward KL's whole-op CPU time, the "
        "whole-op time measured above at the same vocabulary and scaled linearly in tokens (`fwd_op_cpu_s`). "
        "Forward KL runs 3 passes per row; the others 4 (their gradient needs S = sum_v p_v g_v of the row "
        "first) and no extra buffer: the teacher chunk holds the pass-3 scratch. The machine's 2 cores were "
        "shared with other work (load averages below): wall times are noisy, CPU-time ratios are what to read. "
        "Reproduce: `python benchmarks/head_loss.py --divergences`.")
    notes += (f" Load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in load_before)}; after: "
              f"{', '.join(f'{x:.1f}' for x in load_after)}.")
    name = args.name or f"head_loss-divergences-{dev}" + ("-quick" if args.quick else "")
    cols = ["part", "tokens", "vocab", "divergence", "time_s", "time_ratio", "cpu_s", "cpu_ratio", "extra_peak_MB",
            "extra_peak_ratio", "inner_cpu_s", "inner_ratio", "fwd_op_cpu_s", "op_cpu_ratio_est", "note"]
    write_results(name, {"machine": m, "temperature": T, "hidden": d, "op_shapes": op_shapes,
                         "inner_shapes": inner_shapes, "divergences": DIVERGENCES}, rows, cols,
                  title="distill_head_loss: each divergence against forward KL", notes=notes)

if __name__ == "__main__":
    main()
