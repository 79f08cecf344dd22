"""The torch inner step of `distill_head_loss`: one chunk's logits -> (dz, kl_rows, ce_rows).

Interface of every inner step (torch here, C++ in `native.py` / `native.cpp`, Triton in `triton.py`):

    inner(zs, zt, labels, g_kd, g_lab, temperature) -> (dz, kl_rows, ce_rows)

zs/zt are the chunk's (C, V) logits in the accumulation dtype; both may be overwritten; dz may alias either of
them. g_kd, g_lab are the (C,) per-row gradient weights (kd_weight * w_kd, lm_weight * w_lab; g_lab and labels
None: no MLM work); kl_rows / ce_rows (C,) are unweighted (ce_rows None without labels). The chunk loop
(`chunked.py`) owns the matmuls, the weights and the sums.
"""
from __future__ import annotations

import math

import torch

# e^u - 1 - u = sum_{k>=2} u^k / k!, Horner from k = 13 (|u| < 1: truncation < 1e-10 relative)
_SERIES = tuple(1.0 / math.factorial(k) for k in range(13, 1, -1))


def kl_rows_torch(p_s: torch.Tensor, p_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_t || p_s) = sum_v p_t (e^u - 1 - u), u = log(p_s / p_t): non-negative terms, no floor.

    p_s, p_t, u: (C, V). Overwrites u. |u| >= 1 uses p_s - p_t (1 + u) (no cancellation there).
    """
    small = u.abs() < 1
    h = torch.full_like(u, _SERIES[0])                    # (C, V) series of e^u - 1 - u
    for c in _SERIES[1:]:
        h.mul_(u).add_(c)
    h.mul_(u).mul_(u).mul_(p_t).masked_fill_(~small, 0.0)
    u.add_(1.0).mul_(p_t).neg_().add_(p_s).masked_fill_(small, 0.0)
    return h.sum(1) + u.sum(1)


def inner_torch(zs, zt, labels, g_kd, g_lab, temperature, divergence=None):
    if divergence is not None and not divergence.is_forward_kl:
        return inner_torch_divergence(zs, zt, labels, g_kd, g_lab, temperature, divergence)
    T = float(temperature)
    inv_T = 1.0 / T
    u = torch.sub(zs, zt).mul_(inv_T)                     # (C, V) a_s - a_t (exact when the logits are close)
    # teacher: p_t = softmax(z_t / T), in place
    zt.mul_(inv_T)
    m_t = zt.amax(1, keepdim=True)
    zt.sub_(m_t).exp_()
    d_t = zt.sum(1, keepdim=True)
    p_t = zt.div_(d_t)
    # student at T: p_s = softmax(z_s / T)
    p_s = torch.mul(zs, inv_T)                            # (C, V)
    m_s = p_s.amax(1, keepdim=True)
    p_s.sub_(m_s).exp_()
    d_s = p_s.sum(1, keepdim=True)
    p_s.div_(d_s)
    # u = log(p_s / p_t) = (a_s - a_t) - (lse_s - lse_t), the lse difference taken without rounding each lse
    u.sub_((m_s - m_t) + (d_s / d_t).log())
    kl = kl_rows_torch(p_s, p_t, u)
    del u
    g_k = (g_kd * T).unsqueeze(1)                         # g_kd * T^2 * (1/T)
    if labels is None:
        return p_s.sub_(p_t).mul_(g_k), kl, None          # dz = g_kd T (p_s - p_t)
    has = labels != -100
    y = torch.where(has, labels, 0).unsqueeze(1)
    g_l = torch.where(has, g_lab, 0.0).unsqueeze(1)
    if T == 1.0:
        # p_1 = p_s: dz = (g_kd T + g_lab) p_s - g_kd T p_t - g_lab onehot
        lse_1 = m_s + d_s.log()
        dz = p_s.mul_(g_k + g_l).sub_(p_t.mul_(g_k))
    else:
        dz = p_s.sub_(p_t).mul_(g_k)                      # g_kd T (p_s - p_t)
        m_1 = zs.amax(1, keepdim=True)
        e_1 = torch.sub(zs, m_1, out=zt).exp_()           # exp(z_s - m_1), in p_t's buffer
        d_1 = e_1.sum(1, keepdim=True)
        lse_1 = m_1 + d_1.log()
        dz.add_(e_1.mul_(g_l / d_1))                      # + g_lab p_1
    ce = torch.where(has, (lse_1 - zs.gather(1, y)).squeeze(1), 0.0)  # CE = lse_1 - z_s[y]
    dz.scatter_add_(1, y, -g_l)                           # - g_lab onehot(y)
    return dz, kl, ce


def inner_torch_divergence(zs, zt, labels, g_kd, g_lab, temperature, divergence):
    """The torch step of a divergence other than forward KL (divergence.py has the math):

        D_i from non-negative terms,   dz = g_kd T p (g - S) + g_lab (p_1 - onehot(y))

    with p = softmax(z_s / T), q = softmax(z_t / T), u = log(p / q) from the logits as in `inner_torch`, and
    g, S the divergence's gradient factor and its p-weighted row sum. Holds ~8 (C, V) temporaries (the
    chunk size is budgeted for the forward KL's 5): this is the portable path, not the fast one."""
    from .divergence import divergence_rows
    T = float(temperature)
    inv_T = 1.0 / T
    u = torch.sub(zs, zt).mul_(inv_T)                     # (C, V) a_s - a_t
    m_t = zt.amax(1, keepdim=True) * inv_T
    q = zt.mul(inv_T).sub_(m_t).exp_()                    # (C, V) teacher's exps at T
    d_t = q.sum(1, keepdim=True)
    q.div_(d_t)
    m_s = zs.amax(1, keepdim=True) * inv_T
    p = zs.mul(inv_T).sub_(m_s).exp_()                    # (C, V) student's exps at T
    d_s = p.sum(1, keepdim=True)
    p.div_(d_s)
    u.sub_((m_s - m_t) + (d_s / d_t).log())               # log(p / q), the lse difference unrounded
    D, dd = divergence_rows(divergence, p, q, u)          # (C,), (C, V) = dD/da
    del u, q
    dz = dd.mul_((g_kd * T).unsqueeze(1))                 # g_kd T^2 (1/T) dD/da
    if labels is None:
        return dz, D, None
    has = labels != -100
    y = torch.where(has, labels, 0).unsqueeze(1)
    g_l = torch.where(has, g_lab, 0.0).unsqueeze(1)
    m_1 = zs.amax(1, keepdim=True)
    e_1 = torch.sub(zs, m_1, out=p).exp_()                # exp(z_s - m_1), in p's buffer
    d_1 = e_1.sum(1, keepdim=True)
    ce = torch.where(has, (m_1 + d_1.log() - zs.gather(1, y)).squeeze(1), 0.0)   # CE = lse_1 - z_s[y]
    dz.add_(e_1.mul_(g_l / d_1)).scatter_add_(1, y, -g_l)  # + g_lab (p_1 - onehot(y))
    return dz, D, ce
