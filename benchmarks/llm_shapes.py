"""The step at LLM shapes: Llama-3.2-1B and Qwen2.5-0.5B teachers (random weights, their real configs) into
students made of their own layers; naive, fast and standard; activation checkpointing off and on.

    python benchmarks/llm_shapes.py --shapes tiny                      # the smoke run: tiny Llama / Qwen2 shapes
    python benchmarks/llm_shapes.py --shapes llama-3.2-1b --seqs 1024,2048 --batch 2
    python benchmarks/llm_shapes.py --shapes llama-3.2-1b --seqs 2048 --batch 8 --modes fast --checkpointing on --adamw
    python benchmarks/llm_shapes.py --shapes llama-style,small-llama --seqs 256 --batch 4   # the planner's smaller rows

The configs are built offline with transformers' config classes (no hub): llama-3.2-1b = 16 x 2048, 32 query /
8 key-value heads (head dim 64), SwiGLU 8192, vocab 128256, tied embeddings, rope theta 500000 (llama3 scaling)
-> a 4-block student (blocks 0, 5, 10, 15); qwen2.5-0.5b = 24 x 896, 14 / 2 heads, intermediate 4864, vocab
151936 (padded: the losses compare the tokenizer's first 151665 ids, `shared_vocab`), tied, rope theta 1e6 ->
6 blocks. Precision: bf16 where `precision.native_bf16` says the machine is fast at it (the teacher's weights
in bf16, the student's fp32 weights under bf16 autocast, as train.py runs it), fp32 otherwise (or --precision).

Every row runs in a fresh subprocess (jemalloc as benchmarks/step.py sets it), so its peak RSS is its own. The
worker builds the models (the teacher directly in its dtype), then resets the kernel's RSS high-water mark
(/proc/self/clear_refs; jemalloc's freed pages purged first, so the build's leftovers are not counted: rows
whose raw record lacks "purged" were measured before that) and runs `--warmup` steps and `--repeats` timed steps (median): "step peak" is the
high-water mark over those steps, models included; "runtime" is the RSS of the interpreter and libraries before
any model, which the planner (iit_fast/plan.py) does not model. --adamw adds the optimizer step (torch AdamW as
optim.make_optimizer makes it) and its state. MFU: counted FLOPs (`flops.counted_flops`, the step's exact count)
per second over this machine's matmul peak of the compute dtype, measured in the same run (benchmarks/peak.py,
before and after the rows; the larger). Checkpointing "on" = `IntervenableLM.enable_activation_checkpointing`
on the student (the teacher runs without grad); rows are skipped with a message when that interface is absent.
Memory safety on a shared machine: a row runs only when the available memory exceeds the planner's estimate of
its peak + --headroom-gb; otherwise it is recorded as skipped, with both figures.
Results: benchmarks/results/<name>.{json,md} (default llm-shapes-<device>); rows of earlier runs of the same
file are kept unless re-measured (so heavy rows can run one invocation at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, current_rss_bytes, machine, median_time, write_results  # noqa: E402
from benchmarks.peak import matmul_peak  # noqa: E402
from benchmarks.step import worker_env  # noqa: E402

MODES = ("naive", "fast", "standard")


def llama_32_1b(**over):
    from transformers import LlamaConfig
    kw = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
              rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
              mlp_bias=False, hidden_act="silu", bos_token_id=128000, eos_token_id=128001,
              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})
    kw.update(over)
    return LlamaConfig(**kw)


def qwen25_05b(**over):
    from transformers import Qwen2Config
    kw = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu",
              bos_token_id=151643, eos_token_id=151643)
    kw.update(over)
    return Qwen2Config(**kw)


# name -> (config factory, student blocks, shared_vocab (the tokenizer's ids) or None)
SHAPES = {
    "llama-3.2-1b": (llama_32_1b, 4, None),
    "qwen2.5-0.5b": (qwen25_05b, 6, 151665),
    # benchmarks/step.py's llama-style shape (vocab 32000, 8 x 1024 -> 4) and tiny ones for the smoke run
    "llama-style": (lambda: llama_32_1b(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                        head_dim=64, max_position_embeddings=4096, rope_scaling=None,
                                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2), 4, None),
    "tiny-llama": (lambda: llama_32_1b(vocab_size=4000, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2), 2, None),
    "tiny-qwen2": (lambda: qwen25_05b(vocab_size=5000, hidden_size=112, intermediate_size=304, num_hidden_layers=6,
                                      num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=2048,
                                      bos_token_id=1, eos_token_id=2), 3, 4900),
}
GROUPS = {"tiny": "tiny-llama,tiny-qwen2", "llm": "llama-3.2-1b,qwen2.5-0.5b"}


def hwm_bytes() -> int:
    """The kernel's RSS high-water mark of this process (VmHWM), which `reset_hwm` resets."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def purge_allocator() -> str:
    """Give back what the build freed (jemalloc keeps freed pages under benchmarks/step.py's MALLOC_CONF), so
    that the step's peak RSS holds the models and the step, not the build's leftovers: jemalloc's
    arena.<all>.purge through mallctl. Says what it did."""
    import ctypes
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return "no jemalloc mallctl in this process: nothing purged"
    rc = mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))   # 4096 = MALLCTL_ARENAS_ALL
    return "jemalloc arenas purged after the build" if rc == 0 else f"jemalloc purge failed (mallctl {rc})"


