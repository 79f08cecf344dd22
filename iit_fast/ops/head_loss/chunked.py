"""The chunk loop of `distill_head_loss`: the matmuls (BLAS, the inputs' precision, fp32 accumulation), the
per-token weights, the sums and the gradients' accumulation. The per-chunk softmax / KL / CE work is the inner
step's (`inner.py`, `native.py`, `triton.py`), picked by impl through INNER."""
from __future__ import annotations

import functools

import torch

from .._common import log_once as _log_once
from .inner import inner_torch
from .native import inner_native

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


def inner_triton(zs, zt, labels, g_kd, g_lab, temperature, divergence=None):
    from .triton import (  # lazy: triton is heavy and needs CUDA or the interpreter
        distill_head_loss_chunk_triton,
        divergence_head_loss_chunk_triton,
    )
    if divergence is not None and not divergence.is_forward_kl:
        return divergence_head_loss_chunk_triton(zs, zt, labels, g_kd, g_lab, temperature, divergence)
    return distill_head_loss_chunk_triton(zs, zt, labels, g_kd, g_lab, temperature)


INNER = {"chunked": inner_torch, "native": inner_native, "triton": inner_triton}


def _inner_for(impl, divergence):
    """The inner step of impl; a divergence other than forward KL goes in as its keyword (divergence.py)."""
    if divergence is None or divergence.is_forward_kl:
        return INNER[impl]
    return functools.partial(INNER[impl], divergence=divergence)


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


def _head_loss(hs2, ht2, ws, bs, wt, bt, y, kd_mask, temperature, chunk_size, impl, divergence, kd_weight,
               lm_weight, want_grads, mm_s, mm_t):
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
        temperature, chunk, _inner_for(impl, divergence), dh_a, dws, dbs)
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
