"""`interchange`, `hidden_loss`, `interchange_hidden_loss`: autograd Functions and dispatchers.

    out = interchange(states, pi, base_start, source_start, span_len, dims=None, impl="auto")
    loss = hidden_loss(student, teacher, mask, kind="cos", impl="auto")
    out, loss = interchange_hidden_loss(states, teacher, mask, pi, bs, ss, k, dims=None, kind="mse", impl="auto")

Semantics are those of `reference.py` (the ground truth). This folder holds the op: `reference.py`,
this dispatcher and its autograd Functions, `triton.py` (CUDA kernels), `native.cpp` (CPU kernels) and
`native.py` (its ctypes library and backend). impl:
  "auto"      CUDA tensors -> "triton"; CPU tensors -> "native" (built on first use) or, when the native
              library cannot be built, "reference"; the path is logged once per op (a warning for a fallback).
  "reference" the plain PyTorch reference (autograd does the backward).
  "triton"    Triton kernels (triton.py); on CPU only under TRITON_INTERPRET=1 (tests).
  "native"    C++/OpenMP kernels (native.cpp) on CPU; fp32 and fp64 natively, bf16/fp16 computed
              in fp32 and cast back.
`available_paths()` says which paths this process can run and why not.

The loss ops compute the gradient in the forward (the loss is the last op; backward only scales it by the
grad_output, Liger style). The teacher is a constant target: it gets no gradient. A teacher that requires
grad (with grad mode on) is sent to the reference path, which differentiates it, with a one-time warning.

interchange's backward is a gather: each (row r, position p) of the states' gradient collects the entries
of the counterfactual gradient that came from it, through the rows i with pi_i = r (CSR from a stable
argsort of pi). It is exact and conflict free for any pi, a permutation or not (no atomics).
"""
from __future__ import annotations

import logging
import os

import torch
from torch.autograd.function import once_differentiable

from .native import NativeBackend, native_error
from .reference import (
    hidden_loss_reference,
    interchange_hidden_loss_reference,
    interchange_reference,
)

log = logging.getLogger("iit_fast.ops")
_logged: set[str] = set()

IMPLS = ("auto", "reference", "triton", "native")


def _log_once(key: str, msg: str, warning: bool = False) -> None:
    if key not in _logged:
        _logged.add(key)
        (log.warning if warning else log.info)(msg)


def available_paths() -> dict[str, str | None]:
    """Path -> None when it can run in this process, else the reason it cannot."""
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    try:
        import triton  # noqa: F401  (a probe: is triton importable here)
        triton_ok = None if (torch.cuda.is_available() or interp) else "no CUDA device (CPU only under TRITON_INTERPRET=1)"
    except ImportError as e:
        triton_ok = f"triton not importable: {e}"
    return {"reference": None, "native": native_error(), "triton": triton_ok}


# ------------------------------------------------------------------------------------------------------
# Backends: each gives the same four primitives on contiguous tensors.
# ------------------------------------------------------------------------------------------------------

class _TritonBackend:
    name = "triton"

    @staticmethod
    def interchange_fwd(x, pi, bs, ss, k, d0, d1):
        from .triton import interchange_forward  # lazy: triton is heavy and needs CUDA or the interpreter
        return interchange_forward(x.contiguous(), pi, bs, ss, k, d0, d1)

    @staticmethod
    def interchange_bwd(g, gh, scale, bs, ss, k, src_off, src_rows, d0, d1, shape, dtype):
        from .triton import interchange_backward  # lazy: triton is heavy and needs CUDA or the interpreter
        return interchange_backward(None if g is None else g.contiguous(),
                                    None if gh is None else gh.contiguous(),
                                    scale, bs, ss, k, src_off, src_rows, d0, d1, shape, dtype)

    @staticmethod
    def hidden_loss_fwd(s, t, w, kind_cos):
        from .triton import hidden_loss_forward  # lazy: triton is heavy and needs CUDA or the interpreter
        return hidden_loss_forward(s.contiguous(), t.contiguous(), w.float().contiguous(), kind_cos)

    @staticmethod
    def interchange_hidden_loss_fwd(x, t, w, pi, bs, ss, k, d0, d1, kind_cos):
        from .triton import interchange_hidden_loss_forward  # lazy: triton is heavy and needs CUDA or the interpreter
        return interchange_hidden_loss_forward(x.contiguous(), t.contiguous(), w.float().contiguous(),
                                               pi, bs, ss, k, d0, d1, kind_cos)


_BACKENDS = {"native": NativeBackend, "triton": _TritonBackend}


# ------------------------------------------------------------------------------------------------------
# Argument plumbing
# ------------------------------------------------------------------------------------------------------