def decide_precision(asked: str) -> tuple[str, str]:
    from iit_fast.precision import resolve
    return resolve(asked)


# ---- one row, in its own process ---------------------------------------------------------------------------

def build(shape: str, seq: int, batch: int, precision: str, seed: int = 0):
    """(teacher, student, batch, shared_vocab): IntervenableLMs, the teacher frozen in its dtype, built directly
    in it (no fp32 copy first), the student from its layers in fp32."""
    from transformers import AutoModelForCausalLM
    from iit_fast.models import IntervenableLM
    from iit_fast.models.student import init_student_from_teacher
    factory, student_layers, shared = SHAPES[shape]
    config = factory()
    if seq > config.max_position_embeddings:
        raise ValueError(f"--seqs {seq} is more than {shape}'s positions ({config.max_position_embeddings})")
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    teacher = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    student = init_student_from_teacher(teacher, student_layers).float().train()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shared or config.vocab_size, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return IntervenableLM(teacher), IntervenableLM(student), data, shared


def worker(shape, seq, batch, mode, ckpt, adamw, precision, warmup, repeats, resident_mb=None,
           profile=False) -> dict:
    from iit_fast.config import DistillConfig
    from iit_fast.flops import counted_flops
    from iit_fast.optim import make_optimizer, param_groups
    from iit_fast.sampling import make_alignment, sample_plan
    from iit_fast.step import distill_step, step_index
    rss_runtime = current_rss_bytes()
    teacher, student, data, shared = build(shape, seq, batch, precision)
    if ckpt:
        student.enable_activation_checkpointing("torch")
    dt = "bfloat16" if precision == "bf16" else "float32"
    cfg = DistillConfig(mode=mode, teacher_dtype=dt, student_autocast=dt, shared_vocab=shared,
                        head_resident_grad_mb=resident_mb)
    align = make_alignment("middle", teacher.num_layers, student.num_layers)
    plan = sample_plan(data["attention_mask"], align, torch.Generator().manual_seed(0))
    index = step_index(data, plan, cfg, "causal") if mode != "naive" else None
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(param_groups(student, 0.01), lr=1e-5) if adamw else None
    counted = counted_flops(teacher, student, data, plan, cfg)
    flops = counted["naive" if mode == "naive" else "fast"]
    build_peak = hwm_bytes()
    purged = purge_allocator()
    rss_models = current_rss_bytes()
    last = {}

    def step():
        for p in params:
            p.grad = None
        out = distill_step(teacher, student, data, plan, cfg, index=index)
        out.loss.backward()
        if opt is not None:
            opt.step()
        last["loss"] = float(out.loss.detach())

    reset_hwm()
    if profile:   # the warm-up steps, then one step under torch.profiler: self time per op (see profile_table)
        for _ in range(warmup):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
            t0 = time.perf_counter()
            step()
            t = time.perf_counter() - t0
        times = [t]
        ops = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6, "flops": e.flops}
               for e in prof.key_averages() if e.self_cpu_time_total > 0]
    else:
        t, times = median_time(step, repeats=repeats, warmup=warmup)
        ops = None
    return {"profile": ops, "seconds": t, "times": times, "step_peak_bytes": hwm_bytes(), "rss_runtime_bytes": rss_runtime,
            "rss_models_bytes": rss_models, "build_peak_bytes": build_peak, "counted_flops": flops,
            "head_recompute_flops": counted["head_recompute"] if mode != "naive" else 0,
            "loss": last["loss"], "site_t": plan.teacher_layers[0], "site_s": plan.student_layer,
            "base_start": plan.base_start.tolist(), "threads": torch.get_num_threads(), "purged": purged}


def run_isolated(spec: list) -> dict:
    env = worker_env("cpu" if not torch.cuda.is_available() else "cuda")
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {spec} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["ops_path"] = sorted({l.split(":", 2)[-1].strip() for l in res.stderr.splitlines()
                              if " path (" in l or "impl=" in l})
    return out


# ---- the run ---------------------------------------------------------------------------------------------------

