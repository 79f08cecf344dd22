"""Decoders (GPT-2, Llama, Qwen2, Mistral) in the intervenable wrapper: every site and the logits equal
transformers' own forward (right and left padding), resuming equals the full pass, interventions reach only
what causality allows, the head split, student init, the cache hook for a suffix of the sequence."""
import pytest
import torch
from transformers import DynamicCache

from iit_fast.models import IntervenableLM, init_student_from_teacher, student_layer_map
from iit_fast.ops import distill_head_loss
from iit_fast.ops.head_loss.reference import kd_loss_reference
from iit_fast.ops.interchange.reference import interchange_reference
from tiny import TINY_CAUSAL, tiny_causal_batch, tiny_gpt2, tiny_llama

FAMILIES = list(TINY_CAUSAL)
LENGTHS = (9, 5, 7, 3)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return IntervenableLM(TINY_CAUSAL[request.param]()).eval()


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_every_site_and_logits_equal_hf(model, left):
    b = tiny_causal_batch(LENGTHS, left=left)
    am, real = b["attention_mask"], b["attention_mask"].bool()
    n = model.num_layers
    # HF's plain forward numbers positions 0..S-1; a left-padded row needs the positions of its real tokens
    # (as generate passes them), which is what the wrapper always uses
    pos = (am.cumsum(-1) - 1).clamp(min=0) if left else None
    with torch.no_grad():
        ref = model.model(input_ids=b["input_ids"], attention_mask=am, position_ids=pos, output_hidden_states=True)
        out = model(b["input_ids"], am, keep=range(n))
    assert model.kind == "causal" and len(ref.hidden_states) == n + 1
    for l in range(n - 1):  # site l is HF hidden_states[l + 1] ...
        torch.testing.assert_close(out.sites[l][real], ref.hidden_states[l + 1][real], rtol=1e-5, atol=1e-5)
    # ... except the last: HF's hidden_states[-1] is after the final norm, our last_hidden before it
    assert torch.equal(out.sites[n - 1], out.last_hidden)
    assert not torch.allclose(out.last_hidden[real], ref.hidden_states[-1][real], atol=1e-2)
    torch.testing.assert_close(model.head_transform(out.last_hidden)[real], ref.hidden_states[-1][real],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logits(out.last_hidden)[real], ref.logits[real], rtol=1e-5, atol=1e-5)


