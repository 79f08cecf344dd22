"""Causal LMs (GPT-2, Llama, Qwen2, Mistral): the fast step, which reuses the plain passes' keys/values
before each row's span and skips logits whose value is known, equals the naive three-pass step in every
loss term and every student gradient (fp32, 1e-5); the next-token objective against transformers' own
loss; padding rows of a vocabulary; the FLOP count against torch's FLOP counter; bad input."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from iit_fast import step as step_module
from iit_fast.step import index as step_index_module
from iit_fast.config import DistillConfig
from iit_fast.models import IntervenableLM
from iit_fast.models.student import init_student_from_teacher
from iit_fast.ops.head_loss.reference import kd_loss_reference
from iit_fast.sampling import InterventionPlan, make_alignment, pad_offsets, sample_plan
from iit_fast.flops import counted_flops
from iit_fast.step import check_pair, distill_step, suffix_groups
from test_step import assert_same_step, run
from tiny import TINY_CAUSAL, tiny_batch, tiny_causal_batch, tiny_pair

FAMILIES = list(TINY_CAUSAL)
LENGTHS = (9, 5, 7, 3, 8, 6)
PADDING = {"right_pad": False, "left_pad": True}


def causal_pair(family: str, student_layers: int = 2, **student_kw):
    """A 4-block teacher and a student initialised from it, then moved away from it.

    The final norm's gain is scaled up (in both) so that the logits are far from uniform and the student
    clearly differs: the KL terms are then ~5, not ~1e-2, where fp32 rounding alone is ~1e-5 of them for any
    implementation (see test_step.test_fused_ops_equal_reference_ops)."""
    teacher = TINY_CAUSAL[family](layers=4, seed=0)
    with torch.no_grad():
        IntervenableLM(teacher).head_transform.weight.mul_(6)
    if student_kw:
        student = TINY_CAUSAL[family](layers=student_layers, seed=1, **student_kw)
        with torch.no_grad():
            IntervenableLM(student).head_transform.weight.mul_(6)
    else:
        student = init_student_from_teacher(teacher, student_layers)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return IntervenableLM(teacher).eval(), IntervenableLM(student).train()


def causal_batch(lengths=LENGTHS, left=False, vocab=101):
    """input_ids, attention_mask, labels (= input ids, -100 at padding, unshifted), as the data loader makes."""
    b = tiny_causal_batch(lengths, vocab=vocab, left=left)
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def plan_for(batch, alignment: str, seed: int) -> InterventionPlan:
    """A plan drawn for a 4-block teacher and a 2-block student (starts in columns of the batch)."""
    generator = torch.Generator().manual_seed(seed)
    return sample_plan(batch["attention_mask"], make_alignment(alignment, 4, 2), generator)


def plan_with(plan: InterventionPlan, base_start, source_start, span_len) -> InterventionPlan:
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return InterventionPlan(plan.teacher_layers, plan.student_layer, plan.pi, t(base_start), t(source_start),
                            t(span_len), plan.dims)


def naive_and_fast(teacher, student, batch, plan, **kw):
    kw = dict(ops="reference", w_iit_cos=0.3, w_mse=0.2) | kw
    naive = run(teacher, student, batch, plan, DistillConfig(mode="naive", **kw))
    fast = run(teacher, student, batch, plan, DistillConfig(mode="fast", **kw))
    return naive, fast


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", list(PADDING))
@pytest.mark.parametrize("logit_tokens", ["affected", "all"])
def test_fast_equals_naive(family, padding, logit_tokens):
    teacher, student = causal_pair(family)
    batch = causal_batch(left=PADDING[padding])
    for seed, spec in enumerate(("middle", "full", "late")):  # full: teacher groups; late: the last student block
        plan = plan_for(batch, spec, seed)
        naive, fast = naive_and_fast(teacher, student, batch, plan, logit_tokens=logit_tokens)
        assert set(naive[0].terms) == {"ce", "mlm", "cos", "iit", "iit_cos", "mse"}
        assert all(v > 0 for v in naive[0].terms.values())
        assert_same_step(naive, fast)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_every_grouping_of_the_suffix_passes_gives_the_naive_step(groups):
    """One q0 for the batch, two groups, one row per group: the same step (Qwen2: sliding and full layers)."""
    teacher, student = causal_pair("qwen2")
    batch = causal_batch(left=True)
    plan = plan_for(batch, "full", 5)
    assert len({int(b) for b in plan.base_start}) > 2  # distinct starts: the groups really differ
    assert_same_step(*naive_and_fast(teacher, student, batch, plan, suffix_groups=groups))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", list(PADDING))
def test_spans_at_the_very_start_and_the_very_end(family, padding):
    """Base spans at a row's first real token (q0 = 0 for its group: a whole pass) and ending at its last one;
    source spans likewise, in columns of the batch."""
    teacher, student = causal_pair(family)
    left = PADDING[padding]
    batch = causal_batch(left=left)
    S, k = max(LENGTHS), 2                                                  # every row has >= 3 tokens
    first = [S - n if left else 0 for n in LENGTHS]                         # column of each row's first token
    at = lambda i, end: first[i] + (LENGTHS[i] - k if end else 0)  # noqa: E731  (span start: first or last k)
    plan = plan_for(batch, "full", 0)
    pi = plan.pi.tolist()
    for flip in (False, True):
        bs = [at(i, (i % 2 == 0) == flip) for i in range(len(LENGTHS))]
        ss = [at(pi[i], i % 2 == 1) for i in range(len(LENGTHS))]
        edge = plan_with(plan, bs, ss, [k] * len(LENGTHS))
        for logit_tokens in ("affected", "all"):
            assert_same_step(*naive_and_fast(teacher, student, batch, edge, logit_tokens=logit_tokens))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mse_with_projection_between_widths(family):
    teacher, student = causal_pair(family, hidden=16)
    student.attach_site_projection(teacher.hidden_size)
    batch = causal_batch()
    plan = plan_for(batch, "full", 0)
    naive, fast = naive_and_fast(teacher, student, batch, plan, w_cos=0, w_iit_cos=0, w_mse=1.0)
    assert "site_projection.weight" in fast[1] and naive[0].terms["mse"] > 0
    assert_same_step(naive, fast)


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
@pytest.mark.parametrize("logit_tokens", ["affected", "all"])
def test_fused_ops_equal_reference_ops(family, logit_tokens):
    """ops="fused" (the native interchange and chunked head loss on CPU) gives the reference ops' step."""
    teacher, student = causal_pair(family)
    batch = causal_batch(left=True)
    plan = plan_for(batch, "full", 2)
    kw = dict(mode="fast", logit_tokens=logit_tokens, w_iit_cos=0.3, w_mse=0.2, head_chunk=7)
    ref = run(teacher, student, batch, plan, DistillConfig(ops="reference", **kw))
    fused = run(teacher, student, batch, plan, DistillConfig(ops="fused", **kw))
    assert_same_step(ref, fused)


