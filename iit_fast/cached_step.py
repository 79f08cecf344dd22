"""The distillation step from an offline teacher cache: no teacher forward at all (docs/method.md section 5).

    cache = TeacherCache.open(dir, expect=fingerprint_fields(...))     # iit_fast.teacher_cache
    batches = CacheBatches(cache, batch_size, seed=seed, rank=rank, world_size=world)
    for cb in batches.forever():
        out = cached_distill_step(student, cb.to(device), cfg)          # StepOutput, as step.distill_step
        out.loss.backward()

A batch is made of whole pairs (the cache's fixed partners): rows 2j and 2j+1 are each other's source,
so `pi = arange(B) ^ 1`. Each epoch every pair draws one of its M cached plans (seeded by (seed, epoch,
pair)); a plan's alignment pair is the pair's, so the rows of one alignment pair form a sub-batch closed
under `pi`, and the student resumes once per alignment pair present (once, with one pair in the map).

The terms, as in the online fast step (step.fast_step / step.fast_causal_step), the teacher side read from
the cache:
- `ce`, `mlm`: the student's decoder fused with the sparse top-k KL (+ the rest bucket) and the MLM CE,
  chunked (ops/head_loss/sparse.py): the student's log-sum-exp runs over the whole vocabulary, no (N, V) tensor
  is whole, the gradient is produced in the forward;
- `cos`: against the cached last hidden states (the cache must have been built with --hidden);
- `iit`: the student's counterfactual pass resumed from its site with the cached plan
  (`step.counterfactual_last_hidden`), against the cached counterfactual top-k.
`iit_cos` and `mse` need teacher states the cache does not hold: their weights must be 0.

Causal teachers (`cached_causal_step`): `ce` and the next-token CE (`mlm`) at every real position with a real
next token; `iit` at the positions >= each row's base-span start (the cache holds the counterfactual targets
there only), the student's counterfactual resumed from its site for those positions only
(`step.counterfactual_suffix_hidden`, as the online fast causal step); with `logit_tokens` "all" the
positions before the span start take the base targets (their counterfactual is the plain pass).
With K = V and fp32 values the terms and gradients equal the online step's (tests/test_teacher_cache.py,
tests/test_cached_causal.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import DistillConfig
from .precision import student_autocast
from .ops import hidden_loss
from .ops.head_loss.sparse import sparse_distill_head_loss
from .sampling import InterventionPlan
from .step import (StepOutput, counterfactual_last_hidden, counterfactual_suffix_hidden, next_token_targets,
                   suffix_groups, weighted_total)
from .teacher_cache import TeacherCache, derived_seed



@dataclass
class CachedBatch:
    """One batch of whole pairs read from a cache, with everything its step needs."""
    batch: dict[str, torch.Tensor]      # input_ids, attention_mask, labels, token_type_ids: (B, S) long
    base: tuple                         # teacher targets at the loss tokens, row-major: logp (N, K), ids, rest (N,)
    cf: tuple                           # the same for the counterfactual of each row's drawn plan
    hidden: torch.Tensor | None         # (B, S, D) teacher last hidden states (zeros at padding) or None
    base_start: torch.Tensor            # (B,) long
    source_start: torch.Tensor          # (B,) long
    span_len: torch.Tensor              # (B,) long
    align: torch.Tensor                 # (B,) long: index into `alignment` (a pair's two rows share it)
    alignment: list                     # the cache's [(teacher blocks, student block), ...]
    logit_tokens: str
    temperature: float
    dims: tuple[int, int] | None = None
    kind: str = "masked"                # the teacher's: "masked" or "causal"

    def to(self, device) -> "CachedBatch":
        mv = lambda t: t.to(device, non_blocking=True) if torch.is_tensor(t) else t  # noqa: E731
        return CachedBatch({k: mv(v) for k, v in self.batch.items()}, tuple(map(mv, self.base)),
                           tuple(map(mv, self.cf)), mv(self.hidden), mv(self.base_start), mv(self.source_start),
                           mv(self.span_len), mv(self.align), self.alignment, self.logit_tokens, self.temperature,
                           self.dims, self.kind)

    @property
    def pi(self) -> torch.Tensor:
        """(B,) each row's source: its partner."""
        return torch.arange(self.align.numel(), device=self.align.device) ^ 1

    def kd_mask(self) -> torch.Tensor:
        """(B, S) bool: the positions of the base targets (ce): masked, the loss tokens; causal, every real
        position with a real next token."""
        b = self.batch
        if self.kind == "causal":
            return next_token_targets(b["attention_mask"], b["labels"])[0]
        return b["attention_mask"].bool() if self.logit_tokens == "all" else b["labels"] != -100

    def cf_mask(self) -> torch.Tensor:
        """(B, S) bool: the positions of the counterfactual targets: masked, the loss tokens; causal, those
        >= the row's base-span start (the only ones a swap can change)."""
        kd = self.kd_mask()
        if self.kind != "causal":
            return kd
        cols = torch.arange(kd.shape[1], device=kd.device)[None]
        return kd & (cols >= self.base_start[:, None])

    def groups(self) -> list[tuple[torch.Tensor | None, InterventionPlan]]:
        """(rows, plan) per alignment pair present: the rows (None = all, in order) form whole pairs, and
        the plan's pi is local to them. The one-pair case is the online step's plan for the whole batch."""
        present = self.align.unique().tolist()
        out = []
        for a in present:
            rows = None if len(present) == 1 else (self.align == a).nonzero().squeeze(1)
            pick = (lambda t: t) if rows is None else (lambda t, r=rows: t[r])
            group, s_l = self.alignment[a]
            n = self.align.numel() if rows is None else rows.numel()
            pi = torch.arange(n, device=self.align.device) ^ 1
            out.append((rows, InterventionPlan(tuple(group), s_l, pi, pick(self.base_start), pick(self.source_start),
                                               pick(self.span_len), self.dims)))
        return out


