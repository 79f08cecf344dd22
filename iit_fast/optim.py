"""The optimizer and learning-rate schedule shared by every training loop (the main job, the teacher builder).

    groups = param_groups(model, weight_decay=0.01)
    opt = make_optimizer(groups, lr=2e-4)
    sched = make_scheduler(opt, "linear", warmup_steps=5, total_steps=60, min_lr_ratio=0.0)
    ... loss.backward(); opt.step(); sched.step()

The schedule shapes are transformers' (`get_scheduler`); only two things are ours, see `make_scheduler`.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

SCHEDULES = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup")
# our name -> transformers' schedule whose shape it takes (the floor and the warmup shift are applied on top)
_TRANSFORMERS_NAME = {"linear": "linear", "cosine": "cosine", "cosine_with_min_lr": "cosine",
                      "constant": "constant_with_warmup", "constant_with_warmup": "constant_with_warmup"}


def param_groups(model: nn.Module | Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: weight decay on matrices, none on biases and norm scales.

    model: a module, or (name, parameter) pairs. A parameter is "no decay" when it has fewer than two
    dimensions (biases, LayerNorm / RMSNorm weights); under ZeRO-3 partitioning the original shape
    (`ds_shape`) decides, not the flattened partition. Parameters with requires_grad False are left out.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    decay, no_decay = [], []
    for _, p in named:
        if p.requires_grad:
            (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("model: no parameter requires grad; expected at least one trainable parameter")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """torch AdamW over `groups` (`param_groups`). fused None: the fused kernel when every parameter is a
    floating tensor on CPU or CUDA (torch has a fused AdamW for both), the foreach one otherwise; pass
    fused=False where something else steps the states (e.g. DeepSpeed's optimizer offload)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if fused is None:
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR: linear warmup over `warmup_steps`, then `name`'s decay to `min_lr_ratio` x lr at `total_steps`.

    name: "linear", "cosine" (= "cosine_with_min_lr"), or "constant" (= "constant_with_warmup"; every
    schedule here starts with the warmup, unlike transformers' "constant"). The shapes are transformers'
    (`get_scheduler`'s "linear", "cosine", "constant_with_warmup"); where ours differ:
    - warmup: the multiplier of optimizer step s (0-based) is (s + 1) / (warmup_steps + 1), so the first
      step does not run at lr 0 (transformers: s / warmup_steps, and step 0 at lr 0). This is transformers'
      schedule read one step later, with warmup_steps + 1 and total_steps + 1: after the warmup it is the
      same curve over the same steps (step warmup_steps at the full lr, step total_steps at the floor);
    - floor: after the warmup, multiplier = min_lr_ratio + (1 - min_lr_ratio) * transformers' decay, for
      every shape (transformers has a floor for cosine only, "cosine_with_min_lr", the same formula).
    Multipliers for steps beyond total_steps are transformers' (linear stays at the floor).
    """
    from transformers import get_scheduler
    if name not in SCHEDULES:
        raise ValueError(f"name must be one of {SCHEDULES}, got {name!r}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1] (a fraction of the peak lr), got {min_lr_ratio}")
    # transformers' multiplier function, read off a scheduler on a throwaway optimizer so that nothing
    # touches the real optimizer's lr or initial_lr before the LambdaLR below owns it
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    shape = get_scheduler(_TRANSFORMERS_NAME[name], probe, num_warmup_steps=warmup_steps + 1,
                          num_training_steps=total_steps + 1).lr_lambdas[0]

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return shape(step + 1)
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape(step + 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
