"""The divergences of the `ce` / `iit` terms (reverse KL, generalized JSD, skew KL, skew reverse KL, TVD;
`iit_fast/ops/head_loss/divergence.py`): every path of the fused head loss and of the sparse top-k loss
against an fp64 autograd reference, forward and backward, odd sizes; bf16 within 2x PyTorch's own error;
jsd's ends; TRL's GKDTrainer.generalized_jsd_loss as an independent oracle; the fast step equals the naive
step for every divergence (masked and causal families); bad beta / alpha. Test names carry the divergence
(`-k jsd`, `-k reverse`, `-k skew`, `-k tvd`). Triton runs under the interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from iit_fast.config import DistillConfig
from iit_fast.ops import distill_head_loss
from iit_fast.ops.head_loss.divergence import (
    Divergence,
    divergence_loss_reference,
    divergence_reference,
)
from iit_fast.ops.head_loss.reference import distill_head_loss_reference
from iit_fast.ops.head_loss.sparse import sparse_distill_head_loss
from iit_fast.sampling import make_alignment, sample_plan
from test_step import assert_same_step, run
from tiny import tiny_batch, tiny_pair

# ids carry the divergence's name, so `-k jsd` / `-k reverse` / `-k skew` / `-k tvd` select them
DIVS = {
    "reverse": Divergence.of("reverse_kl"),
    "jsd_0.5": Divergence.of("jsd", beta=0.5),
    "jsd_0.1": Divergence.of("jsd", beta=0.1),
    "skew_kl_0.1": Divergence.of("skew_kl", alpha=0.1),
    "skew_reverse_kl_0.3": Divergence.of("skew_reverse_kl", alpha=0.3),
    "tvd": Divergence.of("tvd"),
}
IMPLS = ["chunked", "native", "triton"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def problem(n=23, d=13, dt=11, v=1001, scale=1.0, dtype=torch.float32, seed=0, labels=True):
    """Odd sizes; some rows unlabelled, some out of the KL mask; scale sets how far student and teacher are."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g, dtype=torch.float64)
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64)
    ws = torch.randn(v, d, generator=g, dtype=torch.float64) * scale
    bs = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64) * scale
    bt = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, v, (n,), generator=g) if labels else None
    if y is not None:
        y[torch.rand(n, generator=g) < 0.4] = -100
    m = torch.rand(n, generator=g) < 0.8
    hs, ws, bs = (t.to(dtype).requires_grad_() for t in (hs, ws, bs))
    return hs, ht.to(dtype), ws, bs, wt.to(dtype), bt.to(dtype), y, m


def fp64_truth(div, hs, ht, ws, bs, wt, bt, y, m, T, kd_w, lm_w):
    """Loss values and gradients (hs, ws, bs) in fp64 from the textbook reference (autograd)."""
    p = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    ce, mlm = distill_head_loss_reference(p[0], ht.double(), p[1], p[2], wt.double(), bt.double(), y, m, T,
                                          divergence=div)
    return ce, mlm, torch.autograd.grad(kd_w * ce + lm_w * mlm, p)


# ------------------------------------------------------------------------------------------------------
# 1. the math: fused formulas (divergence_rows) and the reference agree, and the reference is the textbook
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DIVS))
def test_reference_is_the_textbook_formula(name):
    # the reference against sums written out by hand in fp64, for one row
    div = DIVS[name]
    g = torch.Generator().manual_seed(1)
    a_s, a_t = torch.randn(2, 9, generator=g, dtype=torch.float64)
    p, q = a_s.softmax(-1), a_t.softmax(-1)
    c = div.param
    kl = lambda a, b: (a * (a / b).log()).sum()  # noqa: E731
    want = {"reverse_kl": lambda: kl(p, q),
            "jsd": lambda: c * kl(q, c * q + (1 - c) * p) + (1 - c) * kl(p, c * q + (1 - c) * p),
            "skew_kl": lambda: kl(q, c * q + (1 - c) * p),
            "skew_reverse_kl": lambda: kl(p, c * p + (1 - c) * q),
            "tvd": lambda: 0.5 * (p - q).abs().sum()}[div.kind]()
    got = divergence_reference(div, a_s.log_softmax(-1), a_t.log_softmax(-1))
    assert abs(got.item() - want.item()) <= 1e-14 * max(want.item(), 1e-300)


