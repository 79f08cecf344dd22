"""`sparse_distill_head_loss`: the student's LM head fused with a KL against a *sparse* teacher (its top-k
log-probs plus one "rest" bucket, as the offline teacher cache stores them) and the MLM cross-entropy,
chunked over tokens so that no [tokens, vocab] tensor is ever whole.

The teacher side of a row is K entries (log q_j at ids id_j) and log q_rest, the log of the mass outside
the top k, all at temperature T. The buckets b are the K ids and the rest (every other id). The student's
bucket probabilities, from p = softmax(z_s / T) over the whole vocabulary:

    p_j = p[id_j],     p_rest = sum_{v not in ids} p_v          (summed directly: no 1 - sum p_j cancellation)

The teacher's buckets are renormalised, q_b <- q_b / Q with Q = sum_b q_b (values stored in fp16 sum to 1
only to ~1e-3), so both sides are distributions over the K + 1 buckets and

    KL_i = sum_{b: q_b > 0} q_b log(q_b / p_b)
         = sum_{b: q_b > 0} q_b (e^u_b - 1 - u_b) + sum_{b: q_b = 0} p_b,     u_b = log(p_b / q_b)

(the second form has non-negative terms, no cancellation: the head loss's `kl_rows_torch`). With K = V the
rest bucket is empty (q_rest = p_rest = 0) and this is the dense KL exactly. The losses, as the dense op:

    ce = T^2 * mean_i KL_i,      mlm = mean over labelled rows of CE(z_s, y)

Gradient, formed in the backward from the recomputed chunk logits (nothing (V, D)-sized kept from the forward):

    dKL_i/dz_v = (1/T) * (p_v - q_b(v) * p_v / p_b(v))
       top-k id:  (1/T) (p_v - q_j)                 rest id:  (1/T) p_v (1 - q_rest / p_rest)

so dce/dz_s[i] = w_i T (p - q~) with w_i = 1/N, q~ the teacher's bucket mass spread over the bucket in the
student's proportions; the MLM part is the dense op's g_lab (softmax(z_s) - onehot(y)).

Other divergences (`divergence=`: reverse KL, jsd, skew KL, skew reverse KL, TVD; divergence.py): the same
K + 1 buckets, the rest bucket one outcome on each side (the student's p_rest summed directly, the teacher's
q_rest stored), D between the bucket distributions by the divergence's own non-negative terms, and
dD/da_v = p_v (g_b(v) - S) spread over a bucket in the student's proportions as above. It is a lower bound of
the full-vocabulary divergence (data processing), equal to it when K = V; a bucket empty on one side takes the
limit of its term (reverse KL is infinite where the teacher's rest is empty and the student's is not).

impl: "chunked" (the chunk loop, torch inner step; any device) or "reference" (unfused, full logits,
autograd: the ground truth of the tests).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .chunked import HeadLossFunction, default_chunk_size
from .divergence import as_divergence, bucket_divergence_rows, divergence_reference
from .gemms import LOW_PRECISION, DecoderGemms, matmul_dtype
from .inner import kl_rows_torch

IMPLS = ("chunked", "reference")
# live (C, V) fp32 buffers of one chunk: the logits (becoming exp), the MLM softmax, one temporary
_LIVE_CHUNK_BUFFERS = 3


def check_sparse_targets(hidden: torch.Tensor, weight: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor,
                         rest: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Shapes and dtypes of the sparse targets; a ValueError naming the argument otherwise."""
    n, V = hidden.shape[0], weight.shape[0]
    if hidden.dim() != 2:
        raise ValueError(f"student_hidden must be (N, D), got shape {tuple(hidden.shape)}")
    if logp.dim() != 2 or logp.shape[0] != n:
        raise ValueError(f"teacher_logp must be (N, K) with N = {n} rows, got shape {tuple(logp.shape)}")
    K = logp.shape[1]
    if not 1 <= K <= V:
        raise ValueError(f"teacher_logp has K = {K} entries per row; expected 1 <= K <= vocabulary {V}")
    if tuple(ids.shape) != (n, K) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"teacher_ids must be ({n}, {K}) int32/int64, got {tuple(ids.shape)} {ids.dtype}")
    if tuple(rest.shape) != (n,):
        raise ValueError(f"teacher_rest must be ({n},), got shape {tuple(rest.shape)}")
    if labels is not None and tuple(labels.shape) != (n,):
        raise ValueError(f"labels must be ({n},) or None, got shape {tuple(labels.shape)}")


