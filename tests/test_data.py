"""Tokenization (masked and causal packing), masking through transformers' collator, the resumable
DataLoader batches and validation batches fixed per row, on tiny corpora written in tmp_path."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import BertTokenizerFast

from iit_fast import data as D

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
    dd = D.load_corpus(str(tmp_path / "c.txt"))
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
    collator = D.mlm_collator(tok, mlm_probability=0.15)
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
    masked, labels = D.mask_tokens(ids, am, special, collator=collator, generator=g)
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
    again = D.mask_tokens(ids, am, special, collator=collator, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    other = D.mask_tokens(ids, am, special, collator=collator, generator=torch.Generator().manual_seed(1))
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
    collator = D.mlm_collator(tok, mlm_probability=1e-9)
    masked, labels = D.mask_tokens(ids, am, special, collator=collator, generator=torch.Generator().manual_seed(3))
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
    mk = lambda **kw: D.MLMBatches(train, tok, 4, seed=7, **kw)
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
    r0 = D.MLMBatches(train, tok, 4, seed=7, rank=0, world_size=2)
    r1 = D.MLMBatches(train, tok, 4, seed=7, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(b) // 2
    rows = lambda r: [tuple(x) for i in r.sampler.epoch_batches(0) for x in [i.tolist()]]
    assert not set(sum(rows(r0), ())) & set(sum(rows(r1), ()))
    # no shuffle, no drop: every sequence in order, the last batch short
    plain = D.MLMBatches(train, tok, 7, seed=0, shuffle=False, group_by_length=False, drop_last=False)
    assert sum(x["input_ids"].shape[0] for x in plain) == len(train)
    with pytest.raises(ValueError, match="batch_size"):
        D.MLMBatches(train, tok, 10_000, seed=0)


