"""Does causal distillation beat standard distillation? The paper's claim, checked at small scale.

From one teacher (default: the embedded default teacher) and the same student initialisation (the
teacher's embeddings, head and an evenly spread subset of its blocks), on the same data for the same
number of steps, train
- **standard** distillation: `--mode standard --w_iit 0` (ce + mlm + cos, 0.25 each), and
- **causal** distillation (DIITO): `--mode fast` with the published weights (ce + mlm + cos + iit),
for several seeds each (seed: data order, MLM masks, intervention plans, dropout), with
`iit_fast/train.py` as a subprocess, one run after the other. Then evaluate every exported student with
`iit_fast.eval` on the same validation batches (rows and masks fixed by `eval.EVAL_SEED`): MLM perplexity,
top-1, and IIA / counterfactual KL against the teacher under the training alignment (plans fixed by
`eval.IIA_SEED`). Then fine-tune every student, the student at initialisation and the teacher on an
offline downstream task (`iit_fast.finetune.build_source_task`: which of five manuals a paragraph comes
from; hub tasks such as GLUE cannot be reached here). Writes benchmarks/results/replicate.{json,md,png}.

    python benchmarks/replicate.py                          # the full comparison: ~1 h on 2 quiet cores
    python benchmarks/replicate.py --steps 30 --max-length 64 --eval-interval 10   # a reduced one
    python benchmarks/replicate.py --teacher DIR --corpus FILES --seeds 0 1 2 --runs-dir runs/replicate

Runs already finished under --runs-dir (a `student/` folder and metrics.jsonl) are reused, not retrained,
so an interrupted comparison continues where it stopped (use a fresh --runs-dir after changing flags).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402

MODES = {  # name -> train.py flags
    "standard": ["--mode", "standard", "--w_iit", "0"],
    "causal": ["--mode", "fast"],
}


def train_flags(a, mode: str, seed: int, out: Path, ds_config: Path) -> list[str]:
    f = ["--deepspeed_config", str(ds_config), "--student_layers", str(a.student_layers),
         "--max_length", str(a.max_length), "--max_steps", str(a.steps), "--eval_interval", str(a.eval_interval),
         "--eval_sequences", str(a.train_eval_sequences), "--seed", str(seed), "--out_dir", str(out),
         "--alignment", a.alignment, "--lr", str(a.lr), "--warmup_steps", str(a.warmup_steps), "--plots", "false"]
    if a.teacher:
        f += ["--teacher", str(a.teacher)]
    if a.corpus:
        f += ["--corpus", a.corpus]
    if a.cache_dir:
        f += ["--cache_dir", str(a.cache_dir)]
    return f + MODES[mode]


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
    print(f"[replicate] {mode} seed {seed}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    log = a.runs_dir / f"{mode}-seed{seed}.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"error: training {mode} seed {seed} failed (exit {rc}); see {log}:\n"
                         + log.read_text()[-3000:])
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    tps = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    # recorded relative to the repository: no path of this machine in the results
    shown = ["python", "iit_fast/train.py"] + [c.replace(str(REPO) + "/", "") for c in cmd[2:]]
    info = {"mode": mode, "seed": seed, "out": str(out), "command": " ".join(shown), "wall_s": wall,
            "train_tokens": steps[-1]["tokens"], "tokens_per_s_median": statistics.median(tps),
            "val_curve": [(r["step"], r["val_perplexity"]) for r in recs if "val_perplexity" in r],
            "teacher_val_perplexity": next((r["teacher_val_perplexity"] for r in recs
                                            if "teacher_val_perplexity" in r), None),
            "final_loss_terms": {k: steps[-1][k] for k in ("loss", "ce", "mlm", "cos", "iit") if k in steps[-1]}}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"[replicate] {mode} seed {seed}: {wall:.0f} s, {info['tokens_per_s_median']:.0f} tok/s, "
          f"val ppl {info['val_curve'][-1][1]:.1f}", flush=True)
    return info


def evaluate_runs(a, infos: list[dict]) -> None:
    from iit_fast.eval import interchange_accuracy, lm_metrics, load_validation, parse_alignment
    from iit_fast.models import IntervenableLM, init_student_from_teacher, load_model
    from iit_fast.teacher import default_teacher_path
    teacher_dir = a.teacher or default_teacher_path(a.cache_dir)
    ti, tok = load_model(teacher_dir, arg="teacher")  # a masked or a causal LM: its kind decides the metrics
    n = a.eval_batches or None
    batches = load_validation(tok, a.corpus, a.eval_batch_size, a.max_length, a.cache_dir, kind=ti.kind,
                              max_batches=n)
    a.teacher_eval = lm_metrics(ti, batches)
    for info in infos:
        si, _ = load_model(Path(info["out"]) / "student", kind=ti.kind, arg="student")
        pairs = parse_alignment(a.alignment, ti.num_layers, si.num_layers)
        info["eval"] = {"mlm": lm_metrics(si, batches), "iia": interchange_accuracy(ti, si, batches, pairs)}
        e = info["eval"]
        print(f"[replicate] eval {info['mode']} seed {info['seed']}: ppl {e['mlm']['perplexity']:.1f} "
              f"top-1 {e['mlm']['top1']:.3f} IIA {e['iia']['iia']:.3f} cf-KL {e['iia']['cf_kl']:.3f}", flush=True)
    # the starting point: the student before any training (the same for every run)
    s0 = IntervenableLM(init_student_from_teacher(ti.model, infos[0]["student_layers"])).eval()
    a.init_eval = {"mlm": lm_metrics(s0, batches),
                   "iia": interchange_accuracy(ti, s0, batches,
                                               parse_alignment(a.alignment, ti.num_layers, s0.num_layers))}


def finetune_cached(a, model_dir: Path, seed: int, out_json: Path, task_files) -> dict:
    """One downstream fine-tune (the offline source task), cached in out_json so a re-run reuses it."""
    from iit_fast.finetune import finetune
    params = {"model": str(model_dir), "seed": seed, "steps": a.downstream_steps, "lr": a.downstream_lr}
    if out_json.is_file():
        res = json.loads(out_json.read_text())
        if res.get("params") == params:
            return res
    res = finetune(str(model_dir), "seq", *task_files, max_steps=a.downstream_steps, batch_size=16,
                   lr=a.downstream_lr, max_length=a.max_length, seed=seed, progress=False)
    res["params"] = params
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    print(f"[replicate] downstream {model_dir}: accuracy {res['accuracy']:.3f} macro F1 {res['macro_f1']:.3f} "
          f"({res['seconds']:.0f} s)", flush=True)
    return res


def downstream_runs(a, infos: list[dict]) -> None:
    """Fine-tune every student (seed = its distillation seed), the student at initialisation (every seed:
    the fine-tuning noise floor) and the teacher (seed 0) on the offline source-classification task."""
    from iit_fast.finetune import build_source_task
    from iit_fast.models import init_student_from_teacher, load_model
    from iit_fast.teacher import default_teacher_path
    task_files = build_source_task(a.runs_dir / "source-task")
    teacher_dir = Path(a.teacher or default_teacher_path(a.cache_dir))
    init_dir = a.runs_dir / "init-student"
    if not (init_dir / "config.json").is_file():
        t, tok = load_model(teacher_dir, kind="masked", arg="teacher")
        init_student_from_teacher(t.model, a.student_layers).save_pretrained(init_dir)
        tok.save_pretrained(init_dir)
    for info in infos:
        out = Path(info["out"])
        info["downstream"] = finetune_cached(a, out / "student", info["seed"], out / "downstream.json", task_files)
    a.init_downstream = [finetune_cached(a, init_dir, sd, init_dir / f"downstream-seed{sd}.json", task_files)
                         for sd in a.seeds]
    a.teacher_downstream = finetune_cached(a, teacher_dir, 0, a.runs_dir / "teacher-downstream.json", task_files)


def mean_sd(xs):
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(a, infos):
    rows = []
    for mode in MODES:
        runs = [i for i in infos if i["mode"] == mode]
        cols = {"val. perplexity": [r["eval"]["mlm"]["perplexity"] for r in runs],
                "top-1": [r["eval"]["mlm"]["top1"] for r in runs],
                "IIA": [r["eval"]["iia"]["iia"] for r in runs],
                "cf. KL": [r["eval"]["iia"]["cf_kl"] for r in runs],
                "wall time (s)": [r["wall_s"] for r in runs],
                "tokens/s": [r["tokens_per_s_median"] for r in runs]}
        if all("downstream" in r for r in runs):
            cols["downstream acc."] = [r["downstream"]["accuracy"] for r in runs]
            cols["downstream macro F1"] = [r["downstream"]["macro_f1"] for r in runs]
        row = {"distillation": mode, "seeds": len(runs)}
        for k, xs in cols.items():
            m, sd = mean_sd(xs)
            fmt = "{:.1f} ± {:.1f}" if k in ("val. perplexity", "wall time (s)") else \
                "{:.0f} ± {:.0f}" if k == "tokens/s" else "{:.3f} ± {:.3f}"
            row[k] = fmt.format(m, sd)
            row[k + " (per seed)"] = [round(x, 4) for x in xs]
        rows.append(row)
    return rows


def downstream_note(a, infos, pairs) -> str:
    d0 = infos[0]["downstream"]
    init_acc = [r["accuracy"] for r in a.init_downstream]
    m, sd = mean_sd(init_acc)
    return (f"Downstream: `iit-fast finetune --task seq --source-task DIR` (offline: which of "
            f"{d0['num_labels']} Debian/Python manuals a paragraph comes from; {d0['train_examples']} training, "
            f"{d0['validation_examples']} validation paragraphs, balanced), {a.downstream_steps} steps of 16, lr "
            f"{a.downstream_lr}, fine-tuning seed = distillation seed. Paired by seed, causal minus standard "
            f"accuracy: " + ", ".join(f"{c['downstream']['accuracy'] - s['downstream']['accuracy']:+.3f}"
                                      for s, c in pairs)
            + f". Student at initialisation: accuracy {m:.3f} ± {sd:.3f} over the same seeds (the spread is "
            f"fine-tuning noise alone); teacher: {a.teacher_downstream['accuracy']:.3f} (macro F1 "
            f"{a.teacher_downstream['macro_f1']:.3f}).")


def plot(a, infos, path: Path):
    """Left: each mode's validation perplexity during training (mean over seeds, band = min..max; the band
    is mostly the seeds' different validation masks). Right: causal minus standard, paired by seed (same
    data, masks and validation batches), which is what the comparison is about."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"standard": "tab:blue", "causal": "tab:red"}
    for mode in MODES:
        runs = [i for i in infos if i["mode"] == mode]
        steps = [s for s, _ in runs[0]["val_curve"]]
        ys = [[dict(r["val_curve"])[s] for r in runs] for s in steps]
        mean = [statistics.fmean(y) for y in ys]
        ax.plot(steps, mean, marker="o", color=colors[mode],
                label=f"{mode} (mean of {len(runs)} seeds; band = min..max)")
        ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=colors[mode], alpha=0.2)
    tv = infos[0].get("teacher_val_perplexity")
    if tv:
        ax.axhline(tv, color="gray", ls="--", label="teacher (seed 0's validation batches)")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("validation perplexity (train.py's validation)")
    ax.set_yscale("log"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title(f"standard vs causal distillation, {a.student_layers}-layer student, {a.steps} steps", fontsize=10)
    for seed in sorted({i["seed"] for i in infos}):
        std = dict(next(i for i in infos if i["mode"] == "standard" and i["seed"] == seed)["val_curve"])
        cau = dict(next(i for i in infos if i["mode"] == "causal" and i["seed"] == seed)["val_curve"])
        steps = sorted(set(std) & set(cau))
        dx.plot(steps, [cau[s] - std[s] for s in steps], marker=".", label=f"seed {seed}")
    dx.axhline(0, color="gray", lw=1)
    dx.set_xlabel("optimizer step"), dx.set_ylabel("causal - standard perplexity (same seed)")
    dx.set_title("paired difference: below 0 = causal better", fontsize=10)
    dx.grid(alpha=0.3), dx.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: the embedded default teacher)")
    p.add_argument("--corpus", default=None, help="load_corpus spec (default: the embedded default corpus)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (150: ~5 min standard, ~9 min causal on 2 quiet cores)")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch (sequences) per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--alignment", default="middle", help="training alignment, also the one IIA is measured on")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--eval-interval", type=int, default=15, help="steps between train.py's validations (the plot)")
    p.add_argument("--train-eval-sequences", type=int, default=80, help="validation sequences inside train.py")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches of the final evaluation")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--downstream-steps", type=int, default=200,
                   help="fine-tuning steps (batch 16) on the offline source-classification task; 0: no downstream")
    p.add_argument("--downstream-lr", type=float, default=1e-4)
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "replicate")
    p.add_argument("--name", default="replicate", help="results name: benchmarks/results/<name>.{json,md,png}")
    p.add_argument("--note", default="", help="a sentence for the results file (e.g. why the run was reduced)")
    a = p.parse_args(argv)
    a.runs_dir.mkdir(parents=True, exist_ok=True)
    ds_config = a.runs_dir / f"ds-micro{a.batch_size}.json"
    ds_config.write_text(json.dumps({"train_micro_batch_size_per_gpu": a.batch_size, "gradient_accumulation_steps": 1,
                                     "gradient_clipping": 1.0, "steps_per_print": 10 ** 6,
                                     "zero_optimization": {"stage": 2, "overlap_comm": False,
                                                           "contiguous_gradients": True}}, indent=1))
    t0 = time.time()
    infos = []
    for seed in a.seeds:            # interleaved, so a load change on a shared machine hits both modes alike
        for mode in MODES:
            info = train_one(a, mode, seed, ds_config)
            info["student_layers"] = a.student_layers
            infos.append(info)
    evaluate_runs(a, infos)
    if a.downstream_steps > 0:
        downstream_runs(a, infos)
    rows = summarise(a, infos)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(a, infos, RESULTS / f"{a.name}.png")
    import shlex
    cmd = "python benchmarks/replicate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    ti = a.teacher_eval
    sizes = (f"{len(a.seeds)} seeds x 2 modes, {a.steps} steps of {a.batch_size} x <= {a.max_length} tokens, "
             f"{a.student_layers}-layer student, alignment {a.alignment}, lr {a.lr}")
    pairs = [(next(i for i in infos if i["mode"] == "standard" and i["seed"] == sd),
              next(i for i in infos if i["mode"] == "causal" and i["seed"] == sd)) for sd in a.seeds]
    notes = "\n".join([
        f"Command: `{cmd.strip()}`. Sizes: {sizes}. Training wall time, all runs: {sum(i['wall_s'] for i in infos):.0f} s; this invocation: {time.time() - t0:.0f} s (finished runs are reused).",
        f"{a.note}" if a.note else "",
        "Paired by seed (same data order, masks and plans in both modes), causal minus standard: perplexity "
        + ", ".join(f"{c['eval']['mlm']['perplexity'] - s['eval']['mlm']['perplexity']:+.1f}" for s, c in pairs)
        + "; IIA " + ", ".join(f"{c['eval']['iia']['iia'] - s['eval']['iia']['iia']:+.3f}" for s, c in pairs)
        + "; cf. KL " + ", ".join(f"{c['eval']['iia']['cf_kl'] - s['eval']['iia']['cf_kl']:+.3f}" for s, c in pairs)
        + ".",
        f"Teacher: val. perplexity {ti['perplexity']:.1f}, top-1 {ti['top1']:.3f}. Student at initialisation "
        f"(before training, same for all runs): perplexity {a.init_eval['mlm']['perplexity']:.1f}, top-1 "
        f"{a.init_eval['mlm']['top1']:.3f}, IIA {a.init_eval['iia']['iia']:.3f}, cf. KL "
        f"{a.init_eval['iia']['cf_kl']:.3f}.",
        f"Perplexity / top-1 / IIA / cf. KL: `iit_fast.eval` on the first {a.eval_batches} validation batches of "
        f"{a.eval_batch_size} (masks and intervention plans seeded, the same for every student; "
        f"{infos[0]['eval']['mlm']['tokens']} masked tokens). IIA: fraction of masked tokens where the student's "
        f"counterfactual top-1 equals the teacher's; cf. KL: KL(teacher || student) at T = 1 on them (nats). "
        f"Mean ± sample standard deviation over seeds. Wall time: the whole train.py process (start-up, "
        f"validations, export included); tokens/s: median over steps of train.py's own count (real tokens).",
        "Plot: train.py's validation perplexity during training (its masks are seeded by the run's seed, so "
        "seeds differ in their validation batches; the two modes of one seed share them); right: causal minus "
        "standard, paired by seed.",
        downstream_note(a, infos, pairs) if a.downstream_steps > 0 else "Downstream: not run (--downstream-steps 0).",
    ])
    payload = {"machine": machine(), "command": cmd.strip(), "args": {k: str(v) for k, v in vars(a).items()
                                                                     if k not in ("teacher_eval", "init_eval",
                                                                                  "init_downstream",
                                                                                  "teacher_downstream")},
               "teacher_eval": ti, "init_eval": a.init_eval, "runs": infos,
               "init_downstream": getattr(a, "init_downstream", None),
               "teacher_downstream": getattr(a, "teacher_downstream", None)}
    cols = ["distillation", "seeds", "val. perplexity", "top-1", "IIA", "cf. KL", "wall time (s)", "tokens/s"]
    if a.downstream_steps > 0:
        cols += ["downstream acc.", "downstream macro F1"]
    write_results(a.name, payload, rows, cols, title="Standard vs causal distillation (the paper's claim, small scale)",
                  notes=notes + f"\n\n![validation perplexity]({a.name}.png)")
    print((RESULTS / f"{a.name}.md").read_text())


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