def _bucket_kl(log_p_top, e_top, d, d_rest, logq_top, logq_rest):
    """Per-row sparse KL (C,) and the teacher's renormalised masses q_top (C, K), q_rest (C,), r = q_rest /
    p_rest (C,), from the student's log p at the top ids, its exp sums (top: e_top (C, K), all: d (C,),
    rest: d_rest (C,)) and the teacher's log q. All fp32 (fp64 in, fp64 out)."""
    log_q = torch.cat([logq_top, logq_rest.unsqueeze(1)], 1)                     # (C, K + 1)
    log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)                      # renormalised: sum_b q_b = 1
    q = log_q.exp()
    log_p_rest = torch.where(d_rest > 0, (d_rest / d).log(), float("-inf"))
    log_p = torch.cat([log_p_top, log_p_rest.unsqueeze(1)], 1)                   # (C, K + 1)
    p = torch.cat([e_top / d.unsqueeze(1), (d_rest / d).unsqueeze(1)], 1)        # (C, K + 1)
    has_q = q > 0
    u = torch.where(has_q, log_p - log_q, 0.0)
    kl = kl_rows_torch(torch.where(has_q, p, 0.0), torch.where(has_q, q, 0.0), u)
    kl = kl + torch.where(has_q, 0.0, p).sum(1)                                  # q_b = 0: the term is p_b
    q_top, q_rest = q[:, :-1], q[:, -1]
    r = torch.where(q_rest > 0, q_rest / (d_rest / d), 0.0)                      # q_rest / p_rest
    return kl, q_top, q_rest, r


def _bucket_divergence(div, log_p_top, e_top, d, d_rest, logq_top, logq_rest):
    """(D (C,), G (C, K + 1)) of a divergence other than forward KL over the buckets (the K ids, the rest):
    dD/da_v = p_v G_b(v). The student's buckets from its exp sums as `_bucket_kl` (log p_top from the
    logits, p_rest summed directly), the teacher's renormalised; an empty bucket takes its limit."""
    log_q = torch.cat([logq_top, logq_rest.unsqueeze(1)], 1)                     # (C, K + 1)
    log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    log_p_rest = torch.where(d_rest > 0, (d_rest / d).log(), float("-inf"))
    log_p = torch.cat([log_p_top, log_p_rest.unsqueeze(1)], 1)                   # (C, K + 1)
    p = torch.cat([e_top / d.unsqueeze(1), (d_rest / d).unsqueeze(1)], 1)        # (C, K + 1)
    return bucket_divergence_rows(div, p, log_q.exp(), log_p, log_q)