class CacheBatches:
    """Training batches from a cache: whole pairs, shuffled per epoch by (seed, epoch), batch j of an epoch
    to rank j % world_size (every rank the same count, a last partial batch dropped), each pair's plan
    drawn per epoch by (seed, epoch, pair). Resumable like batches.Batches (`state_dict` after a step resumes
    at the next batch)."""

    def __init__(self, cache: TeacherCache, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 pad_to_multiple_of: int = 8):
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size: {batch_size}; expected an even number >= 2 (a batch is whole pairs)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank}; expected 0 <= rank < world_size={world_size}")
        self.cache, self.pairs_per_batch, self.seed = cache, batch_size // 2, seed
        self.rank, self.world_size, self.pad_to_multiple_of = rank, world_size, pad_to_multiple_of
        self.epoch, self.batch_index = 0, 0
        if len(self) == 0:
            raise ValueError(f"batch_size: {batch_size} x world_size {world_size} is more than the cache's "
                             f"{cache.num_pairs} pairs ({2 * cache.num_pairs} rows); expected fewer")

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """(n, pairs_per_batch) pair ids of this rank's batches of `epoch`."""
        g = torch.Generator().manual_seed(derived_seed("epoch", self.seed, epoch))
        order = torch.randperm(self.cache.num_pairs, generator=g)
        P = self.pairs_per_batch
        batches = order[: len(order) // P * P].view(-1, P)
        per_rank = len(batches) // self.world_size
        return batches[self.rank::self.world_size][:per_rank]

    def plan_of(self, epoch: int, pair: int) -> int:
        g = torch.Generator().manual_seed(derived_seed("plan draw", self.seed, epoch, pair))
        return int(torch.randint(self.cache.plans, (1,), generator=g))

    def batch(self, epoch: int, j: int) -> CachedBatch:
        pairs = self.epoch_batches(epoch)[j].tolist()
        return collate_pairs(self.cache, pairs, [self.plan_of(epoch, p) for p in pairs], self.pad_to_multiple_of)

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __iter__(self):
        epoch = self.epoch
        n = len(self.epoch_batches(epoch))
        while self.batch_index < n:
            cb = self.batch(epoch, self.batch_index)
            self.batch_index += 1  # consumed once handed out
            yield cb
        self.epoch, self.batch_index = epoch + 1, 0

    def forever(self):
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "batch_index": int(self.batch_index)}

    def load_state_dict(self, state: dict) -> None:
        epoch, j = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= j <= len(self.epoch_batches(max(epoch, 0))):
            raise ValueError(f"state: epoch {epoch}, batch_index {j}; expected epoch >= 0 and 0 <= batch_index "
                             f"<= {len(self.epoch_batches(max(epoch, 0)))}")
        self.epoch, self.batch_index = epoch, j