def test_standard_equals_naive_without_iit():
    teacher, student = causal_pair("llama")
    batch = causal_batch(left=True)
    std = run(teacher, student, batch, None, DistillConfig(mode="standard", ops="reference"))
    naive = run(teacher, student, batch, None, DistillConfig(mode="naive", ops="reference", w_iit=0))
    assert set(std[0].terms) == {"ce", "mlm", "cos"}
    assert_same_step(naive, std)


# ---- the objective, against transformers' own next-token loss ----------------------------------------

def _hf_terms(teacher, student, batch, T=2.0):
    """The LM loss by transformers (its labels shift), and T^2 KL of the shifted next-token logits by hand."""
    with torch.no_grad():
        lm = student.model(**batch).loss
        z_t = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z_s = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    has_next = (batch["attention_mask"][:, :-1] * batch["attention_mask"][:, 1:]).bool()       # (B, S - 1)
    p_t = torch.log_softmax(z_t[:, :-1][has_next] / T, -1)
    p_s = torch.log_softmax(z_s[:, :-1][has_next] / T, -1)
    return lm, T * T * (p_t.exp() * (p_t - p_s)).sum(-1).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_next_token_terms_equal_transformers(family):
    """Right padding (transformers numbers a left-padded row's positions from its first pad, and its shift
    would let the last pad predict the first token; the wrapper does neither)."""
    teacher, student = causal_pair(family)
    batch = causal_batch()
    lm, ce = _hf_terms(teacher, student, batch)
    for mode in ("naive", "standard"):
        out = distill_step(teacher, student, batch, None, DistillConfig(mode=mode, ops="reference", w_iit=0))
        torch.testing.assert_close(out.terms["mlm"], lm, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.terms["ce"], ce, rtol=1e-5, atol=0)


