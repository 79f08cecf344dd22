"""The run's folder (`--out_dir`): when it may be used, and making it.

A run never overwrites another one, and a folder is never a trap: every refusal names a way out that works.
- new or empty: a new run;
- a run of this config (train_config.json, the same fields but those in RESUME_MAY_CHANGE) with an intact
  checkpoint: refused without --resume ("pass --resume to continue it"), continued with it;
- a run of this config with no intact checkpoint (it died before its first save: kill -9, out of memory, a
  dead rank, a full disk; or every checkpoint is damaged): started again from step 0 in place, with or
  without --resume, saying so (its metrics.jsonl and plots are replaced; damaged tags are kept, new tags
  take other names);
- a run of another config: refused, naming the fields that differ; with no checkpoint it can be removed;
- files that are not a run: refused ("choose another --out_dir");
- a folder a live run holds (rank 0 keeps a lock on `.run.lock` from make_out_dir to its exit; the kernel
  drops it when the process dies, so a dead run never holds its folder): refused, whatever it holds.
Every rank checks before the process group forms, so no rank has written anything yet when another looks.
"""
from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path

import torch.distributed as dist

from .checkpoint import checkpoint_tags, latest_tag, tag_damage
from .config import TrainConfig
from .diskfull import write_text_atomic
from .engine import broadcast

# fields that may differ between a run and its --resume (they do not change what is computed)
RESUME_MAY_CHANGE = {"resume", "eval_interval", "eval_sequences", "save_interval", "log_interval", "plots",
                     "num_proc", "max_nonfinite", "out_dir", "cache_dir", "keep_checkpoints", "rank_timeout"}


LOCK = ".run.lock"
_held: list = []  # the open lock file of this process's run (kept open: closing it would drop the lock)


def in_use(out: Path) -> bool:
    """Does a live process hold this run folder's lock?"""
    f = Path(out) / LOCK
    if not f.is_file():
        return False
    with open(f, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def hold(out: Path) -> None:
    """Take the run folder's lock for the life of this process (once: a second flock of this process on a
    new descriptor would conflict with its own)."""
    path = (Path(out) / LOCK).resolve()
    if any(Path(fh.name).resolve() == path for fh in _held):
        return
    fh = open(path, "ab")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(fh)


def intact_checkpoint(out: Path) -> str | None:
    """The tag a resume would start from, judged by manifests and sizes (cheap; resume also checksums), or
    None when the run has no intact checkpoint."""
    ckpt = Path(out) / "checkpoints"
    want = latest_tag(ckpt)
    for tag in ([want] if want else []) + [t for t in checkpoint_tags(ckpt) if t != want]:
        if (ckpt / tag).is_dir() and tag_damage(ckpt / tag, checksums=False)[0] is None:
            return tag
    return None


def config_diff(old: dict, new: dict) -> list[str]:
    """The fields (not in RESUME_MAY_CHANGE) whose values differ between two train_config.json dicts."""
    return sorted(k for k in set(old) | set(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))


def _schedule_advice(diff: list[str], old: dict, new: dict) -> str:
    """What to do when --resume meets a changed schedule: the lr schedule was made for the run's length."""
    for k in ("max_steps", "epochs"):
        if k in diff and isinstance(old.get(k), int) and isinstance(new.get(k), int) and old[k] and new[k]:
            how = ("to train longer, start a new run (another --out_dir) with --student <out_dir>/student, the "
                   "exported student" if new[k] > old[k] else
                   f"to train for fewer {'steps' if k == 'max_steps' else 'epochs'}, start a new run (another "
                   f"--out_dir) with --{k} {new[k]}")
            return f"; --resume continues the same run (its lr schedule was made for {k} {old[k]}): {how}"
    if {"max_steps", "epochs"} & set(diff):
        return ("; --resume continues the same run (its lr schedule was made for its length): start a new run "
                "(another --out_dir) for another schedule")
    return ""


def check_out_dir(cfg: TrainConfig) -> str | None:
    """Why out_dir can't be used (None if it can; see the module docstring). A run of this config with no
    intact checkpoint starts again from step 0: `cfg.resume` is then set False (nothing to resume)."""
    if cfg.out_dir is None:
        return "--resume needs --out_dir: the folder of the run to continue" if cfg.resume else None
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        return f"out_dir {out} is a file, not a folder: choose another --out_dir"
    if out.is_dir() and in_use(out):
        return (f"out_dir {out} is in use by a run that is still running (it holds {out / LOCK}); nothing was "
                f"overwritten: wait for it to end or stop it, or choose another --out_dir")
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    saved = out / "train_config.json"
    if not names:
        return "--resume: {} holds no run (it is {}): start the run without --resume".format(
            out, "empty" if out.exists() else "not there") if cfg.resume else None
    if not saved.is_file():
        return (f"out_dir {out} holds files that are not a run ({', '.join(names[:5])}; no train_config.json); "
                f"nothing was overwritten: choose another --out_dir")
    try:
        old = json.loads(saved.read_text())
    except (OSError, ValueError) as e:
        return f"out_dir {out}: its train_config.json is unreadable ({e}); choose another --out_dir"
    new = json.loads(json.dumps(cfg.to_json()))
    diff = config_diff(old, new)
    tag = intact_checkpoint(out)
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        if cfg.resume:
            return f"--resume: the config differs from the run in {out}: {changes}" + _schedule_advice(diff, old, new)
        way = ("choose another --out_dir, or pass --resume with that run's flags to continue it" if tag else
               f"choose another --out_dir, or remove {out} (that run saved no intact checkpoint)")
        return f"out_dir {out} already holds another run ({changes}); nothing was overwritten: {way}"
    if tag is None:
        cfg.resume = False  # nothing to resume: the run starts again from step 0, in place
        return None
    if not cfg.resume:
        return (f"out_dir {out} already holds this run, with a checkpoint ({tag}); nothing was overwritten: pass "
                f"--resume to continue it, or choose another --out_dir")
    return None


def make_out_dir(cfg: TrainConfig, rank: int) -> Path:
    out = Path(cfg.out_dir or broadcast(time.strftime("runs/%Y%m%d-%H%M%S", time.gmtime()), rank))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        try:
            hold(out)
        except BlockingIOError:  # another run took it since check_out_dir looked
            raise FileExistsError(f"out_dir {out} is in use by a run that is still running; choose another "
                                  f"--out_dir") from None
        if not cfg.resume:
            if (out / "train_config.json").is_file():  # check_out_dir: this run, no intact checkpoint
                print(f"out_dir {out} holds this run with no intact checkpoint (it stopped before its first "
                      f"save): starting it again from step 0", flush=True)
                for name in ("metrics.jsonl", "loss.png", "val.png"):
                    (out / name).unlink(missing_ok=True)
            write_text_atomic(out / "train_config.json", json.dumps(cfg.to_json(), indent=2) + "\n",
                              "train config")
    dist.barrier()
    return out
