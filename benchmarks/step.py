"""Step throughput: naive vs fast vs standard causal distillation, fp32 and bf16, in one run, on the same batch.

    python benchmarks/step.py                          # both shapes, both logit settings, fp32 + bf16, writes results
    python benchmarks/step.py --shapes small --repeats 1 --no-write   # CI smoke run
    python benchmarks/step.py --shapes bert-base --precisions bf16 --logit-tokens all --name step-cuda-bf16
    python benchmarks/step.py --profile bert-base --precisions bf16   # where a step's time goes (torch.profiler)
    python benchmarks/step.py --shapes bert-base,gpt2-small --precisions fp32,bf16w --compile off,linear,blocks
    python benchmarks/step.py --profile bert-base --precisions bf16w --compile off,linear,blocks --name NAME

Each (shape, logit_tokens, precision, mode) runs in its own subprocess, so that peak memory (RSS on CPU, CUDA
max allocated on GPU) belongs to that step alone; all of them see the same seeded models, batch and plan.
Precisions: `fp32`; `bf16` = the teacher in bf16 (`DistillConfig(teacher_dtype="bfloat16")`) and the student
under bf16 autocast (`student_autocast="bfloat16"`) with fp32 weights, as train.py runs it; `bf16w` = the
student's weights themselves in bf16 (DeepSpeed's bf16 mode: its fp32 master copies live in the optimizer,
which this step does not time), so no per-call weight casts.
`--compile` (iit_fast/compile.py): off | linear (every block linear's bias added in oneDNN's GEMM epilogue) |
blocks (that, plus torch.compile of every block); a comma list runs each, in the same run, and reports each
one's time against `off` (`x off`) and its first step (the warm-up: compilation included).
Reported: median step time over `--repeats` after a warm-up step, tokens/s, GFLOP/s of the FLOP model of
docs/method.md section 2 and its fraction of this machine's matmul peak in the step's compute dtype (MFU: fp32
peak for fp32, bf16 peak for bf16 / bf16w), measured by benchmarks/peak.py in the same run (before and after
the steps; the larger is the peak); the ratios fast/naive and fast/standard beside the model's, and each
bf16 mode's speedup over the same fp32 mode.
Results: benchmarks/results/<name>.json and .md (default name step-<device>).
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
from benchmarks.common import machine, markdown_table, median_time, peak_rss_bytes, write_results  # noqa: E402
from benchmarks.peak import matmul_peak  # noqa: E402
from iit_fast.compile import COMPILE_MODES  # noqa: E402


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
    family: str = "bert"          # bert (masked LM) | gpt2 | llama (causal LMs)
    kv_heads: int | None = None   # llama: grouped-query attention
    intermediate: int | None = None

    @property
    def causal(self) -> bool:
        return self.family != "bert"


SHAPES = {
    # BERT-base teacher (random weights are fine for speed) into a 6-layer student
    "bert-base": Shape("bert-base", 12, 6, 768, 12, 30522, 128, 8),
    # small enough for CI to run in seconds
    "small": Shape("small", 6, 3, 256, 4, 8000, 64, 16),
    # decoders: GPT-2 small -> 6 layers (DistilGPT2's shape); a Llama-style model (GQA 16/4 heads, SwiGLU,
    # RoPE, RMSNorm, vocab 32000) -> half its layers
    "gpt2-small": Shape("gpt2-small", 12, 6, 768, 12, 50257, 256, 8, family="gpt2"),
    "llama-style": Shape("llama-style", 8, 4, 1024, 16, 32000, 256, 4, family="llama", kv_heads=4,
                         intermediate=2816),
    # tiny decoder shapes for the CI smoke run and tests
    "small-gpt2": Shape("small-gpt2", 4, 2, 128, 4, 4000, 64, 8, family="gpt2"),
    "small-llama": Shape("small-llama", 4, 2, 128, 4, 4000, 64, 8, family="llama", kv_heads=2, intermediate=352),
}
# where the KL terms are taken, per kind: masked LMs all | masked; causal LMs all | affected (config.py)
LOGIT_TOKENS = {"masked": ("all", "masked"), "causal": ("all", "affected")}
MODES = ("naive", "fast", "standard")
# precision -> (teacher dtype, student autocast, student weight dtype, dtype of the matmul peak it is held to)
PRECISIONS = {
    "fp32": ("float32", "float32", torch.float32, "fp32"),
    "bf16": ("bfloat16", "bfloat16", torch.float32, "bf16"),
    "bf16w": ("bfloat16", "float32", torch.bfloat16, "bf16"),
}
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


# ---- the FLOP model (docs/method.md section 2) ----------------------------------------------------------

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

def _teacher_model(shape: Shape):
    """A randomly initialised HF model of the shape's family (random weights are fine for speed)."""
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)
    if shape.family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=shape.vocab, n_embd=shape.hidden, n_layer=shape.teacher_layers,
                                          n_head=shape.heads, n_positions=max(1024, shape.seq), resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0))
    if shape.family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                                            intermediate_size=shape.intermediate,
                                            num_hidden_layers=shape.teacher_layers,
                                            num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                            max_position_embeddings=max(2048, shape.seq)))
    return BertForMaskedLM(BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                                      num_hidden_layers=shape.teacher_layers, num_attention_heads=shape.heads,
                                      intermediate_size=4 * shape.hidden, max_position_embeddings=max(512, shape.seq),
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def build(shape: Shape, seed: int = 0, attn: str | None = None):
    from iit_fast.models import IntervenableLM
    from iit_fast.models.student import init_student_from_teacher
    torch.manual_seed(seed)
    teacher = _teacher_model(shape)
    if attn is not None:
        teacher.config._attn_implementation = attn  # "sdpa" | "eager"; the student copies the teacher's config
    teacher = teacher.eval()
    student = init_student_from_teacher(teacher, shape.student_layers)
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if shape.vocab > 2000 else 5, shape.vocab, (shape.batch, shape.seq), generator=g)
    am = torch.ones_like(ids)
    if shape.causal:  # packed causal-LM rows: the labels are the ids (the loss shifts them)
        return IntervenableLM(teacher), IntervenableLM(student).train(), {"input_ids": ids, "attention_mask": am,
                                                                          "labels": ids.clone()}
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    labels[chosen] = ids[chosen]
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels, "token_type_ids": torch.zeros_like(ids)}
    return IntervenableLM(teacher), IntervenableLM(student).train(), batch


