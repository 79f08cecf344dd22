"""The offline teacher cache (issue 16): the sparse top-k KL op against its reference and the dense KL, the
cached step against the online fast step (equal at K = V, fp32), the approximation error at smaller K, the
batches (pairs kept together, plans drawn per epoch, resumable), and bad input: another teacher /
tokenizer / corpus / max_length / k refused naming the field, missing or truncated shards found before
training, a full disk failing cleanly and the next build resuming."""
from __future__ import annotations

import errno
import json
import os
import re

import pytest
import torch

from iit_fast import teacher_cache as tc
from iit_fast.cached_step import CacheBatches, CachedDistillStep, cached_distill_step, collate_pairs
from iit_fast.config import DistillConfig
from iit_fast.models import IntervenableLM, load_model
from iit_fast.models.student import init_student_from_teacher
from iit_fast.ops.head_loss.reference import distill_head_loss_reference
from iit_fast.ops.head_loss.sparse import sparse_distill_head_loss, sparse_distill_head_loss_reference
from iit_fast.step import distill_step
from iit_fast import cache_builder as cb_lib
from iit_fast.cache_builder import build_cache
from iit_fast.teacher_cache import CacheOptions, TeacherCache, fingerprint_fields
from tiny import tiny_bert, tiny_bert_tokenizer

RTOL = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------------

def sparse_targets(n=37, d=16, v=97, k=16, T=2.0, seed=0, dtype=torch.float32):
    """Student tensors (with grad) and the top-k targets of a random teacher: (hs, ws, bs, logp, ids, rest, y,
    (ht, wt, bt))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(dtype)  # noqa: E731
    hs, ws, bs = r(n, d).requires_grad_(), r(v, d, sc=0.5).requires_grad_(), r(v, sc=0.1).requires_grad_()
    ht, wt, bt = r(n, d), r(v, d, sc=0.5), r(v, sc=0.1)
    logq = torch.log_softmax((ht @ wt.t() + bt).double() / T, -1)                # (n, v) exact teacher
    top = logq.topk(k, -1)
    rest = torch.logsumexp(logq.scatter(1, top.indices, float("-inf")), -1) if k < v else \
        torch.full((n,), float("-inf"), dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) > 0.3] = -100
    return hs, ws, bs, top.values.to(dtype), top.indices.int(), rest.to(dtype), y, (ht, wt, bt)


@pytest.mark.parametrize("k", [1, 16, 97])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("labels", [True, False])
def test_sparse_matches_reference(k, T, chunk, labels):
    hs, ws, bs, logp, ids, rest, y, _ = sparse_targets(k=k, T=T)
    y = y if labels else None
    kw = dict(kd_weight=0.25, lm_weight=0.5)
    ce_r, mlm_r = sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, y, T, impl="reference", **kw)
    ce, mlm = sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, y, T, chunk_size=chunk, **kw)
    assert ce.dtype == torch.float32 and ce_r > 0
    assert rel(ce, ce_r) < RTOL and (rel(mlm, mlm_r) < RTOL if labels else mlm == 0)
    g_r = torch.autograd.grad(0.25 * ce_r + 0.5 * mlm_r, (hs, ws, bs))
    g = torch.autograd.grad(0.25 * ce + 0.5 * mlm, (hs, ws, bs))
    for a, b in zip(g, g_r):
        assert rel(a, b) < RTOL


def test_sparse_gradient_of_one_term_recomputes():
    """grad of ce alone (grad_outputs not proportional to the weights) takes the recompute path."""
    hs, ws, bs, logp, ids, rest, y, _ = sparse_targets()
    ce_r, _ = sparse_distill_head_loss_reference(hs, ws, bs, logp, ids, rest, y)
    ce, _ = sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, y, kd_weight=0.25, lm_weight=0.25)
    for a, b in zip(torch.autograd.grad(ce, (hs, ws, bs)), torch.autograd.grad(ce_r, (hs, ws, bs))):
        assert rel(a, b) < RTOL


@pytest.mark.parametrize("chunk", [None, 7])
def test_sparse_with_all_k_is_the_dense_kl(chunk):
    hs, ws, bs, logp, ids, rest, y, (ht, wt, bt) = sparse_targets(k=97)
    ce_d, mlm_d = distill_head_loss_reference(hs, ht, ws, bs, wt, bt, y, None, 2.0)
    ce, mlm = sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, y, 2.0, chunk_size=chunk)
    assert rel(ce, ce_d) < RTOL and rel(mlm, mlm_d) < RTOL
    for a, b in zip(torch.autograd.grad(ce + mlm, (hs, ws, bs)), torch.autograd.grad(ce_d + mlm_d, (hs, ws, bs))):
        assert rel(a, b) < RTOL
    # the top 96 + a rest bucket of one id is exact too; without the rest (its mass dropped) it is not
    hs2, ws2, bs2, logp2, ids2, rest2, *_ = sparse_targets(k=96)
    ce96, _ = sparse_distill_head_loss(hs2, ws2, bs2, logp2, ids2, rest2, None, 2.0)
    assert rel(ce96, ce_d) < RTOL
    ce96, _ = sparse_distill_head_loss(hs2, ws2, bs2, logp2, ids2, torch.full_like(rest2, float("-inf")), None, 2.0)
    assert rel(ce96, ce_d) > 1e-3


def test_sparse_kl_is_zero_for_the_teacher_itself():
    """A student whose logits are the teacher's has bucket KL 0 for any k, and the KL is never negative."""
    _, _, _, logp, ids, rest, _, (ht, wt, bt) = sparse_targets(k=16)
    ce, _ = sparse_distill_head_loss(ht, wt, bt, logp, ids, rest, None, 2.0)
    assert abs(ce.item()) < 1e-6
    hs, ws, bs, *_ = sparse_targets(k=16, seed=3)
    ce_other, _ = sparse_distill_head_loss(hs.detach(), ws.detach(), bs.detach(), logp, ids, rest, None, 2.0)
    assert ce_other > 1e-2


