"""The native C++/OpenMP kernels of the interchange ops (`native.cpp`, called through ctypes): the library,
built on first use by `iit_fast.ops._native.load_native` (a few seconds, cached), and `NativeBackend`, the
four primitives the autograd Functions (`__init__.py`) call on CPU tensors. fp32 and fp64 natively; bf16 /
fp16 are computed in fp32 and cast back.
"""
from __future__ import annotations

import ctypes

import torch

from .._native import NativeUnavailable, load_native

_NATIVE_NAME = "iit_fast_interchange"
_NATIVE_SOURCES = ("interchange/native.cpp",)
_native_lib = None
_native_error: str | None = None


def _native():
    """The ctypes library of native.cpp, or None (reason in _native_error)."""
    global _native_lib, _native_error
    if _native_lib is None and _native_error is None:
        try:
            lib = load_native(_NATIVE_NAME, _NATIVE_SOURCES)
        except NativeUnavailable as e:
            _native_error = str(e)
            return None
        P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for suf in ("f32", "f64"):
            f = getattr(lib, f"iit_interchange_fwd_{suf}")
            f.argtypes = [P, P, P, P, P, P, I64, I64, I64, I64, I64, I]
            f = getattr(lib, f"iit_interchange_bwd_{suf}")
            f.argtypes = [P, P, ctypes.c_double, P, P, P, P, P, P, I64, I64, I64, I64, I64, I]
            f = getattr(lib, f"iit_hidden_loss_fwd_{suf}")
            f.argtypes = [P, P, P, P, P, I64, I64, I, I]
            f = getattr(lib, f"iit_interchange_hidden_loss_fwd_{suf}")
            f.argtypes = [P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, I, I]
            for name in ("interchange_fwd", "interchange_bwd", "hidden_loss_fwd", "interchange_hidden_loss_fwd"):
                getattr(lib, f"iit_{name}_{suf}").restype = None
        _native_lib = lib
    return _native_lib


def native_error() -> str | None:
    """Why the native library cannot be built here (None: it can; it is built to find out)."""
    _native()
    return _native_error


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """Allocation of every native output (tests replace it with a NaN-filled one: each element must be written)."""
    return _empty(x.shape, x.dtype, x.device)


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _p(t):
    return None if t is None else t.data_ptr()


class NativeBackend:
    name = "native"

    @staticmethod
    def _dt(x):
        return "f64" if x.dtype == torch.float64 else "f32"

    @staticmethod
    def _work(x):
        """Storage the C++ kernels take: fp32 or fp64, contiguous."""
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.contiguous()

    @classmethod
    def interchange_fwd(cls, x, pi, bs, ss, k, d0, d1):
        xw = cls._work(x)
        out = _empty_like(xw)
        B, S, D = xw.shape
        if out.numel():
            getattr(_native(), f"iit_interchange_fwd_{cls._dt(xw)}")(
                _p(xw), _p(out), _p(pi), _p(bs), _p(ss), _p(k), B, S, D, d0, d1, torch.get_num_threads())
        return out.to(x.dtype)

    @classmethod
    def interchange_bwd(cls, g, gh, scale, bs, ss, k, src_off, src_rows, d0, d1, shape, dtype):
        ref = g if g is not None else gh
        wd = torch.float64 if ref.dtype == torch.float64 else torch.float32
        g = None if g is None else g.to(wd).contiguous()
        gh = None if gh is None else gh.to(wd).contiguous()
        gx = _empty(shape, wd, 'cpu')
        B, S, D = shape
        if gx.numel():
            getattr(_native(), f"iit_interchange_bwd_{'f64' if wd == torch.float64 else 'f32'}")(
                _p(g), _p(gh), float(scale), _p(gx), _p(bs), _p(ss), _p(k), _p(src_off), _p(src_rows),
                B, S, D, d0, d1, torch.get_num_threads())
        return gx.to(dtype)

    @classmethod
    def hidden_loss_fwd(cls, s, t, w, kind_cos):
        sw = cls._work(s)
        tw = t.to(sw.dtype).contiguous()
        w = w.to(sw.dtype).contiguous()
        N, D = sw.shape
        grad = _empty_like(sw)
        loss = _empty((N,), sw.dtype, 'cpu')
        if N:
            getattr(_native(), f"iit_hidden_loss_fwd_{cls._dt(sw)}")(
                _p(sw), _p(tw), _p(w), _p(grad), _p(loss), N, D, int(kind_cos), torch.get_num_threads())
        return loss, grad.to(s.dtype)

    @classmethod
    def interchange_hidden_loss_fwd(cls, x, t, w, pi, bs, ss, k, d0, d1, kind_cos):
        xw = cls._work(x)
        tw = t.to(xw.dtype).contiguous()
        w = w.to(xw.dtype).contiguous()
        B, S, D = xw.shape
        out, grad = _empty_like(xw), _empty_like(xw)
        loss = _empty((B * S,), xw.dtype, 'cpu')
        if out.numel():
            getattr(_native(), f"iit_interchange_hidden_loss_fwd_{cls._dt(xw)}")(
                _p(xw), _p(tw), _p(w), _p(out), _p(grad), _p(loss), _p(pi), _p(bs), _p(ss), _p(k),
                B, S, D, d0, d1, int(kind_cos), torch.get_num_threads())
        return out.to(x.dtype), loss, grad.to(x.dtype)
