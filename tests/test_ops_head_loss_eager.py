"""`distill_head_loss` with its gradients formed in the forward (CPU impls, a decoder whose fp32 (V, D)
gradient fits `resident_grad_bytes`): the forward forms the gradients of kd_weight * ce + lm_weight * mlm in
its one pass over row chunks, the backward scales them when the grad_outputs are proportional to those
weights and recomputes otherwise. Against the unfused reference (fp32 1e-5, fp64 for the no-cancellation
case), with spies that show which path ran, the budget's choice, and a negative control (a backward that
scaled what it should have recomputed is caught)."""
from __future__ import annotations

import pytest
import torch

import iit_fast.ops.head_loss as hl
import iit_fast.ops.head_loss.chunked as chunked
from iit_fast.ops import distill_head_loss
from iit_fast.ops.head_loss.reference import distill_head_loss_reference
from test_ops_head_loss import make, rel
from test_ops_head_loss_precision import CE_GRAD_TOL, close_pair, fp64_grads

IMPLS = ["chunked", "native"]


@pytest.fixture
def paths(monkeypatch):
    """The passes that ran, in order: "eager" (forward with gradients), "forward" (losses only),
    "recompute" (a backward that recomputed the logits)."""
    ran = []
    eager, fwd, bwd = hl.head_loss_eager, hl.head_loss_forward, hl.head_loss_backward
    monkeypatch.setattr(hl, "head_loss_eager", lambda *a, **k: ran.append("eager") or eager(*a, **k))
    monkeypatch.setattr(hl, "head_loss_forward", lambda *a, **k: ran.append("forward") or fwd(*a, **k))
    monkeypatch.setattr(hl, "head_loss_backward", lambda *a, **k: ran.append("recompute") or bwd(*a, **k))
    return ran


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("mask", ["some", "none"])
@pytest.mark.parametrize("labels", [True, False])
def test_eager_matches_reference_fp32(impl, chunk, mask, labels, paths):
    hs, ht, ws, bs, wt, bt, y, m = make(mask=mask, labels=labels)
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, chunk_size=chunk, impl=impl,
                                kd_weight=0.3, lm_weight=0.7)
    assert rel(ce, ce_r) < 1e-5 and (not labels or rel(mlm, mlm_r) < 1e-5)
    # the step's backward: the grad_outputs are s * (kd_weight, lm_weight), here s = 3
    got = torch.autograd.grad(3 * (0.3 * ce + 0.7 * mlm), (hs, ws, bs))
    want = torch.autograd.grad(3 * (0.3 * ce_r + 0.7 * mlm_r), (hs, ws, bs))
    assert paths == ["eager"], "the gradients were not formed in the forward and scaled"
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backward", ["ce_alone", "other_weights", "mlm_alone"])
def test_eager_not_proportional_recomputes(impl, backward, paths):
    hs, ht, ws, bs, wt, bt, y, m = make()
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, impl=impl, kd_weight=0.3, lm_weight=0.7)
    loss = {"ce_alone": lambda c, l: c, "other_weights": lambda c, l: 0.5 * c + 0.2 * l,
            "mlm_alone": lambda c, l: l}[backward]
    got = torch.autograd.grad(loss(ce, mlm), (hs, ws, bs))
    want = torch.autograd.grad(loss(ce_r, mlm_r), (hs, ws, bs))
    assert paths == ["eager", "recompute"]
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_scaling_what_should_recompute_is_caught(impl, monkeypatch):
    # negative control for the test above: a backward that always scales (it takes any grad_outputs for the
    # forward's weights) gives the wrong gradient of 0.5 ce + 0.2 mlm
    monkeypatch.setattr(hl, "common_scale", lambda g_ce, g_mlm, kd, lm: float(g_ce) / kd)
    hs, ht, ws, bs, wt, bt, y, m = make()
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, impl=impl, kd_weight=0.3, lm_weight=0.7)
    got = torch.autograd.grad(0.5 * ce + 0.2 * mlm, (hs, ws, bs))
    want = torch.autograd.grad(0.5 * ce_r + 0.2 * mlm_r, (hs, ws, bs))
    assert max(rel(a, b) for a, b in zip(got, want)) > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_lm_weight_zero_ce_grad_matches_fp64(impl, paths):
    # w_mlm = 0 in the step: the gradient is formed with the per-row weights 0.25 * w_kd only, no difference
    # of two large gradients (test_ops_head_loss_precision's tolerance, whose control shows that it catches one)
    hs, ht, ws, bs, wt, bt, y = close_pair()
    truth = fp64_grads(hs, ht, ws, bs, wt, bt, y, 0.25, 0.0)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, 2.0, chunk_size=16, impl=impl,
                                kd_weight=0.25, lm_weight=0.0)
    got = torch.autograd.grad(0.25 * ce + 0.0 * mlm, (hs, ws, bs))
    assert paths == ["eager"]
    assert max(rel(a, b) for a, b in zip(got, truth)) < CE_GRAD_TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eager_low_precision(impl, dtype, paths):
    hs, ht, ws, bs, wt, bt, y, m = make(v=1000, d=32, dt=32, n=40, dtype=dtype)
    hs32, ws32, bs32 = (t.detach().float().requires_grad_() for t in (hs, ws, bs))
    ce_r, mlm_r = distill_head_loss_reference(hs32, ht.float(), ws32, bs32, wt.float(), bt.float(), y, m)
    ce_p, mlm_p = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m)   # PyTorch's own, in dtype
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, chunk_size=16, impl=impl)
    assert rel(ce, ce_r) < max(2 * rel(ce_p, ce_r), 1e-3) and rel(mlm, mlm_r) < max(2 * rel(mlm_p, mlm_r), 1e-3)
    g = torch.autograd.grad(ce + mlm, (hs, ws, bs))
    gp = torch.autograd.grad(ce_p + mlm_p, (hs, ws, bs))
    gr = torch.autograd.grad(ce_r + mlm_r, (hs32, ws32, bs32))
    assert paths == ["eager"]
    for a, p, b in zip(g, gp, gr):
        assert a.dtype == dtype
        assert rel(a, b) < max(2 * rel(p, b), 1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_budget_decides_the_path(impl, paths, monkeypatch):
    hs, ht, ws, bs, wt, bt, y, m = make()            # V = 97, D = 16: a 6,208-byte fp32 weight gradient
    grad_bytes = ws.numel() * 4
    for budget, want in ((grad_bytes, ["eager"]), (grad_bytes - 1, ["forward", "recompute"]),
                         (0, ["forward", "recompute"]), (None, ["eager"])):
        paths.clear()
        ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, impl=impl, resident_grad_bytes=budget)
        torch.autograd.grad(ce + mlm, (hs, ws, bs))
        assert paths == want, budget
    # the default budget is the module's: a decoder over it recomputes
    monkeypatch.setattr(hl, "RESIDENT_GRAD_BYTES", grad_bytes - 1)
    paths.clear()
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, impl=impl)
    torch.autograd.grad(ce + mlm, (hs, ws, bs))
    assert paths == ["forward", "recompute"]


