"""The six loss terms of causal distillation, in plain PyTorch (DESIGN.md section 1).

"tokens" are the non-pad tokens of the base; every mean is over the tokens that count, computed in fp32,
and is 0 (not NaN) when no token counts.

| term      | formula                                              | default weight |
| `ce`      | T^2 * KL(softmax(z_t/T) || softmax(z_s/T))           | 0.25 |
| `mlm`     | cross-entropy of z_s on the MLM targets              | 0.25 |
| `cos`     | 1 - cos(h_s, h_t), last hidden states                | 0.25 |
| `iit`     | T^2 * KL(softmax(z~_t/T) || softmax(z~_s/T))         | 0.25 |
| `iit_cos` | 1 - cos(h~_s, h~_t)                                  | 0    |
| `mse`     | hidden-state MSE at the aligned sites                | 0    |
"""
from __future__ import annotations

import torch

from .config import DistillConfig
from .ops.reference import hidden_loss_reference, kd_loss_reference, mlm_loss_reference

TERMS = ("ce", "mlm", "cos", "iit", "iit_cos", "mse")


def ce_loss(z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor | None, temperature: float):
    """Soft-target distillation: T^2 * mean over masked tokens of KL(teacher || student) at temperature T."""
    return kd_loss_reference(z_s, z_t, mask, temperature)


def iit_loss(z_cf_s: torch.Tensor, z_cf_t: torch.Tensor, mask: torch.Tensor | None, temperature: float):
    """The interchange-intervention objective: `ce` on the counterfactual logits."""
    return kd_loss_reference(z_cf_s, z_cf_t, mask, temperature)


def mlm_loss(z_s: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy on the MLM targets (labels != -100)."""
    return mlm_loss_reference(z_s, labels)


def cos_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor):
    """1 - cos(h_s, h_t) per token, mean over masked tokens. Student and teacher widths must agree."""
    if h_s.shape[-1] != h_t.shape[-1]:
        raise ValueError(f"the cos loss needs equal hidden sizes, got student {h_s.shape[-1]} and teacher "
                         f"{h_t.shape[-1]}; set w_cos = w_iit_cos = 0 or use a student of the teacher's width")
    return hidden_loss_reference(h_s, h_t, mask, "cos")


def mse_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor):
    """Mean over masked tokens of the mean squared difference over hidden dims."""
    return hidden_loss_reference(h_s, h_t, mask, "mse")


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
