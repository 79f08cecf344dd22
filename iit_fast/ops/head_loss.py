"""`distill_head_loss`: LM head fused with the temperature KL and the MLM cross-entropy, chunked over tokens.

No `[tokens, vocab]` tensor is ever whole: tokens go through in chunks of `C` rows; per chunk

    z_s = h_s[c] @ W_s^T + b_s,   z_t = h_t[c] @ W_t^T + b_t          (C, V) fp32 logits, BLAS
    dz  = kd_weight * dce/dz_s + lm_weight * dmlm/dz_s, with the chunk's (KL, CE) rows   inner step
    dh_s[c] = dz @ W_s,   dW_s += dz^T @ h_s[c],   db_s += sum_rows dz     (fp32 accumulators)

with  ce = T^2 * sum_i w_kd[i] KL_i,  mlm = sum_i w_lab[i] CE_i,
w_kd = kd_mask / n_kd,  w_lab = [y != -100] / n_lab  (both 0 when nothing counts: a defined 0, no NaN),

    dce/dz_s[i]  = w_kd[i] * T * (softmax(z_s/T) - softmax(z_t/T))     (T^2 of the KL times the 1/T of z_s/T)
    dmlm/dz_s[i] = w_lab[i] * (softmax(z_s) - onehot(y_i))

Loss weights: the caller's weights of the two losses (`kd_weight`, `lm_weight`; the returned values are the
unweighted ce and mlm) go into the per-row gradient weights, so the forward computes the gradient of
kd_weight * ce + lm_weight * mlm directly, with no difference of two large gradients. lm_weight == 0 (or
labels None) skips all MLM work: mlm is then not computed and is returned as 0. Backward only scales the
stored gradient when the grad_outputs are proportional to (kd_weight, lm_weight) (the normal case, including a
loss scale or gradient-accumulation factor); otherwise (e.g. `torch.autograd.grad(ce, ...)` alone) it reruns
the chunk loop with the grad_outputs as the weights.

KL without an error floor: per row, with u_v = log(p_s,v / p_t,v),
    KL(p_t || p_s) = sum_v p_t,v * (e^u_v - 1 - u_v)      (sum_v p_s = sum_v p_t = 1 add the "- 1" terms)
Every term is >= 0 (e^u >= 1 + u), so the sum has no cancellation and the KL is never negative; e^u - 1 - u is
taken from its series for |u| < 1. The usual sum_v p_t (a_t - a_s) - (lse_t - lse_s) cancels to O(KL) from
O(sqrt(KL)) terms and loses ~eps / sqrt(KL) relative when teacher ~= student.

Precision: bf16/fp16 hidden states (or weights, or a bf16 autocast region) run the three matmuls as bf16/fp16
GEMMs with fp32 accumulation (the weights are cast once per call: the master weights stay fp32 and get fp32
gradients). Logits come out in fp32 where `torch.mm(..., out_dtype=torch.float32)` exists for the device
(CUDA); elsewhere (CPU, torch 2.13) the GEMM returns bf16 logits, upcast to fp32. Softmax statistics,
log-sum-exp, KL and CE are fp32 (their row sums fp64 in the native step), dW and db accumulate in fp32.
fp64 inputs compute in fp64 (impl "chunked").

Tokens that count for neither loss (padding) are dropped before the matmuls: they get a zero gradient.
The teacher side gets no gradient (its tensors are read under no_grad; gradients for them are None).

impl: "auto" (CUDA -> "triton", CPU -> "native"; fp64, or a native step that cannot be built, -> "chunked";
the choice and its reason are logged once, a fallback as a warning),
"reference" (unfused, autograd),
"chunked" (this chunk loop with a plain torch inner step),
"native" (this chunk loop with the C++/OpenMP inner step of csrc/head_loss.cpp: 3 passes per row, in
place; built on first use by `_native.load_native`, a few seconds; fp32/bf16/fp16 inputs),
"triton" (this chunk loop with the Triton inner step: 2 passes per row, in place; fp32/bf16/fp16 inputs; on
CPU only under TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

import logging
import math
import os

import torch

from .reference import distill_head_loss_reference

log = logging.getLogger("iit_fast.ops")
_logged: set[str] = set()

IMPLS = ("auto", "reference", "chunked", "native", "triton")
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Live [C, V] buffers of one chunk, counted for the chunk size chosen from the memory budget: z_s (becomes
# dz), z_t, one scratch buffer (native / triton steps); the torch step also holds u and the series of the KL.
_LIVE_CHUNK_BUFFERS = 3
_LIVE_CHUNK_BUFFERS_TORCH = 5
DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for the chunk's logit buffers


def default_chunk_size(n_tokens: int, vocab: int, budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                       low_precision: bool = False, buffers: int = _LIVE_CHUNK_BUFFERS) -> int:
    """Rows per chunk so that the live [C, V] fp32 buffers stay under `budget_bytes` (at least 1 row)."""
    per_row = vocab * 4 * (buffers + (1 if low_precision else 0))
    c = max(1, budget_bytes // per_row)
    if c >= 64:
        c -= c % 32  # keep the BLAS on whole tiles
    return int(max(1, min(c, n_tokens))) if n_tokens else 1


def _log_once(msg: str, warning: bool = False) -> None:
    if msg not in _logged:
        _logged.add(msg)
        (log.warning if warning else log.info)(msg)


# ----------------------------------------------------------------------------------------------------
# Inner steps: (zs, zt, labels, g_kd, g_lab, T) -> (dz, kl_rows, ce_rows). zs/zt are the chunk's logits in
# the accumulation dtype; both may be overwritten; dz may alias either of them. g_kd, g_lab are the per-row
# gradient weights (kd_weight * w_kd, lm_weight * w_lab); kl_rows / ce_rows are unweighted.
# ----------------------------------------------------------------------------------------------------

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


def _inner_torch(zs, zt, labels, g_kd, g_lab, temperature):
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


# Native C++ inner step (csrc/head_loss.cpp): 3 passes per row kept in L2, no scratch buffer.
_NATIVE_NAME = "iit_fast_head_loss"
_NATIVE_SOURCES = ("head_loss.cpp",)
_native_fn = None      # ctypes function once built
_native_error = None   # why it could not be built


def _native_step():
    """Build (first call, a few seconds; cached in TORCH_EXTENSIONS_DIR) and load the C++ inner step;
    None (reason in _native_error) when that cannot be done."""
    global _native_fn, _native_error
    if _native_fn is None and _native_error is None:
        import ctypes

        from ._native import NativeUnavailable, load_native
        try:
            fn = load_native(_NATIVE_NAME, _NATIVE_SOURCES).iit_distill_head_loss_chunk_f32
        except NativeUnavailable as e:
            _native_error = str(e)
            return None
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [P, I64, P, I64, P, P, P, P, P, I64, I64, ctypes.c_float, ctypes.c_int]
        fn.restype = None
        _native_fn = fn
    return _native_fn


def _inner_native(zs, zt, labels, g_kd, g_lab, temperature):
    fn = _native_step()
    if fn is None:
        raise RuntimeError(f"distill_head_loss impl='native': native CPU step unavailable: {_native_error}")
    if zs.dtype != torch.float32 or zt.dtype != torch.float32 or zs.device.type != "cpu":
        raise ValueError(f"distill_head_loss impl='native': the C++ step takes fp32 CPU logit chunks, got "
                         f"{zs.dtype} / {zt.dtype} on {zs.device}")
    C, V = zs.shape
    if zs.stride(1) != 1 or zt.stride(1) != 1:
        raise ValueError("distill_head_loss impl='native': logit chunks need unit column stride")
    g_kd = g_kd.to(torch.float32).contiguous()
    kl = torch.empty(C, dtype=torch.float32)
    ce = torch.empty(C, dtype=torch.float32) if labels is not None else None
    if labels is not None:
        labels = labels.contiguous()
        g_lab = g_lab.to(torch.float32).contiguous()
    if C:
        fn(zs.data_ptr(), zs.stride(0), zt.data_ptr(), zt.stride(0),
           labels.data_ptr() if labels is not None else None, g_kd.data_ptr(),
           g_lab.data_ptr() if labels is not None else None, kl.data_ptr(),
           ce.data_ptr() if ce is not None else None, C, V, float(temperature),
           min(torch.get_num_threads(), max(1, (C * V) >> 18)))  # small chunks: one thread, no barrier
    return zs, kl, ce


def _inner_triton(zs, zt, labels, g_kd, g_lab, temperature):
    from iit_fast.kernels.head_loss import distill_head_loss_chunk_triton
    return distill_head_loss_chunk_triton(zs, zt, labels, g_kd, g_lab, temperature)


_INNER = {"chunked": _inner_torch, "native": _inner_native, "triton": _inner_triton}


# ----------------------------------------------------------------------------------------------------
# Matmuls: the inputs' precision, fp32 (fp64) accumulation
# ----------------------------------------------------------------------------------------------------

def matmul_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The GEMM dtype of a decoder projection: fp64 if either is fp64; else the autocast dtype inside an
    autocast region of h's device; else bf16/fp16 if either is (weights are cast to it, as autocast does);
    else fp32."""
    dts = (h.dtype, w.dtype)
    if torch.float64 in dts:
        return torch.float64
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    for low in LOW_PRECISION:
        if low in dts:
            return low
    return torch.float32


