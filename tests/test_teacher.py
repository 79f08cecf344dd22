"""The teacher builder end to end on a tiny random BERT and a tiny corpus (no download), its errors for bad
input, and the loader's errors for a teacher folder (`models.load_model(..., arg="teacher")`)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

from iit_fast import teacher as T
from iit_fast.corpus import load_corpus
from iit_fast.batches import validation_batches
from iit_fast.data import tokenize_corpus
from iit_fast.eval import EVAL_SEED, lm_metrics
from iit_fast.models import load_model

WORDS = ("the a of and to in is was it for on with as he she they we you that this there be have had "
         "not are were by at from or but his her their one all would when which what who will more no "
         "if out so said up its about into than them can only other new some could time these two may "
         "then do first any my now such like our over man me even most made after also did many before "
         "must through back years where much your way well down should because each just those people "
         "how too little state good very make world still own see men work long get here between both "
         "life being under never day same another know while last might us great old year off come "
         "since against go came right used take three").split()


def tiny_vocab(tmp_path, extra=()):
    """A WordPiece vocabulary: specials, the words above, single letters and ## letters."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'", "!", "?", ";", ":", "-"]
    vocab += sorted(set(WORDS) | set(extra))
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in vocab]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return path, len(vocab)


def tiny_encoder(tmp_path, with_head=False, hidden=32, layers=2):
    """A random tiny BertModel (or BertForMaskedLM) saved with its tokenizer in tmp_path/'encoder'."""
    vocab_file, V = tiny_vocab(tmp_path)
    folder = tmp_path / ("mlm" if with_head else "encoder")
    words = vocab_file.read_text().split()
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64)
    model = BertForMaskedLM(cfg) if with_head else BertModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


