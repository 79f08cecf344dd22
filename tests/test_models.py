"""The intervenable wrapper equals HF's own forward, resumes exactly, and intervenes where told."""
import pytest
import torch

from iit_fast.models import IntervenableMLM
from iit_fast.models.student import init_student_from_teacher, student_layer_map
from iit_fast.ops.interchange.reference import interchange_reference
from tiny import TINY, tiny_batch, tiny_bert


@pytest.fixture(scope="module")
def bert():
    return IntervenableMLM(tiny_bert(layers=4, hidden=32)).eval()


def test_forward_equals_hf(bert):
    b = tiny_batch((9, 5, 7, 3))
    with torch.no_grad():
        ref = bert.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         token_type_ids=b["token_type_ids"], output_hidden_states=True)
        out = bert(b["input_ids"], b["attention_mask"], b["token_type_ids"], keep=(0, 1, 2, 3))
    real = b["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden[real], ref.hidden_states[-1][real], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bert.logits(out.last_hidden)[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    for l in range(4):  # site l is HF hidden_states[l + 1]
        torch.testing.assert_close(out.sites[l][real], ref.hidden_states[l + 1][real], rtol=1e-6, atol=1e-6)


def test_resume_from_every_block_equals_full_pass(bert):
    b = tiny_batch((6, 8, 2))
    am = b["attention_mask"]
    with torch.no_grad():
        full = bert(b["input_ids"], am, keep=(0, 1, 2, 3))
        h0 = bert.embed(b["input_ids"], None)
        for l in range(5):  # resume from block l given the states entering it
            entering = h0 if l == 0 else full.sites[l - 1]
            resumed = bert(None, am, resume_from=l, states=entering).last_hidden
            torch.testing.assert_close(resumed, full.last_hidden, rtol=0, atol=1e-6)
        # run to a given block: stop=2 returns the output of block 1
        part = bert(b["input_ids"], am, stop=2)
        torch.testing.assert_close(part.last_hidden, full.sites[1], rtol=0, atol=0)


def test_self_swap_changes_nothing(bert):
    b = tiny_batch((6, 8, 5))
    am = b["attention_mask"]
    B = am.shape[0]
    ident, start, k = torch.arange(B), torch.tensor([1, 2, 0]), torch.tensor([3, 4, 2])
    swap = lambda h: interchange_reference(h, ident, start, start, k)  # noqa: E731
    with torch.no_grad():
        plain = bert(b["input_ids"], am).last_hidden
        swapped = bert(b["input_ids"], am, interventions={1: swap}).last_hidden
    torch.testing.assert_close(swapped, plain, rtol=0, atol=0)


def test_intervention_at_last_block_changes_only_swapped_positions(bert):
    b = tiny_batch((6, 8, 5))
    am = b["attention_mask"]
    pi, bs, ss, k = torch.tensor([1, 2, 0]), torch.tensor([1, 2, 0]), torch.tensor([0, 3, 1]), torch.tensor([2, 3, 1])
    with torch.no_grad():
        plain = bert(b["input_ids"], am).last_hidden
        swap = lambda h: interchange_reference(h, pi, bs, ss, k)  # noqa: E731
        cf = bert(b["input_ids"], am, interventions={3: swap}).last_hidden
    changed = (cf != plain).any(-1)
    expected = torch.zeros_like(changed)
    for i in range(3):
        expected[i, bs[i]:bs[i] + k[i]] = True
        torch.testing.assert_close(cf[i, bs[i]:bs[i] + k[i]], plain[pi[i], ss[i]:ss[i] + k[i]])
    assert torch.equal(changed, expected)


def test_intervention_in_the_middle_changes_downstream(bert):
    b = tiny_batch((6, 8, 5))
    pi, bs, ss, k = torch.tensor([1, 2, 0]), torch.tensor([1, 2, 0]), torch.tensor([0, 3, 1]), torch.tensor([2, 3, 1])
    with torch.no_grad():
        plain = bert(b["input_ids"], b["attention_mask"]).last_hidden
        cf = bert(b["input_ids"], b["attention_mask"],
                  interventions={1: lambda h: interchange_reference(h, pi, bs, ss, k)}).last_hidden
    # attention spreads the swap to every real token of the row
    real = b["attention_mask"].bool()
    assert ((cf - plain).abs().amax(-1) > 1e-6)[real].all()


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_equal_hf(family):
    """RoBERTa and DistilBERT: forward, every site, the split head and resuming equal HF's own forward."""
    model = IntervenableMLM(TINY[family](layers=3, hidden=24, vocab=61, seed=2))
    b = tiny_batch((7, 4, 6), vocab=61)
    am, real = b["attention_mask"], b["attention_mask"].bool()
    with torch.no_grad():
        ref = model.model(input_ids=b["input_ids"], attention_mask=am, output_hidden_states=True)
        out = model(b["input_ids"], am, keep=(0, 1, 2))
        resumed = model(None, am, resume_from=2, states=out.sites[1]).last_hidden
    assert model.family == family and model.num_layers == 3 and model.hidden_size == 24
    torch.testing.assert_close(model.logits(out.last_hidden)[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    for l in range(3):
        torch.testing.assert_close(out.sites[l][real], ref.hidden_states[l + 1][real], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(resumed, out.last_hidden, rtol=0, atol=1e-6)
    hs = model.head_transform(out.last_hidden)
    torch.testing.assert_close((hs @ model.decoder_weight.t() + model.decoder_bias)[real], ref.logits[real],
                               rtol=1e-5, atol=1e-5)
    # the student: the teacher's embeddings, head and an even layer subset, the decoder still tied
    student = IntervenableMLM(init_student_from_teacher(model.model, 2))
    assert student.num_layers == 2 and student.family == family
    for s_idx, t_idx in enumerate(student_layer_map(3, 2)):
        for p1, p2 in zip(student.blocks[s_idx].parameters(), model.blocks[t_idx].parameters()):
            assert torch.equal(p1, p2)
    assert student.decoder_weight is student.base.embeddings.word_embeddings.weight
    assert torch.equal(student.decoder_bias, model.decoder_bias)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(TypeError, match=r"BertForMaskedLM, RobertaForMaskedLM, DistilBertForMaskedLM.*got Linear"):
        IntervenableMLM(torch.nn.Linear(2, 2))


def test_head_split_equals_hf_head(bert):
    h = torch.randn(5, 32)
    with torch.no_grad():
        z = bert.head_transform(h) @ bert.decoder_weight.t() + bert.decoder_bias
        torch.testing.assert_close(z, bert.logits(h), rtol=1e-5, atol=1e-5)


def test_student_init_copies_layer_subset():
    assert student_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert student_layer_map(6, 3) == [0, 2, 5]  # round(2.5) == 2: Python rounds halves to even
    assert student_layer_map(4, 1) == [3]
    teacher = tiny_bert(layers=4)
    student = init_student_from_teacher(teacher, 2)
    assert student.config.num_hidden_layers == 2
    for s_idx, t_idx in enumerate(student_layer_map(4, 2)):
        for (n1, p1), (n2, p2) in zip(student.bert.encoder.layer[s_idx].named_parameters(),
                                      teacher.bert.encoder.layer[t_idx].named_parameters()):
            assert torch.equal(p1, p2), n1
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="student_layers"):
        student_layer_map(4, 5)


def test_bad_input_errors(bert):
    b = tiny_batch((4, 3))
    with pytest.raises(ValueError, match="site 7 does not exist"):
        bert(b["input_ids"], b["attention_mask"], keep=(7,))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        bert(b["input_ids"], b["attention_mask"][:, :2])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        bert(None, b["attention_mask"][:1], resume_from=1, states=torch.zeros(2, 4, 32))
    with pytest.raises(TypeError, match="BertForMaskedLM"):
        IntervenableMLM(torch.nn.Linear(2, 2))


def test_registry_maps_every_model_type_to_its_adapter():
    from iit_fast.models import ADAPTERS, adapter_for
    for model_type, adapter in ADAPTERS.items():
        assert model_type in adapter.lm_classes and adapter.kind in ("masked", "causal")
    for family, make in TINY.items():
        assert type(adapter_for(make(layers=1))).__name__.lower().startswith(family)
    from transformers import BertConfig, BertModel
    bare = BertModel(BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8))
    with pytest.raises(TypeError, match=r"supported family \(BertForMaskedLM.*got BertModel \(model_type 'bert'\)"):
        IntervenableMLM(bare)  # the right model_type, but no MLM head


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_set_dropout(family):
    model = IntervenableMLM(TINY[family](layers=2, hidden=32))
    model.set_dropout(0.3)
    drops = [m for m in model.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    assert all(getattr(model.config, a) == 0.3 for a in model.adapter.dropout_config)
    b = tiny_batch((9, 5, 7, 3))
    model.train()
    with torch.no_grad():
        a1 = model(b["input_ids"], b["attention_mask"]).last_hidden
        a2 = model(b["input_ids"], b["attention_mask"]).last_hidden
        assert not torch.equal(a1, a2)  # dropout at work in training mode
        model.set_dropout(0.0)
        t = model(b["input_ids"], b["attention_mask"]).last_hidden
        e = model.eval()(b["input_ids"], b["attention_mask"]).last_hidden
    torch.testing.assert_close(t, e, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1"):
        model.set_dropout(1)


def test_families_without_segments_refuse_nonzero_token_types():
    model = IntervenableMLM(TINY["distilbert"](layers=1))
    b = tiny_batch((4, 3))
    model(b["input_ids"], b["attention_mask"], torch.zeros_like(b["input_ids"]))  # the BERT batch default: fine
    with pytest.raises(ValueError, match="token_type_ids: a distilbert model has no segment embeddings"):
        model(b["input_ids"], b["attention_mask"], torch.ones_like(b["input_ids"]))