_out_dtype_ok: dict[tuple, bool] = {}


def _mm_out_dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) runs for `dtype` inputs on this device (probed once)."""
    key = (device.type, dtype)
    if key not in _out_dtype_ok:
        try:
            a = torch.ones(2, 2, dtype=dtype, device=device)
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _out_dtype_ok[key] = ok
        _log_once(f"distill_head_loss: {dtype} GEMMs on {device.type} "
                  + ("return fp32 (torch.mm out_dtype=float32)" if ok else
                     f"return {dtype} logits, upcast to fp32 (torch {torch.__version__} has no "
                     f"torch.mm(out_dtype=float32) for {dtype} on {device.type})"))
    return _out_dtype_ok[key]


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b (same dtype) with the result in out_dtype, accumulated in fp32 by the GEMM."""
    if a.dtype == out_dtype:
        return a @ b
    if _mm_out_dtype_supported(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype)


def linear_chunk(h, w, b, acc):
    """(C, V) logits of a chunk in `acc` dtype; h, w in the GEMM dtype, b in acc (or None)."""
    if h.dtype == acc and b is not None:
        return torch.addmm(b, h, w.t())
    z = _mm(h, w.t(), acc)
    return z.add_(b) if b is not None else z


def accumulate_grads(dz, h, w, dh_out, dw, db):
    """dh_out = dz @ W; dW += dz^T @ h; db += sum_rows dz. h, w in the GEMM dtype; dW, db in acc."""
    dzc = dz if dz.dtype == h.dtype else dz.to(h.dtype)  # the GEMMs run in the inputs' precision
    if dh_out.dtype == dzc.dtype:
        torch.mm(dzc, w, out=dh_out)
    else:
        dh_out.copy_(_mm(dzc, w, dh_out.dtype))
    if dw.dtype == dzc.dtype:
        dw.addmm_(dzc.t(), h)
    else:
        dw.add_(_mm(dzc.t(), h, dw.dtype))
    if db is not None:
        db.add_(dz.sum(0, dtype=db.dtype))


