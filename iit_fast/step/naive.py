"""The naive step: the published structure, three full passes per model (base, source, counterfactual)
with full-vocabulary logits; the reference the fast step is tested against and the benchmarks' baseline.
"""
from __future__ import annotations

from functools import partial

import torch

from ..config import DistillConfig
from ..ops.head_loss.reference import kd_loss_reference, mlm_loss_reference
from ..ops.interchange.reference import hidden_loss_reference
from ..precision import student_autocast
from .causal import next_token_targets
from .common import _site_mse, _swap_from, _vocab_rows, shared_vocab


def naive_step(teacher, student, batch, plan, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    tt = batch.get("token_type_ids")
    tokens = am.bool()
    where = cfg.logit_tokens_for(teacher.kind)
    vocab = shared_vocab(teacher, cfg)
    kd = tokens if where != "masked" else labels != -100
    iit = cfg.uses_iit
    group, s_l = (plan.teacher_layers, plan.student_layer) if plan is not None else ((), None)
    keep_t, keep_s = set(group), ({s_l} if s_l is not None else set())
    if where != "masked":           # full logits (B, S, V), losses masked to the real tokens
        kd_mask, kd_labels = kd, labels
        at_kd = lambda h, src=False: h  # noqa: E731
    else:                           # logits of the masked tokens only (N, V), as restrict_ce_to_mask meant
        kd_mask, kd_labels = None, labels[kd]
        at_kd = lambda h, src=False: h[kd[plan.pi] if src else kd]  # noqa: E731
    cf_mask, cf_tokens = kd_mask, tokens                            # where iit / iit_cos are taken
    if teacher.kind == "causal":    # the logits at t predict token t + 1: next-token masks and labels
        kd_mask, kd_labels = next_token_targets(am, labels)
        if batch.get("loss_mask") is not None:  # generated rows (generate.py): losses on the continuation only
            kd_mask = kd_mask & batch["loss_mask"].bool()
        cf_mask = kd_mask
        if iit and where == "affected":
            aff = torch.arange(am.shape[1], device=am.device)[None] >= plan.base_start[:, None]   # (B, S)
            cf_mask, cf_tokens = kd_mask & aff, tokens & aff
    logits = lambda model, h: _vocab_rows(model.logits(h), vocab, -1)  # noqa: E731  (the shared ids)

    if iit:
        # the source batch: row i is row pi[i] of the base batch, run as a separate forward
        src_ids, src_am = ids[plan.pi], am[plan.pi]
        src_tt = tt[plan.pi] if tt is not None else None
        identity = torch.arange(ids.shape[0], device=ids.device)
        swap = lambda source: partial(_swap_from, source=source, pairing=identity, plan=plan)  # noqa: E731

    with torch.no_grad():
        t_base = teacher(ids, am, tt, keep=keep_t)
        z_t = logits(teacher, at_kd(t_base.last_hidden))                                  # (B, S, V)
        if iit:
            t_src = teacher(src_ids, src_am, src_tt, keep=keep_t)
            logits(teacher, at_kd(t_src.last_hidden, src=True))  # the published code runs the whole model
            t_cf = teacher(ids, am, tt, interventions={l: swap(t_src.sites[l]) for l in group})
            z_cf_t = logits(teacher, at_kd(t_cf.last_hidden))

    with student_autocast(cfg, ids.device):
        s_base = student(ids, am, tt, keep=keep_s)
        z_s = logits(student, at_kd(s_base.last_hidden))                                  # (B, S, V)
        if iit:
            s_src = student(src_ids, src_am, src_tt, keep=keep_s)   # not detached: gradients reach it
            logits(student, at_kd(s_src.last_hidden, src=True))
            s_cf = student(ids, am, tt, interventions={s_l: swap(s_src.sites[s_l])})
            z_cf_s = logits(student, at_kd(s_cf.last_hidden))

    terms = {}
    if cfg.w_ce:
        terms["ce"] = kd_loss_reference(z_s, z_t, kd_mask, cfg.temperature, cfg.divergence("ce"))
    if cfg.w_mlm:
        terms["mlm"] = mlm_loss_reference(z_s, kd_labels)
    if cfg.w_cos:
        terms["cos"] = hidden_loss_reference(s_base.last_hidden, t_base.last_hidden, tokens, "cos")
    if cfg.w_mse:
        terms["mse"] = _site_mse(student, s_base.sites[s_l], t_base.sites[group[-1]], tokens)
    if iit and cfg.w_iit:
        terms["iit"] = kd_loss_reference(z_cf_s, z_cf_t, cf_mask, cfg.temperature, cfg.divergence("iit"))
    if iit and cfg.w_iit_cos:
        terms["iit_cos"] = hidden_loss_reference(s_cf.last_hidden, t_cf.last_hidden, cf_tokens, "cos")
    return terms
