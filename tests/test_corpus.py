"""Corpus building (cleaning, dedup, deterministic split), the default corpus's packages, loading and its
errors, and cache publishing, on tiny corpora written in tmp_path (no apt, no network)."""
from __future__ import annotations

import gzip
import json

import pytest

from iit_fast import corpus as D, corpus_build as B


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """load_corpus without cache_dir writes arrow files into DEFAULT_CACHE: a test's own, not the user's."""
    for module in (D, B):  # the loader's arrow files and the default corpus's folder
        monkeypatch.setattr(module, "DEFAULT_CACHE", tmp_path / "default-cache")

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
    return [B.Source("docs", "rst", globs=[str(root / "doc" / "**" / "*.rst.txt")]),
            B.Source("reference", "text", globs=[str(root / "reference.txt.gz")]),
            B.Source("fortunes", "fortunes", globs=[str(root / "fortunes" / "*")]),
            B.Source("absent", "text", globs=[str(root / "not-installed" / "*.txt")])]


def read_split(folder):
    return {s: (folder / f"{s}.txt").read_text().splitlines() for s in ("train", "validation")}


def test_cleaning_dedup_and_deterministic_split(tmp_path):
    sources = write_sources(tmp_path / "src")
    out = B.build_corpus(sources, tmp_path / "c1", progress=False)
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
    again = read_split(B.build_corpus(sources, tmp_path / "c2", progress=False))
    assert again == splits
    rev = read_split(B.build_corpus(sources[::-1], tmp_path / "c3", progress=False))
    assert set(rev["train"]) == set(splits["train"]) and set(rev["validation"]) == set(splits["validation"])
    # the split is by hash of the paragraph: many paragraphs go ~2% to validation
    keys = [f"paragraph number {i} of a long synthetic corpus" for i in range(5000)]
    frac = sum(B._split_of(B.normalise(k)) == "validation" for k in keys) / len(keys)
    assert 0.01 < frac < 0.03


