"""One causal-distillation step, computed naively or fast (DESIGN.md section 2).

    plan = sample_plan(batch["attention_mask"], alignment, generator, cfg.span_fraction, cfg.dims)
    out = distill_step(teacher, student, batch, plan, cfg)   # cfg.mode: fast | naive | standard
    out.loss.backward()                                      # one backward (or engine.backward)

**naive** (the published structure, kept as the reference and the benchmark baseline): the teacher runs
three full passes with full-vocabulary logits (base, source, counterfactual), and so does the student,
with grad; the source batch is the base batch permuted by `pi`.

**fast** (the product):
 1. one teacher pass over the batch (no grad), keeping the aligned sites: soft targets and last states of
    every row, and through `pi` every row's source states;
 2. one student pass, with grad, keeping its aligned site;
 3. counterfactual: the interchange op builds the intervened site states, and each model *resumes* from
    the block after the site (a teacher group: re-applying the swap after each block of the group), so
    the blocks below the site never run twice;
 4. logits only where a loss takes them (real or masked tokens, never the source), through the chunked
    distillation head loss;
 5. one backward, by the caller.

**standard** is the fast step without the IIT terms: the distillation baseline.

The loss terms (DESIGN.md section 1). "tokens" are the real tokens of the base; every mean is over the
tokens that count, in fp32 or wider, and 0 (not NaN) when none counts. Their formulas live once, in
`ops/reference.py` (what the naive step calls); the fast step computes the same terms with the fused ops,
and `tests/test_step.py` holds the two equal.

| term      | formula                                              | default weight |
|-----------|------------------------------------------------------|----------------|
| `ce`      | T^2 * KL(softmax(z_t/T) || softmax(z_s/T))           | 0.25 |
| `mlm`     | cross-entropy of z_s on the MLM targets              | 0.25 |
| `cos`     | 1 - cos(h_s, h_t), last hidden states                | 0.25 |
| `iit`     | T^2 * KL(softmax(z~_t/T) || softmax(z~_s/T))         | 0.25 |
| `iit_cos` | 1 - cos(h~_s, h~_t)                                  | 0    |
| `mse`     | hidden-state MSE at the aligned sites                | 0    |
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch

from torch import nn

from . import ops
from .config import DistillConfig
from .models import IntervenableMLM
from .ops.reference import (hidden_loss_reference, interchange_reference, kd_loss_reference,
                            mlm_loss_reference)
from .sampling import InterventionPlan, check_plan

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepOutput:
    loss: torch.Tensor               # scalar, carries the graph of the student
    terms: dict[str, torch.Tensor]   # each computed term, detached, fp32
    tokens: torch.Tensor             # real tokens of the base batch (a 0-dim tensor: no host sync)


def distill_step(teacher: IntervenableMLM, student: IntervenableMLM, batch: dict,
                 plan: InterventionPlan | None, cfg: DistillConfig, *, check: bool = True) -> StepOutput:
    """The step's losses (`loss` carries the student's graph). `check=False` skips the plan check, for a
    caller that checked it already (`sample_plan` checks on the CPU: no device sync in the loop)."""
    needs_plan = cfg.uses_iit or cfg.w_mse > 0
    if check:
        check_pair(teacher, student, cfg)
        if needs_plan:
            if plan is None:
                raise ValueError(f"mode {cfg.mode!r} with these weights needs an InterventionPlan (sample_plan)")
            check_plan(plan, batch["attention_mask"], (teacher.hidden_size, student.hidden_size))
    step = naive_step if cfg.mode == "naive" else fast_step
    terms = step(teacher, student, batch, plan, cfg)
    loss = weighted_total(terms, cfg)
    return StepOutput(loss, {k: v.detach().float() for k, v in terms.items()},
                      batch["attention_mask"].sum())


class DistillStep(nn.Module):
    """The step as a module, so that a DeepSpeed engine can wrap it: `engine(batch, plan)` runs the
    engine's forward (ZeRO-3's micro-step bookkeeping and parameter hooks), then `engine.backward(loss)`.

    The student is the only submodule (what DeepSpeed trains and shards); the teacher is held outside
    the module tree, frozen: DeepSpeed never sees its parameters (a ZeRO-3 sharded teacher is its own
    engine, see train.prepare_teacher).
    """

    def __init__(self, teacher: IntervenableMLM, student: IntervenableMLM, cfg: DistillConfig):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not registered as a submodule
        self.cfg = cfg

    @property
    def teacher(self) -> IntervenableMLM:
        return self._teacher[0]

    def forward(self, batch: dict, plan: InterventionPlan | None):
        """(loss, terms): `loss` a scalar with the student's graph; `terms` {name: detached fp32 scalar}."""
        out = distill_step(self.teacher, self.student, batch, plan, self.cfg, check=False)
        return out.loss, out.terms


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