def test_sparse_fp16_targets_and_bf16_autocast():
    hs, ws, bs, logp, ids, rest, y, _ = sparse_targets(k=16)
    ce32, _ = sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, y)
    ce16, _ = sparse_distill_head_loss(hs, ws, bs, logp.half(), ids, rest, y)
    assert rel(ce16, ce32) < 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce_bf, mlm_bf = sparse_distill_head_loss(hs, ws, bs, logp.half(), ids, rest, y)
    assert ce_bf.dtype == torch.float32 and rel(ce_bf, ce32) < 5e-2
    (ce_bf + mlm_bf).backward()
    assert ws.grad.dtype == torch.float32 and torch.isfinite(ws.grad).all()


def test_sparse_without_labelled_rows_and_without_rows():
    hs, ws, bs, logp, ids, rest, y, _ = sparse_targets(k=16)
    ce, mlm = sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, torch.full_like(y, -100), chunk_size=4)
    ce_r, _ = sparse_distill_head_loss_reference(hs, ws, bs, logp, ids, rest, None)
    assert mlm == 0 and rel(ce, ce_r) < RTOL
    ce0, mlm0 = sparse_distill_head_loss(hs[:0], ws, bs, logp[:0], ids[:0], rest[:0], y[:0])
    assert ce0 == 0 and mlm0 == 0
    ce0.backward()
    assert ws.grad is not None and (ws.grad == 0).all()


def test_sparse_bad_input_names_the_argument():
    hs, ws, bs, logp, ids, rest, y, _ = sparse_targets(k=16)
    with pytest.raises(ValueError, match="teacher_ids"):
        sparse_distill_head_loss(hs, ws, bs, logp, ids[:, :3], rest, y)
    with pytest.raises(ValueError, match="teacher_rest"):
        sparse_distill_head_loss(hs, ws, bs, logp, ids, rest[:3], y)
    with pytest.raises(ValueError, match="teacher_logp"):
        sparse_distill_head_loss(hs, ws, bs, logp[:3], ids, rest, y)
    with pytest.raises(ValueError, match="impl"):
        sparse_distill_head_loss(hs, ws, bs, logp, ids, rest, y, impl="triton")


# ---------------------------------------------------------------------------------------------------------
# Building and reading
# ---------------------------------------------------------------------------------------------------------

V = 97