def _index_args(states, pi, base_start, source_start, span_len, dims, path="native"):
    B, S, D = states.shape
    dev = states.device
    pi, bs, ss, k = (t.to(device=dev, dtype=torch.int64).contiguous()
                     for t in (pi, base_start, source_start, span_len))
    d0, d1 = (0, D) if dims is None else (int(dims[0]), int(dims[1]))
    if not 0 <= d0 <= d1 <= D:
        raise ValueError(f"dims {dims} out of range for hidden size {D}")
    if path == "native" and B:  # the C++ kernels' bounds (B values, on the host: no sync); never on a GPU path
        if (pi.min() < 0 or pi.max() >= B or k.min() < 0 or bs.min() < 0 or ss.min() < 0
                or (bs + k).max() > S or (ss + k).max() > S):
            raise IndexError("interchange: pi, span starts or span lengths out of range")
    return pi, bs, ss, k, d0, d1


def _sources_csr(pi: torch.Tensor, B: int):
    """Rows grouped by their source row: rows i with pi_i = r are src_rows[src_off[r]:src_off[r + 1]]."""
    src_rows = torch.argsort(pi, stable=True)
    counts = torch.bincount(pi, minlength=B)
    src_off = torch.zeros(B + 1, dtype=torch.int64, device=pi.device)
    src_off[1:] = torch.cumsum(counts, 0)
    return src_off, src_rows.to(torch.int64).contiguous()


def _token_weights(mask, n_tokens, dtype):
    """w = mask / max(n_masked, 1) per token, flattened, in the accumulation dtype."""
    m = mask.reshape(-1).to(dtype)
    if m.numel() != n_tokens:
        raise ValueError(f"mask has {m.numel()} entries for {n_tokens} tokens")
    return (m / m.sum().clamp_min(1.0)).contiguous()


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kind_cos(kind: str) -> bool:
    if kind not in ("cos", "mse"):
        raise ValueError(f"hidden_loss kind must be 'cos' or 'mse', got {kind!r}")
    return kind == "cos"


def _scale_grad(grad, g, backend=None):
    """grad * g, skipping the pass when g == 1 (the usual case: the loss is the output); the test reads g on
    the host, so only for the native (CPU) backend: elsewhere it would be a device sync."""
    if g is None:
        return None
    if backend is NativeBackend and g.numel() == 1 and float(g) == 1.0:
        return grad
    return grad * g.to(grad.dtype)


# ------------------------------------------------------------------------------------------------------
# Autograd Functions
# ------------------------------------------------------------------------------------------------------

class InterchangeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, pi, bs, ss, k, d0, d1, backend):
        ctx.save_for_backward(pi, bs, ss, k)
        ctx.meta = (d0, d1, backend, tuple(states.shape), states.dtype)
        return backend.interchange_fwd(states, pi, bs, ss, k, d0, d1)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        pi, bs, ss, k = ctx.saved_tensors
        d0, d1, backend, shape, dtype = ctx.meta
        src_off, src_rows = _sources_csr(pi, shape[0])
        gx = backend.interchange_bwd(g, None, 1.0, bs, ss, k, src_off, src_rows, d0, d1, shape, dtype)
        return gx, None, None, None, None, None, None, None


class HiddenLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, mask, kind_cos, backend):
        D = student.shape[-1]
        s = student.reshape(-1, D)
        t = teacher.reshape(-1, D)
        w = _token_weights(mask, s.shape[0], _acc_dtype(student))
        loss_tok, grad = backend.hidden_loss_fwd(s, t, w, kind_cos)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.backend = student.shape, backend
        return loss_tok.sum().to(_acc_dtype(student))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return _scale_grad(grad, g, ctx.backend).reshape(ctx.shape), None, None, None, None


class InterchangeHiddenLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, teacher, mask, pi, bs, ss, k, d0, d1, kind_cos, backend):
        ctx.set_materialize_grads(False)
        w = _token_weights(mask, states.shape[0] * states.shape[1], _acc_dtype(states))
        out, loss_tok, grad = backend.interchange_hidden_loss_fwd(states, teacher, w, pi, bs, ss, k, d0, d1,
                                                                 kind_cos)
        ctx.save_for_backward(grad, pi, bs, ss, k)
        ctx.meta = (d0, d1, backend, tuple(states.shape), states.dtype)
        return out, loss_tok.sum().to(_acc_dtype(states))

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_loss):
        grad, pi, bs, ss, k = ctx.saved_tensors
        d0, d1, backend, shape, dtype = ctx.meta
        if g_out is None:
            gx = None if g_loss is None else _scale_grad(grad, g_loss, backend)
        else:
            # one pass: interchange backward of g_out + g_loss * grad, both into the states' gradient
            src_off, src_rows = _sources_csr(pi, shape[0])
            if g_loss is None:
                gh, scale = None, 0.0
            elif backend is NativeBackend:
                gh, scale = grad, float(g_loss)            # a host scalar for the C++ kernel: free on the CPU
            else:
                gh, scale = _scale_grad(grad, g_loss), 1.0  # on the device: no host read of g_loss
            gx = backend.interchange_bwd(g_out, gh, scale, bs, ss, k, src_off, src_rows, d0, d1, shape, dtype)
        return (gx,) + (None,) * 10


