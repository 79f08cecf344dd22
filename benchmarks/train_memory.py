"""The default run's training-phase memory when its teacher is built on first use (issue 27, item 5).

    python benchmarks/train_memory.py [--adapt-steps 10] [--max-steps 5] [--modes inprocess-notrim,prebuilt]
                                      [--root DIR]   # keep the builds and runs there; a finished run is reused

The default run builds the embedded teacher on first use (its own training run: tokenizing the default
corpus, a head fit, whole-model MLM steps at 32 x 128). Four ways, each in fresh processes, then the same
short default run (`iit_fast/train.py`, embedded corpus, ZeRO-2, 3-layer student), whose resident memory
(RSS, `memory_mb` of every metrics line) is the training-phase figure:
- "built in this process, no trim": the old way (the allocator tuned to keep freed memory before the
  build, the run in the same process; `release_free_memory` disabled);
- "built in this process, then trimmed": the same with malloc_trim(0) after preparing (`allocator.
  release_free_memory`, what train.py does now);
- "prebuilt": the teacher already there (the reference: the goal is <= 2x its figure). This is also the
  figure of what train.py does now (`prepare.default_teacher_apart`: the build runs in a child process, and
  the parent, after waiting for it, does exactly the prebuilt run's work), so it is not run twice.
The builds use fewer whole-model steps than the real one (`--adapt-steps`, default 10 of 200): the memory
of a step does not grow with their number. Writes benchmarks/results/train-memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import machine, write_results  # noqa: E402

# one process: optionally build the teacher here (allocator tuned first, as train.py once did), then train
DRIVER = """
import json, sys
mode, cache, argv, adapt = sys.argv[1], sys.argv[2], sys.argv[4:], int(sys.argv[3])
import iit_fast.train as t
from iit_fast.allocator import tune_malloc
from iit_fast.teacher import build_default_teacher
if mode.startswith("inprocess"):
    tune_malloc()
    path = build_default_teacher(cache, adapt_steps=adapt, eval_batches=2, progress=False)
    if mode == "inprocess-notrim":
        t.release_free_memory = lambda: False
    argv += ["--teacher", str(path)]
t.main(argv)
"""


def run(mode: str, cache: Path, out: Path, a) -> dict:
    argv = ["--cache_dir", str(cache), "--out_dir", str(out), "--max_steps", str(a.max_steps), "--eval_interval",
            "0", "--eval_sequences", "16", "--plots", "false", "--deepspeed_config", "ds_configs/zero2.json",
            "--precision", "fp32"]
    done = out / "metrics.jsonl"
    if done.is_file() and sum('"loss"' in l for l in done.read_text().splitlines()) >= a.max_steps:
        return rss_of(mode, done)  # a finished run of an earlier invocation (--root)
    if mode == "prebuilt":
        from iit_fast.teacher import default_teacher_dir
        argv += ["--teacher", str(default_teacher_dir(cache))]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", DRIVER, mode, str(cache), str(a.adapt_steps)] + argv, cwd=REPO,
                       env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return rss_of(mode, out / "metrics.jsonl")


def rss_of(mode: str, metrics: Path) -> dict:
    steps = [json.loads(l) for l in metrics.read_text().splitlines()]
    rss = [s["memory_mb"] for s in steps if "memory_mb" in s]
    return {"teacher": mode, "training RSS max (MiB)": round(max(rss)), "training RSS last (MiB)": round(rss[-1])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapt-steps", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--modes", default="inprocess-notrim,inprocess-trim,prebuilt")
    p.add_argument("--root", type=Path, default=None, help="keep builds and runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    assert modes[-1] == "prebuilt" and "inprocess-notrim" in modes, "prebuilt reuses the first in-process build"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = a.root or Path(tmp)
        for mode in modes[:-1]:
            rows.append(run(mode, d / mode, d / f"out-{mode}", a))           # each builds in its own cache
        rows.append(run("prebuilt", d / "inprocess-notrim", d / "out-prebuilt", a))
    names = {"inprocess-notrim": "built in this process, no trim (before)",
             "inprocess-trim": "built in this process, then malloc_trim",
             "prebuilt": "prebuilt; = built in a child process (now)"}
    ref = rows[-1]["training RSS max (MiB)"]
    for r in rows:
        r["vs prebuilt"] = round(r["training RSS max (MiB)"] / ref, 2)
        r["teacher"] = names[r["teacher"]]
    notes = (f"The default run (embedded corpus, 3-layer student, ZeRO-2, fp32, {a.max_steps} steps) after its "
             f"teacher was built with {a.adapt_steps} whole-model steps (the real build: 200; a step's memory does "
             "not depend on their number). RSS on CPU (`memory_mb` of the metrics lines). The machine was shared "
             "with other jobs (memory figures are not affected). The runs tune glibc as train.py does "
             "(allocator.tune_malloc: freed memory kept); the allocator named above is the benchmark's own process. "
             f"Modes run: {a.modes} (the in-process build with malloc_trim afterwards is another build of ~30 min "
             "on a shared 2-core machine; run it with the default --modes).")
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
    notes += f" CPU {'with' if amx else 'without'} AMX."
    write_results("train-memory", {"machine": machine(), "args": {k: str(v) if k == "root" else v for k, v
                                                                   in vars(a).items() if k != "root"}}, rows,
                  title="The default run's training-phase memory, by where its teacher was built", notes=notes)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
