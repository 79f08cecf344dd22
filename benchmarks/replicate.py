"""Is causal distillation worth its cost? Standard against causal distillation, paired by seed.

From one teacher (default: the embedded default teacher) and the same student initialisation (the
teacher's embeddings, head and an evenly spread subset of its blocks), on the same data for the same
number of steps, train every mode in `--modes` for every seed (seed: data order, MLM masks, intervention
plans, dropout; two modes of one seed share all of them), with `iit_fast/train.py` as a subprocess, one run
after the other:
- **standard**: `--mode standard --w_iit 0` (ce + mlm + cos, 0.25 each);
- **causal**: `--mode fast` with the published weights (ce + mlm + cos + iit), KL terms at every token;
- **causal-masked**: the same with `--logit_tokens masked` (ce and iit at the MLM targets only: cheaper);
- **standard-masked**: standard with `--logit_tokens masked` (ce at the MLM targets only), so that
  causal-masked - standard-masked is what the IIT term adds once the ce tokens are the same;
- **standard-nomlm** / **causal-nomlm**: both with `--w_mlm 0`. Without the MLM term the student learns
  from the teacher only, so this pair isolates what the IIT term changes in what it learns from the teacher.
Each run is evaluated as soon as it ends, with `iit_fast.eval` on the same validation batches (rows and
masks fixed by `eval.EVAL_SEED`): MLM perplexity, top-1, and IIA / counterfactual KL against the teacher
under the training alignment (plans fixed by `eval.IIA_SEED`), then fine-tuned on an offline downstream
task (`iit_fast.finetune.build_source_task`: which of five manuals a paragraph comes from; hub tasks such
as GLUE cannot be reached here). After every run the results are rewritten:
benchmarks/results/<name>.{json,md,png}, with the paired difference of each pair in COMPARISONS by seed,
the mean and a 95% t-interval, and the paired difference over the training steps.

    python benchmarks/replicate.py    # the full sweep (replicate.md): 18 runs, ~2 h on 2 quiet cores
    python benchmarks/replicate.py --steps 30 --max-length 64 --eval-interval 10   # a reduced one
    python benchmarks/replicate.py --teacher-cache runs/replicate-cache --runs-dir runs/replicate-cached \\
        --online-runs runs/replicate --name replicate-cached  # the same runs from one teacher cache

With `--teacher-cache DIR` no run calls the teacher: the teacher runs once, in `iit-fast cache-teacher`
(timed, and built only if DIR holds no cache yet; one cache per `logit_tokens`, as that decides which
positions it stores), over the first steps x batch-size training rows. `--online-runs` names the online
sweep's runs folder, so the report sets the cached sweep's wall time (build included) against it.

Runs already finished under --runs-dir (a `student/` folder and replicate_run.json) are reused, not
retrained, so an interrupted sweep continues where it stopped (use a fresh --runs-dir after changing flags).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine, sweep_ds_config, write_results  # noqa: E402

MODES = {  # name -> train.py flags
    "standard": ["--mode", "standard", "--w_iit", "0"],
    "causal": ["--mode", "fast"],
    "causal-masked": ["--mode", "fast", "--logit_tokens", "masked"],
    "standard-masked": ["--mode", "standard", "--w_iit", "0", "--logit_tokens", "masked"],
    "standard-nomlm": ["--mode", "standard", "--w_iit", "0", "--w_mlm", "0"],
    "causal-nomlm": ["--mode", "fast", "--w_mlm", "0"],
}
COMPARISONS = [  # (mode, its baseline): reported where both have finished runs of the same seed
    ("causal", "standard"), ("causal-masked", "standard"), ("standard-masked", "standard"),
    ("causal-masked", "standard-masked"), ("causal-nomlm", "standard-nomlm")]
# two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 seeds); no scipy here
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def logit_tokens_of(mode: str) -> str:
    flags = MODES[mode]
    return flags[flags.index("--logit_tokens") + 1] if "--logit_tokens" in flags else "all"


def train_flags(a, mode: str, seed: int, out: Path, ds_config: Path) -> list[str]:
    f = ["--deepspeed_config", str(ds_config), "--student_layers", str(a.student_layers),
         "--max_length", str(a.max_length), "--max_steps", str(a.steps), "--eval_interval", str(a.eval_interval),
         "--eval_sequences", str(a.train_eval_sequences), "--seed", str(seed), "--out_dir", str(out),
         "--alignment", a.alignment, "--lr", str(a.lr), "--warmup_steps", str(a.warmup_steps), "--plots", "false",
         "--precision", a.precision] + source_flags(a)
    if a.teacher_cache:
        f += ["--teacher_cache", str(teacher_cache(a, logit_tokens_of(mode)))]
    return f + MODES[mode]


def source_flags(a) -> list[str]:
    """--teacher / --corpus / --cache_dir, as train.py and cache-teacher both spell them."""
    return ((["--teacher", str(a.teacher)] if a.teacher else []) + (["--corpus", a.corpus] if a.corpus else [])
            + (["--cache_dir", str(a.cache_dir)] if a.cache_dir else []))


def run_logged(cmd: list[str], log: Path, what: str) -> float:
    """Run `cmd` from the repository, its output to `log`; its wall seconds, or exit naming `what` and the log."""
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"error: {what} failed (exit {rc}); see {log}:\n" + log.read_text()[-3000:])
    return time.time() - t0


def relative(cmd: list[str]) -> str:
    """A command as the results record it: relative to the repository, no path of this machine."""
    return " ".join(c.replace(str(REPO) + "/", "") for c in cmd)


def teacher_cache(a, logit_tokens: str) -> Path:
    """The sweep's teacher cache for `logit_tokens` (built once, timed; reused when it is complete)."""
    folder = a.teacher_cache / logit_tokens
    record = folder / "replicate_build.json"
    if record.is_file():
        return folder
    rows = a.steps * a.batch_size
    cmd = [sys.executable, "-m", "iit_fast.cli", "cache-teacher", "--out", str(folder),
           "--max_length", str(a.max_length), "--top_k", str(a.cache_top_k), "--plans", str(a.cache_plans),
           "--hidden", "--logit_tokens", logit_tokens, "--alignment", a.alignment,
           "--student_layers", str(a.student_layers), "--max_examples", str(rows + rows % 2),
           "--no_progress"] + source_flags(a)
    print(f"[replicate] building the teacher cache: {relative(cmd[1:])}", flush=True)
    wall = run_logged(cmd, a.runs_dir / f"cache-{logit_tokens}.log", "building the teacher cache")
    record.write_text(json.dumps({"logit_tokens": logit_tokens, "wall_s": wall, "rows": rows,
                                  "command": "python " + relative(cmd[1:])}, indent=1) + "\n")
    print(f"[replicate] teacher cache ({logit_tokens}) built in {wall:.0f} s", flush=True)
    return folder