def _inner(zs, logq_top, ids, logq_rest, labels, g_kd, g_lab, temperature, divergence=None):
    """One chunk: (dz (C, V), kl_rows (C,), ce_rows (C,) or None); zs (C, V) in the accumulation dtype is
    overwritten (dz is its buffer). g_kd, g_lab: per-row gradient weights (None: no MLM). A divergence other
    than forward KL: D between the (K + 1)-bucket distributions and dD/da_v = p_v G_b(v) (divergence.py)."""
    T = float(temperature)
    ids = ids.long()
    m_z = zs.amax(1, keepdim=True)                                                # (C, 1) max logit
    mlm = None
    if labels is not None:
        # the MLM softmax (T = 1) on the labelled rows only (~15% of the rows when every token takes the KL)
        rows = (labels != -100).nonzero().squeeze(1)                              # (C_l,)
        y = labels.index_select(0, rows).unsqueeze(1)                             # (C_l, 1)
        z_l, m_l = zs.index_select(0, rows), m_z.index_select(0, rows)
        z_y = z_l.gather(1, y).squeeze(1)
        e_1 = z_l.sub_(m_l).exp_()                                                # (C_l, V) exp(z_s - m)
        d_1 = e_1.sum(1, keepdim=True)
        mlm = (rows, y, e_1, d_1, (m_l + d_1.log()).squeeze(1) - z_y)             # CE = lse(z_s) - z_s[y]
    z_top = zs.gather(1, ids)                                                     # (C, K)
    # student at T: e = exp((z_s - m) / T), one fused pass and an in-place exp
    e = torch.addcmul(m_z.mul(-1.0 / T), zs, zs.new_tensor(1.0 / T)).exp_()     # (C, V)
    del zs
    d = e.sum(1)
    e_top = e.gather(1, ids)                                                      # (C, K)
    log_p_top = (z_top - m_z) / T - d.log().unsqueeze(1)  # from the logits: exact where e_top underflows
    e.scatter_(1, ids, 0.0)
    d_rest = e.sum(1)                                                             # the rest, summed directly
    g_k = (g_kd * T).to(e.dtype)
    if divergence is not None and not divergence.is_forward_kl:
        kl, G = _bucket_divergence(divergence, log_p_top, e_top, d, d_rest, logq_top.to(e.dtype),
                                   logq_rest.to(e.dtype))                          # (C,), (C, K + 1)
        dz = e.mul_((G[:, -1] * g_k / d).unsqueeze(1))                            # rest ids: p_v G_rest
        dz.scatter_(1, ids, (e_top / d.unsqueeze(1)) * G[:, :-1] * g_k.unsqueeze(1))  # top ids: p_v G_j
    else:
        kl, q_top, q_rest, r = _bucket_kl(log_p_top, e_top, d, d_rest, logq_top.to(e.dtype),
                                          logq_rest.to(e.dtype))
        # dKL/da: rest ids p_v (1 - r), top ids p_v - q_j; then * g_kd * T^2 / T
        dz = e.mul_(((1.0 - r) * g_k / d).unsqueeze(1))
        dz.scatter_(1, ids, (e_top / d.unsqueeze(1) - q_top) * g_k.unsqueeze(1))
    if mlm is None:
        return dz, kl, None
    rows, y, e_1, d_1, ce_l = mlm
    g_l = g_lab.index_select(0, rows).to(dz.dtype).unsqueeze(1)                  # (C_l, 1)
    e_1.mul_(g_l / d_1).scatter_add_(1, y, -g_l)                                  # g_lab (softmax - onehot(y))
    dz.index_add_(0, rows, e_1)
    ce = torch.zeros(dz.shape[0], dtype=dz.dtype, device=dz.device).index_copy_(0, rows, ce_l)
    return dz, kl, ce


def _sparse_loss(hs2, ws, bs, logq, ids, logq_rest, y, temperature, chunk_size, divergence, mm, grad=None):
    """One pass over the chunks of all N rows (every row counts for the KL). grad None (the forward):
    returns (ce, mlm), no gradient formed (y None: no MLM work, mlm = 0). grad = (g_ce, g_mlm, need) (the
    backward): returns (dh, dW, db), the gradients of g_ce * ce + g_mlm * mlm (g_*: 0-dim tensors or None)
    w.r.t. the student's hidden, weight, bias (need: which of the three; None for the others); the logits
    are recomputed, so nothing (V, D)-sized lives between forward and backward."""
    n, V = hs2.shape[0], ws.shape[0]
    acc = torch.float64 if mm == torch.float64 else torch.float32
    dev = hs2.device
    w_kd = torch.full((n,), 1.0 / max(n, 1), dtype=acc, device=dev)              # (N,) mean over rows
    w_lab = None
    if y is not None:
        has = y != -100
        w_lab = has.to(acc) / has.sum().clamp_min(1).to(acc)                      # (N,)
    g_kd, g_lab = w_kd, w_lab
    if grad is not None:
        g_ce, g_mlm, (need_dh, need_dw, need_db) = grad
        g_kd = w_kd * (g_ce.to(acc) if g_ce is not None else 0.0)
        if g_mlm is None:
            y = None                                                              # no MLM gradient: no MLM work
        g_lab = w_lab * g_mlm.to(acc) if y is not None else None
        dh = torch.empty(hs2.shape, dtype=hs2.dtype, device=dev) if need_dh else None     # (N, D)
        dw = torch.zeros(ws.shape, dtype=acc, device=dev) if need_dw else None            # (V, D): the gradient
        db = torch.zeros(V, dtype=acc, device=dev) if (need_db and bs is not None) else None
    chunk = int(chunk_size) if chunk_size else default_chunk_size(
        n, V, low_precision=mm in LOW_PRECISION, buffers=_LIVE_CHUNK_BUFFERS)
    h, gemms = hs2.to(mm), DecoderGemms(ws, mm)
    b = bs.to(acc) if bs is not None else None
    kl_sum = torch.zeros((), dtype=acc, device=dev)
    ce_sum = torch.zeros((), dtype=acc, device=dev)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        zs = gemms.logits(h[s:e], b, acc)                                         # (C, V)
        lab = y[s:e] if y is not None else None
        dz, kl, ce = _inner(zs, logq[s:e], ids[s:e], logq_rest[s:e], lab, g_kd[s:e],
                            g_lab[s:e] if lab is not None else None, temperature, divergence)
        if grad is None:
            kl_sum += (kl.to(acc) * w_kd[s:e]).sum()
            if ce is not None:
                ce_sum += (ce.to(acc) * w_lab[s:e]).sum()
        else:
            gemms.grads(dz, h[s:e], dh[s:e] if dh is not None else None, dw, db)
        del dz, zs
    if grad is not None:
        return dh, dw, db
    T = float(temperature)
    return T * T * kl_sum, ce_sum


