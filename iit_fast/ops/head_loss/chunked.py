"""The chunk loop of `distill_head_loss` and the op's two passes: the per-token weights (HeadLossRows), the
sums and the gradients' accumulation; the matmuls are gemms.py's (BLAS, the inputs' precision, fp32
accumulation). impl native runs both passes over vocabulary slices (slices.py: each weight slice cast once per
call, each dW slice one GEMM; the forward folds each row's slices into its KL, CE and softmax statistics),
except the forward of a divergence other than forward KL; the other impls and that forward go over row chunks
(`_chunk_loop`). Nothing (V, D)-sized lives between the two passes and no (V, D) copy of a weight is made.
The per-chunk softmax / KL / CE work is the inner step's (`inner.py`, `native.py`, `triton.py`), picked by
impl through INNER."""
from __future__ import annotations

import functools

import torch

from .._common import log_once as _log_once
from .gemms import (  # noqa: F401  (matmul_dtype, LOW_PRECISION, ...: imported from here by the op and tests)
    LOW_PRECISION, DecoderGemms, _mm_out_dtype_supported, matmul_dtype)
from .inner import inner_torch
from .native import NSTATS, inner_native
from .slices import DEFAULT_MEMORY_BUDGET, slice_backward, slice_forward
# Live [C, V] buffers of one chunk, counted for the chunk size chosen from the memory budget: z_s (becomes
# dz), z_t, one scratch buffer (native / triton steps); the torch step also holds u and the series of the KL.
_LIVE_CHUNK_BUFFERS = 3
_LIVE_CHUNK_BUFFERS_TORCH = 5


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


def _chunk_loop(hs, ht, gs, gt, bs, bt, labels, g_kd, g_lab, temperature, chunk, inner, acc, grads=None,
                stats=None, losses=None):
    """One pass over the chunks; rows already restricted to the tokens that count, hs/ht in their GEMM dtypes,
    gs/gt the student's / teacher's DecoderGemms.

    grads None (the forward): returns the per-row (kl, ce) (n,) in acc (ce None without labels); g_kd, g_lab
    are then any weights (the gradient the inner step forms is dropped). grads = (dhs, dws, dbs) (the
    backward): dh into dhs (n, D), dW, db accumulated into dws, dbs (each None: not wanted), with g_kd, g_lab
    the gradient weights. stats (n, NSTATS) or None: the forward's per-row statistics go there (impl native).
    losses: return the per-row (kl, ce) too (default: only without grads; both at once: `head_loss_eager`).
    """
    n = hs.shape[0]
    losses = grads is None if losses is None else losses
    kl_rows = torch.empty(n, dtype=acc, device=hs.device) if losses else None
    ce_rows = torch.empty(n, dtype=acc, device=hs.device) if (losses and labels is not None) else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        zs = gs.logits(hs[s:e], bs, acc)                  # (C, V)
        zt = gt.logits(ht[s:e], bt, acc)                  # (C, V)
        lab_c = labels[s:e] if labels is not None else None
        st = {} if stats is None else {"stats": stats[s:e]}
        dz, kl, ce = inner(zs, zt, lab_c, g_kd[s:e], g_lab[s:e] if lab_c is not None else None, temperature, **st)
        del zt
        if losses:
            kl_rows[s:e] = kl
            if ce_rows is not None:
                ce_rows[s:e] = ce
        if grads is not None:
            dhs, dws, dbs = grads
            gs.grads(dz, hs[s:e], dhs[s:e] if dhs is not None else None, dws, dbs)
        del dz, zs
    return kl_rows, ce_rows


