"""What the step's variants share: the weighted total, the head losses, the site swaps and losses.

The naive, fast and causal steps (naive.py, masked.py, causal.py) call these; `head_losses` is where every
logit term goes through `ops.distill_head_loss` (ZeRO-3's gathering of the decoders: `_gathered` for the
teacher's, `engine.init_engine` for the student's).
"""
from __future__ import annotations

import contextlib

import torch

from .. import ops
from ..config import DistillConfig
from ..models import IntervenableMLM
from ..ops.interchange.reference import hidden_loss_reference, interchange_reference
from ..precision import student_autocast
from ..sampling import InterventionPlan


def _weighted_only(terms: dict[str, torch.Tensor], cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The terms whose weight is not 0 (a term computed alongside another, at weight 0, is not one)."""
    return {k: v for k, v in terms.items() if getattr(cfg, f"w_{k}")}


def weighted_total(terms: dict[str, torch.Tensor], cfg: DistillConfig) -> torch.Tensor:
    """sum_t w_t * term_t over the terms that were computed."""
    total = None
    for name, value in terms.items():
        w = getattr(cfg, f"w_{name}")
        if w:
            total = w * value if total is None else total + w * value
    if total is None:
        raise ValueError("every loss weight is 0: nothing to train")
    return total


def shared_vocab(teacher: IntervenableMLM, cfg: DistillConfig) -> int:
    """Vocabulary rows the logit losses compare (`cfg.shared_vocab`, else the models' common size)."""
    return teacher.vocab_size if cfg.shared_vocab is None else cfg.shared_vocab


def _vocab_rows(t: torch.Tensor | None, vocab: int, dim: int = 0) -> torch.Tensor | None:
    """The first `vocab` entries of `t` along `dim` (t itself when it has no more: no copy, no new op)."""
    if t is None or t.shape[dim] == vocab:
        return t
    return t.narrow(dim, 0, vocab)


def _impl(cfg: DistillConfig) -> str:
    return "auto" if cfg.ops == "fused" else "reference"


def kept_sites(plan: InterventionPlan | None, cfg: DistillConfig) -> tuple:
    """(teacher group, student block, teacher sites to keep, student sites to keep) of a fast step: the
    aligned sites are kept only when a term reads them (iit, iit_cos, mse)."""
    group, s_l = (plan.teacher_layers, plan.student_layer) if plan is not None else ((), None)
    keep = cfg.uses_iit or bool(cfg.w_mse)
    return group, s_l, (set(group) if keep else set()), ({s_l} if keep else set())


def _rows(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """States (B, S, D) at flat positions rows (N,): (N, D), a gather of known size (no host sync)."""
    return h.reshape(-1, h.shape[-1]).index_select(0, rows)


def _swap_at(states: torch.Tensor, source: torch.Tensor, swap: tuple, dims):
    """Intervention fn: `states` (G, Q, D) with the tokens at (rows, positions) taken from `source` (B, S, D) at
    (source rows, source positions): one StepIndex.swaps entry, (K,) long each (no host read of the plan)."""
    rows, pos, src_rows, src_pos = swap
    d0, d1 = (0, states.shape[-1]) if dims is None else dims
    out = states.clone()
    out[rows, pos, d0:d1] = source[src_rows, src_pos, d0:d1]
    return out


def _swap_from(states: torch.Tensor, source: torch.Tensor, pairing: torch.Tensor, plan: InterventionPlan):
    """Intervention fn: overwrite `states`' base spans with `source`'s spans (source row = pairing[i])."""
    return interchange_reference(states, pairing, plan.base_start, plan.source_start, plan.span_len,
                                 plan.dims, source=source)


def _site_mse(student: IntervenableMLM, s_site: torch.Tensor, t_site: torch.Tensor, tokens, impl=None):
    """mse at the aligned site (through the learned projection when widths differ)."""
    if student.site_projection is not None:
        s_site = student.site_projection(s_site)
    if impl is None:
        return hidden_loss_reference(s_site, t_site, tokens, "mse")
    return ops.hidden_loss(s_site, t_site.to(s_site.dtype), tokens, "mse", impl=impl)


def head_losses(teacher: IntervenableMLM, student: IntervenableMLM, h_s: torch.Tensor, h_t: torch.Tensor,
                labels: torch.Tensor | None, cfg: DistillConfig, kd_weight: float, lm_weight: float,
                kd_mask: torch.Tensor | None = None, divergence=None):
    """(ce, mlm) of N selected tokens from last hidden states h_s (N, Ds), h_t (N, Dt); ce by `divergence`
    (cfg.divergence("ce") or ("iit"); None = forward KL).

    The head transforms are ordinary modules; decoder + softmax + KL/CE go through the chunked op, so
    with ops="fused" no (N, V) tensor is ever whole. The op gets the loss weights (the same ones
    `weighted_total` applies): it forms the weighted gradient directly, and skips the MLM work at weight 0.
    Under the student's autocast the decoder GEMMs run in its dtype (bf16), the softmax statistics in fp32.
    `kd_mask` (N,) bool: the tokens of the KL mean (None: all N; the others count for the LM term only).
    Both decoders are cut to the first `shared_vocab` rows (the ids of the one tokenizer).
    """
    vocab = shared_vocab(teacher, cfg)
    with torch.no_grad():
        ht = teacher.head_transform(h_t)                                          # (N, Dt)
    with student_autocast(cfg, h_s.device), _gathered(teacher.decoder_weight, teacher.decoder_bias):
        hs = student.head_transform(h_s)                                          # (N, Ds)
        tw, tb = _vocab_rows(teacher.decoder_weight, vocab), _vocab_rows(teacher.decoder_bias, vocab)
        # the student's decoder read directly, as every op's inputs: under ZeRO-3 the engine gathers it
        # (engine.init_engine registers it with the step module)
        sw, sb = _vocab_rows(student.decoder_weight, vocab), _vocab_rows(student.decoder_bias, vocab)
        return ops.distill_head_loss(hs, ht, sw, sb, tw, tb, labels, kd_mask, cfg.temperature, impl=_impl(cfg),
                                     chunk_size=cfg.head_chunk, kd_weight=kd_weight, lm_weight=lm_weight,
                                     resident_grad_bytes=(None if cfg.head_resident_grad_mb is None
                                                          else cfg.head_resident_grad_mb * 2**20),
                                     divergence=divergence)


def _gathered(*params):
    """A ZeRO-3 sharded teacher holds 1/world of each parameter; a tensor the step reads directly (not
    through a module call, which gathers by itself) is gathered here for the duration of the read."""
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # lazy: heavy, and only a ZeRO-3 sharded teacher gets here
    return deepspeed.zero.GatheredParameters(params)


def _student_site_swap(student, site, t_site, tokens, plan: InterventionPlan, cfg: DistillConfig, impl, terms):
    """The student's swapped site states (B, S, Ds), or None to let the resume swap them; with `mse` on, the
    loss goes into `terms`. Without a projection the loss and the swap read the same states: one fused pass."""
    if cfg.w_mse and student.site_projection is None:
        cf_s, terms["mse"] = ops.interchange_hidden_loss(
            site, t_site.to(site.dtype), tokens, plan.pi, plan.base_start, plan.source_start, plan.span_len,
            plan.dims, "mse", impl=impl)
        return cf_s
    if cfg.w_mse:
        terms["mse"] = _site_mse(student, site, t_site, tokens, impl)
    return None
