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
def _horner(x, C: tl.constexpr, N: tl.constexpr):
    """C[0] x^(N-1) + C[1] x^(N-2) + ... + C[N-1], C a tuple of N coefficients, highest power first: the chain
    h = h * x + C[k] unrolled at compile time (the same arithmetic as written out)."""
    h = C[0]
    for k in tl.static_range(1, N):
        h = h * x + C[k]
    return h


# sum_{k>=2} u^k / k! = u^2 (1/2 + u/6 + ...): the coefficients to 1/13!, highest power first (a constexpr: a
# kernel reads only constexpr globals)
_KL_SERIES = tl.constexpr(tuple(1.0 / f for f in (6227020800.0, 479001600.0, 39916800.0, 3628800.0, 362880.0, 40320.0,
                                                  5040.0, 720.0, 120.0, 24.0, 6.0)) + (0.5,))


@triton.jit
def _kl_term(p_s, p_t, u):
    """p_t (e^u - 1 - u), u = log(p_s / p_t): the series sum_{k>=2} u^k / k! for |u| < 1 (Horner to k = 13),
    else p_s - p_t (1 + u) (no cancellation there). Never negative."""
    h = _horner(u, _KL_SERIES, 12)
    return tl.where(tl.abs(u) < 1.0, p_t * (h * u * u), p_s - p_t * (1.0 + u))


