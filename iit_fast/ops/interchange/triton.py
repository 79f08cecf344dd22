"""Triton kernels of `interchange`, `hidden_loss` and `interchange_hidden_loss`, and their launchers.

The autograd Functions and the dispatcher live in `__init__.py` beside it; this file holds only the
kernels and plain launchers, Liger-Kernel style. States are contiguous (B, S, D); token t = b * S + s; one
program per token, looping over the hidden dims in BLOCK_D tiles (BLOCK_D = next power of two of D, capped
at MAX_BLOCK_D, so at BERT sizes the row is one tile). Loads upcast to fp32; stores cast to the output's
dtype (fp32 / bf16 / fp16 inputs, fp32 accumulation).

interchange (forward): out[b, s] = x[b, s] except, for s in the base span [bs_b, bs_b + k_b),
    out[b, s, d0:d1] = x[pi_b, ss_b + s - bs_b, d0:d1]
interchange (backward), a gather (conflict free for any pi): with the rows i such that pi_i = r given as CSR,
    gx[r, p]         = g[r, p], dims d0:d1 zeroed if p is in r's base span      (+ scale * gh[r, p])
    gx[r, p, d0:d1] += g[i, bs_i + p - ss_i, d0:d1]   for each i with pi_i = r and p in i's source span
hidden_loss per token, weight w = mask / n_masked:
    cos: l = 1 - c, c = <s, t> / (max(|s|, eps) max(|t|, eps)),  dl/ds = c s / |s|^2 - t / (|s| |t|)
    mse: l = mean_d (s - t)^2,                                     dl/ds = 2 (s - t) / D
The loss kernels write w * l per token and the gradient w * dl/ds (the loss is the last op: backward only
scales it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 2048


def block_d(D: int) -> int:
    return min(MAX_BLOCK_D, max(16, triton.next_power_of_2(D)))


def default_warps(BLOCK_D: int) -> int:
    """8 elements of each row tile per thread (BLOCK_D >= 256)."""
    return 1 if BLOCK_D <= 128 else 2 if BLOCK_D <= 512 else 4 if BLOCK_D <= 1024 else 8


def warp_candidates(BLOCK_D: int) -> tuple[int, ...]:
    """The autotune space on a GPU: the default and twice as many warps (4 elements per thread). These are
    the configurations the AOT test compiles (tests/test_triton_aot.py)."""
    w = default_warps(BLOCK_D)
    return (w, 2 * w) if w < 8 else (w,)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """Allocation of every output (tests replace it with a NaN-filled one to check each element is written)."""
    return _empty(x.shape, x.dtype, x.device)


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _interchange_token(x_ptr, out_ptr, pi_ptr, bs_ptr, ss_ptr, k_ptr, tok, S, D, d0, d1, BLOCK_D: tl.constexpr):
    """Write token `tok` of the counterfactual states: its own row, or inside its row's span the dims
    [d0, d1) of the aligned token of the source row pi[b]."""
    b = tok // S
    p = tok % S
    bs = tl.load(bs_ptr + b)
    kk = tl.load(k_ptr + b)
    in_span = (p >= bs) & (p < bs + kk)
    src_tok = tl.load(pi_ptr + b) * S + tl.load(ss_ptr + b) + p - bs
    src_tok = tl.where(in_span, src_tok, tok)
    # swapped dims of this token: [lo, hi), empty outside the span (scalar-bool masks are avoided: the
    # interpreter mis-types a scalar bool broadcast against a vector)
    lo = tl.where(in_span, d0, 0)
    hi = tl.where(in_span, d1, 0)
    for d in range(0, D, BLOCK_D):
        offs = d + tl.arange(0, BLOCK_D)
        m = offs < D
        sw = (offs >= lo) & (offs < hi)
        own = tl.load(x_ptr + tok * D + offs, mask=m & (sw == 0))
        src = tl.load(x_ptr + src_tok * D + offs, mask=sw)
        tl.store(out_ptr + tok * D + offs, tl.where(sw, src, own), mask=m)


@triton.jit
def _interchange_fwd_kernel(
    x_ptr,      # (B, S, D) states, contiguous
    out_ptr,    # (B, S, D) out: counterfactual states
    pi_ptr,     # (B,) int64 source row of each row
    bs_ptr,     # (B,) int64 base span start
    ss_ptr,     # (B,) int64 source span start
    k_ptr,      # (B,) int64 span length
    S,          # positions per row
    D,          # hidden dims
    d0,         # first swapped dim
    d1,         # one past the last swapped dim
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    _interchange_token(x_ptr, out_ptr, pi_ptr, bs_ptr, ss_ptr, k_ptr, tok, S, D, d0, d1, BLOCK_D)


@triton.jit
def _interchange_bwd_kernel(
    g_ptr,        # (B, S, D) gradient of the counterfactual states (unused unless HAS_G)
    gh_ptr,       # (B, S, D) gradient of the loss on the plain states, unscaled (unused unless HAS_GH)
    scale,        # fp32 factor of gh (the loss' grad_output)
    gx_ptr,       # (B, S, D) out: gradient of the states
    bs_ptr,       # (B,) int64 base span start
    ss_ptr,       # (B,) int64 source span start
    k_ptr,        # (B,) int64 span length
    src_off_ptr,  # (B + 1,) int64 CSR offsets: rows i with pi_i = r are src_rows[src_off[r]:src_off[r + 1]]
    src_rows_ptr, # (B,) int64 rows sorted by pi
    S, D, d0, d1,
    HAS_G: tl.constexpr,
    HAS_GH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    r = tok // S
    p = tok % S
    bs = tl.load(bs_ptr + r)
    kk = tl.load(k_ptr + r)
    in_span = (p >= bs) & (p < bs + kk)
    j0 = tl.load(src_off_ptr + r)
    j1 = tl.load(src_off_ptr + r + 1)
    lo = tl.where(in_span, d0, 0)
    hi = tl.where(in_span, d1, 0)
    for d in range(0, D, BLOCK_D):
        offs = d + tl.arange(0, BLOCK_D)
        m = offs < D
        acc = tl.zeros([BLOCK_D], tl.float32)
        if HAS_GH:
            acc += scale * tl.load(gh_ptr + tok * D + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_G:
            # d x[r, p] through the kept entries of out[r, p]
            acc += tl.load(g_ptr + tok * D + offs, mask=m & ((offs < lo) | (offs >= hi)), other=0.0).to(tl.float32)
            # d x[r, p] through the rows i that took their span from r
            for j in range(j0, j1):
                i = tl.load(src_rows_ptr + j)
                ssi = tl.load(ss_ptr + i)
                hit = (p >= ssi) & (p < ssi + tl.load(k_ptr + i))
                gi = i * S + tl.load(bs_ptr + i) + p - ssi
                gi = tl.where(hit, gi, 0)
                hlo = tl.where(hit, d0, 0)
                hhi = tl.where(hit, d1, 0)
                acc += tl.load(g_ptr + gi * D + offs, mask=(offs >= hlo) & (offs < hhi), other=0.0).to(tl.float32)
        tl.store(gx_ptr + tok * D + offs, acc.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _hidden_loss_token(s_row, t_row, g_row, w, D, KIND_COS: tl.constexpr, BLOCK_D: tl.constexpr):
    """w * loss of one token; writes w * dl/ds to g_row (two passes over D when D > BLOCK_D)."""
    if KIND_COS:
        st = tl.zeros([BLOCK_D], tl.float32)
        ss = tl.zeros([BLOCK_D], tl.float32)
        tt = tl.zeros([BLOCK_D], tl.float32)
        for d in range(0, D, BLOCK_D):
            offs = d + tl.arange(0, BLOCK_D)
            m = offs < D
            a = tl.load(s_row + offs, mask=m, other=0.0).to(tl.float32)
            b = tl.load(t_row + offs, mask=m, other=0.0).to(tl.float32)
            st += a * b
            ss += a * a
            tt += b * b
        ns = tl.maximum(tl.sqrt(tl.sum(ss, 0)), 1e-8)
        nt = tl.maximum(tl.sqrt(tl.sum(tt, 0)), 1e-8)
        c = tl.sum(st, 0) / (ns * nt)
        # dl/ds = c s / ns^2 - t / (ns nt), times w
        cs = w * c / (ns * ns)
        ct = -w / (ns * nt)
        for d in range(0, D, BLOCK_D):
            offs = d + tl.arange(0, BLOCK_D)
            m = offs < D
            a = tl.load(s_row + offs, mask=m, other=0.0).to(tl.float32)
            b = tl.load(t_row + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(g_row + offs, (cs * a + ct * b).to(g_row.dtype.element_ty), mask=m)
        loss = w * (1.0 - c)
    else:
        acc = tl.zeros([BLOCK_D], tl.float32)
        c2 = 2.0 * w / D
        for d in range(0, D, BLOCK_D):
            offs = d + tl.arange(0, BLOCK_D)
            m = offs < D
            a = tl.load(s_row + offs, mask=m, other=0.0).to(tl.float32)
            b = tl.load(t_row + offs, mask=m, other=0.0).to(tl.float32)
            diff = a - b
            acc += diff * diff
            # dl/ds = 2 (s - t) / D, times w
            tl.store(g_row + offs, (c2 * diff).to(g_row.dtype.element_ty), mask=m)
        loss = w * tl.sum(acc, 0) / D
    return loss


@triton.jit
def _hidden_loss_kernel(
    s_ptr,      # (N, D) student states, contiguous
    t_ptr,      # (N, D) teacher states, contiguous (any float dtype)
    w_ptr,      # (N,) fp32 token weights mask / n_masked
    g_ptr,      # (N, D) out: w * dl/ds
    loss_ptr,   # (N,) fp32 out: w * l
    D,
    KIND_COS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + tok)
    loss = _hidden_loss_token(s_ptr + tok * D, t_ptr + tok * D, g_ptr + tok * D, w, D, KIND_COS, BLOCK_D)
    tl.store(loss_ptr + tok, loss)


@triton.jit
def _interchange_hidden_loss_kernel(
    x_ptr,      # (B, S, D) student site states, contiguous
    t_ptr,      # (B, S, D) teacher states, contiguous
    w_ptr,      # (B * S,) fp32 token weights mask / n_masked
    out_ptr,    # (B, S, D) out: counterfactual states
    g_ptr,      # (B, S, D) out: w * dl/dx of the loss on the plain states
    loss_ptr,   # (B * S,) fp32 out: w * l
    pi_ptr, bs_ptr, ss_ptr, k_ptr,   # (B,) int64: source row, base / source span start, span length
    S, D, d0, d1,
    KIND_COS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    _interchange_token(x_ptr, out_ptr, pi_ptr, bs_ptr, ss_ptr, k_ptr, tok, S, D, d0, d1, BLOCK_D)
    # the row of x was just read: the loss' loads hit in L1/L2
    w = tl.load(w_ptr + tok)
    loss = _hidden_loss_token(x_ptr + tok * D, t_ptr + tok * D, g_ptr + tok * D, w, D, KIND_COS, BLOCK_D)
    tl.store(loss_ptr + tok, loss)


# ------------------------------------------------------------------------------------------------------
# Autotune (GPU only: under the interpreter every config would run) over num_warps per BLOCK_D; key: D.
# ------------------------------------------------------------------------------------------------------
_tuned = {}


def _launch(kernel, grid, args, BLOCK_D, **constexprs):
    if _interpret() or not torch.cuda.is_available():
        kernel[grid](*args, BLOCK_D=BLOCK_D, num_warps=default_warps(BLOCK_D), **constexprs)
        return
    tuned = _tuned.get((kernel, BLOCK_D))
    if tuned is None:
        configs = [triton.Config({}, num_warps=w) for w in warp_candidates(BLOCK_D)]
        tuned = _tuned[(kernel, BLOCK_D)] = triton.autotune(configs=configs, key=["D"])(kernel)
    tuned[grid](*args, BLOCK_D=BLOCK_D, **constexprs)


# ------------------------------------------------------------------------------------------------------
# Launchers. All tensors contiguous, on one CUDA device (or CPU under TRITON_INTERPRET=1).
# ------------------------------------------------------------------------------------------------------

def interchange_forward(x, pi, bs, ss, k, d0, d1, out=None):
    B, S, D = x.shape
    out = _empty_like(x) if out is None else out
    if x.numel():
        _launch(_interchange_fwd_kernel, (B * S,), (x, out, pi, bs, ss, k, S, D, d0, d1), block_d(D))
    return out


def interchange_backward(g, gh, scale, bs, ss, k, src_off, src_rows, d0, d1, shape, dtype, out=None):
    """gx = interchange backward of g (None: absent) + scale * gh (None: absent)."""
    B, S, D = shape
    ref = g if g is not None else gh
    gx = _empty(shape, dtype, ref.device) if out is None else out
    if gx.numel():
        _launch(_interchange_bwd_kernel, (B * S,),
                (g if g is not None else ref, gh if gh is not None else ref, float(scale), gx, bs, ss, k,
                 src_off, src_rows, S, D, d0, d1), block_d(D),
                HAS_G=g is not None, HAS_GH=gh is not None)
    return gx


def hidden_loss_forward(s, t, w, kind_cos: bool, grad=None):
    """(per-token w * l (N,) fp32, grad w * dl/ds like s); s, t: (N, D)."""
    N, D = s.shape
    grad = _empty_like(s) if grad is None else grad
    loss = _empty((N,), torch.float32, s.device)
    if N:
        _launch(_hidden_loss_kernel, (N,), (s, t, w, grad, loss, D), block_d(D), KIND_COS=kind_cos)
    return loss, grad


def interchange_hidden_loss_forward(x, t, w, pi, bs, ss, k, d0, d1, kind_cos: bool, out=None, grad=None):
    B, S, D = x.shape
    out = _empty_like(x) if out is None else out
    grad = _empty_like(x) if grad is None else grad
    loss = _empty((B * S,), torch.float32, x.device)
    if x.numel():
        _launch(_interchange_hidden_loss_kernel, (B * S,),
                (x, t, w, out, grad, loss, pi, bs, ss, k, S, D, d0, d1), block_d(D), KIND_COS=kind_cos)
    return out, loss, grad


# ------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations: what the launchers can run at BERT sizes (D = 384 / 768 / 1024 -> BLOCK_D =
# 512 / 1024, and the cap 2048), with every autotune candidate. tests/test_triton_aot.py compiles each of
# them for sm_80 and sm_90 through iit_fast/ops/aot.py and checks that none spills.
# ------------------------------------------------------------------------------------------------------

def _sig(ptrs: str, rest: dict, dtype: str) -> dict:
    out = {}
    for name in ptrs.split():
        kind, _, pname = name.partition(":")
        out[pname] = f"*{dtype}" if kind == "x" else "*fp32" if kind == "f" else "*i64"
    out.update(rest)
    return out


_INDEX = {"S": "i32", "D": "i32", "d0": "i32", "d1": "i32"}


def aot_configs(block_ds=(512, 1024, 2048), dtypes=("fp32", "bf16")) -> list[dict]:
    """[{name, fn, signature, constexprs, num_warps}] for every kernel, variant, BLOCK_D and candidate warps
    (bf16 storage at BLOCK_D=1024 only: the register use is the fp32 accumulation's)."""
    rows = []
    for dtype in dtypes:
        for BLOCK_D in block_ds:
            if dtype != "fp32" and BLOCK_D != 1024:
                continue
            kernels = [
                ("interchange_fwd", _interchange_fwd_kernel,
                 _sig("x:x_ptr x:out_ptr i:pi_ptr i:bs_ptr i:ss_ptr i:k_ptr", _INDEX, dtype), [{}]),
                ("interchange_bwd", _interchange_bwd_kernel,
                 _sig("x:g_ptr x:gh_ptr", {"scale": "fp32"}, dtype)
                 | _sig("x:gx_ptr i:bs_ptr i:ss_ptr i:k_ptr i:src_off_ptr i:src_rows_ptr", _INDEX, dtype),
                 [{"HAS_G": True, "HAS_GH": True}, {"HAS_G": True, "HAS_GH": False},
                  {"HAS_G": False, "HAS_GH": True}]),
                ("hidden_loss", _hidden_loss_kernel,
                 _sig("x:s_ptr x:t_ptr f:w_ptr x:g_ptr f:loss_ptr", {"D": "i32"}, dtype),
                 [{"KIND_COS": True}, {"KIND_COS": False}]),
                ("interchange_hidden_loss", _interchange_hidden_loss_kernel,
                 _sig("x:x_ptr x:t_ptr f:w_ptr x:out_ptr x:g_ptr f:loss_ptr i:pi_ptr i:bs_ptr i:ss_ptr i:k_ptr",
                      _INDEX, dtype),
                 [{"KIND_COS": True}, {"KIND_COS": False}]),
            ]
            for name, fn, sig, variants in kernels:
                for v in variants:
                    for w in warp_candidates(BLOCK_D):
                        ce = dict(v, BLOCK_D=BLOCK_D)
                        rows.append({"name": name, "fn": fn, "dtype": dtype, "signature": dict(sig),
                                     "constexprs": ce, "num_warps": w})
    return rows
