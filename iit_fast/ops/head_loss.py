"""`distill_head_loss`: LM head fused with the temperature KL and the MLM cross-entropy, chunked over tokens.

No `[tokens, vocab]` tensor is ever whole: tokens go through in chunks of `C` rows; per chunk

    z_s = h_s[c] @ W_s^T + b_s,   z_t = h_t[c] @ W_t^T + b_t          (C, V) fp32, BLAS
    dz  = dL/dz_s of the chunk, with the chunk's (KL, CE) rows         inner step (Triton / torch)
    dh_s[c] = dz @ W_s,   dW_s += dz^T @ h_s[c],   db_s += sum_rows dz     (fp32 accumulators)

with  L = ce + mlm,  ce = T^2 * sum_i w_kd[i] KL_i,  mlm = sum_i w_lab[i] CE_i,
w_kd = kd_mask / n_kd,  w_lab = [y != -100] / n_lab  (both 0 when nothing counts: a defined 0, no NaN),

    dL/dz_s[i] = w_kd[i] * T * (softmax(z_s/T) - softmax(z_t/T))  +  w_lab[i] * (softmax(z_s) - onehot(y_i))

(the KL's T^2 times the 1/T of the chain rule through z_s/T). The gradient is computed in the forward,
since the loss is the last op; backward only scales it by the two grad_outputs. The per-chunk gradient is
that of ce + mlm; when the two grad_outputs differ (e.g. `torch.autograd.grad(ce, ...)` alone, or unequal
loss weights) backward recomputes the mlm part over the labelled tokens only and uses
g_ce * G(ce + mlm) + (g_mlm - g_ce) * G(mlm).

Tokens that count for neither loss (padding) are dropped before the matmuls: they get a zero gradient.
The teacher side gets no gradient (its tensors are read under no_grad; gradients for them are None).

impl: "auto" (CUDA -> "triton", CPU -> "native", or "chunked" if the C++ step cannot be built; logged once),
"reference" (unfused, autograd),
"chunked" (this chunk loop with a plain torch inner step: ~20 in-place passes over 3 chunk buffers),
"native" (this chunk loop with the C++/OpenMP inner step of csrc/head_loss.cpp: 3 passes per row, in
place; built on first use with torch.utils.cpp_extension.load, a few seconds; fp64 falls back to "chunked"),
"triton" (this chunk loop with the Triton inner step: 2 passes per row, in place; on CPU only under
TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

import logging

import torch

from .reference import distill_head_loss_reference

log = logging.getLogger("iit_fast.ops")
_logged: set[str] = set()

# Live [C, V] fp32 buffers of one chunk: z_s (becomes dz), z_t, and one scratch buffer (torch path);
# counted for the chunk size chosen from the memory budget.
_LIVE_CHUNK_BUFFERS = 3
DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for the chunk's logit buffers


def default_chunk_size(n_tokens: int, vocab: int, budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                       low_precision: bool = False) -> int:
    """Rows per chunk so that the live [C, V] buffers stay under `budget_bytes` (at least 1 row)."""
    per_row = vocab * 4 * (_LIVE_CHUNK_BUFFERS + (1 if low_precision else 0))
    c = max(1, budget_bytes // per_row)
    if c >= 64:
        c -= c % 32  # keep the BLAS on whole tiles
    return int(max(1, min(c, n_tokens))) if n_tokens else 1


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


# ----------------------------------------------------------------------------------------------------
# Inner steps: (zs, zt, labels, w_kd, w_lab, T) -> (dz, kl_rows, ce_rows). zs/zt are the chunk's logits in
# the accumulation dtype; both may be overwritten; dz may alias either of them.
# ----------------------------------------------------------------------------------------------------

def _inner_torch(zs, zt, labels, w_kd, w_lab, temperature):
    T = float(temperature)
    inv_T = 1.0 / T
    # teacher: a_t = z_t / T; e_t = exp(a_t - m_t); d_t = sum e_t; p_t = e_t / d_t; lse_t = m_t + log d_t
    zt.mul_(inv_T)
    m_t = zt.amax(1, keepdim=True)
    p = torch.sub(zt, m_t).exp_()                        # (C, V) scratch: e_t
    d_t = p.sum(1, keepdim=True)
    # x_t = sum_v e_t (a_t - a_s): with it KL = x_t / d_t - lse_t + lse_s
    zt.sub_(zs, alpha=inv_T).mul_(p)
    x_t = zt.sum(1, keepdim=True)
    p.div_(d_t)                                           # p_t
    # student at T: p_s = softmax(z_s / T) into zt (free now); lse_s = m_s + log d_s
    torch.mul(zs, inv_T, out=zt)
    m_s = zt.amax(1, keepdim=True)
    zt.sub_(m_s).exp_()
    d_s = zt.sum(1, keepdim=True)
    zt.div_(d_s)                                          # p_s
    lse_s = m_s + d_s.log()
    # KL = x_t / d_t - (lse_t - lse_s), the lse difference taken without rounding each lse (KL is small)
    kl = (x_t / d_t - (m_t - m_s) - (d_t / d_s).log()).squeeze(1)
    g_kd = (w_kd * T).unsqueeze(1)                        # w_kd * T^2 * (1/T)
    if labels is None:
        # dz = w_kd T (p_s - p_t)
        return zt.sub_(p).mul_(g_kd), kl, None
    has = labels != -100
    y = torch.where(has, labels, 0).unsqueeze(1)
    g_lab = torch.where(has, w_lab, 0.0).unsqueeze(1)
    if T == 1.0:
        # p_1 = p_s: dz = (w_kd T + w_lab) p_s - w_kd T p_t - w_lab onehot
        lse_1 = lse_s
        zt.mul_(g_kd + g_lab).sub_(p.mul_(g_kd))
    else:
        zt.sub_(p).mul_(g_kd)                             # w_kd T (p_s - p_t)
        m_1 = zs.amax(1, keepdim=True)
        torch.sub(zs, m_1, out=p).exp_()                  # e_1 = exp(z_s - m_1)
        d_1 = p.sum(1, keepdim=True)
        lse_1 = m_1 + d_1.log()
        zt.add_(p.mul_(g_lab / d_1))                      # + w_lab p_1
    ce = torch.where(has, (lse_1 - zs.gather(1, y)).squeeze(1), 0.0)  # CE = lse_1 - z_s[y]
    zt.scatter_add_(1, y, -g_lab)                         # - w_lab onehot(y)
    return zt, kl, ce


# Native C++ inner step (csrc/head_loss.cpp): 3 passes per row kept in L2, no scratch buffer.
_native_fn = None  # ctypes function once built; False when the build failed (logged)


def _native_step():
    """Build (first call, a few seconds; cached in TORCH_EXTENSIONS_DIR) and load the C++ inner step."""
    global _native_fn
    if _native_fn is None:
        try:
            import ctypes
            from pathlib import Path

            from torch.utils.cpp_extension import load

            import iit_fast.csrc as csrc_pkg
            src = Path(csrc_pkg.__file__).resolve().parent / "head_loss.cpp"
            # -ffast-math on the compile only (vectorised expf from libmvec); not on the link, so
            # crtfastmath (flush-to-zero for the whole process) is not pulled in.
            path = load(name="iit_fast_head_loss_native", sources=[str(src)],
                         extra_cflags=["-O3", "-ffast-math", "-march=native", "-fopenmp"],
                         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
            fn = ctypes.CDLL(path).iit_distill_head_loss_chunk_f32
            P, I64 = ctypes.c_void_p, ctypes.c_int64
            fn.argtypes = [P, I64, P, I64, P, P, P, P, P, I64, I64, ctypes.c_float, ctypes.c_int]
            fn.restype = None
            _native_fn = fn
        except Exception as e:  # no compiler, no ninja: say so, the torch inner step does the same job
            log.warning("distill_head_loss: native CPU step unavailable (%s: %s); using the torch step",
                        type(e).__name__, e)
            _native_fn = False
    return _native_fn or None


def _inner_native(zs, zt, labels, w_kd, w_lab, temperature):
    fn = _native_step()
    if fn is None or zs.dtype != torch.float32 or zs.device.type != "cpu":
        return _inner_torch(zs, zt, labels, w_kd, w_lab, temperature)   # fp64 (gradcheck) and fallbacks
    C, V = zs.shape
    assert zs.stride(1) == 1 and zt.stride(1) == 1
    w_kd = w_kd.contiguous()
    kl = torch.empty(C, dtype=torch.float32)
    ce = torch.empty(C, dtype=torch.float32) if labels is not None else None
    if labels is not None:
        labels = labels.contiguous()
        w_lab = w_lab.contiguous()
    if C:
        fn(zs.data_ptr(), zs.stride(0), zt.data_ptr(), zt.stride(0),
           labels.data_ptr() if labels is not None else None, w_kd.data_ptr(),
           w_lab.data_ptr() if labels is not None else None, kl.data_ptr(),
           ce.data_ptr() if ce is not None else None, C, V, float(temperature),
           min(torch.get_num_threads(), max(1, (C * V) >> 18)))  # small chunks: one thread, no barrier
    return zs, kl, ce


def _inner_triton(zs, zt, labels, w_kd, w_lab, temperature):
    from iit_fast.kernels.head_loss import distill_head_loss_chunk_triton
    return distill_head_loss_chunk_triton(zs, zt, labels, w_kd, w_lab, temperature)


_INNER = {"chunked": _inner_torch, "native": _inner_native, "triton": _inner_triton}


def _linear_chunk(h, w, b, acc):
    """(C, V) logits of a chunk in `acc` dtype; the matmul runs in the inputs' dtype (as the reference)."""
    z = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    return z if z.dtype == acc else z.to(acc)