def checkpointing_available() -> tuple[bool, str]:
    from iit_fast.models import IntervenableLM
    if hasattr(IntervenableLM, "enable_activation_checkpointing"):
        return True, "IntervenableLM.enable_activation_checkpointing"
    return False, "checkpointing rows skipped: IntervenableLM has no enable_activation_checkpointing (not landed)"


def planned_peak(shape, seq, batch, mode, ckpt, adamw, precision, q0="worst", resident_mb=None) -> int | None:
    """The planner's estimate of the row's step peak (bytes, models included), or None without a planner."""
    try:
        from iit_fast.plan import PlanInput, plan
    except ImportError:
        return None
    factory, student_layers, shared = SHAPES[shape]
    p = plan(PlanInput(teacher=factory(), student_layers=student_layers, seq=seq, micro_batch=batch, mode=mode,
                       precision="bf16-autocast" if precision == "bf16" else "fp32", activation_checkpointing=ckpt, optimizer=adamw, shared_vocab=shared,
                       device="cpu", q0=q0,
                       head_resident_grad_bytes=None if resident_mb is None else resident_mb * 2**20))
    return p.total


def row_key(r: dict) -> tuple:
    return (r["shape"], r["seq"], r["batch"], r["mode"], r["checkpointing"], r["adamw"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny", help=f"comma list of {list(SHAPES)} or a group {list(GROUPS)}")
    ap.add_argument("--seqs", default=None, help="comma list of sequence lengths (default 1024,2048; tiny: 128)")
    ap.add_argument("--batch", type=int, default=2, help="micro-batch")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    ap.add_argument("--adamw", action="store_true", help="add the AdamW step and its state")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--headroom-gb", type=float, default=3.0, help="free memory kept beyond a row's estimate")
    ap.add_argument("--min-free-gb", type=float, default=0.0,
                    help="a row runs only with this much memory available (beside the planner's check)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs in the results file")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--validate", action="store_true", help="write planner-validation.{json,md} from the measured "
                    "rows (and the planner's GPU predictions), run nothing")
    ap.add_argument("--head-resident-grad-mb", type=int, default=None,
                    help="train.py's --head_resident_grad_mb (default: the op's 256 MB); rows with another value "
                         "belong in a results file of their own (--name)")
    ap.add_argument("--profile", action="store_true",
                    help="one step per mode under torch.profiler after --warmup steps: self time by op category, "
                         "fast against naive scaled by the FLOP model; writes <name> (default "
                         "llm-shapes-profile-<device>), not the timed rows")
    ap.add_argument("--malloc-conf", default=None,
                    help="jemalloc's MALLOC_CONF for the workers (default benchmarks/step.py's, which keeps every "
                         "freed page: fast, but the RSS peak then holds the allocator's retained pages too); e.g. "
                         "oversize_threshold:0,dirty_decay_ms:0,muzzy_decay_ms:0 to measure the tensors' peak")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.malloc_conf:
        os.environ["MALLOC_CONF"] = args.malloc_conf     # worker_env keeps a MALLOC_CONF already set
    if args.validate:
        validate()
        return
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
    if args.worker:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s:%(message)s")
        print("RESULT " + json.dumps(worker(*json.loads(args.worker))), flush=True)
        return
    shapes = [s for g in args.shapes.split(",") for s in GROUPS.get(g, g).split(",")]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"--shapes: {bad} not among {list(SHAPES)} or {list(GROUPS)}")
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: expected a comma list of {MODES}, got {args.modes!r}")
    ckpts = args.checkpointing.split(",")
    if any(c not in ("off", "on") for c in ckpts):
        ap.error(f"--checkpointing: expected off, on or off,on, got {args.checkpointing!r}")
    seqs = [int(s) for s in (args.seqs or ("128" if all(s.startswith("tiny") for s in shapes) else "1024,2048"))
            .split(",")]
    precision, why = decide_precision(args.precision)
    print(f"precision: {precision} ({why})", flush=True)
    if args.profile:
        profile_main(args, shapes, seqs, modes, ckpts, precision)
        return
    ck_ok, ck_why = checkpointing_available()
    print(f"checkpointing: {ck_why}", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak_dtype = "bf16" if precision == "bf16" else "fp32"
    name = args.name or f"llm-shapes-{device}"
    old = {} if args.fresh else json.loads((RESULTS / f"{name}.json").read_text()) \
        if (RESULTS / f"{name}.json").is_file() else {}
    rows = {row_key(r): r for r in old.get("rows", [])}
    peaks = old.get("matmul_peak_gflops", [])
    peaks.append(matmul_peak(peak_dtype, device, args.peak_repeats)["gflops"])
    load = [os.getloadavg()]

    for shape in shapes:
        for seq in seqs:
            for ck in ckpts:
                for mode in modes:
                    r = {"shape": shape, "seq": seq, "batch": args.batch, "mode": mode, "checkpointing": ck,
                         "adamw": args.adamw, "precision": precision}
                    if ck == "on" and not ck_ok:
                        print(f"skip {r}: {ck_why}", flush=True)
                        continue
                    est = planned_peak(shape, seq, args.batch, mode, ck == "on", args.adamw, precision,
                                       resident_mb=args.head_resident_grad_mb)
                    import psutil
                    avail = psutil.virtual_memory().available
                    r["planned_peak_GiB"] = None if est is None else est / 2**30
                    need = max(args.min_free_gb * 2**30, 0 if est is None else est + args.headroom_gb * 2**30)
                    if avail < need:
                        r["skipped"] = (f"needs {need / 2**30:.1f} GiB available (the planner's estimate "
                                        f"{'-' if est is None else f'{est / 2**30:.1f}'} GiB + {args.headroom_gb:.0f} "
                                        f"GiB headroom, or --min-free-gb), {avail / 2**30:.1f} GiB were")
                        print(f"skip {shape} {seq} b{args.batch} {mode} ckpt {ck}: {r['skipped']}", flush=True)
                        rows.setdefault(row_key(r), r)
                        continue
                    t0 = time.time()
                    try:
                        res = run_isolated([shape, seq, args.batch, mode, ck == "on", args.adamw, precision,
                                            args.warmup, args.repeats, args.head_resident_grad_mb])
                    except RuntimeError as e:
                        r["skipped"] = f"failed: {str(e).splitlines()[0][:200]}" + (
                            " (killed: the machine ran out of memory)" if "exit -9" in str(e) else "")
                        print(f"FAILED {r}: {e}", flush=True)
                        rows[row_key(r)] = r
                        continue
                    tokens = seq * args.batch
                    r.update({"ms/step": 1e3 * res["seconds"], "tokens/s": tokens / res["seconds"],
                              "GFLOP/step": res["counted_flops"] / 1e9,
                              "step peak GiB": res["step_peak_bytes"] / 2**30,
                              "runtime GiB": res["rss_runtime_bytes"] / 2**30,
                              "models GiB": (res["rss_models_bytes"] - res["rss_runtime_bytes"]) / 2**30,
                              "warmup": args.warmup, "repeats": args.repeats, "wall s": time.time() - t0,
                              "raw": res})
                    rows[row_key(r)] = r
                    print(f"{shape} seq {seq} b{args.batch} {mode:8s} ckpt {ck:3s} adamw {args.adamw}: "
                          f"{r['ms/step']:.0f} ms/step, step peak {r['step peak GiB']:.2f} GiB "
                          f"(planner {r['planned_peak_GiB'] or float('nan'):.2f} + runtime {r['runtime GiB']:.2f})",
                          flush=True)
                    if not args.no_write:
                        write(name, rows, peaks, load, peak_dtype, args)
    peaks.append(matmul_peak(peak_dtype, device, args.peak_repeats)["gflops"])
    load.append(os.getloadavg())
    if not args.no_write:
        write(name, rows, peaks, load, peak_dtype, args)


def recompute_flops(raw: dict) -> int | None:
    """The head loss's recompute FLOPs a worker's step executed (flops.py's head_recompute): 0 when its path held
    the gradients, None for a record made before that figure was kept."""
    if not any("recompute-in-backward" in p for p in raw.get("ops_path", [])):
        return 0
    return raw.get("head_recompute_flops")


def worker_machine(load) -> dict:
    """benchmarks.common.machine(), with AMX, the workers' allocator and the load averages."""
    m = machine()
    m["amx"] = "amx_bf16" in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else "")
    m["allocator"] = ("jemalloc (LD_PRELOAD) in every worker, MALLOC_CONF="
                      + os.environ.get("MALLOC_CONF", "benchmarks/step.py's (freed pages kept)"))
    m["load_average_1_5_15"] = load
    return m


