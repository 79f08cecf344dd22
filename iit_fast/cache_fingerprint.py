"""What identifies a teacher cache (docs/teacher-cache.md): its options (`CacheOptions`), its rows
(`select_rows`), the seeds of its pairs, masks and plans (`derived_seed`), and the fingerprint a cache is
built with and a run compares against (`fingerprint_fields`, `run_fingerprint`, `compare_fingerprints`).
The reader (`teacher_cache`) and the builder (`cache_builder`) share these; `teacher_cache` re-exports them.

The fingerprint: the teacher (SHA-256 of config.json and every weight file: sound, and ~1 s per GB),
the tokenizer (its vocabulary and special ids), the corpus (SHA-256 of the cached rows, drawn by
`select_rows`), and every option that changes what is stored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache_codec

FORMAT = 3
READS = (2, 3)                          # the formats this version reads
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("masked", "causal")
LOGIT_TOKENS = ("all", "masked")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


@dataclass
class CacheOptions:
    """What the cache stores; every field is part of the fingerprint."""
    max_length: int = 128
    top_k: int = 64
    plans: int = 4                      # M intervention plans per pair
    hidden: bool = False                # store the teacher's last hidden states (for `cos`)
    logit_tokens: str = "all"           # masked: loss tokens of ce / iit (all real tokens, or masked only)
    alignment: str = "middle"           # preset or JSON file (sampling.make_alignment)
    student_layers: int = 3             # the student the alignment maps onto
    span_fraction: float = 0.3
    dims: tuple[int, int] | None = None
    mlm_probability: float = 0.15
    temperature: float = 2.0
    seed: int = 0                       # pairing, masks and plans
    values: str = "g8"                  # the log-probs on disk (cache_codec): g<E>, bfloat16, float16, float32
    compress: str = "lzma"              # each block's compressor (cache_codec.COMPRESS)
    hidden_dtype: str = "bfloat16"
    teacher_dtype: str = "float32"
    shard_pairs: int = 256              # pairs per shard
    max_examples: int | None = None     # this many rows, drawn across the split (select_rows); None: all
    kind: str = "masked"                # the teacher's: "masked" or "causal"

    def __post_init__(self):
        for f in ("max_length", "top_k", "plans", "student_layers", "shard_pairs"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f}: {getattr(self, f)}; expected >= 1")
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r}; expected one of {KINDS}")
        if self.kind == "causal":
            # what a causal cache stores does not depend on these: the step's "affected" and "all" read the
            # same next-token targets, and there is no masking
            self.logit_tokens, self.mlm_probability = "next", 0.0
        elif self.logit_tokens not in LOGIT_TOKENS:
            raise ValueError(f"logit_tokens: {self.logit_tokens!r}; expected one of {LOGIT_TOKENS}")
        cache_codec.check_values(self.values)
        if self.compress not in cache_codec.COMPRESS:
            raise ValueError(f"compress: {self.compress!r}; expected one of {cache_codec.COMPRESS}")
        for f in ("hidden_dtype", "teacher_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ValueError(f"{f}: {getattr(self, f)!r}; expected one of {tuple(DTYPES)}")
        if not 0 < self.span_fraction <= 1:
            raise ValueError(f"span_fraction: {self.span_fraction}; expected 0 < p <= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature: {self.temperature}; expected > 0")
        if self.max_examples is not None and self.max_examples < 2:
            raise ValueError(f"max_examples: {self.max_examples}; expected >= 2 (one pair) or None")
        if self.dims is not None:
            self.dims = (int(self.dims[0]), int(self.dims[1]))


def derived_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of `parts` (the cache's rows, pairs, masks and plans, and the
    cached batches' epoch order: resuming or rebuilding draws the same)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def select_rows(n_all: int, n: int) -> torch.Tensor:
    """(n,) the corpus rows a cache of n examples holds, in corpus order: all of them when n >= n_all, else a
    sample drawn across the whole split (seeded by (n_all, n) only, so a run finds the same rows from the
    cache's size). A corpus keeps its sources in order: its first rows are not a sample of it."""
    if n >= n_all:
        return torch.arange(n_all)
    g = torch.Generator().manual_seed(derived_seed("rows", n_all, n))
    return torch.randperm(n_all, generator=g)[:n].sort().values


# ---------------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------------

_teacher_hashes: dict[tuple, str] = {}


def teacher_fingerprint(path) -> str:
    """SHA-256 over config.json and every weight file of a checkpoint folder (names, sizes, bytes);
    memoised per (path, sizes, mtimes) in this process."""
    folder = Path(path).expanduser().resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
                   and (p.name == "config.json" or p.suffix != ".json" or p.name.endswith(".index.json")))
    key = (str(folder),) + tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _teacher_hashes:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}|{p.stat().st_size}|".encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
        _teacher_hashes[key] = h.hexdigest()[:24]
    return _teacher_hashes[key]


