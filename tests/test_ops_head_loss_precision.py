"""`distill_head_loss` precision: loss weights (no cancellation at lm_weight = 0), fp64 ground truth from the
references, dtype checks, bf16 GEMMs with fp32 accumulation, and the KL at vocab 128k without an error floor.
Triton runs under the interpreter (TRITON_INTERPRET=1 from conftest)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import iit_fast.ops._common as common
import iit_fast.ops.head_loss as hl
import iit_fast.ops.head_loss.chunked as chunked
import iit_fast.ops.head_loss.gemms as gemms
import iit_fast.ops.head_loss.native as native
from iit_fast.ops import distill_head_loss
from iit_fast.ops.head_loss.reference import (
    distill_head_loss_reference,
    kd_loss_reference,
    mlm_loss_reference,
)
from iit_fast.ops.interchange.reference import hidden_loss_reference

# the backward-recompute path; the gradients formed in the forward: test_ops_head_loss_eager.py
pytestmark = pytest.mark.usefixtures("head_loss_recompute")

IMPLS = ["reference", "chunked", "native", "triton"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def close_pair(n=64, d=32, v=3000, noise=0.2, seed=0):
    """Student close to the teacher (KL ~ 0.1) with every token labelled (mlm ~ 10): the ce gradient is
    ~50x smaller than the mlm gradient, so G(ce + mlm) - G(mlm) loses ~2 digits to cancellation."""
    g = torch.Generator().manual_seed(seed)
    ht = torch.randn(n, d, generator=g)
    hs = (ht + noise * torch.randn(n, d, generator=g)).requires_grad_()
    wt = torch.randn(v, d, generator=g) * 0.3
    ws = (wt + noise * 0.3 * torch.randn(v, d, generator=g)).requires_grad_()
    bs = torch.zeros(v, requires_grad=True)
    bt = torch.zeros(v)
    y = torch.randint(0, v, (n,), generator=g)
    return hs, ht, ws, bs, wt, bt, y


def fp64_grads(hs, ht, ws, bs, wt, bt, y, kd_w, lm_w, T=2.0):
    p = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    ce, mlm = distill_head_loss_reference(p[0], ht.double(), p[1], p[2], wt.double(), bt.double(), y, None, T)
    return torch.autograd.grad(kd_w * ce + lm_w * mlm, p)


# ------------------------------------------------------------------------------------------------------
# 1. loss weights
# ------------------------------------------------------------------------------------------------------

# fp32 on this problem: the reference (autograd, unfused) errs 1.6e-6; the old fused backward, which formed
# 0.25 G(ce + mlm) - 0.25 G(mlm), erred 8.5e-6 (chunked) / 9.1e-6 (native); the direct gradient ~1.5e-6.
CE_GRAD_TOL = 3e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_weights", [True, False])
def test_lm_weight_zero_ce_grad_matches_fp64(impl, pass_weights):
    # the step's w_mlm = 0 case: loss = 0.25 ce + 0 mlm. With the weights passed the MLM work is skipped;
    # either way the backward forms the gradient with the grad_outputs (0.25, 0) as the per-row weights: no
    # difference of two large gradients is formed.
    hs, ht, ws, bs, wt, bt, y = close_pair(v=3000 if impl != "triton" else 1000)
    truth = fp64_grads(hs, ht, ws, bs, wt, bt, y, 0.25, 0.0)
    kw = dict(kd_weight=0.25, lm_weight=0.0) if pass_weights else {}
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, 2.0, chunk_size=16, impl=impl, **kw)
    got = torch.autograd.grad(0.25 * ce + 0.0 * mlm, (hs, ws, bs))
    errs = [rel(a, b) for a, b in zip(got, truth)]
    assert max(errs) < CE_GRAD_TOL, errs
    if pass_weights:
        assert mlm.item() == 0.0   # lm_weight = 0: the MLM loss is not computed


@pytest.mark.parametrize("impl", ["chunked", "native"])
def test_cancellation_is_what_the_tolerance_catches(impl):
    # negative control for the test above: the old backward's G(ce) = G(ce + mlm) - G(mlm), formed from two
    # fused gradients, misses CE_GRAD_TOL on the same problem
    hs, ht, ws, bs, wt, bt, y = close_pair()
    truth = fp64_grads(hs, ht, ws, bs, wt, bt, y, 1.0, 0.0)
    both = distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, 2.0, chunk_size=16, impl=impl)
    g_both = torch.autograd.grad(both[0] + both[1], (hs, ws, bs))
    mlm_only = distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, 2.0, chunk_size=16, impl=impl,
                                 kd_weight=0.0, lm_weight=1.0)
    g_mlm = torch.autograd.grad(mlm_only[1], (hs, ws, bs))
    cancelled = [a - b for a, b in zip(g_both, g_mlm)]
    assert max(rel(a, b) for a, b in zip(cancelled, truth)) > CE_GRAD_TOL


@pytest.mark.parametrize("impl", ["chunked", "native", "triton"])
def test_weighted_grads_and_backward_paths(impl, monkeypatch):
    # the forward runs one loss-only pass over the chunks, the backward one gradient pass (over row chunks, or
    # for impl native over vocabulary slices) with the grad_outputs as the weights, proportional to
    # (kd_weight, lm_weight) or not
    hs, ht, ws, bs, wt, bt, y = close_pair(n=24, v=500, noise=1.0, seed=2)
    y[::3] = -100
    passes = []
    real = chunked._chunk_loop
    monkeypatch.setattr(chunked, "_chunk_loop", lambda *a, **k: passes.append(k.get("grads") is not None)
                        or real(*a, **k))
    # impl native: both passes go over vocabulary slices (slices.py)
    real_fwd, real_bwd = chunked.slice_forward, chunked.slice_backward
    monkeypatch.setattr(chunked, "slice_forward", lambda *a, **k: passes.append(False) or real_fwd(*a, **k))
    monkeypatch.setattr(chunked, "slice_backward", lambda *a, **k: passes.append(True) or real_bwd(*a, **k))
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, 2.0, chunk_size=5, impl=impl,
                                kd_weight=0.3, lm_weight=0.7)
    assert passes == [False]
    got = torch.autograd.grad(3 * (0.3 * ce + 0.7 * mlm), (hs, ws, bs))
    assert passes == [False, True]
    for a, b in zip(got, fp64_grads(hs, ht, ws, bs, wt, bt, y, 0.9, 2.1)):
        assert rel(a, b) < 1e-5
    # not proportional (ce alone): the same single gradient pass
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, 2.0, chunk_size=5, impl=impl,
                                kd_weight=0.3, lm_weight=0.7)
    got = torch.autograd.grad(ce, (hs, ws, bs))
    assert passes == [False, True, False, True]
    for a, b in zip(got, fp64_grads(hs, ht, ws, bs, wt, bt, y, 1.0, 0.0)):
        assert rel(a, b) < 1e-5


def test_loss_weight_arguments_are_checked():
    hs, ht, ws, bs, wt, bt, y = close_pair(n=4, v=50)
    with pytest.raises(TypeError, match="kd_weight"):
        distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, kd_weight="a")
    with pytest.raises(ValueError, match="lm_weight"):
        distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, lm_weight=float("inf"))


# ------------------------------------------------------------------------------------------------------
# 2. references promote; fp64 is computed in fp64
# ------------------------------------------------------------------------------------------------------

def test_references_promote_fp64_against_hand_formula():
    g = torch.Generator().manual_seed(4)
    n, d, v, T = 7, 5, 11, 2.0
    hs, ht = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    ws, wt = torch.randn(v, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    bs, bt = torch.randn(v, generator=g, dtype=torch.float64), torch.randn(v, generator=g, dtype=torch.float64)
    y = torch.tensor([1, -100, 3, 10, -100, 0, 5])
    ce, mlm = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, None, T)
    assert ce.dtype == torch.float64 and mlm.dtype == torch.float64
    # by hand, fp64, no torch.nn.functional
    zs, zt = hs @ ws.T + bs, ht @ wt.T + bt

    def log_softmax(a):
        m = a.max(-1, keepdim=True).values
        return a - m - (a - m).exp().sum(-1, keepdim=True).log()

    lps, lpt = log_softmax(zs / T), log_softmax(zt / T)
    ce_hand = T * T * (lpt.exp() * (lpt - lps)).sum(-1).mean()
    lab = (y != -100).nonzero().squeeze(1)
    mlm_hand = -log_softmax(zs)[lab, y[lab]].mean()
    assert abs(ce.item() - ce_hand.item()) <= 1e-12 * abs(ce_hand.item())
    assert abs(mlm.item() - mlm_hand.item()) <= 1e-12 * abs(mlm_hand.item())
    # the pieces keep fp64 too, and fp32 inputs are not computed in fp64 (promote, not upcast everything)
    assert kd_loss_reference(zs, zt, None, T).dtype == torch.float64
    assert mlm_loss_reference(zs, y).dtype == torch.float64
    assert hidden_loss_reference(hs, ht, torch.ones(n)).dtype == torch.float64
    assert kd_loss_reference(zs.float(), zt.float(), None, T).dtype == torch.float32
    assert kd_loss_reference(zs.bfloat16(), zt.bfloat16(), None, T).dtype == torch.float32


def test_fused_fp64_is_fp64():
    *ts, y = close_pair(n=9, v=40)
    hs, ht, ws, bs, wt, bt = (t.detach().double() for t in ts)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, 2.0)          # auto -> chunked for fp64
    ce_r, mlm_r = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, None, 2.0)
    assert ce.dtype == torch.float64 and rel(ce, ce_r) < 1e-12 and rel(mlm, mlm_r) < 1e-12


# ------------------------------------------------------------------------------------------------------
# 3. dtypes the Triton and native steps do not take
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["triton", "native"])
def test_fp64_refused_with_a_clear_error(impl):
    *ts, y = close_pair(n=4, v=30)
    hs, ht, ws, bs, wt, bt = (t.detach().double() for t in ts)
    with pytest.raises(ValueError, match=r"float64.*|supports float32, bfloat16 and float16"):
        distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, impl=impl)


def test_triton_launcher_names_the_dtype():
    from iit_fast.ops.head_loss.triton import distill_head_loss_chunk_triton
    z = torch.zeros(2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="torch.float64.*supported"):
        distill_head_loss_chunk_triton(z, z.clone(), None, torch.ones(2), None, 2.0)


def test_native_unavailable_warns_once_with_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(native, "_fn", None)
    monkeypatch.setattr(native, "error", "ninja is not installed; fix: install a C++ compiler (g++) and "
                        "ninja (pip install ninja)")
    monkeypatch.setattr(common, "_logged", set())
    with caplog.at_level("INFO", logger="iit_fast.ops"):
        assert hl._pick_impl("auto", torch.device("cpu"), torch.float32) == "chunked"
        assert hl._pick_impl("auto", torch.device("cpu"), torch.float32) == "chunked"
    warns = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warns) == 1 and "pip install ninja" in warns[0].getMessage()
    with pytest.raises(RuntimeError, match="pip install ninja"):
        hl._pick_impl("native", torch.device("cpu"), torch.float32)


def test_load_native_without_ninja_says_how_to_fix(monkeypatch):
    import iit_fast.ops._native as nat
    monkeypatch.setattr(nat.shutil, "which", lambda name: None)
    monkeypatch.setattr(nat, "_has_ninja_module", lambda: False)
    with pytest.raises(nat.NativeUnavailable, match=r"ninja is not installed.*pip install ninja"):
        nat.load_native("iit_fast_test_no_ninja", ["head_loss/native.cpp"])


# ------------------------------------------------------------------------------------------------------
# 5. bf16: GEMMs in bf16 with fp32 accumulation, statistics in fp32, master-weight gradients in fp32
# ------------------------------------------------------------------------------------------------------

class _RecordMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            a, b = [x for x in args if isinstance(x, torch.Tensor)][-2:]
            self.seen.append((name, a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("slice_rows", [None, 96])
@pytest.mark.parametrize("case", ["bf16_inputs", "bf16_hidden_fp32_master", "fp32_under_autocast"])
def test_bf16_gemms(case, slice_rows, monkeypatch):
    # slice_rows: the weight GEMMs a slice of 96 rows at a time (fp32 master weights cast per slice, the dW
    # products per slice), as at a large vocabulary; None: one slice (the default at this size)
    if slice_rows:
        monkeypatch.setattr(gemms, "SLICE_BYTES", slice_rows * 32 * 2)
    hs, ht, ws, bs, wt, bt, y = close_pair(n=40, d=32, v=700, noise=1.0, seed=6)
    y[::2] = -100
    if case == "bf16_inputs":
        hs, ht, ws, bs, wt, bt = (t.detach().bfloat16() for t in (hs, ht, ws, bs, wt, bt))
    elif case == "bf16_hidden_fp32_master":
        hs, ht = hs.detach().bfloat16(), ht.bfloat16()
    hs, ws, bs = (t.detach().requires_grad_() for t in (hs, ws, bs))
    rec = _RecordMatmuls()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "fp32_under_autocast" else torch.autocast(
        "cpu", enabled=False)
    with rec, ctx:
        ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, None, 2.0, chunk_size=16, impl="native")
    with rec:
        g = torch.autograd.grad(ce + mlm, (hs, ws, bs))
    vocab_gemms = [s for s in rec.seen if 700 in s[3] + s[4]]
    if not slice_rows:   # 3 chunks x (z_s, z_t) in the forward, 3 x (z_s, z_t, dh, dW) in the backward
        assert len(vocab_gemms) == 3 * 2 + 3 * 4, rec.seen
    elif case != "bf16_inputs":   # the fp32 master weight: z_s and dh per slice of it (8 slices)
        assert sum(96 in s[3] + s[4] for s in rec.seen) >= 3 * 8 * 3, rec.seen
    assert all(s[1] == torch.bfloat16 and s[2] == torch.bfloat16 for s in rec.seen), rec.seen
    assert ce.dtype == torch.float32 and mlm.dtype == torch.float32
    # gradients in the parameters' own dtypes: fp32 master weights get fp32 gradients
    assert [t.dtype for t in g] == [hs.dtype, ws.dtype, bs.dtype]
    # flash-attention's rule: error vs fp64 (same bf16-rounded inputs) <= ~2x PyTorch's own bf16 computation
    p64 = [t.detach().bfloat16().double().requires_grad_() for t in (hs, ws, bs)]
    ce64, mlm64 = distill_head_loss_reference(p64[0], ht.bfloat16().double(), p64[1], p64[2],
                                              wt.bfloat16().double(), bt.bfloat16().double(), y, None, 2.0)
    g64 = torch.autograd.grad(ce64 + mlm64, p64)
    pb = [t.detach().bfloat16().requires_grad_() for t in (hs, ws, bs)]
    ce_p, mlm_p = distill_head_loss_reference(pb[0], ht.bfloat16(), pb[1], pb[2], wt.bfloat16(), bt.bfloat16(),
                                              y, None, 2.0)
    gp = torch.autograd.grad(ce_p + mlm_p, pb)
    assert rel(ce, ce64) <= 2 * rel(ce_p, ce64) + 1e-6 and rel(mlm, mlm64) <= 2 * rel(mlm_p, mlm64) + 1e-6
    for a, p, b in zip(g, gp, g64):
        assert rel(a, b) <= 2 * rel(p, b) + 1e-6


def _bf16_logits_128k(rows=4, seed=0):
    """(rows, 131072) bf16 teacher logits and student logits that differ from them on 1% of the entries
    by ~0.1: KL ~ 1e-5, teacher ~= student."""
    g = torch.Generator().manual_seed(seed)
    V = 131072
    base = torch.randn(rows, V, generator=g) * 3
    pert = (torch.rand(rows, V, generator=g) < 0.01) * torch.randn(rows, V, generator=g) * 0.1
    return (base + pert).bfloat16(), base.bfloat16()


def _kl_truth(zs, zt, T=2.0):
    lps, lpt = torch.log_softmax(zs.double() / T, -1), torch.log_softmax(zt.double() / T, -1)
    return (lpt.exp() * (lpt - lps)).sum(-1)


@pytest.mark.parametrize("inner", ["chunked", "native", "triton"])
def test_kl_vocab_128k_bf16_no_error_floor(inner):
    zs, zt = _bf16_logits_128k()
    truth = _kl_truth(zs, zt)
    assert truth.max() < 1e-4                                            # teacher ~= student
    w = torch.full((zs.shape[0],), 0.25)
    # the chunk loop upcasts bf16 logits to fp32; the Triton kernel loads the bf16 logits itself
    a, b = (zs.clone(), zt.clone()) if inner == "triton" else (zs.float(), zt.float())
    _, kl, _ = chunked.INNER[inner](a, b, None, w, None, 2.0)
    kl = kl.double()
    assert (kl >= 0).all()
    assert ((kl - truth).abs() / truth).max() < 1e-5
    # negative control: the same KL with the reduction in bf16 (PyTorch's bf16 computation) fails both checks
    ls, lt = torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1)
    kl_bf16 = (lt.exp() * (lt - ls)).sum(-1).double()
    assert ((kl_bf16 - truth).abs() / truth).max() > 1e-2


@pytest.mark.parametrize("impl", ["chunked", "native", "native-slices"])
def test_head_loss_vocab_128k_bf16(impl, monkeypatch):
    # the whole op at V = 131072 with bf16 states and weights: the KL (ce) of teacher ~= student matches fp64
    # computed from the logits the bf16 GEMM gives (on CPU those are rounded to bf16: no out_dtype there).
    # native-slices: the forward over 132 vocabulary slices of 1,000 ids (at this size one slice by default)
    if impl == "native-slices":
        from iit_fast.ops.head_loss import slices
        monkeypatch.setattr(slices, "slice_tiles", lambda n, V: (4, 1000))
        impl = "native"
    g = torch.Generator().manual_seed(1)
    n, d, V = 6, 16, 131072
    hs = torch.randn(n, d, generator=g).bfloat16()
    w = (torch.randn(V, d, generator=g) * 0.5).bfloat16()
    wt = (w.float() + (torch.rand(V, d, generator=g) < 0.01) * 0.05).bfloat16()
    ce, _ = distill_head_loss(hs, hs, w, None, wt, None, None, None, 2.0, chunk_size=4, impl=impl)
    if chunked._mm_out_dtype_supported(hs.device, torch.bfloat16):
        zs, zt = hs.double() @ w.double().T, hs.double() @ wt.double().T
    else:
        zs, zt = (hs @ w.T).double(), (hs @ wt.T).double()
    truth = 4 * _kl_truth(zs, zt).mean()
    assert 0 < truth < 1e-3
    assert ce.item() >= 0 and abs(ce.item() - truth.item()) / truth.item() < 1e-5


def _fold(zs, zt, y, width, skip=None):
    """The native forward's fold over slices of `width` ids (the last one short), slice `skip` left out."""
    from iit_fast.ops.head_loss.native import NFOLD, fold_finish, fold_native
    state = torch.empty(zs.shape[0], NFOLD, dtype=torch.float64)
    for j, v0 in enumerate(range(0, zs.shape[1], width)):
        if j != skip:
            v1 = min(v0 + width, zs.shape[1])
            fold_native(zs[:, v0:v1].contiguous(), zt[:, v0:v1].contiguous(), y, state, v0, 2.0)
    return fold_finish(state, y, zs.shape[1])


