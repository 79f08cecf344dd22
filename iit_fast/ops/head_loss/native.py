"""The native C++/OpenMP steps of `distill_head_loss` (`native.cpp`, called through ctypes): the row step (3
passes per row kept in L2, in place over the student logits, no scratch buffer; same interface as
`inner.inner_torch`), and the steps of the passes over vocabulary slices (slices.py): `slice_native` (the
backward's dz of a slice) and `fold_native` / `fold_finish` (forward KL's forward). fp32 CPU logit chunks.
Built on first use by `iit_fast.ops._native.load_native` (a few seconds, cached)."""
from __future__ import annotations

import torch

_NATIVE_NAME = "iit_fast_head_loss"
_NATIVE_SOURCES = ("head_loss/native.cpp",)
_fn = None      # ctypes function once built
_fn_div = None  # the other divergences' entry point: the same source built as a second library (_div_step)
_slice = {}     # False / True (the divergences' library) -> the slice step of that library
_fold = []      # the forward's slice fold and its finish (forward KL; the plain library)
error = None   # why it could not be built
NSTATS = 8     # per-row statistics a slice step reads (native.cpp's store_stats)
NFOLD = 8      # fp64 per-row state of the forward over vocabulary slices (native.cpp's fold_row)


def native_step():
    """Build (first call, a few seconds; cached in TORCH_EXTENSIONS_DIR) and load the C++ inner step;
    None (reason in error) when that cannot be done."""
    global _fn, error
    if _fn is None and error is None:
        import ctypes

        from .._native import NativeUnavailable, load_native
        try:
            lib = load_native(_NATIVE_NAME, _NATIVE_SOURCES)
            fn = lib.iit_distill_head_loss_chunk_f32
        except NativeUnavailable as e:
            error = str(e)
            return None
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [P, I64, P, I64, P, P, P, P, P, P, I64, I64, ctypes.c_float, ctypes.c_int]
        fn.restype = None
        _slice[False] = _slice_fn(lib)
        _fold[:] = [lib.iit_head_loss_fold_f32, lib.iit_head_loss_fold_finish]
        _fold[0].argtypes = [P, I64, P, I64, P, P, I64, I64, I64, ctypes.c_float, ctypes.c_int]
        _fold[1].argtypes = [P, P, P, P, P, I64, I64]
        for f in _fold:
            f.restype = None
        _fn = fn
    return _fn


def _div_step():
    """The row step of the divergences other than forward KL: native.cpp built as a second library with
    -fno-trapping-math, without which GCC leaves the selects around log1p / the mixtures' divisions as branches
    and pass 3 runs ~10x slower (it evaluates both sides of a select; no arithmetic is reordered). Forward
    KL's library keeps the plain flags. Built on first use (a few seconds, cached)."""
    global _fn_div
    if _fn_div is None:
        import ctypes

        from .._native import DEFAULT_CFLAGS, NativeUnavailable, load_native
        try:
            lib = load_native(_NATIVE_NAME + "_div", _NATIVE_SOURCES,
                              extra_cflags=DEFAULT_CFLAGS + ("-fno-trapping-math",))
        except NativeUnavailable as e:
            raise RuntimeError(f"distill_head_loss impl='native': the divergences' native step is unavailable: "
                               f"{e}") from None
        fn = lib.iit_distill_head_loss_div_chunk_f32
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [P, I64, P, I64, P, P, P, P, P, P, I64, I64, ctypes.c_float, ctypes.c_int, ctypes.c_float,
                       ctypes.c_int]
        fn.restype = None
        _slice[True] = _slice_fn(lib)
        _fn_div = fn
    return _fn_div


def _slice_fn(lib):
    import ctypes
    P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    fn = lib.iit_head_loss_slice_f32
    fn.argtypes = [P, I64, P, I64, P, P, P, P, I64, I64, I64, I64, F32, INT, F32, INT]
    fn.restype = None
    return fn


def _threads(C: int, V: int) -> int:
    return min(torch.get_num_threads(), max(1, (C * V) >> 18))  # small chunks: one thread, no barrier


def _check(zs, zt):
    if zs.dtype != torch.float32 or zt.dtype != torch.float32 or zs.device.type != "cpu":
        raise ValueError(f"distill_head_loss impl='native': the C++ step takes fp32 CPU logit chunks, got "
                         f"{zs.dtype} / {zt.dtype} on {zs.device}")
    if zs.stride(1) != 1 or zt.stride(1) != 1:
        raise ValueError("distill_head_loss impl='native': logit chunks need unit column stride")