# ------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------

def _pick(op: str, x: torch.Tensor, impl: str, teacher: torch.Tensor | None = None) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        _log_once(f"{op}:reference", f"{op}: reference path (asked for)")
        return "reference"
    if teacher is not None and teacher.requires_grad and torch.is_grad_enabled():
        _log_once(f"{op}:teacher_grad", f"{op}: teacher requires grad; the fused paths treat it as a constant "
                  "target, so the reference path runs (it differentiates the teacher)", warning=True)
        return "reference"
    if impl == "auto":
        if x.device.type == "cuda":
            impl = "triton"
        elif x.device.type == "cpu" and native_error() is None:
            impl = "native"
        else:
            why = native_error() if x.device.type == "cpu" else f"no fused path for device {x.device.type}"
            _log_once(f"{op}:fallback", f"{op}: reference path (auto): {why}", warning=True)
            return "reference"
        _log_once(f"{op}:{impl}", f"{op}: {impl} path (auto, {x.device.type} tensors)")
        return impl
    if impl == "native":
        if x.device.type != "cpu":
            raise ValueError(f"{op}: impl='native' runs on CPU tensors, got {x.device}")
        if native_error() is not None:
            raise RuntimeError(f"{op}: native path unavailable: {native_error()}")
    if impl == "triton" and x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    _log_once(f"{op}:{impl}", f"{op}: {impl} path (asked for)")
    return impl


def interchange(states, pi, base_start, source_start, span_len, dims=None, *, impl="auto"):
    """Counterfactual states; see `reference.interchange_reference`.

    Args:
        states: (B, S, D) site states of the batch.
        pi: (B,) long, row i takes its span from row pi[i].
        base_start, source_start, span_len: (B,) long span of each row (base / source start, length).
        dims: (d0, d1) half-open slice of D that is swapped; None = all of D.
        impl: "auto" | "reference" | "triton" | "native".
    """
    path = _pick("interchange", states, impl)
    if path == "reference":
        return interchange_reference(states, pi, base_start, source_start, span_len, dims)
    pi, bs, ss, k, d0, d1 = _index_args(states, pi, base_start, source_start, span_len, dims, path)
    return InterchangeFunction.apply(states, pi, bs, ss, k, d0, d1, _BACKENDS[path])


def hidden_loss(student, teacher, mask, kind="cos", *, impl="auto"):
    """Masked mean `1 - cos` or MSE; see `reference.hidden_loss_reference`.

    Args:
        student: (..., D) states (gets the gradient).
        teacher: (..., D) same shape, a constant target.
        mask: (...) bool or 0/1, tokens that count.
        kind: "cos" | "mse".
    Returns the scalar loss in fp32 (fp64 for fp64 inputs); 0 when no token counts.
    """
    kind_cos = _kind_cos(kind)
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    path = _pick("hidden_loss", student, impl, teacher)
    if path == "reference":
        return hidden_loss_reference(student, teacher, mask, kind)
    return HiddenLossFunction.apply(student, teacher.detach(), mask, kind_cos, _BACKENDS[path])


def interchange_hidden_loss(states, teacher, mask, pi, base_start, source_start, span_len, dims=None,
                            kind="mse", *, impl="auto"):
    """(interchange(states, ...), hidden_loss(states, teacher, mask, kind)) from one read of states.

    The gradient of `states` is the interchange backward of the counterfactual's gradient plus the loss'
    gradient, in one pass.
    """
    kind_cos = _kind_cos(kind)
    if states.shape != teacher.shape:
        raise ValueError(f"states {tuple(states.shape)} and teacher {tuple(teacher.shape)} differ")
    path = _pick("interchange_hidden_loss", states, impl, teacher)
    if path == "reference":
        return interchange_hidden_loss_reference(states, teacher, mask, pi, base_start, source_start, span_len,
                                                 dims, kind)
    pi, bs, ss, k, d0, d1 = _index_args(states, pi, base_start, source_start, span_len, dims, path)
    return InterchangeHiddenLossFunction.apply(states, teacher.detach(), mask, pi, bs, ss, k, d0, d1, kind_cos,
                                               _BACKENDS[path])
