"""The chunk loop of `distill_head_loss`: the matmuls (BLAS, the inputs' precision, fp32 accumulation), the
per-token weights, the sums and the gradients' accumulation. The forward pass computes the losses (and, impl
native, each row's softmax statistics); the backward pass recomputes the logits and forms the gradients there:
impl native over vocabulary slices from those statistics (`_slice_backward`: each weight slice cast once, each
dW slice one GEMM), the others over row chunks (`_chunk_loop`). Nothing (V, D)-sized lives between the two and
no (V, D) copy of a weight is made. The per-chunk softmax / KL / CE work is the inner step's (`inner.py`,
`native.py`, `triton.py`), picked by impl through INNER."""
from __future__ import annotations

import functools

import torch

from .._common import log_once as _log_once
from .inner import inner_torch
from .native import NSTATS, inner_native

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


# ----------------------------------------------------------------------------------------------------
# The decoder GEMMs, a slice of weight rows at a time where that saves a (V, D) temporary: a weight not in
# the GEMM dtype (fp32 master weights under bf16 autocast) is cast one slice at a time into a reused buffer,
# never whole; a weight gradient accumulated in another dtype than the GEMM's gets each slice's product in a
# reused (rows, D) buffer. SLICE_BYTES bounds both buffers.
# ----------------------------------------------------------------------------------------------------
SLICE_BYTES = 16 * 2**20


