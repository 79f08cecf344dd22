"""impl native's passes over vocabulary slices: the forward (forward KL) and the backward (every divergence).

Both go over slices [v0, v1) of the vocabulary, outer, and blocks of R rows, inner (all rows in one block
where the tile budget allows), so each weight slice is cast to the GEMM dtype once per call (one reused
(Vs, D) buffer, at most SLICE_BYTES) and no row's logits are ever whole:

    z_s = h @ W_s[v0:v1]^T + b_s,  z_t = t @ W_t[v0:v1]^T + b_t            (R, Vs) fp32, BLAS

- forward (`slice_forward`): each tile is folded into its rows' running state (native.cpp fold_row: the
  slice's log-sum-exps and the KL of its conditional distributions, joined by the KL's chain rule, every
  term >= 0); after the last slice the state gives each row's KL, CE and the softmax statistics the backward
  reads. The other divergences' terms depend on p and q themselves, not only on their ratios within a slice
  (jsd's and the skew divergences' mixtures, tvd's |p - q|), so no slice's terms can be formed before its row
  is complete: they keep the row-chunk forward (reverse KL, a KL too, could be folded the same way; not done).
- backward (`slice_backward`): dz of the tile from the forward's statistics (native.cpp slice_step), then
  dh += dz @ W_s[v0:v1],  dW[v0:v1] = dz^T @ h (one GEMM when all rows fit one block),  db[v0:v1] = sum dz.

Working memory: the tile's buffers (z_s, z_t fp32 and the GEMMs' low-precision outputs: 12 bytes an
element, under DEFAULT_MEMORY_BUDGET), two weight-slice buffers (SLICE_BYTES each) and the forward's
(n, NFOLD) fp64 state; never anything (V, D)-sized besides the weight gradient itself.
"""
from __future__ import annotations

import torch

from . import gemms
from .gemms import linear_chunk, slice_buffer, weight_slice

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one tile's logit buffers (and the row chunks': chunked.py)


