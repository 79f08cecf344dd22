"""`interchange`, `hidden_loss`, `interchange_hidden_loss`: every fused path equals the reference.

Fresh random inputs of awkward sizes (D not a multiple of the block, rows not a multiple of anything),
padded rows (spans inside the real tokens, the mask off on padding), a derangement and a non-permutation pi,
whole-vector and sliced dims. The native path runs for real (fp32 and fp64, gradcheck in fp64); the Triton
path runs under TRITON_INTERPRET=1 (conftest) at small shapes in fp32; bf16/fp16 on a GPU only. Every output
is allocated NaN-filled (the allocation hooks of both paths are patched), so an element a kernel forgets to
write shows up.
"""
from __future__ import annotations

import importlib
import logging
import zlib

import pytest
import torch

from iit_fast.ops.interchange import (
    available_paths,
    hidden_loss,
    interchange,
    interchange_hidden_loss,
)
from iit_fast.ops.interchange import (
    native as nk,
    triton as tk,  # (`import iit_fast.ops.interchange...` meets the function)
)
from iit_fast.ops.interchange.reference import (
    hidden_loss_reference,
    interchange_hidden_loss_reference,
    interchange_reference,
)

# the module (iit_fast.ops re-exports the function `interchange` under the same name)
ops = importlib.import_module("iit_fast.ops.interchange")

FUSED = ["native", "triton"]
KINDS = ["cos", "mse"]


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every output of the fused paths starts as NaN (ints: a sentinel)."""
    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)
    monkeypatch.setattr(nk, "_empty", poisoned)
    monkeypatch.setattr(tk, "_empty", poisoned)


def make_batch(B=5, S=13, D=37, dtype=torch.float32, device="cpu", perm=True, seed=0):
    """States, teacher, mask and a valid intervention over padded rows (lengths vary, spans never touch pad)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = torch.arange(S)[None, :] < lengths[:, None]                     # (B, S) real tokens
    if perm:
        pi = torch.randperm(B, generator=g)
        while (pi == torch.arange(B)).any():                                # a derangement
            pi = torch.randperm(B, generator=g)
    else:
        pi = torch.randint(0, B, (B,), generator=g)
        pi[1] = pi[0] = (pi[0] + 1) % B                                    # two rows share a source
    k = torch.maximum(torch.ones(B, dtype=torch.long), (0.3 * torch.minimum(lengths, lengths[pi])).long())
    bs = (torch.rand(B, generator=g) * (lengths - k + 1)).long()
    ss = (torch.rand(B, generator=g) * (lengths[pi] - k + 1)).long()
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64).to(dtype).to(device)
    t = torch.randn(B, S, D, generator=g, dtype=torch.float64).to(dtype).to(device)
    return x, t, mask.to(device), pi.to(device), bs.to(device), ss.to(device), k.to(device)


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2e-2)


def assert_close(a, b, dtype):
    assert not torch.isnan(a).any(), "an element was not written"
    torch.testing.assert_close(a.double(), b.double(), rtol=tol(dtype), atol=tol(dtype))


def run_interchange(x, go, *args, impl):
    xg = x.detach().clone().requires_grad_(True)
    out = interchange(xg, *args, impl=impl) if impl != "ref" else interchange_reference(xg, *args)
    (gx,) = torch.autograd.grad(out, xg, go)
    return out.detach(), gx


DTYPES = {"native": [torch.float32, torch.float64], "triton": [torch.float32]}
CASES = [(impl, dt) for impl in FUSED for dt in DTYPES[impl]]


@pytest.mark.parametrize("impl,dtype", CASES)
@pytest.mark.parametrize("perm", [True, False], ids=["derangement", "shared-source"])
@pytest.mark.parametrize("dims", [None, (5, 30)], ids=["all-dims", "dim-slice"])
def test_interchange(impl, dtype, perm, dims):
    x, t, mask, pi, bs, ss, k = make_batch(dtype=dtype, perm=perm, seed=zlib.crc32(repr((impl, perm, dims)).encode()) % 1000)
    go = torch.randn_like(x)
    out, gx = run_interchange(x, go, pi, bs, ss, k, dims, impl=impl)
    out_r, gx_r = run_interchange(x, go, pi, bs, ss, k, dims, impl="ref")
    assert torch.equal(out, out_r)                      # a copy: bit exact
    assert_close(gx, gx_r, dtype)


