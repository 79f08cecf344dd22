"""The default corpus's builder: English prose from Debian packages, cleaned, deduplicated and split.

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

The normalisation (`normalise`) and the split rule (`_hash`, `_split_of`) are defined here once; the loader of
any other corpus (corpus.py) applies the same ones. Just over 400 lines: most of it is the seven sources'
cleaners (reStructuredText, plain text, fortunes, the KJV's verses), which belong beside their sources.
"""
from __future__ import annotations

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

from .cache import DEFAULT_CACHE, publish_folder

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