def slice_tiles(n: int, V: int, budget_bytes: int = DEFAULT_MEMORY_BUDGET, rows_max: int = 8192,
                min_slice: int = 256) -> tuple[int, int]:
    """(R, Vs): rows per block and vocabulary ids per slice, so that one tile's buffers (z_s and z_t fp32, the
    teacher's GEMM output and dz in the GEMM dtype: 12 bytes an element) stay under `budget_bytes`, with as
    many rows as fit (each weight slice is then read once per row block; with every row in one block each dW
    slice is one GEMM) and slices of at least `min_slice` ids."""
    R = max(1, min(n, rows_max))
    Vs = max(min_slice, budget_bytes // (12 * R))
    if Vs >= 128:
        Vs -= Vs % 64                                         # whole BLAS tiles
    Vs = min(Vs, V)
    R = max(1, min(n, budget_bytes // (12 * Vs)))
    return R, Vs


def _tiles(n, V, ws, wt, mm_s, mm_t, chunk_size):
    """(R, Vs) of a pass: slice_tiles, chunk_size rows per block if given, both weights' slices under
    SLICE_BYTES (never a whole-weight cast)."""
    R, Vs = slice_tiles(n, V)
    if chunk_size:
        R = max(1, min(n, int(chunk_size)))
    return R, min(Vs, gemms.slice_rows(ws.shape[1], mm_s), gemms.slice_rows(wt.shape[1], mm_t))


def _tiles_of(h, t, ws, wt, bs, bt, mm_s, mm_t, acc, chunk_size):
    """(v0, v1, r0, r1, W_s slice, z_s, z_t): every tile's logits (R, Vs) in acc, slices outer, row blocks
    inner, each weight slice cast once (into one reused buffer per weight when it is not in its GEMM dtype)."""
    n, V = h.shape[0], ws.shape[0]
    R, Vs = _tiles(n, V, ws, wt, mm_s, mm_t, chunk_size)
    buf_s, buf_t = slice_buffer(ws, mm_s, Vs), slice_buffer(wt, mm_t, Vs)         # (Vs, D) or None
    b_s = bs.to(acc) if bs is not None else None
    b_t = bt.to(acc) if bt is not None else None
    for v0 in range(0, V, Vs):
        v1 = min(v0 + Vs, V)
        w_s, w_t = weight_slice(ws, v0, v1, buf_s), weight_slice(wt, v0, v1, buf_t)   # (Vs, D) in mm_s / mm_t
        for r0 in range(0, n, R):
            r1 = min(r0 + R, n)
            zs = linear_chunk(h[r0:r1], w_s, b_s[v0:v1] if b_s is not None else None, acc)   # (R, Vs)
            zt = linear_chunk(t[r0:r1], w_t, b_t[v0:v1] if b_t is not None else None, acc)   # (R, Vs)
            yield v0, v1, r0, r1, w_s, zs, zt
            del zs, zt                                # before the next tile's: one tile's buffers live


def slice_forward(h, t, ws, wt, bs, bt, y, temperature, mm_s, mm_t, chunk_size=None):
    """(kl (n,), ce (n,) or None, stats (n, NSTATS)) fp32 of forward KL over vocabulary slices: the rows' KL
    and CE as the row step gives them, and the statistics `slice_backward` reads. h, t: (n, D) in their GEMM
    dtypes; y (n,) or None (no CE); chunk_size: rows per block (None: `slice_tiles`)."""
    from .native import NFOLD, fold_finish, fold_native
    n, V = h.shape[0], ws.shape[0]
    state = torch.empty(n, NFOLD, dtype=torch.float64, device=h.device)          # (n, 8) running state
    if n:
        for v0, _, r0, r1, _, zs, zt in _tiles_of(h, t, ws, wt, bs, bt, mm_s, mm_t, torch.float32, chunk_size):
            fold_native(zs, zt, y[r0:r1] if y is not None else None, state[r0:r1], v0, temperature)
            del zs, zt
    return fold_finish(state, y, V)


def slice_backward(h, t, ws, wt, bs, bt, y, g_kd, g_lab, stats, temperature, divergence, mm_s, mm_t, acc,
                   need, chunk_size=None):
    """(dh (n, D) in acc, dW (V, D) in acc, db (V,) in acc), each None where not needed, over the tiles:

        dz  = the row step's gradient over the slice, from the forward's per-row statistics (native.cpp
              slice_step: the same dz element for element)
        dh += dz @ W_s[v0:v1],   dW[v0:v1] = dz^T @ h,   db[v0:v1] = sum_rows dz

    h, t: (n, D) in their GEMM dtypes; stats (n, NSTATS) from the forward; need: (dh, dW, db) wanted;
    chunk_size: rows per block (None: `slice_tiles`)."""
    from .native import slice_native
    n, D = h.shape
    V = ws.shape[0]
    need_dh, need_dw, need_db = need
    dev = h.device
    dh = torch.zeros(n, D, dtype=acc, device=dev) if need_dh else None          # (n, D) fp32 accumulator
    dw = torch.empty(V, D, dtype=acc, device=dev) if need_dw else None          # (V, D): the gradient
    db = torch.empty(V, dtype=acc, device=dev) if need_db else None
    if n == 0:
        for g in (dw, db):
            if g is not None:
                g.zero_()
        return dh, dw, db
    for v0, v1, r0, r1, w_s, zs, zt in _tiles_of(h, t, ws, wt, bs, bt, mm_s, mm_t, acc, chunk_size):
        dz = slice_native(zs, zt, y[r0:r1] if y is not None else None, g_kd[r0:r1],
                          g_lab[r0:r1] if g_lab is not None else None, stats[r0:r1], v0, V, temperature,
                          divergence)
        del zt
        dzc = dz if dz.dtype == mm_s else dz.to(mm_s)                           # (R, Vs) in the GEMM dtype
        if dh is not None:
            dh[r0:r1].add_(dzc @ w_s)                                           # (R, D), into fp32
        if dw is not None:
            if r0 == 0:
                dw[v0:v1].copy_(dzc.t() @ h[r0:r1])                             # (Vs, D)
            else:
                dw[v0:v1].add_(dzc.t() @ h[r0:r1])
        if db is not None:
            if r0 == 0:
                db[v0:v1].copy_(dz.sum(0, dtype=acc))
            else:
                db[v0:v1].add_(dz.sum(0, dtype=acc))
        del dz, dzc, zs
    return dh, dw, db
