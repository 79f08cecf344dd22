"""`distill_head_loss` against the unfused reference: values and gradients (fp32 1e-5 relative), fp64
gradcheck, awkward chunk sizes, unlabelled / masked-out tokens, T = 1 and 2, and the Triton inner step under
the interpreter (TRITON_INTERPRET=1 from conftest, small vocab)."""
from __future__ import annotations

import pytest
import torch

from iit_fast.ops import distill_head_loss
from iit_fast.ops.head_loss import DistillHeadLossFunction, default_chunk_size
from iit_fast.ops.head_loss.reference import distill_head_loss_reference

# the backward-recompute path; the gradients formed in the forward: test_ops_head_loss_eager.py
pytestmark = pytest.mark.usefixtures("head_loss_recompute")


def make(n=37, d=16, dt=24, v=97, dtype=torch.float32, p_label=0.3, mask="some", labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64).to(dtype)
    ws = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    bs = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_()
    wt = (torch.randn(v, dt, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    bt = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    y = None
    if labels:
        y = torch.randint(0, v, (n,), generator=g)
        y[torch.rand(n, generator=g) > p_label] = -100
    if mask == "none":
        m = None
    elif mask == "all_off":
        m = torch.zeros(n, dtype=torch.bool)
    else:
        m = torch.rand(n, generator=g) < 0.8
    return hs, ht, ws, bs, wt, bt, y, m


def grads(ce, mlm, a, b, params, wa=1.0, wb=1.0):
    loss = wa * ce + wb * mlm
    return torch.autograd.grad(loss, params, allow_unused=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


IMPLS = ["chunked", "native", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [None, 5, 1000])
@pytest.mark.parametrize("mask", ["some", "none"])
def test_matches_reference_fp32(impl, T, chunk, mask):
    if impl == "triton" and chunk == 1000:
        pytest.skip("same as chunk=None (one chunk) under the slow interpreter")
    hs, ht, ws, bs, wt, bt, y, m = make(mask=mask)
    params = (hs, ws, bs)
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, T)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, T, chunk_size=chunk, impl=impl)
    assert ce.dtype == torch.float32 and mlm.dtype == torch.float32
    assert rel(ce, ce_r) < 1e-5 and rel(mlm, mlm_r) < 1e-5
    # equal and unequal loss weights: the second takes the backward's mlm recompute path
    for wa, wb in [(1.0, 1.0), (0.25, 0.75)]:
        gr = grads(ce_r, mlm_r, None, None, params, wa, wb)
        gf = grads(ce, mlm, None, None, params, wa, wb)
        for a, b in zip(gf, gr):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert rel(a, b) < 1e-5, (wa, wb, rel(a, b))
        ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, T, chunk_size=chunk, impl=impl)
        ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, T)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_labels_iit_pass(impl):
    hs, ht, ws, bs, wt, bt, _, m = make(labels=False)
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, None, m, 2.0)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, None, m, 2.0, chunk_size=7, impl=impl)
    assert mlm.item() == 0.0 and rel(ce, ce_r) < 1e-5
    for a, b in zip(torch.autograd.grad(ce, (hs, ws, bs)), torch.autograd.grad(ce_r, (hs, ws, bs))):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_each_loss_alone(impl):
    # grad of ce alone and of mlm alone (the other grad_output is None)
    hs, ht, ws, bs, wt, bt, y, m = make(seed=3)
    for pick in (0, 1):
        out_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0)[pick]
        out = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, chunk_size=6, impl=impl)[pick]
        for a, b in zip(torch.autograd.grad(out, (hs, ws, bs)), torch.autograd.grad(out_r, (hs, ws, bs))):
            assert rel(a, b) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_no_labelled_tokens_and_all_masked(impl):
    hs, ht, ws, bs, wt, bt, y, m = make(p_label=-1.0, mask="all_off")   # nothing counts at all
    assert (y == -100).all()
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, chunk_size=4, impl=impl)
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0)
    assert ce.item() == 0.0 and mlm.item() == 0.0 and ce_r.item() == 0.0 and mlm_r.item() == 0.0
    gh, gw, gb = torch.autograd.grad(ce + mlm, (hs, ws, bs))
    assert torch.all(gh == 0) and torch.all(gw == 0) and torch.all(gb == 0)
    # KL masked out but some labels: only the mlm counts
    hs, ht, ws, bs, wt, bt, y, m = make(mask="all_off", seed=1)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, chunk_size=4, impl=impl)
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0)
    assert ce.item() == 0.0 and rel(mlm, mlm_r) < 1e-5
    for a, b in zip(torch.autograd.grad(ce + mlm, (hs, ws, bs)),
                    torch.autograd.grad(ce_r + mlm_r, (hs, ws, bs))):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-5


