"""FLOPs of one distillation step, as each mode computes it: the cost model of docs/method.md, counted
for the batch and plan at hand. Only the benchmarks (MFU, fast/naive against the model) and the tests use it."""
from __future__ import annotations

import torch

from .config import DistillConfig
from .models import IntervenableMLM
from .sampling import InterventionPlan
from .step import next_token_targets, shared_vocab, suffix_groups


def block_flops(model: IntervenableMLM, blocks: range, queries: int, keys: int) -> int:
    """Forward FLOPs of `blocks` for `queries` positions of one row attending over `keys` positions: 2 per
    weight-matrix entry per query (every linear map of the block), plus QK^T and AV, 2 * keys * width each
    (dense attention computes every key, masked or not). Norms, activations and rotary are not counted."""
    c = model.config
    heads = c.num_attention_heads
    width = heads * (getattr(c, "head_dim", None) or c.hidden_size // heads)
    weights = sum(getattr(p, "ds_numel", p.numel()) for l in blocks for p in model.blocks[l].parameters()
                  if p.dim() == 2)
    return queries * (2 * weights + 4 * keys * width * len(blocks))


def _head_flops(model: IntervenableMLM, vocab: int) -> int:
    """Forward FLOPs of the head for one position: its transform's linear maps and the decoder."""
    weights = sum(getattr(p, "ds_numel", p.numel()) for p in model.head_transform.parameters() if p.dim() == 2)
    return 2 * weights + 2 * vocab * model.hidden_size


def counted_flops(teacher: IntervenableMLM, student: IntervenableMLM, batch: dict, plan: InterventionPlan | None,
                  cfg: DistillConfig) -> dict[str, int]:
    """FLOPs of one step on `batch` with `plan`, as each mode computes it: {"naive", "fast",
    "fast_full_suffix", "saved", "head_recompute"}. The teacher runs forward only; the student's backward counts twice its
    forward; losses, norms and the interchange are not counted (O(tokens x width)).

    naive: three full passes per model with full-vocabulary logits (the source pass's backward only below
    the site). fast: one plain pass per model, the counterfactual from the block after the site, logits
    only at the rows a loss takes. For causal LMs the counterfactual runs for positions >= each group's q0
    only and takes logits at positions >= b only; "fast_full_suffix" is the fast step without that reuse
    (every position from the block after the site; counterfactual logits wherever `iit` is taken), and
    "saved" = fast_full_suffix - fast (0 for masked LMs).

    "head_recompute": what the fused head loss adds to "fast" when its backward recomputes the decoder logits
    (both models' (rows, V) GEMMs again, for each call's rows) instead of holding the gradients formed in the
    forward: always on the device path; on the CPU when the decoder's fp32 (V, D) gradient exceeds
    head_resident_grad_mb (ops/head_loss). The model ("fast") leaves it out, as MFU leaves out a checkpointed
    forward's recompute: it is memory bought with FLOPs, not work the method needs.
    """
    am, labels = batch["attention_mask"], batch["labels"]
    B, S = am.shape
    vocab, where = shared_vocab(teacher, cfg), cfg.logit_tokens_for(teacher.kind)
    ht, hs = _head_flops(teacher, vocab), _head_flops(student, vocab)
    t_pass = B * block_flops(teacher, range(teacher.num_layers), S, S)
    s_pass = B * block_flops(student, range(student.num_layers), S, S)
    if teacher.kind == "causal":
        nxt, y = next_token_targets(am, labels)
        base_rows = int((nxt | (y != -100)).sum())
        if cfg.uses_iit:  # counterfactual logits at the positions the swap can change (+ all of them, "all")
            aff = torch.arange(S, device=am.device)[None] >= plan.base_start[:, None]      # (B, S)
            cf_rows = {"fast": nxt & aff, "fast_full_suffix": nxt & aff if where == "affected" else nxt}
    else:
        kd = am.bool() if where == "all" else labels != -100
        base_rows = int((kd | (labels != -100)).sum())
        cf_rows = {"fast": kd, "fast_full_suffix": kd}
    naive_rows = B * S if where != "masked" else int((labels != -100).sum())

    out = {"naive": t_pass + naive_rows * ht + 3 * (s_pass + naive_rows * hs)}
    out["fast"] = out["fast_full_suffix"] = t_pass + base_rows * (ht + 3 * hs) + 3 * s_pass
    if cfg.uses_iit:
        a0, s_l = plan.teacher_layers[0], plan.student_layer
        out["naive"] += (2 * t_pass + 2 * naive_rows * ht + 3 * (s_pass + naive_rows * hs)   # cf, source
                         + s_pass + naive_rows * hs + 2 * B * block_flops(student, range(s_l + 1), S, S))
        causal = teacher.kind == "causal"
        groups = suffix_groups(plan.base_start, cfg.suffix_groups) if causal else [(None, 0)]
        for name, gs in (("fast", groups), ("fast_full_suffix", [(None, 0)])):
            suffix = 0
            for rows, q0 in gs:
                n = B if rows is None else rows.numel()
                suffix += n * (block_flops(teacher, range(a0 + 1, teacher.num_layers), S - q0, S)
                               + 3 * block_flops(student, range(s_l + 1, student.num_layers), S - q0, S))
            out[name] += suffix + int(cf_rows[name].sum()) * (ht + 3 * hs) * (cfg.w_iit > 0)
    out["saved"] = out["fast_full_suffix"] - out["fast"]
    loss_rows = base_rows + (int(cf_rows["fast"].sum()) if cfg.uses_iit and cfg.w_iit > 0 else 0)
    out["head_recompute"] = loss_rows * 2 * vocab * (teacher.hidden_size + student.hidden_size)
    return out