def test_an_unshifted_objective_fails_the_check(monkeypatch):
    """Negative control: next-token targets off by one (the logits at t scored against token t)."""
    teacher, student = causal_pair("llama")
    batch = causal_batch()
    lm, _ = _hf_terms(teacher, student, batch)
    shifted = step_module.next_token_targets
    monkeypatch.setattr(step_index_module, "next_token_targets",  # what step_index reads
                        lambda am, labels: (shifted(am, labels)[0], labels.masked_fill(am == 0, -100)))
    out = distill_step(teacher, student, batch, None, DistillConfig(mode="standard", ops="reference", w_iit=0))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out.terms["mlm"], lm, rtol=1e-5, atol=0)


def test_reusing_keys_values_past_the_span_start_fails(monkeypatch):
    """Negative control: a fast step whose suffix pass starts one position after the earliest span start,
    i.e. reuses that row's plain keys/values (and last states) at b, must not pass for the naive step."""
    teacher, student = causal_pair("gpt2")
    batch = causal_batch()
    plan = plan_for(batch, "middle", 0)
    naive, fast = naive_and_fast(teacher, student, batch, plan)
    assert_same_step(naive, fast)
    monkeypatch.setattr(step_index_module, "suffix_groups", lambda starts, n, **kw: [(None, int(starts.min()) + 1)])
    wrong = run(teacher, student, batch, plan, DistillConfig(mode="fast", ops="reference", w_iit_cos=0.3, w_mse=0.2))
    with pytest.raises(AssertionError):
        assert_same_step(naive, wrong)


def test_affected_and_all_differ_by_the_positions_before_the_span():
    """iit("all") * n = (ce KL summed before b) + iit("affected") * n_affected: the positions before b carry
    the plain KL, which is what "affected" leaves out (config.py)."""
    teacher, student = causal_pair("mistral")
    batch = causal_batch()
    plan = plan_for(batch, "middle", 1)
    am = batch["attention_mask"]
    has_next = torch.zeros_like(am, dtype=torch.bool)
    has_next[:, :-1] = (am[:, :-1] * am[:, 1:]).bool()
    aff = torch.arange(am.shape[1])[None] >= plan.base_start[:, None]
    term = lambda lt, w: distill_step(teacher, student, batch, plan, DistillConfig(  # noqa: E731
        ops="reference", logit_tokens=lt, w_ce=0, w_mlm=0, w_cos=0, w_iit=w)).terms["iit"]
    iit_all, iit_aff = term("all", 1.0), term("affected", 1.0)
    with torch.no_grad():  # the plain pass's KL before b
        z_t = teacher.logits(teacher(batch["input_ids"], am).last_hidden)
        z_s = student.logits(student(batch["input_ids"], am).last_hidden)
    ce_pre = kd_loss_reference(z_s, z_t, has_next & ~aff, 2.0)
    n_pre, n_aff = int((has_next & ~aff).sum()), int((has_next & aff).sum())
    assert n_pre > 0 and n_aff > 0
    torch.testing.assert_close(iit_all * (n_pre + n_aff), ce_pre * n_pre + iit_aff * n_aff, rtol=1e-5, atol=0)


