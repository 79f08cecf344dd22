"""Plain PyTorch references of `interchange`, `hidden_loss` and `interchange_hidden_loss` (docs/method.md section 3).

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

from .._common import compute_dtype


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