def make_step(shape: Shape, mode: str, logit_tokens: str, ops: str, precision: str, device: str,
              attn: str | None = None, compile_mode: str = "off"):
    """(step: () -> StepOutput, batch, plan): one training step's forward + backward, grads reset first;
    the blocks prepared by `iit_fast.compile.prepare_blocks(compile_mode)`."""
    import logging
    from iit_fast.compile import prepare_blocks
    from iit_fast.config import DistillConfig
    from iit_fast.sampling import make_alignment, sample_plan
    from iit_fast.flops import counted_flops
    from iit_fast.step import distill_step
    teacher_dtype, autocast, student_weights, _ = PRECISIONS[precision]
    teacher, student, batch = build(shape, attn=attn)
    teacher.to(device=device, dtype=getattr(torch, teacher_dtype))
    student.to(device=device, dtype=student_weights)
    for lm in (teacher, student):
        logging.getLogger("iit_fast.compile").info(prepare_blocks(lm, compile_mode))
    batch = {k: v.to(device) for k, v in batch.items()}
    align = make_alignment("middle", shape.teacher_layers, shape.student_layers)
    plan = sample_plan(batch["attention_mask"], align, torch.Generator().manual_seed(0))
    cfg = DistillConfig(mode=mode, logit_tokens=logit_tokens, ops=ops, teacher_dtype=teacher_dtype,
                        student_autocast=autocast)
    params = list(student.parameters())
    make_step.flops = lambda: counted_flops(teacher, student, batch, plan, cfg)  # exact, for the worker

    def step():
        for p in params:
            p.grad = None
        out = distill_step(teacher, student, batch, plan, cfg)
        out.loss.backward()
        return out

    return step, batch, plan