# ---- vocabularies ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bigger", ["teacher", "student"])
def test_padding_rows_of_a_vocabulary(bigger):
    """One tokenizer of 101 ids; one model pads its embedding matrix to 117 rows (as 152064 vs 151936 over
    Qwen's tokenizer). The logit terms compare the first 101 rows: fast == naive, the padding rows get no
    gradient, and without `shared_vocab` the pair is refused."""
    kw = {"teacher": dict(), "student": dict()}
    kw[bigger]["vocab"] = 117
    teacher = IntervenableLM(TINY_CAUSAL["llama"](layers=4, seed=0, **kw["teacher"])).eval()
    student = IntervenableLM(TINY_CAUSAL["llama"](layers=2, seed=1, **kw["student"])).train()
    with torch.no_grad():
        for m in (teacher, student):
            m.head_transform.weight.mul_(6)
    batch = causal_batch()
    plan = plan_for(batch, "middle", 0)
    with pytest.raises(ValueError, match=r"vocabularies differ \((101 vs 117|117 vs 101)\).*shared_vocab"):
        check_pair(teacher, student, DistillConfig())
    with pytest.raises(ValueError, match="shared_vocab=118"):
        check_pair(teacher, student, DistillConfig(shared_vocab=118))
    naive, fast = naive_and_fast(teacher, student, batch, plan, w_cos=0, w_iit_cos=0, w_mse=0, shared_vocab=101)
    assert all(v > 0 for v in naive[0].terms.values())
    assert_same_step(naive, fast)
    # the naive step's ce equals the KL of the models' own logits cut to the tokenizer's 101 ids
    with torch.no_grad():
        z_t = teacher.logits(teacher(batch["input_ids"], batch["attention_mask"]).last_hidden)[..., :101]
        z_s = student.logits(student(batch["input_ids"], batch["attention_mask"]).last_hidden)[..., :101]
    has_next = step_module.next_token_targets(batch["attention_mask"], batch["labels"])[0]
    torch.testing.assert_close(naive[0].terms["ce"], kd_loss_reference(z_s, z_t, has_next, 2.0), rtol=1e-5, atol=0)
    if bigger == "student":
        for _, grads in (naive, fast):
            g = grads["model.lm_head.weight"]
            assert g[:101].abs().sum() > 0 and torch.equal(g[101:], torch.zeros_like(g[101:]))


# ---- the FLOP count -----------------------------------------------------------------------------------

def _measured_flops(teacher, student, batch, plan, cfg) -> int:
    # torch's counter leaves out the in-place addmm_ (the fused head loss accumulates dW with it): count it
    def addmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flop}) as counter:
        distill_step(teacher, student, batch, plan, cfg).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("logit_tokens", ["affected", "all"])
def test_counted_flops_equal_torch_flop_counter(family, logit_tokens):
    """counted_flops, the cost model, equals torch's count of every matmul (forward and backward) of the
    naive and the fast step; the reuse saves a fifth or more here, and more groups save more."""
    teacher, student = causal_pair(family)
    batch = causal_batch(left=True)
    plan = plan_for(batch, "middle", 1)
    cfg = DistillConfig(ops="reference", logit_tokens=logit_tokens)
    counted = counted_flops(teacher, student, batch, plan, cfg)
    assert counted["fast"] == _measured_flops(teacher, student, batch, plan, cfg)
    assert counted["naive"] == _measured_flops(teacher, student, batch, plan, DistillConfig(
        mode="naive", ops="reference", logit_tokens=logit_tokens))
    assert counted["saved"] == counted["fast_full_suffix"] - counted["fast"] > 0.2 * counted["fast"]
    one_q0 = counted_flops(teacher, student, batch, plan, DistillConfig(ops="reference", suffix_groups=1,
                                                                        logit_tokens=logit_tokens))
    assert one_q0["saved"] < counted["saved"]


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_counted_flops_head_recompute_is_what_the_fused_head_loss_adds(family):
    """The fused head loss on the CPU: holding the gradients formed in the forward (the default budget, a tiny
    decoder) costs exactly the model's "fast"; recomputing in the backward (head_resident_grad_mb=0, as at
    LLM vocabularies and on the device path) costs "fast" + "head_recompute", counted by torch."""
    teacher, student = causal_pair(family)
    batch = causal_batch(left=True)
    plan = plan_for(batch, "middle", 1)
    counted = counted_flops(teacher, student, batch, plan, DistillConfig())
    assert counted["head_recompute"] > 0
    assert _measured_flops(teacher, student, batch, plan, DistillConfig()) == counted["fast"]
    assert _measured_flops(teacher, student, batch, plan, DistillConfig(head_resident_grad_mb=0)) \
        == counted["fast"] + counted["head_recompute"]