def corpus_fingerprint(tokenized_split, rows: torch.Tensor) -> str:
    """SHA-256 of the tokenized rows `rows` (their ids as int64, and their row numbers)."""
    import numpy as np
    h = hashlib.sha256()
    data = tokenized_split.select_columns(["input_ids"]).with_format(None)
    rows = rows.tolist()
    for s in range(0, len(rows), 4096):
        chunk = rows[s:s + 4096]
        for r, ids in zip(chunk, data[chunk]["input_ids"]):
            h.update(f"{r}:".encode() + np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:24]


def fingerprint_fields(*, teacher_path, tokenizer, tokenized_split, opts: CacheOptions, alignment) -> dict:
    """The fields a cache is identified by. A training run builds the same dict from its own teacher,
    tokenizer, tokenized train split and options, and `TeacherCache.open(dir, expect=...)` compares."""
    from .data import tokenizer_key
    n_all = len(tokenized_split)
    n = n_all if opts.max_examples is None else min(opts.max_examples, n_all)
    fields = dataclasses.asdict(opts)
    fields.pop("max_examples")
    fields["dims"] = list(opts.dims) if opts.dims is not None else None
    fields["alignment"] = [[list(t), s] for t, s in alignment]   # resolved: a JSON file's content counts
    return {"format": FORMAT, "teacher": teacher_fingerprint(teacher_path), "tokenizer": tokenizer_key(tokenizer),
            "corpus": corpus_fingerprint(tokenized_split, select_rows(n_all, n)), "examples": n, **fields}


# the fields a training run determines by itself (the rest: top_k, plans, dtypes, seed... are the cache's choice)
# checked in this order: a field before the ones derived from it (the tokenized corpus depends on max_length)
# (not "format": a run reads every format in READS, and `_read_head` refuses the others with a rebuild message)
RUN_FIELDS = ("kind", "teacher", "tokenizer", "max_length", "corpus", "examples", "logit_tokens",
              "alignment", "student_layers", "span_fraction", "dims", "mlm_probability", "temperature")


def run_fingerprint(*, teacher_path, tokenizer, tokenized_split, opts: CacheOptions, alignment,
                    also: tuple[str, ...] = ()) -> dict:
    """`fingerprint_fields` cut to RUN_FIELDS (plus `also`, e.g. ("top_k",) to pin k): what a training run
    passes to `TeacherCache.open(dir, expect=...)`."""
    fields = fingerprint_fields(teacher_path=teacher_path, tokenizer=tokenizer, tokenized_split=tokenized_split,
                                opts=opts, alignment=alignment)
    return {k: fields[k] for k in RUN_FIELDS + tuple(also)}


def _fingerprint_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def compare_fingerprints(built: dict, expect: dict, where: str) -> None:
    """A ValueError naming the first field of `expect` that the built cache does not match."""
    for name, want in expect.items():
        have = built.get(name, "<absent>")
        if json.dumps(have, sort_keys=True) != json.dumps(want, sort_keys=True):
            raise ValueError(f"teacher cache {where} was built with another {name} ({name} = {have!r}; this run "
                             f"has {want!r}); rebuild it with `iit-fast cache-teacher` for this run, or pass a "
                             f"matching cache")