def train_one(a, mode: str, seed: int, ds_config: Path) -> dict:
    out = a.runs_dir / f"{mode}-seed{seed}"
    done = out / "student" / "config.json"
    info_path = out / "replicate_run.json"
    if done.is_file() and info_path.is_file():
        print(f"[replicate] {out}: done before, reused", flush=True)
        return json.loads(info_path.read_text())
    if out.exists():
        import shutil
        shutil.rmtree(out)
    cmd = [sys.executable, str(REPO / "iit_fast" / "train.py")] + train_flags(a, mode, seed, out, ds_config)
    print(f"[replicate] {mode} seed {seed}: {relative(cmd[1:])}", flush=True)
    log = a.runs_dir / f"{mode}-seed{seed}.log"
    wall = run_logged(cmd, log, f"training {mode} seed {seed}")
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    tps = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    precision = next((l.strip() for l in log.read_text().splitlines() if l.strip().startswith("precision:")), "?")
    info = {"mode": mode, "seed": seed, "out": str(out), "command": "python " + relative(cmd[1:]), "wall_s": wall,
            "precision": precision, "train_tokens": steps[-1]["tokens"],
            "tokens_per_s_median": statistics.median(tps), "student_layers": a.student_layers,
            "val_curve": [(r["step"], r["val_perplexity"]) for r in recs if "val_perplexity" in r],
            "teacher_val_perplexity": next((r["teacher_val_perplexity"] for r in recs
                                            if "teacher_val_perplexity" in r), None),
            "final_loss_terms": {k: steps[-1][k] for k in ("loss", "ce", "mlm", "cos", "iit") if k in steps[-1]}}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"[replicate] {mode} seed {seed}: {wall:.0f} s, {info['tokens_per_s_median']:.0f} tok/s, "
          f"val ppl {info['val_curve'][-1][1]:.1f}", flush=True)
    return info