@pytest.mark.parametrize("impl,dtype", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_hidden_loss(impl, dtype, kind):
    x, t, mask, *_ = make_batch(B=3, S=11, D=41, dtype=dtype, seed=7)
    for scale in (1.0, 2.5):   # scale 1 takes the no-copy backward; 2.5 the scaled one
        xg = x.clone().requires_grad_(True)
        loss = hidden_loss(xg, t, mask, kind, impl=impl)
        (gx,) = torch.autograd.grad(loss * scale, xg)
        xr = x.clone().requires_grad_(True)
        loss_r = hidden_loss_reference(xr, t, mask, kind)
        (gx_r,) = torch.autograd.grad(loss_r * scale, xr)
        assert loss.dtype == loss_r.dtype
        assert_close(loss, loss_r, dtype)
        assert_close(gx, gx_r, dtype)


@pytest.mark.parametrize("impl,dtype", CASES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dims", [None, (2, 33)], ids=["all-dims", "dim-slice"])
@pytest.mark.parametrize("which", ["both", "states-only", "loss-only"])
def test_interchange_hidden_loss(impl, dtype, kind, dims, which):
    x, t, mask, pi, bs, ss, k = make_batch(B=4, S=9, D=37, dtype=dtype, perm=(which != "loss-only"), seed=3)
    go = torch.randn_like(x)

    def run(fn):
        xg = x.clone().requires_grad_(True)
        out, loss = fn(xg)
        obj = {"both": (out * go).sum() + 0.7 * loss, "states-only": (out * go).sum(), "loss-only": 1.0 * loss}
        (gx,) = torch.autograd.grad(obj[which], xg)
        return out.detach(), loss.detach(), gx

    out, loss, gx = run(lambda xg: interchange_hidden_loss(xg, t, mask, pi, bs, ss, k, dims, kind, impl=impl))
    out_r, loss_r, gx_r = run(lambda xg: interchange_hidden_loss_reference(xg, t, mask, pi, bs, ss, k, dims, kind))
    assert torch.equal(out, out_r)
    assert_close(loss, loss_r, dtype)
    assert_close(gx, gx_r, dtype)


def test_triton_multi_tile(monkeypatch):
    """D larger than the block: the kernels loop over several D tiles (two passes for cos)."""
    monkeypatch.setattr(tk, "MAX_BLOCK_D", 16)
    x, t, mask, pi, bs, ss, k = make_batch(B=3, S=5, D=37, seed=11)
    go = torch.randn_like(x)
    for kind in KINDS:
        xg = x.clone().requires_grad_(True)
        out, loss = interchange_hidden_loss(xg, t, mask, pi, bs, ss, k, (3, 35), kind, impl="triton")
        (gx,) = torch.autograd.grad((out * go).sum() + loss, xg)
        xr = x.clone().requires_grad_(True)
        out_r, loss_r = interchange_hidden_loss_reference(xr, t, mask, pi, bs, ss, k, (3, 35), kind)
        (gx_r,) = torch.autograd.grad((out_r * go).sum() + loss_r, xr)
        assert torch.equal(out.detach(), out_r.detach())
        assert_close(loss, loss_r, torch.float32)
        assert_close(gx, gx_r, torch.float32)
        assert_close(hidden_loss(x, t, mask, kind, impl="triton"), hidden_loss_reference(x, t, mask, kind),
                     torch.float32)


def test_native_gradcheck():
    x, t, mask, pi, bs, ss, k = make_batch(B=3, S=6, D=7, dtype=torch.float64, perm=False, seed=5)
    x.requires_grad_(True)
    gc = dict(fast_mode=True)   # random projections: a few dozen calls instead of one per element
    assert torch.autograd.gradcheck(lambda a: interchange(a, pi, bs, ss, k, (1, 6), impl="native"), (x,), **gc)
    for kind in KINDS:
        assert torch.autograd.gradcheck(lambda a: hidden_loss(a, t, mask, kind, impl="native"), (x,), **gc)
        assert torch.autograd.gradcheck(
            lambda a: interchange_hidden_loss(a, t, mask, pi, bs, ss, k, None, kind, impl="native"), (x,), **gc)


@pytest.mark.parametrize("impl", FUSED)
def test_no_token_counts(impl):
    """An all-false mask gives a 0 loss and a 0 gradient, not NaN (like the reference)."""
    x, t, mask, *_ = make_batch(B=2, S=5, D=9, seed=1)
    xg = x.clone().requires_grad_(True)
    loss = hidden_loss(xg, t, torch.zeros_like(mask), "cos", impl=impl)
    (gx,) = torch.autograd.grad(loss, xg)
    assert loss.item() == 0.0 and torch.equal(gx, torch.zeros_like(gx))


def test_native_low_precision_on_cpu():
    """bf16 states on CPU: computed in fp32, cast back; within bf16 rounding of the reference."""
    x, t, mask, pi, bs, ss, k = make_batch(dtype=torch.bfloat16, seed=2)
    out, loss = interchange_hidden_loss(x, t, mask, pi, bs, ss, k, None, "cos", impl="native")
    out_r, loss_r = interchange_hidden_loss_reference(x, t, mask, pi, bs, ss, k, None, "cos")
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_r)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)   # both upcast to fp32