class HeadLossRows:
    """The rows of one call that count and their weights: w_kd = m / max(sum m, 1), w_lab = [y != -100] /
    max(n_lab, 1). Rows that count for neither loss (padding) get a zero gradient, two ways, neither of which
    the host waits for on a device:
    - on the CPU (impl native / chunked; a host read costs nothing there) they are dropped before the
      matmuls: idx (n_active,) the rows kept, None when every row counts;
    - on the device path (impl triton, or any CUDA tensor) no row is dropped (that would read the mask on the
      host: a sync): `zero` (n,) bool marks them, their states are zeroed (torch.where: a NaN in a padding
      row's state does not reach the gradient) and their weights are 0, so their dz is 0.
    Without kd_mask every row counts for the KL: nothing to drop, nothing read."""

    def __init__(self, n: int, y: torch.Tensor | None, kd_mask: torch.Tensor | None, acc, device,
                 on_host: bool = True):
        m = torch.ones(n, dtype=acc, device=device) if kd_mask is None else kd_mask.reshape(-1).to(device, acc)
        self.w_kd = m / m.sum().clamp_min(1.0)                                     # (n,)
        active = None if kd_mask is None else (m != 0)
        if y is not None:
            has = y != -100
            self.w_lab = has.to(acc) / has.sum().clamp_min(1).to(acc)             # (n,)
            active = None if active is None else active | has
        else:
            self.w_lab = None
        self.idx = self.zero = None
        if active is not None:
            if on_host and device.type == "cpu":
                self.idx = None if bool(active.all()) else active.nonzero().squeeze(1)
            else:
                self.zero = ~active
        self.wk_a, self.wl_a = self.rows(self.w_kd), self.rows(self.w_lab)

    def rows(self, t):
        return t if (self.idx is None or t is None) else t.index_select(0, self.idx)

    def states(self, h):
        """h's rows that count (n_active, D): dropped or zeroed as above."""
        h = self.rows(h)
        return h if self.zero is None else torch.where(self.zero.unsqueeze(1), 0, h)


class HeadLossFunction(torch.autograd.Function):
    """Base of the dense and the sparse head-loss Functions ((ce, mlm) out). The forward keeps what its
    backward reads with `keep`; the backward forms the gradient of g_ce * ce + g_mlm * mlm (the grad_outputs)
    w.r.t. the student's hidden, weight and bias with ctx.grads(ctx, g_ce, g_mlm, need) -> (dh, dW, db), called
    only when a loss takes a gradient. An mlm computed without MLM work (no labels, lm_weight 0: ctx.has_labels
    False) is the constant 0: its grad_output is dropped, no MLM work is done."""

    @staticmethod
    def keep(ctx, tensors, args, y, grads, student):
        """tensors (saved) and args for `grads`, kept only when an input at the positions `student` (hidden,
        weight, bias) takes a gradient; y: the labels the forward used (None: no MLM work)."""
        if any(ctx.needs_input_grad[i] for i in student):
            ctx.save_for_backward(*tensors)
            ctx.args = args
        ctx.has_labels, ctx.grads, ctx.student = y is not None, grads, student

    @staticmethod
    def backward(ctx, g_ce, g_mlm):
        out = [None] * len(ctx.needs_input_grad)
        g_mlm = g_mlm if ctx.has_labels else None
        if g_ce is not None or g_mlm is not None:
            need = tuple(ctx.needs_input_grad[i] for i in ctx.student)
            for i, g in zip(ctx.student, ctx.grads(ctx, g_ce, g_mlm, need)):
                out[i] = g
        return tuple(out)


def _chunk_rows(chunk_size, n_active, V, mm_s, impl) -> int:
    return int(chunk_size) if chunk_size else default_chunk_size(
        n_active, V, low_precision=mm_s in LOW_PRECISION,
        buffers=_LIVE_CHUNK_BUFFERS_TORCH if impl == "chunked" else _LIVE_CHUNK_BUFFERS)