def save_teacher(folder, vocab=V, seed=0, shuffle_seed=None, layers=4):
    tiny_bert(layers=layers, vocab=vocab, seed=seed).save_pretrained(folder)
    tiny_bert_tokenizer(vocab, shuffle_seed=shuffle_seed).save_pretrained(folder)
    return str(folder)


def corpus(n=20, vocab=V, seed=0, longest=20):
    import datasets
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(6, longest + 1, (1,), generator=g))
        rows.append([2] + torch.randint(6, vocab, (k - 2,), generator=g).tolist() + [3])   # [CLS] ... [SEP]
    return datasets.Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})


def options(**kw):
    base = dict(max_length=32, top_k=V, plans=2, hidden=True, values="float32", hidden_dtype="float32",
                student_layers=2, shard_pairs=3)
    return CacheOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher"))


def build(teacher_dir, out, ds=None, **kw):
    return build_cache(teacher_dir, corpus() if ds is None else ds, out, options(**kw), progress=False)


def student_of(teacher_dir, layers=2, seed=1):
    teacher, _ = load_model(teacher_dir, kind="masked")
    torch.manual_seed(seed)
    student = IntervenableLM(init_student_from_teacher(teacher.model, layers)).train()
    with torch.no_grad():  # not a copy: every loss non-zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher.eval(), student


def run(fn, student):
    student.zero_grad(set_to_none=True)
    out = fn()
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=RTOL):
    (out_a, g_a), (out_b, g_b) = a, b
    assert out_a.terms.keys() == out_b.terms.keys()
    for k in out_a.terms:
        torch.testing.assert_close(out_a.terms[k], out_b.terms[k], rtol=rtol, atol=0, msg=f"term {k}")
    assert g_a.keys() == g_b.keys()
    scale = max(g.abs().max() for g in g_b.values())  # as tests/test_step.py: rounding noise of ~0 gradients
    for n in g_a:
        err = (g_a[n] - g_b[n]).norm() / g_b[n].norm().clamp_min(1e-3 * scale)
        assert err <= rtol, f"gradient of {n}: relative error {err:.2e}"


@pytest.mark.parametrize("ops", ["reference", "fused"])
@pytest.mark.parametrize("logit_tokens", ["all", "masked"])
def test_cached_step_equals_online_step(tmp_path, teacher_dir, ops, logit_tokens):
    """K = V, fp32 values: the cached step's terms and gradients are the online fast step's, with the same
    pairing, masks and plans (the batch and plan the cache hands out)."""
    build(teacher_dir, tmp_path / "c", logit_tokens=logit_tokens)
    cache = TeacherCache.open(tmp_path / "c")
    teacher, student = student_of(teacher_dir)
    cfg = DistillConfig(ops=ops, logit_tokens=logit_tokens)
    batches = CacheBatches(cache, 4, seed=0)
    for cb in list(batches)[:3]:
        ((_, plan),) = cb.groups()
        cached = run(lambda: cached_distill_step(student, cb, cfg), student)
        online = run(lambda: distill_step(teacher, student, cb.batch, plan, cfg), student)
        assert set(cached[0].terms) == {"ce", "mlm", "cos", "iit"} and all(v > 0 for v in cached[0].terms.values())
        assert_same(cached, online)
    # and the comparison can fail: another plan's counterfactual targets
    other = collate_pairs(cache, [0, 1], [1, 1])
    wrong = collate_pairs(cache, [0, 1], [0, 0])
    wrong.cf = other.cf
    ((_, plan),) = collate_pairs(cache, [0, 1], [0, 0]).groups()
    with pytest.raises(AssertionError):
        assert_same(run(lambda: cached_distill_step(student, wrong, cfg), student),
                    run(lambda: distill_step(teacher, student, wrong.batch, plan, cfg), student))


