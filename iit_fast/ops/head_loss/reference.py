"""Plain PyTorch references of the head loss (docs/method.md section 3): full logits, autograd, no cleverness.

The ground truth `distill_head_loss` is tested against; they promote, never cast down (`compute_dtype`:
bf16/fp16 computed in fp32, fp64 stays fp64). Shapes: N tokens, D hidden dims, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import compute_dtype
from .divergence import as_divergence, divergence_loss_reference


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
    divergence=None,                # divergence.Divergence of ce (or a name); None = forward KL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused: full logits, then (ce, mlm).

    ce  = T^2 * mean over kd tokens of KL(softmax(z_t / T) || softmax(z_s / T)) (or of `divergence`)
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
    ce = kd_loss_reference(z_s, z_t, kd_mask, temperature, divergence)
    mlm = mlm_loss_reference(z_s, labels) if labels is not None else z_s.new_zeros(())
    return ce, mlm


def kd_loss_reference(z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor | None,
                      temperature: float, divergence=None) -> torch.Tensor:
    """T^2 * masked mean over tokens of KL(softmax(z_t/T) || softmax(z_s/T)); z_*: (..., V). Another
    `divergence` (a divergence.Divergence or name; None = forward KL) by its textbook formula."""
    div = as_divergence(divergence)
    if not div.is_forward_kl:
        return divergence_loss_reference(div, z_s, z_t, mask, temperature)
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