def test_counted_flops_of_a_masked_lm():
    teacher, student = tiny_pair()
    batch = tiny_batch()
    plan = plan_for(batch, "middle", 1)
    for logit_tokens in ("all", "masked"):
        cfg = DistillConfig(ops="reference", logit_tokens=logit_tokens)
        counted = counted_flops(teacher, student, batch, plan, cfg)
        assert counted["saved"] == 0
        assert counted["fast"] == _measured_flops(teacher, student, batch, plan, cfg)


# ---- plans for padded batches, groups, bad input ------------------------------------------------------

def test_plans_for_left_padding_are_the_right_padded_draws_in_columns():
    right, left = causal_batch(), causal_batch(left=True)
    align = make_alignment("middle", 4, 2)
    a = sample_plan(right["attention_mask"], align, torch.Generator().manual_seed(4))
    b = sample_plan(left["attention_mask"], align, torch.Generator().manual_seed(4))
    pad = pad_offsets(left["attention_mask"])
    assert torch.equal(pad, max(LENGTHS) - torch.tensor(LENGTHS))
    assert torch.equal(b.pi, a.pi) and torch.equal(b.span_len, a.span_len)
    assert torch.equal(b.base_start, a.base_start + pad) and torch.equal(b.source_start, a.source_start + pad[a.pi])
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match="attention_mask must hold each row's real tokens in one block"):
        pad_offsets(holes)


def test_suffix_groups():
    starts = torch.tensor([7, 0, 3, 3, 9, 1, 5])
    groups = suffix_groups(starts, 3)
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(7))                       # every row once
    for r, q0 in groups:
        assert q0 == int(starts[r].min())                                # q0 <= every start of its group
    assert [q0 for _, q0 in groups] == [0, 3, 7]
    assert suffix_groups(starts, 1) == [(None, 0)]
    assert suffix_groups(torch.tensor([2, 2, 2]), 3) == [(None, 2)]      # equal starts: merged into one


# activation checkpointing (transformers' own included) with the suffix passes: tests/test_checkpointing.py


def test_bad_pairs_and_logit_tokens_are_rejected():
    decoder, _ = causal_pair("gpt2")
    bert_teacher, bert_student = tiny_pair()
    with pytest.raises(ValueError, match=r"the teacher \(gpt2\) is a causal LM, the student \(bert\) a masked LM"):
        check_pair(decoder, bert_student, DistillConfig())
    with pytest.raises(ValueError, match=r"the teacher \(bert\) is a masked LM, the student \(gpt2\) a causal LM"):
        check_pair(bert_teacher, decoder, DistillConfig())
    teacher, student = causal_pair("gpt2")
    with pytest.raises(ValueError, match="DistillConfig.logit_tokens='masked' does not apply to a causal LM"):
        check_pair(teacher, student, DistillConfig(logit_tokens="masked"))
    with pytest.raises(ValueError, match="DistillConfig.logit_tokens='affected' does not apply to a masked LM"):
        check_pair(bert_teacher, bert_student, DistillConfig(logit_tokens="affected"))
    assert DistillConfig().logit_tokens_for("causal") == "affected"
    assert DistillConfig().logit_tokens_for("masked") == "all"
    for field, value in (("shared_vocab", 0), ("suffix_groups", 0), ("logit_tokens", "some")):
        with pytest.raises(ValueError, match=field):
            DistillConfig(**{field: value})


def test_mixed_precision_runs_close_to_fp32():
    """Teacher in bf16 (its cached keys/values too) and the student under bf16 autocast."""
    teacher, student = causal_pair("qwen2")
    batch = causal_batch(left=True)
    plan = plan_for(batch, "full", 0)
    fp32 = distill_step(teacher, student, batch, plan, DistillConfig(ops="reference"))
    teacher.to(torch.bfloat16)
    out = distill_step(teacher, student, batch, plan,
                       DistillConfig(ops="reference", teacher_dtype="bfloat16", student_autocast="bfloat16"))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    for k in fp32.terms:
        torch.testing.assert_close(out.terms[k], fp32.terms[k], rtol=0.1, atol=0.05, msg=f"term {k}")
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