def _accumulate_grads(dz, h, w, dh_out, dw, db):
    """dh_out = dz @ W; dW += dz^T @ h; db += sum_rows dz (dW, db in the accumulation dtype)."""
    dzc = dz if dz.dtype == h.dtype else dz.to(h.dtype)
    torch.mm(dzc, w, out=dh_out) if dh_out.dtype == dzc.dtype else dh_out.copy_(dzc @ w)
    if dw.dtype == dzc.dtype:
        dw.addmm_(dzc.t(), h)
    else:
        dw.add_(dzc.t() @ h)
    if db is not None:
        db.add_(dz.sum(0, dtype=db.dtype))


def _chunked_forward(hs, ht, ws, bs, wt, bt, labels, w_kd, w_lab, temperature, chunk, inner,
                     want_grads=True):
    """Sum over chunks. hs/ht/labels/w_* are already restricted to the tokens that count.

    Returns (ce, mlm, dhs, dws, dbs) with ce/mlm as 0-dim tensors in the accumulation dtype.
    """
    n, _ = hs.shape
    V = ws.shape[0]
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    dev = hs.device
    kl_sum = torch.zeros((), dtype=acc, device=dev)
    ce_sum = torch.zeros((), dtype=acc, device=dev)
    dhs = torch.empty_like(hs) if want_grads else None
    dws = torch.zeros(V, ws.shape[1], dtype=acc, device=dev) if want_grads else None
    dbs = torch.zeros(V, dtype=acc, device=dev) if (want_grads and bs is not None) else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        h_c = hs[s:e]
        zs = _linear_chunk(h_c, ws, bs, acc)                  # (C, V)
        with torch.no_grad():
            zt = _linear_chunk(ht[s:e], wt, bt, acc)          # (C, V)
        lab_c = labels[s:e] if labels is not None else None
        wl_c = w_lab[s:e] if w_lab is not None else None
        dz, kl, ce = inner(zs, zt, lab_c, w_kd[s:e], wl_c, temperature)
        del zt
        kl_sum += (kl * w_kd[s:e]).sum()
        if ce is not None:
            ce_sum += (ce * wl_c).sum()
        if want_grads:
            _accumulate_grads(dz, h_c, ws, dhs[s:e], dws, dbs)
        del dz, zs
    T = float(temperature)
    return T * T * kl_sum, ce_sum, dhs, dws, dbs


