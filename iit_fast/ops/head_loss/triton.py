"""Triton kernel of `distill_head_loss`: per-row temperature softmax / log-softmax / KL / CE of one chunk of
logits, and their gradient, written in place over the student logits.

The matmuls (hidden -> vocab logits, and the gradient back to hidden and decoder weight) go through the
BLAS (`torch.addmm` on cuBLAS); the chunk loop is in `chunked.py`, the autograd
Function in `__init__.py`. This file holds only the kernel and its launcher, Liger-Kernel style.

Math of one row (a token), V logits, temperature T, z_s student logits, z_t teacher logits:

    a_s = z_s / T,  a_t = z_t / T
    lse_s = logsumexp(a_s),  lse_t = logsumexp(a_t),  lse_1 = logsumexp(z_s)          (online, pass 1)
    p_s = exp(a_s - lse_s),  p_t = exp(a_t - lse_t),  p_1 = exp(z_s - lse_1),  u = log(p_s / p_t)
    KL(p_t || p_s) = sum_v p_t (e^u - 1 - u)       (pass 2; every term >= 0: no cancellation, no error floor)
    CE(z_s, y)     = lse_1 - z_s[y]

The gradient (pass 2), with per-row gradient weights g_kd = kd_weight * kd_mask / n_kd and
g_lab = lm_weight * [y != -100] / n_lab given by the caller:

    dL/dz_s = g_kd * T^2 * (1/T) * (p_s - p_t)  +  g_lab * (p_1 - onehot(y))
            = g_kd * T * (p_s - p_t)            +  g_lab * (p_1 - onehot(y))

The teacher takes no gradient. Rows write their unweighted KL and CE; the caller applies the weights.
Logits may be fp32, bf16 or fp16: loads upcast to fp32, all arithmetic is fp32, the gradient is stored in the
student logits' dtype. fp64 is refused (the kernel would compute it in fp32).
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
def _kl_term(p_s, p_t, u):
    """p_t (e^u - 1 - u), u = log(p_s / p_t): the series sum_{k>=2} u^k / k! for |u| < 1 (Horner to k = 13),
    else p_s - p_t (1 + u) (no cancellation there). Never negative."""
    h = 1.0 / 6227020800.0
    h = h * u + 1.0 / 479001600.0
    h = h * u + 1.0 / 39916800.0
    h = h * u + 1.0 / 3628800.0
    h = h * u + 1.0 / 362880.0
    h = h * u + 1.0 / 40320.0
    h = h * u + 1.0 / 5040.0
    h = h * u + 1.0 / 720.0
    h = h * u + 1.0 / 120.0
    h = h * u + 1.0 / 24.0
    h = h * u + 1.0 / 6.0
    h = h * u + 0.5
    return tl.where(tl.abs(u) < 1.0, p_t * (h * u * u), p_s - p_t * (1.0 + u))


@triton.jit
def _distill_head_loss_kernel(
    zs_ptr,         # (C, V) fp32/bf16/fp16 student logits of the chunk; overwritten with dL/dz_s
    zs_stride,      # row stride of zs (elements)
    zt_ptr,         # (C, V) fp32/bf16/fp16 teacher logits of the chunk; read only
    zt_stride,      # row stride of zt (elements)
    labels_ptr,     # (C,) int64 MLM targets, -100 = none (unused unless HAS_LABELS)
    w_kd_ptr,       # (C,) fp32 per-row KL gradient weight: kd_weight * kd_mask / n_kd
    w_lab_ptr,      # (C,) fp32 per-row CE gradient weight: lm_weight * [y != -100] / n_lab (unless HAS_LABELS)
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

    # ---- pass 1: online max / sum-exp of a_s, a_t (and z_s at T=1 for the CE)
    m_s = tl.zeros([], tl.float32) - float("inf")
    d_s = tl.zeros([], tl.float32)
    m_t = tl.zeros([], tl.float32) - float("inf")
    d_t = tl.zeros([], tl.float32)
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
        # teacher at T: d_t = sum exp(a_t - m_t)
        m_t_new = tl.maximum(m_t, tl.max(a_t, 0))
        d_t = d_t * tl.exp(m_t - m_t_new) + tl.sum(tl.exp(a_t - m_t_new), 0)
        m_t = m_t_new
        if HAS_LABELS:
            # student at T=1 for the CE: d_1 = sum exp(z_s - m_1)
            m_1_new = tl.maximum(m_1, tl.max(zs, 0))
            d_1 = d_1 * tl.exp(m_1 - m_1_new) + tl.sum(tl.exp(zs - m_1_new), 0)
            m_1 = m_1_new

    r_s = 1.0 / d_s
    r_t = 1.0 / d_t
    # lse_s - lse_t, taken as (m_s - m_t) + log(d_s / d_t), not from two rounded lse's: u is small when
    # p_s ~ p_t
    c = (m_s - m_t) + tl.log(d_s / d_t)
    g_kd = tl.load(w_kd_ptr + row).to(tl.float32) * T    # w_kd * T^2 * (1/T)

    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        has_label = (y >= 0) & (y < V)                      # -100 = no target
        lse_1 = m_1 + tl.log(d_1)
        r_1 = 1.0 / d_1
        z_y = tl.load(zs_row + tl.where(has_label, y, 0)).to(tl.float32)  # read before pass 2 writes
        tl.store(ce_ptr + row, tl.where(has_label, lse_1 - z_y, 0.0))      # CE = lse_1 - z_s[y]
        g_lab = tl.load(w_lab_ptr + row).to(tl.float32)
        g_lab = tl.where(has_label, g_lab, 0.0)
    else:
        y = -1
        r_1 = 0.0
        g_lab = 0.0

    # ---- pass 2: KL = sum_v p_t (e^u - 1 - u), and dL/dz_s = g_kd T (p_s - p_t) + g_lab (p_1 - onehot(y))
    #      written over z_s
    kl = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32)
        # p = exp(a - m) / d, not exp(a - lse): a rounded lse would put eps * |lse| into every p
        p_s = tl.exp(zs * inv_T - m_s) * r_s
        p_t = tl.exp(zt * inv_T - m_t) * r_t
        kl += tl.where(mask, _kl_term(p_s, p_t, (zs - zt) * inv_T - c), 0.0)
        dz = g_kd * (p_s - p_t)
        if HAS_LABELS:
            p_1 = tl.exp(zs - m_1) * r_1
            dz += g_lab * (p_1 - tl.where(cols == y, 1.0, 0.0))
        tl.store(zs_row + cols, dz.to(zs_ptr.dtype.element_ty), mask=mask)
    tl.store(kl_ptr + row, tl.sum(kl, 0))


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def distill_head_loss_chunk_triton(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None,
                                   w_kd: torch.Tensor, w_lab: torch.Tensor | None, temperature: float):
    """One chunk: overwrites `zs` (C, V) with dL/dz_s; returns (zs, kl_rows, ce_rows or None), rows fp32.

    zs, zt: (C, V) fp32/bf16/fp16 with unit column stride; labels (C,) int64 or None; w_kd, w_lab (C,) fp32
    per-row gradient weights.
    """
    C, V = zs.shape
    for name, z in (("zs", zs), ("zt", zt)):
        if z.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"distill_head_loss triton kernel: {name} has dtype {z.dtype}; supported: "
                             f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} (fp64: use impl='chunked')")
        if z.stride(1) != 1:
            raise ValueError(f"distill_head_loss triton kernel: {name} needs unit column stride")
    w_kd = w_kd.to(torch.float32).contiguous()
    w_lab = w_lab.to(torch.float32).contiguous() if w_lab is not None else None
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