def test_dispatch_auto_on_cpu(caplog):
    paths = available_paths()
    assert paths["reference"] is None and paths["native"] is None    # the extension builds here
    x, t, mask, pi, bs, ss, k = make_batch(seed=4)
    ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="iit_fast.ops"):
        out = interchange(x, pi, bs, ss, k)
        interchange(x, pi, bs, ss, k)
    assert torch.equal(out, interchange_reference(x, pi, bs, ss, k))
    msgs = [r.getMessage() for r in caplog.records if "interchange: " in r.getMessage()]
    assert msgs == ["interchange: native path (auto, cpu tensors)"]   # said once


def test_dispatch_errors_and_fallbacks(caplog):
    x, t, mask, pi, bs, ss, k = make_batch(seed=6)
    with pytest.raises(ValueError):
        interchange(x, pi, bs, ss, k, impl="cuda")
    with pytest.raises(ValueError):
        hidden_loss(x, t, mask, "l1")
    with pytest.raises(IndexError):
        interchange(x, pi, bs, ss, k + x.shape[1], impl="native")
    # a teacher that requires grad gets its gradient: the reference runs, with a warning
    ops._logged.clear()
    tg = t.clone().requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="iit_fast.ops"):
        loss = hidden_loss(x, tg, mask, "mse")
    (gt,) = torch.autograd.grad(loss, tg)
    assert gt.abs().sum() > 0
    assert any("teacher requires grad" in r.getMessage() for r in caplog.records)
    # reference when asked
    assert torch.equal(hidden_loss(x, t, mask, "mse", impl="reference"), hidden_loss_reference(x, t, mask, "mse"))


def test_triton_launcher_writes_every_element():
    """The launcher itself, with pre-filled NaN out tensors given explicitly."""
    x, t, mask, pi, bs, ss, k = make_batch(B=3, S=7, D=19, seed=9)
    out = torch.full_like(x, float("nan"))
    tk.interchange_forward(x, pi, bs, ss, k, 0, 19, out=out)
    assert torch.equal(out, interchange_reference(x, pi, bs, ss, k))
    grad = torch.full_like(x, float("nan"))
    w = mask.reshape(-1).float() / mask.sum()
    loss, g = tk.hidden_loss_forward(x.reshape(-1, 19), t.reshape(-1, 19), w, True, grad=grad.view(-1, 19))
    assert not torch.isnan(grad).any() and not torch.isnan(loss).any()


# ---------------------------------------------------------------------------------------------------------
# GPU: Triton in bf16 / fp16 / fp32 on real hardware (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5, 13, 37), (8, 128, 768), (3, 67, 1031), (2, 9, 4099)])
def test_gpu_triton(dtype, kind, shape):
    B, S, D = shape
    x, t, mask, pi, bs, ss, k = make_batch(B, S, D, dtype=dtype, device="cuda", seed=B * S)
    go = torch.randn_like(x)
    dims = (D // 5, D - D // 7)

    def run(fn):
        xg = x.clone().requires_grad_(True)
        out, loss = fn(xg)
        (gx,) = torch.autograd.grad((out.float() * go.float()).sum() + loss, xg)
        return out.detach(), loss.detach(), gx.float()

    out, loss, gx = run(lambda a: interchange_hidden_loss(a, t, mask, pi, bs, ss, k, dims, kind, impl="triton"))
    out_r, loss_r, gx_r = run(lambda a: interchange_hidden_loss_reference(a, t, mask, pi, bs, ss, k, dims, kind))
    assert torch.equal(out, out_r)
    torch.testing.assert_close(loss.float(), loss_r.float(), rtol=1e-4, atol=1e-5)
    # the gradient is stored in the input dtype: allow its rounding
    torch.testing.assert_close(gx, gx_r, rtol=tol(dtype), atol=tol(dtype) * gx_r.abs().max().item())
    l1 = hidden_loss(x, t, mask, kind, impl="triton")
    torch.testing.assert_close(l1.float(), hidden_loss_reference(x, t, mask, kind).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_auto_is_triton(caplog):
    x, t, mask, pi, bs, ss, k = make_batch(device="cuda", seed=1)
    ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="iit_fast.ops"):
        interchange(x, pi, bs, ss, k)
    assert any("triton path (auto" in r.getMessage() for r in caplog.records)
