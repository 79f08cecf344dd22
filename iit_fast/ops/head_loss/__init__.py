"""`distill_head_loss`: LM head fused with the temperature KL and the MLM cross-entropy, chunked over tokens.

No `[tokens, vocab]` tensor is ever whole. The forward computes the losses only (no gradient) and, for impl
native, each row's softmax statistics (its maxima, 1 / sums of exps, lse_s - lse_t and the divergence's S: 8
floats a row). impl native with forward KL goes over slices of the vocabulary (outer) and blocks of rows
(inner), so each weight slice is cast once per call, folding each slice into its rows' running log-sum-exps
and KL (the KL's chain rule: every term >= 0; native.cpp fold_row); the other impls and divergences go
through the tokens in chunks of `C` rows: per chunk the whole rows' logits and their (KL, CE). The backward
recomputes the logits and forms the gradient:

- impl native, over slices of the vocabulary (all rows at once where they fit the 256 MB tile budget):
    z_s = h_s @ W_s[v]^T + b_s[v],   z_t = h_t @ W_t[v]^T + b_t[v]      (R, Vs) fp32 logits, BLAS
    dz  = the row step's gradient over the slice, from the saved statistics     (native.cpp slice_step)
    dh_s += dz @ W_s[v],   dW_s[v] = dz^T @ h_s,   db_s[v] = sum_rows dz
  so each weight slice is cast once and each dW slice is one GEMM over all rows, written once;
- the other impls, over row chunks (the inner step recomputes each row's statistics):
    dz = g_ce * dce/dz_s + g_mlm * dmlm/dz_s;  dh_s[c] = dz @ W_s,  dW_s += dz^T @ h_s[c]  (fp32 accumulators)

Nothing (V, D)-sized lives between forward and backward (the saved tensors are the inputs, (N,) weights and
the (N, 8) statistics; the (V, D) fp32 dW is the gradient the backward returns), at the price of the two
logit GEMMs twice (6 GEMMs instead of 4).

Small decoders trade the other way: on the CPU impls, when the decoder's fp32 (V, D) gradient fits
`resident_grad_bytes` (default 256 MB: the default masked teacher's 30522 x 384 is 47 MB, Llama-3.2-1B's
128256 x 2048 is 1 GB), the forward forms the gradients of kd_weight * ce + lm_weight * mlm in the same pass
over row chunks (4 GEMMs a call) and holds them until the backward, which scales them by s when the
grad_outputs are s * (kd_weight, lm_weight) (the step's case) and recomputes otherwise (`head_loss_eager`).

with  ce = T^2 * sum_i w_kd[i] KL_i,  mlm = sum_i w_lab[i] CE_i,
w_kd = kd_mask / n_kd,  w_lab = [y != -100] / n_lab  (both 0 when nothing counts: a defined 0, no NaN),

    dce/dz_s[i]  = w_kd[i] * T * (softmax(z_s/T) - softmax(z_t/T))     (T^2 of the KL times the 1/T of z_s/T)
    dmlm/dz_s[i] = w_lab[i] * (softmax(z_s) - onehot(y_i))

Loss weights: the grad_outputs (g_ce, g_mlm) (e.g. the step's kd_weight and lm_weight times a loss scale)
go into the per-row gradient weights, so the backward forms the gradient of g_ce * ce + g_mlm * mlm
directly, with no difference of two large gradients, for any grad_outputs. lm_weight == 0 (or labels None)
skips all MLM work: mlm is then not computed and is returned as 0; an mlm that takes no gradient
(g_mlm None) skips the MLM work of the backward. The grad_outputs stay tensors (no host sync).

KL without an error floor: per row, with u_v = log(p_s,v / p_t,v),
    KL(p_t || p_s) = sum_v p_t,v * (e^u_v - 1 - u_v)      (sum_v p_s = sum_v p_t = 1 add the "- 1" terms)
Every term is >= 0 (e^u >= 1 + u), so the sum has no cancellation and the KL is never negative; e^u - 1 - u is
taken from its series for |u| < 1. The usual sum_v p_t (a_t - a_s) - (lse_t - lse_s) cancels to O(KL) from
O(sqrt(KL)) terms and loses ~eps / sqrt(KL) relative when teacher ~= student.

Precision: bf16/fp16 hidden states (or weights, or a bf16 autocast region) run the three matmuls as bf16/fp16
GEMMs with fp32 accumulation (a weight in another dtype, e.g. fp32 master weights, is cast a slice of rows
at a time into one reused buffer, never whole, once per call on impl native's vocabulary slices; it gets an
fp32 gradient). Logits come out in fp32 where `torch.mm(..., out_dtype=torch.float32)` exists for the device
(CUDA); elsewhere (CPU, torch 2.13) the GEMM returns bf16 logits, upcast to fp32. Softmax statistics,
log-sum-exp, KL and CE are fp32 (their row sums fp64 in the native step), dW and db accumulate in fp32.
fp64 inputs compute in fp64 (impl "chunked").

Tokens that count for neither loss (padding) get a zero gradient: on the CPU paths they are dropped before the
matmuls; on the device path (triton) they are zeroed and weighted 0 instead, since dropping them would read the
mask on the host (a sync). No host sync on the device path.
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
from .chunked import (  # noqa: F401
    HeadLossFunction, common_scale, default_chunk_size, head_loss_backward, head_loss_eager,
    head_loss_forward, matmul_dtype)
from .divergence import FORWARD_KL, as_divergence
from .reference import distill_head_loss_reference
from .sparse import sparse_distill_head_loss

IMPLS = ("auto", "reference", "chunked", "native", "triton")
# A decoder whose fp32 weight gradient takes at most this many bytes gets its gradients formed in the forward
# (CPU impls; `head_loss_eager`): 4 decoder GEMMs a call instead of 6, for one (V, D) fp32 buffer held until
# the backward. At small vocabularies that buffer is cheap and the recompute is what a step pays for (the
# default masked run: 30522 x 384, 47 MB); at LLM shapes (128256 x 2048: 1 GB a call) the backward recomputes.
RESIDENT_GRAD_BYTES = 256 * 2**20
__all__ = ["distill_head_loss", "sparse_distill_head_loss", "DistillHeadLossFunction", "IMPLS"]


class DistillHeadLossFunction(HeadLossFunction):
    """(ce, mlm); the forward computes the losses only, the backward recomputes the chunks' logits and forms
    the gradient of g_ce * ce + g_mlm * mlm (the grad_outputs) w.r.t. student hidden, decoder weight and
    bias. Nothing (V, D)-sized is kept between the two: the saved tensors are the inputs and (n,) weights."""

    @staticmethod
    def forward(ctx, hs, ht, ws, bs, wt, bt, labels, kd_mask, temperature, chunk_size, impl,
                kd_weight=1.0, lm_weight=1.0, divergence=FORWARD_KL, resident_grad_bytes=None):
        ctx.set_materialize_grads(False)
        mm_s, mm_t = matmul_dtype(hs, ws), matmul_dtype(ht, wt)   # read before autocast is switched off
        hs2 = hs.detach().reshape(-1, hs.shape[-1])
        ht2 = ht.detach().reshape(-1, ht.shape[-1])
        y = labels.reshape(-1).to(hs.device) if (labels is not None and lm_weight != 0.0) else None
        need = tuple(ctx.needs_input_grad[i] for i in (0, 2, 3))
        ctx.eager = None
        args = (hs2, ht2, ws.detach(), bs.detach() if bs is not None else None, wt.detach(),
                bt.detach() if bt is not None else None, y, kd_mask, temperature, chunk_size, impl, divergence,
                mm_s, mm_t)
        lm_used = lm_weight if y is not None else 0.0     # no labels: the LM term is absent, not weighted
        with torch.no_grad(), torch.autocast(hs.device.type, enabled=False):
            if _grad_in_forward(impl, hs, ws, kd_weight, lm_used, need, resident_grad_bytes):
                # rows.stats None: a backward that cannot scale these gradients recomputes over row chunks
                ce, mlm, rows, grads = head_loss_eager(*args, kd_weight, lm_used, need)
                ctx.eager = (grads, kd_weight, lm_used)
            else:
                ce, mlm, rows = head_loss_forward(*args)
        # the student's weight itself: under ZeRO-3 the backward reads what the engine gathers for it then, as
        # for any nn.Linear; the teacher's (no gradient) as read now: a teacher gathered only for the forward
        # (step.common._gathered) keeps that gathered copy alive until the backward
        HeadLossFunction.keep(ctx, (hs, ht, ws, bs, wt.detach(), bt.detach() if bt is not None else None, y),
                              (rows, temperature, chunk_size, impl, divergence, mm_s, mm_t), y, _dense_grads,
                              (0, 2, 3))
        return ce, mlm


def _grad_in_forward(impl, hs, ws, kd_weight, lm_weight, need, budget) -> bool:
    """Form the gradients in the forward (`head_loss_eager`): on the CPU impls, for a student input that takes
    a gradient, nonzero loss weights, and a decoder whose fp32 (V, D) gradient fits `budget` bytes (None:
    RESIDENT_GRAD_BYTES; 0: never). The choice is logged once per decoder shape."""
    if impl not in ("native", "chunked") or hs.device.type != "cpu" or not any(need):
        return False
    if kd_weight == 0.0 and lm_weight == 0.0:
        return False
    budget = RESIDENT_GRAD_BYTES if budget is None else int(budget)
    grad_bytes = ws.shape[0] * ws.shape[1] * 4
    eager = grad_bytes <= budget
    V, D = ws.shape
    _log_once(f"distill_head_loss: " + (
        f"gradients-in-forward path (decoder {V} x {D}: its fp32 weight gradient, {grad_bytes / 2**20:.0f} MB, "
        f"fits the {budget / 2**20:.0f} MB resident budget; 4 GEMMs a call)" if eager else
        f"recompute-in-backward path (decoder {V} x {D}: its fp32 weight gradient, {grad_bytes / 2**20:.0f} MB, "
        f"is over the {budget / 2**20:.0f} MB resident budget; 6 GEMMs a call, nothing (V, D) held)"))
    return eager


def _dense_grads(ctx, g_ce, g_mlm, need):
    hs, ht, ws, bs, wt, bt, y = ctx.saved_tensors
    rows, temperature, chunk_size, impl, divergence, mm_s, mm_t = ctx.args
    if ctx.eager is not None:
        (dhs2, dws, dbs), kd_weight, lm_weight = ctx.eager
        ctx.eager = None  # the held gradients go with the graph's first backward through here (a second recomputes)
        s = common_scale(g_ce, g_mlm, kd_weight, lm_weight)
        if s is not None:
            def scaled(g, dtype):
                return None if g is None else (g if s == 1.0 else g.mul_(s)).to(dtype)
            return (scaled(dhs2, hs.dtype).reshape(hs.shape) if need[0] else None,
                    scaled(dws, ws.dtype) if need[1] else None,
                    scaled(dbs, bs.dtype) if (dbs is not None and need[2]) else None)
    with torch.no_grad(), torch.autocast(hs.device.type, enabled=False):
        dhs, dws, dbs = head_loss_backward(
            hs.detach().reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), ws.detach(),
            bs.detach() if bs is not None else None, wt, bt, y, rows, temperature, chunk_size, impl,
            divergence, mm_s, mm_t, g_ce, g_mlm, need)
    return (dhs.reshape(hs.shape) if need[0] else None, dws.to(ws.dtype) if need[1] else None,
            dbs.to(bs.dtype) if (dbs is not None and need[2]) else None)


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
                      kd_weight=1.0, lm_weight=1.0, divergence=None, resident_grad_bytes=None):
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
        kd_weight, lm_weight: the weights the caller gives ce and mlm in its loss. lm_weight == 0 skips the
            MLM loss entirely (mlm is returned as 0, without a gradient). The gradient is that of the
            grad_outputs' combination g_ce * ce + g_mlm * mlm, formed directly in the backward.
        divergence: of the ce term: a `divergence.Divergence` (e.g. `Divergence.of("jsd", beta=0.5)`), a
            name, or None = forward KL (today's op, bit for bit). ce = T^2 * weighted mean of D.
        resident_grad_bytes: CPU impls form the gradients in the forward when the decoder's fp32 (V, D)
            gradient fits this many bytes (4 GEMMs a call, that buffer held until the backward; None =
            RESIDENT_GRAD_BYTES, 256 MB; 0 = never: the backward recomputes the logits, 6 GEMMs, nothing
            (V, D) held).
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
    if not torch.is_grad_enabled():
        resident_grad_bytes = 0     # no gradient will be asked for (evaluation): do not form one
    return DistillHeadLossFunction.apply(student_hidden, teacher_hidden, student_weight, student_bias,
                                         teacher_weight, teacher_bias, labels, kd_mask, float(temperature),
                                         chunk_size, which, kd_weight, lm_weight, div, resident_grad_bytes)
