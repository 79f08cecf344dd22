"""Before/after timing of a code change that should not change speed (issue 21's restructure): the small
step shape (benchmarks/step.py) and the main job's throughput (benchmarks/train_throughput.py) run in two
checkouts, interleaved in one run, so both see the same machine load.

    git worktree add --detach ../before 9283255 && git worktree add --detach ../after <commit>
    python benchmarks/structure_before_after.py --before ../before --after ../after --rounds 3

Each tree runs its own scripts with cwd = the tree and PYTHONPATH = the tree (so `import iit_fast` is that
tree's package, checked before timing), and its own TORCH_EXTENSIONS_DIR (<tree>/.cache/torch_extensions):
torch's JIT cache is keyed by library name, so one shared cache would rebuild, or load the other tree's
native kernels. The native libraries are built before the first timed round. Rounds alternate the order
(before, after | after, before | ...) so a drift of the machine's load does not favour one tree.
Noise = the spread (max/min) between rounds of one tree; a ratio is within noise when the after/before ratio
of medians lies inside the band both trees' own spreads allow.
Writes benchmarks/results/structure-before-after.{json,md} (unless --no-write).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_results  # noqa: E402

# a row of step.py's printout: "  small  all  fp32  [off]  fast  403.6 ms/step ... peak 775 MB  [ops paths]"
ROW = re.compile(r"^\s+(\S+)\s+(\S+)\s+(\S+)\s+(?:\S+\s+)?(naive|fast|standard)\s+([\d.]+)\s+ms/step.*MB\s+(.*)$")
LOG = Path(__file__).resolve().parent.parent / "runs" / "structure-before-after.log"  # children's stdout, to check the parse


THREADS: int | None = None   # --threads: OMP_NUM_THREADS of every child (None: the benchmarks' own default)
CPU_CLOCK: Path | None = None   # --clock cpu: a folder holding the sitecustomize below, first on PYTHONPATH

# Imported by every Python process of a run (step.py's workers, train.py's rank under the deepspeed launcher):
# both trees' benchmarks and train.py time with time.perf_counter(), looked up at each call, so swapping it
# for the process's CPU clock turns every figure into CPU seconds, which other processes' load on a shared
# machine disturbs far less than wall time (with one thread: no OpenMP barrier waiting for a descheduled peer).
SITECUSTOMIZE = """import time
time.perf_counter = time.process_time   # benchmarks/structure_before_after.py --clock cpu
"""


def tree_env(tree: Path) -> dict:
    path = ([str(CPU_CLOCK)] if CPU_CLOCK else []) + [str(tree)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "TORCH_EXTENSIONS_DIR": str(tree / ".cache" / "torch_extensions")}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def sh(tree: Path, args: list[str]) -> str:
    """Run `python <args>` in `tree`; its stdout (stderr on failure)."""
    res = subprocess.run([sys.executable] + args, cwd=tree, env=tree_env(tree), capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {tree.name}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    with LOG.open("a") as f:
        f.write(f"==== {tree.name}: {' '.join(args)}\n{res.stdout}\n")
    return res.stdout


def prepare(tree: Path) -> dict:
    """Check which package the tree imports and build its native libraries (untimed)."""
    where = sh(tree, ["-c", "import iit_fast; print(iit_fast.__file__)"]).strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"error: {tree} imports iit_fast from {where}, not from the tree")
    built = sh(tree, ["-m", "iit_fast.ops._native"]).strip()
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"[{tree.name}] {commit}{' (dirty)' if dirty else ''} imports {where}; native: {built}", flush=True)
    return {"commit": commit, "dirty": bool(dirty)}


def step_times(tree: Path, repeats: int, precision: str) -> dict:
    """ms/step per mode of the small shape in `precision` (logits on all tokens), and fast/naive."""
    out = sh(tree, ["benchmarks/step.py", "--shapes", "small", "--precisions", precision, "--logit-tokens", "all",
                    "--repeats", str(repeats), "--no-write"])
    rows = [m for m in map(ROW.match, out.splitlines()) if m]
    ms = {m.group(4): float(m.group(5)) for m in rows}
    print(f"[{tree.name}] ops paths: " + "; ".join(f"{m.group(4)} {m.group(6)}" for m in rows), flush=True)
    if not {"naive", "fast", "standard"} <= ms.keys():
        raise RuntimeError(f"step.py output not understood in {tree.name}:\n{out[-3000:]}")
    return {**{f"{k} ms": v for k, v in ms.items()}, "fast/naive speedup": ms["naive"] / ms["fast"],
            "fast/standard time": ms["fast"] / ms["standard"]}


def train_tps(tree: Path, steps: int) -> dict:
    out = sh(tree, ["benchmarks/train_throughput.py", "--ranks", "1", "--steps", str(steps), "--no-write"])
    row = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    # the median step and the best step (the least disturbed by other processes on a shared machine)
    return {"train tokens/s": row["tokens_per_s"], "train tokens/s (best step)": row["tokens_per_s_max"]}


def summarise(samples: dict[str, list[dict]], metric: str) -> dict:
    b = [s[metric] for s in samples["before"]]
    a = [s[metric] for s in samples["after"]]
    mb, ma = statistics.median(b), statistics.median(a)
    # noise: the larger of the two trees' own between-round spreads (max/min - 1)
    noise = max(max(b) / min(b), max(a) / min(a)) - 1
    ratio = ma / mb
    best = max(a) / max(b) if "tokens/s" in metric or "speedup" in metric else min(a) / min(b)
    return {"metric": metric, "before median": mb, "before min": min(b), "before max": max(b),
            "after median": ma, "after min": min(a), "after max": max(a),
            "after/before": ratio, "after/before (best rounds)": best,
            "ratio range": f"{min(a) / max(b):.3f}-{max(a) / min(b):.3f}", "noise (own spread)": noise,
            "verdict": "within noise" if abs(ratio - 1) <= noise else "outside noise"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path, help="checkout of the commit before the change")
    p.add_argument("--after", required=True, type=Path, help="checkout of the commit after the change")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--step-repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=12, help="0: no train job")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "bf16w"), help="step.py's precision")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: unset, "
                   "the benchmarks use every core); 1 resists other processes' load better")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: every timing in CPU seconds of its process (use with --threads 1 on a shared machine)")
    p.add_argument("--name", default="structure-before-after", help="results file name")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    for name, t in (("--before", a.before), ("--after", a.after)):
        if not (t / "iit_fast" / "__init__.py").is_file():
            p.error(f"{name}: {t} is not a checkout of iit_fast (no iit_fast/__init__.py)")
    if a.rounds < 1 or a.step_repeats < 1 or (a.train_steps and a.train_steps < 3):
        p.error("--rounds and --step-repeats must be >= 1, --train-steps 0 or >= 3")
    global THREADS, CPU_CLOCK
    THREADS = a.threads
    if a.clock == "cpu":
        CPU_CLOCK = Path(tempfile.mkdtemp(prefix="cpu_clock_"))
        atexit.register(shutil.rmtree, CPU_CLOCK, ignore_errors=True)
        (CPU_CLOCK / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    LOG.parent.mkdir(exist_ok=True)
    LOG.write_text("")
    load_start, t_start = os.getloadavg(), time.time()
    info = {k: prepare(t) for k, t in trees.items()}
    samples = {"before": [], "after": []}
    for r in range(a.rounds):
        for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
            t0 = time.time()
            s = {"round": r + 1, **step_times(trees[k], a.step_repeats, a.precision),
                 **(train_tps(trees[k], a.train_steps) if a.train_steps else {}),
                 "load_1min": round(os.getloadavg()[0], 2)}
            samples[k].append(s)
            shown = {x: round(v, 3) if isinstance(v, float) else v for x, v in s.items()}
            print(f"round {r + 1} {k}: {json.dumps(shown)}"
                  f" ({time.time() - t0:.0f} s)", flush=True)
    load_end = os.getloadavg()
    metrics = ["naive ms", "fast ms", "standard ms", "fast/naive speedup"] + (
        ["train tokens/s", "train tokens/s (best step)"] if a.train_steps else [])
    rows = [summarise(samples, m) for m in metrics]
    for r in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    if a.no_write:
        return
    cmd = (f"python benchmarks/structure_before_after.py --before <before worktree> --after <after worktree> "
           f"--rounds {a.rounds} --step-repeats {a.step_repeats} --train-steps {a.train_steps}"
           + (f" --precision {a.precision}" if a.precision != "fp32" else "")
           + (f" --threads {a.threads}" if a.threads else "") + (" --clock cpu" if a.clock == "cpu" else "")
           + (f" --name {a.name}" if a.name != p.get_default("name") else ""))
    m = machine()
    m["allocator"] = ("step.py: jemalloc preloaded in every worker when found (benchmarks/step.py worker_env); "
                      "train.py: glibc malloc tuned in-process (iit_fast/allocator.py); the driver: " + m["allocator"])
    payload = {"machine": m, "omp_num_threads": a.threads or "unset (all cores)",
               "clock": "process CPU time (time.perf_counter swapped for time.process_time in every child)"
               if a.clock == "cpu" else "wall (time.perf_counter)",
               "commits": {k: v["commit"] for k, v in info.items()},
               "shapes": {"step": f"small, {a.precision}, logits on all tokens, --repeats {a.step_repeats}",
                          "train": f"default job (embedded MiniLM teacher, default corpus, --precision auto), 1 rank, "
                                   f"{a.train_steps} steps" if a.train_steps else "not run"},
               "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in load_end],
               "minutes": round((time.time() - t_start) / 60, 1), "command": cmd, "samples": samples}
    notes = (f"Before = {info['before']['commit']} (the tree before issue 21's restructure), after = "
             f"{info['after']['commit']}, each a git worktree with its own native-kernel build, run with the same "
             f"python environment, interleaved in one run of {a.rounds} rounds (order alternating: before, after | "
             f"after, before | ...). Per round and tree: `benchmarks/step.py --shapes small --precisions {a.precision} "
             f"--logit-tokens all --repeats {a.step_repeats} --no-write` (ms/step per mode: each the median of its "
             f"repeats in a fresh process)"
             + (f" and `benchmarks/train_throughput.py --ranks 1 --steps {a.train_steps} --no-write` (median "
                f"tokens/s of the steps after the first; best step beside it)" if a.train_steps else "")
             + ". Columns: median / min / max over rounds; after/before = "
             f"ratio of medians, its range = worst-case ratio of single rounds; noise = the larger tree's own "
             f"between-round spread (max/min - 1); 'within noise' when |after/before - 1| <= noise; "
             f"after/before (best rounds) = the ratio of each tree's best round (least disturbed by other "
             f"processes). OMP_NUM_THREADS: {a.threads or 'unset (all cores)'}. Clock: {payload['clock']}"
             f"{' (ms are CPU ms, tokens/s are tokens per CPU second of the rank)' if a.clock == 'cpu' else ''}.\n\n"
             f"Shared machine: load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in load_start)} at the start, "
             f"{', '.join(f'{x:.2f}' for x in load_end)} at the end ({payload['minutes']} min), "
             f"on {m['cores']} cores shared with other agents' jobs.\n\nReproduce: `{cmd}`")
    write_results(a.name, payload, rows,
                  ["metric", "before median", "before min", "before max", "after median", "after min", "after max",
                   "after/before", "after/before (best rounds)", "ratio range", "noise (own spread)", "verdict"],
                  title="Issue 21 restructure: before/after timing", notes=notes)


if __name__ == "__main__":
    main()