def _mlm_grads(hs, ws, bs, labels, w_lab, chunk):
    """Gradient of mlm alone (recomputed in backward when g_ce != g_mlm), over labelled tokens only."""
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    dhs = torch.zeros_like(hs)
    dws = torch.zeros(ws.shape, dtype=acc, device=hs.device)
    dbs = torch.zeros(ws.shape[0], dtype=acc, device=hs.device) if bs is not None else None
    idx = (labels != -100).nonzero().squeeze(1)
    if idx.numel() == 0:
        return dhs, dws, dbs
    h, y, wl = hs.index_select(0, idx), labels.index_select(0, idx), w_lab.index_select(0, idx)
    dh = torch.empty_like(h)
    for s in range(0, h.shape[0], chunk):
        e = min(s + chunk, h.shape[0])
        z = _linear_chunk(h[s:e], ws, bs, acc)
        # dz = w_lab (softmax(z) - onehot(y))
        dz = torch.softmax(z, 1).mul_(wl[s:e].unsqueeze(1))
        dz.scatter_add_(1, y[s:e].unsqueeze(1), -wl[s:e].unsqueeze(1))
        _accumulate_grads(dz, h[s:e], ws, dh[s:e], dws, dbs)
    dhs.index_copy_(0, idx, dh)
    return dhs, dws, dbs