def test_gradcheck_fp64():
    hs, ht, ws, bs, wt, bt, y, m = make(n=9, d=5, dt=4, v=13, dtype=torch.float64, p_label=0.5)

    def f(hs, ws, bs):
        return DistillHeadLossFunction.apply(hs, ht, ws, bs, wt, bt, y, m, 2.0, 4, "chunked")

    assert torch.autograd.gradcheck(f, (hs, ws, bs), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, impl, monkeypatch):
    # impl native over 8 vocabulary slices of 128 ids (the last 104) and blocks of 16 rows (the last 8), both
    # passes (the forward folds the slices)
    from iit_fast.ops.head_loss import slices
    monkeypatch.setattr(slices, "slice_tiles", lambda n, V: (16, 128))
    hs, ht, ws, bs, wt, bt, y, m = make(v=1000, d=32, dt=32, n=40, dtype=dtype)
    hs32, ws32, bs32 = (t.detach().float().requires_grad_() for t in (hs, ws, bs))
    ce_r, mlm_r = distill_head_loss_reference(hs32, ht.float(), ws32, bs32, wt.float(), bt.float(), y, m)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, chunk_size=16, impl=impl)
    assert ce.dtype == torch.float32
    # PyTorch's own computation in this precision, for the error budget (STYLE: at most ~2x of it)
    ce_p, mlm_p = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m)
    tol_ce = max(2 * rel(ce_p, ce_r), 1e-3)
    assert rel(ce, ce_r) < tol_ce and rel(mlm, mlm_r) < max(2 * rel(mlm_p, mlm_r), 1e-3)
    g = torch.autograd.grad(ce + mlm, (hs, ws, bs))
    gp = torch.autograd.grad(ce_p + mlm_p, (hs, ws, bs))
    gr = torch.autograd.grad(ce_r + mlm_r, (hs32, ws32, bs32))
    for a, p, b in zip(g, gp, gr):
        assert a.dtype == dtype
        assert rel(a, b) < max(2 * rel(p, b), 1e-2)


def test_batched_shape_and_dispatch(caplog):
    hs, ht, ws, bs, wt, bt, y, m = make(n=24)
    hs3 = hs.detach().reshape(4, 6, -1).requires_grad_()
    with caplog.at_level("INFO", logger="iit_fast.ops"):
        ce, mlm = distill_head_loss(hs3, ht.reshape(4, 6, -1), ws, bs, wt, bt, y.reshape(4, 6),
                                    m.reshape(4, 6), 2.0)
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0)
    assert rel(ce, ce_r) < 1e-5 and rel(mlm, mlm_r) < 1e-5
    (gh,) = torch.autograd.grad(ce + mlm, hs3)
    assert gh.shape == hs3.shape
    with pytest.raises(ValueError):
        distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, impl="nope")


def test_default_chunk_size():
    assert default_chunk_size(4096, 30522) * 30522 * 4 * 3 <= 256 * 2**20
    assert default_chunk_size(10, 30522) == 10
    assert default_chunk_size(4096, 10**9) == 1


