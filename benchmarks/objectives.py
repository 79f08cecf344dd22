"""The objectives people distil decoders with, each with and without IIT; and what on-policy data costs.

    # the main job's tokens/s with lambda = 0.5 (and with seq_kd) against lambda = 0, interleaved runs
    python benchmarks/objectives.py throughput --teacher ~/.cache/iit_fast/teacher-gpt2-l6-bpe --steps 12
    # the sweep: 6 modes x 3 seeds, paired by seed (objectives-gpt2.{json,md,png}); ~1M tokens per run:
    python benchmarks/objectives.py sweep --teacher ~/.cache/iit_fast/teacher-gpt2-l6-bpe --steps 500
    # what ran in this session's time box (objectives-gpt2.md says so), with a reduced teacher:
    python -m iit_fast.teacher build --family gpt2 --layers 4 --hidden 256 --heads 4 --steps 250 \
        --batch-size 16 --out-dir ~/.cache/iit_fast/teacher-gpt2-l4-h256
    python benchmarks/objectives.py sweep --teacher ~/.cache/iit_fast/teacher-gpt2-l4-h256 --steps 24 \
        --batch-size 8 --max-length 64 --student-layers 2 --lr 1e-3 --warmup-steps 3 --precision bf16 \
        --eval-batches 4 --quality-batches 1 --train-eval-sequences 16 --runs-dir runs/objectives-gpt2

**throughput**: `iit_fast/train.py` runs of `--steps` steps at lambda 0, 0.5 and 0.5 + seq_kd, in the order
A B C A B C (a load change on a shared machine hits each alike); the figure is the tokens of the steps over
their seconds, from train.py's per-step metrics (real tokens of the rows the step trained on: a generated row
counts its prompt and continuation), steps after the first; generation's cost is train.py's own `gen_s`
(seconds spent generating) as a share of the training wall time. Writes
benchmarks/results/objectives-throughput-<cpu|gpu>.

**sweep**: from one causal teacher and one student initialisation, every mode in MODES for every seed (seed:
data order, intervention plans, generation; two modes of one seed share all of them), each a train.py
subprocess, one after the other, one seed's six modes after another (`--order`). After each run: `iit_fast.eval` next-token
perplexity, IIA and counterfactual KL against the teacher (benchmarks/replicate.Judge: fixed validation rows
and plans), and generation quality without a hub (`generate.sample_quality`: the teacher's perplexity of the
student's samples from fixed validation prompts, and their distinct bigrams). The paired differences of
COMPARISONS by seed with a 95% t-interval; results rewritten after every run (a stop loses nothing);
finished runs are reused, an unfinished one resumes from its last checkpoint (`--save-interval`). Run folders
(runs/, not committed) do not outlive a fresh checkout: a run the committed results file already records is taken
from there when its train.py command is this sweep's and the teacher and initial student measure the same to the
last bit (`recorded_runs`; a rebuilt default teacher does), so a sweep spread over sessions goes on where it was.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine, sweep_ds_config, write_results  # noqa: E402
from benchmarks.replicate import Judge, interval, relative, run_logged  # noqa: E402

JSD = ["--ce_divergence", "jsd", "--jsd_beta", "0.5"]
JSD_IIT = JSD + ["--iit_divergence", "jsd"]
ON = ["--on_policy_fraction", "0.5"]
MODES = {  # name -> train.py flags (the rest are the defaults: ce + mlm + cos, 0.25 each, T = 2)
    "fkl": ["--mode", "standard", "--w_iit", "0"],
    "fkl+iit": ["--mode", "fast"],
    "jsd": ["--mode", "standard", "--w_iit", "0"] + JSD,
    "jsd+iit": ["--mode", "fast"] + JSD_IIT,
    "onpolicy": ["--mode", "standard", "--w_iit", "0"] + JSD + ON,     # TRL GKD's defaults: lmbda 0.5, beta 0.5
    "onpolicy+iit": ["--mode", "fast"] + JSD_IIT + ON,
}
OFF_POLICY = ["fkl", "fkl+iit", "jsd", "jsd+iit"]
COMPARISONS = [  # (mode, its baseline): does IIT add to each objective; which objective
    ("fkl+iit", "fkl"), ("jsd+iit", "jsd"), ("onpolicy+iit", "onpolicy"),
    ("jsd", "fkl"), ("onpolicy", "jsd"), ("onpolicy", "fkl"), ("onpolicy+iit", "fkl+iit")]
METRICS = {  # name -> (read from a run's info; format of a difference); lower is better except IIA
    "val. perplexity": (lambda r: r["eval"]["mlm"]["perplexity"], "{:+.2f}"),
    "IIA": (lambda r: r["eval"]["iia"]["iia"], "{:+.4f}"),
    "cf. KL": (lambda r: r["eval"]["iia"]["cf_kl"], "{:+.4f}"),
    "samples: KL(s||t)/token": (lambda r: r["eval"]["gen"]["reverse_kl_per_token"], "{:+.4f}"),
    "teacher ppl of samples": (lambda r: r["eval"]["gen"]["teacher_ppl_of_samples"], "{:+.1f}"),
    "distinct-2": (lambda r: r["eval"]["gen"]["distinct_2"], "{:+.3f}"),
    "train time (s)": (lambda r: r["train_s"], "{:+.0f}"),
}


# ---- throughput ---------------------------------------------------------------------------------------

def throughput(a) -> None:
    cases = {"lambda 0": [], "lambda 0.5": ["--on_policy_fraction", "0.5"],
             "lambda 0.5 + seq_kd": ["--on_policy_fraction", "0.5", "--seq_kd"]}
    ds = Path(tempfile.mkdtemp()) / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": a.batch_size, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 1.0, "steps_per_print": 10 ** 6,
                              "zero_optimization": {"stage": 2}}))
    per = {k: [] for k in cases}
    load = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for name, extra in cases.items():
                out = Path(tmp) / f"{name.replace(' ', '_')}-{rep}"
                cmd = [sys.executable, str(REPO / "iit_fast" / "train.py"), "--deepspeed_config", str(ds),
                       "--teacher", str(a.teacher), "--max_steps", str(a.steps), "--eval_interval", "0",
                       "--eval_sequences", "16", "--plots", "false", "--out_dir", str(out), "--max_length",
                       str(a.max_length), "--student_layers", str(a.student_layers), "--precision", a.precision,
                       "--warmup_steps", "1"] + extra
                t0 = time.time()
                subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                load.append(os.getloadavg()[0])
                rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
                # every step but the first (warm-up): its wall seconds from its tokens and tokens/s
                later = [(r["tokens"] - p["tokens"], r) for p, r in zip(rows, rows[1:])]
                train_s = sum(n / r["tokens_per_s"] for n, r in later)
                # tokens over seconds of the steps, not a median of per-step figures: with generation the steps
                # are bimodal (a generated micro-batch or not) and the median is one mode's figure
                per[name].append({"tokens_per_s": sum(n for n, _ in later) / train_s, "train_s": train_s,
                                  "gen_s": sum(r.get("gen_s", 0.0) for _, r in later),
                                  "tokens_per_step": statistics.fmean(n for n, _ in later), "steps": len(later),
                                  "on_policy": statistics.fmean(r.get("on_policy", 0.0) for _, r in later),
                                  "seq_kd": statistics.fmean(r.get("seq_kd", 0.0) for _, r in later),
                                  "process_s": time.time() - t0})
                print(name, json.dumps(per[name][-1]), flush=True)
    base = statistics.median(x["tokens_per_s"] for x in per["lambda 0"])
    rows = []
    for name, xs in per.items():
        tps = statistics.median(x["tokens_per_s"] for x in xs)
        gen_share = statistics.median(x["gen_s"] / x["train_s"] for x in xs)
        rows.append({"case": name, "runs": len(xs), "tokens_per_s": round(tps, 1), "vs_lambda_0": round(tps / base, 3),
                     "generating_share_of_time": round(gen_share, 3),
                     "generating_s_per_generated_micro_batch": round(statistics.median(
                         x["gen_s"] / max(x["steps"] * (x["on_policy"] + x["seq_kd"]), 1e-9) for x in xs), 2)
                     if any(x["gen_s"] for x in xs) else 0,
                     "micro_batches_student_generated": round(statistics.fmean(x["on_policy"] for x in xs), 3),
                     "micro_batches_teacher_generated": round(statistics.fmean(x["seq_kd"] for x in xs), 3),
                     "tokens_per_step": round(statistics.median(x["tokens_per_step"] for x in xs))})
    m = machine()
    cmd = "python benchmarks/objectives.py " + shlex.join(sys.argv[1:])
    cmd = cmd.replace(str(REPO) + "/", "").replace(str(Path.home()), "~")
    notes = (f"Command: `{cmd}`. Teacher {relative([str(a.teacher)]).replace(str(Path.home()), '~')}, "
             f"{a.student_layers}-layer student initialised from it, micro-batch {a.batch_size} x {a.max_length}, "
             f"ZeRO-2, 1 rank, {a.steps} steps per run, the runs interleaved (A B C A B C ...), fast step with IIT "
             f"(defaults), precision {a.precision}. tokens/s: the tokens of the steps after the first over their "
             f"seconds (train.py's own per-step figures; real tokens of the rows trained on; a generated row is "
             f"its prompt and continuation, max_new_tokens = max_length / 2, so generated micro-batches hold "
             f"about as many tokens as corpus ones, fewer when a row ends at EOS). generating_share_of_time: "
             f"train.py's gen_s (seconds in transformers' generate, KV cache, plus building the rows) over the "
             f"steps' wall time; per generated "
             f"micro-batch: over the micro-batches generated (a step is one micro-batch here). 1-min load "
             f"average after the runs: {min(load):.1f}-{max(load):.1f} on {m['cores']} cores"
             + (" (shared with other jobs: compare the ratios, not the absolute figures)."
                if max(load) > 1.25 * m["cores"] else "."))
    name = "objectives-throughput-" + ("gpu" if m["device"] == "cuda" else "cpu")
    write_results(name, {"machine": m, "command": cmd, "per_run": per}, rows,
                  ["case", "runs", "tokens_per_s", "vs_lambda_0", "generating_share_of_time",
                   "generating_s_per_generated_micro_batch",
                   "micro_batches_student_generated", "micro_batches_teacher_generated", "tokens_per_step"],
                  title="Main job throughput with on-policy / sequence-level generation", notes=notes)
    print((RESULTS / f"{name}.md").read_text())


# ---- the sweep ----------------------------------------------------------------------------------------

def train_time_of(steps: list[dict]) -> float:
    """A run's training seconds from train.py's per-step records, robust to what the wall clock also counts:
    per kind of step (a generated micro-batch or not: their times differ), the median step time times the
    number of such steps. A paused or shared machine inflates single steps, and a resumed run's wall time
    covers only its last part; neither moves this."""
    kinds: dict[bool, list[float]] = {}
    for prev, r in zip([{"tokens": 0}] + steps, steps):       # "tokens" is cumulative
        kinds.setdefault(r.get("on_policy", 0.0) > 0 or r.get("seq_kd", 0.0) > 0, []).append(
            (r["tokens"] - prev["tokens"]) / r["tokens_per_s"])
    return sum(statistics.median(v) * len(v) for v in kinds.values())


def train_figures(out: Path) -> dict:
    """The run's training-time figures from its metrics.jsonl: train_s (`train_time_of`), tokens/s over it, and
    gen_s, the seconds spent generating (the median of the generating steps' times their number)."""
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    train_s = train_time_of(steps)
    gen = [r["gen_s"] for r in steps if r.get("gen_s", 0.0) > 0]      # per step (log interval 1), likewise
    return {"train_tokens": steps[-1]["tokens"], "train_s": train_s, "tokens_per_s": steps[-1]["tokens"] / train_s,
            "gen_s": statistics.median(gen) * len(gen) if gen else 0.0}


def train_command(a, mode: str, seed: int, ds_config: Path) -> list[str]:
    """The train.py command of one run: everything that decides what the run computes."""
    return [sys.executable, str(REPO / "iit_fast" / "train.py"), "--deepspeed_config", str(ds_config),
            "--teacher", str(a.teacher), "--student_layers", str(a.student_layers), "--max_length",
            str(a.max_length), "--max_steps", str(a.steps), "--eval_interval", str(a.eval_interval),
            "--eval_sequences", str(a.train_eval_sequences), "--seed", str(seed),
            "--out_dir", str(a.runs_dir / f"{mode}-seed{seed}"), "--alignment", a.alignment, "--lr", str(a.lr),
            "--warmup_steps", str(a.warmup_steps), "--plots", "false", "--precision", a.precision,
            "--gen_temperature", str(a.gen_temperature), "--save_interval", str(a.save_interval)] + MODES[mode]


def as_recorded(cmd: list[str]) -> str:
    """A train.py command as the results file records it (relative to the repository, ~ for the home)."""
    return ("python " + relative(cmd[1:])).replace(str(Path.home()) + "/", "~/")


EVAL_ARGS = ("eval_batches", "eval_batch_size", "quality_batches", "max_length")  # what the judge's figures need


def recorded_runs(results: dict, a, ds_config: Path, teacher_eval: dict, init_eval: dict) -> tuple[dict, str]:
    """The finished runs a results file (an earlier invocation's `<name>.json`) holds that this sweep can take as
    they are: {(mode, seed): info}, and why none is taken when it cannot. Run folders live in the ignored runs/
    and do not outlive a fresh checkout; the committed results do. A recorded run is taken only when its train.py
    command is the one this sweep would run, the judge is set up alike, and the teacher and the student's
    initialisation measure the same, to the last bit, on the same validation rows (another teacher, corpus or
    tokenizer would not)."""
    if results.get("teacher_eval") != teacher_eval or results.get("init_eval") != init_eval:
        return {}, (f"its teacher or initial student measures otherwise (teacher perplexity "
                    f"{results.get('teacher_eval', {}).get('perplexity')} there, {teacher_eval['perplexity']} here)")
    before = results.get("args", {})
    changed = [k for k in EVAL_ARGS if before.get(k) != str(getattr(a, k))]
    if changed:
        return {}, f"its evaluation was set up otherwise ({', '.join(changed)})"
    runs = {}
    for info in results.get("runs", []):
        key = (info.get("mode"), info.get("seed"))
        ran = info.get("command", "").removesuffix(" --resume true")  # a resumed run computes the same
        if key[0] in MODES and "eval" in info and ran == as_recorded(train_command(a, *key, ds_config)):
            runs[key] = info
    return runs, "" if runs else "none of its runs has this sweep's train.py command"


def train_one(a, mode: str, seed: int, ds_config: Path) -> dict:
    out = a.runs_dir / f"{mode}-seed{seed}"
    info_path = out / "objectives_run.json"
    if (out / "student" / "config.json").is_file() and info_path.is_file():
        print(f"[objectives] {out}: done before, reused", flush=True)
        return {**json.loads(info_path.read_text()), **train_figures(out)}
    # an unfinished run (a stopped session) continues from its last checkpoint (every --save-interval steps)
    resume = (out / "checkpoints" / "latest").is_file()
    if out.exists() and not resume:
        import shutil
        shutil.rmtree(out)
    cmd = train_command(a, mode, seed, ds_config) + (["--resume", "true"] if resume else [])
    print(f"[objectives] {mode} seed {seed}: {'resuming ' if resume else ''}{relative(cmd[1:])}", flush=True)
    log = a.runs_dir / f"{mode}-seed{seed}.log"
    wall = run_logged(cmd, log, f"training {mode} seed {seed}")
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    precision = next((l.strip() for l in log.read_text().splitlines() if l.strip().startswith("precision:")), "?")
    info = {"mode": mode, "seed": seed, "out": str(out), "command": as_recorded(cmd),
            "wall_s_last_invocation": wall, "precision": precision, **train_figures(out),
            "on_policy_share": statistics.fmean(r.get("on_policy", 0.0) for r in steps),
            "val_curve": [(r["step"], r["val_perplexity"]) for r in recs if "val_perplexity" in r],
            "final_loss_terms": {k: steps[-1][k] for k in ("loss", "ce", "mlm", "cos", "iit") if k in steps[-1]}}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"[objectives] {mode} seed {seed}: {info['train_s']:.0f} s of steps, {info['tokens_per_s']:.0f} tok/s",
          flush=True)
    return info


