"""One causal-distillation step, computed naively or fast (docs/method.md section 2).

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

**Causal LMs** (GPT-2, Llama, Qwen2, Mistral; the family's `kind` decides, docs/method.md section 4). The
logits at position t predict token t + 1: `ce` is taken at every real position with a real next token,
the LM term (weight `w_mlm`) is the student's next-token cross-entropy on the labels shifted by one, `cos`
on the last states of the real positions, `iit` / `iit_cos` at the positions `cfg.logit_tokens` names
(config.py: "affected" = from the base-span start b on, or "all"). A swap at [b, b + k) cannot change a
position < b in any block, so the fast step's counterfactual passes do not recompute what they cannot
change (`counterfactual_suffix_hidden`): the plain passes keep every block's keys/values, and each group
of rows resumes from the block after the site for positions >= q0 only (q0 = the group's earliest b),
attending to the plain keys/values before q0; the logits before b are never taken twice (their
counterfactual KL is the plain one). `flops.counted_flops` counts what that saves. Batches may be right- or
left-padded (`sampling.sample_plan`); the spans of a plan are in columns of the batch.

The loss terms (docs/method.md section 1). "tokens" are the real tokens of the base; every mean is over the
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
import logging
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import DynamicCache

from . import ops
from .config import DistillConfig
from .precision import student_autocast
from .models import IntervenableMLM
from .ops.head_loss.reference import kd_loss_reference, mlm_loss_reference
from .ops.interchange.reference import hidden_loss_reference, interchange_reference, span_positions
from .sampling import InterventionPlan, StepIndex, check_plan

log = logging.getLogger("iit_fast.step")



@dataclass
class StepOutput:
    loss: torch.Tensor               # scalar, carries the graph of the student
    terms: dict[str, torch.Tensor]   # each computed term, detached, fp32
    tokens: torch.Tensor             # real tokens of the base batch (a 0-dim tensor: no host sync)


def distill_step(teacher: IntervenableMLM, student: IntervenableMLM, batch: dict,
                 plan: InterventionPlan | None, cfg: DistillConfig, *, check: bool = True,
                 index: StepIndex | None = None) -> StepOutput:
    """The step's losses (`loss` carries the student's graph). `check=False` skips the plan check, for a
    caller that checked it already (`sample_plan` checks on the CPU: no device sync in the loop).
    `index`: the fast step's `step_index(batch, plan, cfg, kind)`, made on the CPU and moved with the batch
    (None: made here from the batch, which costs host syncs when the batch is on a GPU)."""
    needs_plan = cfg.uses_iit or cfg.w_mse > 0
    if check:
        check_pair(teacher, student, cfg)
        if needs_plan:
            if plan is None:
                raise ValueError(f"mode {cfg.mode!r} with these weights needs an InterventionPlan (sample_plan)")
            check_plan(plan, batch["attention_mask"], (teacher.hidden_size, student.hidden_size))
            if plan.dims != cfg.dims:  # cfg.dims is the run's; a plan drawn with other dims would win silently
                raise ValueError(f"the plan swaps dims {plan.dims}, but DistillConfig.dims is {cfg.dims}; expected "
                                 f"the plan drawn with the config's dims (sample_plan(..., cfg.dims))")
    if cfg.mode == "naive":
        terms = naive_step(teacher, student, batch, plan, cfg)
    else:
        terms = fast_step(teacher, student, batch, plan, cfg, index)
    loss = weighted_total(terms, cfg)
    return StepOutput(loss, {k: v.detach().float() for k, v in terms.items()},
                      batch["attention_mask"].sum())


class DistillStep(nn.Module):
    """The step as a module, so that a DeepSpeed engine can wrap it: `engine(batch, plan)` runs the
    engine's forward (ZeRO-3's micro-step bookkeeping and parameter hooks), then `engine.backward(loss)`.

    The student is the only submodule (what DeepSpeed trains and shards); the teacher is held outside
    the module tree, frozen: DeepSpeed never sees its parameters (a ZeRO-3 sharded teacher is its own
    engine, see engine.prepare_teacher).
    """

    def __init__(self, teacher: IntervenableMLM, student: IntervenableMLM, cfg: DistillConfig):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not registered as a submodule
        self.cfg = cfg

    @property
    def teacher(self) -> IntervenableMLM:
        return self._teacher[0]

    def forward(self, batch: dict, plan: InterventionPlan | None, index: StepIndex | None = None):
        """(loss, terms): `loss` a scalar with the student's graph; `terms` {name: detached fp32 scalar}."""
        out = distill_step(self.teacher, self.student, batch, plan, self.cfg, check=False, index=index)
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
    if teacher.kind != student.kind:
        raise ValueError(f"teacher and student must be LMs of one kind: the teacher ({teacher.family}) is a "
                         f"{teacher.kind} LM, the student ({student.family}) a {student.kind} LM")
    cfg.logit_tokens_for(teacher.kind)  # a combination the kind does not have is an error naming the field
    if cfg.shared_vocab is None and teacher.vocab_size != student.vocab_size:
        raise ValueError(f"teacher and student vocabularies differ ({teacher.vocab_size} vs "
                         f"{student.vocab_size}): the soft-target losses need the same vocabulary; if the rows "
                         f"past one tokenizer's ids are padding, set DistillConfig.shared_vocab = len(tokenizer)")
    if cfg.shared_vocab is not None and cfg.shared_vocab > min(teacher.vocab_size, student.vocab_size):
        raise ValueError(f"DistillConfig.shared_vocab={cfg.shared_vocab} is more rows than the teacher "
                         f"({teacher.vocab_size}) or the student ({student.vocab_size}) has")
    if (cfg.w_cos or cfg.w_iit_cos) and teacher.hidden_size != student.hidden_size:
        raise ValueError(f"cos / iit_cos need equal hidden sizes, got teacher {teacher.hidden_size} and "
                         f"student {student.hidden_size}: set w_cos = w_iit_cos = 0")
    if cfg.w_mse and teacher.hidden_size != student.hidden_size and student.site_projection is None:
        raise ValueError(f"mse between widths {student.hidden_size} -> {teacher.hidden_size} needs "
                         "student.attach_site_projection(teacher.hidden_size)")
    if cfg.uses_iit and cfg.dims is not None and teacher.hidden_size != student.hidden_size:
        raise ValueError("a dims slice is applied to both models and needs equal hidden sizes")