def collate_pairs(cache: TeacherCache, pairs: list[int], plans: list[int], pad_to_multiple_of: int = 8) -> CachedBatch:
    """The batch of `pairs` (rows 2i, 2i+1 = pair i), each with its plan: right-padded to the longest row
    rounded up to `pad_to_multiple_of`."""
    read = [cache.read_pair(p, m) for p, m in zip(pairs, plans)]
    seqs = [s for r in read for s in r["input_ids"]]
    labs = [s for r in read for s in r["labels"]]
    B, m = len(seqs), pad_to_multiple_of
    S = max(len(s) for s in seqs)
    S = -(-S // m) * m
    ids = torch.full((B, S), cache.meta["pad_id"], dtype=torch.long)              # (B, S)
    labels = torch.full((B, S), -100, dtype=torch.long)
    am = torch.zeros(B, S, dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labs)):
        ids[i, :len(s)], labels[i, :len(s)], am[i, :len(s)] = s, y, 1
    hidden = None
    if cache.has_hidden:
        hidden = torch.zeros(B, S, cache.meta["hidden_size"], dtype=read[0]["hidden"].dtype)   # (B, S, D)
        hidden[am.bool()] = torch.cat([r["hidden"] for r in read])
    cat = lambda key, i: torch.cat([r[key][i] for r in read])                    # noqa: E731
    row = lambda key: torch.cat([r[key] for r in read])                           # noqa: E731
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    if cache.kind == "masked":
        batch["token_type_ids"] = torch.zeros_like(ids)
    return CachedBatch(batch, tuple(cat("base", i) for i in range(3)), tuple(cat("cf", i) for i in range(3)), hidden,
                       row("base_start"), row("source_start"), row("span_len"),
                       torch.tensor([r["align"] for r in read]).repeat_interleave(2), cache.alignment,
                       cache.logit_tokens, cache.temperature, cache.dims, cache.kind)


# ---------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------

def check_cached_config(cfg: DistillConfig, cb: CachedBatch) -> None:
    """The step's config must ask for what the cache holds; a ValueError naming the field otherwise."""
    if cfg.mode not in ("fast", "standard"):
        raise ValueError(f"DistillConfig.mode {cfg.mode!r}: a cached teacher runs the fast or standard step")
    if cb.kind == "causal":
        cfg.logit_tokens_for("causal")  # "all" and "affected" read the same targets; others are refused
    elif _logit_tokens(cfg) != cb.logit_tokens:
        raise ValueError(f"DistillConfig.logit_tokens {cfg.logit_tokens!r}, but the cache holds the teacher at "
                         f"{cb.logit_tokens!r} tokens")
    if getattr(cfg, "shared_vocab", None) is not None:
        raise ValueError("DistillConfig.shared_vocab must be None with a cached teacher: the cached ids index the "
                         "teacher's whole vocabulary")
    if cfg.temperature != cb.temperature:
        raise ValueError(f"DistillConfig.temperature {cfg.temperature}, but the cache holds log-probs at "
                         f"temperature {cb.temperature}")
    if cfg.w_iit_cos or cfg.w_mse:
        raise ValueError("DistillConfig.w_iit_cos and w_mse must be 0 with a cached teacher: the cache holds no "
                         "teacher counterfactual or site states")
    if cfg.w_cos and cb.hidden is None:
        raise ValueError("DistillConfig.w_cos > 0 needs the teacher's hidden states: build the cache with --hidden "
                         "or set w_cos = 0")
    if cfg.uses_iit and cfg.dims != cb.dims:
        raise ValueError(f"DistillConfig.dims {cfg.dims}, but the cache's plans swap dims {cb.dims}")


