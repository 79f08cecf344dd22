"""The run's folder (`--out_dir`): when it may be used, and making it.

A folder is used only when it is new, empty, holds only a failed start of this same config, or, with
--resume, a run of the same config with a checkpoint: a run never overwrites another one. Every rank checks
before the process group forms, so no rank has written anything yet when another looks.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from .checkpoint import latest_tag
from .config import TrainConfig
from .engine import broadcast

# fields that may differ between a run and its --resume (they do not change what is computed)
RESUME_MAY_CHANGE = {"resume", "eval_interval", "eval_sequences", "save_interval", "log_interval", "plots",
                     "num_proc", "max_nonfinite", "out_dir", "cache_dir", "keep_checkpoints", "rank_timeout"}


def check_out_dir(cfg: TrainConfig) -> str | None:
    """Why out_dir can't be used (None if it can): it must be new, empty, hold only a failed start of
    this same config (train_config.json and nothing else), or, with --resume, a run of the same config
    with a checkpoint. Every rank checks before the process group forms, so no rank has written anything
    yet when another looks."""
    if cfg.out_dir is None:
        return "--resume needs --out_dir: the folder of the run to continue" if cfg.resume else None
    out = Path(cfg.out_dir)
    saved = out / "train_config.json"
    if cfg.resume:
        if not saved.is_file() or latest_tag(out / "checkpoints") is None:
            return f"--resume: {out} holds no run with a checkpoint (train_config.json, checkpoints/latest)"
        old, new = json.loads(saved.read_text()), json.loads(json.dumps(cfg.to_json()))
        diff = sorted(k for k in set(old) | set(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))
        if diff:
            why = ("; --resume continues the same run (the lr schedule was made for its length): start a new "
                   "run from the exported student to train longer") if {"max_steps", "epochs"} & set(diff) else ""
            return (f"--resume: the config differs from the run in {out}: "
                    + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff) + why)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        failed_start = names == ["train_config.json"] and json.loads(saved.read_text()) == \
            json.loads(json.dumps(cfg.to_json()))
        if not failed_start:
            return (f"out_dir {out} already holds another run ({', '.join(names[:5])}); nothing was overwritten: "
                    "pass --resume to continue it, or choose another --out_dir")
    return None


def make_out_dir(cfg: TrainConfig, rank: int) -> Path:
    out = Path(cfg.out_dir or broadcast(time.strftime("runs/%Y%m%d-%H%M%S", time.gmtime()), rank))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    dist.barrier()
    return out
