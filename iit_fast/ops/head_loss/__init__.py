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
"native" (this chunk loop with the C++/OpenMP inner step of native.cpp: 3 passes per row, in
place; built on first use by `_native.load_native`, a few seconds; fp32/bf16/fp16 inputs),
"triton" (this chunk loop with the Triton inner step: 2 passes per row, in place; fp32/bf16/fp16 inputs; on
CPU only under TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

import math
import os

import torch

from .._common import log_once as _log_once
from . import native
from .chunked import _head_loss, common_scale, default_chunk_size, matmul_dtype  # noqa: F401
from .divergence import FORWARD_KL, as_divergence
from .reference import distill_head_loss_reference
from .sparse import sparse_distill_head_loss

IMPLS = ("auto", "reference", "chunked", "native", "triton")
__all__ = ["distill_head_loss", "sparse_distill_head_loss", "DistillHeadLossFunction", "IMPLS"]


class DistillHeadLossFunction(torch.autograd.Function):
    """(ce, mlm) with the gradient of kd_weight * ce + lm_weight * mlm w.r.t. student hidden, decoder weight
    and bias computed in the forward."""

    @staticmethod
    def forward(ctx, hs, ht, ws, bs, wt, bt, labels, kd_mask, temperature, chunk_size, impl,
                kd_weight=1.0, lm_weight=1.0, divergence=FORWARD_KL):
        ctx.set_materialize_grads(False)
        mm_s, mm_t = matmul_dtype(hs, ws), matmul_dtype(ht, wt)   # read before autocast is switched off
        hs2 = hs.detach().reshape(-1, hs.shape[-1])
        ht2 = ht.detach().reshape(-1, ht.shape[-1])
        y = labels.reshape(-1).to(hs.device) if (labels is not None and lm_weight != 0.0) else None
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        args = (hs2, ht2, ws.detach(), bs.detach() if bs is not None else None, wt.detach(),
                bt.detach() if bt is not None else None, y, kd_mask, temperature, chunk_size, impl, divergence)
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
        return gh, None, gw, gb, None, None, None, None, None, None, None, None, None, None


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
        if native.native_step() is not None:
            _log_once(f"distill_head_loss: impl=native ({device.type} tensors: BLAS matmuls + C++/OpenMP "
                      "chunk step; the Triton kernel needs CUDA)")
            return "native"
        _log_once(f"distill_head_loss: impl=chunked, the slower torch chunk step ({device.type} tensors): the "
                  f"native CPU step is unavailable: {native.error}", warning=True)
        return "chunked"
    if impl in ("native", "triton") and dtype == torch.float64:
        raise ValueError(f"distill_head_loss impl={impl!r} supports float32, bfloat16 and float16 inputs (it "
                         f"computes in fp32), got {dtype}; use impl='chunked' or 'auto' for fp64")
    if impl == "native":
        if device.type != "cpu":
            raise ValueError(f"distill_head_loss impl='native' runs on CPU tensors, got {device}")
        if native.native_step() is None:
            raise RuntimeError(f"distill_head_loss impl='native': native CPU step unavailable: {native.error}")
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
                      kd_weight=1.0, lm_weight=1.0, divergence=None):
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
        divergence: of the ce term: a `divergence.Divergence` (e.g. `Divergence.of("jsd", beta=0.5)`), a
            name, or None = forward KL (today's op, bit for bit). ce = T^2 * weighted mean of D.
    Returns:
        (ce, mlm): 0-dim fp32 tensors (fp64 for fp64 inputs), unweighted; see
        `reference.distill_head_loss_reference`. Gradients flow to student_hidden, student_weight and
        student_bias only.
    """
    kd_weight = _loss_weight("kd_weight", kd_weight)
    lm_weight = _loss_weight("lm_weight", lm_weight)
    div = as_divergence(divergence)
    which = _pick_impl(impl, student_hidden.device, student_hidden.dtype)
    if which == "reference":
        return distill_head_loss_reference(student_hidden, teacher_hidden, student_weight, student_bias,
                                           teacher_weight, teacher_bias, labels if lm_weight != 0.0 else None,
                                           kd_mask, temperature, divergence=div)
    return DistillHeadLossFunction.apply(student_hidden, teacher_hidden, student_weight, student_bias,
                                         teacher_weight, teacher_bias, labels, kd_mask, float(temperature),
                                         chunk_size, which, kd_weight, lm_weight, div)
