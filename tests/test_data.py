"""Corpus building (cleaning, dedup, deterministic split), loading errors, tokenization, masking and
resumable batches, on tiny corpora written in tmp_path (no apt, no network)."""
from __future__ import annotations

import gzip
import json

import pytest
import torch
from transformers import BertTokenizerFast

from iit_fast import data as D

RST = """\
.. _tut-intro:

*********************
An Informal Tutorial
*********************

In the following examples, input and output are distinguished by the presence or
absence of prompts: to repeat the example, you must type everything after the prompt.

.. index:: single: comment

Many of the examples in this manual, even those entered at the interactive prompt,
include comments. The :func:`print` function writes the value of the ``argument(s)``
it is given, see :ref:`the tutorial <tut-strings>` for details::

   >>> print("hello")
   hello
   for x in range(10): pass

Strings can be *concatenated* with the ``+`` operator and repeated with the ``*`` operator, as
the section on `sequence types <https://example.org>`_ explains at length.

.. code-block:: python

   def this_is_code(x):
       return x + 1 if x else None

+------------+------------+
| a table    | row here   |
+------------+------------+

.. note::

   This is a note whose body is ordinary prose and should be kept in the corpus as well.

Short title
===========
"""

TEXT = """\
   1. Introduction
   1.1. Basics of the system
   10.3.2. Using GnuPG on files

    The Debian system is a collection of free software that is carefully
    assembled and maintained by a large group of volunteers around the world.^[3]

    +------------------------------+
    |package  |description          |
    +------------------------------+

    $ ls -l /usr/share/doc | head -n 3 | sort

    You should read the documentation that comes with each package before you
    change the default configuration files of the system.
"""

FORTUNES = """\
A day without sunshine is like, you know, night, and every night is shorter than it looks.
%
The trouble with doing something right the first time is that nobody appreciates how difficult it was.
		-- Walt West
%
A day without sunshine is like, you know, night, and every night is shorter than it looks.
%
Short one.
%
"""


def write_sources(root):
    (root / "doc").mkdir(parents=True)
    (root / "doc" / "tutorial.rst.txt").write_text(RST)
    with gzip.open(root / "reference.txt.gz", "wt") as f:
        f.write(TEXT)
    (root / "fortunes").mkdir()
    (root / "fortunes" / "misc").write_text(FORTUNES)
    (root / "fortunes" / "misc.dat").write_bytes(b"\x00\x01binary index")
    (root / "fortunes" / "again").write_text(FORTUNES.split("%")[0] + "%\n")  # a cross-file duplicate
    return [D.Source("docs", "rst", globs=[str(root / "doc" / "**" / "*.rst.txt")]),
            D.Source("reference", "text", globs=[str(root / "reference.txt.gz")]),
            D.Source("fortunes", "fortunes", globs=[str(root / "fortunes" / "*")]),
            D.Source("absent", "text", globs=[str(root / "not-installed" / "*.txt")])]


def read_split(folder):
    return {s: (folder / f"{s}.txt").read_text().splitlines() for s in ("train", "validation")}


def test_cleaning_dedup_and_deterministic_split(tmp_path):
    sources = write_sources(tmp_path / "src")
    out = D.build_corpus(sources, tmp_path / "c1", progress=False)
    splits = read_split(out)
    pars = splits["train"] + splits["validation"]
    text = "\n".join(pars)
    # cleaning: markup, code, tables, titles, shell lines, footnote marks and attributions are gone
    for bad in ("::", ">>>", "def this_is_code", "| a table", "+---", ":func:", "``", "Short title",
                "An Informal Tutorial", "$ ls", "^[3]", "Walt West", "1.1. Basics", "<https", "index"):
        assert bad not in text, bad
    assert "The print function writes the value of the argument(s) it is given, see the tutorial for details:" in text
    assert "Strings can be concatenated with the + operator" in text
    assert "the section on sequence types explains at length." in text
    assert any(p.startswith("This is a note whose body") for p in pars)
    assert any(p.startswith("The Debian system is a collection") and p.endswith("around the world.") for p in pars)
    assert all("\n" not in p and p == p.strip() and "  " not in p for p in pars)
    assert "Short one." not in pars  # fewer than MIN_WORDS words
    # dedup: the repeated fortune (in two files) is kept once
    assert sum(p.startswith("A day without sunshine") for p in pars) == 1
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"]["fortunes"]["duplicates_dropped"] == 2
    assert m["sources"]["absent"]["paragraphs"] == 0
    assert m["words"] == sum(len(p.split()) for p in pars)
    assert m["train"]["paragraphs"] == len(splits["train"]) >= 1 and len(splits["validation"]) >= 1
    # determinism: a rebuild gives identical files; the split of a paragraph does not depend on the order
    # of the sources
    again = read_split(D.build_corpus(sources, tmp_path / "c2", progress=False))
    assert again == splits
    rev = read_split(D.build_corpus(sources[::-1], tmp_path / "c3", progress=False))
    assert set(rev["train"]) == set(splits["train"]) and set(rev["validation"]) == set(splits["validation"])
    # the split is by hash of the paragraph: many paragraphs go ~2% to validation
    keys = [f"paragraph number {i} of a long synthetic corpus" for i in range(5000)]
    frac = sum(D._split_of(D.normalise(k)) == "validation" for k in keys) / len(keys)
    assert 0.01 < frac < 0.03