def head_loss_forward(hs2, ht2, ws, bs, wt, bt, y, kd_mask, temperature, chunk_size, impl, divergence, mm_s,
                      mm_t):
    """(ce, mlm, rows): the losses of the flattened inputs (no gradient formed or kept; y None: no MLM
    work, mlm = 0) and the HeadLossRows the backward reuses. impl native: rows.stats (n_active, NSTATS), the
    per-row softmax statistics the backward's vocabulary slices read (`head_loss_backward`); forward KL goes
    over vocabulary slices too (`slices.slice_forward`: each weight slice cast once per call), the other
    divergences over row chunks (their terms need the whole row first: slices.py says why)."""
    acc = torch.float64 if mm_s == torch.float64 else torch.float32
    r = HeadLossRows(hs2.shape[0], y, kd_mask, acc, hs2.device, on_host=impl != "triton")
    h_a, t_a, y_a = r.states(hs2), r.states(ht2), r.rows(y)
    r.stats = None
    if impl == "native" and (divergence is None or divergence.is_forward_kl):
        kl, ce, r.stats = slice_forward(h_a.to(mm_s), t_a.to(mm_t), ws, wt, bs, bt, y_a, temperature, mm_s, mm_t,
                                        chunk_size)
    else:
        if impl == "native":
            _log_once(f"distill_head_loss impl=native, {divergence}: forward over row chunks (not vocabulary "
                      "slices: this divergence's terms need the whole row's normalisers first)")
            r.stats = torch.empty(h_a.shape[0], NSTATS, dtype=torch.float32, device=hs2.device)   # (n_active, 8)
        chunk = _chunk_rows(chunk_size, h_a.shape[0], ws.shape[0], mm_s, impl)
        kl, ce = _chunk_loop(h_a.to(mm_s), t_a.to(mm_t), DecoderGemms(ws, mm_s), DecoderGemms(wt, mm_t),
                             bs.to(acc) if bs is not None else None, bt.to(acc) if bt is not None else None,
                             y_a, r.wk_a, r.wl_a, temperature, chunk, _inner_for(impl, divergence), acc,
                             stats=r.stats)
    return (*_loss_sums(kl, ce, r, temperature, acc, hs2.device), r)


def _loss_sums(kl, ce, r: HeadLossRows, temperature, acc, dev):
    """(ce, mlm) of the per-row (kl, ce): T^2 * sum w_kd KL, sum w_lab CE (0 without labels)."""
    T = float(temperature)
    ce_sum = (ce * r.wl_a).sum() if ce is not None else torch.zeros((), dtype=acc, device=dev)
    return T * T * (kl * r.wk_a).sum(), ce_sum


def _all_rows(dh_a, rows: HeadLossRows, hs2):
    """The (n, D) gradient of all rows from that of the rows that count (the others 0)."""
    if dh_a is None or rows.idx is None:
        return dh_a
    dhs2 = torch.zeros(hs2.shape, dtype=dh_a.dtype, device=hs2.device)
    return dhs2.index_copy_(0, rows.idx, dh_a)


def head_loss_eager(hs2, ht2, ws, bs, wt, bt, y, kd_mask, temperature, chunk_size, impl, divergence, mm_s, mm_t,
                    kd_weight, lm_weight, need):
    """(ce, mlm, rows, (dhs2, dws, dbs)): the losses, the HeadLossRows and, in the same pass over row chunks,
    the gradients of kd_weight * ce + lm_weight * mlm (the weights the caller applies; fp32 (fp64), each None where `need`
    says so) w.r.t. the student's hidden (n, D), weight (V, D) and bias (V,). The backward scales them by
    g / weight when the grad_outputs are proportional to (kd_weight, lm_weight) (`common_scale`), and
    recomputes (`head_loss_backward`) otherwise. CPU impls (native, chunked): the proportionality is read on
    the host."""
    acc = torch.float64 if mm_s == torch.float64 else torch.float32
    dev = hs2.device
    r = HeadLossRows(hs2.shape[0], y, kd_mask, acc, dev)
    r.stats = None
    h_a, t_a, y_a = r.states(hs2), r.states(ht2), r.rows(y)
    need_dh, need_dw, need_db = need
    dh_a = torch.empty(h_a.shape, dtype=acc, device=dev) if need_dh else None              # (n_active, D)
    dws = torch.zeros(ws.shape, dtype=acc, device=dev) if need_dw else None                # (V, D)
    dbs = torch.zeros(ws.shape[0], dtype=acc, device=dev) if (need_db and bs is not None) else None
    chunk = _chunk_rows(chunk_size, h_a.shape[0], ws.shape[0], mm_s, impl)
    kl, ce = _chunk_loop(h_a.to(mm_s), t_a.to(mm_t), DecoderGemms(ws, mm_s), DecoderGemms(wt, mm_t),
                         bs.to(acc) if bs is not None else None, bt.to(acc) if bt is not None else None, y_a,
                         r.wk_a * kd_weight, r.wl_a * lm_weight if y_a is not None else None, temperature, chunk,
                         _inner_for(impl, divergence), acc, grads=(dh_a, dws, dbs), losses=True)
    return (*_loss_sums(kl, ce, r, temperature, acc, dev), r, (_all_rows(dh_a, r, hs2), dws, dbs))