def _chunk_loop(hs, ht, ws, bs, wt, bt, labels, w_kd, w_lab, g_kd, g_lab, temperature, chunk, inner,
                dhs, dws, dbs):
    """Sum over chunks; rows already restricted to the tokens that count, tensors in their GEMM dtypes.

    Writes dh into dhs (n, D) and accumulates dW, db into dws, dbs (when dhs is not None).
    Returns (ce, mlm) as 0-dim tensors in the accumulation dtype.
    """
    n = hs.shape[0]
    acc = dws.dtype if dws is not None else (torch.float64 if hs.dtype == torch.float64 else torch.float32)
    kl_sum = torch.zeros((), dtype=acc, device=hs.device)
    ce_sum = torch.zeros((), dtype=acc, device=hs.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        zs = linear_chunk(hs[s:e], ws, bs, acc)          # (C, V)
        zt = linear_chunk(ht[s:e], wt, bt, acc)          # (C, V)
        lab_c = labels[s:e] if labels is not None else None
        dz, kl, ce = inner(zs, zt, lab_c, g_kd[s:e], g_lab[s:e] if lab_c is not None else None, temperature)
        del zt
        kl_sum += (kl.to(acc) * w_kd[s:e]).sum()
        if ce is not None:
            ce_sum += (ce.to(acc) * w_lab[s:e]).sum()
        if dhs is not None:
            accumulate_grads(dz, hs[s:e], ws, dhs[s:e], dws, dbs)
        del dz, zs
    T = float(temperature)
    return T * T * kl_sum, ce_sum


def _head_loss(hs2, ht2, ws, bs, wt, bt, y, kd_mask, temperature, chunk_size, impl, kd_weight, lm_weight,
               want_grads, mm_s, mm_t):
    """The fused loss on flattened inputs: (ce, mlm, dhs2, dws, dbs), the gradients those of
    kd_weight * ce + lm_weight * mlm (None unless want_grads). y None: no MLM work, mlm = 0."""
    n = hs2.shape[0]
    acc = torch.float64 if mm_s == torch.float64 else torch.float32
    dev = hs2.device
    # per-token weights: w_kd = m / max(sum m, 1); w_lab = [y != -100] / max(n_lab, 1)
    m = torch.ones(n, dtype=acc, device=dev) if kd_mask is None else kd_mask.reshape(-1).to(dev, acc)
    w_kd = m / m.sum().clamp_min(1.0)
    if y is not None:
        has = y != -100
        w_lab = has.to(acc) / has.sum().clamp_min(1).to(acc)
        active = (m != 0) | has
    else:
        w_lab = None
        active = m != 0
    # drop tokens that count for nothing (padding): no logits, zero gradient
    idx = None if bool(active.all()) else active.nonzero().squeeze(1)

    def rows(t):
        return t if (idx is None or t is None) else t.index_select(0, idx)

    h_a, t_a, y_a, wk_a, wl_a = rows(hs2), rows(ht2), rows(y), rows(w_kd), rows(w_lab)
    V = ws.shape[0]
    chunk = int(chunk_size) if chunk_size else default_chunk_size(
        h_a.shape[0], V, low_precision=mm_s in LOW_PRECISION,
        buffers=_LIVE_CHUNK_BUFFERS_TORCH if impl == "chunked" else _LIVE_CHUNK_BUFFERS)
    ws_mm = ws.to(mm_s)
    if want_grads:
        dh_a = torch.empty(h_a.shape, dtype=hs2.dtype, device=dev)            # (n_active, D)
        dws = torch.zeros(ws.shape, dtype=acc, device=dev)                     # (V, D)
        dbs = torch.zeros(V, dtype=acc, device=dev) if bs is not None else None
    else:
        dh_a = dws = dbs = None
    ce, mlm = _chunk_loop(
        h_a.to(mm_s), t_a.to(mm_t), ws_mm, bs.to(acc) if bs is not None else None,
        wt.to(mm_t), bt.to(acc) if bt is not None else None, y_a, wk_a, wl_a,
        wk_a * kd_weight, wl_a * lm_weight if wl_a is not None else None,
        temperature, chunk, _INNER[impl], dh_a, dws, dbs)
    dhs2 = None
    if want_grads:
        if idx is None:
            dhs2 = dh_a
        else:
            dhs2 = torch.zeros(hs2.shape, dtype=hs2.dtype, device=dev)
            dhs2.index_copy_(0, idx, dh_a)
    return ce, mlm, dhs2, dws, dbs


def common_scale(g_ce: float, g_mlm: float, kd_weight: float, lm_weight: float, eps: float):
    """s with (g_ce, g_mlm) == s * (kd_weight, lm_weight) to a few ulps, else None."""
    def close(a, b):
        return abs(a - b) <= 4 * eps * max(abs(a), abs(b))

    if kd_weight != 0.0:
        s = g_ce / kd_weight
        return s if close(g_mlm, s * lm_weight) else None
    if lm_weight != 0.0:
        return g_mlm / lm_weight if g_ce == 0.0 else None
    return 0.0 if (g_ce == 0.0 and g_mlm == 0.0) else None


class DistillHeadLossFunction(torch.autograd.Function):
    """(ce, mlm) with the gradient of kd_weight * ce + lm_weight * mlm w.r.t. student hidden, decoder weight
    and bias computed in the forward."""

    @staticmethod
    def forward(ctx, hs, ht, ws, bs, wt, bt, labels, kd_mask, temperature, chunk_size, impl,
                kd_weight=1.0, lm_weight=1.0):
        ctx.set_materialize_grads(False)
        mm_s, mm_t = matmul_dtype(hs, ws), matmul_dtype(ht, wt)   # read before autocast is switched off
        hs2 = hs.detach().reshape(-1, hs.shape[-1])
        ht2 = ht.detach().reshape(-1, ht.shape[-1])
        y = labels.reshape(-1).to(hs.device) if (labels is not None and lm_weight != 0.0) else None
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        args = (hs2, ht2, ws.detach(), bs.detach() if bs is not None else None, wt.detach(),
                bt.detach() if bt is not None else None, y, kd_mask, temperature, chunk_size, impl)
        with torch.no_grad(), torch.autocast(hs.device.type, enabled=False):
            ce, mlm, dhs2, dws, dbs = _head_loss(*args, kd_weight, lm_weight, want, mm_s, mm_t)
        if want:
            ctx.save_for_backward(dhs2, dws, dbs)
            ctx.recompute = args + (mm_s, mm_t)
        ctx.weights = (kd_weight, lm_weight if y is not None else 0.0)
        ctx.has_labels = y is not None
        ctx.shape, ctx.w_dtype = hs.shape, ws.dtype
        ctx.b_dtype = bs.dtype if bs is not None else None
        return ce, mlm

    @staticmethod
    def backward(ctx, g_ce, g_mlm):
        dhs, dws, dbs = ctx.saved_tensors
        g_ce = 0.0 if g_ce is None else float(g_ce)
        g_mlm = 0.0 if (g_mlm is None or not ctx.has_labels) else float(g_mlm)   # mlm = 0 without MLM work
        s = common_scale(g_ce, g_mlm, *ctx.weights, eps=torch.finfo(dws.dtype).eps)
        if s is None:
            # grad_outputs not proportional to the loss weights: the chunk loop again, with them as weights
            *args, mm_s, mm_t = ctx.recompute
            with torch.no_grad(), torch.autocast(dhs.device.type, enabled=False):
                _, _, dhs, dws, dbs = _head_loss(*args, g_ce, g_mlm, True, mm_s, mm_t)
        elif s != 1.0:
            dhs, dws = dhs * s, dws * s
            dbs = dbs * s if dbs is not None else None
        gh = dhs.reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        gw = dws.to(ctx.w_dtype) if ctx.needs_input_grad[2] else None
        gb = dbs.to(ctx.b_dtype) if (dbs is not None and ctx.needs_input_grad[3]) else None
        return gh, None, gw, gb, None, None, None, None, None, None, None, None, None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pick_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"distill_head_loss impl must be one of {'|'.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        if dtype == torch.float64:
            _log_once(f"distill_head_loss: impl=chunked ({device.type} float64 tensors: the native and Triton "
                      "steps compute in fp32; the torch chunk step keeps fp64)")
            return "chunked"
        if device.type == "cuda":
            _log_once("distill_head_loss: impl=triton (CUDA tensors: cuBLAS matmuls + Triton chunk kernel)")
            return "triton"
        if _native_step() is not None:
            _log_once(f"distill_head_loss: impl=native ({device.type} tensors: BLAS matmuls + C++/OpenMP "
                      "chunk step; the Triton kernel needs CUDA)")
            return "native"
        _log_once(f"distill_head_loss: impl=chunked, the slower torch chunk step ({device.type} tensors): the "
                  f"native CPU step is unavailable: {_native_error}", warning=True)
        return "chunked"
    if impl in ("native", "triton") and dtype == torch.float64:
        raise ValueError(f"distill_head_loss impl={impl!r} supports float32, bfloat16 and float16 inputs (it "
                         f"computes in fp32), got {dtype}; use impl='chunked' or 'auto' for fp64")
    if impl == "native":
        if device.type != "cpu":
            raise ValueError(f"distill_head_loss impl='native' runs on CPU tensors, got {device}")
        if _native_step() is None:
            raise RuntimeError(f"distill_head_loss impl='native': native CPU step unavailable: {_native_error}")
    if impl == "triton" and device.type != "cuda" and not _interpret():
        raise ValueError("distill_head_loss impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    _log_once(f"distill_head_loss: impl={impl} (requested)")
    return impl


def _loss_weight(name: str, value) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"distill_head_loss {name} must be a real number, got {value!r}") from None
    if not math.isfinite(w):
        raise ValueError(f"distill_head_loss {name} must be finite, got {w}")
    return w


def distill_head_loss(student_hidden, teacher_hidden, student_weight, student_bias, teacher_weight,
                      teacher_bias, labels, kd_mask, temperature=2.0, *, chunk_size=None, impl="auto",
                      kd_weight=1.0, lm_weight=1.0):
    """LM head + temperature KL + MLM cross-entropy, chunked so no [tokens, vocab] tensor is whole.

    Args:
        student_hidden: (N, D) or (..., D) student states after the MLM head transform; fp32/bf16/fp16/fp64.
        teacher_hidden: (N, Dt) teacher states after its head transform (no gradient).
        student_weight: (V, D) student decoder weight (tied to the word embeddings).
        student_bias: (V,) or None.
        teacher_weight: (V, Dt), teacher_bias: (V,) or None (no gradient).
        labels: (N,) long MLM targets, -100 = none; None -> mlm is 0 (e.g. the counterfactual `iit` pass).
        kd_mask: (N,) bool (or 0/1) tokens in the KL mean; None = all N.
        temperature: T of the KL; ce carries the T^2 factor.
        chunk_size: rows per chunk; None = from a 256 MB budget for the chunk's logit buffers.
        impl: "auto" | "reference" | "chunked" | "native" | "triton".
        kd_weight, lm_weight: the weights the caller gives ce and mlm in its loss. The forward computes the
            gradient of kd_weight * ce + lm_weight * mlm directly; backward only scales it when the
            grad_outputs are proportional to them, else recomputes. lm_weight == 0 skips the MLM loss
            entirely (mlm is returned as 0, without a gradient).
    Returns:
        (ce, mlm): 0-dim fp32 tensors (fp64 for fp64 inputs), unweighted; see
        `reference.distill_head_loss_reference`. Gradients flow to student_hidden, student_weight and
        student_bias only.
    """
    kd_weight = _loss_weight("kd_weight", kd_weight)
    lm_weight = _loss_weight("lm_weight", lm_weight)
    which = _pick_impl(impl, student_hidden.device, student_hidden.dtype)
    if which == "reference":
        return distill_head_loss_reference(student_hidden, teacher_hidden, student_weight, student_bias,
                                           teacher_weight, teacher_bias, labels if lm_weight != 0.0 else None,
                                           kd_mask, temperature)
    return DistillHeadLossFunction.apply(student_hidden, teacher_hidden, student_weight, student_bias,
                                         teacher_weight, teacher_bias, labels, kd_mask, float(temperature),
                                         chunk_size, which, kd_weight, lm_weight)