def summarise(rows: list[dict], peak: float) -> list[dict]:
    """MFU per row; per (shape, seq, batch, checkpointing, adamw): fast/naive time vs the FLOP model, and
    fast/naive step peak."""
    for r in rows:
        if "ms/step" in r:
            r["MFU"] = r["GFLOP/step"] / (r["ms/step"] / 1e3) / peak
    out = []
    groups = {}
    for r in rows:
        if "ms/step" in r:
            groups.setdefault((r["shape"], r["seq"], r["batch"], r["checkpointing"], r["adamw"]), {})[r["mode"]] = r
    for k, g in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if "fast" in g and "naive" in g:
            speed = g["naive"]["ms/step"] / g["fast"]["ms/step"]
            model = g["naive"]["GFLOP/step"] / g["fast"]["GFLOP/step"]
            # the FLOPs the fast step executes: + the head loss's recompute when its path recomputed (flops.py)
            extra = recompute_flops(g["fast"].get("raw", {}))
            executed = None if extra is None else g["naive"]["GFLOP/step"] / (g["fast"]["GFLOP/step"] + extra / 1e9)
            out.append({"shape": k[0], "seq": k[1], "batch": k[2], "checkpointing": k[3], "adamw": k[4],
                        "fast/naive speedup": speed, "FLOP model": model, "speedup / model": speed / model,
                        "model, head recompute counted": executed,
                        "speedup / that": None if executed is None else speed / executed,
                        "fast/naive step peak": g["fast"]["step peak GiB"] / g["naive"]["step peak GiB"]})
    return out