# ------------------------------------------------------------------------------------------------------
# 2. the fused head loss, every path, against fp64
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(DIVS))
@pytest.mark.parametrize("scale", [1.0, 0.05], ids=["far", "close"])
def test_divergence_head_loss_matches_fp64(name, impl, scale):
    div = DIVS[name]
    v = 1001 if impl != "triton" else 263                     # the interpreter is slow
    hs, ht, ws, bs, wt, bt, y, m = problem(v=v, scale=scale)
    T, kd_w, lm_w = 2.0, 0.7, 0.3
    ce_r, mlm_r, g_r = fp64_truth(div, hs, ht, ws, bs, wt, bt, y, m, T, kd_w, lm_w)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, T, chunk_size=7, impl=impl, kd_weight=kd_w,
                                lm_weight=lm_w, divergence=div)
    got = torch.autograd.grad(kd_w * ce + lm_w * mlm, (hs, ws, bs))
    assert ce.dtype == torch.float32 and ce.item() > 0
    assert rel(ce, ce_r) < 2e-6, (ce.item(), ce_r.item())
    assert rel(mlm, mlm_r) < 2e-6
    errs = [rel(a, b) for a, b in zip(got, g_r)]
    assert max(errs) < 1e-5, errs
    # the iit pass: no labels, the KL gradient alone (no MLM part to hide an error in)
    ce, _ = distill_head_loss(hs, ht, ws, bs, wt, bt, None, m, T, chunk_size=5, impl=impl, divergence=div)
    ce_r, _, g_r = fp64_truth(div, hs, ht, ws, bs, wt, bt, None, m, T, 1.0, 0.0)
    got = torch.autograd.grad(ce, (hs, ws, bs))
    assert rel(ce, ce_r) < 2e-6
    assert max(rel(a, b) for a, b in zip(got, g_r)) < 1e-5


@pytest.mark.parametrize("impl", ["chunked", "native"])
@pytest.mark.parametrize("name", list(DIVS))
def test_divergence_at_T1_and_fp64_chunked(name, impl):
    # T = 1 (the MLM softmax is the divergence's softmax) and fp64 inputs (impl chunked keeps fp64)
    div = DIVS[name]
    hs, ht, ws, bs, wt, bt, y, m = problem(n=17, v=301, seed=3)
    ce_r, mlm_r, g_r = fp64_truth(div, hs, ht, ws, bs, wt, bt, y, m, 1.0, 1.0, 1.0)
    ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 1.0, chunk_size=4, impl=impl, divergence=div)
    got = torch.autograd.grad(ce + mlm, (hs, ws, bs))
    assert rel(ce, ce_r) < 2e-6 and max(rel(a, b) for a, b in zip(got, g_r)) < 1e-5
    p64 = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    ce, mlm = distill_head_loss(p64[0], ht.double(), p64[1], p64[2], wt.double(), bt.double(), y, m, 1.0,
                                chunk_size=4, divergence=div)
    got = torch.autograd.grad(ce + mlm, p64)
    assert ce.dtype == torch.float64
    assert rel(ce, ce_r) < 1e-11 and max(rel(a, b) for a, b in zip(got, g_r)) < 1e-10