def test_several_alignment_pairs_resume_per_group(tmp_path, teacher_dir):
    """alignment 'full' (two pairs for a 2-layer student): the batch splits into sub-batches of whole pairs;
    iit is the token-weighted mean of the online step's iit on each, the other terms the whole batch's."""
    build(teacher_dir, tmp_path / "c", alignment="full", plans=3)
    cache = TeacherCache.open(tmp_path / "c")
    teacher, student = student_of(teacher_dir)
    cfg = DistillConfig(ops="fused", w_ce=0.3, w_mlm=0.2, w_cos=0.1, w_iit=0.4)
    cb = next(cb for cb in CacheBatches(cache, 8, seed=0) if len(cb.groups()) > 1)
    cached = run(lambda: cached_distill_step(student, cb, cfg), student)

    def online():
        full = distill_step(teacher, student, cb.batch, None, DistillConfig(ops="fused", mode="standard", w_ce=0.3,
                                                                             w_mlm=0.2, w_cos=0.1, w_iit=0.4))
        n = cb.kd_mask().sum()
        iit = 0
        for rows, plan in cb.groups():
            sub = {k: v[rows] for k, v in cb.batch.items()}
            out = distill_step(teacher, student, sub, plan, DistillConfig(ops="fused", w_ce=0, w_mlm=0, w_cos=0,
                                                                           w_iit=1.0))
            iit = iit + out.loss * sub["attention_mask"].sum() / n
        full.terms["iit"] = iit.detach()
        full.loss = full.loss + 0.4 * iit
        return full

    assert_same(cached, run(online, student))


@pytest.mark.parametrize("peaked", [False, True])
def test_approximation_error_decreases_with_k(tmp_path, peaked):
    """The sparse KL against the exact one (K = V) on a tiny model with V = 512: the error of ce and iit
    falls as k grows (16, 64, 256) and is 0 at K = V. A random teacher is nearly uniform at T = 2 (the top k
    hold little of its mass: large errors); `peaked` gives its decoder a Zipf-like bias, -3 log(rank), closer
    to a trained MLM's long tail."""
    vocab = 512
    folder = tmp_path / "t"
    model = tiny_bert(layers=4, vocab=vocab)
    if peaked:
        with torch.no_grad():
            rank = torch.randperm(vocab, generator=torch.Generator().manual_seed(0)).double() + 1
            model.cls.predictions.bias.copy_(-3.0 * rank.log())
    model.save_pretrained(folder)
    tiny_bert_tokenizer(vocab).save_pretrained(folder)
    ds = corpus(8, vocab=vocab)
    teacher, student = student_of(folder)
    cfg = DistillConfig(w_cos=0)
    terms = {}
    for k in (16, 64, 256, vocab):
        build_cache(folder, ds, tmp_path / f"k{k}", options(top_k=k, plans=1, hidden=False, shard_pairs=8),
                    progress=False)
        cache = TeacherCache.open(tmp_path / f"k{k}")
        cb = collate_pairs(cache, list(range(cache.num_pairs)), [0] * cache.num_pairs)
        with torch.no_grad():
            terms[k] = cached_distill_step(student, cb, cfg).terms
    err = {k: {t: abs(terms[k][t] - terms[vocab][t]).item() / terms[vocab][t].item() for t in ("ce", "iit")}
           for k in (16, 64, 256)}
    print(f"relative error of the sparse KL (ce, iit) by k, {'peaked' if peaked else 'random'} teacher:", err)
    for t in ("ce", "iit"):
        assert err[16][t] > err[64][t] > err[256][t] > 0
    with torch.no_grad():
        exact = distill_step(teacher, student, cb.batch, cb.groups()[0][1], cfg).terms
    assert abs(terms[vocab]["ce"] - exact["ce"]) / exact["ce"] < RTOL


def test_masks_and_pairs_are_part_of_the_example(tmp_path, teacher_dir):
    from iit_fast.batches import Collate
    ds = corpus()
    build(teacher_dir, tmp_path / "c", ds=ds)
    cache = TeacherCache.open(tmp_path / "c")
    _, tok = load_model(teacher_dir)
    collate = Collate(tok, mlm_probability=0.15, pad_to_multiple_of=1)
    pairs = cb_lib.pairing(len(ds), 0)
    for p in range(cache.num_pairs):
        got = cache.read_pair(p, 0)
        for r in range(2):
            row = int(pairs[p, r])
            want = collate([ds[row]["input_ids"]], torch.Generator().manual_seed(tc.derived_seed("mask", 0, row)))
            assert torch.equal(got["input_ids"][r], want["input_ids"][0])
            assert torch.equal(got["labels"][r], want["labels"][0])
    # another seed: other masks and other pairs
    build(teacher_dir, tmp_path / "c1", ds=ds, seed=1)
    other = TeacherCache.open(tmp_path / "c1")
    assert not all(torch.equal(cache.read_pair(p, 0)["labels"][0], other.read_pair(p, 0)["labels"][0])
                   for p in range(cache.num_pairs))