@pytest.mark.parametrize("with_labels", [True, False])
def test_native_step_bert_vocab_row(with_labels):
    # the C++ step against the torch step on a few full BERT-vocabulary rows (V = 30522, not a multiple
    # of any vector width), wide logits so the softmaxes are peaked
    from iit_fast.ops.head_loss.inner import inner_torch as _inner_torch
    from iit_fast.ops.head_loss.native import inner_native as _inner_native
    from iit_fast.ops.head_loss.native import native_step
    assert native_step() is not None, "native CPU step did not build"
    g = torch.Generator().manual_seed(5)
    C, V = 3, 30522
    zs, zt = torch.randn(C, V, generator=g) * 4, torch.randn(C, V, generator=g) * 4
    y = torch.tensor([7, -100, V - 1]) if with_labels else None
    wk, wl = torch.tensor([0.5, 0.25, 0.0]), torch.tensor([0.5, 0.0, 0.5])
    dz_r, kl_r, ce_r = _inner_torch(zs.clone(), zt.clone(), y, wk, wl if with_labels else None, 2.0)
    dz, kl, ce = _inner_native(zs.clone(), zt.clone(), y, wk, wl if with_labels else None, 2.0)
    assert rel(kl, kl_r) < 1e-5 and rel(dz, dz_r) < 1e-5
    if with_labels:
        assert rel(ce, ce_r) < 1e-5 and ce[1].item() == 0.0


def test_auto_picks_native_on_cpu():
    from iit_fast.ops.head_loss import _pick_impl
    assert _pick_impl("auto", torch.device("cpu"), torch.float32) == "native"
    assert _pick_impl("auto", torch.device("cpu"), torch.float64) == "chunked"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_bert_vocab(dtype):
    # compiled Triton kernel + cuBLAS on a BERT-vocabulary shape (skipped without CUDA)
    hs, ht, ws, bs, wt, bt, y, m = make(n=1000, d=64, dt=48, v=30522, dtype=dtype)
    hs, ht, ws, bs, wt, bt, y, m = (t.detach().cuda() if t is not None else None
                                    for t in (hs, ht, ws, bs, wt, bt, y, m))
    for t in (hs, ws, bs):
        t.requires_grad_()
    f32 = [t.detach().float().requires_grad_() for t in (hs, ws, bs)]
    ce_r, mlm_r = distill_head_loss_reference(f32[0], ht.float(), f32[1], f32[2], wt.float(), bt.float(), y, m)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, chunk_size=300)   # auto -> triton
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(ce, ce_r) < tol and rel(mlm, mlm_r) < tol
    g = torch.autograd.grad(ce + mlm, (hs, ws, bs))
    gr = torch.autograd.grad(ce_r + mlm_r, f32)
    for a, b in zip(g, gr):
        assert a.dtype == dtype and rel(a, b) < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_small_kl_against_fp64(impl):
    # near-uniform, close distributions (KL ~ 3e-3, as from a freshly initialised head): KL is a small
    # difference of O(log V) terms, so it is checked against fp64 truth computed from the same fp32 logits
    g = torch.Generator().manual_seed(11)
    n, d, v = 40, 32, 1000
    hs, ht = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ws, wt = torch.randn(v, d, generator=g) * 0.02, torch.randn(v, d, generator=g) * 0.02
    bs = bt = torch.zeros(v)
    zs, zt = (hs @ ws.t()).double(), (ht @ wt.t()).double()
    lps, lpt = torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1)
    truth = 4 * (lpt.exp() * (lpt - lps)).sum(-1).mean()
    ce, _ = distill_head_loss(hs, ht, ws, bs, wt, bt, None, None, 2.0, chunk_size=16, impl=impl)
    assert rel(ce, truth) < 1e-5


# ---- impl native over vocabulary slices (slices.py: the forward-KL forward and every backward) -----------

DIV_NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