def test_build_corpus_without_text_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="corpus: no paragraphs found"):
        B.build_corpus([B.Source("none", "text", globs=[str(tmp_path / "*.txt")])], tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_default_corpus_is_cached(tmp_path, monkeypatch):
    sources = write_sources(tmp_path / "src")
    monkeypatch.setattr(B, "DEFAULT_SOURCES", sources)
    def no_install(*a, **k):
        raise AssertionError("the library installed packages")
    monkeypatch.setattr(B, "install_debian_packages", no_install)
    folder = B.build_default_corpus(tmp_path / "cache", progress=False)
    assert folder == B.default_corpus_dir(tmp_path / "cache")
    mtime = (folder / "train.txt").stat().st_mtime_ns
    monkeypatch.setattr(B, "DEFAULT_SOURCES", [])  # would fail if it rebuilt
    assert B.build_default_corpus(tmp_path / "cache", progress=False) == folder
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


def test_publish_folder_first_writer_wins(tmp_path):
    """Two ranks (or concurrent runs) building the same cache: the second keeps the first's folder, which a
    process may be reading, instead of removing it; replace=True swaps in the new one."""
    from iit_fast.cache import publish_folder
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


def test_default_corpus_names_missing_packages_and_never_installs(tmp_path, monkeypatch):
    """A source whose Debian package is not installed: building the default corpus fails, names the package
    and the command that installs it, and installs nothing (only the CLI flag may)."""
    sources = write_sources(tmp_path / "src")
    sources.append(B.Source("manual", "text", "some-manual-pkg", [str(tmp_path / "no" / "*.txt")]))
    sources.append(B.Source("tool", "kjv", "some-tool-pkg", command=["no-such-command-iit-fast"]))
    assert B.missing_packages(sources) == ["some-manual-pkg", "some-tool-pkg"]
    monkeypatch.setattr(B, "DEFAULT_SOURCES", sources)
    calls = []
    monkeypatch.setattr(B.subprocess, "run", lambda *a, **k: calls.append(a))
    with pytest.raises(FileNotFoundError, match=r"some-manual-pkg some-tool-pkg.*apt-get install -y "
                                                r"some-manual-pkg some-tool-pkg.*--install-packages"):
        B.build_default_corpus(tmp_path / "cache", progress=False)
    assert calls == [] and not B.default_corpus_dir(tmp_path / "cache").exists()
    # the CLI flag without root is an error that says what it needs (never a silent skip)
    monkeypatch.setattr(B.os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="--install-packages: .*needs root"):
        B.install_debian_packages(["some-manual-pkg"])
    assert calls == []
    with pytest.raises(SystemExit):  # --install-packages only for the default corpus
        D.main(["build", "--corpus", str(tmp_path), "--install-packages"])


def test_load_corpus_rejects_binary_and_empty_files(tmp_path):
    good = "A paragraph of plain English text that is long enough to count as prose here.\n"
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.txt").write_text(good * 3)
    (tmp_path / "ok" / "b.txt").write_text("Another paragraph, different from the first one, in a second file.\n")
    assert len(D.load_corpus(str(tmp_path / "ok"))["train"]) >= 1
    (tmp_path / "bin.txt").write_bytes(good.encode() + b"\x00\x01\x02 model weights")
    with pytest.raises(ValueError, match=r"corpus: .*bin\.txt contains NUL bytes"):
        D.load_corpus(str(tmp_path / "bin.txt"))
    (tmp_path / "latin.txt").write_bytes(("caf\xe9 na\xefve r\xe9sum\xe9 " * 20).encode("latin-1"))
    with pytest.raises(ValueError, match=r"corpus: .*latin\.txt is not UTF-8 text"):
        D.load_corpus(str(tmp_path / "latin.txt"))
    # one stray invalid byte in a long text is tolerated (replaced)
    lines = "".join(f"Line {i}: {good}" for i in range(20))
    (tmp_path / "mostly.txt").write_bytes(lines.encode() + b"\xff\n" + lines.encode())
    assert len(D.load_corpus(str(tmp_path / "mostly.txt"))["train"]) >= 10
    # an empty file inside a folder is named, not silently skipped
    (tmp_path / "ok" / "c.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"corpus: .*c\.txt holds no text"):
        D.load_corpus(str(tmp_path / "ok"))


def _pars(n, tag="paragraph"):
    return [f"This is {tag} number {i} of a streamed corpus, written for the test." for i in range(n)]


def test_corpus_stream_jsonl_parquet_glob_dedup_and_split(tmp_path):
    """.jsonl + .parquet + .txt through load_dataset: arrow-backed (memory-mapped, never a Python list), the
    duplicates dropped by hash, and each paragraph in the split its normalised text's hash names (the rule of
    the default corpus's build), whatever file it came from."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pars = _pars(300)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("".join(json.dumps({"text": p, "id": i}) + "\n"
                                                    for i, p in enumerate(pars[:150])))
    pq.write_table(pa.table({"text": pars[150:250] + pars[:10]}), tmp_path / "d" / "b.parquet")  # 10 duplicates
    (tmp_path / "d" / "c.txt").write_text("\n".join(pars[250:]) + "\n" + pars[0].upper() + "\n")  # same key
    dd = D.load_corpus(str(tmp_path / "d" / "*"), cache_dir=tmp_path / "cache")
    for split in ("train", "validation"):
        assert dd[split].cache_files, "expected arrow files on disk, not an in-memory dataset"
        assert dd[split].column_names == ["text"]
    got = list(dd["train"]["text"]) + list(dd["validation"]["text"])
    assert sorted(got) == sorted(pars)
    assert list(dd["validation"]["text"]) == [p for p in pars if B._split_of(B.normalise(p)) == "validation"]
    assert 0 < len(dd["validation"]) < 20
    # the same through a folder, a list, and a comma-separated string
    folder = D.load_corpus(tmp_path / "d", cache_dir=tmp_path / "cache")
    listed = D.load_corpus(",".join(str(tmp_path / "d" / f) for f in ("a.jsonl", "b.parquet", "c.txt")),
                           cache_dir=tmp_path / "cache")
    assert list(folder["train"]["text"]) == list(listed["train"]["text"]) == list(dd["train"]["text"])
    with pytest.raises(FileNotFoundError, match="corpus: the pattern .*matches no"):
        D.load_corpus(str(tmp_path / "d" / "*.nothing"), cache_dir=tmp_path / "cache")


def test_corpus_stream_cache_follows_file_changes(tmp_path):
    """The arrow cache and the tokenized cache are keyed by the files' state: an edited file is read again."""
    from transformers import BertTokenizerFast
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": p}) + "\n" for p in _pars(60)))
    first = D.load_corpus(str(f), cache_dir=tmp_path / "cache")
    import time
    time.sleep(0.01)
    f.write_text("".join(json.dumps({"text": p}) + "\n" for p in _pars(60, "changed paragraph")))
    second = D.load_corpus(str(f), cache_dir=tmp_path / "cache")
    assert all("changed paragraph" in t for t in second["train"]["text"])
    assert first["train"]._fingerprint != second["train"]._fingerprint
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    from iit_fast.data import tokenize_corpus
    a = tokenize_corpus(first, tok, max_length=32, num_proc=1, cache_dir=tmp_path / "cache")
    b = tokenize_corpus(second, tok, max_length=32, num_proc=1, cache_dir=tmp_path / "cache")
    assert list(a["train"]["input_ids"]) != list(b["train"]["input_ids"])
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


def test_text_column_picks_the_named_column(tmp_path):
    pars = _pars(80)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": p, "text": "not this one at all, no"}) + "\n"
                                              for p in pars))
    dd = D.load_corpus(str(tmp_path / "c.jsonl"), cache_dir=tmp_path / "cache", text_column="body")
    assert dd["train"].column_names == ["text"]
    assert sorted(list(dd["train"]["text"]) + list(dd["validation"]["text"])) == sorted(pars)


def test_text_column_missing_names_the_columns_found(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": p, "id": 1}) + "\n" for p in _pars(10)))
    with pytest.raises(ValueError, match=r"corpus: .*c\.jsonl has columns \['body', 'id'\]; expected a column "
                                         r"named 'content' \(choose another with --text_column\)"):
        D.load_corpus(str(tmp_path / "c.jsonl"), cache_dir=tmp_path / "cache", text_column="content")
    with pytest.raises(ValueError, match=r"corpus: the column 'id' of .*holds .*int64.*expected text"):
        D.load_corpus(str(tmp_path / "c.jsonl"), cache_dir=tmp_path / "cache", text_column="id")


def test_corpus_stream_import_has_no_cycle():
    """issue 21: corpus -> data only (data.py's old __main__ shim imported corpus back)."""
    import subprocess
    import sys
    code = "import iit_fast.data, sys; assert 'iit_fast.corpus' not in sys.modules, 'data imports corpus'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