def worker(shape: Shape, mode: str, logit_tokens: str, ops: str, precision: str, repeats: int,
           device: str, attn: str | None, compile_mode: str = "off") -> dict:
    import time
    step, batch, plan = make_step(shape, mode, logit_tokens, ops, precision, device, attn, compile_mode)
    last, cpu = {}, []

    def timed():
        c0 = time.process_time()
        last["out"] = step()   # the loss is read from the last timed step: no extra step per worker
        cpu.append(time.process_time() - c0)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    timed()                    # the warm-up step: kernel selection, and with --compile blocks the compilation
    first = time.perf_counter() - t0
    t, times = median_time(timed, repeats=repeats, warmup=0)
    cpu_s = sorted(cpu[1:])[len(cpu[1:]) // 2]  # CPU seconds of the process (all threads), median of the timed steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    kd_fraction = float((batch["labels"] != -100).float().mean()) if logit_tokens == "masked" else 1.0
    counted = make_step.flops()
    return {"seconds": t, "times": times, "cpu_seconds": cpu_s, "first_step_seconds": first, "peak_bytes": peak, "kd_fraction": kd_fraction,
            "counted_flops": counted["naive" if mode == "naive" else "fast"], "suffix_saved_flops": counted["saved"],
            "site_t": plan.teacher_layers[0], "site_s": plan.student_layer,
            "loss": float(last["out"].loss.detach()), "threads": torch.get_num_threads()}


def worker_env(device: str) -> dict:
    env = dict(os.environ)
    if device == "cpu" and os.path.exists(JEMALLOC) and "jemalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = (JEMALLOC + " " + env.get("LD_PRELOAD", "")).strip()
        # keep freed big blocks: without this jemalloc too re-faults every new >8 MiB tensor
        env.setdefault("MALLOC_CONF", "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1")
    return env


def run_isolated(shape_name, mode, logit_tokens, ops, precision, repeats, device, attn, compile_mode="off",
                 profile=False) -> dict:
    """One measurement (or with `profile` one profile_step report) in a fresh process, jemalloc preloaded."""
    env = worker_env(device)
    cmd = [sys.executable, __file__, "--worker",
           json.dumps([shape_name, mode, logit_tokens, ops, precision, repeats, device, attn, compile_mode, profile])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {shape_name}/{mode}/{logit_tokens}/{precision}/{compile_mode} failed:\n{res.stderr[-4000:]}")
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["allocator"] = (f"jemalloc (LD_PRELOAD, MALLOC_CONF={env.get('MALLOC_CONF')})"
                        if "jemalloc" in env.get("LD_PRELOAD", "") else "glibc malloc")
    # which implementation each op ran (the dispatchers log it once)
    out["ops_path"] = sorted({(l.split(":", 1) if "compile:" in l else l.split(":", 2))[-1].strip()
                              for l in res.stderr.splitlines() if " path (" in l or "impl=" in l or "compile:" in l})
    return out


# ---- where the time goes: torch.profiler over one step ------------------------------------------------

# the GEMM ops (compile.linear_bias runs mkldnn::_linear_pointwise: the GEMM with the bias in its epilogue)
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
         "mkldnn::_linear_pointwise")
CASTS = ("aten::_to_copy",)
_SHORT = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16", "double": "fp64", "long int": "i64",
          "bool": "bool", "int": "i32"}


def _phase(e) -> str:
    """backward if the op runs inside an autograd engine node (or is one), else forward."""
    p = e
    while p is not None:
        if p.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        p = p.cpu_parent
    return "forward"


def _dtypes(e) -> str:
    return ",".join(_SHORT.get(d, d) for d in e.input_dtypes if d) or "-"