def write(name, rows: dict, peaks, load, peak_dtype, args):
    rows = sorted(rows.values(), key=lambda r: (r["shape"], r["seq"], r["batch"], r["adamw"], r["checkpointing"],
                                                MODES.index(r["mode"])))
    peak = max(peaks)
    for r in rows:   # the current planner's figure (the memory check at run time may have used an older one)
        est = planned_peak(r["shape"], r["seq"], r["batch"], r["mode"], r["checkpointing"] == "on", r["adamw"],
                           r["precision"], r.get("raw", {}).get("base_start", "worst"),
                           resident_mb=args.head_resident_grad_mb)
        r["planned_peak_GiB"] = None if est is None else est / 2**30
    summary = summarise(rows, peak)
    m = worker_machine(load)
    m["shared"] = "yes: ~7 agents shared these cores and memory; times are contended, compare within one run"
    cols = ["shape", "seq", "batch", "mode", "checkpointing", "adamw", "ms/step", "tokens/s", "GFLOP/step", "MFU",
            "step peak GiB", "models GiB", "runtime GiB", "planned_peak_GiB", "skipped"]
    from benchmarks.common import markdown_table
    notes = ("## fast / naive against the FLOP model (flops.counted_flops), and peak memory\n\n"
             + markdown_table(summary) +
             "\n'FLOP model' = counted_flops naive / fast, the method's FLOPs. 'model, head recompute counted' adds "
             "to the fast step what its head loss executes beyond that when it recomputes the logits in the "
             "backward (flops.py's head_recompute: a decoder over the resident budget, as Llama's 128256 x 2048), "
             "the memory-for-FLOPs trade of ops/head_loss; '-' where the row's record predates that figure. "
             "`--profile` (llm-shapes-profile-cpu.md) splits a step's time by op.\n" +
             f"\nMatmul peak ({peak_dtype}, benchmarks/peak.py, best of {args.peak_repeats} per GEMM shape, "
             f"measured at the start and end of every invocation): {', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s; "
             f"MFU uses the largest, {peak:.0f} (measured under the same load as the rows: on a shared machine both are depressed, so MFU is loose). Each row: `warmup` step(s), then the median of `repeats` timed "
             "step(s) (1 each at LLM shapes: a step takes minutes on 2 shared cores). step peak = the RSS "
             "high-water mark over the row's steps (models included, the interpreter too); models = RSS after "
             "building the models minus runtime (RSS before any model). planned_peak = iit_fast/plan.py's "
             "prediction of models + step (runtime excluded; the worst-case suffix for a row not run, its plan's span starts for a row run). Skipped rows name why (memory check or failure).\n\n"
             "Shapes: llama-3.2-1b = 16 x 2048, 32/8 heads, SwiGLU 8192, vocab 128256, tied, rope theta 5e5 -> 4 "
             "blocks; qwen2.5-0.5b = 24 x 896, 14/2 heads, 4864, vocab 151936 (losses over 151665 ids), tied -> 6 "
             "blocks; llama-style = benchmarks/step.py's (8 x 1024, 16/4 heads, 2816, vocab 32000 -> 4). Random "
             "weights; causal rows packed (no padding); plan: alignment middle, seed 0.\n"
             f"Reproduce: `python benchmarks/llm_shapes.py --shapes <shape> --seqs <seq> --batch <b> "
             f"[--modes ...] [--checkpointing off,on] [--adamw]` (rows merge into the results file).\n")
    payload = {"machine": m, "matmul_peak_gflops": peaks, "peak_dtype": peak_dtype, "summary": summary}
    write_results(name, payload, rows, cols, title=f"Distillation step at LLM shapes ({m['device']})", notes=notes)