class Quality:
    """generate.sample_quality on fixed validation prompts (the same for every student) with the teacher."""

    def __init__(self, judge: Judge, a):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(judge.teacher_dir)
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        self.batches = judge.batches[:a.quality_batches]
        self.a, self.teacher = a, judge.teacher

    def __call__(self, student) -> dict:
        from iit_fast.generate import sample_quality
        return sample_quality(student, self.teacher, self.batches, prompt_len=self.a.max_length // 2,
                              max_new_tokens=self.a.max_length // 2, eos_id=self.eos, pad_id=self.pad,
                              temperature=1.0, seed=0)


def evaluate(judge: Judge, quality: Quality, info: dict) -> None:
    from iit_fast.models import load_model
    path = Path(info["out"]) / "eval.json"
    if path.is_file():
        info["eval"] = json.loads(path.read_text())
    else:
        student, _ = load_model(Path(info["out"]) / "student", kind="causal", arg="student")
        info["eval"] = judge.measure(student) | {"gen": quality(student.eval())}
        path.write_text(json.dumps(info["eval"], indent=1) + "\n")
    e = info["eval"]
    print(f"[objectives] eval {info['mode']} seed {info['seed']}: ppl {e['mlm']['perplexity']:.2f} IIA "
          f"{e['iia']['iia']:.3f} cf-KL {e['iia']['cf_kl']:.4f} teacher-ppl-of-samples "
          f"{e['gen']['teacher_ppl_of_samples']:.1f} KL(s||t)/token {e['gen']['reverse_kl_per_token']:.4f} distinct-2 {e['gen']['distinct_2']:.3f}", flush=True)