def shared_vocab(teacher: IntervenableMLM, cfg: DistillConfig) -> int:
    """Vocabulary rows the logit losses compare (`cfg.shared_vocab`, else the models' common size)."""
    return teacher.vocab_size if cfg.shared_vocab is None else cfg.shared_vocab


def _vocab_rows(t: torch.Tensor | None, vocab: int, dim: int = 0) -> torch.Tensor | None:
    """The first `vocab` entries of `t` along `dim` (t itself when it has no more: no copy, no new op)."""
    if t is None or t.shape[dim] == vocab:
        return t
    return t.narrow(dim, 0, vocab)


# ---------------------------------------------------------------------------------------------------
# padding: plans in columns, for right- or left-padded batches
# ---------------------------------------------------------------------------------------------------


def _impl(cfg: DistillConfig) -> str:
    return "auto" if cfg.ops == "fused" else "reference"


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


# ---------------------------------------------------------------------------------------------------
# fast
# ---------------------------------------------------------------------------------------------------

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
                                     divergence=divergence)


def _gathered(*params):
    """A ZeRO-3 sharded teacher holds 1/world of each parameter; a tensor the step reads directly (not
    through a module call, which gathers by itself) is gathered here for the duration of the read."""
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
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


def fast_step(teacher, student, batch, plan, cfg: DistillConfig, index: StepIndex | None = None
              ) -> dict[str, torch.Tensor]:
    if index is None:
        index = step_index(batch, plan, cfg, teacher.kind)
    if teacher.kind == "causal":
        return fast_causal_step(teacher, student, batch, plan, cfg, index)
    ids, am = batch["input_ids"], batch["attention_mask"]
    tt = batch.get("token_type_ids")
    tokens = am.bool()                                                # (B, S) real tokens of the base
    kd_rows, _, kd_labels = index.heads["kd"]                         # (N,) where ce / iit are taken
    padded = index.padded
    impl = _impl(cfg)
    iit = cfg.uses_iit
    group, s_l = (plan.teacher_layers, plan.student_layer) if plan is not None else ((), None)
    t_keep = set(group) if (iit or cfg.w_mse) else set()
    s_keep = {s_l} if (iit or cfg.w_mse) else set()

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