@pytest.mark.parametrize("name", DIV_NAMES)
@pytest.mark.parametrize("labels", [True, False])
def test_native_vocab_slices_match_reference(name, labels, monkeypatch):
    # many slices (64 ids, the last one short: V = 301) and row blocks (7 rows, the last one short), so
    # dW / db are accumulated over row blocks and dh over slices, and (forward KL) the forward folds 5 slices
    # per row; every divergence, with and without the MLM
    from iit_fast.ops.head_loss import slices
    from iit_fast.ops.head_loss.divergence import Divergence
    seen = []
    monkeypatch.setattr(slices, "slice_tiles", lambda n, V: seen.append((n, V)) or (7, 64))
    hs, ht, ws, bs, wt, bt, y, m = make(v=301, labels=labels, seed=5)
    div = Divergence.of(name)
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0, divergence=div)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, impl="native", divergence=div,
                                kd_weight=0.3, lm_weight=0.7)
    assert rel(ce, ce_r) < 1e-5 and (not labels or rel(mlm, mlm_r) < 1e-5)
    got = torch.autograd.grad(0.3 * ce + 0.7 * mlm, (hs, ws, bs))
    want = torch.autograd.grad(0.3 * ce_r + 0.7 * mlm_r, (hs, ws, bs))
    assert len(seen) == (2 if name == "forward_kl" else 1), "the native passes did not go over vocabulary slices"
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5, (name, rel(a, b))


def test_native_vocab_slices_can_fail(monkeypatch):
    # negative control: a statistic off by one ulp-scale shift (the student's max) is seen by the comparison
    from iit_fast.ops.head_loss import native
    orig = native.slice_native

    def shifted(zs, zt, labels, g_kd, g_lab, stats, *a, **k):
        st = stats.clone()
        st[:, 0] += 1e-3                                                  # m_s: p_s off by 0.1%
        return orig(zs, zt, labels, g_kd, g_lab, st, *a, **k)

    monkeypatch.setattr(native, "slice_native", shifted)
    hs, ht, ws, bs, wt, bt, y, m = make(v=301, seed=5)
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, impl="native")
    got = torch.autograd.grad(ce + mlm, (hs, ws, bs))
    want = torch.autograd.grad(ce_r + mlm_r, (hs, ws, bs))
    assert max(rel(a, b) for a, b in zip(got, want)) > 1e-5


def test_slice_tiles_fit_the_budget():
    from iit_fast.ops.head_loss.slices import DEFAULT_MEMORY_BUDGET, slice_tiles
    for n, V in [(8192, 128256), (16384, 128256), (256, 128256), (37, 301), (1, 5), (100000, 151936)]:
        R, Vs = slice_tiles(n, V)
        assert 1 <= R <= n and 1 <= Vs <= V
        assert R * Vs * 12 <= DEFAULT_MEMORY_BUDGET or Vs == min(V, 256) or R == 1
    assert slice_tiles(8192, 128256)[0] == 8192        # every row in one block: each dW slice one GEMM


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_count_for_nothing_get_zero_gradient_even_nan(impl):
    # padding rows (no KL, no label) with NaN states: the CPU paths drop them, the device path (triton: no
    # host read of the mask) zeroes them; either way the losses and gradients are those of the other rows
    hs, ht, ws, bs, wt, bt, y, m = make(n=13, seed=7)
    off = ~m & (y == -100)
    off[[2, 9]] = True
    m[off], y[off] = False, -100
    keep = ~off
    hs_nan = hs.detach().clone()
    hs_nan[off] = float("nan")
    hs_nan.requires_grad_()
    ht_nan = ht.clone()
    ht_nan[off] = float("nan")
    ce, mlm = distill_head_loss(hs_nan, ht_nan, ws, bs, wt, bt, y, m, 2.0, chunk_size=5, impl=impl)
    hk = hs.detach()[keep].requires_grad_()
    ce_r, mlm_r = distill_head_loss_reference(hk, ht[keep], ws, bs, wt, bt, y[keep], m[keep], 2.0)
    assert rel(ce, ce_r) < 1e-5 and rel(mlm, mlm_r) < 1e-5
    gh, gw, gb = torch.autograd.grad(ce + mlm, (hs_nan, ws, bs))
    gh_r, gw_r, gb_r = torch.autograd.grad(ce_r + mlm_r, (hk, ws, bs))
    assert torch.all(gh[off] == 0) and rel(gh[keep], gh_r) < 1e-5
    assert rel(gw, gw_r) < 1e-5 and rel(gb, gb_r) < 1e-5
