"""load_model: every supported family loads from a local folder; every bad input is an error that names the
argument and what was expected. check_same_tokenizer names both tokenizers."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from iit_fast.models import IntervenableLM, check_same_tokenizer, load_model
from tiny import TINY, tiny_batch, tiny_bert, tiny_bert_tokenizer, tiny_causal_tokenizer


def save(tmp_path, model, tokenizer, name="m", **kw):
    folder = tmp_path / name
    model.save_pretrained(folder, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_masked_lm_round_trip(tmp_path, family):
    hf = TINY[family](layers=3, hidden=32, vocab=97, seed=3)
    folder = save(tmp_path, hf, tiny_bert_tokenizer(97))
    model, tok = load_model(folder, kind="masked")
    assert isinstance(model, IntervenableLM) and model.family == family and model.kind == "masked"
    assert not model.training and len(tok) == 97
    b = tiny_batch((9, 5, 7, 3), vocab=97)
    with torch.no_grad():
        z = model.logits(model(b["input_ids"], b["attention_mask"]).last_hidden)  # (B, S, V)
        ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    real = b["attention_mask"].bool()
    torch.testing.assert_close(z[real], ref[real], rtol=1e-5, atol=1e-5)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_legacy_bin_loads_with_weights_only(tmp_path):
    hf = tiny_bert(layers=2)
    folder = save(tmp_path, hf, tiny_bert_tokenizer(97))
    # a legacy checkpoint: the same tensors as a pytorch_model.bin (torch.save of a plain state dict)
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    model, _ = load_model(folder)
    for k, v in hf.state_dict().items():
        assert torch.equal(model.model.state_dict()[k], v), k


def test_folder_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path: .*nope does not exist; expected a local Hugging Face"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"teacher: .*nope does not exist"):
        load_model(tmp_path / "nope", arg="teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"path: .*empty has no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"kind must be None, 'masked' or 'causal', got 'mlm'"):
        load_model(tmp_path / "empty", kind="mlm")


def test_unsupported_model_type_names_the_supported(tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"holds a 't5' model; supported model_types are \[.*'bert'.*\] "
                                         r"\(BertForMaskedLM, RobertaForMaskedLM"):
        load_model(folder)


def test_no_weights_and_no_head_weights(tmp_path):
    hf = tiny_bert(layers=2)
    folder = save(tmp_path, hf, tiny_bert_tokenizer(97))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"path: .* has no weights; expected model.safetensors"):
        load_model(folder)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64)
    bare = save(tmp_path, BertModel(cfg), tiny_bert_tokenizer(97), name="bare")  # an encoder, no MLM head
    with pytest.raises(ValueError, match=r"has no LM head weights \(no cls.predictions.\* / .*expected a "
                                         r"BertForMaskedLM checkpoint.*teacher build --encoder"):
        load_model(bare)


def test_missing_tensor_is_an_error_not_a_random_init(tmp_path):
    folder = save(tmp_path, tiny_bert(layers=2), tiny_bert_tokenizer(97))
    sd = load_file(folder / "model.safetensors")
    dropped = "bert.encoder.layer.1.output.dense.weight"
    del sd[dropped]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not fit a BertForMaskedLM.*missing_keys .*" + re.escape(dropped)):
        load_model(folder)


def test_tokenizer_errors(tmp_path):
    folder = save(tmp_path, tiny_bert(layers=2), None)
    with pytest.raises(FileNotFoundError, match=r"path: no tokenizer could be loaded from .*; expected a folder"):
        load_model(folder)
    other = tmp_path / "tok50"
    tiny_bert_tokenizer(50).save_pretrained(other)
    with pytest.raises(ValueError, match=r"tokenizer_path: the tokenizer at .* has 50 tokens but the model's "
                                         r"vocab_size is 97"):
        load_model(folder, tokenizer_path=other)
    # a masked LM needs a mask token: a causal tokenizer of the right size has none
    causal = tmp_path / "causal_tok"
    tiny_causal_tokenizer(97).save_pretrained(causal)
    with pytest.raises(ValueError, match=r"tokenizer_path: the tokenizer at .* has no (cls|sep|mask|pad) token"):
        load_model(folder, tokenizer_path=causal)


def test_kind_mismatch(tmp_path):
    folder = save(tmp_path, tiny_bert(layers=2), tiny_bert_tokenizer(97))
    with pytest.raises(ValueError, match=r"kind='causal' was asked, but .* holds a masked LM \(model_type 'bert'\)"):
        load_model(folder, kind="causal")


def test_check_same_tokenizer():
    a, b = tiny_bert_tokenizer(97), tiny_bert_tokenizer(97)
    check_same_tokenizer(a, b, "teacher", "student")
    with pytest.raises(ValueError, match=r"teacher and student have different tokenizers: 97 vs 60 tokens"):
        check_same_tokenizer(a, tiny_bert_tokenizer(60), "teacher", "student")
    with pytest.raises(ValueError, match=r"teacher and student have different vocabularies"):
        check_same_tokenizer(a, tiny_bert_tokenizer(97, shuffle_seed=1), "teacher", "student")
    c = tiny_bert_tokenizer(97)
    c.pad_token = "w7"
    with pytest.raises(ValueError, match=r"bert_a and bert_b tokenizers differ in pad_token: 0 vs \d+"):
        check_same_tokenizer(a, c, "bert_a", "bert_b")


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_causal_lm_round_trip(tmp_path, family):
    from tiny import TINY_CAUSAL, tiny_causal_batch
    hf = TINY_CAUSAL[family](layers=2, vocab=101, seed=4)
    # the tokenizer may be smaller than the embedding (padding rows), as real decoders' often are
    folder = save(tmp_path, hf, tiny_causal_tokenizer(97))
    model, tok = load_model(folder, kind="causal")
    assert model.kind == "causal" and model.family == family and not model.training and len(tok) == 97
    if family == "gpt2":
        assert tok.pad_token is None  # returned as loaded: no pad token is invented
    b = tiny_causal_batch((9, 5, 7, 3), vocab=97)
    real = b["attention_mask"].bool()
    with torch.no_grad():
        z = model.logits(model(b["input_ids"], b["attention_mask"]).last_hidden)
        ref = hf(**b).logits
    torch.testing.assert_close(z[real], ref[real], rtol=1e-5, atol=1e-5)


def test_causal_errors(tmp_path):
    from tiny import tiny_gpt2, tiny_llama
    gpt2 = save(tmp_path, tiny_gpt2(layers=1, vocab=101), tiny_causal_tokenizer(101), name="gpt2")
    with pytest.raises(ValueError, match=r"student: kind='masked' was asked, but .* holds a causal LM "
                                         r"\(model_type 'gpt2'\); expected a masked LM"):
        load_model(gpt2, kind="masked", arg="student")
    big = tmp_path / "tok103"
    tiny_causal_tokenizer(103).save_pretrained(big)
    with pytest.raises(ValueError, match=r"tokenizer_path: the tokenizer at .* has 103 tokens, more than the "
                                         r"model's vocab_size 101"):
        load_model(gpt2, tokenizer_path=big)
    # an untied Llama saved without its lm_head (a bare LlamaModel's tensors) has no LM head
    llama = save(tmp_path, tiny_llama(layers=1, tied=False), tiny_causal_tokenizer(101), name="llama")
    sd = {k: v for k, v in load_file(llama / "model.safetensors").items() if not k.startswith("lm_head.")}
    save_file(sd, llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no LM head weights \(no lm_head.\* among .*expected a "
                                         r"LlamaForCausalLM checkpoint\.$"):
        load_model(llama)