def _logit_tokens(cfg: DistillConfig) -> str:
    """cfg.logit_tokens for a masked LM ("auto" resolved where the config knows "auto")."""
    return cfg.logit_tokens_for("masked") if hasattr(cfg, "logit_tokens_for") else cfg.logit_tokens



def sparse_head_losses(student, h_s: torch.Tensor, targets: tuple, labels: torch.Tensor | None,
                       cfg: DistillConfig, kd_weight: float, lm_weight: float, divergence=None):
    """(ce, mlm) of N loss tokens from the student's last states h_s (N, D) against cached sparse targets;
    ce by `divergence` (None = forward KL) between the top-k + rest bucket distributions."""
    logp, ids, rest = targets
    with student_autocast(cfg, h_s.device):
        hs = student.head_transform(h_s)                                          # (N, D)
        # the decoder read directly: under ZeRO-3 the engine gathers it (engine.init_engine)
        return sparse_distill_head_loss(hs, student.decoder_weight, student.decoder_bias, logp, ids, rest, labels,
                                        cfg.temperature, chunk_size=cfg.head_chunk,
                                        impl="chunked" if cfg.ops == "fused" else "reference",
                                        kd_weight=kd_weight, lm_weight=lm_weight, divergence=divergence)


def _plain_terms(student, last: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor,
                 cb: CachedBatch, cfg: DistillConfig, impl: str) -> dict[str, torch.Tensor]:
    """ce / mlm on the cached base targets at `rows` (B, S) and cos on the real `tokens`: both kinds' first terms."""
    terms = {}
    if cfg.w_ce or cfg.w_mlm:
        ce, mlm = sparse_head_losses(student, last[rows], cb.base, labels[rows], cfg, cfg.w_ce, cfg.w_mlm,
                                     cfg.divergence("ce"))
        terms.update({k: v for k, v in (("ce", ce), ("mlm", mlm)) if getattr(cfg, f"w_{k}")})
    if cfg.w_cos:
        terms["cos"] = hidden_loss(last, cb.hidden.to(last.dtype), tokens, "cos", impl=impl)
    return terms