class DistillHeadLossFunction(torch.autograd.Function):
    """(ce, mlm) with their gradients w.r.t. student hidden, decoder weight and bias from the forward."""

    @staticmethod
    def forward(ctx, hs, ht, ws, bs, wt, bt, labels, kd_mask, temperature, chunk_size, impl):
        ctx.set_materialize_grads(False)
        shape = hs.shape
        hs2 = hs.reshape(-1, shape[-1])
        ht2 = ht.reshape(-1, ht.shape[-1]).detach()
        n = hs2.shape[0]
        acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
        dev = hs.device
        # per-token weights: w_kd = m / max(sum m, 1); w_lab = [y != -100] / max(n_lab, 1)
        if kd_mask is None:
            m = torch.ones(n, dtype=acc, device=dev)
        else:
            m = kd_mask.reshape(-1).to(device=dev, dtype=acc)
        w_kd = m / m.sum().clamp_min(1.0)
        y = labels.reshape(-1).to(dev) if labels is not None else None
        if y is not None:
            has = y != -100
            w_lab = has.to(acc) / has.sum().clamp_min(1).to(acc)
            active = (m != 0) | has
        else:
            w_lab = None
            active = m != 0
        # drop tokens that count for nothing (padding): no logits, zero gradient
        all_active = bool(active.all())
        if all_active:
            idx = None
            h_a, t_a, y_a, wk_a, wl_a = hs2, ht2, y, w_kd, w_lab
        else:
            idx = active.nonzero().squeeze(1)
            h_a, t_a = hs2.index_select(0, idx), ht2.index_select(0, idx)
            y_a = y.index_select(0, idx) if y is not None else None
            wk_a = w_kd.index_select(0, idx)
            wl_a = w_lab.index_select(0, idx) if w_lab is not None else None
        V = ws.shape[0]
        chunk = int(chunk_size) if chunk_size else default_chunk_size(
            h_a.shape[0], V, low_precision=hs.dtype in (torch.float16, torch.bfloat16))
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        with torch.no_grad():
            ce, mlm, dh_a, dws, dbs = _chunked_forward(
                h_a.detach(), t_a, ws.detach(), bs.detach() if bs is not None else None,
                wt.detach(), bt.detach() if bt is not None else None,
                y_a, wk_a, wl_a, temperature, chunk, _INNER[impl], want_grads=want)
        if want:
            if idx is None:
                dhs = dh_a
            else:
                dhs = torch.zeros_like(hs2)
                dhs.index_copy_(0, idx, dh_a)
            ctx.save_for_backward(dhs.reshape(shape), dws, dbs, h_a, ws, bs, y_a, wl_a)
        ctx.has_labels = labels is not None
        ctx.idx, ctx.shape, ctx.chunk = idx, shape, chunk
        ctx.w_dtype = ws.dtype
        ctx.b_dtype = bs.dtype if bs is not None else None
        out_dtype = torch.float64 if hs.dtype == torch.float64 else torch.float32
        return ce.to(out_dtype), mlm.to(out_dtype)

    @staticmethod
    def backward(ctx, g_ce, g_mlm):
        dhs, dws, dbs, h_a, ws, bs, y_a, wl_a = ctx.saved_tensors
        zero = dhs.new_zeros((), dtype=dws.dtype)
        g_ce = zero if g_ce is None else g_ce.to(dws.dtype)
        g_mlm = zero if (g_mlm is None or not ctx.has_labels) else g_mlm.to(dws.dtype)
        # stored grads are those of ce + mlm: G = g_ce * G(ce + mlm) + (g_mlm - g_ce) * G(mlm)
        gh = dhs * g_ce.to(dhs.dtype)
        gw = dws * g_ce
        gb = dbs * g_ce if dbs is not None else None
        if ctx.has_labels and not torch.equal(g_ce, g_mlm):
            delta = g_mlm - g_ce
            mh, mw, mb = _mlm_grads(h_a, ws, bs, y_a, wl_a, ctx.chunk)
            if ctx.idx is not None:
                full = torch.zeros(dhs.reshape(-1, dhs.shape[-1]).shape, dtype=dhs.dtype,
                                   device=dhs.device)
                full.index_copy_(0, ctx.idx, mh)
                mh = full
            gh = gh + mh.reshape(gh.shape) * delta.to(gh.dtype)
            gw = gw + mw * delta
            if gb is not None:
                gb = gb + mb * delta
        gw = gw.to(ctx.w_dtype) if ctx.needs_input_grad[2] else None
        gb = gb.to(ctx.b_dtype) if (gb is not None and ctx.needs_input_grad[3]) else None
        gh = gh if ctx.needs_input_grad[0] else None
        return gh, None, gw, gb, None, None, None, None, None, None, None