def test_batches_keep_pairs_draw_plans_per_epoch_and_resume(tmp_path, teacher_dir):
    build(teacher_dir, tmp_path / "c", plans=3)
    cache = TeacherCache.open(tmp_path / "c")
    b = CacheBatches(cache, 4, seed=0)
    e0 = list(b)
    e1 = list(b)
    assert len(e0) == len(e1) == cache.num_pairs // 2
    for cb in e0:
        assert torch.equal(cb.pi, torch.tensor([1, 0, 3, 2]))
        assert (cb.align[0::2] == cb.align[1::2]).all()          # a pair shares its plan's alignment
    draws = [[b.plan_of(e, p) for p in range(cache.num_pairs)] for e in range(4)]
    assert len({tuple(d) for d in draws}) > 1 and all(0 <= m < 3 for d in draws for m in d)
    assert draws[0] == [CacheBatches(cache, 4, seed=0).plan_of(0, p) for p in range(cache.num_pairs)]
    # resumed after one batch: the same next batch
    b2 = CacheBatches(cache, 4, seed=0)
    it = iter(b2)
    next(it)
    b3 = CacheBatches(cache, 4, seed=0)
    b3.load_state_dict(b2.state_dict())
    assert torch.equal(next(iter(b3)).batch["input_ids"], e0[1].batch["input_ids"])
    # two ranks see disjoint batches
    r0, r1 = CacheBatches(cache, 2, seed=0, rank=0, world_size=2), CacheBatches(cache, 2, seed=0, rank=1, world_size=2)
    assert not set(r0.epoch_batches(0).flatten().tolist()) & set(r1.epoch_batches(0).flatten().tolist())
    with pytest.raises(ValueError, match="batch_size"):
        CacheBatches(cache, 3, seed=0)


def test_cached_step_module_for_the_engine(tmp_path, teacher_dir):
    """CachedDistillStep: the student its only submodule (no teacher), forward(cb) -> (loss, terms)."""
    build(teacher_dir, tmp_path / "c")
    cache = TeacherCache.open(tmp_path / "c")
    _, student = student_of(teacher_dir)
    module = CachedDistillStep(student, DistillConfig())
    assert [n for n, _ in module.named_children()] == ["student"]
    cb = collate_pairs(cache, [0, 1], [0, 1])
    loss, terms = module(cb)
    want = cached_distill_step(student, cb, DistillConfig())
    torch.testing.assert_close(loss, want.loss, rtol=0, atol=0)
    assert terms.keys() == want.terms.keys() and all(not v.requires_grad for v in terms.values())


def test_cached_step_under_bf16_autocast(tmp_path, teacher_dir):
    build(teacher_dir, tmp_path / "c", top_k=16, values="float16", hidden_dtype="bfloat16")
    cache = TeacherCache.open(tmp_path / "c")
    _, student = student_of(teacher_dir)
    cb = collate_pairs(cache, [0, 1], [0, 1])
    f32 = run(lambda: cached_distill_step(student, cb, DistillConfig()), student)
    bf16 = run(lambda: cached_distill_step(student, cb, DistillConfig(student_autocast="bfloat16")), student)
    for k in f32[0].terms:
        assert abs(bf16[0].terms[k] - f32[0].terms[k]) <= 0.05 * f32[0].terms[k], k
    for n, g in f32[1].items():
        assert bf16[1][n].dtype == torch.float32 and torch.isfinite(bf16[1][n]).all()


def test_step_refuses_what_the_cache_does_not_hold(tmp_path, teacher_dir):
    build(teacher_dir, tmp_path / "c", hidden=False)
    cache = TeacherCache.open(tmp_path / "c")
    _, student = student_of(teacher_dir)
    cb = collate_pairs(cache, [0], [0])
    for cfg, field in ((DistillConfig(), "w_cos"), (DistillConfig(w_cos=0, logit_tokens="masked"), "logit_tokens"),
                       (DistillConfig(w_cos=0, temperature=1.0), "temperature"),
                       (DistillConfig(w_cos=0, w_mse=0.1), "w_mse"), (DistillConfig(w_cos=0, mode="naive"), "mode")):
        with pytest.raises(ValueError, match=field):
            cached_distill_step(student, cb, cfg)


