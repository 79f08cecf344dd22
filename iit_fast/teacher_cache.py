"""Offline teacher: run the teacher once over a tokenized corpus, distil from the stored outputs many times
(docs/method.md section 5, "Offline teacher").

    iit-fast cache-teacher --teacher T --corpus C --max_length 128 --top_k 64 --plans 4 [--hidden] --out DIR
    python -m iit_fast.teacher_cache build --teacher T ... --out DIR     # the same command
    python -m iit_fast.teacher_cache verify DIR [--full]                 # every shard there and intact
    RANK=r WORLD_SIZE=w iit-fast cache-teacher ...                       # rank r builds shards r::w

What an example holds (everything the student's step needs, so training runs no teacher at all):
- its MLM masking, fixed: the corrupted `input_ids` and the `labels` (seeded per example by (seed,
  example)), so the cached teacher outputs are those of the very input the student sees;
- the teacher's top-k log-probs at temperature T (`logp` in fp16/bf16/fp32, `ids` int32) at the loss
  tokens (every real token, or the masked ones: `logit_tokens`), and `rest`, the log of the mass outside
  the top k (fp32), so the KL over the k entries plus one "rest" bucket is defined (ops/head_loss/sparse.py);
- its fixed source partner (published style: fixed for the whole run). Examples are paired at random
  once; a pair's two rows are each other's source, and a batch is made of whole pairs;
- M intervention plans per pair (the alignment pair, and per row the spans in base and source), with
  the teacher's counterfactual top-k for each (`cf_logp`, `cf_ids`, `cf_rest`);
- optionally the teacher's last hidden states at every real token (`hidden`, bf16) for the `cos` loss.

Layout of DIR: `cache.json` (the fingerprint and sizes, written before any shard) and, per shard of
`shard_pairs` pairs, `shard-NNNNN.safetensors` (memory-mapped on read; a batch reads only its slices) and
`shard-NNNNN.json`, its manifest (size, SHA-256, CRC-32, fingerprint hash), written after the shard file is
complete: a shard without a manifest does not exist. A build skips complete shards, so an interrupted
build (killed, disk full) resumes where it stopped; nothing complete is ever rewritten; the temporary files
of a killed build (`.shard-NNNNN.*.tmpPID`) are removed by the next build of those shards.

Checks: opening a cache checks every shard's presence, size and header (no read of its data); each shard's
CRC-32 is verified when the process first reads it (one pass over its bytes, which the reads then find in
the page cache; `benchmarks/results/cache-checksum.md` measures it), so same-size corruption is an error
naming the shard, never garbage in training. `verify --full` checks SHA-256 of every shard up front.
`check_run(cache, ...)`: everything a training run asks of the cache that its metadata can refuse (the
step's weights and mode, the batch shape, the number of epochs against the plans per pair), before any work.

Shard tensors (R rows = 2 x pairs, T real tokens, N loss tokens, M plans, K = top_k, D hidden):
    example (R,) int64 corpus row;  offsets (R+1,) int64 into the T tokens;  kd_offsets (R+1,) into the N
    input_ids, labels (T,) int32;   logp (N, K), ids (N, K) int32, rest (N,) fp32
    plan_align (R/2, M) int32 index into the alignment;  plan_base_start, plan_source_start, plan_span_len (R, M)
    cf_logp (M, N, K), cf_ids (M, N, K) int32, cf_rest (M, N) fp32;  hidden (T, D) (with --hidden)
Rows 2j and 2j+1 are pair j: each is the other's source.

The fingerprint: the teacher (SHA-256 of config.json and every weight file: sound, and ~1 s per GB),
the tokenizer (its vocabulary and special ids), the corpus (SHA-256 of the tokenized rows), and every
option that changes what is stored. A cache whose fingerprint differs from the run's is refused, naming
the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .diskfull import free_bytes, is_disk_full, replace_atomic

FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGIT_TOKENS = ("all", "masked")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


@dataclass
class CacheOptions:
    """What the cache stores; every field is part of the fingerprint."""
    max_length: int = 128
    top_k: int = 64
    plans: int = 4                      # M intervention plans per pair
    hidden: bool = False                # store the teacher's last hidden states (for `cos`)
    logit_tokens: str = "all"           # loss tokens of ce / iit: all real tokens, or masked only
    alignment: str = "middle"           # preset or JSON file (sampling.make_alignment)
    student_layers: int = 3             # the student the alignment maps onto
    span_fraction: float = 0.3
    dims: tuple[int, int] | None = None
    mlm_probability: float = 0.15
    temperature: float = 2.0
    seed: int = 0                       # pairing, masks and plans
    logp_dtype: str = "float16"
    hidden_dtype: str = "bfloat16"
    teacher_dtype: str = "float32"
    shard_pairs: int = 256              # pairs per shard
    max_examples: int | None = None     # the first rows of the split only (tests, benchmarks)

    def __post_init__(self):
        for f in ("max_length", "top_k", "plans", "student_layers", "shard_pairs"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f}: {getattr(self, f)}; expected >= 1")
        if self.logit_tokens not in LOGIT_TOKENS:
            raise ValueError(f"logit_tokens: {self.logit_tokens!r}; expected one of {LOGIT_TOKENS}")
        for f in ("logp_dtype", "hidden_dtype", "teacher_dtype"):
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


def corpus_fingerprint(tokenized_split, n: int) -> str:
    """SHA-256 of the first n tokenized rows (their ids as int64)."""
    import numpy as np
    h = hashlib.sha256()
    rows = tokenized_split.select_columns(["input_ids"]).with_format(None)
    for s in range(0, n, 4096):
        for ids in rows[s:min(s + 4096, n)]["input_ids"]:
            h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:24]


def fingerprint_fields(*, teacher_path, tokenizer, tokenized_split, opts: CacheOptions, alignment) -> dict:
    """The fields a cache is identified by. A training run builds the same dict from its own teacher,
    tokenizer, tokenized train split and options, and `TeacherCache.open(dir, expect=...)` compares."""
    from .data import tokenizer_key
    n = len(tokenized_split) if opts.max_examples is None else min(opts.max_examples, len(tokenized_split))
    fields = dataclasses.asdict(opts)
    fields.pop("max_examples")
    fields["dims"] = list(opts.dims) if opts.dims is not None else None
    fields["alignment"] = [[list(t), s] for t, s in alignment]   # resolved: a JSON file's content counts
    return {"format": FORMAT, "teacher": teacher_fingerprint(teacher_path), "tokenizer": tokenizer_key(tokenizer),
            "corpus": corpus_fingerprint(tokenized_split, n), "examples": n, **fields}


# the fields a training run determines by itself (the rest: top_k, plans, dtypes, seed... are the cache's choice)
# checked in this order: a field before the ones derived from it (the tokenized corpus depends on max_length)
RUN_FIELDS = ("format", "teacher", "tokenizer", "max_length", "corpus", "examples", "logit_tokens", "alignment",
              "student_layers", "span_fraction", "dims", "mlm_probability", "temperature")


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


# ---------------------------------------------------------------------------------------------------------
# Writing (through one hook, so a full disk can be simulated)
# ---------------------------------------------------------------------------------------------------------

def _write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (`diskfull.replace_atomic`). Tests replace this to
    simulate a full disk."""
    replace_atomic(path, data)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _remove_stale_temporaries(out: Path, shards) -> list[str]:
    """The temporary files (`.shard-NNNNN.*.tmpPID`) a killed build left for `shards`: each shard is built
    by one rank only (i % world_size), so those of this rank's shards are never another live build's."""
    import re
    mine = {_shard_name(i) for i in shards}
    gone = []
    for f in out.glob(".shard-*.tmp*"):
        m = re.fullmatch(r"\.(shard-\d{5})\.(?:safetensors|json)\.tmp\d+", f.name)
        if m and m.group(1) in mine:
            f.unlink(missing_ok=True)
            gone.append(f.name)
    for f in out.glob(".cache.json.tmp*"):  # any rank writes cache.json: only a dead writer's is stale
        pid = f.name.rsplit("tmp", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            f.unlink(missing_ok=True)
            gone.append(f.name)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------

def derived_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of `parts` (the cache's pairs, masks and plans, and the cached
    batches' epoch order: resuming or rebuilding draws the same)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def pairing(n: int, seed: int) -> torch.Tensor:
    """(n // 2, 2) corpus rows of each pair: a random permutation cut in twos (an odd last row is left out)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed("pairs", seed)))
    return order[: n - n % 2].view(-1, 2)


@torch.no_grad()
def topk_logprobs(teacher, last_hidden: torch.Tensor, k: int, temperature: float, chunk: int = 256):
    """The teacher's top-k log-probs at temperature T of N tokens' last states (N, D): (logp (N, k) fp32,
    ids (N, k) int32, rest (N,) fp32 = log of the mass outside the top k, -inf when k = V); chunked."""
    out_p, out_i, out_r = [], [], []
    for s in range(0, last_hidden.shape[0], chunk):
        z = teacher.logits(last_hidden[s:s + chunk]).float()                     # (C, V)
        logp = torch.log_softmax(z / temperature, dim=-1)
        top = logp.topk(k, dim=-1)                                                # sorted, distinct ids
        if k < logp.shape[1]:
            rest = torch.logsumexp(logp.scatter_(1, top.indices, float("-inf")), dim=-1)
        else:
            rest = torch.full((logp.shape[0],), float("-inf"))
        out_p.append(top.values.cpu())
        out_i.append(top.indices.int().cpu())
        out_r.append(rest.cpu())
    if not out_p:  # no loss token in this batch
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int32), torch.zeros(0)
    return torch.cat(out_p), torch.cat(out_i), torch.cat(out_r)


def _pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    S = max(len(s) for s in seqs)
    out = torch.full((len(seqs), S), value, dtype=torch.long)                     # (B, S)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


@torch.no_grad()
def build_shard(teacher, collate, tokenized_rows, pairs: torch.Tensor, pair0: int, opts: CacheOptions,
                alignment, batch_rows: int) -> dict[str, torch.Tensor]:
    """The tensors of one shard: pairs (P, 2) of corpus rows, the first being global pair `pair0`."""
    from .sampling import InterventionPlan, sample_spans
    from .step import counterfactual_last_hidden
    P, M, T = pairs.shape[0], opts.plans, opts.temperature
    rows = pairs.reshape(-1)                                                      # (R,) corpus rows
    seqs = tokenized_rows[rows.tolist()]["input_ids"]
    masked, labels = [], []
    for r, seq in zip(rows.tolist(), seqs):
        b = collate([seq], torch.Generator().manual_seed(derived_seed("mask", opts.seed, r)))
        masked.append(b["input_ids"][0, :len(seq)])
        labels.append(b["labels"][0, :len(seq)])
    lengths = torch.tensor([len(s) for s in seqs])                                # (R,)
    # plans: per pair and plan, an alignment index; per row, its spans against its partner
    align = torch.zeros(P, M, dtype=torch.int32)
    starts = {k: torch.zeros(2 * P, M, dtype=torch.int32) for k in ("base_start", "source_start", "span_len")}
    swap = torch.tensor([1, 0])
    for j in range(P):
        for m in range(M):
            g = torch.Generator().manual_seed(derived_seed("plan", opts.seed, pair0 + j, m))
            align[j, m] = int(torch.randint(len(alignment), (1,), generator=g))
            k, bs, ss = sample_spans(lengths[2 * j:2 * j + 2], swap, opts.span_fraction, g)
            for name, v in (("base_start", bs), ("source_start", ss), ("span_len", k)):
                starts[name][2 * j:2 * j + 2, m] = v.int()
    layers = sorted({l for group, _ in alignment for l in group})
    dev = next(teacher.parameters()).device
    base, cfs, hidden = [], [[] for _ in range(M)], []
    step = max(2, batch_rows - batch_rows % 2)
    for b0 in range(0, 2 * P, step):                                              # whole pairs per batch
        b1 = min(b0 + step, 2 * P)
        ids = _pad(masked[b0:b1], collate.pad_id).to(dev)                         # (B, S)
        lab = _pad(labels[b0:b1], -100).to(dev)
        am = (torch.arange(ids.shape[1])[None] < lengths[b0:b1, None]).long().to(dev)
        tokens = am.bool()
        kd = tokens if opts.logit_tokens == "all" else lab != -100                # (B, S) loss tokens
        t = teacher(ids, am, torch.zeros_like(ids), keep=set(layers))
        base.append(topk_logprobs(teacher, t.last_hidden[kd], opts.top_k, T))
        if opts.hidden:
            hidden.append(t.last_hidden[tokens].to(DTYPES[opts.hidden_dtype]).cpu())
        for m in range(M):
            h_cf = torch.empty_like(t.last_hidden)                                # (B, S, D)
            a_rows = align[b0 // 2:b1 // 2, m].repeat_interleave(2).to(dev)       # (B,) per row
            for a in a_rows.unique().tolist():
                sel = (a_rows == a).nonzero().squeeze(1)                          # whole pairs
                group, s_l = alignment[a]
                plan = InterventionPlan(tuple(group), s_l, torch.arange(len(sel), device=dev) ^ 1,
                                        *(starts[n][b0:b1, m][sel.cpu()].long().to(dev)
                                          for n in ("base_start", "source_start", "span_len")), opts.dims)
                sites = {l: t.sites[l][sel] for l in group}
                h_cf[sel] = counterfactual_last_hidden(teacher, sites, am[sel], tuple(group), plan, "auto")
            cfs[m].append(topk_logprobs(teacher, h_cf[kd], opts.top_k, T))
    kd_len = torch.tensor([int((lab != -100).sum()) for lab in labels]) if opts.logit_tokens == "masked" \
        else lengths
    cat = lambda parts, i: torch.cat([p[i] for p in parts])                      # noqa: E731
    logp_dtype = DTYPES[opts.logp_dtype]
    out = {
        "example": rows.long(),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "kd_offsets": torch.cat([torch.zeros(1, dtype=torch.long), kd_len.cumsum(0)]),
        "input_ids": torch.cat(masked).int(), "labels": torch.cat(labels).int(),
        "logp": cat(base, 0).to(logp_dtype), "ids": cat(base, 1), "rest": cat(base, 2),
        "plan_align": align, **{f"plan_{k}": v for k, v in starts.items()},
        "cf_logp": torch.stack([cat(c, 0) for c in cfs]).to(logp_dtype),
        "cf_ids": torch.stack([cat(c, 1) for c in cfs]), "cf_rest": torch.stack([cat(c, 2) for c in cfs]),
    }
    if opts.hidden:
        out["hidden"] = torch.cat(hidden)
    return {k: v.contiguous() for k, v in out.items()}


def collate_pad_id(tokenizer) -> int:
    """The id batches are padded with (as data.Collate pads)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _shard_complete(out: Path, i: int, fp_hash: str) -> bool:
    """A shard counts when its manifest (written last) is there, of this fingerprint, and the file has the
    manifest's size."""
    name = _shard_name(i)
    try:
        man = json.loads((out / f"{name}.json").read_text())
        return man.get("fingerprint_hash") == fp_hash and (out / f"{name}.safetensors").stat().st_size == man["bytes"]
    except (OSError, ValueError, KeyError):
        return False


def build_cache(teacher_path, tokenized_split, out, opts: CacheOptions, *, loaded=None, rank: int = 0,
                world_size: int = 1, batch_rows: int = 32, device=None, progress: bool = True,
                corpus_spec: str | None = None) -> dict:
    """Run the teacher over `tokenized_split` (columns input_ids[, length]) and write this rank's shards
    (r::world_size) of the cache `out`; complete shards are kept (a rerun resumes). Returns cache.json's
    content. `loaded`: (IntervenableLM, tokenizer) of `teacher_path`, if the caller has loaded them (the
    model is moved to `device` and `opts.teacher_dtype` in place)."""
    import safetensors.torch
    from tqdm import tqdm

    from .data import Collate
    from .models import load_model
    from .sampling import make_alignment
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank}; expected 0 <= rank < world_size={world_size}")
    if batch_rows < 2:
        raise ValueError(f"batch_rows: {batch_rows}; expected >= 2 (a batch holds whole pairs)")
    out = Path(out)
    teacher, tokenizer = loaded or load_model(teacher_path, kind="masked", arg="teacher")
    if teacher.kind != "masked":
        raise ValueError(f"teacher: the cache supports masked LMs for now; {teacher_path} is a {teacher.kind} LM")
    if opts.top_k > teacher.vocab_size:
        raise ValueError(f"top_k: {opts.top_k}; expected at most the teacher's vocabulary ({teacher.vocab_size})")
    n_all = len(tokenized_split)
    longest = max(tokenized_split["length"]) if "length" in tokenized_split.column_names else \
        max(len(x) for x in tokenized_split["input_ids"])
    if longest > opts.max_length:
        raise ValueError(f"max_length: {opts.max_length}, but the tokenized corpus has rows of {longest} tokens; "
                         f"expected the max_length it was tokenized with")
    alignment = make_alignment(opts.alignment, teacher.num_layers, opts.student_layers)
    fields = fingerprint_fields(teacher_path=teacher_path, tokenizer=tokenizer, tokenized_split=tokenized_split,
                                opts=opts, alignment=alignment)
    fp_hash = _fingerprint_hash(fields)
    pairs = pairing(fields["examples"], opts.seed)                                # (n_pairs, 2)
    if len(pairs) == 0:
        raise ValueError(f"corpus: {n_all} sequence(s); expected at least 2 (one pair)")
    num_shards = math.ceil(len(pairs) / opts.shard_pairs)
    meta = {"fingerprint": fields, "fingerprint_hash": fp_hash, "num_shards": num_shards, "num_pairs": len(pairs),
            "vocab_size": teacher.vocab_size, "hidden_size": teacher.hidden_size,
            "teacher_layers": teacher.num_layers, "pad_id": collate_pad_id(tokenizer),
            "teacher_path": str(teacher_path), "corpus_spec": corpus_spec}
    out.mkdir(parents=True, exist_ok=True)
    head = out / "cache.json"
    if head.is_file():  # resuming (or another rank wrote it): it must be the same cache
        compare_fingerprints(json.loads(head.read_text())["fingerprint"], fields, str(out))
    else:
        try:
            _write_bytes(head, (json.dumps(meta, indent=1) + "\n").encode())
        except OSError as e:
            raise CacheWriteError(e.errno, f"teacher cache {out}: writing cache.json failed ({e.strerror or e}); "
                                           f"nothing was built") from e
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = teacher.to(dev, dtype=DTYPES[opts.teacher_dtype]).eval().requires_grad_(False)
    collate = Collate(tokenizer, kind="masked", mlm_probability=opts.mlm_probability, pad_to_multiple_of=1)
    rows = tokenized_split.select_columns(["input_ids"]).with_format(None)
    mine = list(range(rank, num_shards, world_size))
    todo = [i for i in mine if not _shard_complete(out, i, fp_hash)]
    _remove_stale_temporaries(out, todo)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress, unit="shard",
               desc=f"teacher cache (rank {rank}/{world_size})")
    for i in todo:
        p0 = i * opts.shard_pairs
        tensors = build_shard(teacher, collate, rows, pairs[p0:p0 + opts.shard_pairs], p0, opts, alignment,
                              batch_rows)
        # one metadata key: safetensors writes metadata in hash-map order, so with one key the file's bytes
        # are a function of its contents (a rebuilt shard is byte-identical)
        data = safetensors.torch.save(tensors, metadata={"fingerprint_hash": fp_hash})
        manifest = {"shard": i, "fingerprint_hash": fp_hash, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "crc32": zlib.crc32(data),
                    "rows": int(tensors["example"].numel()),
                    "tokens": int(tensors["input_ids"].numel()), "loss_tokens": int(tensors["rest"].numel())}
        try:
            _write_bytes(out / f"{_shard_name(i)}.safetensors", data)
            _write_bytes(out / f"{_shard_name(i)}.json", (json.dumps(manifest) + "\n").encode())  # last
        except OSError as e:
            done = sum(_shard_complete(out, j, fp_hash) for j in range(num_shards))
            why = (f"the disk is full: the shard needs {len(data):,} bytes, {free_bytes(out) or 0:,} are free"
                   if is_disk_full(e, out) else (e.strerror or str(e)))
            raise CacheWriteError(e.errno, f"teacher cache {out}: writing shard {i} failed ({why}); {done} of "
                                           f"{num_shards} shards are complete and kept: make room and run the "
                                           f"same command again to resume") from e
        bar.update(1)
    bar.close()
    return meta


