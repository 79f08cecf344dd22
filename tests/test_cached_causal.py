"""The teacher cache for causal (decoder) teachers (iit_fast/cache_builder.py, iit_fast/cached_step.py
`cached_causal_step`): the cached step equals the online causal step restricted to the same top-k (losses
and gradients, fp32), with a negative control; a cache of another kind of teacher is refused (exit 2
through train.py). Tiny GPT-2 models: no download."""
from __future__ import annotations

import re
from functools import partial

import pytest
import torch

from iit_fast.cache_builder import build_cache
from iit_fast.cache_codec import quantise
from iit_fast.cached_step import CacheBatches, cached_distill_step, collate_pairs
from iit_fast.config import DistillConfig
from iit_fast.models import IntervenableLM, load_model
from iit_fast.models.student import init_student_from_teacher
from iit_fast.ops.head_loss.sparse import sparse_distill_head_loss_reference
from iit_fast.ops.interchange.reference import hidden_loss_reference
from iit_fast.step import distill_step, next_token_targets
from iit_fast.step.common import _swap_from
from iit_fast.teacher_cache import CacheOptions, TeacherCache
from test_teacher_cache import assert_same, run
from test_train import assets, decoder_teachers, flags, run_main  # noqa: F401 (fixture)
from tiny import tiny_causal_tokenizer, tiny_gpt2

V = 101