@pytest.mark.parametrize("field", ["teacher", "tokenizer", "corpus", "max_length", "top_k"])
def test_another_build_is_refused_naming_the_field(tmp_path, teacher_dir, field):
    ds = corpus()
    build(teacher_dir, tmp_path / "c", ds=ds)
    t_dir, opts = teacher_dir, options()
    if field == "teacher":
        t_dir = save_teacher(tmp_path / "t2", seed=5)
    elif field == "tokenizer":
        t_dir = save_teacher(tmp_path / "t3", shuffle_seed=1)
    elif field == "corpus":
        ds = corpus(seed=9)
    elif field == "max_length":
        opts = options(max_length=64)
    else:
        opts = options(top_k=16)
    teacher, tok = load_model(t_dir)
    from iit_fast.sampling import make_alignment
    expect = fingerprint_fields(teacher_path=t_dir, tokenizer=tok, tokenized_split=ds, opts=opts,
                                alignment=make_alignment(opts.alignment, teacher.num_layers, opts.student_layers))
    with pytest.raises(ValueError, match=f"another {field} "):
        TeacherCache.open(tmp_path / "c", expect=expect)
    with pytest.raises(ValueError, match=f"another {field} "):  # a build into it is refused the same way
        build_cache(t_dir, ds, tmp_path / "c", opts, progress=False)
    # a run's fingerprint (the fields the run determines) names the field the same way; its own opens it
    run = tc.run_fingerprint(teacher_path=t_dir, tokenizer=tok, tokenized_split=ds, opts=opts,
                             alignment=TeacherCache.open(tmp_path / "c").alignment, also=("top_k",))
    with pytest.raises(ValueError, match=f"another {field} "):
        TeacherCache.open(tmp_path / "c", expect=run)
    TeacherCache.open(tmp_path / "c", expect=tc.run_fingerprint(
        teacher_path=teacher_dir, tokenizer=load_model(teacher_dir)[1], tokenized_split=corpus(),
        opts=CacheOptions(max_length=32, student_layers=2), alignment=TeacherCache.open(tmp_path / "c").alignment))
    same = fingerprint_fields(teacher_path=teacher_dir, tokenizer=load_model(teacher_dir)[1], tokenized_split=corpus(),
                              opts=options(), alignment=TeacherCache.open(tmp_path / "c").alignment)
    TeacherCache.open(tmp_path / "c", expect=same)


def test_missing_or_truncated_shard_is_found_before_training(tmp_path, teacher_dir):
    build(teacher_dir, tmp_path / "c")
    TeacherCache.open(tmp_path / "c", verify="full")
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="shard 1 .*truncated"):
        TeacherCache.open(tmp_path / "c")
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))                    # same size, one bit flipped
    TeacherCache.open(tmp_path / "c")                                        # the size check passes...
    with pytest.raises(ValueError, match="shard 1 .*corrupt"):
        TeacherCache.open(tmp_path / "c", verify="full")                     # ...the checksum does not
    (tmp_path / "c" / "shard-00002.json").unlink()
    with pytest.raises(ValueError, match="shard 1 |shard 2 .*missing"):
        TeacherCache.open(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="cache.json"):
        TeacherCache.open(tmp_path)


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("shard-")}


def test_full_disk_fails_cleanly_and_the_next_build_resumes(tmp_path, teacher_dir, monkeypatch):
    build(teacher_dir, tmp_path / "clean")
    real = cb_lib._write_bytes

    def full_disk(path, data):
        if path.name == "shard-00002.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(cb_lib, "_write_bytes", full_disk)
    with pytest.raises(cb_lib.CacheWriteError, match="disk is full.*2 of 4 shards are complete"):
        build(teacher_dir, tmp_path / "c")
    kept = shard_bytes(tmp_path / "c")
    assert set(kept) == {f"shard-0000{i}.{x}" for i in (0, 1) for x in ("json", "safetensors")}  # no partial file
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp" in p.name]
    with pytest.raises(ValueError, match="shard 2 .*missing"):
        TeacherCache.open(tmp_path / "c")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    monkeypatch.setattr(cb_lib, "_write_bytes", real)
    build(teacher_dir, tmp_path / "c")
    assert all((tmp_path / "c" / n).stat().st_mtime_ns == t for n, t in mtimes.items() if n.startswith("shard"))
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "clean")
    TeacherCache.open(tmp_path / "c", verify="full")