def differences(infos) -> list[dict]:
    out = []
    for mode, base in COMPARISONS:
        by = {(i["mode"], i["seed"]): i for i in infos}
        seeds = sorted(s for (m, s) in by if m == mode and (base, s) in by)
        if not seeds:
            continue
        for metric, (get, fmt) in METRICS.items():
            d = [get(by[(mode, s)]) - get(by[(base, s)]) for s in seeds]
            mean, half = interval(d)
            out.append({"comparison": f"{mode} − {base}", "metric": metric, "seeds": len(seeds),
                        "by seed": ", ".join(fmt.format(x) for x in d), "mean": fmt.format(mean),
                        "95% CI": "n/a" if half != half else f"[{fmt.format(mean - half)}, {fmt.format(mean + half)}]",
                        "mean_value": mean, "half_width": half})
    return out


def per_mode(infos) -> list[dict]:
    rows = []
    for mode in MODES:
        xs = [i for i in infos if i["mode"] == mode]
        if not xs:
            continue
        row = {"mode": mode, "seeds": len(xs)}
        for metric, (get, _) in METRICS.items():
            v = [get(i) for i in xs]
            row[metric] = f"{statistics.fmean(v):.4g}" + (f" ± {statistics.stdev(v):.2g}" if len(v) > 1 else "")
        row["tokens/s"] = f"{statistics.fmean(i['tokens_per_s'] for i in xs):.0f}"
        row["generating (s)"] = f"{statistics.fmean(i['gen_s'] for i in xs):.0f}"
        rows.append(row)
    return rows