def corpus(n=14, seed=0, longest=20):
    """Rows of different lengths (so batches are padded), as packed causal rows would be at the corpus end."""
    import datasets
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(6, V, (int(torch.randint(6, longest + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(layers=4, vocab=V, max_pos=64).save_pretrained(folder)
    tiny_causal_tokenizer(V).save_pretrained(folder)
    return str(folder)


def build(teacher_dir, out, **kw):
    opts = dict(kind="causal", max_length=32, top_k=V, plans=2, hidden=True, values="float32",
                hidden_dtype="float32", student_layers=2, shard_pairs=3)
    return build_cache(teacher_dir, corpus(), out, CacheOptions(**{**opts, **kw}), progress=False)


def models(teacher_dir, seed=1):
    teacher, _ = load_model(teacher_dir, kind="causal")
    torch.manual_seed(seed)
    student = IntervenableLM(init_student_from_teacher(teacher.model, 2)).train()
    with torch.no_grad():  # not a copy: every loss non-zero
        for p in student.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return teacher.eval(), student


def topk_targets(teacher, h, k, T, values="float32"):
    """The teacher's top-k log-probs at temperature T of states h (N, D), the rest bucket's log mass; both as
    a cache with `values` stores them (cache_codec.quantise; the rest in fp16 unless float32)."""
    logp = torch.log_softmax(teacher.logits(h).float() / T, -1)                   # (N, V)
    top = logp.topk(k, -1)
    rest = torch.logsumexp(logp.scatter(1, top.indices, float("-inf")), -1) if k < logp.shape[1] else \
        torch.full((logp.shape[0],), float("-inf"))
    rest = rest if values == "float32" else rest.half().float()
    return quantise(top.values, values), top.indices, rest


def naive_topk_step(teacher, student, batch, plan, cfg, k, values="float32"):
    """The online causal step restricted to the teacher's top-k, the naive way: full teacher and student
    passes (base, source, counterfactual over every position), the teacher's top-k taken online, the sparse
    KL by the reference op. Independent of the cache and of the fast step's suffix passes."""
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    T = cfg.temperature
    nxt, y = next_token_targets(am, labels)
    aff = torch.arange(ids.shape[1])[None] >= plan.base_start[:, None]          # (B, S)
    where = nxt & aff if cfg.logit_tokens_for("causal") == "affected" else nxt  # iit positions
    group, s_l = plan.teacher_layers, plan.student_layer
    ident = torch.arange(ids.shape[0])
    swap = lambda src: partial(_swap_from, source=src, pairing=ident, plan=plan)  # noqa: E731
    with torch.no_grad():
        t = teacher(ids, am, None, keep=set(group))
        t_src = teacher(ids[plan.pi], am[plan.pi], None, keep=set(group))
        t_cf = teacher(ids, am, None, interventions={l: swap(t_src.sites[l]) for l in group})
    s = student(ids, am, None, keep={s_l})
    s_src = student(ids[plan.pi], am[plan.pi], None, keep={s_l})
    s_cf = student(ids, am, None, interventions={s_l: swap(s_src.sites[s_l])})
    head = lambda h: student.head_transform(h)  # noqa: E731
    W, b = student.decoder_weight, student.decoder_bias
    ce, mlm = sparse_distill_head_loss_reference(head(s.last_hidden[nxt]), W, b,
                                                 *topk_targets(teacher, t.last_hidden[nxt], k, T, values), y[nxt], T)
    iit, _ = sparse_distill_head_loss_reference(head(s_cf.last_hidden[where]), W, b,
                                                *topk_targets(teacher, t_cf.last_hidden[where], k, T, values), None, T)
    cos = hidden_loss_reference(s.last_hidden, t.last_hidden, am.bool(), "cos")
    terms = {"ce": ce, "mlm": mlm, "cos": cos, "iit": iit}

    class Out:
        pass
    out = Out()
    out.terms = {n: v.detach() for n, v in terms.items()}
    out.loss = sum(getattr(cfg, f"w_{n}") * v for n, v in terms.items())
    return out


@pytest.mark.parametrize("logit_tokens", ["affected", "all"])
@pytest.mark.parametrize("ops,k,values", [("reference", 16, "float32"), ("fused", 16, "float32"),
                                          ("fused", V, "float32"), ("fused", 13, "g7")])
def test_cached_causal_step_equals_online_topk_step(tmp_path, teacher_dir, logit_tokens, ops, k, values):
    """The cached causal step (suffix passes, the counterfactual targets at the affected positions only)
    equals the naive online step restricted to the same top-k, terms and gradients, fp32; at k = V it also
    equals the online fast causal step (step.fast_causal_step, full KL). With g7 values (format 3's default)
    the online top-k is rounded to the same grid: the cache's decoding adds nothing to that rounding."""
    build(teacher_dir, tmp_path / "c", top_k=k, values=values)
    cache = TeacherCache.open(tmp_path / "c")
    assert cache.kind == "causal"
    teacher, student = models(teacher_dir)
    cfg = DistillConfig(ops=ops, logit_tokens=logit_tokens)
    for cb in list(CacheBatches(cache, 4, seed=0))[:2]:
        assert "token_type_ids" not in cb.batch and bool((cb.batch["attention_mask"] == 0).any())  # padded
        ((_, plan),) = cb.groups()
        cached = run(lambda: cached_distill_step(student, cb, cfg), student)
        assert set(cached[0].terms) == {"ce", "mlm", "cos", "iit"} and all(v > 0 for v in cached[0].terms.values())
        assert_same(cached, run(lambda: naive_topk_step(teacher, student, cb.batch, plan, cfg, k, values), student))
        if k == V:
            assert_same(cached, run(lambda: distill_step(teacher, student, cb.batch, plan, cfg), student))
    # the comparison can fail: the counterfactual targets of another plan (other spans, other positions)
    wrong = collate_pairs(cache, [0, 1], [0, 0])
    other = collate_pairs(cache, [0, 1], [1, 1])
    ((_, plan),) = wrong.groups()
    ((_, plan_other),) = other.groups()
    assert not torch.equal(plan.base_start, plan_other.base_start)
    wrong.cf, wrong.base_start = other.cf, other.base_start
    with pytest.raises(AssertionError):
        assert_same(run(lambda: cached_distill_step(student, wrong, cfg), student),
                    run(lambda: naive_topk_step(teacher, student, wrong.batch, plan, cfg, k), student))


def test_causal_cache_stores_the_affected_positions_only(tmp_path, teacher_dir):
    """Per (row, plan) the cache holds the counterfactual targets of the next-token positions >= the row's
    base-span start, and the base targets of every next-token position."""
    build(teacher_dir, tmp_path / "c", top_k=8, values="g7", hidden=False)
    cache = TeacherCache.open(tmp_path / "c")
    for p in range(cache.num_pairs):
        for m in range(cache.plans):
            r = cache.read_pair(p, m)
            for i in range(2):
                n = len(r["input_ids"][i]) - 1                                     # next-token positions
                assert torch.equal(r["input_ids"][i], r["labels"][i])
            lens = torch.tensor([len(x) - 1 for x in r["input_ids"]])
            assert r["base"][0].shape == (int(lens.sum()), 8)
            assert r["cf"][0].shape == (int((lens - r["base_start"]).clamp_min(0).sum()), 8)
            assert n > 0


def test_a_cache_of_another_kind_of_teacher_is_refused(tmp_path, assets, capsys):
    """train.py with a masked teacher's cache and a causal teacher (and the other way round): one `error:`
    line naming both kinds, exit 2, before any work; a causal teacher's cache trains (3 steps)."""
    from iit_fast.cli import main as cli
    from test_train import finish, launch, steps_of
    gpt2 = decoder_teachers(tmp_path / "dec")["gpt2"]
    common = ["--corpus", str(assets["corpus"]), "--top_k", "8", "--plans", "2", "--student_layers", "2",
              "--cache_dir", str(assets["root"] / "cache"), "--max_length", "16", "--no_progress"]
    assert cli(["cache-teacher", "--teacher", str(assets["teacher"]), "--out", str(tmp_path / "masked"),
                "--max_examples", "48"] + common) == 0
    assert cli(["cache-teacher", "--teacher", str(gpt2), "--out", str(tmp_path / "causal"), "--hidden"] + common) == 0
    for teacher, cache, built, run_kind in ((gpt2, "masked", "masked", "causal"),
                                            (assets["teacher"], "causal", "causal", "masked")):
        code, err = run_main(flags(assets, tmp_path / f"out-{cache}", teacher=teacher,
                                   teacher_cache=tmp_path / cache, steps=3), capsys)
        assert code == 2 and re.search(rf"error: --teacher_cache .*{cache} holds a {built} LM teacher's outputs, "
                                       rf"and this run's teacher is a {run_kind} LM", err), err
        assert not (tmp_path / f"out-{cache}").exists()
    out = tmp_path / "trained"
    text = finish(launch(assets, out, steps=3, teacher=gpt2, teacher_cache=tmp_path / "causal"), out)
    rows = steps_of(out)
    assert [r["step"] for r in rows] == [1, 2, 3], text[-2000:]
    assert all(r[k] == r[k] and r[k] > 0 for r in rows for k in ("ce", "mlm", "cos", "iit")), rows