def test_ranks_split_the_shards(tmp_path, teacher_dir):
    build(teacher_dir, tmp_path / "one")
    ds = corpus()
    build_cache(teacher_dir, ds, tmp_path / "two", options(), rank=1, world_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "two").glob("shard-*.json")) == ["shard-00001.json", "shard-00003.json"]
    with pytest.raises(ValueError, match="shard 0 .*missing"):
        TeacherCache.open(tmp_path / "two")
    build_cache(teacher_dir, ds, tmp_path / "two", options(), rank=0, world_size=2, progress=False)
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "cache.json").read_text())["num_shards"] == 4


def test_cli_cache_teacher(tmp_path, teacher_dir, capsys):
    from iit_fast.cli import main
    text = "\n\n".join(" ".join(f"w{(7 * i + j) % 80}" for j in range(5 + i % 9)) for i in range(60))
    (tmp_path / "train.txt").write_text(text + "\n")
    (tmp_path / "validation.txt").write_text(text[:200] + "\n")
    args = ["cache-teacher", "--teacher", teacher_dir, "--corpus", f"{tmp_path}/train.txt,{tmp_path}/validation.txt",
            "--max_length", "24", "--top_k", "8", "--plans", "2", "--hidden", "--student_layers", "2",
            "--shard_pairs", "4", "--out", str(tmp_path / "c"), "--cache_dir", str(tmp_path / "cache"),
            "--no_progress"]
    assert main(args) == 0
    cache = TeacherCache.open(tmp_path / "c", verify="full")
    assert cache.top_k == 8 and cache.has_hidden and cache.num_shards > 1
    out = capsys.readouterr().out
    assert re.search(r"^precision: (bf16|fp32) \(", out, re.M) and "16 pairs of 33 rows in 4 shards" in out
    assert main(args) == 0                                                    # a rerun finds every shard done
    assert main(args[:-1] + ["--top_k", "16", "--no_progress"]) == 2          # another k into the same folder
    assert "another top_k" in capsys.readouterr().err
    assert tc.main(["verify", str(tmp_path / "c"), "--full"]) == 0


# ---------------------------------------------------------------------------------------------------------
# Faults (issue 27): corruption of the same size, a killed build's temporaries, a run the cache cannot serve
# ---------------------------------------------------------------------------------------------------------