class Judge:
    """The fixed measuring stick: the teacher, the validation batches and the downstream task, loaded once;
    `evaluate` and `downstream` cache their result in the run's folder, so a re-run reuses them."""

    def __init__(self, a):
        from iit_fast.eval import lm_metrics, load_validation
        from iit_fast.models import IntervenableLM, load_model
        from iit_fast.models.student import init_student_from_teacher
        from iit_fast.teacher import default_teacher_path
        self.a = a
        self.teacher_dir = Path(a.teacher or default_teacher_path(a.cache_dir))
        self.teacher, tok = load_model(self.teacher_dir, arg="teacher")  # masked or causal: its kind decides
        self.batches = load_validation(tok, a.corpus, a.eval_batch_size, a.max_length, a.cache_dir,
                                       kind=self.teacher.kind, max_batches=a.eval_batches or None)
        self.teacher_eval = lm_metrics(self.teacher, self.batches)
        init = init_student_from_teacher(self.teacher.model, a.student_layers)
        self.init_dir = a.runs_dir / "init-student"  # the starting point of every run, for the downstream task
        if not (self.init_dir / "config.json").is_file():
            init.save_pretrained(self.init_dir)
            tok.save_pretrained(self.init_dir)
        self.init_eval = self.measure(IntervenableLM(init).eval())
        self.task_files = None

    def measure(self, student) -> dict:
        from iit_fast.eval import interchange_accuracy, lm_metrics, parse_alignment
        pairs = parse_alignment(self.a.alignment, self.teacher.num_layers, student.num_layers)
        return {"mlm": lm_metrics(student, self.batches),
                "iia": interchange_accuracy(self.teacher, student, self.batches, pairs)}

    def evaluate(self, info: dict) -> None:
        from iit_fast.models import load_model
        path = Path(info["out"]) / "eval.json"
        if path.is_file():
            info["eval"] = json.loads(path.read_text())
        else:
            si, _ = load_model(Path(info["out"]) / "student", kind=self.teacher.kind, arg="student")
            info["eval"] = self.measure(si)
            path.write_text(json.dumps(info["eval"], indent=1) + "\n")
        e = info["eval"]
        print(f"[replicate] eval {info['mode']} seed {info['seed']}: ppl {e['mlm']['perplexity']:.1f} "
              f"top-1 {e['mlm']['top1']:.3f} IIA {e['iia']['iia']:.3f} cf-KL {e['iia']['cf_kl']:.3f}", flush=True)

    def finetune(self, model_dir: Path, seed: int, out_json: Path) -> dict:
        """One downstream fine-tune (the offline source task), cached in out_json."""
        from iit_fast.finetune import build_source_task, finetune
        a = self.a
        params = {"model": str(model_dir), "seed": seed, "steps": a.downstream_steps, "lr": a.downstream_lr}
        if out_json.is_file():
            res = json.loads(out_json.read_text())
            if res.get("params") == params:
                return res
        self.task_files = self.task_files or build_source_task(a.runs_dir / "source-task", progress=False)
        res = finetune(str(model_dir), "seq", *self.task_files, max_steps=a.downstream_steps, batch_size=16,
                       lr=a.downstream_lr, max_length=a.max_length, seed=seed, progress=False)
        res["params"] = params
        out_json.write_text(json.dumps(res, indent=1) + "\n")
        print(f"[replicate] downstream {relative([str(model_dir)])}: accuracy {res['accuracy']:.3f} "
              f"macro F1 {res['macro_f1']:.3f} ({res['seconds']:.0f} s)", flush=True)
        return res

    def downstream(self, info: dict) -> None:
        out = Path(info["out"])
        info["downstream"] = self.finetune(out / "student", info["seed"], out / "downstream.json")

    def references(self, seeds) -> dict:
        """The student at initialisation (every seed: the fine-tuning noise floor) and the teacher (seed 0)."""
        return {"init": [self.finetune(self.init_dir, sd, self.init_dir / f"downstream-seed{sd}.json")
                         for sd in seeds],
                "teacher": self.finetune(self.teacher_dir, 0, self.a.runs_dir / "teacher-downstream.json")}