@pytest.mark.parametrize("name", list(DIVS))
def test_divergence_bf16_within_twice_pytorchs_own_error(name):
    # bf16 inputs: the fused op's error against fp64 at most ~2x that of PyTorch's own unfused computation
    # on the same bf16 inputs (the reference: bf16 matmuls, fp32 softmax)
    div = DIVS[name]
    hs, ht, ws, bs, wt, bt, y, m = problem(n=41, d=32, dt=32, v=1000, dtype=torch.bfloat16, seed=5)
    ce_t, mlm_t, g_t = fp64_truth(div, hs, ht, ws, bs, wt, bt, y, m, 2.0, 1.0, 1.0)
    ce_p, mlm_p = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, m, 2.0, divergence=div)
    g_p = torch.autograd.grad(ce_p + mlm_p, (hs, ws, bs))
    for impl in ("chunked", "native"):
        ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, chunk_size=16, impl=impl, divergence=div)
        g = torch.autograd.grad(ce + mlm, (hs, ws, bs))
        assert rel(ce, ce_t) < max(2 * rel(ce_p, ce_t), 1e-3), impl
        for a, p, b in zip(g, g_p, g_t):
            assert a.dtype == torch.bfloat16 and rel(a, b) < max(2 * rel(p, b), 1e-2), impl


def test_forward_kl_is_todays_op_bit_for_bit():
    # divergence=None, "forward_kl" and jsd at beta 0 run the very same code: identical bits
    hs, ht, ws, bs, wt, bt, y, m = problem(v=301)
    outs = []
    for div in (None, "forward_kl", Divergence.of("jsd", beta=0.0), Divergence.of("skew_kl", alpha=0.0)):
        kw = {} if div is None else dict(divergence=div)
        ce, mlm = distill_head_loss(hs, ht, ws, bs, wt, bt, y, m, 2.0, chunk_size=7, impl="native", **kw)
        outs.append((ce, mlm, *torch.autograd.grad(ce + mlm, (hs, ws, bs))))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_the_divergence_test_can_fail():
    # negative control: the fused reverse KL is not within the tolerance of the forward KL's truth
    hs, ht, ws, bs, wt, bt, y, m = problem(v=301)
    ce_f, _, g_f = fp64_truth(Divergence(), hs, ht, ws, bs, wt, bt, None, m, 2.0, 1.0, 0.0)
    ce, _ = distill_head_loss(hs, ht, ws, bs, wt, bt, None, m, 2.0, impl="native", divergence="reverse_kl")
    got = torch.autograd.grad(ce, (hs, ws, bs))
    assert rel(ce, ce_f) > 1e-3 and max(rel(a, b) for a, b in zip(got, g_f)) > 1e-3


# ------------------------------------------------------------------------------------------------------
# 3. jsd: its ends, and TRL as an independent oracle
# ------------------------------------------------------------------------------------------------------

def test_jsd_ends_are_forward_and_reverse_kl():
    assert Divergence.of("jsd", beta=0.0) == Divergence.of("forward_kl")
    assert Divergence.of("jsd", beta=1.0) == Divergence.of("reverse_kl")
    assert Divergence.of("skew_reverse_kl", alpha=0.0) == Divergence.of("reverse_kl")
    hs, ht, ws, bs, wt, bt, y, m = problem(v=301)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = distill_head_loss(hs, ht, ws, bs, wt, bt, None, m, 2.0, impl="native", divergence=Divergence.of("jsd", beta=beta))[0]
        b = distill_head_loss_reference(hs.double(), ht.double(), ws.double(), bs.double(), wt.double(),
                                        bt.double(), None, m, 2.0, divergence=Divergence.of(kind))[0]
        assert rel(a, b) < 2e-6
    # and nearby: continuous from inside only as TRL defines it (the formula tends to 0 at both ends)
    near = Divergence.of("jsd", beta=1e-4)
    assert distill_head_loss(hs, ht, ws, bs, wt, bt, None, m, 2.0, impl="native", divergence=near)[0] < 1e-2


def _trl_gkd():
    import os
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError as e:
            pytest.skip(f"TRL is not installed (test-only dependency: pip install trl): {e}")
    return GKDTrainer