def check_pair(teacher: IntervenableMLM, student: IntervenableMLM, cfg: DistillConfig):
    """Teacher and student must agree where the losses compare them."""
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(f"teacher and student vocabularies differ ({teacher.vocab_size} vs "
                         f"{student.vocab_size}): the soft-target losses need the same vocabulary")
    if (cfg.w_cos or cfg.w_iit_cos) and teacher.hidden_size != student.hidden_size:
        raise ValueError(f"cos / iit_cos need equal hidden sizes, got teacher {teacher.hidden_size} and "
                         f"student {student.hidden_size}: set w_cos = w_iit_cos = 0")
    if cfg.w_mse and teacher.hidden_size != student.hidden_size and student.site_projection is None:
        raise ValueError(f"mse between widths {student.hidden_size} -> {teacher.hidden_size} needs "
                         "student.attach_site_projection(teacher.hidden_size)")
    if cfg.uses_iit and cfg.dims is not None and teacher.hidden_size != student.hidden_size:
        raise ValueError("a dims slice is applied to both models and needs equal hidden sizes")


def _autocast(cfg: DistillConfig, device: torch.device):
    if cfg.student_autocast == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[cfg.student_autocast])


def _impl(cfg: DistillConfig) -> str:
    return "auto" if cfg.ops == "fused" else "reference"


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


# ---------------------------------------------------------------------------------------------------
# fast
# ---------------------------------------------------------------------------------------------------

def head_losses(teacher: IntervenableMLM, student: IntervenableMLM, h_s: torch.Tensor, h_t: torch.Tensor,
                labels: torch.Tensor | None, cfg: DistillConfig, kd_weight: float, lm_weight: float):
    """(ce, mlm) of N selected tokens from last hidden states h_s (N, Ds), h_t (N, Dt).

    The head transforms are ordinary modules; decoder + softmax + KL/CE go through the chunked op, so
    with ops="fused" no (N, V) tensor is ever whole. The op gets the loss weights (the same ones
    `weighted_total` applies): it forms the weighted gradient directly, and skips the MLM work at weight 0.
    Under the student's autocast the decoder GEMMs run in its dtype (bf16), the softmax statistics in fp32.
    """
    with torch.no_grad():
        ht = teacher.head_transform(h_t)                                          # (N, Dt)
    with _autocast(cfg, h_s.device), _gathered(teacher.decoder_weight, teacher.decoder_bias):
        hs = student.head_transform(h_s)                                          # (N, Ds)
        return student.lm_loss(hs, ht, teacher.decoder_weight, teacher.decoder_bias, labels, None,
                               cfg.temperature, impl=_impl(cfg), chunk_size=cfg.head_chunk,
                               kd_weight=kd_weight, lm_weight=lm_weight)


def _gathered(*params):
    """A ZeRO-3 sharded teacher holds 1/world of each parameter; a tensor the step reads directly (not
    through a module call, which gathers by itself) is gathered here for the duration of the read."""
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params)


def counterfactual_last_hidden(model: IntervenableMLM, sites: dict[int, torch.Tensor], attention_mask: torch.Tensor,
                               layers: tuple[int, ...], plan: InterventionPlan, impl: str = "auto",
                               swapped: torch.Tensor | None = None) -> torch.Tensor:
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
    later = {l: partial(_swap_from, source=sites[l], pairing=plan.pi, plan=plan) for l in layers[1:]}
    return model(None, attention_mask, resume_from=a0 + 1, states=swapped, interventions=later).last_hidden