def inner_native(zs, zt, labels, g_kd, g_lab, temperature, divergence=None, stats=None):
    """divergence: None / forward KL -> the 3-pass row step; another one -> its 4-pass row step
    (native.cpp's row_step_div), which overwrites zt too. stats: None, or a (C, NSTATS) fp32 contiguous
    buffer the rows' statistics go into (what `slice_native` reads in the backward)."""
    fn = native_step()
    if fn is None:
        raise RuntimeError(f"distill_head_loss impl='native': native CPU step unavailable: {error}")
    _check(zs, zt)
    C, V = zs.shape
    st = stats.data_ptr() if stats is not None else None
    g_kd = g_kd.to(torch.float32).contiguous()
    kl = torch.empty(C, dtype=torch.float32)
    ce = torch.empty(C, dtype=torch.float32) if labels is not None else None
    if labels is not None:
        labels = labels.contiguous()
        g_lab = g_lab.to(torch.float32).contiguous()
    threads = _threads(C, V)
    if C and divergence is not None and not divergence.is_forward_kl:
        _div_step()(zs.data_ptr(), zs.stride(0), zt.data_ptr(), zt.stride(0),
                    labels.data_ptr() if labels is not None else None, g_kd.data_ptr(),
                    g_lab.data_ptr() if labels is not None else None, kl.data_ptr(),
                    ce.data_ptr() if ce is not None else None, st, C, V, float(temperature), divergence.code,
                    float(divergence.param), threads)
    elif C:
        fn(zs.data_ptr(), zs.stride(0), zt.data_ptr(), zt.stride(0),
           labels.data_ptr() if labels is not None else None, g_kd.data_ptr(),
           g_lab.data_ptr() if labels is not None else None, kl.data_ptr(),
           ce.data_ptr() if ce is not None else None, st, C, V, float(temperature), threads)
    return zs, kl, ce


def slice_native(zs, zt, labels, g_kd, g_lab, stats, v0, vocab, temperature, divergence=None):
    """dz of a vocabulary slice [v0, v0 + Vs) of C rows, in place over zs (C, Vs); zt (C, Vs) the teacher's
    slice; labels (C,) global ids or None (no MLM term); stats (C, NSTATS) from `inner_native` in the
    forward. The row step's pass 3 (4 for a divergence) over the slice: the same dz, element for element."""
    div = divergence is not None and not divergence.is_forward_kl
    if native_step() is None:
        raise RuntimeError(f"distill_head_loss impl='native': native CPU step unavailable: {error}")
    if div:
        _div_step()
    _check(zs, zt)
    C, Vs = zs.shape
    if not C or not Vs:
        return zs
    g_kd = g_kd.to(torch.float32).contiguous()
    if labels is not None:
        labels = labels.contiguous()
        g_lab = g_lab.to(torch.float32).contiguous()
    _slice[div](zs.data_ptr(), zs.stride(0), zt.data_ptr(), zt.stride(0),
                labels.data_ptr() if labels is not None else None, g_kd.data_ptr(),
                g_lab.data_ptr() if labels is not None else None, stats.data_ptr(), C, Vs, int(v0), int(vocab),
                float(temperature), divergence.code if div else 0, float(divergence.param) if div else 0.0,
                _threads(C, Vs))
    return zs


def fold_native(zs, zt, labels, state, v0, temperature):
    """The forward over vocabulary slices (forward KL): folds the slice [v0, v0 + Vs) of C rows (zs, zt:
    (C, Vs) fp32 logits, read only) into `state` (C, NFOLD) fp64 contiguous, written afresh when v0 == 0;
    labels (C,) global ids or None (no CE). native.cpp's fold_row has the math (the KL's chain rule)."""
    if native_step() is None:
        raise RuntimeError(f"distill_head_loss impl='native': native CPU step unavailable: {error}")
    _check(zs, zt)
    C, Vs = zs.shape
    if C and Vs:
        labels = labels.contiguous() if labels is not None else None
        _fold[0](zs.data_ptr(), zs.stride(0), zt.data_ptr(), zt.stride(0),
                 labels.data_ptr() if labels is not None else None, state.data_ptr(), C, Vs, int(v0),
                 float(temperature), _threads(C, Vs))


def fold_finish(state, labels, vocab):
    """(kl (C,), ce (C,) or None, stats (C, NSTATS)) fp32 from the rows' folded state after the last slice:
    the KL and CE as the row step gives them, and the statistics the backward's slices read."""
    C = state.shape[0]
    kl = torch.empty(C, dtype=torch.float32)
    ce = torch.empty(C, dtype=torch.float32) if labels is not None else None
    stats = torch.empty(C, NSTATS, dtype=torch.float32)
    labels = labels.contiguous() if labels is not None else None
    if C:
        _fold[1](state.data_ptr(), labels.data_ptr() if labels is not None else None, kl.data_ptr(),
                 ce.data_ptr() if ce is not None else None, stats.data_ptr(), C, int(vocab))
    return kl, ce, stats