def plot(infos, diffs, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = ["val. perplexity", "IIA", "cf. KL", "samples: KL(s||t)/token"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, metric in zip(axes, panels):
        get = METRICS[metric][0]
        for x, mode in enumerate(MODES):
            v = [get(i) for i in infos if i["mode"] == mode]
            if v:
                ax.scatter([x] * len(v), v, s=14, color="C0" if "+iit" in mode else "C1", alpha=0.7)
                ax.hlines(statistics.fmean(v), x - 0.3, x + 0.3, color="k")
        ax.set_xticks(range(len(MODES)), list(MODES), rotation=35, ha="right", fontsize=8)
        ax.set_title(metric + (" (higher better)" if metric == "IIA" else " (lower better)"), fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("each dot a seed, line the mean; blue: with IIT, orange: without", fontsize=9)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def report(a, infos, judge, teacher_gen, init_gen, cmd: str, t0: float) -> None:
    done = [i for i in infos if "eval" in i]
    diffs = differences(done)
    ti, s0 = judge.teacher_eval, judge.init_eval
    tokens = a.steps * a.batch_size * a.max_length
    notes = "\n\n".join(x for x in [
        f"Command: `{cmd}`. Runs finished: {len(done)} of {len(a.seeds) * len(MODES)}; this invocation so far "
        f"{time.time() - t0:.0f} s. Each run: {a.steps} steps of {a.batch_size} x <= {a.max_length} tokens (about "
        f"{tokens / 1e3:.0f}k tokens), {a.student_layers}-layer student initialised from the teacher, alignment "
        f"{a.alignment}, lr {a.lr}, precision: the table's runs say (train.py's line: "
        f"{done[0]['precision'] if done else '?'}).",
        a.note,
        "Modes: fkl = forward KL (today's default), jsd = generalized JSD with beta 0.5 (TRL's convention), "
        "onpolicy = jsd with half the micro-batches continued by the student (lambda 0.5, TRL GKD's defaults; "
        "prompts = the first half of corpus rows, continuations up to max_length / 2 new tokens at temperature "
        f"{a.gen_temperature}, losses on the continuation only); +iit: the interchange term at the same "
        "divergence (w_iit 0.25, `--mode fast`), without: `--mode standard --w_iit 0`. Every mode keeps ce, the "
        "next-token LM term and cos at 0.25 each, T = 2.",
        "## Paired differences (mode minus its baseline, same seed: same data order, plans and validation)\n\n"
        "| comparison | metric | seeds | by seed | mean | 95% CI |\n|---|---|---|---|---|---|\n"
        + "".join(f"| {r['comparison']} | {r['metric']} | {r['seeds']} | {r['by seed']} | {r['mean']} | "
                  f"{r['95% CI']} |\n" for r in diffs),
        "95% CI: mean ± t(0.975, seeds - 1) x sd / sqrt(seeds) over the per-seed differences (t = 4.30 for 3 seeds).",
        f"Teacher: next-token perplexity {ti['perplexity']:.2f}; its own samples: teacher ppl "
        f"{teacher_gen['teacher_ppl_of_samples']:.1f}, distinct-2 {teacher_gen['distinct_2']:.3f} (KL(s||t) is 0 "
        f"there by definition). Student at initialisation: perplexity {s0['mlm']['perplexity']:.2f}, IIA "
        f"{s0['iia']['iia']:.3f}, cf. KL {s0['iia']['cf_kl']:.4f}; its samples: KL(s||t)/token "
        f"{init_gen['reverse_kl_per_token']:.4f}, teacher ppl {init_gen['teacher_ppl_of_samples']:.1f}, distinct-2 "
        f"{init_gen['distinct_2']:.3f}.",
        f"Perplexity / IIA / cf. KL: `iit_fast.eval` on the first {a.eval_batches} validation batches of "
        f"{a.eval_batch_size} (IIA: share of positions where the student's counterfactual top-1 equals the "
        f"teacher's; cf. KL: KL(teacher || student) at T = 1, nats). Teacher ppl of samples: the student continues "
        f"the first {a.max_length // 2} tokens of {a.quality_batches} x {a.eval_batch_size} validation rows by "
        f"{a.max_length // 2} sampled tokens (T = 1, full distribution, seeded: the same prompts and seeds for every "
        f"student; `iit_fast.generate.sample_quality`). KL(s||t)/token: the mean of log p_student - log p_teacher "
        f"over the sampled tokens, a Monte-Carlo estimate of the sequence-level reverse KL per token (MiniLLM's "
        f"objective; 0 = generates as the teacher does; lower is better). Teacher ppl of samples: the issue's "
        f"figure, not monotone in quality (a student more peaked than the teacher scores below the teacher's own "
        f"samples), so read it against the teacher's own samples' value. distinct-2: distinct bigrams per bigram "
        f"within a row (a repetition check). Train time: the run's step seconds, per kind of step (a generated "
        f"micro-batch or not) the median step time times the number of such steps (a pause, a core shared with "
        f"other work, or a stop and resume do not move it: `train_time_of`); tokens/s: the run's tokens over it. "
        f"Runs that shared the cores with other work for long are slower throughout, so these two columns "
        f"compare runs loosely; the cost of a mode is measured by the interleaved runs of `objectives.py throughput`.",
        f"![objectives]({a.name}.png)",
    ] if x)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if done:
        plot(done, diffs, RESULTS / f"{a.name}.png")
    payload = {"machine": machine(), "command": cmd, "args": {k: str(v) for k, v in vars(a).items()},
               "teacher_eval": ti, "teacher_samples": teacher_gen, "init_eval": s0, "init_samples": init_gen,
               "runs": infos, "paired_differences": diffs}
    payload = json.loads(json.dumps(payload, default=str).replace(str(REPO) + "/", "")
                         .replace(str(Path.home()) + "/", "~/"))
    cols = ["mode", "seeds"] + list(METRICS) + ["tokens/s", "generating (s)"]
    write_results(a.name, payload, per_mode(done), cols,
                  title="Which objective for a decoder, and does IIT add to it? (paired by seed)", notes=notes)


def sweep(a) -> None:
    ds_config = sweep_ds_config(a.runs_dir, a.batch_size)
    argv = sys.argv[1:]
    if "--note" in argv:  # the note is printed below the command, not inside it
        i = argv.index("--note")
        argv = argv[:i] + ["--note", "..."] + argv[i + 2:]
    argv = [x for x in argv if x != "--report-only"]
    cmd = ("python benchmarks/objectives.py " + shlex.join(argv)).replace(str(REPO) + "/", "")
    cmd = cmd.replace(str(Path.home()), "~")
    t0 = time.time()
    a.corpus, a.cache_dir = None, None  # what Judge reads: the default corpus, the default cache
    judge = Judge(a)
    quality = Quality(judge, a)
    ref = a.runs_dir / "references.json"
    if ref.is_file():
        refs = json.loads(ref.read_text())
    else:
        from iit_fast.models import IntervenableLM
        init = IntervenableLM(__import__("transformers").AutoModelForCausalLM.from_pretrained(judge.init_dir)).eval()
        refs = {"teacher": quality(judge.teacher), "init": quality(init)}
        ref.write_text(json.dumps(refs, indent=1))
    print(f"[objectives] teacher ppl {judge.teacher_eval['perplexity']:.2f}; samples: teacher {refs['teacher']}, "
          f"init {refs['init']}", flush=True)
    if a.order == "off-policy-first":  # (while on-policy was being built)
        todo = [(m, s) for s in a.seeds for m in OFF_POLICY if m in a.modes] + \
               [(m, s) for s in a.seeds for m in MODES if m not in OFF_POLICY and m in a.modes]
    else:  # one seed's every mode, then the next: a time-boxed sweep ends with whole seeds of every mode
        todo = [(m, s) for s in a.seeds for m in MODES if m in a.modes]
    recorded, why_not = {}, "no results file" if not (RESULTS / f"{a.name}.json").is_file() else "--retrain-recorded"
    if why_not == "--retrain-recorded" and not a.retrain_recorded:
        recorded, why_not = recorded_runs(json.loads((RESULTS / f"{a.name}.json").read_text()), a, ds_config,
                                          judge.teacher_eval, judge.init_eval)
    print(f"[objectives] runs recorded in benchmarks/results/{a.name}.json, taken as they are where their folder "
          f"is missing: {', '.join(f'{m} seed {sd}' for m, sd in recorded) or 'none'}"
          + (f" ({why_not})" if why_not else ""), flush=True)

    def finished(ms, file="objectives_run.json"):
        return (a.runs_dir / f"{ms[0]}-seed{ms[1]}" / file).is_file()
    # finished runs first (reused), so that every report holds them
    todo.sort(key=lambda ms: not (finished(ms) or ms in recorded))
    if a.report_only:  # the finished runs only (e.g. after a time-boxed sweep was stopped)
        todo = [ms for ms in todo if finished(ms, "eval.json") or ms in recorded]
    infos = []
    for mode, seed in todo:
        if not finished((mode, seed)) and (mode, seed) in recorded:
            info = recorded[(mode, seed)]
            print(f"[objectives] {mode} seed {seed}: recorded in the results, reused", flush=True)
        else:
            info = train_one(a, mode, seed, ds_config)
            evaluate(judge, quality, info)
        infos.append(info)
        report(a, infos, judge, refs["teacher"], refs["init"], cmd, t0)
    print((RESULTS / f"{a.name}.md").read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("throughput", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--teacher", type=Path, required=True, help="a causal teacher folder")
        s.add_argument("--steps", type=int, default=12 if name == "throughput" else 300)
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--max-length", type=int, default=128)
        s.add_argument("--student-layers", type=int, default=3)
        s.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    t = sub.choices["throughput"]
    t.add_argument("--repeats", type=int, default=2, help="runs of each case (interleaved)")
    s = sub.choices["sweep"]
    s.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--alignment", default="middle")
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--warmup-steps", type=int, default=5)
    s.add_argument("--gen-temperature", type=float, default=1.0)
    s.add_argument("--eval-interval", type=int, default=0, help="train.py's validations (0: start and end only)")
    s.add_argument("--save-interval", type=int, default=50,
                   help="train.py's checkpoints: a stopped sweep resumes its unfinished run from the last one")
    s.add_argument("--train-eval-sequences", type=int, default=32)
    s.add_argument("--eval-batches", type=int, default=8)
    s.add_argument("--eval-batch-size", type=int, default=32)
    s.add_argument("--quality-batches", type=int, default=2, help="validation batches whose rows are prompts")
    s.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "objectives")
    s.add_argument("--name", default="objectives-gpt2")
    s.add_argument("--note", default="")
    s.add_argument("--report-only", action="store_true", help="rewrite the results from the evaluated runs only")
    s.add_argument("--order", default="by-seed", choices=["by-seed", "off-policy-first"])
    s.add_argument("--retrain-recorded", action="store_true",
                   help="train every run whose folder is missing, even when the results file records it")
    a = p.parse_args(argv)
    throughput(a) if a.what == "throughput" else sweep(a)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