# ---------------------------------------------------------------------------------------------------
# fast, causal LMs: the counterfactual passes compute only what the swap can change
# ---------------------------------------------------------------------------------------------------

def next_token_targets(attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nxt, y), both (B, S): nxt (bool) the real positions with a real next token, where `ce` is taken;
    y the token each position predicts (labels shifted left by one), -100 at padding and at the last column.
    (A left-padded row's last pad column would otherwise "predict" the row's first token.)"""
    real = attention_mask.bool()
    nxt = torch.zeros_like(real)
    nxt[:, :-1] = real[:, :-1] & real[:, 1:]
    y = torch.full_like(labels, -100)
    y[:, :-1] = torch.where(real[:, :-1], labels[:, 1:], -100)
    return nxt, y


def suffix_groups(base_start: torch.Tensor, n_groups: int, merge: bool = True) -> list[tuple[torch.Tensor | None, int]]:
    """The counterfactual suffix passes: [(rows, q0)]. The rows, sorted by base-span start, are cut into
    at most `n_groups` groups of near-equal size, each with q0 = its earliest start; adjacent groups with one
    q0 are merged (`merge`; it saves a pass, no FLOP); rows None = every row in order (one group). The suffix
    widths are shapes: `step_index` calls it on the CPU plan (on a device tensor it would cost a host sync).
    The step does not merge: every rank then runs min(n_groups, B) passes whatever its spans, as ZeRO-3 needs
    (it gathers a block's parameters at each call, all ranks together: a rank with a pass fewer would leave
    the others waiting on a collective it never joins)."""
    starts = base_start.tolist()
    order = sorted(range(len(starts)), key=starts.__getitem__)
    n = min(n_groups, len(starts))
    cuts = [round(g * len(starts) / n) for g in range(n + 1)]
    groups: list[tuple[list[int], int]] = []
    for g in range(n):
        rows = order[cuts[g]:cuts[g + 1]]
        if merge and groups and groups[-1][1] == starts[rows[0]]:
            groups[-1][0].extend(rows)
        else:
            groups.append((rows, starts[rows[0]]))
    if len(groups) == 1:
        return [(None, groups[0][1])]
    return [(torch.tensor(rows, device=base_start.device), q0) for rows, q0 in groups]


def _prefix_cache(cache, rows: torch.Tensor | None, q0: int, first_block: int):
    """A DynamicCache with the plain pass's keys/values of positions [0, q0) of `rows`, for the blocks from
    `first_block` on (those the suffix pass runs). The blocks before it get a placeholder of the same
    length, never read: the wrapper and the mask builders take the cached length from block 0."""
    data = []
    for l, (k, v, *_) in enumerate(cache):
        if l < first_block:
            n = k.shape[0] if rows is None else rows.numel()
            k = v = k.new_zeros(()).expand(n, 1, q0, 1)
        else:
            k, v = k[:, :, :q0], v[:, :, :q0]                                     # (B, H_kv, q0, d)
            if rows is not None:
                k, v = k.index_select(0, rows), v.index_select(0, rows)
        data.append((k, v))
    return DynamicCache(ddp_cache_data=data)


def _swap_suffix(states: torch.Tensor, source: torch.Tensor, plan: InterventionPlan, rows, q0: int):
    """Intervention fn on a suffix pass's states (G, S - q0, D): the spans of `rows` from `source` (B, S, D)."""
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
    return interchange_reference(states, pick(plan.pi), pick(plan.base_start) - q0, pick(plan.source_start),
                                 pick(plan.span_len), plan.dims, source=source)