def fast_step(teacher, student, batch, plan, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    tt = batch.get("token_type_ids")
    tokens = am.bool()                                                # (B, S) real tokens of the base
    kd = tokens if cfg.logit_tokens == "all" else labels != -100      # (B, S) where ce / iit are taken
    impl = _impl(cfg)
    iit = cfg.uses_iit
    group, s_l = (plan.teacher_layers, plan.student_layer) if plan is not None else ((), None)
    t_keep = set(group) if (iit or cfg.w_mse) else set()
    s_keep = {s_l} if (iit or cfg.w_mse) else set()

    # 1. one teacher pass: soft targets, last states, and (through pi) every row's source sites
    with torch.no_grad():
        t = teacher(ids, am, tt, keep=t_keep)
    # 2. one student pass, with grad
    with _autocast(cfg, ids.device):
        s = student(ids, am, tt, keep=s_keep)

    terms = {}
    if cfg.w_ce or cfg.w_mlm:
        ce, mlm = head_losses(teacher, student, s.last_hidden[kd], t.last_hidden[kd], labels[kd], cfg,
                              kd_weight=cfg.w_ce, lm_weight=cfg.w_mlm)
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
        h_cf_t = counterfactual_last_hidden(teacher, t.sites, am, group, plan, impl)       # (B, S, Dt)
    with _autocast(cfg, ids.device):
        site = s.sites[s_l]                                                                # (B, S, Ds)
        t_site = t.sites[group[-1]]
        if cfg.w_mse and student.site_projection is None:
            # the mse loss and the interchange read the same site states: one fused pass
            cf_s, terms["mse"] = ops.interchange_hidden_loss(
                site, t_site.to(site.dtype), tokens, plan.pi, plan.base_start, plan.source_start,
                plan.span_len, plan.dims, "mse", impl=impl)
        else:
            if cfg.w_mse:
                terms["mse"] = _site_mse(student, site, t_site, tokens, impl)
            cf_s = None
        h_cf_s = counterfactual_last_hidden(student, s.sites, am, (s_l,), plan, impl, swapped=cf_s)

    if cfg.w_iit:
        terms["iit"], _ = head_losses(teacher, student, h_cf_s[kd], h_cf_t[kd], None, cfg,
                                      kd_weight=cfg.w_iit, lm_weight=0.0)
    if cfg.w_iit_cos:
        terms["iit_cos"] = ops.hidden_loss(h_cf_s, h_cf_t.to(h_cf_s.dtype), tokens, "cos", impl=impl)
    return terms


# ---------------------------------------------------------------------------------------------------
# naive: the published structure, three full passes per model
# ---------------------------------------------------------------------------------------------------

def naive_step(teacher, student, batch, plan, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    tt = batch.get("token_type_ids")
    tokens = am.bool()
    kd = tokens if cfg.logit_tokens == "all" else labels != -100
    iit = cfg.uses_iit
    group, s_l = (plan.teacher_layers, plan.student_layer) if plan is not None else ((), None)
    keep_t, keep_s = set(group), ({s_l} if s_l is not None else set())
    if cfg.logit_tokens == "all":   # full logits (B, S, V), losses masked to the real tokens
        kd_mask, kd_labels = kd, labels
        at_kd = lambda h, src=False: h  # noqa: E731
    else:                           # logits of the masked tokens only (N, V), as restrict_ce_to_mask meant
        kd_mask, kd_labels = None, labels[kd]
        at_kd = lambda h, src=False: h[kd[plan.pi] if src else kd]  # noqa: E731

    if iit:
        # the source batch: row i is row pi[i] of the base batch, run as a separate forward
        src_ids, src_am = ids[plan.pi], am[plan.pi]
        src_tt = tt[plan.pi] if tt is not None else None
        identity = torch.arange(ids.shape[0], device=ids.device)
        swap = lambda source: partial(_swap_from, source=source, pairing=identity, plan=plan)  # noqa: E731

    with torch.no_grad():
        t_base = teacher(ids, am, tt, keep=keep_t)
        z_t = teacher.logits(at_kd(t_base.last_hidden))                                   # (B, S, V)
        if iit:
            t_src = teacher(src_ids, src_am, src_tt, keep=keep_t)
            teacher.logits(at_kd(t_src.last_hidden, src=True))  # the published code runs the whole model
            t_cf = teacher(ids, am, tt, interventions={l: swap(t_src.sites[l]) for l in group})
            z_cf_t = teacher.logits(at_kd(t_cf.last_hidden))

    with _autocast(cfg, ids.device):
        s_base = student(ids, am, tt, keep=keep_s)
        z_s = student.logits(at_kd(s_base.last_hidden))                                   # (B, S, V)
        if iit:
            s_src = student(src_ids, src_am, src_tt, keep=keep_s)   # not detached: gradients reach it
            student.logits(at_kd(s_src.last_hidden, src=True))
            s_cf = student(ids, am, tt, interventions={s_l: swap(s_src.sites[s_l])})
            z_cf_s = student.logits(at_kd(s_cf.last_hidden))

    terms = {}
    if cfg.w_ce:
        terms["ce"] = kd_loss_reference(z_s, z_t, kd_mask, cfg.temperature)
    if cfg.w_mlm:
        terms["mlm"] = mlm_loss_reference(z_s, kd_labels)
    if cfg.w_cos:
        terms["cos"] = hidden_loss_reference(s_base.last_hidden, t_base.last_hidden, tokens, "cos")
    if cfg.w_mse:
        terms["mse"] = _site_mse(student, s_base.sites[s_l], t_base.sites[group[-1]], tokens)
    if iit and cfg.w_iit:
        terms["iit"] = kd_loss_reference(z_cf_s, z_cf_t, kd_mask, cfg.temperature)
    if iit and cfg.w_iit_cos:
        terms["iit_cos"] = hidden_loss_reference(s_cf.last_hidden, t_cf.last_hidden, tokens, "cos")
    return terms
