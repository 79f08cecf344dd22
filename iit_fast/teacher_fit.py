"""The training phase both default-teacher builds run (iit_fast/teacher.py), and what they share around it:
their validation batches and their whole-or-nothing save.

A phase is a fixed number of AdamW steps (the main job's optimizer and schedule, ``iit_fast.optim``: no decay
on biases and norms; linear warmup over WARMUP_FRACTION of the steps, linear decay to MIN_LR_RATIO of the lr)
of cross-entropy on the scored positions (``eval.scored_logits``: the masked tokens of a masked LM, every next
token of a causal one), so a build is reproducible; a time cap is only a safety stop, and it warns.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from iit_fast.batches import validation_batches
from iit_fast.cache import publish_folder
from iit_fast.eval import EVAL_SEED, scored_logits
from iit_fast.models import IntervenableLM
from iit_fast.optim import make_optimizer, make_scheduler, param_groups

WARMUP_FRACTION = 0.1   # of each phase's steps
MIN_LR_RATIO = 0.1      # the linear decay ends at 10% of the phase's lr
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.98), 1e-6, 0.01  # the MiniLM build's AdamW (the GPT-2 build passes its own)


def fit(lm: IntervenableLM, batches, steps: int, lr: float, desc: str, progress: bool,
        frozen: torch.nn.Module | None = None, max_seconds: float | None = None, betas=BETAS, eps: float = EPS,
        weight_decay: float = WEIGHT_DECAY, precision: str = "fp32") -> dict:
    """`steps` AdamW steps (``optim``: no decay on biases and norms) of cross-entropy on the scored
    positions (``eval.scored_logits``), over the parameters that require grad, on a linear schedule: warmup
    over WARMUP_FRACTION of the steps, decay to MIN_LR_RATIO x lr at the last. `frozen`: a submodule kept
    in eval mode (frozen features: no dropout). `max_seconds`: a safety stop that warns; the schedule
    does not follow it. `precision` "bf16": the forward under bf16 autocast (fp32 weights, gradients and
    optimizer; the loss in fp32)."""
    opt = make_optimizer(param_groups(lm, weight_decay), lr, betas=betas, eps=eps)
    sched = make_scheduler(opt, "linear", math.ceil(WARMUP_FRACTION * steps), steps, MIN_LR_RATIO)
    trainable = [p for p in lm.parameters() if p.requires_grad]
    lm.train()
    if frozen is not None:
        frozen.eval()
    bar = tqdm(total=steps, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    it = batches.forever()
    device = next(lm.parameters()).device.type
    amp = (torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    ema = None
    t0, c0 = time.time(), time.process_time()
    step, capped = 0, False
    while step < steps:
        if max_seconds and time.time() - t0 >= max_seconds:
            capped = True
            warnings.warn(f"{desc}: the time cap of {max_seconds:.0f} s stopped training after {step} of {steps} "
                          f"steps, before the schedule's end; this build is not the reproducible one (a busy "
                          f"machine?)", RuntimeWarning, stacklevel=2)
            break
        with amp:
            logits, targets = scored_logits(lm, next(it))                           # (M, V), (M,)
        loss = F.cross_entropy(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", ppl=f"{math.exp(ema):.0f}")
    bar.close()
    lm.eval()
    wall, cpu = time.time() - t0, time.process_time() - c0
    return {"steps": step, "stopped_by_time_cap": capped, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "step_seconds": round(wall / max(1, step), 3), "step_cpu_seconds": round(cpu / max(1, step), 3),
            "train_loss_ema": ema}


NO_PHASE = {"steps": 0, "stopped_by_time_cap": False, "seconds": 0.0, "cpu_seconds": 0.0, "step_seconds": 0.0,
             "step_cpu_seconds": 0.0}


def validation(tokenized_val, tokenizer, batch_size: int, eval_batches: int | None, kind: str) -> list[dict]:
    """The builder's validation batches: the first eval_batches x batch_size rows, masked per row."""
    n = len(tokenized_val) if eval_batches is None else min(len(tokenized_val), eval_batches * batch_size)
    return validation_batches(tokenized_val, tokenizer, batch_size, n_sequences=n, seed=EVAL_SEED, kind=kind)


def save_folder(out: Path, model, tokenizer, metrics: dict) -> None:
    """Write the folder whole or not at all (a temporary sibling, then published)."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    publish_folder(tmp, out, replace=True)  # missing, or rebuilt on purpose (force)
