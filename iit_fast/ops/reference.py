"""Plain PyTorch references of the fused ops (DESIGN.md section 3).

These are the ground truth every fast path is tested against: readable, autograd does the backward,
no cleverness. They promote, never cast down: arithmetic runs in `compute_dtype(x) =
promote_types(x.dtype, float32)`, so bf16/fp16 inputs are computed in fp32 and fp64 inputs stay fp64 (the
naive step on fp64 inputs is an fp64 ground truth). The fused implementations in `iit_fast.ops.*` (Triton on CUDA, native C++ on CPU) must
return the same values and gradients.

Shapes: B rows, S positions, D hidden dims, V vocabulary, N tokens (flattened real tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in: x's dtype promoted to at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def span_positions(base_start: torch.Tensor, source_start: torch.Tensor, span_len: torch.Tensor):
    """Flattened (row, base position, source position) triples of every swapped token.

    base_start, source_start, span_len: (B,) long. Returns three (K,) long tensors, K = span_len.sum().
    """
    rows = torch.repeat_interleave(torch.arange(span_len.numel(), device=span_len.device), span_len)
    # offset of each token inside its own span: 0..k_i-1
    first = torch.cumsum(span_len, 0) - span_len
    offset = torch.arange(rows.numel(), device=span_len.device) - first[rows]
    return rows, base_start[rows] + offset, source_start[rows] + offset


def interchange_reference(
    states: torch.Tensor,           # (B, S, D) site states of a batch
    pi: torch.Tensor,               # (B,) long: row i takes its source from row pi[i]
    base_start: torch.Tensor,       # (B,) long
    source_start: torch.Tensor,     # (B,) long
    span_len: torch.Tensor,         # (B,) long, >= 1
    dims: tuple[int, int] | None = None,  # half-open slice of D that is swapped; None = all of D
    source: torch.Tensor | None = None,   # (B', S', D): take sources from here instead of `states`
) -> torch.Tensor:
    """Counterfactual states: out[i, bs_i + j, dims] = src[pi[i], ss_i + j, dims] for j < k_i; else states.

    Gradient (autograd here): d states = d out with the swapped entries zeroed, plus, scattered,
    d src[pi[i], ss_i + j, dims] += d out[i, bs_i + j, dims]. With source=None both land in `states`.
    """
    src = states if source is None else source
    rows, bpos, spos = span_positions(base_start, source_start, span_len)
    d0, d1 = (0, states.shape[-1]) if dims is None else dims
    out = states.clone()
    out[rows, bpos, d0:d1] = src[pi[rows], spos, d0:d1]
    return out


def hidden_loss_reference(
    student: torch.Tensor,  # (..., D)
    teacher: torch.Tensor,  # (..., D), same shape
    mask: torch.Tensor,     # (...) bool or 0/1: tokens that count
    kind: str = "cos",
) -> torch.Tensor:
    """Mean over masked tokens of `1 - cos(s, t)` (kind="cos") or of `mean_d (s - t)^2` (kind="mse").

    Computed in compute_dtype(student) (fp32, fp64 stays fp64). No masked token gives 0, not NaN.
    """
    dtype = compute_dtype(student)
    s, t = student.to(dtype), teacher.to(dtype)
    m = mask.to(dtype)
    if kind == "cos":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    elif kind == "mse":
        per_token = (s - t).pow(2).mean(-1)
    else:
        raise ValueError(f"hidden_loss kind must be 'cos' or 'mse', got {kind!r}")
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def interchange_hidden_loss_reference(
    states: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
    pi: torch.Tensor, base_start: torch.Tensor, source_start: torch.Tensor, span_len: torch.Tensor,
    dims: tuple[int, int] | None = None, kind: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in one: (interchange(states, ...), hidden_loss(states, teacher, mask, kind)).

    The loss is taken on the plain (not intervened) student site states against the teacher's states at
    the same aligned site; the counterfactual states are built from the same read of `states`.
    """
    return (interchange_reference(states, pi, base_start, source_start, span_len, dims),
            hidden_loss_reference(states, teacher, mask, kind))


def distill_head_loss_reference(
    student_hidden: torch.Tensor,   # (N, D) student states after the MLM head transform
    teacher_hidden: torch.Tensor,   # (N, Dt) teacher states after its head transform
    student_weight: torch.Tensor,   # (V, D) student decoder weight (tied to word embeddings)
    student_bias: torch.Tensor,     # (V,)
    teacher_weight: torch.Tensor,   # (V, Dt)
    teacher_bias: torch.Tensor,     # (V,)
    labels: torch.Tensor | None,    # (N,) long, -100 = no MLM target
    kd_mask: torch.Tensor | None,   # (N,) bool: tokens in the KL mean; None = all N
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused: full logits, then (ce, mlm).

    ce  = T^2 * mean over kd tokens of KL(softmax(z_t / T) || softmax(z_s / T))
    mlm = mean over labelled tokens of cross-entropy(z_s, label)
    Both are 0 (not NaN) when no token counts. The matmuls run in the inputs' dtype (as nn.Linear); the
    softmaxes, KL and CE in compute_dtype of the logits (fp32, or fp64 for fp64 inputs).
    """
    z_s = student_hidden @ student_weight.t()
    z_s = z_s + student_bias if student_bias is not None else z_s
    z_s = z_s.to(compute_dtype(z_s))
    with torch.no_grad():
        z_t = teacher_hidden @ teacher_weight.t()
        z_t = z_t + teacher_bias if teacher_bias is not None else z_t
        z_t = z_t.to(compute_dtype(z_t))
    ce = kd_loss_reference(z_s, z_t, kd_mask, temperature)
    mlm = mlm_loss_reference(z_s, labels) if labels is not None else z_s.new_zeros(())
    return ce, mlm


def kd_loss_reference(z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor | None,
                      temperature: float) -> torch.Tensor:
    """T^2 * masked mean over tokens of KL(softmax(z_t/T) || softmax(z_s/T)); z_*: (..., V)."""
    T = temperature
    dtype = torch.promote_types(compute_dtype(z_s), compute_dtype(z_t))
    log_p_s = F.log_softmax(z_s.to(dtype) / T, dim=-1)
    log_p_t = F.log_softmax(z_t.to(dtype) / T, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is None:
        return T * T * per_token.mean() if per_token.numel() else per_token.sum()
    m = mask.to(per_token.dtype)
    return T * T * (per_token * m).sum() / m.sum().clamp_min(1.0)


def mlm_loss_reference(z_s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens (label != -100); 0 when none."""
    z = z_s.reshape(-1, z_s.shape[-1])
    z = z.to(compute_dtype(z))
    y = labels.reshape(-1)
    n = (y != -100).sum()
    return F.cross_entropy(z, y, ignore_index=-100, reduction="sum") / n.clamp_min(1)