class SparseDistillHeadLossFunction(HeadLossFunction):
    """(ce, mlm) against sparse teacher targets; the forward computes the losses only, the backward
    recomputes the chunks and forms the gradient of g_ce * ce + g_mlm * mlm (the grad_outputs) w.r.t.
    student hidden, decoder weight and bias."""

    @staticmethod
    def forward(ctx, hs, ws, bs, logq, ids, logq_rest, labels, temperature, chunk_size, kd_weight, lm_weight,
                divergence=None):
        ctx.set_materialize_grads(False)
        mm = matmul_dtype(hs, ws)                  # read before autocast is switched off
        y = labels.to(hs.device) if (labels is not None and lm_weight != 0.0) else None
        with torch.no_grad(), torch.autocast(hs.device.type, enabled=False):
            ce, mlm = _sparse_loss(hs.detach(), ws.detach(), bs.detach() if bs is not None else None, logq, ids,
                                   logq_rest, y, temperature, chunk_size, divergence, mm)
        # the inputs only (see the dense op)
        HeadLossFunction.keep(ctx, (hs, ws, bs, logq, ids, logq_rest, y), (temperature, chunk_size, divergence, mm),
                              y, _sparse_grads, (0, 1, 2))
        return ce, mlm


def _sparse_grads(ctx, g_ce, g_mlm, need):
    hs, ws, bs, logq, ids, logq_rest, y = ctx.saved_tensors
    temperature, chunk_size, divergence, mm = ctx.args
    with torch.no_grad(), torch.autocast(hs.device.type, enabled=False):
        dh, dw, db = _sparse_loss(hs.detach(), ws.detach(), bs.detach() if bs is not None else None, logq, ids,
                                  logq_rest, y, temperature, chunk_size, divergence, mm, grad=(g_ce, g_mlm, need))
    return dh, dw.to(ws.dtype) if dw is not None else None, db.to(bs.dtype) if db is not None else None


