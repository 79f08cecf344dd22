"""Tokenization (masked and causal packing), masking through transformers' collator, the resumable
DataLoader batches and validation batches fixed per row, on tiny corpora written in tmp_path."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import BertTokenizerFast

from iit_fast import batches as DB, data as D
from iit_fast.corpus import load_corpus


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """load_corpus without cache_dir writes arrow files into DEFAULT_CACHE: a test's own, not the user's."""
    import iit_fast.corpus
    import iit_fast.corpus_build
    for module in (iit_fast.corpus, iit_fast.corpus_build):  # the loader's arrow files, the default corpus
        monkeypatch.setattr(module, "DEFAULT_CACHE", tmp_path / "default-cache")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + \
    "this is paragraph number of a small corpus written for the test and some more words".split() + \
    [str(i) for i in range(10)] + list("bcdefghjklmnopqrsuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]


@pytest.fixture
def tok():
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)


def tokenized(tmp_path, tok, max_length=16, n=200):
    g = torch.Generator().manual_seed(0)
    pars = []
    for i in range(n):  # varied lengths, some longer than a whole sequence
        k = int(torch.randint(3, 40, (1,), generator=g))
        pars.append(" ".join(["this is paragraph number", str(i)] + ["the test and some more words"] * (k // 6)) + ".")
    (tmp_path / "c.txt").write_text("\n\n".join(pars) + "\n")
    dd = load_corpus(str(tmp_path / "c.txt"))
    return dd, D.tokenize_corpus(dd, tok, max_length=max_length, num_proc=2, cache_dir=tmp_path / "cache")


def test_tokenize_corpus_packs_and_caches(tmp_path, tok):
    dd, td = tokenized(tmp_path, tok)
    for split in ("train", "validation"):
        for ids, n in zip(td[split]["input_ids"], td[split]["length"]):
            assert len(ids) == n <= 16 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
            assert tok.pad_token_id not in ids
    assert max(td["train"]["length"]) == 16 and min(td["train"]["length"]) < 16
    cached = list((tmp_path / "cache" / "tokenized").iterdir())
    assert len(cached) == 1
    td2 = D.tokenize_corpus(dd, tok, max_length=16, num_proc=2, cache_dir=tmp_path / "cache")
    assert list(td2["train"]["input_ids"]) == list(td["train"]["input_ids"])
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1  # loaded, not rebuilt
    D.tokenize_corpus(dd, tok, max_length=24, num_proc=1, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2  # another key


def test_mask_tokens(tok):
    B, S = 64, 48
    g = torch.Generator().manual_seed(0)
    collator = DB.mlm_collator(tok, mlm_probability=0.15)
    ids = torch.randint(7, len(tok), (B, S))
    lengths = torch.randint(3, S + 1, (B,))  # at least one token between [CLS] and [SEP]
    am = (torch.arange(S)[None] < lengths[:, None]).long()
    special = torch.zeros(B, S, dtype=torch.bool)
    special[:, 0] = True
    special[torch.arange(B), lengths - 1] = True
    ids[special] = 3
    ids[am == 0] = 0
    am[-1, 2:] = 0
    special[-1, :2] = True  # a row with no eligible token
    before = ids.clone()
    masked, labels = DB.mask_tokens(ids, am, special, collator=collator, generator=g)
    assert torch.equal(ids, before) and tok.mask_token_id == 4
    chosen = labels != -100
    assert not (chosen & (special | (am == 0))).any()
    assert (labels[chosen] == ids[chosen]).all()
    assert (masked[~chosen] == ids[~chosen]).all()
    eligible = (am == 1) & ~special
    assert chosen[:-1].any(1).all() and not chosen[-1].any()  # every row with a candidate has a target
    assert 0.12 < chosen.sum() / eligible.sum() < 0.19
    n = chosen.sum()
    as_mask = (masked[chosen] == 4).sum() / n
    kept = (masked[chosen] == ids[chosen]).sum() / n
    assert 0.7 < as_mask < 0.9 and 0.04 < kept < 0.2
    # the same generator seed gives the same masking; the input is untouched
    again = DB.mask_tokens(ids, am, special, collator=collator, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    other = DB.mask_tokens(ids, am, special, collator=collator, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other[1], labels)


def test_mask_tokens_gives_every_row_a_target(tok):
    """With a tiny probability the collator's coin flips choose (almost) nothing: every row with an eligible
    token still gets exactly one target, drawn among its eligible positions and corrupted 80/10/10."""
    B, S = 4000, 12
    ids = torch.randint(7, len(tok), (B, S))
    am = torch.ones(B, S, dtype=torch.long)
    am[:, 9:] = 0
    special = torch.zeros(B, S, dtype=torch.bool)
    special[:, 0] = special[:, 8] = True
    am[0] = 0  # a row of padding only: no target
    collator = DB.mlm_collator(tok, mlm_probability=1e-9)
    masked, labels = DB.mask_tokens(ids, am, special, collator=collator, generator=torch.Generator().manual_seed(3))
    chosen = labels != -100
    assert chosen.sum(1)[1:].eq(1).all() and not chosen[0].any()
    assert not chosen[:, [0, 8, 9, 10, 11]].any()
    cols = chosen[1:].float().argmax(1)
    assert cols.min() == 1 and cols.max() == 7 and cols.bincount()[1:].min() > 400  # spread over the eligible ones
    pick = chosen[1:]
    as_mask = (masked[1:][pick] == tok.mask_token_id).float().mean()
    kept = (masked[1:][pick] == ids[1:][pick]).float().mean()
    assert 0.77 < as_mask < 0.83 and 0.08 < kept < 0.13


def test_mlm_batches_layout_and_resume(tmp_path, tok):
    _, td = tokenized(tmp_path, tok, max_length=24, n=300)
    train = td["train"]
    mk = lambda **kw: DB.build_train_loader(train, tok, 4, seed=7, **kw)
    b = mk()
    assert len(b) == len(train) // 4
    first = list(b)
    assert len(first) == len(b) and b.state_dict() == {"epoch": 1, "batch_index": 0}
    for batch in first:
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == am.shape == labels.shape == batch["token_type_ids"].shape and ids.dtype == torch.long
        assert ids.shape[1] % 8 == 0 and ids.shape[1] - am.sum(1).max() < 8  # padded to the longest row only
        assert (am.sum(1, keepdim=True) > torch.arange(ids.shape[1])).long().eq(am).all()  # right-padded
        assert ((labels != -100) & (am == 0)).sum() == 0 and (labels != -100).any(1).all()
        assert (ids[am == 0] == tok.pad_token_id).all()
    # every row once per epoch; another epoch is another order
    second = list(b)
    assert sum(x["attention_mask"].sum() for x in first) == sum(x["attention_mask"].sum() for x in second)
    assert any(not torch.equal(x["labels"], y["labels"]) for x, y in zip(first, second))
    # resume: stop after 5 batches of epoch 1, restore into a fresh object, the rest is identical
    ref = mk()
    ref.load_state_dict({"epoch": 1, "batch_index": 0})
    full = list(ref)
    part = mk()
    part.load_state_dict({"epoch": 1, "batch_index": 0})
    it = iter(part)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(part.state_dict()))
    assert state == {"epoch": 1, "batch_index": 5}
    resumed = mk()
    resumed.load_state_dict(state)
    tail = list(resumed)
    for x, y in zip(head + tail, full):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert len(head + tail) == len(full) and resumed.state_dict() == {"epoch": 2, "batch_index": 0}
    # grouping by length cuts padding
    pad = lambda bb: sum((x["attention_mask"] == 0).sum().item() for x in bb)
    assert pad(list(mk(group_by_length=True))) < pad(list(mk(group_by_length=False)))
    # ranks: equal counts, disjoint rows of the same epoch
    r0 = DB.build_train_loader(train, tok, 4, seed=7, rank=0, world_size=2)
    r1 = DB.build_train_loader(train, tok, 4, seed=7, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(b) // 2
    rows = lambda r: [tuple(x) for i in r.sampler.epoch_batches(0) for x in [i.tolist()]]
    assert not set(sum(rows(r0), ())) & set(sum(rows(r1), ()))
    # no shuffle, no drop: every sequence in order, the last batch short
    plain = DB.build_train_loader(train, tok, 7, seed=0, shuffle=False, group_by_length=False, drop_last=False)
    assert sum(x["input_ids"].shape[0] for x in plain) == len(train)
    with pytest.raises(ValueError, match="batch_size"):
        DB.build_train_loader(train, tok, 10_000, seed=0)




def test_loader_batches_do_not_depend_on_workers_and_resume_exactly(tmp_path, tok):
    """The batches and their masks are a function of (seed, epoch, batch index, rank): 0 workers and 2
    (persistent) workers give the same ones, across an epoch boundary; a loader restored at (epoch, j),
    with workers, gives exactly the tail; stopping early with workers prefetching still counts only the
    batches handed out."""
    _, td = tokenized(tmp_path, tok, max_length=24, n=300)
    mk = lambda w, rank=0, world=1: DB.build_train_loader(td["train"], tok, 4, seed=11, num_workers=w, rank=rank,
                                                         world_size=world)
    same = lambda xs, ys: len(xs) == len(ys) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                                     for x, y in zip(xs, ys))
    ref, par = mk(0), mk(2)
    ref_epochs = [list(ref), list(ref)]
    par_epochs = [list(par), list(par)]
    assert same(ref_epochs[0], par_epochs[0]) and same(ref_epochs[1], par_epochs[1])
    assert not same(ref_epochs[0], ref_epochs[1])
    assert par.state_dict() == {"epoch": 2, "batch_index": 0}
    # stop after 5 batches of epoch 1 (workers have prefetched more), save, restore into a fresh loader
    part = mk(2)
    part.load_state_dict({"epoch": 1, "batch_index": 0})
    it = iter(part)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(part.state_dict()))
    assert state == {"epoch": 1, "batch_index": 5}
    tail = list(part)  # the same loader, iterated again (persistent workers reset): the rest of the epoch
    assert same(head + tail, ref_epochs[1])
    resumed = mk(2)
    resumed.load_state_dict(state)
    assert same(list(resumed), ref_epochs[1][5:]) and resumed.state_dict() == {"epoch": 2, "batch_index": 0}
    # a rank's batches are the same with or without workers, and differ from the other rank's
    r1 = list(mk(2, rank=1, world=2))
    assert same(r1, list(mk(0, rank=1, world=2))) and not same(r1, list(mk(0, rank=0, world=2)))
    with pytest.raises(ValueError, match="state: epoch 0, batch_index 999"):
        mk(0).load_state_dict({"epoch": 0, "batch_index": 999})
    with pytest.raises(ValueError, match="num_workers"):
        mk(-1)
    with pytest.raises(ValueError, match="kind: 'mlm'"):
        DB.build_train_loader(td["train"], tok, 4, seed=0, kind="mlm")


def _rows_of(batches, batch_size):
    """(row, masked input ids, target positions, labels at them) of every real row of a list of batches."""
    out = set()
    for b, batch in enumerate(batches):
        assert batch["input_ids"].shape[1] % 8 == 0
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
            lab = batch["labels"][i]
            pos = (lab != -100).nonzero().squeeze(1)
            out.add((b * batch_size + i, tuple(batch["input_ids"][i, :n].tolist()), tuple(pos.tolist()),
                     tuple(lab[pos].tolist())))
    return out


def test_validation_batches_do_not_depend_on_batch_size(tmp_path, tok):
    _, td = tokenized(tmp_path, tok, max_length=24, n=300)
    split = td["train"]
    rows = {bs: _rows_of(DB.validation_batches(split, tok, bs, n_sequences=40, seed=5), bs) for bs in (3, 8, 16)}
    assert rows[3] == rows[8] == rows[16] and len(rows[3]) == 40
    assert sorted(r[0] for r in rows[3]) == list(range(40))  # the first 40 sequences, in order
    assert all(r[2] for r in rows[3])  # every row has a target
    for r in rows[3]:  # targets are the sequence's own tokens, never its cls/sep
        ids = split[r[0]]["input_ids"]
        assert all(ids[p] == t and ids[p] not in (tok.cls_token_id, tok.sep_token_id) for p, t in zip(r[2], r[3]))
    b16 = DB.validation_batches(split, tok, 16, n_sequences=40, seed=5)
    assert [b["input_ids"].shape[0] for b in b16] == [16, 16, 8] and "token_type_ids" in b16[0]
    other = _rows_of(DB.validation_batches(split, tok, 8, n_sequences=40, seed=6), 8)
    assert other != rows[8] and {r[0] for r in other} == {r[0] for r in rows[8]}
    assert len(DB.validation_batches(split, tok, 8, seed=5)) == -(-len(split) // 8)  # None: all
    with pytest.raises(ValueError, match="n_sequences: 0"):
        DB.validation_batches(split, tok, 8, n_sequences=0, seed=5)
    with pytest.raises(ValueError, match="batch_size: 0"):
        DB.validation_batches(split, tok, 0, seed=5)


def _byte_level_bpe(texts, specials):
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False)
    return bpe._tokenizer


def _docs(n=120):
    g = torch.Generator().manual_seed(1)
    words = "the model reads a small corpus of plain words written for this test and nothing more".split()
    return [" ".join(words[int(i)] for i in torch.randint(len(words), (int(torch.randint(2, 30, (1,), generator=g)),),
                                                          generator=g)) + "." for _ in range(n)]


def _splits(docs, train=None):
    """A corpus of `train` (default: the first 100 docs) and a validation split of the docs after the 100th."""
    import datasets
    train = docs[:100] if train is None else train
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                                 "validation": datasets.Dataset.from_dict({"text": docs[100:]})})


def _gpt2(docs):
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast(tokenizer_object=_byte_level_bpe(docs, ["<|endoftext|>"]), bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def _roberta(docs):
    """A RoBERTa-style tokenizer (<s>, </s>, <pad>, <mask>) trained on `docs`."""
    from transformers import RobertaTokenizerFast
    return RobertaTokenizerFast(tokenizer_object=_byte_level_bpe(docs, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]),
                                bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
                                unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def test_causal_packing_and_batches_with_gpt2_tokenizer(tmp_path):
    """kind="causal": documents + EOS streamed into sequences of exactly max_length tokens (the last one
    shorter), no padding in the data; batches pad with EOS (GPT-2 has no pad token) but label only the real
    tokens, so the EOS between documents stays a target."""
    docs = _docs()
    gpt2 = _gpt2(docs)
    eos = gpt2.eos_token_id
    assert gpt2.pad_token_id is None and gpt2.cls_token_id is None
    dd = _splits(docs)
    td = D.tokenize_corpus(dd, gpt2, max_length=16, num_proc=1, cache_dir=tmp_path / "cache", kind="causal")
    for split in ("train", "validation"):
        seqs = list(td[split]["input_ids"])
        assert [len(s) for s in seqs[:-1]] == [16] * (len(seqs) - 1) and 1 <= len(seqs[-1]) <= 16
        assert list(td[split]["length"]) == [len(s) for s in seqs]
        stream = [t for text in dd[split]["text"] for t in gpt2(text, add_special_tokens=False)["input_ids"] + [eos]]
        assert sum(seqs, []) == stream
    # masked tokenization needs a mask token: a clear error for a decoder's tokenizer
    with pytest.raises(ValueError, match="tokenizer: .*no mask token"):
        D.tokenize_corpus(dd, gpt2, max_length=16, num_proc=1, cache_dir=tmp_path / "cache", kind="masked")
    loader = DB.build_train_loader(td["train"], gpt2, 4, kind="causal", seed=0, shuffle=False,
                                  group_by_length=False, drop_last=False)
    batches = list(loader)
    assert gpt2.pad_token_id is None  # pad = eos for collation only
    assert sum(b["attention_mask"].sum().item() for b in batches) == sum(td["train"]["length"])
    last = batches[-1]
    assert set(last) == {"input_ids", "attention_mask", "labels"}
    am, ids, labels = last["attention_mask"], last["input_ids"], last["labels"]
    assert (am == 0).any() and (ids[am == 0] == eos).all() and (labels[am == 0] == -100).all()
    assert torch.equal(labels[am == 1], ids[am == 1])
    assert all((b["labels"] == eos).any() for b in batches)  # document ends are targets
    # validation: rows fixed, labels = ids on real tokens, whatever the batch size
    v3 = _rows_of(DB.validation_batches(td["train"], gpt2, 3, n_sequences=10, seed=0, kind="causal"), 3)
    v8 = _rows_of(DB.validation_batches(td["train"], gpt2, 8, n_sequences=10, seed=0, kind="causal"), 8)
    assert v3 == v8 and all(r[1] == r[3] for r in v3)


def test_masked_tokenization_reads_special_tokens_from_the_tokenizer(tmp_path):
    """A RoBERTa-style tokenizer (<s>, </s>, <pad>, <mask>): sequences open with its cls and close each
    paragraph with its sep; masking never picks them; padding uses its pad id."""
    docs = _docs()
    rob = _roberta(docs)
    dd = _splits(docs)
    td = D.tokenize_corpus(dd, rob, max_length=24, num_proc=1, cache_dir=tmp_path / "cache")
    for ids in td["train"]["input_ids"]:
        assert ids[0] == rob.convert_tokens_to_ids("<s>") and ids[-1] == rob.convert_tokens_to_ids("</s>")
        assert ids.count(rob.cls_token_id) == 1 and rob.pad_token_id not in ids
    for batch in DB.build_train_loader(td["train"], rob, 8, seed=0):
        am, labels = batch["attention_mask"], batch["labels"]
        targets = labels[labels != -100]
        assert len(targets) and not set(targets.tolist()) & {rob.cls_token_id, rob.sep_token_id, rob.pad_token_id}
        assert (batch["input_ids"][am == 0] == rob.pad_token_id).all()
        assert (batch["input_ids"] == rob.mask_token_id).any()


def test_long_line_cut_text_joins_back_and_cuts_before_spaces():
    text = "word " * 5000 + "x" * 30000 + " tail end"
    pieces = D.cut_text(text, limit=1000)
    assert "".join(pieces) == text and all(1 <= len(p) <= 1000 for p in pieces)
    spaced = [p for p in pieces[1:] if p.startswith(" ")]
    assert len(spaced) >= 20  # the worded part is cut before a space; the 30k run of 'x' is cut hard
    assert any(set(p) == {"x"} and len(p) == 1000 for p in pieces)
    assert D.cut_text("short", 1000) == ["short"]


def test_long_line_tokenised_in_bounded_calls_with_one_eos(tmp_path, monkeypatch):
    """A document far longer than PIECE_CHARS: every tokenizer call gets at most TOKENIZE_CHARS characters and
    no text longer than PIECE_CHARS (a 50 MB line in one call took 11 GB), yet the causal stream is the
    whole document's tokens followed by one EOS, as if it had been tokenised whole."""
    monkeypatch.setattr(D, "PIECE_CHARS", 500)
    monkeypatch.setattr(D, "TOKENIZE_CHARS", 2000)
    docs = _docs()
    long_doc = " ".join(docs) * 3  # ~ 20k characters, one line
    gpt2 = _gpt2(docs)
    calls = []
    real_call = type(gpt2).__call__

    def spy(self, text, *a, **k):
        texts = [text] if isinstance(text, str) else list(text)
        calls.append((sum(map(len, texts)), max(map(len, texts))))
        return real_call(self, text, *a, **k)

    monkeypatch.setattr(type(gpt2), "__call__", spy)
    train = docs[:3] + [long_doc] + docs[3:20]
    dd = _splits(docs, train)
    td = D.tokenize_corpus(dd, gpt2, max_length=16, num_proc=1, cache_dir=tmp_path / "cache", kind="causal")
    assert calls and max(c[0] for c in calls) <= 2000 and max(c[1] for c in calls) <= 500
    assert [p.name for p in (tmp_path / "cache" / "tokenized").iterdir()] == [td.cache_files["train"][0]
                                                                              ["filename"].split("/")[-3]]
    monkeypatch.setattr(type(gpt2), "__call__", real_call)
    eos = gpt2.eos_token_id
    stream = [t for text in train for t in gpt2(text, add_special_tokens=False)["input_ids"] + [eos]]
    got = sum(list(td["train"]["input_ids"]), [])
    assert got == stream  # one EOS per document, none between the pieces of the long one
    seqs = list(td["train"]["input_ids"])
    assert all(len(s) == 16 for s in seqs[:-1])