def test_build_corpus_without_text_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="corpus: no paragraphs found"):
        D.build_corpus([D.Source("none", "text", globs=[str(tmp_path / "*.txt")])], tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_default_corpus_is_cached(tmp_path, monkeypatch):
    sources = write_sources(tmp_path / "src")
    monkeypatch.setattr(D, "DEFAULT_SOURCES", sources)
    monkeypatch.setattr(D, "_install_debian_packages", lambda progress: None)
    folder = D.build_default_corpus(tmp_path / "cache", progress=False)
    assert folder == D.default_corpus_dir(tmp_path / "cache")
    mtime = (folder / "train.txt").stat().st_mtime_ns
    monkeypatch.setattr(D, "DEFAULT_SOURCES", [])  # would fail if it rebuilt
    assert D.build_default_corpus(tmp_path / "cache", progress=False) == folder
    assert (folder / "train.txt").stat().st_mtime_ns == mtime
    dd = D.load_corpus(None, cache_dir=tmp_path / "cache")
    assert set(dd) == {"train", "validation"} and dd["train"].column_names == ["text"]


def test_load_corpus_local_files_and_errors(tmp_path):
    pars = [f"This is paragraph number {i} of a small corpus, written for the test." for i in range(60)]
    (tmp_path / "a.txt").write_text("\n\n".join(pars[:30]) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in pars[30:] + pars[:5]))
    dd = D.load_corpus(str(tmp_path))
    assert set(dd) == {"train", "validation"} and dd["train"].column_names == ["text"]
    got = list(dd["train"]["text"]) + list(dd["validation"]["text"])
    assert sorted(got) == sorted(pars) and len(dd["validation"]) >= 1  # the 5 duplicates dropped
    assert D.load_corpus([str(tmp_path / "a.txt")])["train"].num_rows + 1 >= 29
    # named split files are used as given
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "train.txt").write_text("\n".join(pars[:10]) + "\n")
    (tmp_path / "named" / "validation.txt").write_text("\n".join(pars[10:12]) + "\n")
    dd = D.load_corpus(tmp_path / "named")
    assert len(dd["train"]) == 10 and list(dd["validation"]["text"]) == pars[10:12]
    with pytest.raises(FileNotFoundError, match="corpus: .*does not exist; expected"):
        D.load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="corpus: .*no .txt/.jsonl"):
        D.load_corpus(str(tmp_path / "empty"))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="corpus: .*holds no text"):
        D.load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"body": "no text column here"}\n')
    with pytest.raises(ValueError, match="corpus: .*expected a column named 'text'"):
        D.load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="corpus: an empty string"):
        D.load_corpus("")


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


def test_mask_tokens():
    B, S = 64, 48
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (B, S))
    lengths = torch.randint(3, S + 1, (B,))  # at least one token between [CLS] and [SEP]
    am = (torch.arange(S)[None] < lengths[:, None]).long()
    special = torch.zeros(B, S, dtype=torch.bool)
    special[:, 0] = True
    special[torch.arange(B), lengths - 1] = True
    ids[special] = 3
    ids[am == 0] = 0
    am[-1, 2:] = 0
    special[-1, :2] = True  # a row with no eligible token
    masked, labels = D.mask_tokens(ids, am, special, mask_token_id=4, vocab_size=1000, generator=g,
                                   mlm_probability=0.15)
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
    again = D.mask_tokens(ids, am, special, mask_token_id=4, vocab_size=1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


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
    rows = lambda r: [tuple(x) for i in r._epoch_batches(0) for x in [i.tolist()]]
    assert not set(sum(rows(r0), ())) & set(sum(rows(r1), ()))
    # no shuffle, no drop: every sequence in order, the last batch short
    plain = D.MLMBatches(train, tok, 7, seed=0, shuffle=False, group_by_length=False, drop_last=False)
    assert sum(x["input_ids"].shape[0] for x in plain) == len(train)
    with pytest.raises(ValueError, match="batch_size"):
        D.MLMBatches(train, tok, 10_000, seed=0)


def test_publish_folder_first_writer_wins(tmp_path):
    """Two ranks (or concurrent runs) building the same cache: the second keeps the first's folder, which a
    process may be reading, instead of removing it; replace=True swaps in the new one."""
    from iit_fast.data import publish_folder
    final = tmp_path / "cache" / "thing"
    for name, text in (("a", "first"), ("b", "second"), ("c", "third")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(text)
    publish_folder(tmp_path / "a", final, replace=False)
    assert (final / "f.txt").read_text() == "first" and not (tmp_path / "a").exists()
    publish_folder(tmp_path / "b", final, replace=False)
    assert (final / "f.txt").read_text() == "first" and not (tmp_path / "b").exists()
    publish_folder(tmp_path / "c", final, replace=True)
    assert (final / "f.txt").read_text() == "third" and not (tmp_path / "c").exists()