class CacheWriteError(OSError):
    """A shard could not be written (e.g. the disk is full); the complete shards are kept."""


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

_SMALL = ("example", "offsets", "kd_offsets", "plan_align", "plan_base_start", "plan_source_start", "plan_span_len")
_REQUIRED = _SMALL + ("input_ids", "labels", "logp", "ids", "rest", "cf_logp", "cf_ids", "cf_rest")


class TeacherCache:
    """A built cache, opened for reading: every shard checked present and complete on open (before any
    training step); tensors read by slices from the memory-mapped shard files.

        cache = TeacherCache.open(dir, expect=fingerprint_fields(...))   # ValueError naming a field that differs
        pair = cache.read_pair(p, m)                                      # pair p's two rows, plan m
    """

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        fp = meta["fingerprint"]
        self.fingerprint = fp
        self.alignment = [(tuple(t), s) for t, s in fp["alignment"]]
        self.num_pairs, self.num_shards = meta["num_pairs"], meta["num_shards"]
        self.plans, self.top_k, self.has_hidden = fp["plans"], fp["top_k"], fp["hidden"]
        self.logit_tokens, self.temperature, self.dims = fp["logit_tokens"], fp["temperature"], \
            (tuple(fp["dims"]) if fp["dims"] is not None else None)
        self.shard_pairs = fp["shard_pairs"]
        self._handles: dict[int, object] = {}
        self._small: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, folder, expect: dict | None = None, *, verify: str = "size") -> "TeacherCache":
        """Open and check: cache.json, `expect` (the run's fingerprint fields; each one that differs is an
        error naming it), then every shard: manifest there, file of the manifest's size (or, verify="full",
        of its SHA-256) with a readable header of this fingerprint."""
        from safetensors import safe_open
        if verify not in ("size", "full"):
            raise ValueError(f"verify: {verify!r}; expected 'size' or 'full'")
        folder = Path(folder).expanduser()
        head = folder / "cache.json"
        if not head.is_file():
            raise FileNotFoundError(f"teacher cache: {folder} has no cache.json; expected a folder written by "
                                    f"`iit-fast cache-teacher --out {folder}`")
        meta = json.loads(head.read_text())
        if meta["fingerprint"].get("format") != FORMAT:
            raise ValueError(f"teacher cache {folder}: format {meta['fingerprint'].get('format')}; this version "
                             f"reads format {FORMAT}: rebuild it")
        if expect:
            compare_fingerprints(meta["fingerprint"], expect, str(folder))
        fp_hash = meta["fingerprint_hash"]
        complete = [i for i in range(meta["num_shards"]) if (folder / f"{_shard_name(i)}.json").is_file()]
        for i in range(meta["num_shards"]):
            name = _shard_name(i)
            where = f"teacher cache {folder}: shard {i} ({name}.safetensors)"
            if i not in complete:
                raise ValueError(f"{where} is missing (no manifest): the build did not finish ({len(complete)} of "
                                 f"{meta['num_shards']} shards complete); run the build command again to resume")
            man = json.loads((folder / f"{name}.json").read_text())
            path = folder / f"{name}.safetensors"
            size = path.stat().st_size if path.is_file() else None
            if size != man["bytes"]:
                raise ValueError(f"{where} is truncated or missing: {size} bytes, its manifest says {man['bytes']}; "
                                 f"delete {name}.json and run the build command again to rebuild it")
            if man["fingerprint_hash"] != fp_hash:
                raise ValueError(f"{where} belongs to another build (fingerprint {man['fingerprint_hash']}, the "
                                 f"cache's {fp_hash}); rebuild the cache")
            if verify == "full":
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 24):
                        h.update(block)
                if h.hexdigest() != man["sha256"]:
                    raise ValueError(f"{where} is corrupt: its SHA-256 differs from its manifest's; delete "
                                     f"{name}.json and run the build command again")
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys, md = set(f.keys()), f.metadata() or {}
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise ValueError(f"{where} is unreadable ({e}); delete {name}.json and rebuild") from None
            missing = [k for k in _REQUIRED if k not in keys] + (["hidden"] if meta["fingerprint"]["hidden"]
                                                                   and "hidden" not in keys else [])
            if missing or md.get("fingerprint_hash") != fp_hash:
                raise ValueError(f"{where} lacks {missing or 'its fingerprint'}; delete {name}.json and rebuild")
        return cls(folder, meta)

    def verify_shard(self, i: int) -> None:
        """Shard i's bytes against the checksum its manifest recorded at build (CRC-32; SHA-256 for a
        cache built before CRCs): a ValueError naming the shard if they differ. One pass over the file."""
        name = _shard_name(i)
        man = json.loads((self.folder / f"{name}.json").read_text())
        path = self.folder / f"{name}.safetensors"
        crc, h = 0, (None if "crc32" in man else hashlib.sha256())
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                if h is None:
                    crc = zlib.crc32(block, crc)
                else:
                    h.update(block)
        if (crc != man["crc32"]) if h is None else (h.hexdigest() != man["sha256"]):
            raise ValueError(f"teacher cache {self.folder}: shard {i} ({name}.safetensors) is corrupt: its "
                             f"{'CRC-32' if h is None else 'SHA-256'} differs from the one recorded when it was "
                             f"built; delete {name}.json and run the build command again to rebuild it")

    def _shard(self, i: int):
        if i not in self._handles:
            from safetensors import safe_open
            self.verify_shard(i)  # first read of this shard in this process: never train on corrupt bytes
            f = safe_open(str(self.folder / f"{_shard_name(i)}.safetensors"), framework="pt")
            self._handles[i] = f
            self._small[i] = {k: f.get_tensor(k) for k in _SMALL}
        return self._handles[i], self._small[i]

    def read_pair(self, p: int, m: int) -> dict:
        """Pair p's two rows with plan m: input_ids, labels (lists of two (L_r,) long), the base and the
        counterfactual targets of their loss tokens (logp (n, K) fp32, ids (n, K) long, rest (n,)), the
        hidden states (T_pair, D) or None, the plan's spans (2,) each and its alignment index."""
        if not 0 <= p < self.num_pairs:
            raise ValueError(f"pair: {p}; expected 0 <= pair < {self.num_pairs}")
        if not 0 <= m < self.plans:
            raise ValueError(f"plan: {m}; expected 0 <= plan < {self.plans}")
        f, small = self._shard(p // self.shard_pairs)
        j = p % self.shard_pairs
        off, kdo = small["offsets"], small["kd_offsets"]
        a, mid, b = (int(x) for x in off[2 * j:2 * j + 3])
        ka, kb = int(kdo[2 * j]), int(kdo[2 * j + 2])
        ids, lab = f.get_slice("input_ids")[a:b].long(), f.get_slice("labels")[a:b].long()
        out = {"input_ids": [ids[:mid - a], ids[mid - a:]], "labels": [lab[:mid - a], lab[mid - a:]],
               "base": (f.get_slice("logp")[ka:kb].float(), f.get_slice("ids")[ka:kb].long(),
                        f.get_slice("rest")[ka:kb]),
               "cf": (f.get_slice("cf_logp")[m, ka:kb].float(), f.get_slice("cf_ids")[m, ka:kb].long(),
                      f.get_slice("cf_rest")[m, ka:kb]),
               "hidden": f.get_slice("hidden")[a:b] if self.has_hidden else None,
               "align": int(small["plan_align"][j, m])}
        for k in ("base_start", "source_start", "span_len"):
            out[k] = small[f"plan_{k}"][2 * j:2 * j + 2, m].long()
        return out


def refuse_teacher_kind(kind: str, folder) -> None:
    """A cache holds a masked-LM teacher's outputs; a run with another kind of teacher is refused first
    (before its options are checked against the cache's, which would name a field instead)."""
    if kind != "masked":
        raise ValueError(f"--teacher_cache {folder}: teacher caches do not support causal teachers yet (they "
                         f"hold masked-LM teachers only; this teacher is a {kind} LM): drop --teacher_cache")


def check_run(cache: TeacherCache, cfg, *, micro_batch: int, accumulation: int, world_size: int, max_steps: int,
              epochs: int) -> None:
    """Everything a training run asks of `cache` that its metadata can refuse, before any work: the step's
    config (`cfg`, a DistillConfig), the batch shape, and the number of epochs against the plans per pair.
    A ValueError naming the flag and what the cache holds."""
    where = f"--teacher_cache {cache.folder}"
    if cfg.mode not in ("fast", "standard"):
        raise ValueError(f"--mode {cfg.mode}: a cached teacher runs the fast or the standard step ({where})")
    if cfg.w_cos and not cache.has_hidden:
        raise ValueError(f"--w_cos {cfg.w_cos} needs the teacher's hidden states, and {where} was built without "
                         f"them: rebuild it with --hidden, or pass --w_cos 0")
    if cfg.w_iit_cos or cfg.w_mse:
        raise ValueError(f"--w_iit_cos / --w_mse must be 0 with a cached teacher ({where}): the cache holds no "
                         f"teacher counterfactual or site states")
    if getattr(cfg, "shared_vocab", None) is not None:
        raise ValueError(f"--shared_vocab must be unset with a cached teacher ({where}): the cached ids index the "
                         f"teacher's whole vocabulary (the student's vocabulary must be the teacher's)")
    if micro_batch < 2 or micro_batch % 2:
        raise ValueError(f"train_micro_batch_size_per_gpu {micro_batch}: a cached batch is whole (row, partner) "
                         f"pairs ({where}); expected an even number >= 2")
    per_rank = cache.num_pairs // (micro_batch // 2) // world_size                  # batches per epoch per rank
    steps_per_epoch = per_rank // accumulation
    if steps_per_epoch == 0:
        raise ValueError(f"{where} holds {cache.num_pairs} pairs: not one optimizer step of {micro_batch // 2} "
                         f"pairs x {accumulation} accumulation x {world_size} ranks; expected a bigger cache or a "
                         f"smaller batch")
    need = epochs or math.ceil(max_steps / steps_per_epoch)
    if cfg.uses_iit and need > cache.plans:
        what = f"--epochs {epochs}" if epochs else f"--max_steps {max_steps} at {steps_per_epoch} steps per epoch"
        raise ValueError(f"{where} holds {cache.plans} intervention plans per pair, and this run goes over its pairs "
                         f"{need} times ({what}): every epoch draws a plan per pair, so plans would repeat; "
                         f"rebuild the cache with --plans {need} (or more rows), or train for at most "
                         f"{cache.plans * steps_per_epoch} steps")


# ---------------------------------------------------------------------------------------------------------
# Command line: `iit-fast cache-teacher` and `python -m iit_fast.teacher_cache build | verify`
# ---------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CacheOptions()
    p.add_argument("--teacher", default=None, help="HF masked-LM folder; default: the embedded default teacher")
    p.add_argument("--corpus", default=None, help="load_corpus spec (files, folder, hub name); default corpus")
    p.add_argument("--out", required=True, help="the cache folder (a rerun resumes into it)")
    p.add_argument("--max_length", type=int, default=d.max_length)
    p.add_argument("--top_k", type=int, default=d.top_k)
    p.add_argument("--plans", type=int, default=d.plans, help="intervention plans per pair (M)")
    p.add_argument("--hidden", action="store_true", help="store the teacher's last hidden states (for cos)")
    p.add_argument("--logit_tokens", choices=LOGIT_TOKENS, default=d.logit_tokens)
    p.add_argument("--alignment", default=d.alignment)
    p.add_argument("--student_layers", type=int, default=d.student_layers)
    p.add_argument("--span_fraction", type=float, default=d.span_fraction)
    p.add_argument("--mlm_probability", type=float, default=d.mlm_probability)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the pairing, the masks and the plans")
    p.add_argument("--logp_dtype", choices=tuple(DTYPES), default=d.logp_dtype)
    p.add_argument("--hidden_dtype", choices=tuple(DTYPES), default=d.hidden_dtype)
    p.add_argument("--teacher_dtype", choices=tuple(DTYPES), default=d.teacher_dtype)
    p.add_argument("--shard_pairs", type=int, default=d.shard_pairs)
    p.add_argument("--max_examples", type=int, default=None)
    p.add_argument("--batch_rows", type=int, default=32, help="rows per teacher forward")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world_size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--device", default=None)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--num_proc", type=int, default=1)
    p.add_argument("--no_progress", action="store_true")