def test_eager_not_without_a_gradient_or_on_the_device_path(paths):
    hs, ht, ws, bs, wt, bt, y, m = make()
    with torch.no_grad():                                 # evaluation: no gradient to form
        distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, impl="native")
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, impl="triton")   # no host read on the device path
    torch.autograd.grad(ce + mlm, (hs, ws, bs))
    assert paths == ["forward", "forward", "recompute"]


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_second_backward_recomputes_the_same(impl, paths):
    # the held gradients are handed out (and freed) by the first backward; a retained graph's second backward
    # recomputes and agrees
    hs, ht, ws, bs, wt, bt, y, m = make()
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, impl=impl)
    first = torch.autograd.grad(ce + mlm, (hs, ws, bs), retain_graph=True)
    second = torch.autograd.grad(ce + mlm, (hs, ws, bs))
    assert paths == ["eager", "recompute"]
    for a, b in zip(first, second):
        assert rel(a, b) < 1e-6


def test_eager_common_scale():
    t = torch.tensor
    assert chunked.common_scale(t(0.6), t(1.4), 0.3, 0.7) == pytest.approx(2.0)
    assert chunked.common_scale(t(0.6), None, 0.3, 0.0) == pytest.approx(2.0)     # no MLM term
    assert chunked.common_scale(t(0.6), t(1.0), 0.3, 0.7) is None
    assert chunked.common_scale(None, t(1.4), 0.0, 0.7) == pytest.approx(2.0)
    assert chunked.common_scale(t(0.1), t(1.4), 0.0, 0.7) is None