@pytest.mark.parametrize("labels", [False, True])
def test_native_forward_fold_128k_small_kl_against_fp64(labels):
    # impl native's forward over vocabulary slices (native.cpp fold_row): 132 slices of 1,000 ids (the last
    # one 72) joined by the KL's chain rule, teacher ~= student (KL ~ 1e-5): the KL against fp64 truth with no
    # error floor and never negative, the CE against fp64, and the statistics the backward reads equal to the
    # whole-row step's to fp32 rounding
    zs, zt = (z.float() for z in _bf16_logits_128k(rows=5, seed=3))
    y = torch.tensor([7, -100, 131071, 65536, 1000]) if labels else None
    kl, ce, stats = _fold(zs, zt, y, 1000)
    truth = _kl_truth(zs, zt)
    assert (kl >= 0).all() and ((kl.double() - truth).abs() / truth).max() < 1e-5
    row_stats = torch.empty_like(stats)
    _, kl_row, _ = native.inner_native(zs.clone(), zt.clone(), y, torch.ones(5), torch.ones(5) if labels else None,
                                       2.0, stats=row_stats)
    assert ((kl - kl_row).abs() / kl_row).max() < 1e-5
    assert torch.equal(stats[:, [0, 1, 5]], row_stats[:, [0, 1, 5]])                # maxima: the same floats
    r, r_row = stats[:, [2, 3, 6]], row_stats[:, [2, 3, 6]]                            # 1 / sums of exps
    assert ((r - r_row).abs() / r_row.abs().clamp_min(1e-30)).max() < 1e-6
    c64 = torch.logsumexp(zs.double() / 2, -1) - torch.logsumexp(zt.double() / 2, -1)   # lse_s - lse_t
    assert (stats[:, 4].double() - c64).abs().max() < 2e-8                             # the row step's: 4e-9
    if labels:
        has = y != -100
        ce64 = torch.logsumexp(zs.double(), -1) - zs.double().gather(1, y.clamp_min(0)[:, None])[:, 0]
        assert (ce[~has] == 0).all() and ((ce.double() - ce64).abs() / ce64)[has].max() < 1e-6
    # negative control: one slice left out of the fold (0.8% of the ids) misses the tolerance
    kl_skip, _, _ = _fold(zs, zt, y, 1000, skip=40)
    assert ((kl_skip.double() - truth).abs() / truth).max() > 1e-5