def counterfactual_suffix_hidden(model: IntervenableMLM, sites: dict[int, torch.Tensor], attention_mask, layers,
                                 plan: InterventionPlan, cache, plain_last: torch.Tensor, groups,
                                 impl: str = "auto", swapped: torch.Tensor | None = None,
                                 padded: bool | None = None, swaps: list | None = None) -> torch.Tensor:
    """Causal LMs: the counterfactual last hidden states (B, S, D), as `counterfactual_last_hidden` gives
    them, computing only what the swap can change.

    Position t depends on positions <= t only, so a swap at [b, b + k) leaves every position < b as in the
    plain pass, in every block: there the counterfactual last states are `plain_last`, and the keys/values
    the later blocks attend to are the plain pass's (`cache`, a DynamicCache the plain pass filled). Each
    group of rows (`suffix_groups`: rows, q0 <= their b) resumes from the block after the site for the
    positions [q0, S) only, over the cached keys/values of [0, q0); the positions [q0, b) it recomputes
    equal the plain ones. The gradient reaches the cached keys/values, i.e. the plain pass, as the naive
    counterfactual pass's own prefix (the same values from the same weights) would carry it.
    """
    S, a0 = attention_mask.shape[1], layers[0]
    if cache.get_seq_length() != S:
        raise RuntimeError(f"the plain pass left {cache.get_seq_length()} of {S} positions in its key/value "
                           "cache (a block that wrote none, e.g. under transformers' own gradient checkpointing "
                           "outside IntervenableLM): the counterfactual suffix "
                           "passes need them all")
    if swapped is None:
        swapped = ops.interchange(sites[a0], plan.pi, plan.base_start, plan.source_start, plan.span_len,
                                  plan.dims, impl=impl)                                      # (B, S, D)
    parts, order = [], []
    for g, (rows, q0) in enumerate(groups):
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))  # noqa: E731
        if swaps:  # the positions made on the CPU (StepIndex.swaps)
            later = {l: partial(_swap_at, source=sites[l], swap=swaps[g], dims=plan.dims) for l in layers[1:]}
        else:
            later = {l: partial(_swap_suffix, source=sites[l], plan=plan, rows=rows, q0=q0) for l in layers[1:]}
        past = _prefix_cache(cache, rows, q0, a0 + 1) if q0 else None
        out = model(None, pick(attention_mask), resume_from=a0 + 1, states=pick(swapped)[:, q0:],
                    interventions=later, cache=past, padded=padded).last_hidden             # (G, S - q0, D)
        parts.append(torch.cat([pick(plain_last)[:, :q0], out], 1))                         # (G, S, D)
        if rows is not None:
            order.append(rows)
    if not order:
        return parts[0]
    return torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)))               # (B, S, D)


def _causal_logit_terms(teacher, student, s_last, t_last, s_cf, t_cf, index: StepIndex, cfg: DistillConfig):
    """ce, mlm (the next-token CE) and iit of a causal step, from last states (B, S, D); s_cf None: no iit.

    The rows each head-loss call reads come from `index` (`step_index`, made on the CPU). "affected": iit at
    the real positions >= b with a next token. "all": a position t < b has the same counterfactual logits as
    plain ones, so its iit KL is its ce KL; the base head loss is split at b, the KL before b computed once
    serves both terms (weighted w_ce + w_iit), and only the positions >= b take counterfactual logits. With
    different divergences for ce and iit the positions before b take the plain logits' head loss twice, once
    with each divergence.
    """
    w_ce, w_lm, w_iit = cfg.w_ce, cfg.w_mlm, (cfg.w_iit if s_cf is not None else 0.0)
    div_ce, div_iit = cfg.divergence("ce"), cfg.divergence("iit")
    terms = {}

    def head(h_s, h_t, name, kd_w, lm_w, div):
        rows, kd, labels = index.heads[name]                                         # (N,) each
        return head_losses(teacher, student, _rows(h_s, rows), _rows(h_t, rows), labels, cfg, kd_weight=kd_w,
                           lm_weight=lm_w if labels is not None else 0.0, kd_mask=kd, divergence=div)

    if not w_iit or cfg.logit_tokens_for("causal") == "affected":
        if w_ce or w_lm:
            ce, mlm = head(s_last, t_last, "base", w_ce, w_lm, div_ce)
            terms.update(_weighted_only({"ce": ce, "mlm": mlm}, cfg))
        if w_iit:
            terms["iit"], _ = head(s_cf, t_cf, "cf", w_iit, 0.0, div_iit)
        return terms

    # "all": before b the KL of one base head loss serves ce and iit; from b on, ce and iit each take theirs
    f_pre, f_post, g_pre, g_post = (index.scales[k] for k in ("f_pre", "f_post", "g_pre", "g_post"))
    if div_ce == div_iit:
        ce_pre, mlm_pre = head(s_last, t_last, "pre", (w_ce + w_iit) * f_pre, w_lm * g_pre, div_ce)
        iit_pre = ce_pre
    else:
        iit_pre, _ = head(s_last, t_last, "pre", w_iit * f_pre, 0.0, div_iit)
        ce_pre, mlm_pre = (head(s_last, t_last, "pre", w_ce * f_pre, w_lm * g_pre, div_ce) if (w_ce or w_lm)
                           else (iit_pre.new_zeros(()), iit_pre.new_zeros(())))
    zero = ce_pre.new_zeros(())
    ce_post, mlm_post = (head(s_last, t_last, "post", w_ce * f_post, w_lm * g_post, div_ce) if (w_ce or w_lm)
                         else (zero, zero))
    iit_post, _ = head(s_cf, t_cf, "cf", w_iit * f_post, 0.0, div_iit)
    terms.update(_weighted_only({"ce": ce_pre * f_pre + ce_post * f_post,
                                 "mlm": mlm_pre * g_pre + mlm_post * g_post}, cfg))
    terms["iit"] = iit_pre * f_pre + iit_post * f_post
    return terms