def _pick_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl == "auto":
        if device.type == "cuda":
            _log_once("distill_head_loss: impl=triton (CUDA tensors: cuBLAS matmuls + Triton chunk kernel)")
            return "triton"
        if dtype != torch.float64 and _native_step() is not None:
            _log_once(f"distill_head_loss: impl=native ({device.type} tensors: BLAS matmuls + C++/OpenMP "
                      "chunk step; the Triton kernel needs CUDA)")
            return "native"
        _log_once(f"distill_head_loss: impl=chunked ({device.type} tensors, {dtype}: BLAS matmuls + in-place "
                  "torch chunk step; native step not available for this dtype or not built)")
        return "chunked"
    if impl not in ("reference", "chunked", "native", "triton"):
        raise ValueError(f"distill_head_loss impl must be auto|reference|chunked|native|triton, got {impl!r}")
    _log_once(f"distill_head_loss: impl={impl} (requested)")
    return impl


def distill_head_loss(student_hidden, teacher_hidden, student_weight, student_bias, teacher_weight,
                      teacher_bias, labels, kd_mask, temperature=2.0, *, chunk_size=None, impl="auto"):
    """LM head + temperature KL + MLM cross-entropy, chunked so no [tokens, vocab] tensor is whole.

    Args:
        student_hidden: (N, D) or (..., D) student states after the MLM head transform; fp32/bf16/fp16.
        teacher_hidden: (N, Dt) teacher states after its head transform (no gradient).
        student_weight: (V, D) student decoder weight (tied to the word embeddings).
        student_bias: (V,) or None.
        teacher_weight: (V, Dt), teacher_bias: (V,) or None (no gradient).
        labels: (N,) long MLM targets, -100 = none; None -> mlm is 0 (e.g. the counterfactual `iit` pass).
        kd_mask: (N,) bool (or 0/1) tokens in the KL mean; None = all N.
        temperature: T of the KL; ce carries the T^2 factor.
        chunk_size: rows per chunk; None = from a 256 MB budget for the chunk's logit buffers.
        impl: "auto" | "reference" | "chunked" | "native" | "triton".
    Returns:
        (ce, mlm): 0-dim fp32 tensors (fp64 for fp64 inputs); see `reference.distill_head_loss_reference`.
        Gradients flow to student_hidden, student_weight and student_bias only.
    """
    which = _pick_impl(impl, student_hidden.device, student_hidden.dtype)
    if which == "reference":
        return distill_head_loss_reference(student_hidden, teacher_hidden, student_weight, student_bias,
                                           teacher_weight, teacher_bias, labels, kd_mask, temperature)
    if which == "triton" and student_hidden.device.type != "cuda":
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("distill_head_loss impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    return DistillHeadLossFunction.apply(student_hidden, teacher_hidden, student_weight, student_bias,
                                         teacher_weight, teacher_bias, labels, kd_mask, float(temperature),
                                         chunk_size, which)