def cached_step(student, cb: CachedBatch, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The loss terms of one cached batch (the student's graph in them)."""
    if cb.kind == "causal":
        return cached_causal_step(student, cb, cfg)
    b = cb.batch
    ids, am, labels, tt = b["input_ids"], b["attention_mask"], b["labels"], b.get("token_type_ids")
    tokens = am.bool()                                                            # (B, S)
    kd = cb.kd_mask()                                                             # (B, S)
    impl = "auto" if cfg.ops == "fused" else "reference"
    iit = cfg.uses_iit and cfg.w_iit > 0
    groups = cb.groups() if iit else []
    with student_autocast(cfg, ids.device):
        s = student(ids, am, tt, keep={plan.student_layer for _, plan in groups})

    terms = _plain_terms(student, s.last_hidden, kd, labels, tokens, cb, cfg, impl)
    if not iit:
        return terms

    # counterfactual: the student resumes from its site once per alignment pair present
    h_cf, order = [], []
    token_index = torch.full(kd.shape, -1, dtype=torch.long, device=kd.device)    # (B, S) -> row of the targets
    token_index[kd] = torch.arange(int(kd.sum()), device=kd.device)
    with student_autocast(cfg, ids.device):
        for rows, plan in groups:
            l = plan.student_layer
            site = s.sites[l] if rows is None else s.sites[l][rows]
            mask, kd_g = (am, kd) if rows is None else (am[rows], kd[rows])
            h = counterfactual_last_hidden(student, {l: site}, mask, (l,), plan, impl)   # (G, S, D)
            h_cf.append(h[kd_g])
            if rows is not None:
                order.append(token_index[rows][kd_g])
    h_cf = torch.cat(h_cf) if len(h_cf) > 1 else h_cf[0]                          # (N, D)
    cf = cb.cf if not order else tuple(t.index_select(0, torch.cat(order)) for t in cb.cf)
    terms["iit"], _ = sparse_head_losses(student, h_cf, cf, None, cfg, cfg.w_iit, 0.0, cfg.divergence("iit"))
    return terms


def cached_causal_step(student, cb: CachedBatch, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The loss terms of one cached batch of a causal teacher (see the module docstring)."""
    from transformers import DynamicCache
    b = cb.batch
    ids, am, labels = b["input_ids"], b["attention_mask"], b["labels"]
    tokens = am.bool()                                                            # (B, S)
    nxt, y = next_token_targets(am, labels)                                       # (B, S) each
    padded = not bool(tokens.all())
    impl = "auto" if cfg.ops == "fused" else "reference"
    iit = cfg.uses_iit and cfg.w_iit > 0
    groups = cb.groups() if iit else []
    one = len(groups) == 1 and groups[0][0] is None       # one alignment pair: the suffix passes, as online
    s_cache = DynamicCache() if one else None
    with student_autocast(cfg, ids.device):
        s = student(ids, am, None, keep={plan.student_layer for _, plan in groups}, cache=s_cache, padded=padded)

    terms = _plain_terms(student, s.last_hidden, nxt, y, tokens, cb, cfg, impl)
    if not iit:
        return terms

    cf = cb.cf_mask()                                                             # (B, S) nxt, >= b
    with student_autocast(cfg, ids.device):
        if one:
            plan = groups[0][1]
            l = plan.student_layer
            h = counterfactual_suffix_hidden(student, {l: s.sites[l]}, am, (l,), plan, s_cache, s.last_hidden,
                                             suffix_groups(plan.base_start, cfg.suffix_groups, merge=False), impl,
                                             padded=padded)                       # (B, S, D)
            h_cf, targets = h[cf], cb.cf
        else:  # several alignment pairs: each sub-batch of whole pairs resumes from its site (every position)
            token_index = torch.full(cf.shape, -1, dtype=torch.long, device=cf.device)   # (B, S) -> target row
            token_index[cf] = torch.arange(int(cf.sum()), device=cf.device)
            parts, order = [], []
            for rows, plan in groups:
                l = plan.student_layer
                h = counterfactual_last_hidden(student, {l: s.sites[l][rows]}, am[rows], (l,), plan, impl)
                parts.append(h[cf[rows]])
                order.append(token_index[rows][cf[rows]])
            h_cf = torch.cat(parts)
            targets = tuple(t.index_select(0, torch.cat(order)) for t in cb.cf)
    iit_post, _ = sparse_head_losses(student, h_cf, targets, None, cfg, cfg.w_iit, 0.0, cfg.divergence("iit"))
    if cfg.logit_tokens_for("causal") == "affected":
        terms["iit"] = iit_post
        return terms
    # "all": before the span start the counterfactual is the plain pass, so its KL is taken on the base targets
    pre_n = ~cf[nxt]                                                              # (N,) base rows before b
    pre = tuple(t[pre_n] for t in cb.base)
    iit_pre, _ = sparse_head_losses(student, s.last_hidden[nxt][pre_n], pre, None, cfg, cfg.w_iit, 0.0,
                                    cfg.divergence("iit"))
    n_pre, n_post = pre_n.sum(), cf.sum()
    terms["iit"] = (iit_pre * n_pre + iit_post * n_post) / (n_pre + n_post).clamp_min(1)
    return terms


def cached_distill_step(student, cb: CachedBatch, cfg: DistillConfig, *, check: bool = True) -> StepOutput:
    """As step.distill_step, from a cached batch: (loss with the student's graph, detached fp32 terms, tokens)."""
    if check:
        check_cached_config(cfg, cb)
    terms = cached_step(student, cb, cfg)
    loss = weighted_total(terms, cfg)
    return StepOutput(loss, {k: v.detach().float() for k, v in terms.items()}, cb.batch["attention_mask"].sum())


class CachedDistillStep(nn.Module):
    """The cached step as a module for a DeepSpeed engine: `engine(cb)` -> (loss, terms). The student is the
    only submodule; there is no teacher."""

    def __init__(self, student, cfg: DistillConfig):
        super().__init__()
        self.student = student
        self.cfg = cfg

    def forward(self, cb: CachedBatch):
        out = cached_distill_step(self.student, cb, self.cfg)
        return out.loss, out.terms