def fast_causal_step(teacher, student, batch, plan, cfg: DistillConfig, index: StepIndex
                     ) -> dict[str, torch.Tensor]:
    """The fast step for causal LMs (see the module docstring and `counterfactual_suffix_hidden`)."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    tt = batch.get("token_type_ids")
    tokens = am.bool()                                                # (B, S) real positions of the base
    padded = index.padded
    impl = _impl(cfg)
    iit = cfg.uses_iit
    group, s_l = (plan.teacher_layers, plan.student_layer) if plan is not None else ((), None)
    t_keep = set(group) if (iit or cfg.w_mse) else set()
    s_keep = {s_l} if (iit or cfg.w_mse) else set()

    # 1-2. the plain passes; with a counterfactual to come they also keep every block's keys/values
    t_cache, s_cache = (DynamicCache(), DynamicCache()) if iit else (None, None)
    with torch.no_grad():
        t = teacher(ids, am, tt, keep=t_keep, cache=t_cache, padded=padded)
    with student_autocast(cfg, ids.device):
        s = student(ids, am, tt, keep=s_keep, cache=s_cache, padded=padded)

    terms = {}
    if cfg.w_cos:
        terms["cos"] = ops.hidden_loss(s.last_hidden, t.last_hidden.to(s.last_hidden.dtype), tokens, "cos",
                                       impl=impl)
    if not iit:
        terms.update(_causal_logit_terms(teacher, student, s.last_hidden, t.last_hidden, None, None, index, cfg))
        if cfg.w_mse:
            terms["mse"] = _site_mse(student, s.sites[s_l], t.sites[group[-1]], tokens, impl)
        return terms

    # 3. counterfactual: swap at the site, resume from the block after it, from each group's q0 on
    groups = index.groups
    with torch.no_grad():
        h_cf_t = counterfactual_suffix_hidden(teacher, t.sites, am, group, plan, t_cache, t.last_hidden, groups,
                                              impl, padded=padded, swaps=index.swaps)        # (B, S, Dt)
    with student_autocast(cfg, ids.device):
        cf_s = _student_site_swap(student, s.sites[s_l], t.sites[group[-1]], tokens, plan, cfg, impl, terms)
        h_cf_s = counterfactual_suffix_hidden(student, s.sites, am, (s_l,), plan, s_cache, s.last_hidden,
                                              groups, impl, swapped=cf_s, padded=padded)     # (B, S, Ds)

    terms.update(_causal_logit_terms(teacher, student, s.last_hidden, t.last_hidden,
                                     h_cf_s if cfg.w_iit else None, h_cf_t, index, cfg))
    if cfg.w_iit_cos:
        cols = torch.arange(am.shape[1], device=am.device)
        aff = cols[None] >= plan.base_start[:, None]                  # (B, S) positions the swap can change
        cf_tokens = tokens & aff if cfg.logit_tokens_for("causal") == "affected" else tokens
        terms["iit_cos"] = ops.hidden_loss(h_cf_s, h_cf_t.to(h_cf_s.dtype), cf_tokens, "cos", impl=impl)
    return terms


# ---------------------------------------------------------------------------------------------------
# the step's index: what the fast step reads, from the CPU batch and plan (no host sync in the step)
# ---------------------------------------------------------------------------------------------------

def _rows(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """States (B, S, D) at flat positions rows (N,): (N, D), a gather of known size (no host sync)."""
    return h.reshape(-1, h.shape[-1]).index_select(0, rows)


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


_logged: set[str] = set()


# ---------------------------------------------------------------------------------------------------
# naive: the published structure, three full passes per model
# ---------------------------------------------------------------------------------------------------

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
