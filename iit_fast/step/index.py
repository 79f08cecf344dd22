"""The step's index: what the fast step reads (rows of each head loss, swap positions, suffix groups, the
padding flag), made from the CPU batch and plan next to `sample_plan`, so that the step makes no host sync.
"""
from __future__ import annotations

import logging

import torch

from ..config import DistillConfig
from ..ops.interchange.reference import span_positions
from ..sampling import InterventionPlan, StepIndex
from .causal import next_token_targets, suffix_groups

log = logging.getLogger("iit_fast.step")
_logged: set[str] = set()


def step_index(batch: dict, plan: InterventionPlan | None, cfg: DistillConfig, kind: str) -> StepIndex:
    """The fast step's `StepIndex` for this batch and plan. Made from CPU tensors (the train loop calls it next
    to `sample_plan`, then moves it with `.to(device)`); given device tensors it copies the mask, labels and
    plan to the CPU first (host syncs: logged once)."""
    am, labels = batch["attention_mask"], batch["labels"]
    if am.device.type != "cpu":
        if "index" not in _logged:
            _logged.add("index")
            log.warning("step_index: the batch is on %s: its mask and labels are read on the CPU (host syncs); "
                        "make the index on the CPU with the plan and pass it to the step", am.device)
        am, labels = am.cpu(), labels.cpu()
        plan = plan.to("cpu") if plan is not None else None
    tokens = am.bool()                                                           # (B, S)
    index = StepIndex(padded=not bool(tokens.all()))

    def head(name, rows, kd=None, y=None):  # rows, kd, y: (B, S) masks / labels
        r = rows.reshape(-1).nonzero().squeeze(1)                                # (N,) flat positions
        index.heads[name] = (r, None if kd is None else kd.reshape(-1)[r], None if y is None else y.reshape(-1)[r])

    multi = cfg.uses_iit and plan is not None and len(plan.teacher_layers) > 1  # swaps after later blocks
    if kind != "causal":
        kd = tokens if cfg.logit_tokens_for(kind) == "all" else labels != -100  # where ce / iit are taken
        head("kd", kd, None, labels)
        if multi:
            rows, pos, src_pos = span_positions(plan.base_start, plan.source_start, plan.span_len)   # (K,)
            index.swaps = [(rows, pos, plan.pi[rows], src_pos)]
        return index
    nxt, y = next_token_targets(am, labels)                                      # (B, S), (B, S)
    if batch.get("loss_mask") is not None:  # generated rows (generate.py): next-token losses on the continuation
        nxt = nxt & batch["loss_mask"].to(nxt.device).bool()
    lab = y != -100
    w_iit = cfg.w_iit if cfg.uses_iit else 0.0
    if cfg.uses_iit:
        index.groups = suffix_groups(plan.base_start, cfg.suffix_groups, merge=False)  # as many on every rank
        if multi:
            index.swaps = [_group_swap(plan, rows, q0) for rows, q0 in index.groups]
        aff = torch.arange(am.shape[1])[None] >= plan.base_start[:, None]       # (B, S) positions >= b
    if not w_iit or cfg.logit_tokens_for("causal") == "affected":
        if cfg.w_ce or cfg.w_mlm:
            head("base", nxt | lab, nxt, y)
        if w_iit:
            head("cf", nxt & aff)
        return index
    pre, post = nxt & ~aff, nxt & aff
    n_pre, n_post, l_pre, l_post = (int(m.sum()) for m in (pre, post, lab & ~aff, lab & aff))
    n, l = max(n_pre + n_post, 1), max(l_pre + l_post, 1)
    index.scales.update(f_pre=n_pre / n, f_post=n_post / n, g_pre=l_pre / l, g_post=l_post / l)
    head("pre", pre | (lab & ~aff), pre, y.masked_fill(aff, -100))
    if cfg.w_ce or cfg.w_mlm:
        head("post", post | (lab & aff), post, y.masked_fill(~aff, -100))
    head("cf", post)
    return index


def _group_swap(plan: InterventionPlan, rows: torch.Tensor | None, q0: int) -> tuple:
    """A suffix group's swap positions (CPU): rows local to the group, base positions from q0."""
    rows = torch.arange(plan.pi.numel()) if rows is None else rows                   # (G,) global rows
    local, pos, src_pos = span_positions(plan.base_start[rows], plan.source_start[rows], plan.span_len[rows])
    return local, pos - q0, plan.pi[rows][local], src_pos
