"""Where built things live (``DEFAULT_CACHE``) and how a finished folder is published into it.

The corpus, the tokenized corpus, the teacher and the fine-tuning source task are all built into a
temporary folder and then published with ``publish_folder``, so a folder that exists is complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import warnings
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("IIT_FAST_CACHE", "~/.cache/iit_fast")).expanduser()
# the default teachers' folders (iit_fast/teacher.py builds them): found here without importing the builder
DEFAULT_TEACHER_DIRNAME = "teacher-minilm-l6-mlm"
GPT2_TEACHER_DIRNAME = "teacher-gpt2-l6-bpe"
TEACHER_DIRNAMES = {"minilm": DEFAULT_TEACHER_DIRNAME, "gpt2": GPT2_TEACHER_DIRNAME}


def default_teacher_dir(cache_dir=None, family: str = "minilm") -> Path:
    """Where the default teacher of `family` ("minilm": the MLM teacher, "gpt2": the causal one) is cached."""
    if family not in TEACHER_DIRNAMES:
        raise ValueError(f"family must be one of {sorted(TEACHER_DIRNAMES)}, got {family!r}")
    return Path(cache_dir or DEFAULT_CACHE) / TEACHER_DIRNAMES[family]


def built_default_teacher(cache_dir=None, family: str = "minilm") -> Path:
    """The default teacher's folder of `family` when it is built (a build publishes the folder whole, with its
    metrics.json); else a FileNotFoundError that says how to build it."""
    out = default_teacher_dir(cache_dir, family)
    if not (out / "metrics.json").is_file():
        raise FileNotFoundError(f"teacher: the default {family} teacher {out} is not built; expected it there "
                                f"(build it with `python -m iit_fast.teacher build --family {family}`)")
    capped = time_capped_phases(json.loads((out / "metrics.json").read_text()))
    if capped:  # a build on a slow or busy machine: reused, but not the model the fixed recipe makes
        warnings.warn(f"teacher: the default {family} teacher {out} was stopped by its build's time cap "
                      f"({'; '.join(capped)}), so it is weaker than the recipe's fixed steps make it; rebuild it "
                      f"with `python -m iit_fast.teacher build --family {family} --force` (a larger "
                      f"--max-adapt-minutes if the machine is slow)", stacklevel=2)
    return out


def time_capped_phases(metrics: dict) -> list[str]:
    """The training phases of a teacher build's metrics.json that its time cap stopped: "<phase>: <done> of
    <planned> steps" (the planned count where the metrics hold it)."""
    out = []
    for name, phase in metrics.items():
        if isinstance(phase, dict) and phase.get("stopped_by_time_cap"):
            planned = metrics.get("steps") if name == "train_phase" else metrics.get(name.replace("_phase", "_steps"))
            out.append(f"{name}: {phase.get('steps')}" + (f" of {planned} steps" if planned else " steps"))
    return out


def publish_folder(tmp: Path, final: Path, replace: bool) -> None:
    """Move the finished folder ``tmp`` to ``final`` with one rename, so a folder that exists is complete.
    With ``replace=False`` a ``final`` that exists already (another rank or a concurrent run built the same
    thing first) is kept and ``tmp`` dropped: removing it could pull files from under a process that is
    reading it. With ``replace=True`` an old ``final`` is removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # final exists (not empty): someone else published first
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def cache_lock(cache_dir=None):
    """One process at a time builds the embedded defaults and tokenizes (the others wait, then find them
    built). A file lock, not a collective: it holds across a build of many minutes, and the kernel releases
    it if its holder dies."""
    root = Path(cache_dir or DEFAULT_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
