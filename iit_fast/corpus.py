"""The corpus: the default one (built by corpus_build.py), or any text a user points at.

Any corpus goes through ``load_corpus``: local .txt/.jsonl/.json/.parquet files (a file, a folder, a
glob or a list of them; JSON/parquet text from ``text_column``), or a Hugging Face dataset name
``name[:config]`` when the hub is reachable; no corpus given: the default corpus (corpus_build.py, built on
first use). It is streamed through ``datasets`` (arrow files on disk): deduplication and the split read a
64-bit hash per paragraph (the default corpus's rule, `corpus_build._split_of`), never the corpus's text in
Python memory. Memory while loading: the interpreter and libraries, ~40 bytes per paragraph (the hash column
at the peak of np.unique) and a few times the longest line (one map batch holds it); not the corpus's size
(benchmarks/corpus_memory.py: a 2 GB corpus and a single 50 MB line, results in
benchmarks/results/corpus-memory.md). Tokenising is bounded in data.py (PIECE_CHARS).

    python -m iit_fast.corpus build                     # the default corpus, cached in $IIT_FAST_CACHE
    python -m iit_fast.corpus build --install-packages  # as root: apt-get install the missing packages first
    python -m iit_fast.corpus build --corpus DIR        # any corpus: summary + tokenization check
"""
from __future__ import annotations

import argparse
import codecs
import glob
import json
import re
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
from transformers import AutoTokenizer

from .cache import DEFAULT_CACHE
from .corpus_build import (DEFAULT_SOURCES, VALIDATION_PER_MILLE, _hash, build_default_corpus, default_corpus_dir,
                           install_debian_packages, missing_packages, normalise)
from .data import tokenize_corpus


# ---------------------------------------------------------------------------------------------------------
# Loading any corpus as a DatasetDict(train, validation) with one column "text", streamed through arrow
# ---------------------------------------------------------------------------------------------------------
#
# Nothing here holds the corpus in Python memory: datasets.load_dataset writes each file group to arrow
# files on disk (memory-mapped), one batched `map` cleans the rows and adds a 64-bit hash of each row's
# normalised text, and the deduplication and the split are decided on that hash column alone (numpy,
# ~40 bytes per row at the peak of np.unique), then applied as index selections. A row is held whole only
# inside a map batch (at most CLEAN_BATCH rows); data.tokenize_corpus cuts rows longer than
# data.PIECE_CHARS before tokenising.

_EXTS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_GLOB = re.compile(r"[*?\[]")
CLEAN_BATCH = 256  # rows per cleaning map batch (and per write): a batch is the most text held at once
_SCAN_BLOCK = 1 << 20  # bytes read at a time when checking a .txt file


def _split_name(path: Path) -> str | None:
    stem = path.name.lower()
    if stem.startswith("train"):
        return "train"
    if stem.startswith(("validation", "valid", "val.", "val_", "dev", "test")):
        return "validation"
    return None


MAX_INVALID_UTF8 = 0.01  # share of undecodable characters above which a .txt file is not taken as text