@pytest.mark.parametrize("impl", ["reference", "chunked", "native", "triton"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd_loss(beta, impl):
    # the same logits through TRL's GKDTrainer.generalized_jsd_loss (its reduction "sum" over N tokens; it has
    # no T^2 factor) and through the fused op with an identity decoder (the hidden states are the logits);
    # the gradient w.r.t. the student logits by autograd through TRL's code
    gkd = _trl_gkd()
    g = torch.Generator().manual_seed(2)
    n, v, T = 9, 257, 1.5
    z_t = torch.randn(n, v, generator=g) * 2
    z_s = (z_t + torch.randn(n, v, generator=g)).requires_grad_()
    trl = gkd.generalized_jsd_loss(z_s[None], z_t[None], beta=beta, temperature=T, reduction="sum") / n
    (g_trl,) = torch.autograd.grad(trl, z_s)
    hs = z_s.detach().clone().requires_grad_()
    eye = torch.eye(v)
    ce, _ = distill_head_loss(hs, z_t, eye, None, eye, None, None, None, T, impl=impl,
                              divergence=Divergence.of("jsd", beta=beta))
    (g_ours,) = torch.autograd.grad(ce / T ** 2, hs)
    assert rel(ce / T ** 2, trl) < 1e-5, (ce.item() / T ** 2, trl.item())
    assert rel(g_ours, g_trl) < 1e-4


# ------------------------------------------------------------------------------------------------------
# 4. sparse top-k targets: the divergence between the (K + 1)-bucket distributions
# ------------------------------------------------------------------------------------------------------

def sparse_problem(n=19, d=11, v=211, k=17, seed=4):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_()
    ws = torch.randn(v, d, generator=g).requires_grad_()
    bs = (torch.randn(v, generator=g) * 0.3).requires_grad_()
    z_t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    lq = torch.log_softmax(z_t / 2.0, -1)
    top = lq.topk(k, -1)
    in_top = torch.zeros(n, v, dtype=torch.bool).scatter_(1, top.indices, True)
    rest = torch.logsumexp(lq.masked_fill(in_top, -math.inf), -1) if k < v else torch.full((n,), -math.inf)
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = -100
    return hs, ws, bs, top.values.float(), top.indices, rest.float(), y


def bucket_truth(div, hs, ws, bs, logp, ids, rest, y, T):
    """fp64: the student's bucket log-probs by logsumexp, the teacher's renormalised, the textbook D."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hs, ws, bs))
    z = h @ w.t() + b
    lp = torch.log_softmax(z / T, -1)
    k, v = ids.shape[1], z.shape[1]
    lp_b = lp.gather(1, ids)
    lq_b = logp.double()
    if k < v:
        in_top = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, ids, True)
        lp_b = torch.cat([lp_b, torch.logsumexp(lp.masked_fill(in_top, -math.inf), 1, keepdim=True)], 1)
        lq_b = torch.cat([lq_b, rest.double()[:, None]], 1)
    lq_b = lq_b - torch.logsumexp(lq_b, 1, keepdim=True)
    ce = T * T * divergence_reference(div, lp_b, lq_b).mean()
    mlm = F.cross_entropy(z, y, ignore_index=-100)
    return ce, mlm, torch.autograd.grad(0.6 * ce + 0.4 * mlm, (h, w, b))


@pytest.mark.parametrize("k", [17, 211], ids=["topk", "k_eq_v"])
@pytest.mark.parametrize("name", list(DIVS))
def test_sparse_divergence_matches_fp64(name, k):
    div = DIVS[name]
    hs, ws, bs, logp, ids, rest, y = sparse_problem(k=k)
    ce_r, mlm_r, g_r = bucket_truth(div, hs, ws, bs, logp, ids, rest, y, 2.0)
    for impl in ("chunked", "reference"):
        ce, mlm = sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, y, 2.0, chunk_size=6, impl=impl,
                                           kd_weight=0.6, lm_weight=0.4, divergence=div)
        got = torch.autograd.grad(0.6 * ce + 0.4 * mlm, (hs, ws, bs))
        assert rel(ce, ce_r) < 2e-6, (impl, ce.item(), ce_r.item())
        assert max(rel(a, b) for a, b in zip(got, g_r)) < 1e-5, impl


@pytest.mark.parametrize("name", list(DIVS))
def test_sparse_divergence_with_k_eq_v_is_the_dense_one(name):
    # K = V: the rest bucket is empty on both sides and the bucket divergence is the full one
    div = DIVS[name]
    hs, ws, bs, logp, ids, rest, y = sparse_problem(k=211)
    z_t = torch.full((hs.shape[0], 211), -math.inf).scatter_(1, ids, logp) * 2.0   # logits at T = 2
    dense = divergence_loss_reference(div, (hs @ ws.t() + bs).double(), z_t.double(), None, 2.0)
    ce, _ = sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, None, 2.0, divergence=div)
    assert rel(ce, dense) < 2e-6


# ------------------------------------------------------------------------------------------------------
# 5. the step: fast == naive for every divergence (masked and causal), ce and iit set separately
# ------------------------------------------------------------------------------------------------------

STEP_DIVS = [("reverse_kl", "jsd"), ("jsd", "skew_kl"), ("skew_reverse_kl", "tvd"), ("tvd", "reverse_kl")]


@pytest.mark.parametrize("ce_div,iit_div", STEP_DIVS, ids=["-".join(p) for p in STEP_DIVS])
@pytest.mark.parametrize("logit_tokens", ["all", "masked"])
def test_fast_equals_naive_masked_every_divergence(ce_div, iit_div, logit_tokens):
    teacher, student = tiny_pair(teacher_layers=4, student_layers=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # unit-scale decoder bias offsets: divergences ~1, not ~1e-2 (see test_step's fused test)
        for model in (teacher, student):
            model.decoder_bias.add_(torch.randn(model.decoder_bias.shape, generator=g))
    batch = tiny_batch((9, 5, 7, 3))
    plan = sample_plan(batch["attention_mask"], make_alignment("middle", 4, 2), torch.Generator().manual_seed(0))
    kw = dict(ops="reference", logit_tokens=logit_tokens, ce_divergence=ce_div, iit_divergence=iit_div,
              jsd_beta=0.3, skew_alpha=0.2)
    naive = run(teacher, student, batch, plan, DistillConfig(mode="naive", **kw))
    fast = run(teacher, student, batch, plan, DistillConfig(mode="fast", **kw))
    assert all(v > 0 for v in naive[0].terms.values())
    assert_same_step(naive, fast)
    # the fused ops give the same step
    fused = run(teacher, student, batch, plan, DistillConfig(mode="fast", **(kw | dict(ops="fused", head_chunk=7))))
    assert_same_step(naive, fused)
    # and the divergence is what the terms are: forward KL gives other values (the test can fail)
    fwd = run(teacher, student, batch, plan, DistillConfig(mode="naive", ops="reference", logit_tokens=logit_tokens))
    assert abs(fwd[0].terms["ce"] - naive[0].terms["ce"]) > 1e-4 * naive[0].terms["ce"]


@pytest.mark.parametrize("ce_div,iit_div", STEP_DIVS + [("jsd", "jsd")], ids=["-".join(p) for p in STEP_DIVS + [("jsd", "jsd")]])
@pytest.mark.parametrize("logit_tokens", ["affected", "all"])
def test_fast_equals_naive_causal_every_divergence(ce_div, iit_div, logit_tokens):
    from test_step_decoder import causal_batch, causal_pair, naive_and_fast, plan_for
    teacher, student = causal_pair("gpt2")
    batch = causal_batch(left=True)
    plan = plan_for(batch, "full", 2)
    kw = dict(logit_tokens=logit_tokens, ce_divergence=ce_div, iit_divergence=iit_div, jsd_beta=0.7, skew_alpha=0.3)
    naive, fast = naive_and_fast(teacher, student, batch, plan, **kw)
    assert_same_step(naive, fast)
    fused = run(teacher, student, batch, plan, DistillConfig(mode="fast", ops="fused", head_chunk=7, w_iit_cos=0.3,
                                                             w_mse=0.2, **kw))
    assert_same_step(naive, fused)


@pytest.mark.parametrize("ce_div,iit_div", [("jsd", "reverse_kl"), ("skew_reverse_kl", "tvd"), ("tvd", "skew_kl")],
                         ids=["jsd-reverse_kl", "skew_reverse_kl-tvd", "tvd-skew_kl"])
def test_cached_step_equals_online_step_every_divergence(tmp_path, ce_div, iit_div):
    # a teacher cache with K = V, fp32: the sparse loss's buckets are the vocabulary, so the cached step with
    # each divergence is the online fast step with it
    from iit_fast.cached_step import CacheBatches, cached_distill_step
    from iit_fast.step import distill_step
    from iit_fast.teacher_cache import TeacherCache
    from test_teacher_cache import assert_same, build, save_teacher, student_of
    from test_teacher_cache import run as run_fn
    teacher_dir = save_teacher(tmp_path / "teacher")
    build(teacher_dir, tmp_path / "c")
    cache = TeacherCache.open(tmp_path / "c")
    teacher, student = student_of(teacher_dir)
    cfg = DistillConfig(ops="fused", ce_divergence=ce_div, iit_divergence=iit_div, jsd_beta=0.4, skew_alpha=0.2)
    for cb in list(CacheBatches(cache, 4, seed=0))[:2]:
        ((_, plan),) = cb.groups()
        cached = run_fn(lambda: cached_distill_step(student, cb, cfg), student)
        online = run_fn(lambda: distill_step(teacher, student, cb.batch, plan, cfg), student)
        assert all(v > 0 for v in cached[0].terms.values())
        assert_same(cached, online)


# ------------------------------------------------------------------------------------------------------
# 6. bad input
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("jsd_beta", 1.5), ("jsd_beta", -0.1), ("jsd_beta", float("nan")),
                                         ("skew_alpha", 1.0), ("skew_alpha", -1e-3)])
def test_beta_and_alpha_out_of_range_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"DistillConfig.{field} must be in"):
        DistillConfig(**{field: value})


def test_unknown_divergence_names_the_field():
    with pytest.raises(ValueError, match="DistillConfig.iit_divergence must be one of"):
        DistillConfig(iit_divergence="kl")
    with pytest.raises(ValueError, match="beta must be in"):
        Divergence.of("jsd", beta=2.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        Divergence.of("skew_kl", alpha=1.0)


@pytest.mark.parametrize("flags,field", [(["--jsd_beta", "1.5"], "jsd_beta"), (["--skew_alpha", "1"], "skew_alpha"),
                                         (["--ce_divergence", "kl"], "ce_divergence")])
def test_train_cli_bad_divergence_flags_one_error_line_exit_2(tmp_path, capsys, flags, field):
    from iit_fast.train import main
    with pytest.raises(SystemExit) as e:
        main(flags + ["--out_dir", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: DistillConfig.{field} must be")
    assert not (tmp_path / "out").exists()


def test_config_gives_each_term_its_divergence():
    cfg = DistillConfig(ce_divergence="jsd", iit_divergence="skew_reverse_kl", jsd_beta=0.25, skew_alpha=0.4)
    assert cfg.divergence("ce") == Divergence("jsd", 0.25)
    assert cfg.divergence("iit") == Divergence("skew_reverse_kl", 0.4)
    assert DistillConfig().divergence("ce") == Divergence() == DistillConfig().divergence("iit")