@triton.jit
def _row_sums(zs_row, zt_row, V, inv_T, offs, HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1 of a row (both kernels): online max / sum-exp of a_s = z_s / T, a_t = z_t / T and, with labels,
    of z_s (T = 1, the CE), d = sum exp(. - m): (m_s, m_t, m_1, d_1, r_s = 1 / d_s, r_t = 1 / d_t, c = lse_s -
    lse_t), c taken as (m_s - m_t) + log(d_s / d_t), not from two rounded lse's: u is small when p_s ~ p_t."""
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
    return m_s, m_t, m_1, d_1, 1.0 / d_s, 1.0 / d_t, (m_s - m_t) + tl.log(d_s / d_t)


@triton.jit
def _row_prelude(zs_ptr, zs_stride, zt_ptr, zt_stride, labels_ptr, w_kd_ptr, w_lab_ptr, ce_ptr, V, inv_T, T,
                 HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Both kernels' start of a row: its pointers, pass 1 (`_row_sums`), g_kd = w_kd T (w_kd * T^2 * (1/T)) and,
    with labels, y, g_lab (0 without a label), r_1 = 1 / d_1 and the row's CE = lse_1 - z_s[y] stored (read
    before pass 2 writes z_s; 0 without a label). Without labels y = -1, r_1 = g_lab = 0."""
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * zs_stride
    zt_row = zt_ptr + row * zt_stride
    offs = tl.arange(0, BLOCK_V)
    m_s, m_t, m_1, d_1, r_s, r_t, c = _row_sums(zs_row, zt_row, V, inv_T, offs, HAS_LABELS, BLOCK_V)
    g_kd = tl.load(w_kd_ptr + row).to(tl.float32) * T
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        has_label = (y >= 0) & (y < V)                      # -100 = no target
        r_1 = 1.0 / d_1
        z_y = tl.load(zs_row + tl.where(has_label, y, 0)).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(has_label, m_1 + tl.log(d_1) - z_y, 0.0))
        g_lab = tl.where(has_label, tl.load(w_lab_ptr + row).to(tl.float32), 0.0)
    else:
        y = -1
        r_1 = 0.0
        g_lab = 0.0
    return row, zs_row, zt_row, offs, m_s, m_t, m_1, r_s, r_t, c, g_kd, y, r_1, g_lab


@triton.jit
def _tile(zs_row, zt_row, start, offs, V, inv_T, m_s, m_t, r_s, r_t):
    """Pass 2's tile of a row (both kernels): (cols, mask, z_s, z_t, p_s, p_t), p = exp(a - m) / d, not
    exp(a - lse): a rounded lse would put eps * |lse| into every p."""
    cols = start + offs
    mask = cols < V
    zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32)
    zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, zs, zt, tl.exp(zs * inv_T - m_s) * r_s, tl.exp(zt * inv_T - m_t) * r_t


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
    # ---- pass 1: online max / sum-exp of a_s, a_t (and z_s at T=1 for the CE), the CE stored
    row, zs_row, zt_row, offs, m_s, m_t, m_1, r_s, r_t, c, g_kd, y, r_1, g_lab = _row_prelude(
        zs_ptr, zs_stride, zt_ptr, zt_stride, labels_ptr, w_kd_ptr, w_lab_ptr, ce_ptr, V, inv_T, T, HAS_LABELS,
        BLOCK_V)

    # ---- pass 2: KL = sum_v p_t (e^u - 1 - u), and dL/dz_s = g_kd T (p_s - p_t) + g_lab (p_1 - onehot(y))
    #      written over z_s
    kl = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols, mask, zs, zt, p_s, p_t = _tile(zs_row, zt_row, start, offs, V, inv_T, m_s, m_t, r_s, r_t)
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


# ----------------------------------------------------------------------------------------------------
# The other divergences (divergence.py has the math): reverse KL, jsd, skew KL, skew reverse KL, TVD.
# Per element from p (student), q (teacher), u = log(p / q): a non-negative term (D = sum), the gradient
# factor g and s (S = sum s = sum p g); dD/da = p (g - S). S needs the whole row first: pass 2 stores
# A = g_kd T p g + g_lab p_1 over the teacher logits and B = g_kd T p over the student's, pass 3 writes
# dz = A - S B - g_lab onehot(y). fp32 logit chunks only (A and B are kept in them).
# ----------------------------------------------------------------------------------------------------

# (e^x - 1) / x = 1 + x/2 + x^2/6 + ...: the coefficients to 1/9!, highest power first
_EXPM1_SERIES = tl.constexpr(tuple(1.0 / f for f in (362880.0, 40320.0, 5040.0, 720.0, 120.0, 24.0, 6.0))
                             + (0.5, 1.0))


@triton.jit
def _expm1_neg(x):
    """e^x - 1 for x <= 0: its series for x > -1/2 (to x^9 / 9!), else exp(x) - 1 (no cancellation there)."""
    h = _horner(x, _EXPM1_SERIES, 9)
    return tl.where(x > -0.5, h * x, tl.exp(x) - 1.0)


@triton.jit
def _log1p(y):
    """log(1 + y) for y in (-1, 0]: log(w) y / (w - 1), w = 1 + y (the rounding of w cancels)."""
    w = 1.0 + y
    return tl.where(w == 1.0, y, tl.log(w) * (y / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _mixlog(lam, x):
    """log((1 - lam) + lam e^x), lam in (0, 1), without overflow and accurate near x = 0."""
    neg = x <= 0.0
    lx = tl.where(neg, lam, 1.0 - lam)
    return _log1p(lx * _expm1_neg(tl.where(neg, x, -x))) + tl.where(neg, 0.0, x)


@triton.jit
def _div_elem(p, q, u, prm, KIND: tl.constexpr):
    """(term, g, s) of one element; KIND 1 reverse_kl, 2 jsd (prm = beta), 3 skew_kl, 4 skew_reverse_kl
    (prm = alpha), 5 tvd."""
    if KIND == 1:       # KL(p || q)
        term = _kl_term(q, p, -u)
        g = u
        s = term
    elif KIND == 2:     # beta KL(q || M) + (1 - beta) KL(p || M), M = beta q + (1 - beta) p, lm = log(M / p)
        lm = _mixlog(prm, -u)
        m = prm * q + (1.0 - prm) * p
        kp = _kl_term(m, p, lm)
        term = prm * _kl_term(m, q, lm + u) + (1.0 - prm) * kp
        g = -(1.0 - prm) * lm
        s = (1.0 - prm) * kp
    elif KIND == 3:     # KL(q || M), M = alpha q + (1 - alpha) p, lq = log(M / q)
        lq = _mixlog(1.0 - prm, u)
        term = _kl_term(prm * q + (1.0 - prm) * p, q, lq)
        g = -(1.0 - prm) * tl.exp(-lq)
        s = p * g
    elif KIND == 4:     # KL(p || M), M = alpha p + (1 - alpha) q, lm = log(M / p)
        lm = _mixlog(1.0 - prm, -u)
        r = tl.exp(-lm)
        term = _kl_term(prm * p + (1.0 - prm) * q, p, lm)
        g = -lm - prm * r
        s = term - prm * p * r
    else:               # |p - q| / 2
        term = 0.5 * tl.abs(p - q)
        g = tl.where(u > 0.0, 0.5, tl.where(u < 0.0, -0.5, 0.0))
        s = p * g
    return term, g, s


@triton.jit
def _divergence_head_loss_kernel(
    zs_ptr, zs_stride,     # (C, V) fp32 student logits; overwritten with B, then dL/dz_s
    zt_ptr, zt_stride,     # (C, V) fp32 teacher logits; overwritten with A
    labels_ptr, w_kd_ptr, w_lab_ptr, d_ptr, ce_ptr,   # as _distill_head_loss_kernel; d: the row's divergence
    V, inv_T, T, prm,
    KIND: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # ---- pass 1 and the CE: as the forward KL kernel (the same call of the shared prelude, after a signature
    #      of the same shape: a kernel's signature is its launch interface, so each kernel keeps its own)
    row, zs_row, zt_row, offs, m_s, m_t, m_1, r_s, r_t, c, g_kd, y, r_1, g_lab = _row_prelude(
        zs_ptr, zs_stride, zt_ptr, zt_stride, labels_ptr, w_kd_ptr, w_lab_ptr, ce_ptr, V, inv_T, T, HAS_LABELS,
        BLOCK_V)

    # ---- pass 2: the terms, S; A over z_t, B over z_s
    dsum = tl.zeros([BLOCK_V], tl.float32)
    ssum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols, mask, zs, zt, p, q = _tile(zs_row, zt_row, start, offs, V, inv_T, m_s, m_t, r_s, r_t)
        term, g, s = _div_elem(p, q, (zs - zt) * inv_T - c, prm, KIND)
        dsum += tl.where(mask, term, 0.0)
        ssum += tl.where(mask, s, 0.0)
        a = g_kd * (p * g)
        if HAS_LABELS:
            a += g_lab * (tl.exp(zs - m_1) * r_1)
        tl.store(zt_row + cols, a, mask=mask)
        tl.store(zs_row + cols, g_kd * p, mask=mask)
    S = tl.sum(ssum, 0)
    tl.debug_barrier()   # pass 3 reads what pass 2 stored

    # ---- pass 3: dz = A - S B - g_lab onehot(y), over z_s
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        a = tl.load(zt_row + cols, mask=mask, other=0.0)
        b = tl.load(zs_row + cols, mask=mask, other=0.0)
        dz = a - S * b
        if HAS_LABELS:
            dz -= g_lab * tl.where(cols == y, 1.0, 0.0)
        tl.store(zs_row + cols, dz, mask=mask)
    tl.store(d_ptr + row, tl.sum(dsum, 0))


def divergence_head_loss_chunk_triton(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None,
                                      w_kd: torch.Tensor, w_lab: torch.Tensor | None, temperature: float,
                                      divergence):
    """One chunk of a divergence other than forward KL (a divergence.Divergence): overwrites `zs` (C, V) with
    dL/dz_s and `zt` with scratch; returns (zs, d_rows, ce_rows or None), rows fp32. zs, zt: (C, V) fp32,
    unit column stride."""
    C, V = zs.shape
    for name, z in (("zs", zs), ("zt", zt)):
        if z.dtype != torch.float32:
            raise ValueError(f"distill_head_loss triton kernel ({divergence}): {name} has dtype {z.dtype}; the "
                             "divergences other than forward KL take fp32 logit chunks (the chunk loop's)")
        if z.stride(1) != 1:
            raise ValueError(f"distill_head_loss triton kernel: {name} needs unit column stride")
    w_kd = w_kd.to(torch.float32).contiguous()
    w_lab = w_lab.to(torch.float32).contiguous() if w_lab is not None else None
    d = torch.empty(C, dtype=torch.float32, device=zs.device)
    has_labels = labels is not None
    ce = torch.empty(C, dtype=torch.float32, device=zs.device) if has_labels else d
    if C:
        _divergence_head_loss_kernel[(C,)](
            zs, zs.stride(0), zt, zt.stride(0),
            labels if has_labels else w_kd, w_kd, w_lab if has_labels else w_kd, d, ce,
            V, 1.0 / float(temperature), float(temperature), float(divergence.param),
            KIND=divergence.code, HAS_LABELS=has_labels, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
        )
    return zs, d, (ce if has_labels else None)
