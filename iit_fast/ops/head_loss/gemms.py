"""The decoder GEMMs of the head loss, in the inputs' precision with fp32 (fp64) results: the GEMM dtype of a
projection (`matmul_dtype`), fp32 output where the device's BLAS gives it, `linear_chunk` (a chunk's logits),
`DecoderGemms` (the row-chunk loop's three GEMMs against one weight) and `weight_slice` (a weight's vocabulary
slices in the GEMM dtype, through one reused buffer). SLICE_BYTES bounds every weight-slice buffer: no
(V, D) copy of a weight is ever made."""
from __future__ import annotations

import torch

from .._common import log_once as _log_once

LOW_PRECISION = (torch.bfloat16, torch.float16)


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


def slice_rows(D: int, mm: torch.dtype) -> int:
    """Weight rows per slice: a (rows, D) slice in the GEMM dtype mm stays under SLICE_BYTES (at least 64)."""
    return max(64, SLICE_BYTES // max(1, D * torch.empty((), dtype=mm).element_size()))


def weight_slice(w: torch.Tensor, v0: int, v1: int, buf: torch.Tensor | None) -> torch.Tensor:
    """w[v0:v1] in the GEMM dtype: the view itself when buf is None (w is in it), else cast into buf (rows, D),
    the one reused buffer of slices (`slice_buffer`)."""
    return w[v0:v1] if buf is None else buf[: v1 - v0].copy_(w[v0:v1])


def slice_buffer(w: torch.Tensor, mm: torch.dtype, rows: int) -> torch.Tensor | None:
    """The (rows, D) buffer in mm that `weight_slice` casts w's slices into; None when w is already in mm."""
    return None if w.dtype == mm else torch.empty(min(rows, w.shape[0]), w.shape[1], dtype=mm, device=w.device)


class DecoderGemms:
    """The three GEMMs against one decoder weight w (V, D), run in the GEMM dtype `mm`:
    logits = h @ w^T + b, dh = dz @ w, dW += dz^T @ h, with fp32 (fp64) results."""

    def __init__(self, w: torch.Tensor, mm: torch.dtype):
        self.w, self.mm = w, mm
        self.rows = slice_rows(w.shape[1], mm)
        self._cast = None   # (rows, D) in mm: the current weight slice when w is not in mm
        self._prod = None   # (rows, D) in mm: a slice's dW product

    def _slices(self):
        """(v0, v1, w[v0:v1] in the GEMM dtype); one slice of all rows when w is already in it."""
        V = self.w.shape[0]
        if self.w.dtype == self.mm:
            yield 0, V, self.w
            return
        if self._cast is None:
            self._cast = slice_buffer(self.w, self.mm, self.rows)
        for v0 in range(0, V, self.rows):
            v1 = min(v0 + self.rows, V)
            yield v0, v1, weight_slice(self.w, v0, v1, self._cast)

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