def _scan_text(path: Path) -> str:
    """Checks a .txt file in 1 MB blocks (bounded memory) and says how to read it: "paragraph" when it has
    blank-line separated blocks, else "line" (one paragraph a line). A NUL byte or more than
    MAX_INVALID_UTF8 undecodable characters means the file is binary (or not UTF-8), and a file of blanks
    holds no text: each is an error that names the file (tokenising it would train on garbage)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    bad = chars = 0
    blank_sep = has_text = False
    tail = ""  # the end of the previous block, for a blank line across two blocks
    with open(path, "rb") as f:
        while True:
            data = f.read(_SCAN_BLOCK)
            if b"\x00" in data:
                raise ValueError(f"corpus: {path} contains NUL bytes, so it is a binary file, not text; "
                                 f"expected UTF-8 text")
            text = dec.decode(data, final=not data)
            bad += text.count("\ufffd")
            chars += len(text)
            has_text = has_text or not text.isspace() and bool(text)
            joined = (tail + text).replace("\r\n", "\n")
            blank_sep = blank_sep or re.search(r"\n[ \t]*\n", joined) is not None and has_text
            tail = text[-4:]
            if not data:
                break
    if bad > MAX_INVALID_UTF8 * max(1, chars):
        raise ValueError(f"corpus: {path} is not UTF-8 text ({bad} of {chars} characters undecodable); "
                         f"expected UTF-8 text (convert it, e.g. `iconv -t utf-8`)")
    if not has_text:
        raise ValueError(f"corpus: {path} holds no text (no non-blank paragraph); expected a non-empty file")
    return "paragraph" if blank_sep else "line"


def _local_files(spec) -> list[Path]:
    """Files of a local spec: a file, a folder (searched recursively), a glob, or a list / comma-separated
    string of them."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if isinstance(spec, str) and "," in spec and not Path(spec).exists():
        items = [s.strip() for s in spec.split(",") if s.strip()]
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if not p.exists() and _GLOB.search(str(item)):
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True)
                           if Path(f).is_file() and Path(f).suffix.lower() in _EXTS)
            if not found:
                raise FileNotFoundError(f"corpus: the pattern {item} matches no .txt/.jsonl/.json/.parquet "
                                        f"file; expected a glob such as 'data/**/*.jsonl'")
            files += found
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _EXTS
                           and f.name != "manifest.json")
            if not found:
                raise ValueError(f"corpus: the folder {p} holds no .txt/.jsonl/.json/.parquet file; expected "
                                 f"text files (one paragraph a line or blank-line separated) or JSON "
                                 f"lines/parquet with a text column")
            files += found
        elif p.is_file():
            if p.suffix.lower() not in _EXTS:
                raise ValueError(f"corpus: {p} has an unsupported extension {p.suffix!r}; expected one of "
                                 f"{sorted(_EXTS)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus: {p} does not exist; expected a local file, a list of files, a "
                                    f"glob or a folder of .txt/.jsonl/.json/.parquet files, or a Hugging Face "
                                    f"dataset name 'name[:config]'")
    return files


def _looks_local(spec) -> bool:
    """Paths that exist, end in a known extension, start like a path, hold a glob or list several: local.
    Anything else ('wikitext-103-raw-v1', 'user/name:config') is a Hugging Face dataset name."""
    if not isinstance(spec, str):
        return True
    return (Path(spec).expanduser().exists() or Path(spec).suffix.lower() in _EXTS
            or spec.startswith(("/", ".", "~")) or "," in spec or _GLOB.search(spec) is not None)


def _text_only(ds, text_column: str, where: str):
    """`ds` reduced to one string column named "text" (from `text_column`); a missing or non-text column
    is an error naming the columns found."""
    if text_column not in ds.column_names:
        raise ValueError(f"corpus: {where} has columns {ds.column_names}; expected a column named "
                         f"{text_column!r} (choose another with --text_column)")
    feature = ds.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"corpus: the column {text_column!r} of {where} holds {feature}; expected text "
                         f"(strings): choose a text column with --text_column")
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if feature.dtype != "string":  # one type for concatenate_datasets
        ds = ds.cast_column("text", datasets.Value("string"))
    return ds