def test_cache_checksum_same_size_corruption_found_on_first_read(tmp_path, teacher_dir):
    """One flipped bit in a shard, same size: the open (sizes, headers) passes, the first read of that shard
    checks its CRC-32 and refuses naming the shard; the other shards read fine; an intact cache reads alike.
    A cache whose manifests predate CRCs is checked by their SHA-256 instead."""
    build(teacher_dir, tmp_path / "c")
    intact = TeacherCache.open(tmp_path / "c")
    want = intact.read_pair(3, 0)                                              # pair 3 is in shard 1
    assert all(json.loads((tmp_path / "c" / f"shard-0000{i}.json").read_text())["crc32"] >= 0 for i in range(4))
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1                                                   # in the tensor bytes
    shard.write_bytes(bytes(data))
    cache = TeacherCache.open(tmp_path / "c")
    cache.read_pair(0, 0)                                                       # shard 0: intact
    with pytest.raises(ValueError, match=r"shard 1 \(shard-00001.safetensors\) is corrupt: its CRC-32 differs"):
        cache.read_pair(3, 0)
    man = json.loads((tmp_path / "c" / "shard-00001.json").read_text())
    del man["crc32"]                                                            # an older cache: SHA-256
    (tmp_path / "c" / "shard-00001.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="shard 1 .*is corrupt: its SHA-256 differs"):
        TeacherCache.open(tmp_path / "c").read_pair(3, 0)
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    got = TeacherCache.open(tmp_path / "c").read_pair(3, 0)
    assert all(torch.equal(a, b) for a, b in zip(got["input_ids"], want["input_ids"]))


def test_cache_build_killed_leaves_no_tmp_file(tmp_path, teacher_dir):
    """A build killed while writing a shard leaves `.shard-NNNNN.safetensors.tmpPID`; the next build of that
    shard removes it (and only the temporaries of the shards it builds: another rank's are not its own)."""
    build(teacher_dir, tmp_path / "c")
    (tmp_path / "c" / "shard-00002.json").unlink()                              # shard 2 was being written...
    (tmp_path / "c" / ".shard-00002.safetensors.tmp999999").write_bytes(b"half a shard")
    (tmp_path / "c" / ".shard-00003.json.tmp999998").write_bytes(b"{")       # ...and shard 3's of rank 1 of 2
    (tmp_path / "c" / ".cache.json.tmp4194304").write_bytes(b"{")             # a dead writer's (no such pid)
    (tmp_path / "c" / f".cache.json.tmp{os.getpid()}").write_bytes(b"{")       # a live one's: kept
    build_cache(teacher_dir, corpus(), tmp_path / "c", options(), rank=0, world_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if ".tmp" in p.name) == [
        f".cache.json.tmp{os.getpid()}", ".shard-00003.json.tmp999998"]
    (tmp_path / "c" / f".cache.json.tmp{os.getpid()}").unlink()
    TeacherCache.open(tmp_path / "c", verify="full")
    build_cache(teacher_dir, corpus(), tmp_path / "c", options(), rank=1, world_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if ".tmp" in p.name) == [".shard-00003.json.tmp999998"]


def test_cache_mismatch_refused_before_work(tmp_path, teacher_dir):
    """What a run asks of a cache that the cache's metadata can refuse, each in one line naming the flag,
    before any process group or step (iit_fast/prepare.py calls these while opening the cache)."""
    build(teacher_dir, tmp_path / "c", hidden=False, plans=2)                  # 10 pairs, 2 plans per pair
    cache = TeacherCache.open(tmp_path / "c")
    assert cache.num_pairs == 10
    ok = dict(micro_batch=4, accumulation=1, world_size=1, max_steps=10, epochs=0)   # 5 steps per epoch: 2 epochs
    tc.check_run(cache, DistillConfig(w_cos=0), **ok)
    tc.check_run(cache, DistillConfig(w_cos=0, mode="standard"), **{**ok, "max_steps": 600})  # no plans used
    cases = [(DistillConfig(), ok, r"--w_cos 0.25 needs the teacher's hidden states, and --teacher_cache .* was "
                                   r"built without them: rebuild it with --hidden, or pass --w_cos 0"),
             (DistillConfig(w_cos=0, mode="naive"), ok, "--mode naive: a cached teacher runs the fast or the standard"),
             (DistillConfig(w_cos=0, w_mse=0.1), ok, "--w_iit_cos / --w_mse must be 0 with a cached teacher"),
             (DistillConfig(w_cos=0, shared_vocab=50), ok, "--shared_vocab must be unset"),
             (DistillConfig(w_cos=0), {**ok, "micro_batch": 3}, "train_micro_batch_size_per_gpu 3: .*even number"),
             (DistillConfig(w_cos=0), {**ok, "micro_batch": 8, "world_size": 4}, "not one optimizer step"),
             (DistillConfig(w_cos=0), {**ok, "max_steps": 11}, r"holds 2 intervention plans per pair, and this run "
                                      r"goes over its pairs 3 times \(--max_steps 11 at 5 steps per epoch\).* --plans 3 "
                                      r".*at most 10 steps"),
             (DistillConfig(w_cos=0), {**ok, "epochs": 3}, r"3 times \(--epochs 3\)")]
    for cfg, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            tc.check_run(cache, cfg, **kw)
    with pytest.raises(ValueError, match="holds a masked LM teacher's outputs, and this run's teacher is a causal "
                                         "LM; expected a cache built from this teacher"):
        tc.refuse_teacher_kind("causal", tmp_path / "c")
    tc.refuse_teacher_kind("masked", tmp_path / "c")