def sparse_distill_head_loss_reference(student_hidden, student_weight, student_bias, teacher_logp, teacher_ids,
                                       teacher_rest, labels, temperature=2.0, divergence=None):
    """Unfused: full logits (N, V), the bucket log-probs by gather / logsumexp, autograd. The ground truth.
    `divergence` (None = forward KL): the textbook formula on the bucket distributions."""
    z = student_hidden @ student_weight.t()
    z = z + student_bias if student_bias is not None else z
    dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(dtype)                                                               # (N, V)
    T = float(temperature)
    log_p = F.log_softmax(z / T, dim=-1)                                          # (N, V)
    ids = teacher_ids.long()
    log_p_b = log_p.gather(1, ids)                                                # (N, K)
    log_q_b = teacher_logp.to(dtype)
    if ids.shape[1] < z.shape[1]:  # the rest bucket; with K = V it is empty
        in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, ids, True)
        log_p_rest = torch.logsumexp(log_p.masked_fill(in_top, float("-inf")), 1, keepdim=True)
        log_p_b = torch.cat([log_p_b, log_p_rest], 1)                             # (N, K + 1)
        log_q_b = torch.cat([log_q_b, teacher_rest.to(dtype).unsqueeze(1)], 1)
    log_q_b = log_q_b - torch.logsumexp(log_q_b, 1, keepdim=True)
    q = log_q_b.exp()
    div = as_divergence(divergence)
    if div.is_forward_kl:
        kl = torch.where(q > 0, q * (log_q_b - torch.where(q > 0, log_p_b, 0.0)), 0.0).sum(1)   # (N,)
    else:
        kl = divergence_reference(div, log_p_b, log_q_b)                          # (N,)
    ce = T * T * kl.mean() if kl.numel() else kl.sum()
    if labels is None:
        return ce, z.new_zeros(())
    n = (labels != -100).sum()
    mlm = F.cross_entropy(z, labels, ignore_index=-100, reduction="sum") / n.clamp_min(1)
    return ce, mlm


def sparse_distill_head_loss(student_hidden, student_weight, student_bias, teacher_logp, teacher_ids, teacher_rest,
                             labels, temperature=2.0, *, chunk_size=None, impl="chunked", kd_weight=1.0,
                             lm_weight=1.0, divergence=None):
    """LM head + temperature KL against a sparse teacher (top-k + rest) + MLM cross-entropy, chunked.

    Args:
        student_hidden: (N, D) student states after the head transform, one row per loss token;
            fp32/bf16/fp16/fp64 (under autocast the decoder GEMMs run in its dtype).
        student_weight: (V, D) decoder weight; student_bias: (V,) or None.
        teacher_logp: (N, K) teacher log-probs at temperature T of its top-k ids (any float dtype).
        teacher_ids: (N, K) int32/int64, distinct per row.
        teacher_rest: (N,) log of the teacher's mass outside the top k (-inf when K = V).
        labels: (N,) long MLM targets, -100 = none; None -> mlm is 0 (e.g. the `iit` term).
        temperature: T of the KL; ce carries the T^2 factor.
        chunk_size: rows per chunk; None = from a 256 MB budget for the chunk's buffers.
        impl: "chunked" | "reference".
        kd_weight, lm_weight: the caller's weights of ce and mlm (the forward forms the weighted gradient);
            lm_weight == 0 skips the MLM work.
        divergence: of ce (a divergence.Divergence, a name, or None = forward KL), taken between the
            (K + 1)-bucket distributions (the K ids and the rest): a lower bound of the full-vocabulary one
            (data processing), equal to it when K = V.
    Returns:
        (ce, mlm): 0-dim fp32 tensors (fp64 for fp64 inputs), unweighted, both means over the N rows
        (mlm over the labelled ones); 0 when no row counts. Gradients reach the student's tensors only.
    """
    if impl not in IMPLS:
        raise ValueError(f"sparse_distill_head_loss impl must be one of {'|'.join(IMPLS)}, got {impl!r}")
    for name, w in (("kd_weight", kd_weight), ("lm_weight", lm_weight)):
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"sparse_distill_head_loss {name} must be a finite real number, got {w!r}")
    check_sparse_targets(student_hidden, student_weight, teacher_logp, teacher_ids, teacher_rest, labels)
    div = as_divergence(divergence)
    if impl == "reference":
        return sparse_distill_head_loss_reference(student_hidden, student_weight, student_bias, teacher_logp,
                                                  teacher_ids, teacher_rest, labels if lm_weight else None,
                                                  temperature, divergence=div)
    return SparseDistillHeadLossFunction.apply(student_hidden, student_weight, student_bias, teacher_logp,
                                               teacher_ids, teacher_rest, labels, float(temperature), chunk_size,
                                               float(kd_weight), float(lm_weight), div)
