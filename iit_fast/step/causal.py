"""The fast step for causal LMs (GPT-2, Llama, Qwen2, Mistral): the counterfactual passes compute only
what the swap can change (`counterfactual_suffix_hidden`; the package docstring says why that is exact).
"""
from __future__ import annotations

from functools import partial

import torch
from transformers import DynamicCache

from .. import ops
from ..config import DistillConfig
from ..models import IntervenableMLM
from ..ops.interchange.reference import interchange_reference
from ..precision import student_autocast
from ..sampling import InterventionPlan, StepIndex
from .common import (_impl, _rows, _site_mse, _student_site_swap, _swap_at, _weighted_only, head_losses,
                     kept_sites)


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
    group, s_l, t_keep, s_keep = kept_sites(plan, cfg)

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