# ---- where the time goes: fast against naive, op by op ---------------------------------------------------------

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot",
            "aten::addbmm"}
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::index", "aten::index_select",
            "aten::index_put_", "aten::_index_put_impl_", "aten::scatter_", "aten::scatter_add_", "aten::gather",
            "aten::index_add_", "aten::masked_fill_", "aten::where", "aten::stack", "aten::embedding_dense_backward",
            "aten::embedding"}
ALLOC_OPS = {"aten::empty", "aten::empty_strided", "aten::zeros", "aten::zero_", "aten::fill_", "aten::empty_like",
             "aten::zeros_like", "aten::full", "aten::ones_like", "aten::new_zeros", "aten::new_empty_strided"}


def op_category(op: str) -> str:
    if op in GEMM_OPS:
        return "GEMM"
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention (SDPA)"
    if op in COPY_OPS:
        return "copies, casts, gathers"
    if op in ALLOC_OPS:
        return "allocation, fill"
    if op.startswith("aten::"):
        return "other aten (elementwise, norms, reductions)"
    return "non-aten (custom ops, autograd engine, Python)"


def profile_main(args, shapes, seqs, modes, ckpts, precision):
    """One profiled step per (shape, seq, checkpointing, mode); the report names, per op category, the fast step's
    self time against the naive step's scaled by the FLOP model (counted_flops fast / naive): the excess of each
    category is where the fast step falls short of the model."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = args.name or f"llm-shapes-profile-{device}"
    runs, load = [], [os.getloadavg()]
    for shape in shapes:
        for seq in seqs:
            for ck in ckpts:
                got = {}
                for mode in modes:
                    res = run_isolated([shape, seq, args.batch, mode, ck == "on", args.adamw, precision,
                                        args.warmup, 1, args.head_resident_grad_mb, True])
                    got[mode] = res
                    print(f"{shape} {seq} b{args.batch} ckpt {ck} {mode}: {res['seconds']:.1f} s profiled", flush=True)
                runs.append({"shape": shape, "seq": seq, "batch": args.batch, "checkpointing": ck, "modes": got})
    load.append(os.getloadavg())
    m = worker_machine(load)
    rows, notes = [], ""
    for run in runs:
        g = run["modes"]
        if "fast" not in g or "naive" not in g:
            continue
        ratio = g["fast"]["counted_flops"] / g["naive"]["counted_flops"]
        cat = {mode: {} for mode in g}
        for mode, res in g.items():
            for o in res["profile"]:
                c = cat[mode].setdefault(op_category(o["op"]), {"s": 0.0, "flops": 0})
                c["s"] += o["self_s"]
                c["flops"] += o["flops"] or 0
        label = f"{run['shape']} {run['seq']} x {run['batch']}, checkpointing {run['checkpointing']}"
        for c in sorted(set(cat["fast"]) | set(cat["naive"]), key=lambda c: -cat["fast"].get(c, {"s": 0})["s"]):
            f, n = cat["fast"].get(c, {"s": 0.0, "flops": 0}), cat["naive"].get(c, {"s": 0.0, "flops": 0})
            rows.append({"row": label, "category": c, "naive s": n["s"], "fast s": f["s"],
                         "fast s if on the model": n["s"] * ratio, "excess s": f["s"] - n["s"] * ratio,
                         "naive GFLOP/s": n["flops"] / n["s"] / 1e9 if n["flops"] and n["s"] else None,
                         "fast GFLOP/s": f["flops"] / f["s"] / 1e9 if f["flops"] and f["s"] else None})
        tf, tn = g["fast"]["seconds"], g["naive"]["seconds"]
        gemm = {mode: sum(o["flops"] or 0 for o in g[mode]["profile"] if o["op"] in GEMM_OPS) for mode in g}
        rec = recompute_flops(g["fast"]) or 0
        notes += (f"\n{label}: GEMM TFLOP counted by the profiler (in-place addmm_ not counted): naive "
                  f"{gemm['naive'] / 1e12:.2f} against the model's {g['naive']['counted_flops'] / 1e12:.2f} "
                  f"(the rest is attention); fast {gemm['fast'] / 1e12:.2f} against the model's "
                  f"{g['fast']['counted_flops'] / 1e12:.2f}"
                  + (f" + the head loss's recompute {rec / 1e12:.2f}" if rec else "") + ".\n")
        notes += (f"\n{label}: step (profiled) naive {tn:.1f} s, fast {tf:.1f} s; the FLOP model's fast/naive "
                  f"{ratio:.3f} puts fast at {tn * ratio:.1f} s: {tf - tn * ratio:+.1f} s off the model "
                  f"(speedup / model {tn / tf * ratio:.2f}).\n\nTop ops by the fast step's excess over the model "
                  "(self s):\n\n")
        by = {mode: {o["op"]: o for o in g[mode]["profile"]} for mode in ("fast", "naive")}
        ops = sorted(set(by["fast"]) | set(by["naive"]), key=lambda op: -(by["fast"].get(op, {}).get("self_s", 0)
                     - by["naive"].get(op, {}).get("self_s", 0) * ratio))
        from benchmarks.common import markdown_table
        notes += markdown_table([{"op": op, "naive calls": by["naive"].get(op, {}).get("calls", 0),
                                  "fast calls": by["fast"].get(op, {}).get("calls", 0),
                                  "naive s": by["naive"].get(op, {}).get("self_s", 0.0),
                                  "fast s": by["fast"].get(op, {}).get("self_s", 0.0),
                                  "excess s": by["fast"].get(op, {}).get("self_s", 0.0)
                                  - by["naive"].get(op, {}).get("self_s", 0.0) * ratio} for op in ops[:15]])
    notes += ("\nOne step per mode under torch.profiler (CPU activities, with FLOPs), after "
              f"{args.warmup} warm-up step(s), each mode in a fresh process; self time per op summed by category. "
              "'fast s if on the model' = naive s x the FLOP model's fast/naive; 'excess' = fast s minus that: "
              "a positive excess is time the fast step spends beyond what its FLOP count predicts. "
              "GFLOP/s from the profiler's FLOP counts (GEMMs only).\n"
              f"Reproduce: `python benchmarks/llm_shapes.py --profile --shapes <shape> --seqs <seq> --batch <b> "
              "--modes naive,fast --checkpointing off`.\n")
    payload = {"machine": m, "runs": [{k: v for k, v in r.items()} for r in runs]}
    cols = ["row", "category", "naive s", "fast s", "fast s if on the model", "excess s", "naive GFLOP/s",
            "fast GFLOP/s"]
    write_results(name, payload, rows, cols, title=f"Where the step's time goes at LLM shapes ({m['device']})",
                  notes=notes)
    print(f"wrote benchmarks/results/{name}.md", flush=True)


# ---- the planner's validation (iit_fast/plan.py against the measured rows) -------------------------------------

GPU_CASES = {
    # name -> (teacher config factory, student config factory)
    "Llama-3.1-8B -> Llama-3.2-1B-size": (
        lambda: llama_32_1b(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
        llama_32_1b),
    "Llama-3.1-70B -> Llama-3.1-8B-size": (
        lambda: llama_32_1b(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
        lambda: llama_32_1b(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)),
}


def gpu_predictions(seq: int = 4096, world: int = 8) -> list[dict]:
    """The planner's largest micro-batch per rank on 8 x 80 GB and 8 x 141 GB, per flag combination (bf16 =
    DeepSpeed's bf16 mode, 90% of the device memory for tensors)."""
    from iit_fast.plan import PlanInput, max_micro_batch, plan
    out = []
    for case, (tf, sf) in GPU_CASES.items():
        for teacher_plan in ("replicated", "zero3", "zero3-offload"):
            for zero in (2, 3):
                for ck in (False, True):
                    inp = PlanInput(teacher=tf(), student=sf(), seq=seq, micro_batch=1, mode="fast", precision="bf16",
                                    zero_stage=zero, teacher_plan=teacher_plan, world_size=world,
                                    activation_checkpointing=ck, device="cuda")
                    one = plan(inp)
                    row = {"case": case, "teacher plan": teacher_plan, "ZeRO": zero, "checkpointing": "on" if ck else "off",
                           "GiB at micro-batch 1": one.total / 2**30}
                    for gb in (80, 141):
                        row[f"max micro-batch {gb} GB"] = max_micro_batch(inp, gb * 1e9 * 0.9)[0]
                    out.append(row)
    return out


