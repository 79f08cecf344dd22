"""The fast step for masked LMs (BERT, RoBERTa, DistilBERT): one plain pass per model, then the
counterfactual passes resumed from the block after the site (the package docstring, steps 1-5).
"""
from __future__ import annotations

from functools import partial

import torch

from .. import ops
from ..config import DistillConfig
from ..models import IntervenableMLM
from ..precision import student_autocast
from ..sampling import InterventionPlan, StepIndex
from .common import (_impl, _rows, _site_mse, _student_site_swap, _swap_at, _swap_from, _weighted_only, head_losses,
                     kept_sites)


def counterfactual_last_hidden(model: IntervenableMLM, sites: dict[int, torch.Tensor], attention_mask: torch.Tensor,
                               layers: tuple[int, ...], plan: InterventionPlan, impl: str = "auto",
                               swapped: torch.Tensor | None = None, padded: bool | None = None,
                               swap: tuple | None = None) -> torch.Tensor:
    """Last hidden states (B, S, D) of the counterfactual pass, resumed from the site.

    `sites` are the plain pass's states at every block of `layers` (a teacher group, or one student
    block). Row i's span at the site of `layers[0]` takes row plan.pi[i]'s span (`ops.interchange`, or
    `swapped` when the caller built it already, e.g. fused with a loss), the pass resumes from the next
    block, and after each later block of the group the span is swapped again from that block's plain
    states: the blocks below the site never run twice.
    """
    a0 = layers[0]
    if swapped is None:
        swapped = ops.interchange(sites[a0], plan.pi, plan.base_start, plan.source_start, plan.span_len,
                                  plan.dims, impl=impl)                                      # (B, S, D)
    if swap is not None:  # the positions made on the CPU (StepIndex.swaps)
        later = {l: partial(_swap_at, source=sites[l], swap=swap, dims=plan.dims) for l in layers[1:]}
    else:
        later = {l: partial(_swap_from, source=sites[l], pairing=plan.pi, plan=plan) for l in layers[1:]}
    return model(None, attention_mask, resume_from=a0 + 1, states=swapped, interventions=later,
                 padded=padded).last_hidden


def fast_masked_step(teacher, student, batch, plan, cfg: DistillConfig, index: StepIndex
                     ) -> dict[str, torch.Tensor]:
    """The fast step for masked LMs (see the package docstring and `counterfactual_last_hidden`)."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    tt = batch.get("token_type_ids")
    tokens = am.bool()                                                # (B, S) real tokens of the base
    kd_rows, _, kd_labels = index.heads["kd"]                         # (N,) where ce / iit are taken
    padded = index.padded
    impl = _impl(cfg)
    iit = cfg.uses_iit
    group, s_l, t_keep, s_keep = kept_sites(plan, cfg)

    # 1. one teacher pass: soft targets, last states, and (through pi) every row's source sites
    with torch.no_grad():
        t = teacher(ids, am, tt, keep=t_keep, padded=padded)
    # 2. one student pass, with grad
    with student_autocast(cfg, ids.device):
        s = student(ids, am, tt, keep=s_keep, padded=padded)

    terms = {}
    if cfg.w_ce or cfg.w_mlm:
        ce, mlm = head_losses(teacher, student, _rows(s.last_hidden, kd_rows), _rows(t.last_hidden, kd_rows),
                              kd_labels, cfg, kd_weight=cfg.w_ce, lm_weight=cfg.w_mlm,
                              divergence=cfg.divergence("ce"))
        terms.update(_weighted_only({"ce": ce, "mlm": mlm}, cfg))
    if cfg.w_cos:
        terms["cos"] = ops.hidden_loss(s.last_hidden, t.last_hidden.to(s.last_hidden.dtype), tokens, "cos",
                                       impl=impl)
    if not iit:
        if cfg.w_mse:
            terms["mse"] = _site_mse(student, s.sites[s_l], t.sites[group[-1]], tokens, impl)
        return terms

    # 3. counterfactual: swap at the site, resume from the block after it
    with torch.no_grad():
        h_cf_t = counterfactual_last_hidden(teacher, t.sites, am, group, plan, impl, padded=padded,
                                            swap=index.swaps[0] if index.swaps else None)   # (B, S, Dt)
    with student_autocast(cfg, ids.device):
        cf_s = _student_site_swap(student, s.sites[s_l], t.sites[group[-1]], tokens, plan, cfg, impl, terms)
        h_cf_s = counterfactual_last_hidden(student, s.sites, am, (s_l,), plan, impl, swapped=cf_s,
                                            padded=padded)

    if cfg.w_iit:
        terms["iit"], _ = head_losses(teacher, student, _rows(h_cf_s, kd_rows), _rows(h_cf_t, kd_rows), None, cfg,
                                      kd_weight=cfg.w_iit, lm_weight=0.0, divergence=cfg.divergence("iit"))
    if cfg.w_iit_cos:
        terms["iit_cos"] = ops.hidden_loss(h_cf_s, h_cf_t.to(h_cf_s.dtype), tokens, "cos", impl=impl)
    return terms