def _load_group(files: list[Path], text_column: str, hf_cache: str):
    """One arrow-backed Dataset (column "text") of local files: one load_dataset call per builder (and,
    for .txt, per way of reading), concatenated."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    for f in files:
        kind = _EXTS[f.suffix.lower()]
        groups.setdefault((kind, _scan_text(f) if kind == "text" else None), []).append(str(f))
    parts = []
    for (kind, sample_by), paths in groups.items():
        kwargs = {"sample_by": sample_by, "encoding_errors": "replace"} if kind == "text" else {}
        ds = datasets.load_dataset(kind, data_files=paths, split="train", cache_dir=hf_cache, **kwargs)
        where = paths[0] if len(paths) == 1 else f"the {len(paths)} {kind} files ({paths[0]}, ...)"
        parts.append(_text_only(ds, "text" if kind == "text" else text_column, where))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# row states written by _clean_rows: blank (dropped), text whose normalised key is empty (kept only when
# the splits are named by file), text
_BLANK, _NO_KEY, _TEXT = 0, 1, 2


def _clean_rows(batch):
    """Whitespace collapsed; `hash` = the first 8 bytes of sha1(normalise(text)), which decides both the
    deduplication and the split (the same rule as the default corpus's build)."""
    texts, hashes, states = [], [], []
    for t in batch["text"]:
        t = " ".join(t.split()) if isinstance(t, str) else ""  # whitespace collapsed (str.split: C speed)
        key = normalise(t) if t else ""
        texts.append(t)
        hashes.append(_hash(key) if key else 0)
        states.append(_TEXT if key else _NO_KEY if t else _BLANK)
    # numpy arrays: python ints >= 2**63 do not convert to arrow's uint64 directly
    return {"text": texts, "hash": np.array(hashes, dtype=np.uint64), "state": np.array(states, dtype=np.int8)}


def _cleaned(ds, num_proc: int | None):
    features = datasets.Features({"text": datasets.Value("string"), "hash": datasets.Value("uint64"),
                                  "state": datasets.Value("int8")})
    return ds.map(_clean_rows, batched=True, batch_size=CLEAN_BATCH, writer_batch_size=CLEAN_BATCH,
                  features=features, num_proc=num_proc, desc="clean + hash")


def _column(ds, name: str):
    """One numeric column as a numpy array (8 bytes a row at most): never the text."""
    col = ds.data.column(name)
    return np.concatenate([c.to_numpy() for c in col.chunks]) if col.num_chunks else np.zeros(0, np.uint64)


def load_corpus(spec=None, cache_dir=None, *, text_column: str = "text", num_proc: int | None = None):
    """A ``datasets.DatasetDict`` with splits "train" and "validation", one column "text", backed by arrow
    files under ``cache_dir/hf-datasets`` (memory-mapped: the corpus is never held in Python memory).

    spec None: the default corpus (built on first use). A local file, a folder (recursive), a glob, or a
    list (or comma-separated string) of them, of .txt/.jsonl/.json/.parquet files: .txt files are read one
    paragraph per blank-line separated block (or per line when a file has no blank line); JSON lines /
    parquet rows take their text from ``text_column``. Files named train*/valid*/val*/dev*/test* are used
    as those splits; otherwise paragraphs are deduplicated (the same normalised text once, by a 64-bit
    hash) and go to a split by that hash (2% validation), so the split depends on the text alone.
    Anything else is tried as a Hugging Face dataset name 'name[:config]'.
    """
    hf_cache = str(Path(cache_dir or DEFAULT_CACHE) / "hf-datasets")
    if spec is None:
        folder = build_default_corpus(cache_dir, progress=True)
        files = {s: str(folder / f"{s}.txt") for s in ("train", "validation")}
        return datasets.load_dataset("text", data_files=files, cache_dir=hf_cache)
    if isinstance(spec, str) and not spec.strip():
        raise ValueError("corpus: an empty string; expected a path, a list of paths or a dataset name")
    if not _looks_local(spec):
        return _from_hub(spec, cache_dir, text_column)
    files = _local_files(spec)
    named = {f: _split_name(f) for f in files}
    if any(named.values()) and all(named.values()):
        out = {}
        for split in ("train", "validation"):
            group = [f for f in files if named[f] == split]
            if group:
                ds = _cleaned(_load_group(group, text_column, hf_cache), num_proc)
                keep = (_column(ds, "state") != _BLANK).nonzero()[0]
                out[split] = ds.select(keep).select_columns(["text"])
    else:
        out = _dedup_and_split(_cleaned(_load_group(files, text_column, hf_cache), num_proc))
    if "train" not in out or len(out["train"]) == 0:
        raise ValueError(f"corpus: {spec} holds no text ({len(files)} file(s), 0 training paragraphs); "
                         f"expected non-empty text files or a {text_column!r} column with text")
    if "validation" not in out or len(out["validation"]) == 0:
        raise ValueError(f"corpus: {spec} gives no validation paragraph; expected at least 2 paragraphs "
                         f"or a validation file")
    return datasets.DatasetDict(out)


def _dedup_and_split(ds) -> dict:
    """Rows of `ds` (columns text, hash, state) -> {"train", "validation"}: the first row of each hash,
    validation when hash % 1000 < VALIDATION_PER_MILLE. A corpus whose validation split comes out empty
    gives it the training row of smallest hash % 1000 (tiny corpora; whatever the input order)."""
    h, state = _column(ds, "hash"), _column(ds, "state")  # (rows,) each
    rows = (state == _TEXT).nonzero()[0]
    _, first = np.unique(h[rows], return_index=True)
    keep = np.sort(rows[first])  # the first occurrence of each text, in corpus order
    del rows, first
    is_val = h[keep] % 1000 < VALIDATION_PER_MILLE
    train, val = keep[~is_val], keep[is_val]
    if len(val) == 0 and len(train) >= 2:
        i = int(np.argmin(h[train] % 1000))
        val, train = train[i:i + 1], np.delete(train, i)
    return {"train": ds.select(train).select_columns(["text"]),
            "validation": ds.select(val).select_columns(["text"])}


def _from_hub(spec: str, cache_dir, text_column: str = "text"):
    name, _, config = spec.partition(":")
    if name.startswith("wikitext-") and not config:  # 'wikitext-103-raw-v1' names a config of 'wikitext'
        name, config = "wikitext", name
    try:
        dd = datasets.load_dataset(name, config or None,
                                   cache_dir=str(Path(cache_dir or DEFAULT_CACHE) / "hf-datasets"))
    except Exception as e:  # offline, unknown name...
        raise FileNotFoundError(f"corpus: {spec!r} is neither a local path nor a Hugging Face dataset that "
                                f"could be loaded ({type(e).__name__}: {e}); expected a local "
                                f".txt/.jsonl/.json/.parquet file or folder, or 'name[:config]' with the hub "
                                f"reachable") from e
    out = {}
    for split in ("train", "validation"):
        if split in dd:
            ds = _text_only(dd[split], text_column, f"{spec!r} ({split})")
            out[split] = ds.filter(_keep_hub_rows, batched=True, batch_size=CLEAN_BATCH)
    if "train" not in out:
        raise ValueError(f"corpus: {spec!r} has splits {list(dd)}; expected a 'train' split")
    if "validation" not in out:
        parts = out["train"].train_test_split(test_size=0.02, seed=0)
        out = {"train": parts["train"], "validation": parts["test"]}
    return datasets.DatasetDict(out)


def _keep_hub_rows(batch) -> list[bool]:
    """At least three words, and not a wikitext title line (' = Title = ')."""
    return [isinstance(t, str) and len(t.split()) >= 3 and not re.fullmatch(r"\s*=.*=\s*", t)
            for t in batch["text"]]


def corpus_summary(manifest_path: Path) -> str:
    """A Markdown table of a corpus manifest: words per source and split sizes."""
    m = json.loads(Path(manifest_path).read_text())
    lines = ["| source | Debian package | paragraphs | words |", "|---|---|---:|---:|"]
    for name, s in m["sources"].items():
        lines.append(f"| {name} | {s['package']} | {s['paragraphs']:,} | {s['words']:,} |")
    lines.append(f"| **total** | | {m['train']['paragraphs'] + m['validation']['paragraphs']:,} | {m['words']:,} |")
    lines.append(f"\ntrain: {m['train']['paragraphs']:,} paragraphs, {m['train']['words']:,} words; validation: "
                 f"{m['validation']['paragraphs']:,} paragraphs, {m['validation']['words']:,} words.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m iit_fast.corpus", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) a corpus and print its composition")
    b.add_argument("--cache-dir", type=Path, default=None)
    b.add_argument("--corpus", default=None, help="a local path or dataset name (default: the default corpus)")
    b.add_argument("--force", action="store_true", help="rebuild the default corpus even if cached")
    b.add_argument("--install-packages", action="store_true",
                   help="as root, apt-get install the missing Debian packages of the default corpus first")
    b.add_argument("--tokenizer", default=None, help="also tokenize with this tokenizer folder")
    b.add_argument("--kind", choices=("masked", "causal"), default="masked", help="tokenization for --tokenizer")
    b.add_argument("--max-length", type=int, default=128)
    b.add_argument("--num-proc", type=int, default=2)
    b.add_argument("--text-column", default="text", help="the column of .jsonl/.json/.parquet rows that holds "
                   "the text (default: text)")
    a = p.parse_args(argv)
    if a.corpus is None:
        if a.install_packages:
            install_debian_packages(missing_packages(DEFAULT_SOURCES))
        if a.force:
            shutil.rmtree(default_corpus_dir(a.cache_dir), ignore_errors=True)
        folder = build_default_corpus(a.cache_dir)
        print(corpus_summary(folder / "manifest.json"))
    elif a.install_packages:
        p.error("--install-packages: only for the default corpus (no --corpus)")
    dd = load_corpus(a.corpus, a.cache_dir, text_column=a.text_column)
    print({k: len(v) for k, v in dd.items()})
    if a.tokenizer:
        tok = AutoTokenizer.from_pretrained(a.tokenizer)
        t0 = time.time()
        td = tokenize_corpus(dd, tok, a.max_length, a.num_proc, a.cache_dir, kind=a.kind)
        for k, v in td.items():
            n = sum(v["length"])
            print(f"{k}: {len(v):,d} sequences, {n:,d} tokens, mean length {n / len(v):.1f}")
        print(f"tokenized in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
