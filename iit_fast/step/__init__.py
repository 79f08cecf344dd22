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
`ops/<op>/reference.py` (what the naive step calls); the fast step computes the same terms with the fused ops,
and `tests/test_step.py` holds the two equal.

| term      | formula                                              | default weight |
|-----------|------------------------------------------------------|----------------|
| `ce`      | T^2 * KL(softmax(z_t/T) || softmax(z_s/T))           | 0.25 |
| `mlm`     | cross-entropy of z_s on the MLM targets              | 0.25 |
| `cos`     | 1 - cos(h_s, h_t), last hidden states                | 0.25 |
| `iit`     | T^2 * KL(softmax(z~_t/T) || softmax(z~_s/T))         | 0.25 |
| `iit_cos` | 1 - cos(h~_s, h~_t)                                  | 0    |
| `mse`     | hidden-state MSE at the aligned sites                | 0    |

The package: `distill.py` (distill_step, DistillStep, check_pair), `masked.py` (the fast step of masked
LMs), `causal.py` (the fast step of causal LMs: the counterfactual suffix passes), `index.py` (step_index,
made on the CPU), `naive.py` (the naive step), `common.py` (the weighted total, the head losses, the swaps).
"""
from .causal import counterfactual_suffix_hidden, fast_causal_step, next_token_targets, suffix_groups
from .common import head_losses, kept_sites, shared_vocab, weighted_total
from .distill import DistillStep, StepOutput, check_pair, distill_step, fast_step
from .index import step_index
from .masked import counterfactual_last_hidden, fast_masked_step
from .naive import naive_step

__all__ = ["DistillStep", "StepOutput", "check_pair", "counterfactual_last_hidden", "counterfactual_suffix_hidden",
           "distill_step", "fast_causal_step", "fast_masked_step", "fast_step", "head_losses", "kept_sites",
           "naive_step", "next_token_targets", "shared_vocab", "step_index", "suffix_groups", "weighted_total"]