def _under(e, names) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name in names:
            return True
        p = p.cpu_parent
    return False


def profile_step(shape_name: str, mode: str, logit_tokens: str, ops: str, precision: str, device: str,
                 attn: str | None, steps: int = 1, top: int = 30, compile_mode: str = "off") -> tuple[str, dict]:
    """(a markdown report, its summary) of `steps` profiled steps (after one warm-up): top ops by self time
    with their phase and input dtypes, GEMM time by dtype, cast time (aten::_to_copy, outermost) by phase and
    source dtype, and attention / norm / activation / softmax time by dtype. The summary: ms per step of all
    self time, of the GEMMs, of everything else (non-GEMM), and of the bias copies into addmm's output."""
    import time
    from torch.profiler import ProfilerActivity, profile
    shape = SHAPES[shape_name]
    step, _, _ = make_step(shape, mode, logit_tokens, ops, precision, device, attn, compile_mode)
    t0 = time.perf_counter()
    step()  # warm-up: oneDNN primitive creation, the native ops' first build, with --compile blocks compilation
    first = time.perf_counter() - t0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    total = sum(e.self_cpu_time_total for e in events)  # us, every op's self time once
    groups: dict[tuple, list] = {}
    for e in events:
        g = groups.setdefault((e.name, _phase(e), _dtypes(e)), [0, 0.0])
        g[0] += 1
        g[1] += e.self_cpu_time_total

    def share(us):
        return f"{100 * us / total:.1f}%"

    rows = [{"op": k[0], "phase": k[1], "input dtypes": k[2], "calls": v[0] // steps,
             "self ms/step": v[1] / 1e3 / steps, "share": share(v[1])}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]]

    def by(pred, key):
        acc: dict[tuple, list] = {}
        for e in events:
            if pred(e):
                a = acc.setdefault(key(e), [0, 0.0])
                a[0] += 1
                a[1] += e.cpu_time_total if e.name in CASTS else e.self_cpu_time_total
        return [{"kind": " ".join(k), "calls": v[0] // steps, "ms/step": v[1] / 1e3 / steps, "share": share(v[1])}
                for k, v in sorted(acc.items(), key=lambda kv: -kv[1][1])]

    gemm = by(lambda e: e.name in GEMMS, lambda e: (_phase(e), e.name, _dtypes(e).split(",")[0]))
    casts = by(lambda e: e.name in CASTS and not _under(e, CASTS),
               lambda e: (_phase(e), "from " + _dtypes(e).split(",")[0],
                          "weights (2-D)" if len(e.input_shapes[0]) <= 2 else "activations"))
    keywords = ("attention", "softmax", "layer_norm", "gelu", "bmm", "baddbmm")
    other = by(lambda e: any(k in e.name for k in keywords) and e.name not in GEMMS[:2],
               lambda e: (_phase(e), e.name, _dtypes(e).split(",")[0]))
    gemm_us = sum(e.self_cpu_time_total for e in events if e.name in GEMMS)
    bias_copy_us = sum(e.self_cpu_time_total for e in events
                       if e.name == "aten::copy_" and e.cpu_parent is not None and e.cpu_parent.name == "aten::addmm")
    summary = {"shape": shape_name, "precision": precision, "compile": compile_mode,
               "self ms/step": total / 1e3 / steps, "GEMM ms/step": gemm_us / 1e3 / steps,
               "non-GEMM ms/step": (total - gemm_us) / 1e3 / steps, "non-GEMM share": (total - gemm_us) / total,
               "bias copies ms/step": bias_copy_us / 1e3 / steps, "first step s": first}
    s = shape
    head = (f"## {shape_name} ({s.teacher_layers}x{s.hidden} -> {s.student_layers} layers, vocab {s.vocab}, "
            f"batch {s.batch} x {s.seq}), {mode}, logit_tokens={logit_tokens}, precision={precision}, "
            f"compile={compile_mode}, attention={attn or 'transformers default'}\n\n"
            f"Profiled {steps} step(s) after a warm-up ({first:.1f} s); every op's self CPU time summed: "
            f"{total / 1e3 / steps:.0f} ms/step (the profiler's own overhead included); GEMMs "
            f"{gemm_us / 1e3 / steps:.0f} ms, everything else {(total - gemm_us) / 1e3 / steps:.0f} ms "
            f"({100 * (total - gemm_us) / total:.1f}%), of which bias copies into addmm's output "
            f"{bias_copy_us / 1e3 / steps:.0f} ms.\n\n")
    return (head + "### Top ops by self time\n\n" + markdown_table(rows)
            + "\n### GEMMs by phase, op and input dtype\n\n" + markdown_table(gemm)
            + "\n### Casts (outermost aten::_to_copy, inclusive time) by phase and source dtype\n\n"
            + markdown_table(casts)
            + "\n### Attention, softmax, LayerNorm, GELU, batched GEMMs by dtype\n\n" + markdown_table(other)), summary


# ---- the run --------------------------------------------------------------------------------------------

def profile_main(args, precisions, compiles, device):
    """--profile: one report per (precision, compile mode), each in its own process, in one run; a summary
    of GEMM and non-GEMM self time; with --name, benchmarks/results/<name>.{json,md}."""
    lt = args.logit_tokens.split(",")[0]
    load_before = os.getloadavg()
    reports, summary = [], []
    for p in precisions:
        for c in compiles:
            res = run_isolated(args.profile, args.profile_mode, lt, args.ops, p, 1, device, args.attn, c, profile=True)
            print(res["report"], flush=True)
            reports.append(res["report"])
            summary.append(res["summary"])
    base = {(r["precision"]): r for r in summary if r["compile"] == "off"}
    for r in summary:
        if r["precision"] in base:
            r["non-GEMM x off"] = r["non-GEMM ms/step"] / base[r["precision"]]["non-GEMM ms/step"]
            r["self x off"] = r["self ms/step"] / base[r["precision"]]["self ms/step"]
    cols = ["shape", "precision", "compile", "self ms/step", "GEMM ms/step", "non-GEMM ms/step", "non-GEMM share",
            "bias copies ms/step", "non-GEMM x off", "self x off", "first step s"]
    print(markdown_table(summary, cols), flush=True)
    if not args.name:
        return
    m = machine()
    m["amx"] = _amx()
    m["allocator"] = f"{res['allocator']} in every profiled process"
    m["load_average_1_5_15_before_after"] = [load_before, os.getloadavg()]
    notes = (f"\n{_amx_line(m['amx'])} The machine was shared (load average before {load_before[0]:.1f}, after "
             f"{m['load_average_1_5_15_before_after'][1][0]:.1f} on {m['cores']} cores): compare the rows of this "
             f"run with each other (shares, ratios), not with other runs. Self time: every op's self CPU time in "
             f"one profiled {args.profile_mode} step after a warm-up (profiler overhead included); GEMM = "
             f"{', '.join(GEMMS)}; non-GEMM = the rest (with --compile blocks the compiled kernels, "
             f"`## Call CompiledFxGraph`, are non-GEMM time); bias copies = `aten::copy_` inside `aten::addmm` "
             f"(the bias broadcast into the output before the GEMM). `first step s`: the warm-up step's wall time "
             f"(with blocks: the compilation).\n\nReproduce: `python benchmarks/step.py --profile {args.profile} "
             f"--precisions {args.precisions} --compile {args.compile} --profile-mode {args.profile_mode} "
             f"--logit-tokens {lt} --name {args.name}`\n\n" + "\n\n".join(reports))
    write_results(args.name, {"machine": m, "shape": SHAPES[args.profile].__dict__, "summary": summary}, summary,
                  cols, title=f"Where the {args.profile_mode} step's time goes, compile off / on ({device})", notes=notes)


def _amx() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    return "amx_bf16" in flags


def _amx_line(amx: bool) -> str:
    if torch.cuda.is_available():
        return "GPU run."
    return ("This CPU has AMX (amx_bf16 in /proc/cpuinfo)." if amx else
            "This CPU has **no AMX** (no amx_* flag in /proc/cpuinfo): bf16 GEMMs run on avx512_bf16 (or fp32 units).")


def measure_peaks(dtypes, device: str, repeats: int) -> dict:
    return {d: matmul_peak(d, device, repeats) for d in sorted(dtypes)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small,bert-base", help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--logit-tokens", default="all,masked,affected",
                    help="masked LMs take all | masked, causal LMs all | affected (others are skipped)")
    ap.add_argument("--precisions", default="fp32,bf16", help=f"comma list of {list(PRECISIONS)}")
    ap.add_argument("--ops", default="fused", choices=["fused", "reference"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-repeats", type=int, default=5, help="calls per GEMM shape of the matmul peak")
    ap.add_argument("--name", default=None, help="results file name (default step-<device>)")
    ap.add_argument("--no-write", action="store_true", help="print only (CI smoke run)")
    ap.add_argument("--profile", metavar="SHAPE", help="profile one fast step at this shape instead (per "
                    "precision of --precisions, logit tokens the first of --logit-tokens), print markdown")
    ap.add_argument("--profile-mode", default="fast", choices=MODES)
    ap.add_argument("--attn", default=None, choices=["sdpa", "eager"],
                    help="attention implementation of the models (default: transformers' default)")
    ap.add_argument("--compile", default="off", help="comma list of off | linear | blocks (iit_fast/compile.py), "
                    "each run in turn: the bias in the GEMM epilogue, and torch.compile of the blocks")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)  # every logical core; OMP_NUM_THREADS, when set, decides
    shapes = args.shapes.split(",")
    precisions = args.precisions.split(",")
    compiles = args.compile.split(",")
    modes = args.modes.split(",")
    for name, values, allowed in (("--shapes", shapes, SHAPES), ("--precisions", precisions, PRECISIONS),
                                  ("--compile", compiles, COMPILE_MODES), ("--modes", modes, MODES),
                                  ("--logit-tokens", args.logit_tokens.split(","), ("all", "masked", "affected")),
                                  ("--profile", [args.profile] if args.profile else [], SHAPES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"{name}: {bad} not among {list(allowed)}")
    if args.repeats < 1 or args.peak_repeats < 1:
        ap.error(f"--repeats and --peak-repeats must be >= 1, got {args.repeats}, {args.peak_repeats}")

    if args.worker:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s:%(message)s")
        shape_name, mode, lt, ops, precision, repeats, dev, attn, comp, prof = json.loads(args.worker)
        if prof:
            report, summary = profile_step(shape_name, mode, lt, ops, precision, dev, attn, compile_mode=comp)
            out = {"report": report, "summary": summary}
        else:
            out = worker(SHAPES[shape_name], mode, lt, ops, precision, repeats, dev, attn, comp)
        print("RESULT " + json.dumps(out), flush=True)
        return
    if args.profile:
        return profile_main(args, precisions, compiles, device)

    load_before = os.getloadavg()
    peak_dtypes = {PRECISIONS[p][3] for p in precisions}
    peaks_before = measure_peaks(peak_dtypes, device, args.peak_repeats)
    rows, sum_rows, allocator = [], [], None
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        tokens = shape.batch * shape.seq
        for lt in args.logit_tokens.split(","):
            if lt not in LOGIT_TOKENS["causal" if shape.causal else "masked"]:
                continue  # masked LMs: all | masked; causal LMs: all | affected
            secs, cpus = {}, {}
            for prec, comp in ((p, c) for p in precisions for c in compiles):
                res = {m: run_isolated(shape_name, m, lt, args.ops, prec, args.repeats, device, args.attn, comp)
                       for m in modes}
                allocator = res[modes[0]]["allocator"]
                # masked LMs: docs/method.md's model (comparable with earlier results); causal LMs: the step's exact
                # count (flops.counted_flops: the counterfactual's reuse of the prefix included)
                fl = {m: res[m]["counted_flops"] if shape.causal else
                      flops_per_step(shape, m, res[m]["kd_fraction"], res[m]["site_t"], res[m]["site_s"])
                      for m in modes}
                for m in modes:
                    secs[(prec, comp, m)] = res[m]["seconds"]
                    rows.append({
                        "shape": shape_name, "logit_tokens": lt, "precision": prec, "compile": comp, "mode": m,
                        "ms/step": 1e3 * res[m]["seconds"], "CPU ms/step": 1e3 * res[m]["cpu_seconds"],
                        "tokens/s": tokens / res[m]["seconds"],
                        "GFLOP/step (model)": fl[m] / 1e9, "GFLOP/s": fl[m] / res[m]["seconds"] / 1e9,
                        "peak MB": res[m]["peak_bytes"] / 2**20, "loss": res[m]["loss"],
                        "first step s": res[m]["first_step_seconds"], "ops_path": res[m]["ops_path"],
                    })
                    if prec != "fp32" and ("fp32", comp, m) in secs:
                        rows[-1]["x fp32"] = secs[("fp32", comp, m)] / res[m]["seconds"]
                    cpus[(prec, comp, m)] = res[m]["cpu_seconds"]
                    if comp != "off" and (prec, "off", m) in secs:
                        rows[-1]["x off"] = secs[(prec, "off", m)] / res[m]["seconds"]
                        rows[-1]["x off (CPU)"] = cpus[(prec, "off", m)] / res[m]["cpu_seconds"]
                summary = {"shape": shape_name, "logit_tokens": lt, "precision": prec, "compile": comp}
                if "naive" in res and "fast" in res:
                    speed, model = res["naive"]["seconds"] / res["fast"]["seconds"], fl["naive"] / fl["fast"]
                    cpu_speed = res["naive"]["cpu_seconds"] / res["fast"]["cpu_seconds"]
                    summary.update({"fast/naive speedup": speed, "model speedup": model,
                                    "speedup / model": speed / model, "speedup / model (CPU)": cpu_speed / model,
                                    "fast/naive peak mem": res["fast"]["peak_bytes"] / res["naive"]["peak_bytes"]})
                if "standard" in res and "fast" in res:
                    cost, cost_model = res["fast"]["seconds"] / res["standard"]["seconds"], fl["fast"] / fl["standard"]
                    summary.update({"fast/standard time": cost, "model fast/standard": cost_model,
                                    "fast/standard / model": cost / cost_model})
                if "fast" in res:
                    summary["prefix reuse saves"] = res["fast"]["suffix_saved_flops"] / (
                        res["fast"]["counted_flops"] + res["fast"]["suffix_saved_flops"])
                sum_rows.append(summary)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}),
                      flush=True)
    peaks_after = measure_peaks(peak_dtypes, device, args.peak_repeats)
    load_after = os.getloadavg()
    peak = {d: max(peaks_before[d]["gflops"], peaks_after[d]["gflops"]) for d in peak_dtypes}
    for r in rows:
        r["MFU"] = r["GFLOP/s"] / peak[PRECISIONS[r["precision"]][3]]
        print(f"  {r['shape']:9s} {r['logit_tokens']:6s} {r['precision']:5s} {r['compile']:6s} {r['mode']:8s} "
              f"{r['ms/step']:9.1f} "
              f"ms/step {r['tokens/s']:9.0f} tok/s {r['GFLOP/s']:6.1f} GFLOP/s  MFU {r['MFU']:.2f}"
              + (f"  x fp32 {r['x fp32']:.2f}" if "x fp32" in r else "")
              + (f"  x off {r['x off']:.2f}" if "x off" in r else "")
              + f"  peak {r['peak MB']:7.0f} MB  {r['ops_path']}", flush=True)
    peaks = "; ".join(f"{d} {peaks_before[d]['gflops']:.0f} / {peaks_after[d]['gflops']:.0f} GFLOP/s"
                      for d in sorted(peak_dtypes))
    peak_line = (f"Matmul peak (benchmarks/peak.py, best of {args.peak_repeats} per GEMM shape, before / after the "
                 f"steps): {peaks}. Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
                 f"after: {', '.join(f'{x:.2f}' for x in load_after)}.")
    print(peak_line, flush=True)
    if args.no_write:
        return
    m = machine()
    if device == "cpu":
        m["allocator"] = f"{allocator} in every worker"
    m["load_average_1_5_15_before_after"] = [load_before, load_after]
    m["amx"] = _amx()
    cols = ["shape", "logit_tokens", "precision", "compile", "mode", "ms/step", "CPU ms/step", "tokens/s",
            "GFLOP/step (model)", "GFLOP/s", "MFU", "x fp32", "x off", "x off (CPU)", "first step s", "peak MB"]
    memory = "CUDA max allocated" if device == "cuda" else "peak RSS of the process, models included"
    shape_line = "; ".join(f"{n} = {s.family} teacher {s.teacher_layers} x {s.hidden} -> student {s.student_layers} "
                           f"layers, {s.heads} heads{f' ({s.kv_heads} kv)' if s.kv_heads else ''}, vocab {s.vocab}, "
                           f"batch {s.batch} x {s.seq}"
                           for n, s in ((n, SHAPES[n]) for n in shapes))
    notes = ("## Ratios (measured vs the FLOP model of docs/method.md section 2)\n\n" +
             markdown_table(sum_rows, ["shape", "logit_tokens", "precision", "compile", "fast/naive speedup",
                                       "model speedup", "speedup / model (CPU)",
                                       "speedup / model", "fast/standard time", "model fast/standard",
                                       "fast/standard / model", "fast/naive peak mem", "prefix reuse saves"]) +
             f"\nShapes: {shape_line}.\n\n{_amx_line(m['amx'])} {peak_line} MFU = GFLOP/s of the FLOP model / the peak of the step's "
             f"compute dtype (fp32: fp32; bf16, bf16w: bf16). `x fp32`: the fp32 step's time over this one's, "
             f"same shape and mode; `x off`: the same with --compile off over this one's (`(CPU)`: by the process's CPU time, "
             f"which another process's load disturbs less than wall time); `first step s`: the "
             f"warm-up step (with --compile blocks the compilation). The machine may be shared: compare rows of one "
             f"run (ratios).\n"
             f"Precisions: fp32; bf16 = teacher in bf16, student under bf16 autocast, fp32 weights; bf16w = "
             f"teacher and student weights in bf16 (DeepSpeed's bf16 mode, master copies in its optimizer, not "
             f"timed). Attention: {args.attn or 'transformers default'}.\n"
             f"ops: `{args.ops}`; median of {args.repeats} steps after one warm-up; each mode in its own "
             f"process (peak memory = {memory}).\n"
             f"Reproduce: `python benchmarks/step.py --shapes {args.shapes} --logit-tokens {args.logit_tokens} "
             f"--precisions {args.precisions} --repeats {args.repeats} --ops {args.ops} --compile {args.compile} "
             f"--modes {args.modes}"
             f"{' --attn ' + args.attn if args.attn else ''}`\n")
    payload = {"machine": m, "shapes": {n: SHAPES[n].__dict__ for n in shapes}, "ops": args.ops,
               "repeats": args.repeats, "attn": args.attn, "compile": compiles, "modes": modes,
               "precisions": {p: dict(zip(("teacher_dtype", "student_autocast", "student_weights", "peak_dtype"),
                                          map(str, PRECISIONS[p]))) for p in precisions},
               "matmul_peak": {"before": peaks_before, "after": peaks_after, "used_gflops": peak},
               "summary": sum_rows}
    write_results(args.name or f"step-{device}", payload, rows, cols,
                  title=f"Causal-distillation step throughput ({device})", notes=notes)


if __name__ == "__main__":
    main()
