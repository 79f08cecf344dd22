"""Triton kernel of `distill_head_loss`: per-row temperature softmax / log-softmax / KL / CE of one chunk of
logits, and their gradient, written in place over the student logits.

The matmuls (hidden -> vocab logits, and the gradient back to hidden and decoder weight) go through the
BLAS (`torch.addmm` on cuBLAS); the chunk loop and the autograd Function live in
`iit_fast/ops/head_loss.py`. This file holds only the kernel and its launcher, Liger-Kernel style.

Math of one row (a token), V logits, temperature T, z_s student logits, z_t teacher logits:

    a_s = z_s / T,  a_t = z_t / T
    lse_s = logsumexp(a_s),  lse_t = logsumexp(a_t),  lse_1 = logsumexp(z_s)          (online, pass 1)
    p_s = exp(a_s - lse_s),  p_t = exp(a_t - lse_t),  p_1 = exp(z_s - lse_1)
    KL(p_t || p_s) = sum_v p_t (a_t - a_s) - lse_t + lse_s     (sum_v p_t = 1 folds the log terms out)
    CE(z_s, y)     = lse_1 - z_s[y]

The loss over the chunk is  L = T^2 * sum_rows w_kd * KL + sum_rows w_lab * CE,  with per-row weights
w_kd = kd_mask / n_kd and w_lab = [y != -100] / n_lab given by the caller. Its gradient (pass 2):

    dL/dz_s = w_kd * T^2 * (1/T) * (p_s - p_t)  +  w_lab * (p_1 - onehot(y))
            = w_kd * T * (p_s - p_t)            +  w_lab * (p_1 - onehot(y))

The teacher takes no gradient. Rows write their unweighted KL and CE; the caller applies the weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 2048 fp32 per block: two logits tiles plus the online state fit in registers at num_warps=8 with no
# spills on sm_80/sm_90 (tests/test_triton_aot_head_loss.py checks it).
BLOCK_V = 2048
NUM_WARPS = 8


@triton.jit
def _distill_head_loss_kernel(
    zs_ptr,         # (C, V) fp32 student logits of the chunk; overwritten with dL/dz_s
    zs_stride,      # row stride of zs (elements)
    zt_ptr,         # (C, V) fp32 teacher logits of the chunk; read only
    zt_stride,      # row stride of zt (elements)
    labels_ptr,     # (C,) int64 MLM targets, -100 = none (unused unless HAS_LABELS)
    w_kd_ptr,       # (C,) fp32 per-row KL weight: kd_mask / n_kd
    w_lab_ptr,      # (C,) fp32 per-row CE weight: [y != -100] / n_lab (unused unless HAS_LABELS)
    kl_ptr,         # (C,) fp32 out: KL(p_t || p_s) of the row (no T^2, no weight)
    ce_ptr,         # (C,) fp32 out: CE(z_s, y) of the row, 0 without a label (unused unless HAS_LABELS)
    V,              # vocabulary size
    inv_T,          # 1 / temperature
    T,              # temperature
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * zs_stride
    zt_row = zt_ptr + row * zt_stride
    offs = tl.arange(0, BLOCK_V)

    # ---- pass 1: online max / sum-exp of a_s, a_t (and z_s at T=1 for the CE), and
    #      x_t = sum_v exp(a_t - m_t) * (a_t - a_s), rescaled whenever the running max m_t moves.
    m_s = tl.zeros([], tl.float32) - float("inf")
    d_s = tl.zeros([], tl.float32)
    m_t = tl.zeros([], tl.float32) - float("inf")
    d_t = tl.zeros([], tl.float32)
    x_t = tl.zeros([], tl.float32)
    m_1 = tl.zeros([], tl.float32) - float("inf")
    d_1 = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        zs = tl.load(zs_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        zt = tl.load(zt_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        a_s = zs * inv_T
        a_t = zt * inv_T
        # student at T: d_s = sum exp(a_s - m_s)
        m_s_new = tl.maximum(m_s, tl.max(a_s, 0))
        d_s = d_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(a_s - m_s_new), 0)
        m_s = m_s_new
        # teacher at T: d_t = sum e_t, x_t = sum e_t (a_t - a_s), e_t = exp(a_t - m_t)
        m_t_new = tl.maximum(m_t, tl.max(a_t, 0))
        rescale = tl.exp(m_t - m_t_new)
        e_t = tl.exp(a_t - m_t_new)                      # 0 on masked lanes
        diff = (tl.where(mask, zt, 0.0) - tl.where(mask, zs, 0.0)) * inv_T   # a_t - a_s; 0 on masked lanes
        d_t = d_t * rescale + tl.sum(e_t, 0)
        x_t = x_t * rescale + tl.sum(e_t * diff, 0)
        m_t = m_t_new
        if HAS_LABELS:
            # student at T=1 for the CE: d_1 = sum exp(z_s - m_1)
            m_1_new = tl.maximum(m_1, tl.max(zs, 0))
            d_1 = d_1 * tl.exp(m_1 - m_1_new) + tl.sum(tl.exp(zs - m_1_new), 0)
            m_1 = m_1_new

    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    # KL(p_t || p_s) = sum p_t (a_t - a_s) - (lse_t - lse_s); the lse difference is taken as
    # (m_t - m_s) + log(d_t / d_s), not from two rounded lse's: KL is small when p_s ~ p_t
    tl.store(kl_ptr + row, x_t / d_t - (m_t - m_s) - tl.log(d_t / d_s))
    g_kd = tl.load(w_kd_ptr + row).to(tl.float32) * T    # w_kd * T^2 * (1/T)

    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        has_label = (y >= 0) & (y < V)                      # -100 = no target
        lse_1 = m_1 + tl.log(d_1)
        z_y = tl.load(zs_row + tl.where(has_label, y, 0)).to(tl.float32)  # read before pass 2 writes
        tl.store(ce_ptr + row, tl.where(has_label, lse_1 - z_y, 0.0))      # CE = lse_1 - z_s[y]
        g_lab = tl.load(w_lab_ptr + row).to(tl.float32)
        g_lab = tl.where(has_label, g_lab, 0.0)
    else:
        y = -1
        lse_1 = 0.0
        g_lab = 0.0

    # ---- pass 2: dL/dz_s = w_kd T (p_s - p_t) + w_lab (p_1 - onehot(y)), written over z_s
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32)
        p_s = tl.exp(zs * inv_T - lse_s)
        p_t = tl.exp(zt * inv_T - lse_t)
        dz = g_kd * (p_s - p_t)
        if HAS_LABELS:
            p_1 = tl.exp(zs - lse_1)
            dz += g_lab * (p_1 - tl.where(cols == y, 1.0, 0.0))
        tl.store(zs_row + cols, dz, mask=mask)


def distill_head_loss_chunk_triton(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None,
                                   w_kd: torch.Tensor, w_lab: torch.Tensor | None, temperature: float):
    """One chunk: overwrites `zs` (C, V) fp32 with dL/dz_s; returns (zs, kl_rows, ce_rows or None).

    zs, zt: (C, V) fp32 with unit column stride; labels (C,) int64 or None; w_kd, w_lab (C,) fp32.
    """
    C, V = zs.shape
    assert zs.dtype == torch.float32 and zt.dtype == torch.float32, "logit chunks are fp32"
    assert zs.stride(1) == 1 and zt.stride(1) == 1
    kl = torch.empty(C, dtype=torch.float32, device=zs.device)
    has_labels = labels is not None
    ce = torch.empty(C, dtype=torch.float32, device=zs.device) if has_labels else kl
    if C == 0:
        return zs, kl, (ce if has_labels else None)
    _distill_head_loss_kernel[(C,)](
        zs, zs.stride(0), zt, zt.stride(0),
        labels if has_labels else w_kd, w_kd, w_lab if has_labels else w_kd, kl, ce,
        V, 1.0 / float(temperature), float(temperature),
        HAS_LABELS=has_labels, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
    )
    return zs, kl, (ce if has_labels else None)