def tiny_corpus(tmp_path, n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    for f in range(3):
        pars = []
        for _ in range(n // 3):
            k = int(torch.randint(8, 40, (1,), generator=g))
            # a skewed (Zipf-like) word distribution, so unigram statistics carry information
            idx = (torch.rand(k, generator=g) ** 3 * len(WORDS)).long()
            pars.append(" ".join(WORDS[i] for i in idx) + ".")
        (folder / f"part{f}.txt").write_text("\n\n".join(pars) + "\n")
    return folder


def test_builder_end_to_end_on_tiny_encoder(tmp_path):
    enc, _ = tiny_encoder(tmp_path)
    corpus = tiny_corpus(tmp_path)
    out = T.build_default_teacher(tmp_path / "cache", encoder=str(enc), corpus=str(corpus), head_steps=4,
                                  adapt_steps=6, batch_size=8, max_length=32, progress=False)
    assert out == tmp_path / "cache" / T.DEFAULT_TEACHER_DIRNAME
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("unigram", "initial", "head_only", "final"):
        assert math.isfinite(metrics[key]["perplexity"]) and 0 <= metrics[key]["top1"] <= 1
        assert metrics[key]["tokens"] == metrics["unigram"]["tokens"] > 0
    assert metrics["head_phase"]["steps"] == 4 and metrics["adapt_phase"]["steps"] == 6
    # the unigram-initialised bias makes the untrained head about as good as unigram, not ~vocab size
    assert metrics["initial"]["perplexity"] < 3 * metrics["unigram"]["perplexity"]
    # a standard BertForMaskedLM checkpoint: safetensors, head weights, decoder tied, tokenizer beside it
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    lm, tok = load_model(out, kind="masked", arg="teacher")
    model = lm.model
    assert isinstance(model, BertForMaskedLM) and not model.training
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert len(tok) == model.config.vocab_size
    # reloading gives the same figures: what was saved is what was measured
    td = tokenize_corpus(load_corpus(str(corpus)), tok, max_length=32, num_proc=1, cache_dir=tmp_path / "cache")
    val = validation_batches(td["validation"], tok, 8, n_sequences=min(16 * 8, len(td["validation"])),
                             seed=EVAL_SEED)
    again = lm_metrics(lm, val)
    assert again["perplexity"] == pytest.approx(metrics["final"]["perplexity"], rel=1e-4)
    # cached: a second call returns at once without rebuilding
    mtime = (out / "metrics.json").stat().st_mtime
    assert T.build_default_teacher(tmp_path / "cache", encoder=str(enc), corpus=str(corpus), head_steps=4,
                                   adapt_steps=6, progress=False) == out
    assert (out / "metrics.json").stat().st_mtime == mtime


def test_time_budget_stops_the_adaptation(tmp_path):
    enc, _ = tiny_encoder(tmp_path)
    corpus = tiny_corpus(tmp_path)
    with pytest.warns(RuntimeWarning, match="time cap of 1 s stopped training after"):
        out = T.build_default_teacher(encoder=str(enc), corpus=str(corpus), head_steps=0, adapt_steps=10_000,
                                      batch_size=8, max_length=32, progress=False, out_dir=tmp_path / "t",
                                      cache_dir=tmp_path / "cache", max_adapt_seconds=1.0)
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["adapt_phase"]["steps"] < 10_000  # only the 1 s budget can stop it before 10,000 steps
    assert m["adapt_phase"]["stopped_by_time_cap"] and not m["head_phase"]["stopped_by_time_cap"]


def test_load_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher: .*does not exist"):
        load_model(tmp_path / "nowhere", kind="masked", arg="teacher")
    enc, _ = tiny_encoder(tmp_path)  # a BertModel: no MLM head
    with pytest.raises(ValueError, match=r"teacher: .*no LM head weights .*expected a BertForMaskedLM"):
        load_model(enc, kind="masked", arg="teacher")
    mlm, _ = tiny_encoder(tmp_path, with_head=True)
    model, tok = load_model(mlm, kind="masked", arg="teacher")
    assert isinstance(model.model, BertForMaskedLM)
    # a tokenizer of another vocabulary
    other = tmp_path / "other_tok"
    other.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(other)
    with pytest.raises(ValueError, match=r"tokenizer_path: .*7 tokens but the model's vocab_size is \d+"):
        load_model(mlm, kind="masked", tokenizer_path=other, arg="teacher")
    with pytest.raises(ValueError, match=r"tokenizer: .*7 tokens"):
        T.build_default_teacher(encoder=str(enc), tokenizer=str(other), corpus=str(tiny_corpus(tmp_path)),
                                head_steps=1, adapt_steps=1, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="encoder: .*config.json"):
        T.build_default_teacher(encoder=str(tmp_path / "nowhere"), head_steps=1, adapt_steps=1,
                                out_dir=tmp_path / "y", progress=False)
    with pytest.raises(FileNotFoundError, match="teacher: .*not built"):
        T.default_teacher_path(tmp_path / "empty_cache", build_if_missing=False)


def test_gpt2_teacher_end_to_end(tmp_path):
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast
    corpus = tiny_corpus(tmp_path)
    out = T.build_gpt2_teacher(tmp_path / "cache", corpus=str(corpus), steps=40, vocab_size=300, layers=2,
                               hidden=32, heads=4, batch_size=8, max_length=32, lr=3e-3, progress=False)
    assert out == tmp_path / "cache" / T.GPT2_TEACHER_DIRNAME == T.default_teacher_path(tmp_path / "cache",
                                                                                         family="gpt2")
    m = json.loads((out / "metrics.json").read_text())
    for key in ("unigram", "initial", "final"):
        assert math.isfinite(m[key]["perplexity"]) and 0 <= m[key]["top1"] <= 1
        assert m[key]["tokens"] == m["unigram"]["tokens"] > 0
    assert m["train_phase"]["steps"] == 40 and not m["train_phase"]["stopped_by_time_cap"]
    # trained: far better than the random start (about the vocabulary size), and close to the unigram model,
    # which is near the best possible here (tiny_corpus draws its words independently)
    assert m["final"]["perplexity"] < 0.5 * m["initial"]["perplexity"]
    assert m["final"]["perplexity"] < 1.3 * m["unigram"]["perplexity"]
    # a standard GPT2LMHeadModel folder (safetensors) with a GPT2TokenizerFast: BOS = EOS = <|endoftext|>
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    lm, tok = load_model(out, kind="causal", arg="teacher")
    assert isinstance(lm.model, GPT2LMHeadModel) and lm.kind == "causal" and lm.num_layers == 2
    assert isinstance(tok, GPT2TokenizerFast) and tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert len(tok) == lm.vocab_size == m["vocab_size"] <= 300
    assert tok.decode(tok("the cat sat.")["input_ids"]) == "the cat sat."  # byte-level: lossless
    # reloading gives the same figures: what was saved is what was measured
    td = tokenize_corpus(load_corpus(str(corpus)), tok, max_length=32, num_proc=1, cache_dir=tmp_path / "cache",
                         kind="causal")
    val = validation_batches(td["validation"], tok, 8, n_sequences=min(16 * 8, len(td["validation"])),
                             seed=EVAL_SEED, kind="causal")
    assert lm_metrics(lm, val)["perplexity"] == pytest.approx(m["final"]["perplexity"], rel=1e-4)
    # cached: a second call returns the folder without building
    mtime = (out / "metrics.json").stat().st_mtime
    assert T.build_gpt2_teacher(tmp_path / "cache", corpus=str(corpus), progress=False) == out
    assert (out / "metrics.json").stat().st_mtime == mtime
    with pytest.raises(FileNotFoundError, match="teacher: the default gpt2 teacher .*--family gpt2"):
        T.default_teacher_path(tmp_path / "other", build_if_missing=False, family="gpt2")
    with pytest.raises(ValueError, match="family must be one of"):
        T.default_teacher_dir(tmp_path, family="llama")
    with pytest.raises(ValueError, match="hidden must be a multiple of heads"):
        T.build_gpt2_teacher(tmp_path / "c2", corpus=str(corpus), hidden=30, heads=4, progress=False)


def test_build_command_family_gpt2(tmp_path, capsys):
    corpus = tiny_corpus(tmp_path)
    T.main(["build", "--family", "gpt2", "--cache-dir", str(tmp_path / "cache"), "--corpus", str(corpus),
            "--steps", "3", "--vocab-size", "280", "--layers", "1", "--hidden", "16", "--heads", "2",
            "--batch-size", "4", "--max-length", "16", "--eval-batches", "2"])
    printed = capsys.readouterr().out
    assert str(tmp_path / "cache" / T.GPT2_TEACHER_DIRNAME) in printed and "GPT-2 trained (3 steps)" in printed
    m = json.loads((tmp_path / "cache" / T.GPT2_TEACHER_DIRNAME / "metrics.json").read_text())
    assert (m["layers"], m["hidden"], m["steps"], m["validation_batches"]) == (1, 16, 3, 2)
    with pytest.raises(SystemExit):  # the MiniLM builder's options are refused for gpt2
        T.main(["build", "--family", "gpt2", "--encoder", str(tmp_path)])
    assert "--encoder / --tokenizer belong to --family minilm" in capsys.readouterr().err


def test_reused_default_teacher_says_its_build_was_time_capped(tmp_path):
    """A default teacher whose build hit its time cap is reused with a warning naming the phase and the
    rebuild command; a complete build is reused silently (the control)."""
    import warnings

    from iit_fast.cache import built_default_teacher, default_teacher_dir

    out = default_teacher_dir(tmp_path, "gpt2")
    out.mkdir(parents=True)
    metrics = {"steps": 280, "train_phase": {"steps": 60, "stopped_by_time_cap": True}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    with pytest.warns(UserWarning, match=r"time cap \(train_phase: 60 of 280 steps\).*--family gpt2 --force"):
        assert built_default_teacher(tmp_path, "gpt2") == out
    metrics["train_phase"]["stopped_by_time_cap"] = False
    (out / "metrics.json").write_text(json.dumps(metrics))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert built_default_teacher(tmp_path, "gpt2") == out
