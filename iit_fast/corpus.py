"""The corpus: English prose from Debian packages, or any text a user points at.

The default corpus is built offline from English text that Debian packages ship (``DEBIAN_PACKAGES``;
``setup.sh`` installs them as root, or ``python -m iit_fast.corpus build --install-packages``): the Python
documentation sources, the Debian reference, the Debian developers' reference, the Debian new maintainers'
guide, the GNU coding standards (modern technical prose, the bulk), the fortune cookie files and the King
James New Testament. Each source is extracted, cleaned into plain paragraphs (markup, code, tables, line
numbers and headers removed), deduplicated, and split train/validation by a hash of the paragraph, so the
split depends on nothing but the text. Library code never installs packages: a missing one is an error
that names it and the command that installs it.

    python -m iit_fast.corpus build                     # the default corpus, cached in $IIT_FAST_CACHE
    python -m iit_fast.corpus build --install-packages  # as root: apt-get install the missing packages first
    python -m iit_fast.corpus build --corpus DIR        # any corpus: summary + tokenization check

Any other corpus goes through ``load_corpus``: local .txt/.jsonl/.json/.parquet files (a file, a folder, a
glob or a list of them; JSON/parquet text from ``text_column``), or a Hugging Face dataset name
``name[:config]`` when the hub is reachable. It is streamed through ``datasets`` (arrow files on disk):
deduplication and the split read a 64-bit hash per paragraph, never the corpus's text in Python memory.
Memory while loading: the interpreter and libraries, ~40 bytes per paragraph (the hash column at the
peak of np.unique) and a few times the longest line (one map batch holds it); not the corpus's size
(benchmarks/corpus_memory.py: a 2 GB corpus and a single 50 MB line, results in
benchmarks/results/corpus-memory.md). Tokenising is bounded in data.py (PIECE_CHARS).

The module is over 400 lines because it holds both jobs on the corpus: building the default one from
Debian text (cleaners, sources) and loading any corpus; they share the normalisation and the split rule.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import datasets
import numpy as np
from transformers import AutoTokenizer

from .cache import DEFAULT_CACHE, publish_folder
from .data import tokenize_corpus

# setup.sh reads this line (apt-get install as root); keep it one plain string.
DEBIAN_PACKAGES = "python3-doc debian-reference-en developers-reference maint-guide gnu-standards fortunes bible-kjv"
CORPUS_VERSION = 2  # bump when the cleaning changes: the cached corpus is rebuilt under a new name
VALIDATION_PER_MILLE = 20  # 2% of the paragraphs
MIN_WORDS = 8


# ---------------------------------------------------------------------------------------------------------
# Cleaning: raw text of one source -> prose paragraphs
# ---------------------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*[A-Za-z]|[A-Za-z]")


def _is_prose(par: str, min_words: int = MIN_WORDS) -> bool:
    """Heuristic: enough words, mostly letters, mostly dictionary-shaped words, ends like a sentence."""
    words = par.split()
    if len(words) < min_words:
        return False
    chars = [c for c in par if not c.isspace()]
    if sum(c.isalpha() for c in chars) < 0.75 * len(chars):
        return False
    if sum(bool(_WORD.fullmatch(w.strip(".,;:!?()\"'"))) for w in words) < 0.7 * len(words):
        return False
    return par[-1] in ".!?:;)\"'”’"


_ALNUM = re.compile(r"[0-9a-z]+")


def normalise(par: str) -> str:
    """Key for deduplication and the split: lower case, letters and digits only, single spaces. (One regex
    pass and a join: the same key as substituting the other runs with spaces, 3x faster on 2 GB.)"""
    return " ".join(_ALNUM.findall(par.lower()))


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blank-line separated blocks, each joined into one line with single spaces."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.strip())
        elif block:
            yield _WS.sub(" ", " ".join(block))
            block = []
    if block:
        yield _WS.sub(" ", " ".join(block))


# reStructuredText (Sphinx sources): directives whose body is code/markup, not prose
_RST_SKIP_BODY = {"code-block", "sourcecode", "code", "literalinclude", "index", "toctree", "productionlist",
                  "highlight", "testcode", "testsetup", "testcleanup", "doctest", "testoutput", "csv-table",
                  "table", "list-table", "image", "figure", "raw", "math", "only", "include", "tabularcolumns",
                  "opcode", "cmdoption", "option", "envvar", "program", "module", "currentmodule",
                  "sectionauthor", "moduleauthor", "audit-event", "availability", "c:macro", "c:type",
                  "c:var", "glossary", "rubric", "cssclass", "contents", "sidebar"}
_RST_UNDERLINE = re.compile(r"^([=\-~^*#+`'\".:_])\1{2,}\s*$")
_RST_DIRECTIVE = re.compile(r"^\.\.\s+([\w:\-]+)::")
_RST_ROLE = re.compile(r":[\w:\-]+:`([^`]*)`")
_RST_REF = re.compile(r"`([^`<]*?)\s*<[^>]*>`_{1,2}")
_RST_LIT = re.compile(r"``([^`]*)``")
_RST_INTERP = re.compile(r"`([^`]*)`_{0,2}")


def _rst_inline(text: str) -> str:
    def role(m):
        inner = m.group(1)
        inner = re.sub(r"\s*<[^>]*>$", "", inner)  # :ref:`text <target>` -> text
        return inner.lstrip("~!")
    text = _RST_ROLE.sub(role, text)
    text = _RST_REF.sub(r"\1", text)
    text = _RST_LIT.sub(r"\1", text)
    text = _RST_INTERP.sub(r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?!\w)", r"\1", text)
    text = re.sub(r"\|(\w[\w\- ]*)\|", r"\1", text)
    text = re.sub(r"\s*\[#\w*\]_", "", text)  # footnote references
    text = text.replace("\\ ", "").replace("\\", "")  # reST escapes
    return text


def clean_rst(text: str) -> list[str]:
    """Sphinx/reST source -> prose paragraphs: no directives with code bodies, literal blocks, doctests,
    tables, titles, field lists, comments; inline roles reduced to their text."""
    out: list[str] = []
    skip_indent: int | None = None  # skipping lines indented more than this
    pending_literal = False  # the previous paragraph ended with '::'
    for raw in text.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if not line.strip():
            out.append("")
            continue
        if pending_literal and indent > 0 and out and not out[-1].strip():
            # the literal block after 'text::' starts indented after a blank line
            skip_indent = indent - 1
            pending_literal = False
            continue
        stripped = line.strip()
        m = _RST_DIRECTIVE.match(stripped)
        if m:
            name = m.group(1).split(":")[-1] if m.group(1).startswith(("py:", "c:", "std:")) else m.group(1)
            if name in _RST_SKIP_BODY or m.group(1) in _RST_SKIP_BODY:
                skip_indent = indent
            out.append("")  # the signature/argument line itself is never prose
            pending_literal = False
            continue
        if stripped.startswith(".. ") or stripped == "..":  # comments, targets, substitutions
            skip_indent = indent
            out.append("")
            continue
        if stripped == "::":
            pending_literal = True
            out.append("")
            continue
        if (_RST_UNDERLINE.match(stripped) or stripped.startswith((">>>", "... ", "+-", "|", "$ "))
                or re.match(r"^=+(\s+=+)+$", stripped) or re.match(r"^:[\w\- ]+:(\s|$)", stripped)):
            if _RST_UNDERLINE.match(stripped) and out and out[-1].strip():
                out[-1] = ""  # the title above an underline
            out.append("")
            continue
        if re.match(r"^([*\-+•]|#\.|\d+\.|\(?[a-z]\))\s+", stripped):  # a list item starts a paragraph
            out.append("")
            stripped = re.sub(r"^([*\-+•]|#\.|\d+\.|\(?[a-z]\))\s+", "", stripped)
        pending_literal = stripped.endswith("::")
        if pending_literal:
            stripped = stripped[:-1] if not stripped.endswith(" ::") else stripped[:-3]
        out.append(stripped)
    # inline markup often spans lines (:ref:`text\n<target>`): reduce it on the joined paragraph
    return [p for p in (_WS.sub(" ", _rst_inline(q)).strip() for q in _paragraphs(out)) if _is_prose(p)]


def clean_text(text: str) -> list[str]:
    """Plain-text manuals (Debian reference, GNU standards...): no tables, no tables of contents, no code
    or shell lines, no footnote marks, no page headers; paragraphs that read as prose only."""
    out: list[str] = []
    for raw in text.splitlines():
        s = raw.strip()
        if (not s or s.startswith(("|", "+-", "$ ", "# ", "* Menu", "File:", "Node:", "\x1f"))
                or re.match(r"^\d+(\.\d+)*\.?\s+\S", s) and len(s.split()) < 12  # numbered titles, TOC lines
                or re.match(r"^\[\d+\]", s)  # footnote bodies / link lists
                or re.fullmatch(r"[=\-~_*.]{3,}", s)):
            out.append("")
            continue
        s = re.sub(r"\^\[\d+\]", "", s)  # footnote marks
        s = re.sub(r"^(\*|\+|-|o|•)\s+", "", s)
        out.append(s)
    return [p for p in _paragraphs(out) if _is_prose(p)]


def clean_fortunes(text: str) -> list[str]:
    """fortune(6) files: cookies separated by '%' lines; attributions ('-- Someone') dropped."""
    pars = []
    for cookie in re.split(r"^%\s*$", text, flags=re.M):
        lines = [l for l in cookie.splitlines() if not re.match(r"^\s*(--|―|—)\s*\S", l)]
        par = _WS.sub(" ", " ".join(l.strip() for l in lines)).strip()
        if _is_prose(par):
            pars.append(par)
    return pars


_VERSE = re.compile(r"^(\d?[A-Z][a-z]*)(\d+):(\d+)\s+(.*)$")


def clean_kjv(text: str, verses_per_paragraph: int = 5) -> list[str]:
    """`bible -f` output ('Ge1:1 In the beginning ...'): verse references removed, the verses of a
    chapter grouped into paragraphs of a few verses."""
    pars, cur, key = [], [], None
    for line in text.splitlines():
        m = _VERSE.match(line.strip())
        if m:
            chapter = (m.group(1), m.group(2))
            if cur and (chapter != key or len(cur) >= verses_per_paragraph):
                pars.append(" ".join(cur))
                cur = []
            key = chapter
            cur.append(m.group(4).strip())
        elif line.strip() and cur:  # a wrapped verse
            cur[-1] += " " + line.strip()
    if cur:
        pars.append(" ".join(cur))
    return [_WS.sub(" ", p) for p in pars if _is_prose(p)]


def clean_plain(text: str) -> list[str]:
    """A user's .txt file: blank-line separated paragraphs (a one-paragraph-per-line file works too when
    its lines are long); whitespace collapsed, nothing else assumed."""
    if "\n\n" not in text:
        return [_WS.sub(" ", l).strip() for l in text.splitlines() if l.strip()]
    return [p for p in _paragraphs(text.splitlines())]


CLEANERS = {"rst": clean_rst, "text": clean_text, "fortunes": clean_fortunes, "kjv": clean_kjv,
            "plain": clean_plain}


@dataclass
class Source:
    """One part of a corpus: a name, how to clean it, and where its text is (file globs, or a command
    whose output is the text)."""
    name: str
    kind: str  # a key of CLEANERS
    package: str = ""  # the Debian package that ships it
    globs: Sequence[str] = ()
    command: Sequence[str] = ()
    description: str = ""

    def files(self) -> list[Path]:
        return sorted({Path(f).resolve() for g in self.globs for f in glob.glob(g, recursive=True)
                       if Path(f).is_file()})

    def read(self) -> Iterator[str]:
        """Raw text documents of this source."""
        if self.command:
            if shutil.which(self.command[0]) is None:
                return
            res = subprocess.run(list(self.command), capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "COLUMNS": "100000"})
            if res.returncode == 0:
                yield res.stdout
            return
        for f in self.files():
            if f.suffix in (".dat", ".u8") or f.name.endswith((".dat", ".u8")):
                continue
            data = gzip.open(f, "rb").read() if f.suffix == ".gz" else f.read_bytes()
            yield data.decode("utf-8", errors="replace")

    def paragraphs(self) -> Iterator[tuple[str, str]]:
        """(key, paragraph) for each cleaned prose paragraph; key = ``normalise(paragraph)``, never empty."""
        cleaner = CLEANERS[self.kind]
        for doc in self.read():
            for par in cleaner(doc):
                key = normalise(par)
                if key:
                    yield key, par


DEFAULT_SOURCES = [
    Source("python-docs", "rst", "python3-doc", ["/usr/share/doc/python3*/html/_sources/**/*.rst.txt"],
           description="Python 3 documentation (tutorial, library, reference, HOWTOs, FAQ, what's new)"),
    Source("debian-reference", "text", "debian-reference-en",
           ["/usr/share/debian-reference/debian-reference.en.txt.gz"], description="Debian Reference"),
    Source("developers-reference", "rst", "developers-reference",
           ["/usr/share/developers-reference/_sources/*.rst.txt"], description="Debian Developer's Reference"),
    Source("maint-guide", "text", "maint-guide", ["/usr/share/doc/maint-guide/maint-guide.en.txt.gz"],
           description="Debian New Maintainers' Guide"),
    Source("gnu-standards", "text", "gnu-standards",
           ["/usr/share/doc/gnu-standards/standards.text.gz", "/usr/share/doc/gnu-standards/maintain.text.gz"],
           description="GNU Coding Standards and Information for Maintainers of GNU Software"),
    Source("fortunes", "fortunes", "fortunes", ["/usr/share/games/fortunes/*"],
           description="fortune cookies (quotations, jokes, short texts)"),
    Source("kjv", "kjv", "bible-kjv", command=["bible", "-f", "matt1:1-rev22:21"],
           description="King James Bible, New Testament (archaic prose kept a minor part)"),
]


def _hash(par_key: str) -> int:
    return int.from_bytes(hashlib.sha1(par_key.encode()).digest()[:8], "little")


def _split_of(par_key: str) -> str:
    return "validation" if _hash(par_key) % 1000 < VALIDATION_PER_MILLE else "train"


def _move_one(splits: dict, src: str, dst: str) -> None:
    """Tiny corpora with an empty split: move the paragraph of smallest hash, whatever the input order."""
    i = min(range(len(splits[src])), key=lambda k: _hash(normalise(splits[src][k])) % 1000)
    splits[dst].append(splits[src].pop(i))


def build_corpus(sources: Sequence[Source], out_dir: Path, progress: bool = True) -> Path:
    """Clean, deduplicate and split ``sources`` into ``out_dir/{train,validation}.txt`` (one paragraph a
    line) and ``out_dir/manifest.json`` (words and paragraphs per source and split). Written to a
    temporary folder first and renamed, so a folder that exists is complete."""
    out_dir = Path(out_dir)
    t0 = time.time()
    seen: set[str] = set()
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    manifest: dict = {"version": CORPUS_VERSION, "validation_per_mille": VALIDATION_PER_MILLE, "sources": {}}
    for src in sources:
        n_par = n_words = n_dup = 0
        words = {"train": 0, "validation": 0}
        for key, par in src.paragraphs():
            if key in seen:
                n_dup += 1
                continue
            seen.add(key)
            split = _split_of(key)
            splits[split].append(par)
            n_par += 1
            w = len(par.split())
            n_words += w
            words[split] += w
        manifest["sources"][src.name] = {"package": src.package, "description": src.description,
                                         "paragraphs": n_par, "words": n_words, "duplicates_dropped": n_dup,
                                         "train_words": words["train"], "validation_words": words["validation"]}
        if progress:
            print(f"[corpus] {src.name:22s} {n_par:8,d} paragraphs {n_words:10,d} words "
                  f"({n_dup:,d} duplicates dropped)", file=sys.stderr, flush=True)
    total = sum(len(v) for v in splits.values())
    if total == 0:
        raise ValueError(f"corpus: no paragraphs found in the sources {[s.name for s in sources]}; expected "
                         f"readable English text (for the default corpus, install the Debian packages "
                         f"'{DEBIAN_PACKAGES}' as root, e.g. by `bash setup.sh` or "
                         f"`python -m iit_fast.corpus build --install-packages`)")
    if not splits["validation"] or not splits["train"]:  # tiny corpora: move one paragraph over
        src, dst = ("train", "validation") if not splits["validation"] else ("validation", "train")
        if len(splits[src]) < 2:
            raise ValueError(f"corpus: only {total} paragraph(s) after cleaning; expected at least 2 "
                             f"(one for train, one for validation)")
        _move_one(splits, src, dst)
    for split, pars in splits.items():
        manifest[split] = {"paragraphs": len(pars), "words": sum(len(p.split()) for p in pars)}
    manifest["words"] = manifest["train"]["words"] + manifest["validation"]["words"]
    manifest["build_seconds"] = round(time.time() - t0, 1)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, pars in splits.items():
        (tmp / f"{split}.txt").write_text("".join(p + "\n" for p in pars), encoding="utf-8")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    publish_folder(tmp, out_dir, replace=not (out_dir / "manifest.json").is_file())
    if progress:
        print(f"[corpus] {out_dir}: train {manifest['train']['paragraphs']:,d} paragraphs "
              f"{manifest['train']['words']:,d} words, validation {manifest['validation']['paragraphs']:,d} "
              f"paragraphs {manifest['validation']['words']:,d} words ({manifest['build_seconds']} s)",
              file=sys.stderr, flush=True)
    return out_dir


def default_corpus_dir(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE) / f"corpus-default-v{CORPUS_VERSION}"


def missing_packages(sources: Sequence[Source]) -> list[str]:
    """The Debian packages of ``sources`` whose text is not on this machine (no file matches the source's
    globs, or its command is not on PATH), in order, each once. Sources without a package are not counted."""
    missing: list[str] = []
    for src in sources:
        present = shutil.which(src.command[0]) is not None if src.command else bool(src.files())
        if src.package and not present and src.package not in missing:
            missing.append(src.package)
    return missing


def install_debian_packages(packages: Sequence[str], progress: bool = True) -> None:
    """``apt-get install`` the given packages. Only the command line calls this, when asked to
    (``--install-packages``): installing system packages is the user's decision, not the library's."""
    if not packages:
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PermissionError(f"--install-packages: installing {' '.join(packages)} needs root and apt-get; "
                              f"expected to run as root on Debian/Ubuntu (or install them yourself: "
                              f"`sudo apt-get install -y {' '.join(packages)}`)")
    if progress:
        print(f"[corpus] apt-get install {' '.join(packages)}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
    res = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"--install-packages: apt-get install {' '.join(packages)} failed "
                           f"(exit {res.returncode}): {res.stderr.strip()[-2000:]}")


def build_default_corpus(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The default corpus folder (train.txt, validation.txt, manifest.json); built only when missing.
    Every source's Debian package must be installed: a missing one is an error that names it, so the
    default corpus is the same on every machine that builds it."""
    out = default_corpus_dir(cache_dir)
    if (out / "manifest.json").is_file():
        return out
    missing = missing_packages(DEFAULT_SOURCES)
    if missing:
        raise FileNotFoundError(
            f"corpus: the default corpus needs the Debian packages {' '.join(missing)}, which are not installed; "
            f"expected them installed: as root run `apt-get install -y {' '.join(missing)}`, or "
            f"`python -m iit_fast.corpus build --install-packages`, or `bash setup.sh`")
    if progress:
        print(f"[corpus] building the default corpus in {out}", file=sys.stderr, flush=True)
    return build_corpus(DEFAULT_SOURCES, out, progress=progress)


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
    import codecs
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