# ---------------------------------------------------------------------------------------------------------
# Paired differences
# ---------------------------------------------------------------------------------------------------------

METRICS = {  # name -> (how to read it from a run, None where the run has no such figure; format)
    "val. perplexity": (lambda r: r["eval"]["mlm"]["perplexity"], "{:+.2f}"),
    "top-1": (lambda r: r["eval"]["mlm"]["top1"], "{:+.4f}"),
    "IIA": (lambda r: r["eval"]["iia"]["iia"], "{:+.4f}"),
    "cf. KL": (lambda r: r["eval"]["iia"]["cf_kl"], "{:+.4f}"),
    "downstream acc.": (lambda r: r.get("downstream", {}).get("accuracy"), "{:+.4f}"),
    "wall time (s)": (lambda r: r["wall_s"], "{:+.0f}"),
}


def interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% t-interval (nan for one value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def paired_runs(infos, mode: str, base: str) -> list[tuple[dict, dict]]:
    """(run of `base`, run of `mode`) for every seed where both have finished."""
    by = {(i["mode"], i["seed"]): i for i in infos}
    return [(by[(base, i["seed"])], i) for i in infos if i["mode"] == mode and (base, i["seed"]) in by]


def differences(infos) -> list[dict]:
    """One row per (compared mode, metric): the paired differences by seed, their mean and 95% interval."""
    rows = []
    for mode, base in COMPARISONS:
        pairs = paired_runs(infos, mode, base)
        if not pairs:
            continue
        for name, (get, fmt) in METRICS.items():
            if any(get(r) is None for pair in pairs for r in pair):
                continue
            d = [get(c) - get(b) for b, c in pairs]
            m, h = interval(d)
            rows.append({"comparison": f"{mode} - {base}", "metric": name, "seeds": len(d),
                         "by seed": ", ".join(fmt.format(x) for x in d), "mean": fmt.format(m),
                         "95% CI": "n/a" if math.isnan(h) else f"[{fmt.format(m - h)}, {fmt.format(m + h)}]",
                         "values": d, "mean_value": m, "half_width": h})
        ratios = [c["wall_s"] / b["wall_s"] for b, c in pairs]
        m, h = interval(ratios)
        rows.append({"comparison": f"{mode} / {base}", "metric": "wall time ratio", "seeds": len(ratios),
                     "by seed": ", ".join(f"{x:.3f}x" for x in ratios), "mean": f"{m:.3f}x",
                     "95% CI": "n/a" if math.isnan(h) else f"[{m - h:.3f}x, {m + h:.3f}x]",
                     "values": ratios, "mean_value": m, "half_width": h})
    return rows


def per_mode(infos) -> list[dict]:
    rows = []
    for mode in MODES:
        runs = [i for i in infos if i["mode"] == mode and "eval" in i]
        if not runs:
            continue
        row = {"mode": mode, "seeds": len(runs)}
        for name, (get, _) in METRICS.items():
            xs = [x for x in map(get, runs) if x is not None]
            if xs:
                m = statistics.fmean(xs)
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                row[name] = ("{:.1f} ± {:.1f}" if name in ("val. perplexity", "wall time (s)") else
                             "{:.4f} ± {:.4f}").format(m, sd)
        row["tokens/s"] = f"{statistics.fmean(r['tokens_per_s_median'] for r in runs):.0f}"
        row["precision"] = runs[0].get("precision", "?").split(" (")[0].replace("precision: ", "")
        rows.append(row)
    return rows


def plot(a, infos, path: Path):
    """Left: each mode's validation perplexity during training (mean over seeds). Right: each mode minus its
    baseline, paired by seed (same data, masks and validation batches): the mean, its 95% t-interval as a
    band, and every seed as a thin line. This is what the comparison is about."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = dict(zip(MODES, ["tab:blue", "tab:red", "tab:orange", "tab:green", "tab:cyan", "tab:purple"]))
    for mode in MODES:
        runs = [i for i in infos if i["mode"] == mode]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(dict(r["val_curve"])) for r in runs)))
        ax.plot(steps, [statistics.fmean(dict(r["val_curve"])[s] for r in runs) for s in steps], marker=".",
                color=colors[mode], label=f"{mode} ({len(runs)} seeds)")
    tv = next((i["teacher_val_perplexity"] for i in infos if i.get("teacher_val_perplexity")), None)
    if tv:
        ax.axhline(tv, color="gray", ls="--", label="teacher")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("validation perplexity (train.py's validation)")
    ax.set_yscale("log"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title(f"{a.student_layers}-layer student, {a.steps} steps, mean over seeds", fontsize=10)
    for (mode, base), color in zip(COMPARISONS, ["tab:red", "tab:orange", "tab:green", "tab:brown", "tab:purple"]):
        pairs = paired_runs(infos, mode, base)
        if not pairs:
            continue
        curves = [(dict(b["val_curve"]), dict(c["val_curve"])) for b, c in pairs]
        steps = sorted(set.intersection(*(set(cb) & set(cc) for cb, cc in curves)))
        diffs = [[cc[s] - cb[s] for cb, cc in curves] for s in steps]
        for k in range(len(curves)):
            dx.plot(steps, [d[k] for d in diffs], color=color, lw=0.6, alpha=0.4)
        mh = [interval(d) for d in diffs]
        dx.plot(steps, [m for m, _ in mh], marker=".", color=color,
                label=f"{mode} - {base} (mean of {len(curves)} seeds; band 95% CI)")
        if len(curves) > 1:
            dx.fill_between(steps, [m - h for m, h in mh], [m + h for m, h in mh], color=color, alpha=0.15)
    dx.axhline(0, color="gray", lw=1)
    dx.set_xlabel("optimizer step"), dx.set_ylabel("perplexity difference, same seed")
    dx.set_title("paired difference: below 0 = the first mode of the pair is better", fontsize=10)
    dx.grid(alpha=0.3), dx.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def report(a, infos, judge, refs, cmd: str, t0: float) -> None:
    """Rewrite benchmarks/results/<name>.{json,md,png} from the runs finished so far."""
    done = [i for i in infos if "eval" in i]
    diffs = differences(done)
    sizes = (f"{len(a.seeds)} seeds x {len(a.modes)} modes ({', '.join(a.modes)}), {a.steps} steps of "
             f"{a.batch_size} x <= {a.max_length} tokens, {a.student_layers}-layer student, alignment "
             f"{a.alignment}, lr {a.lr}, precision {a.precision} (what ran: the table's column)")
    ti, s0 = judge.teacher_eval, judge.init_eval
    lines = [
        f"Command: `{cmd}`. Sizes: {sizes}. Runs finished: {len(done)} of {len(a.seeds) * len(a.modes)}. "
        f"Training wall time of the finished runs: {sum(i['wall_s'] for i in done):.0f} s; this invocation so far: "
        f"{time.time() - t0:.0f} s (finished runs are reused).",
        a.note,
        "## Paired differences (mode minus its baseline, same seed: same data order, masks, plans and "
        "validation batches)\n",
        "| comparison | metric | seeds | by seed | mean | 95% CI |\n|---|---|---|---|---|---|\n"
        + "".join(f"| {r['comparison']} | {r['metric']} | {r['seeds']} | {r['by seed']} | {r['mean']} | "
                  f"{r['95% CI']} |\n" for r in diffs),
        "95% CI: mean ± t(0.975, seeds - 1) x sample sd / sqrt(seeds), over the per-seed differences; with 3 "
        "seeds t = 4.30, so an interval excludes 0 only when the seeds agree closely.",
        f"Teacher: val. perplexity {ti['perplexity']:.1f}, top-1 {ti['top1']:.3f}. Student at initialisation "
        f"(the same for all runs): perplexity {s0['mlm']['perplexity']:.1f}, top-1 {s0['mlm']['top1']:.3f}, "
        f"IIA {s0['iia']['iia']:.3f}, cf. KL {s0['iia']['cf_kl']:.3f}.",
        f"Perplexity / top-1 / IIA / cf. KL: `iit_fast.eval` on the first {a.eval_batches} validation batches of "
        f"{a.eval_batch_size} (masks and intervention plans seeded, the same for every student). IIA: fraction "
        f"of masked tokens where the student's counterfactual top-1 equals the teacher's; cf. KL: KL(teacher || "
        f"student) at T = 1 on them (nats). Wall time: the whole train.py process (start-up, validations, "
        f"export included); tokens/s: mean over seeds of the median over steps of train.py's own count.",
    ]
    if a.downstream_steps > 0:
        d0 = next((i["downstream"] for i in done if "downstream" in i), None)
        if d0:
            lines.append(f"Downstream: `iit-fast finetune --task seq --source-task DIR` (offline: which of "
                         f"{d0['num_labels']} Debian/Python manuals a paragraph comes from; {d0['train_examples']} "
                         f"training, {d0['validation_examples']} validation paragraphs, balanced), "
                         f"{a.downstream_steps} steps of 16, lr {a.downstream_lr}, fine-tuning seed = "
                         f"distillation seed.")
        if refs:
            init = [r["accuracy"] for r in refs["init"]]
            lines.append(f"Student at initialisation, fine-tuned: accuracy {statistics.fmean(init):.3f} "
                         f"(seeds: {', '.join(f'{x:.3f}' for x in init)}; the spread is fine-tuning noise alone); "
                         f"teacher: {refs['teacher']['accuracy']:.3f}.")
    else:
        lines.append("Downstream: not run (--downstream-steps 0).")
    if a.teacher_cache:
        lines.append(cache_note(a, done))
    lines.append("Plot: left, train.py's validation perplexity during training (seeded by the run's seed: "
                 "seeds differ in their validation batches, the modes of one seed share them); right, each "
                 f"mode minus its baseline, paired by seed.\n\n![paired differences]({a.name}.png)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if done:
        plot(a, done, RESULTS / f"{a.name}.png")
    payload = {"machine": machine(), "command": cmd, "args": {k: str(v) for k, v in vars(a).items()},
               "teacher_eval": ti, "init_eval": s0, "runs": infos, "paired_differences": diffs,
               "references_downstream": refs}
    payload = json.loads(json.dumps(payload, default=str).replace(str(REPO) + "/", "")  # no path of this machine
                         .replace(str(Path.home()) + "/", "~/"))
    cols = ["mode", "seeds", "val. perplexity", "top-1", "IIA", "cf. KL", "downstream acc.", "wall time (s)",
            "tokens/s", "precision"]
    write_results(a.name, payload, per_mode(done), cols, title="Standard vs causal distillation, paired by seed",
                  notes="\n\n".join(l for l in lines if l))


def cache_note(a, done) -> str:
    """The cached sweep's wall time (cache builds included) against the online sweep's same runs."""
    builds = [json.loads(p.read_text()) for p in sorted(a.teacher_cache.glob("*/replicate_build.json"))]
    text = (f"Teacher cache: every run read the teacher's outputs from a cache (top-{a.cache_top_k}, "
            f"{a.cache_plans} plans per pair, bf16 hidden states) and ran no teacher pass; builds: "
            + "; ".join(f"`{b['command']}` {b['wall_s']:.0f} s" for b in builds) + ".")
    if not a.online_runs:
        return text
    online = {}
    for i in done:
        p = a.online_runs / f"{i['mode']}-seed{i['seed']}" / "replicate_run.json"
        if p.is_file():
            online[(i["mode"], i["seed"])] = json.loads(p.read_text())
    both = [i for i in done if (i["mode"], i["seed"]) in online]
    if not both:
        return text + " No online run to compare with."
    t_cached = sum(i["wall_s"] for i in both) + sum(b["wall_s"] for b in builds)
    t_online = sum(online[(i["mode"], i["seed"])]["wall_s"] for i in both)
    return (text + f" The same {len(both)} runs ({', '.join(sorted({i['mode'] for i in both}))}; seeds "
            f"{', '.join(str(s) for s in sorted({i['seed'] for i in both}))}): online {t_online:.0f} s of training; "
            f"cached {t_cached:.0f} s with the cache builds ({t_cached - sum(b['wall_s'] for b in builds):.0f} s "
            f"without): {t_online / t_cached:.2f}x faster as a sweep, "
            + ", ".join(f"{i['mode']} seed {i['seed']} {online[(i['mode'], i['seed'])]['wall_s'] / i['wall_s']:.2f}x"
                        for i in both) + " per run. Quality: the table's columns against the online sweep's; the cache holds the "
            "corpus's first rows (in source order), the online runs draw from all of it, so the two differ in "
            "data as well as in the top-k.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: the embedded default teacher)")
    p.add_argument("--corpus", default=None, help="load_corpus spec (default: the embedded default corpus)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="modes to train (COMPARISONS lists the pairs reported)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch (sequences) per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--alignment", default="middle", help="training alignment, also the one IIA is measured on")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="train.py --precision (auto: bf16 where its probe finds bf16 GEMMs faster)")
    p.add_argument("--eval-interval", type=int, default=20, help="steps between train.py's validations (the plot)")
    p.add_argument("--train-eval-sequences", type=int, default=80, help="validation sequences inside train.py")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches of the final evaluation")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--downstream-steps", type=int, default=200,
                   help="fine-tuning steps (batch 16) on the offline source-classification task; 0: no downstream")
    p.add_argument("--downstream-lr", type=float, default=1e-4)
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="train every run from a teacher cache in this folder (built here if absent)")
    p.add_argument("--cache-top-k", type=int, default=64)
    p.add_argument("--cache-plans", type=int, default=4)
    p.add_argument("--online-runs", type=Path, default=None,
                   help="with --teacher-cache: the online sweep's --runs-dir, for the wall-time comparison")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "replicate")
    p.add_argument("--name", default="replicate", help="results name: benchmarks/results/<name>.{json,md,png}")
    p.add_argument("--note", default="", help="a sentence for the results file (e.g. why the run was reduced)")
    a = p.parse_args(argv)
    ds_config = sweep_ds_config(a.runs_dir, a.batch_size)
    cmd = "python benchmarks/replicate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    cmd = cmd.strip().replace(str(REPO) + "/", "")
    t0 = time.time()
    judge = Judge(a)
    infos = []
    # interleaved, so a load change on a shared machine hits every mode alike; finished runs first, so that
    # every report of a continued sweep holds all of them
    todo = [(mode, seed) for seed in a.seeds for mode in a.modes]
    todo.sort(key=lambda ms: not (a.runs_dir / f"{ms[0]}-seed{ms[1]}" / "replicate_run.json").is_file())
    for mode, seed in todo:
        info = train_one(a, mode, seed, ds_config)
        infos.append(info)
        judge.evaluate(info)
        if a.downstream_steps > 0:
            judge.downstream(info)
        report(a, infos, judge, None, cmd, t0)   # the figures so far: a stop loses nothing
    refs = judge.references(a.seeds) if a.downstream_steps > 0 else None
    report(a, infos, judge, refs, cmd, t0)
    print((RESULTS / f"{a.name}.md").read_text())


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