def common_scale(g_ce, g_mlm, kd_weight: float, lm_weight: float):
    """s with (g_ce, g_mlm) == s * (kd_weight, lm_weight) to a few ulps (g: 0-dim tensors or None = 0),
    else None: then a gradient formed for (kd_weight, lm_weight) is s times the one wanted."""
    a = float(g_ce) if g_ce is not None else 0.0
    b = float(g_mlm) if g_mlm is not None else 0.0

    def close(x, z):
        return abs(x - z) <= 8 * torch.finfo(torch.float32).eps * max(abs(x), abs(z))
    if kd_weight != 0.0:
        s = a / kd_weight
        return s if close(b, s * lm_weight) else None
    if lm_weight != 0.0 and a == 0.0:
        return b / lm_weight
    return None


def head_loss_backward(hs2, ht2, ws, bs, wt, bt, y, rows: HeadLossRows, temperature, chunk_size, impl,
                       divergence, mm_s, mm_t, g_ce, g_mlm, need=(True, True, True)):
    """(dhs2, dws, dbs): the gradients of g_ce * ce + g_mlm * mlm (g_*: 0-dim tensors or None) w.r.t. the
    student's hidden (n, D), weight (V, D) and bias (V,), formed here from recomputed logits, so nothing
    (V, D)-sized lives between forward and backward. need: which of the three to form (None for the
    others). The per-row weights are g * w: no difference of two large gradients, no host sync.

    impl native: over vocabulary slices (`slices.slice_backward`), from the forward's per-row statistics: each dW
    slice written once, each weight slice cast once. Other impls: over row chunks (`_chunk_loop`), the inner
    step recomputing each row's statistics."""
    acc = torch.float64 if mm_s == torch.float64 else torch.float32
    dev = hs2.device
    zero = torch.zeros((), dtype=acc, device=dev)
    g_ce = zero if g_ce is None else g_ce.to(acc)
    if g_mlm is None:
        y = None                                           # the MLM term is not differentiated: no MLM work
    g_kd = rows.wk_a * g_ce                                # (n_active,)
    g_lab = rows.wl_a * g_mlm.to(acc) if y is not None else None
    h_a, t_a, y_a = rows.states(hs2), rows.states(ht2), rows.rows(y)
    need_dh, need_dw, need_db = need
    if getattr(rows, "stats", None) is not None:
        dh_a, dws, dbs = slice_backward(h_a.to(mm_s), t_a.to(mm_t), ws, wt, bs, bt, y_a, g_kd, g_lab,
                                        rows.stats, temperature, divergence, mm_s, mm_t, acc,
                                        (need_dh, need_dw, need_db and bs is not None), chunk_size)
        dh_a = dh_a.to(hs2.dtype) if dh_a is not None else None
    else:
        chunk = _chunk_rows(chunk_size, h_a.shape[0], ws.shape[0], mm_s, impl)
        dh_a = torch.empty(h_a.shape, dtype=hs2.dtype, device=dev) if need_dh else None     # (n_active, D)
        dws = torch.zeros(ws.shape, dtype=acc, device=dev) if need_dw else None              # (V, D)
        dbs = torch.zeros(ws.shape[0], dtype=acc, device=dev) if (need_db and bs is not None) else None
        _chunk_loop(h_a.to(mm_s), t_a.to(mm_t), DecoderGemms(ws, mm_s), DecoderGemms(wt, mm_t),
                    bs.to(acc) if bs is not None else None, bt.to(acc) if bt is not None else None,
                    y_a, g_kd, g_lab, temperature, chunk, _inner_for(impl, divergence), acc,
                    grads=(dh_a, dws, dbs))
    return _all_rows(dh_a, rows, hs2), dws, dbs