def run(a) -> dict:
    """Build (or resume) the cache the arguments describe; prints one summary line."""
    from . import corpus, data
    from .models import load_model
    opts = CacheOptions(**{f.name: getattr(a, f.name) for f in dataclasses.fields(CacheOptions) if hasattr(a, f.name)})
    if a.teacher is None:
        from .teacher import default_teacher_path
        a.teacher = str(default_teacher_path(a.cache_dir, build_if_missing=True))
    loaded = load_model(a.teacher, kind="masked", arg="--teacher")
    tokenized = data.tokenize_corpus(corpus.load_corpus(a.corpus, a.cache_dir), loaded[1], opts.max_length,
                                     a.num_proc, a.cache_dir)
    try:
        meta = build_cache(a.teacher, tokenized["train"], a.out, opts, loaded=loaded, rank=a.rank,
                           world_size=a.world_size, batch_rows=a.batch_rows, device=a.device,
                           progress=not a.no_progress, corpus_spec=a.corpus)
    except CacheWriteError as e:
        import sys
        print(f"error: {e.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"teacher cache {a.out}: {meta['num_pairs']} pairs in {meta['num_shards']} shards "
          f"(rank {a.rank} of {a.world_size} done)")
    return meta


def main(argv=None) -> int:
    import sys
    p = argparse.ArgumentParser(prog="python -m iit_fast.teacher_cache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("build", help="build or resume a cache"))
    v = sub.add_parser("verify", help="check every shard of a cache (present, complete; --full: checksums)")
    v.add_argument("folder")
    v.add_argument("--full", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.command == "build":
            run(a)
        else:
            c = TeacherCache.open(a.folder, verify="full" if a.full else "size")
            print(f"teacher cache {a.folder}: {c.num_shards} shards, {c.num_pairs} pairs: intact")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