def test_padding_changes_nothing(model):
    """A row's real positions give the same states alone, right-padded and left-padded (GPT-2's absolute
    positions make this fail if a left-padded row were numbered from its first pad; rotary is relative)."""
    right, left = tiny_causal_batch(LENGTHS), tiny_causal_batch(LENGTHS, left=True)
    with torch.no_grad():
        r = model(right["input_ids"], right["attention_mask"]).last_hidden
        lft = model(left["input_ids"], left["attention_mask"]).last_hidden
        for i, k in enumerate(LENGTHS):
            ids = right["input_ids"][i:i + 1, :k]
            alone = model(ids, torch.ones_like(ids)).last_hidden[0]  # (k, D)
            torch.testing.assert_close(r[i, :k], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lft[i, -k:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_resume_from_every_block_equals_full_pass(model, left):
    b = tiny_causal_batch((6, 8, 2), left=left)
    am, n = b["attention_mask"], model.num_layers
    with torch.no_grad():
        full = model(b["input_ids"], am, keep=range(n))
        h0 = model.embed(b["input_ids"], None, am)
        for l in range(n + 1):  # resume from block l given the states entering it
            entering = h0 if l == 0 else full.sites[l - 1]
            resumed = model(None, am, resume_from=l, states=entering).last_hidden
            torch.testing.assert_close(resumed, full.last_hidden, rtol=0, atol=1e-6)
        assert torch.equal(model(b["input_ids"], am, stop=2).last_hidden, full.sites[1])


def _swap():
    pi, bs, ss, k = torch.tensor([1, 2, 0]), torch.tensor([1, 3, 0]), torch.tensor([0, 1, 2]), torch.tensor([2, 3, 1])
    return pi, bs, ss, k, (lambda h: interchange_reference(h, pi, bs, ss, k))


def test_intervention_in_the_middle_changes_only_positions_from_the_span_on(model):
    b = tiny_causal_batch((6, 8, 5))
    am, real = b["attention_mask"], b["attention_mask"].bool()
    pi, bs, ss, k, swap = _swap()
    with torch.no_grad():
        plain = model(b["input_ids"], am).last_hidden
        cf = model(b["input_ids"], am, interventions={1: swap}).last_hidden
    changed = (cf - plain).abs().amax(-1) > 1e-6  # (B, S)
    for i in range(3):
        assert not changed[i, :bs[i]].any()           # causal: nothing before the span moves, in any layer
        assert changed[i, bs[i]:][real[i, bs[i]:]].all()  # every later real position does


def test_intervention_at_last_block_changes_only_swapped_positions(model):
    b = tiny_causal_batch((6, 8, 5))
    pi, bs, ss, k, swap = _swap()
    n = model.num_layers
    with torch.no_grad():
        plain = model(b["input_ids"], b["attention_mask"]).last_hidden
        cf = model(b["input_ids"], b["attention_mask"], interventions={n - 1: swap}).last_hidden
    expected = torch.zeros(plain.shape[:2], dtype=torch.bool)
    for i in range(3):
        expected[i, bs[i]:bs[i] + k[i]] = True
        torch.testing.assert_close(cf[i, bs[i]:bs[i] + k[i]], plain[pi[i], ss[i]:ss[i] + k[i]], rtol=0, atol=0)
    assert torch.equal((cf != plain).any(-1), expected)


def test_grouped_query_attention_is_exercised():
    for family in ("llama", "qwen2", "mistral"):
        cfg = TINY_CAUSAL[family]().config
        assert cfg.num_key_value_heads < cfg.num_attention_heads, family
    assert TINY_CAUSAL["mistral"]().config.sliding_window < max(LENGTHS)  # the window cuts in at these lengths
    assert "sliding_attention" in TINY_CAUSAL["qwen2"]().config.layer_types


@pytest.mark.parametrize("make,tied", [(tiny_gpt2, True), (tiny_gpt2, False), (tiny_llama, True), (tiny_llama, False)])
def test_head_split_tied_and_untied(make, tied):
    model = IntervenableLM(make(tied=tied))
    emb = model.model.get_input_embeddings().weight
    assert (model.decoder_weight is emb) == tied
    assert model.decoder_bias is None  # these lm_heads have no bias; callers treat None as zero
    h = torch.randn(2, 5, model.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(model.head_transform(h) @ model.decoder_weight.t(), model.logits(h),
                                   rtol=1e-5, atol=1e-5)


def test_head_loss_takes_a_bias_free_decoder():
    teacher, student = IntervenableLM(tiny_llama(seed=0)), IntervenableLM(tiny_llama(seed=1))
    h_t, h_s = torch.randn(7, 32), torch.randn(7, 32)
    with torch.no_grad():
        ce, _ = distill_head_loss(student.head_transform(h_s), teacher.head_transform(h_t), student.decoder_weight,
                                  student.decoder_bias, teacher.decoder_weight, teacher.decoder_bias, None, None, 2.0)
        ref = kd_loss_reference(student.logits(h_s), teacher.logits(h_t), None, 2.0)
    assert ref > 0
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-6)


def test_student_init(model):
    teacher = model.model
    student = IntervenableLM(init_student_from_teacher(teacher, 2))
    layers = student_layer_map(4, 2)
    assert student.num_layers == 2 and student.family == model.family and layers == [0, 3]
    for s_idx, t_idx in enumerate(layers):
        for (n1, p1), (_, p2) in zip(student.blocks[s_idx].named_parameters(), model.blocks[t_idx].named_parameters()):
            assert torch.equal(p1, p2), n1
    for p1, p2 in zip(student.head_transform.parameters(), model.head_transform.parameters()):
        assert torch.equal(p1, p2)
    assert torch.equal(student.decoder_weight, model.decoder_weight)
    emb = student.model.get_input_embeddings().weight
    assert (student.decoder_weight is emb) == (model.decoder_weight is teacher.get_input_embeddings().weight)
    types = getattr(teacher.config, "layer_types", None)
    if types is not None:
        assert student.config.layer_types == [types[i] for i in layers]
    # the student runs as its HF self does
    b = tiny_causal_batch(LENGTHS)
    real = b["attention_mask"].bool()
    with torch.no_grad():
        ref = student.model(**b).logits
        z = student.logits(student(b["input_ids"], b["attention_mask"]).last_hidden)
    torch.testing.assert_close(z[real], ref[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_suffix_with_cached_prefix_equals_full_pass(model, left):
    """The hook for counterfactual key/value reuse: queries for [q0, S) over keys/values [0, S)."""
    b = tiny_causal_batch(LENGTHS, left=left)
    ids, am, q0 = b["input_ids"], b["attention_mask"], 4
    with torch.no_grad():
        full = model(ids, am).last_hidden
        cache = DynamicCache(config=model.config)
        prefix = model(ids[:, :q0], am[:, :q0], cache=cache).last_hidden
        assert cache.get_seq_length() == q0
        suffix = model(ids[:, q0:], am, cache=cache).last_hidden  # (B, S - q0, D)
    real = am.bool()
    torch.testing.assert_close(prefix[real[:, :q0]], full[:, :q0][real[:, :q0]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(suffix[real[:, q0:]], full[:, q0:][real[:, q0:]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids plus the 9 cached"):
        model(ids[:, q0:], am[:, q0:], cache=cache)


def test_set_dropout_reaches_attention_floats():
    model = IntervenableLM(tiny_llama())
    model.set_dropout(0.25)
    attn = [m for m in model.model.modules() if hasattr(m, "attention_dropout")]
    assert attn and all(m.attention_dropout == 0.25 for m in attn) and model.config.attention_dropout == 0.25
    gpt2 = IntervenableLM(tiny_gpt2())
    gpt2.set_dropout(0.25)
    assert all(m.p == 0.25 for m in gpt2.model.modules() if isinstance(m, torch.nn.Dropout))
    assert (gpt2.config.resid_pdrop, gpt2.config.embd_pdrop, gpt2.config.attn_pdrop) == (0.25, 0.25, 0.25)


def test_gpt2_embed_needs_the_mask():
    model = IntervenableLM(tiny_gpt2(layers=1))
    with pytest.raises(ValueError, match="attention_mask: GPT-2 numbers positions by the real tokens"):
        model.embed(torch.ones(2, 3, dtype=torch.long))


def test_llama_refuses_token_types():
    model = IntervenableLM(tiny_llama(layers=1))
    b = tiny_causal_batch((4, 3))
    with pytest.raises(ValueError, match="token_type_ids: a llama model has no segment embeddings"):
        model(b["input_ids"], b["attention_mask"], torch.ones_like(b["input_ids"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_equals_eager_with_left_padding(family):
    """Checkpoints load with sdpa attention by default: its masks (fully padded query rows included) must give
    the eager results at every real position, with no NaN anywhere."""
    eager = IntervenableLM(TINY_CAUSAL[family]())
    hf = TINY_CAUSAL[family]()
    hf.set_attn_implementation("sdpa")
    sdpa = IntervenableLM(hf)
    assert sdpa.config._attn_implementation == "sdpa"
    b = tiny_causal_batch(LENGTHS, left=True)
    real = b["attention_mask"].bool()
    with torch.no_grad():
        e = eager(b["input_ids"], b["attention_mask"]).last_hidden
        s = sdpa(b["input_ids"], b["attention_mask"]).last_hidden
    assert not torch.isnan(s).any()
    torch.testing.assert_close(s[real], e[real], rtol=1e-5, atol=1e-5)
