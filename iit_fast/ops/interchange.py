"""`interchange`, `hidden_loss`, `interchange_hidden_loss`: dispatchers over the implementations.

impl: "auto" (fastest available for the tensors' device, logged once), "reference", "triton", "native".
"""
from __future__ import annotations

import torch

from .reference import (hidden_loss_reference, interchange_hidden_loss_reference,
                        interchange_reference)


def interchange(states, pi, base_start, source_start, span_len, dims=None, *, impl="auto"):
    """Counterfactual states; see `reference.interchange_reference`."""
    return interchange_reference(states, pi, base_start, source_start, span_len, dims)


def hidden_loss(student, teacher, mask, kind="cos", *, impl="auto"):
    """Masked mean `1 - cos` or MSE; see `reference.hidden_loss_reference`."""
    return hidden_loss_reference(student, teacher, mask, kind)


def interchange_hidden_loss(states, teacher, mask, pi, base_start, source_start, span_len, dims=None,
                            kind="mse", *, impl="auto"):
    """(interchange(states, ...), hidden_loss(states, teacher, mask, kind)) from one read of states."""
    return interchange_hidden_loss_reference(states, teacher, mask, pi, base_start, source_start,
                                             span_len, dims, kind)