def test_long_line_masked_packing_unchanged_for_short_rows_and_bounded_for_long(tmp_path, monkeypatch):
    """Masked packing: short paragraphs pack as before the cut existed; a long one is cut into sequences of
    its tokens (no sequence over max_length, every token of the long paragraph but the dropped short tails)."""
    docs = _docs()
    rob = _roberta(docs)
    dd = _splits(docs)
    before = D.tokenize_corpus(dd, rob, max_length=24, num_proc=1, cache_dir=tmp_path / "a")
    monkeypatch.setattr(D, "PIECE_CHARS", 40)  # every doc longer than 40 characters is now cut
    cut = D.tokenize_corpus(dd, rob, max_length=24, num_proc=1, cache_dir=tmp_path / "b")
    monkeypatch.setattr(D, "PIECE_CHARS", 10 ** 6)
    same = D.tokenize_corpus(dd, rob, max_length=24, num_proc=1, cache_dir=tmp_path / "c")
    assert list(same["train"]["input_ids"]) == list(before["train"]["input_ids"])
    assert list(cut["train"]["input_ids"]) != list(before["train"]["input_ids"])  # the cut does act
    assert max(cut["train"]["length"]) <= 24


def test_long_line_causal_pack_streams_across_reads(tmp_path, monkeypatch):
    """The streamed causal packing carries the tokens of a read that do not fill a sequence into the next
    read: with 3 documents per read the sequences are those of one pass over the whole split."""
    docs = _docs()
    gpt2 = _gpt2(docs)
    dd = _splits(docs)
    whole = D.tokenize_corpus(dd, gpt2, max_length=16, num_proc=1, cache_dir=tmp_path / "a", kind="causal")
    monkeypatch.setattr(D, "PACK_ROWS", 3)
    small = D.tokenize_corpus(dd, gpt2, max_length=16, num_proc=1, cache_dir=tmp_path / "b", kind="causal")
    assert list(small["train"]["input_ids"]) == list(whole["train"]["input_ids"])
    assert [len(s) for s in small["train"]["input_ids"][:-1]] == [16] * (len(small["train"]) - 1)
