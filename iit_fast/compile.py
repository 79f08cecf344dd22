"""`--compile`: the non-GEMM work of the transformer blocks fused, and each block linear's bias added inside
its GEMM (issue 24).

    prepare_blocks(lm, "linear")   # every block linear: bias in the GEMM's epilogue (oneDNN), no compile
    prepare_blocks(lm, "blocks")   # the same, plus torch.compile of each block (inductor)
    prepare_blocks(lm, "off")      # nothing (the default)

Two things, measured on the BERT-base and GPT-2-small steps (benchmarks/step.py --compile, bf16-profile.md):

1. **The bias copy.** On the CPU, `nn.Linear` (and GPT-2's `Conv1D`) runs `aten::addmm(bias, x, W^T)`, which
   first *copies the bias, broadcast, into the whole (M, N) output* (`aten::copy_`, one per linear call), then
   runs the GEMM with beta = 1 over it: one extra write and read of every output. `linear_bias` asks oneDNN's
   inner product for x W^T + b with the bias added in the GEMM's epilogue instead (the kernel torch's own
   inference fusions use, `mkldnn._linear_pointwise`), as a custom op with its autograd (dgrad, wgrad, bias
   sum: plain GEMMs, as before), so that it also stands inside a compiled graph (inductor keeps `addmm` and
   its copy as an extern call on the CPU). CPU only, fp32 and bf16 (where oneDNN has bf16); anything else
   (a GPU: cuBLASLt already fuses the bias; fp16; fp64) runs `F.linear`, unchanged.
2. **Everything around the GEMMs** (bias-add + GELU, residual add + LayerNorm, the bias-gradient sums, casts):
   `nn.Module.compile` of every block, so every pass that calls the block (the teacher's and the student's
   plain passes, the resumed counterfactual passes, a causal LM's suffix passes over cached keys/values) runs
   its compiled code, and the step's code does not change. Shapes: a causal LM's blocks are compiled with
   dynamic sizes from the start (its suffix passes run another length, batch and cached length per group and
   step); a masked LM's are compiled for the first shape (every pass of a step has the batch's shape) and once
   more, with symbolic sizes, when a batch's length differs (torch's automatic dynamic shapes). A run compiles
   a handful of graphs, not one per shape: measured, 10 for the GPT-2 fast and naive steps, none after.
   Compiling costs minutes on a small CPU (measured: benchmarks/results/step-compile-*.md) and pays back
   over a long run; it is off by default.

Not under ZeRO-3 partitioned weights: DeepSpeed's parameter hooks gather a block's weights around its call,
and its own linear replaces `F.linear`; `prepare_blocks` says so and leaves such a model as it is.
"""
from __future__ import annotations

import logging
import os
import shutil
import types

import torch
import torch.nn.functional as F
from torch import nn

COMPILE_MODES = ("off", "linear", "blocks")
log = logging.getLogger("iit_fast.compile")


# ---- 1. the linear with its bias in the GEMM's epilogue ----------------------------------------------------

@torch.library.custom_op("iit_fast::linear_bias", mutates_args=())
def _linear_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (M, K) contiguous, w (N, K) (a transposed view of a contiguous (K, N) too), b (N,) -> (M, N)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@_linear_bias.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def _setup(ctx, inputs, output):
    x, w, _ = inputs
    ctx.save_for_backward(x, w)  # what aten's addmm keeps too


def _backward(ctx, g):  # g (M, N)
    x, w = ctx.saved_tensors
    gx = g @ w if ctx.needs_input_grad[0] else None                            # (M, K)
    gw = None
    if ctx.needs_input_grad[1]:  # in w's own layout: a transposed view stays one (no copy by AccumulateGrad)
        gw = (x.t() @ g).t() if w.stride(0) == 1 and w.shape[1] > 1 else g.t() @ x   # (N, K)
    gb = g.sum(0) if ctx.needs_input_grad[2] else None                          # (N,)
    return gx, gw, gb


_linear_bias.register_autograd(_backward, setup_context=_setup)


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    if not torch.backends.mkldnn.is_available():
        return ()
    return (torch.float32,) + ((torch.bfloat16,) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())