def validate(names=("llm-shapes-cpu", "llm-shapes-validation-cpu"), tolerance: float = 0.15):
    """planner-validation.{json,md}: every measured row beside the planner's prediction (the row's own plan:
    its span starts, AdamW or not, checkpointing), the measured figure being the step peak minus the runtime."""
    from iit_fast.plan import PlanInput, plan
    rows = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text())["rows"]:
            if "raw" not in r:
                continue
            factory, student_layers, shared = SHAPES[r["shape"]]
            p = plan(PlanInput(teacher=factory(), student_layers=student_layers, seq=r["seq"], micro_batch=r["batch"],
                               mode=r["mode"], precision="bf16-autocast" if r["precision"] == "bf16" else "fp32",
                               activation_checkpointing=r["checkpointing"] == "on", optimizer=r["adamw"],
                               shared_vocab=shared, device="cpu", q0=r["raw"]["base_start"]))
            measured = (r["raw"]["step_peak_bytes"] - r["raw"]["rss_runtime_bytes"]) / 2**30
            # the step alone: above the RSS after building (which holds what the build freed and jemalloc kept)
            weights = sum(v for k, v in p.parts.items() if k.endswith("weights")) / 2**30
            step_meas = (r["raw"]["step_peak_bytes"] - r["raw"]["rss_models_bytes"]) / 2**30
            models_meas = (r["raw"]["rss_models_bytes"] - r["raw"]["rss_runtime_bytes"]) / 2**30
            rows.append({"shape": r["shape"], "seq": r["seq"], "batch": r["batch"], "mode": r["mode"],
                         "checkpointing": r["checkpointing"], "adamw": r["adamw"], "measured GiB": measured,
                         "planner GiB": p.total / 2**30, "planner / measured": p.total / 2**30 / measured,
                         "within 15%": abs(p.total / 2**30 / measured - 1) <= tolerance,
                         "models RSS GiB": models_meas, "planner weights GiB": weights,
                         "step above models GiB": step_meas, "planner step GiB": p.total / 2**30 - weights,
                         "step: planner / measured": (p.total / 2**30 - weights) / step_meas,
                         "purged": "purged" in r["raw"], "source": name,
                         "planner parts GiB": {k: round(v / 2**30, 3) for k, v in p.parts.items()}})
    gpu = gpu_predictions()
    from benchmarks.common import markdown_table
    n_ok = sum(r["within 15%"] for r in rows)
    n_purged = sum(r["purged"] for r in rows)
    notes = (f"{n_ok} of {len(rows)} rows within {tolerance:.0%}.\n\n"
             "measured = the row's step peak RSS (benchmarks/results/llm-shapes-cpu.md and "
             "llm-shapes-validation-cpu.md: models + step, each row in a fresh process, jemalloc) minus the RSS of "
             "the interpreter and libraries before any model (the planner models tensors, not the process). "
             "planner = `iit_fast.plan.plan` for the row's shape, mode, checkpointing, AdamW state and its plan's "
             "span starts (q0), precision bf16-autocast (teacher bf16, student fp32 weights under bf16 autocast). "
             "benchmarks/results/step-decoders-cpu.json is not used: its peaks include the runtime, which it did not "
             "record, and a teacher built in fp32 before its cast; the llama-style rows re-measure that shape. "
             "The second comparison isolates the step: measured = step peak minus the RSS after building the "
             "models, planner = its peak minus the weights. Where the two disagree the build left freed memory in "
             "the process (jemalloc keeps it: the student's copy of the teacher's layers, initialisation "
             "temporaries): 'models RSS' above 'planner weights'; a step may or may not reuse it. The worker purges jemalloc after the build since commit c40923a: "
             f"{n_purged} of {len(rows)} rows here have that (column 'purged').\n\n"
             "## What the planner predicts on GPUs (seq 4096, 8 ranks, fast step, DeepSpeed bf16, AdamW)\n\n"
             + markdown_table(gpu) +
             "\nmax micro-batch: per rank, within 90% of the device memory, the counterfactual's worst case (every "
             "suffix from position 0); 0 = micro-batch 1 does not fit. 'Llama-3.2-1B-size' / 'Llama-3.1-8B-size' "
             "students are those models' configs (their own widths: w_cos = w_iit_cos = 0 and a site projection for "
             "mse, since the widths differ). Reproduce: `python benchmarks/llm_shapes.py --validate`; one case: "
             "`iit-fast plan --teacher <config.json> --student <config.json> --seq 4096 --precision bf16 "
             "--zero_stage 2 --teacher_plan zero3 --world_size 8 --activation_checkpointing --device_memory_gb 80`.\n")
    cols = ["shape", "seq", "batch", "mode", "checkpointing", "adamw", "measured GiB", "planner GiB",
            "planner / measured", "within 15%", "models RSS GiB", "planner weights GiB", "step above models GiB",
            "planner step GiB", "step: planner / measured", "purged"]
    m = machine()
    m["allocator"] = "jemalloc (LD_PRELOAD) in every measured worker, as benchmarks/step.py sets it"
    m["shared"] = "yes: ~7 agents shared these cores and memory"
    write_results("planner-validation", {"machine": m, "tolerance": tolerance, "gpu_predictions": gpu}, rows, cols,
                  title="The planner (iit-fast plan) against measured step peaks", notes=notes)
    for r in rows:
        print(f"{r['shape']:13s} {r['seq']:5d} b{r['batch']} {r['mode']:8s} ckpt {r['checkpointing']:3s} "
              f"measured {r['measured GiB']:6.2f} planner {r['planner GiB']:6.2f} ratio {r['planner / measured']:.2f}")
    print(markdown_table(gpu))

if __name__ == "__main__":
    main()