class DecoderGemms:
    """The three GEMMs against one decoder weight w (V, D), run in the GEMM dtype `mm`:
    logits = h @ w^T + b, dh = dz @ w, dW += dz^T @ h, with fp32 (fp64) results."""

    def __init__(self, w: torch.Tensor, mm: torch.dtype):
        self.w, self.mm = w, mm
        V, D = w.shape
        self.rows = max(64, SLICE_BYTES // max(1, D * torch.empty((), dtype=mm).element_size()))
        self._cast = None   # (rows, D) in mm: the current weight slice when w is not in mm
        self._prod = None   # (rows, D) in mm: a slice's dW product

    def _slices(self):
        """(v0, v1, w[v0:v1] in the GEMM dtype); one slice of all rows when w is already in it."""
        V, D = self.w.shape
        if self.w.dtype == self.mm:
            yield 0, V, self.w
            return
        if self._cast is None:
            self._cast = torch.empty(min(self.rows, V), D, dtype=self.mm, device=self.w.device)
        for v0 in range(0, V, self.rows):
            v1 = min(v0 + self.rows, V)
            yield v0, v1, self._cast[: v1 - v0].copy_(self.w[v0:v1])

    def logits(self, h: torch.Tensor, b: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
        """(C, V) logits in acc; h (C, D) in the GEMM dtype, b (V,) in acc or None."""
        if self.w.dtype == self.mm:
            return linear_chunk(h, self.w, b, acc)
        z = torch.empty(h.shape[0], self.w.shape[0], dtype=acc, device=h.device)
        for v0, v1, wb in self._slices():
            z[:, v0:v1] = _mm(h, wb.t(), acc)                     # (C, rows)
        return z.add_(b) if b is not None else z

    def grads(self, dz, h, dh_out, dw, db) -> None:
        """dh_out = dz @ W (or skip: None); dW += dz^T @ h (None: skip); db += sum_rows dz (None: skip).
        dz (C, V) in acc, h (C, D) in the GEMM dtype; dW, db in acc."""
        dzc = dz if dz.dtype == self.mm else dz.to(self.mm)       # (C, V) the GEMMs run in the inputs' precision
        if dh_out is not None:
            if self.w.dtype == self.mm:
                if dh_out.dtype == self.mm:
                    torch.mm(dzc, self.w, out=dh_out)
                else:
                    dh_out.copy_(_mm(dzc, self.w, dh_out.dtype))
            else:
                acc = torch.float64 if dz.dtype == torch.float64 else torch.float32
                dh = torch.zeros(dzc.shape[0], self.w.shape[1], dtype=acc, device=dz.device)  # (C, D)
                for v0, v1, wb in self._slices():
                    dh.add_(_mm(dzc[:, v0:v1], wb, acc))
                dh_out.copy_(dh)
        if dw is not None:
            if dw.dtype == self.mm:
                dw.addmm_(dzc.t(), h)
            elif _mm_out_dtype_supported(dz.device, self.mm):
                for v0 in range(0, dw.shape[0], self.rows):
                    v1 = min(v0 + self.rows, dw.shape[0])
                    dw[v0:v1].add_(torch.mm(dzc[:, v0:v1].t(), h, out_dtype=dw.dtype))
            else:
                if self._prod is None:
                    self._prod = torch.empty(min(self.rows, dw.shape[0]), h.shape[1], dtype=self.mm,
                                             device=h.device)
                for v0 in range(0, dw.shape[0], self.rows):
                    v1 = min(v0 + self.rows, dw.shape[0])
                    dw[v0:v1].add_(torch.mm(dzc[:, v0:v1].t(), h, out=self._prod[: v1 - v0]))  # (rows, D)
        if db is not None:
            db.add_(dz.sum(0, dtype=db.dtype))


def _chunk_loop(hs, ht, gs, gt, bs, bt, labels, g_kd, g_lab, temperature, chunk, inner, acc, grads=None,
                stats=None):
    """One pass over the chunks; rows already restricted to the tokens that count, hs/ht in their GEMM dtypes,
    gs/gt the student's / teacher's DecoderGemms.

    grads None (the forward): returns the per-row (kl, ce) (n,) in acc (ce None without labels); g_kd, g_lab
    are then any weights (the gradient the inner step forms is dropped). grads = (dhs, dws, dbs) (the
    backward): dh into dhs (n, D), dW, db accumulated into dws, dbs (each None: not wanted), with g_kd, g_lab
    the gradient weights. stats (n, NSTATS) or None: the forward's per-row statistics go there (impl native).
    """
    n = hs.shape[0]
    kl_rows = torch.empty(n, dtype=acc, device=hs.device) if grads is None else None
    ce_rows = torch.empty(n, dtype=acc, device=hs.device) if (grads is None and labels is not None) else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        zs = gs.logits(hs[s:e], bs, acc)                  # (C, V)
        zt = gt.logits(ht[s:e], bt, acc)                  # (C, V)
        lab_c = labels[s:e] if labels is not None else None
        st = {} if stats is None else {"stats": stats[s:e]}
        dz, kl, ce = inner(zs, zt, lab_c, g_kd[s:e], g_lab[s:e] if lab_c is not None else None, temperature, **st)
        del zt
        if grads is None:
            kl_rows[s:e] = kl
            if ce_rows is not None:
                ce_rows[s:e] = ce
        else:
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


def function_backward(ctx, g_ce, g_mlm, grads, n_inputs: int):
    """The backward of a head loss Function (the dense and the sparse one): `grads(ctx, g_ce, g_mlm)` -> the
    gradients of its n_inputs inputs, called only when a loss takes a gradient. An mlm computed without MLM
    work (no labels, lm_weight 0: the forward's ctx.has_labels False) is the constant 0: its grad_output is
    dropped, no MLM work is done."""
    if not ctx.has_labels:
        g_mlm = None
    if g_ce is None and g_mlm is None:
        return (None,) * n_inputs
    return grads(ctx, g_ce, g_mlm)


def _chunk_rows(chunk_size, n_active, V, mm_s, impl) -> int:
    return int(chunk_size) if chunk_size else default_chunk_size(
        n_active, V, low_precision=mm_s in LOW_PRECISION,
        buffers=_LIVE_CHUNK_BUFFERS_TORCH if impl == "chunked" else _LIVE_CHUNK_BUFFERS)


def head_loss_forward(hs2, ht2, ws, bs, wt, bt, y, kd_mask, temperature, chunk_size, impl, divergence, mm_s,
                      mm_t):
    """(ce, mlm, rows): the losses of the flattened inputs (no gradient formed or kept; y None: no MLM
    work, mlm = 0) and the HeadLossRows the backward reuses. impl native: rows.stats (n_active, NSTATS), the
    per-row softmax statistics the backward's vocabulary slices read (`head_loss_backward`)."""
    acc = torch.float64 if mm_s == torch.float64 else torch.float32
    r = HeadLossRows(hs2.shape[0], y, kd_mask, acc, hs2.device, on_host=impl != "triton")
    h_a, t_a, y_a = r.states(hs2), r.states(ht2), r.rows(y)
    chunk = _chunk_rows(chunk_size, h_a.shape[0], ws.shape[0], mm_s, impl)
    inner = _inner_for(impl, divergence)
    r.stats = None
    if impl == "native":
        r.stats = torch.empty(h_a.shape[0], NSTATS, dtype=torch.float32, device=hs2.device)   # (n_active, 8)
    kl, ce = _chunk_loop(h_a.to(mm_s), t_a.to(mm_t), DecoderGemms(ws, mm_s), DecoderGemms(wt, mm_t),
                         bs.to(acc) if bs is not None else None, bt.to(acc) if bt is not None else None,
                         y_a, r.wk_a, r.wl_a, temperature, chunk, inner, acc, stats=r.stats)
    T = float(temperature)
    ce_sum = (ce * r.wl_a).sum() if ce is not None else torch.zeros((), dtype=acc, device=hs2.device)
    return T * T * (kl * r.wk_a).sum(), ce_sum, r


def head_loss_backward(hs2, ht2, ws, bs, wt, bt, y, rows: HeadLossRows, temperature, chunk_size, impl,
                       divergence, mm_s, mm_t, g_ce, g_mlm, need=(True, True, True)):
    """(dhs2, dws, dbs): the gradients of g_ce * ce + g_mlm * mlm (g_*: 0-dim tensors or None) w.r.t. the
    student's hidden (n, D), weight (V, D) and bias (V,), formed here from recomputed logits, so nothing
    (V, D)-sized lives between forward and backward. need: which of the three to form (None for the
    others). The per-row weights are g * w: no difference of two large gradients, no host sync.

    impl native: over vocabulary slices (`_slice_backward`), from the forward's per-row statistics: each dW
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
        dh_a, dws, dbs = _slice_backward(h_a.to(mm_s), t_a.to(mm_t), ws, wt, bs, bt, y_a, g_kd, g_lab,
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
    dhs2 = dh_a
    if need_dh and rows.idx is not None:
        dhs2 = torch.zeros(hs2.shape, dtype=hs2.dtype, device=dev)
        dhs2.index_copy_(0, rows.idx, dh_a)
    return dhs2, dws, dbs


# ----------------------------------------------------------------------------------------------------
# The backward over vocabulary slices (impl native)
# ----------------------------------------------------------------------------------------------------

def slice_tiles(n: int, V: int, budget_bytes: int = DEFAULT_MEMORY_BUDGET, rows_max: int = 8192,
                min_slice: int = 256) -> tuple[int, int]:
    """(R, Vs): rows per block and vocabulary ids per slice of the backward, so that one tile's buffers
    (z_s and z_t fp32, the teacher's GEMM output and dz in the GEMM dtype: 12 bytes an element) stay under
    `budget_bytes`, with as many rows as fit (each weight slice is then read once per row block; with every
    row in one block each dW slice is one GEMM) and slices of at least `min_slice` ids."""
    R = max(1, min(n, rows_max))
    Vs = max(min_slice, budget_bytes // (12 * R))
    if Vs >= 128:
        Vs -= Vs % 64                                         # whole BLAS tiles
    Vs = min(Vs, V)
    R = max(1, min(n, budget_bytes // (12 * Vs)))
    return R, Vs


def _slice_backward(h, t, ws, wt, bs, bt, y, g_kd, g_lab, stats, temperature, divergence, mm_s, mm_t, acc,
                    need, chunk_size=None):
    """(dh (n, D) in acc, dW (V, D) in acc, db (V,) in acc), each None where not needed, looping over slices
    [v0, v1) of the vocabulary, and within a slice over blocks of R rows:

        z_s = h @ W_s[v0:v1]^T + b_s,  z_t = t @ W_t[v0:v1]^T + b_t       (R, Vs) fp32, BLAS
        dz  = the row step's gradient over the slice, from the forward's per-row statistics (native.cpp
              slice_step: the same dz element for element)
        dh += dz @ W_s[v0:v1],   dW[v0:v1] = dz^T @ h,   db[v0:v1] = sum_rows dz

    Each weight slice is cast to the GEMM dtype once (a reused (Vs, D) buffer, at most SLICE_BYTES), each dW
    slice comes from one
    GEMM over all rows when they fit one block (no fp32 re-accumulation over row chunks), and the GEMMs are
    large. h, t: (n, D) in their GEMM dtypes; stats (n, NSTATS) from the forward. chunk_size: rows per
    block (None: `slice_tiles`)."""
    from .native import slice_native
    n, D = h.shape
    V = ws.shape[0]
    need_dh, need_dw, need_db = need
    dev = h.device
    R, Vs = slice_tiles(n, V)
    if chunk_size:
        R = max(1, min(n, int(chunk_size)))
    # a weight slice in the GEMM dtype stays under SLICE_BYTES (never a whole-weight cast)
    Vs = min(Vs, max(64, SLICE_BYTES // max(1, D * torch.empty((), dtype=mm_s).element_size())))
    dh = torch.zeros(n, D, dtype=acc, device=dev) if need_dh else None          # (n, D) fp32 accumulator
    dw = torch.empty(V, D, dtype=acc, device=dev) if need_dw else None          # (V, D): the gradient
    db = torch.empty(V, dtype=acc, device=dev) if need_db else None
    if n == 0:
        for g in (dw, db):
            if g is not None:
                g.zero_()
        return dh, dw, db
    b_s = bs.to(acc) if bs is not None else None
    b_t = bt.to(acc) if bt is not None else None
    buf_s = torch.empty(min(Vs, V), D, dtype=mm_s, device=dev) if ws.dtype != mm_s else None
    buf_t = torch.empty(min(Vs, V), wt.shape[1], dtype=mm_t, device=dev) if wt.dtype != mm_t else None
    for v0 in range(0, V, Vs):
        v1 = min(v0 + Vs, V)
        w_s = ws[v0:v1] if buf_s is None else buf_s[: v1 - v0].copy_(ws[v0:v1])   # (Vs, D) in mm_s
        w_t = wt[v0:v1] if buf_t is None else buf_t[: v1 - v0].copy_(wt[v0:v1])
        for r0 in range(0, n, R):
            r1 = min(r0 + R, n)
            zs = linear_chunk(h[r0:r1], w_s, b_s[v0:v1] if b_s is not None else None, acc)   # (R, Vs)
            zt = linear_chunk(t[r0:r1], w_t, b_t[v0:v1] if b_t is not None else None, acc)   # (R, Vs)
            dz = slice_native(zs, zt, y[r0:r1] if y is not None else None, g_kd[r0:r1],
                              g_lab[r0:r1] if g_lab is not None else None, stats[r0:r1], v0, V, temperature,
                              divergence)
            del zt
            dzc = dz if dz.dtype == mm_s else dz.to(mm_s)                       # (R, Vs) in the GEMM dtype
            if dh is not None:
                dh[r0:r1].add_(dzc @ w_s)                                       # (R, D), into fp32
            if dw is not None:
                if r0 == 0:
                    dw[v0:v1].copy_(dzc.t() @ h[r0:r1])                         # (Vs, D)
                else:
                    dw[v0:v1].add_(dzc.t() @ h[r0:r1])
            if db is not None:
                if r0 == 0:
                    db[v0:v1].copy_(dz.sum(0, dtype=acc))
                else:
                    db[v0:v1].add_(dz.sum(0, dtype=acc))
            del dz, dzc, zs
    return dh, dw, db