FUSED_DTYPES = _onednn_dtypes()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False
           ) -> torch.Tensor:
    """x (..., K) @ W^T + b, W = `weight` (N, K), or (K, N) with `transposed` (GPT-2's Conv1D): `linear_bias`
    where it applies (CPU, fp32 / bf16, a bias), else `F.linear`. Under autocast the operands are cast to its
    dtype first, as autocast casts F.linear's."""
    w = weight.t() if transposed else weight                                   # (N, K)
    if x.device.type != "cpu" or bias is None or not FUSED_DTYPES:
        return F.linear(x, w, bias)
    if torch.is_autocast_enabled("cpu"):
        dt = torch.get_autocast_dtype("cpu")
        x, w, bias = x.to(dt), w.to(dt), bias.to(dt)
    if not (x.dtype == w.dtype == bias.dtype and x.dtype in FUSED_DTYPES):
        return F.linear(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                                             # (M, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return _linear_bias(x2, w, bias).view(*lead, w.shape[0])                    # (..., N)


def _linear_forward(self: nn.Linear, x):
    return linear(x, self.weight, self.bias)


def _conv1d_forward(self, x):  # transformers' Conv1D: weight (in, out)
    return linear(x, self.weight, self.bias, transposed=True)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def fuse_linears(module: nn.Module) -> int:
    """Every nn.Linear / Conv1D with a bias inside `module` runs `linear` (its forward replaced on the
    instance; the weights, their names and the state dict are unchanged). Returns how many."""
    n = 0
    for m in module.modules():
        if getattr(m, "bias", None) is None:
            continue
        if type(m) is nn.Linear:
            m.forward = types.MethodType(_linear_forward, m)
        elif _is_conv1d(m):
            m.forward = types.MethodType(_conv1d_forward, m)
        else:
            continue
        n += 1
    return n


# ---- 2. torch.compile of each block -----------------------------------------------------------------------

def check_compiler() -> None:
    """inductor's CPU backend compiles C++: a clear error when no compiler is there (before any work)."""
    from torch._inductor import cpp_builder
    try:
        cxx = cpp_builder.get_cpp_compiler()
    except Exception as e:  # its own message names what it looked for
        raise RuntimeError(f"--compile blocks: torch.compile's CPU backend (inductor) needs a C++ compiler: {e}; "
                           f"install g++ (or set CXX), or use --compile linear / off") from e
    if shutil.which(cxx) is None and not os.path.isfile(cxx):
        raise RuntimeError(f"--compile blocks: torch.compile's CPU backend (inductor) needs a C++ compiler; "
                           f"{cxx!r} is not on PATH: install g++ (or set CXX), or use --compile linear / off")


def _allow_recompiles() -> None:
    """Every compiled block shares nn.Module._call_impl's cache: one entry per (block class, grad mode, dtype,
    mask or none, cache or none, static / dynamic sizes). The default limit (8) would send the later ones
    back to eager, silently; a run needs a few dozen."""
    import torch._dynamo.config as dc
    dc.recompile_limit = max(dc.recompile_limit, 64)
    dc.accumulated_recompile_limit = max(dc.accumulated_recompile_limit, 512)


def _partitioned(lm: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in lm.parameters())


def prepare_blocks(lm, mode: str) -> str:
    """Apply `mode` (COMPILE_MODES) to every block of `lm` (an IntervenableLM); returns a line saying what
    was done. Idempotent: a block already prepared is left as it is."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    name = f"{lm.family} ({lm.num_layers} blocks)"
    if mode == "off":
        return f"compile: off for {name}"
    if _partitioned(lm):
        return (f"compile: off for {name}: its weights are ZeRO-3 partitioned (DeepSpeed's hooks gather them "
                f"around each call, and its own linear replaces F.linear)")
    device = next(lm.parameters()).device
    n = sum(fuse_linears(b) for b in lm.blocks)
    if device.type == "cpu" and FUSED_DTYPES:
        what = f"{n} block linears with the bias in oneDNN's GEMM epilogue"
    else:
        what = f"block linears run F.linear ({device.type}{'' if FUSED_DTYPES else ', no oneDNN'})"
    if mode == "blocks":
        if device.type == "cpu":
            check_compiler()
        _allow_recompiles()
        for b in lm.blocks:
            if getattr(b, "_compiled_call_impl", None) is None:
                b.compile(dynamic=True if lm.kind == "causal" else None)
        what += "; torch.compile (inductor) of every block"
    return f"compile: {mode} for {name}: {what}"
