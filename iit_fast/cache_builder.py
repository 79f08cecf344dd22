"""The teacher cache's BUILDER: run the teacher once over a tokenized corpus and write what the student's step
needs (docs/teacher-cache.md). The reader that training uses is `teacher_cache.TeacherCache`; the encoding of
the targets is `cache_codec`.

    iit-fast cache-teacher --teacher T --corpus C --max_length 128 --top_k 64 --plans 4 [--hidden] --out DIR
    python -m iit_fast.cache_builder --teacher T ... --out DIR          # the same command
    RANK=r WORLD_SIZE=w iit-fast cache-teacher ...                       # rank r builds shards r::w

Masked teachers (BERT-style): per example its MLM masking (seeded per row), the teacher's top-k at the loss
tokens (every real token, or the masked ones) and, per plan, the top-k of the counterfactual at the same
tokens (a swap changes every position of a bidirectional model).
Causal teachers (GPT-2, Llama, ...): no masking (the labels are the ids); the teacher's next-token top-k at
every real position with a real next token, and per plan the counterfactual's top-k at those positions >= the
row's base-span start only: before it a causal model's counterfactual equals its plain pass (step.py,
`counterfactual_suffix_hidden`), so those targets would be copies of the base ones. One causal cache serves
the step's `logit_tokens` "affected" and "all" (the latter takes the base targets before the span start).

Rows: the cache holds `max_examples` rows drawn across the whole training split (a seeded sample, in corpus
order; all rows without --max_examples), never only its first rows. The teacher runs in the precision
train.py would choose (`precision.resolve`: bf16 where this machine is fast at it; `--precision`).

A shard is written whole or not at all: the tensors, then its manifest (size, SHA-256, CRC-32, fingerprint
hash). A build skips complete shards (an interrupted build resumes), never rewrites one, and removes the
temporary files a killed build left.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import zlib
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from . import cache_codec
from .diskfull import free_bytes, is_disk_full, replace_atomic
from .cache_fingerprint import (DTYPES, FORMAT, LOGIT_TOKENS, CacheOptions, _fingerprint_hash,
                                compare_fingerprints, derived_seed, fingerprint_fields, select_rows)
from .teacher_cache import _shard_name


# ---------------------------------------------------------------------------------------------------------
# Writing (through one hook, so a full disk can be simulated)
# ---------------------------------------------------------------------------------------------------------

def _write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (`diskfull.replace_atomic`). Tests replace this to
    simulate a full disk."""
    replace_atomic(path, data)


def _remove_stale_temporaries(out: Path, shards) -> list[str]:
    """The temporary files (`.shard-NNNNN.*.tmpPID`) a killed build left for `shards`: each shard is built
    by one rank only (i % world_size), so those of this rank's shards are never another live build's."""
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


@torch.no_grad()
def build_shard(teacher, collate, tokenized_rows, pairs: torch.Tensor, pair0: int, opts: CacheOptions,
                alignment, batch_rows: int, id_bits: int) -> dict[str, torch.Tensor]:
    """The tensors of one shard: pairs (P, 2) of corpus rows, the first being global pair `pair0`."""
    from .sampling import InterventionPlan, sample_spans
    from .step import counterfactual_last_hidden, next_token_targets
    P, M, T = pairs.shape[0], opts.plans, opts.temperature
    causal = opts.kind == "causal"
    rows = pairs.reshape(-1)                                                      # (R,) corpus rows
    seqs = tokenized_rows[rows.tolist()]["input_ids"]
    inputs, labels = [], []
    for r, seq in zip(rows.tolist(), seqs):
        if causal:  # no masking: the labels are the ids (next-token targets, shifted in the step)
            inputs.append(torch.tensor(seq, dtype=torch.long))
            continue
        b = collate([seq], torch.Generator().manual_seed(derived_seed("mask", opts.seed, r)))
        inputs.append(b["input_ids"][0, :len(seq)])
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
    kd_len, cf_len = [], [[] for _ in range(M)]                                   # per row: targets stored
    step = max(2, batch_rows - batch_rows % 2)
    for b0 in range(0, 2 * P, step):                                              # whole pairs per batch
        b1 = min(b0 + step, 2 * P)
        ids = pad_sequence(inputs[b0:b1], True, collate.pad_id).long().to(dev)   # (B, S)
        am = (torch.arange(ids.shape[1])[None] < lengths[b0:b1, None]).long().to(dev)
        tokens = am.bool()
        if causal:
            tt = None
            kd, _ = next_token_targets(am, ids)                                   # (B, S) a real next token
        else:
            tt = torch.zeros_like(ids)
            lab = pad_sequence(labels[b0:b1], True, -100).long().to(dev)
            kd = tokens if opts.logit_tokens == "all" else lab != -100            # (B, S) loss tokens
        t = teacher(ids, am, tt, keep=set(layers))
        base.append(topk_logprobs(teacher, t.last_hidden[kd], opts.top_k, T))
        kd_len.append(kd.sum(1).cpu())
        if opts.hidden:
            hidden.append(t.last_hidden[tokens].to(DTYPES[opts.hidden_dtype]).cpu())
        cols = torch.arange(ids.shape[1], device=dev)[None]                       # (1, S)
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
            # causal: only the positions >= the base-span start can differ from the plain pass
            cf_mask = kd & (cols >= starts["base_start"][b0:b1, m].to(dev)[:, None]) if causal else kd
            cfs[m].append(topk_logprobs(teacher, h_cf[cf_mask], opts.top_k, T))
            cf_len[m].append(cf_mask.sum(1).cpu())
    kd_len = torch.cat(kd_len)
    cf_len = torch.stack([torch.cat(c) for c in cf_len])                          # (M, R)
    cat = lambda parts, i: torch.cat([p[i] for p in parts])                      # noqa: E731
    zero = torch.zeros(1, dtype=torch.long)
    out = {
        "example": rows.long(),
        "offsets": torch.cat([zero, lengths.cumsum(0)]),
        "kd_offsets": torch.cat([zero, kd_len.cumsum(0)]),
        "cf_offsets": torch.cat([zero, cf_len.reshape(-1).cumsum(0)]),           # over (plan, row)
        "plan_align": align, **{f"plan_{k}": v for k, v in starts.items()},
    }
    out.update(cache_codec.encode_shard(
        torch.cat(inputs), None if causal else torch.cat(labels), tuple(cat(base, i) for i in range(3)),
        tuple(torch.cat([cat(c, i) for c in cfs]) for i in range(3)), out["offsets"], out["kd_offsets"],
        out["cf_offsets"], plans=M, values=opts.values, id_bits=id_bits, compress=opts.compress))
    if opts.hidden:
        out["hidden"] = torch.cat(hidden)
    return {k: v.contiguous() for k, v in out.items()}


def collate_pad_id(tokenizer) -> int:
    """The id batches are padded with (as batches.Collate pads)."""
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
    model is moved to `device` and `opts.teacher_dtype` in place). The teacher's kind must be `opts.kind`."""
    from tqdm import tqdm

    from .batches import Collate
    from .models import load_model
    from .sampling import make_alignment
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank}; expected 0 <= rank < world_size={world_size}")
    if batch_rows < 2:
        raise ValueError(f"batch_rows: {batch_rows}; expected >= 2 (a batch holds whole pairs)")
    out = Path(out)
    teacher, tokenizer = loaded or load_model(teacher_path, arg="teacher")
    if teacher.kind != opts.kind:
        raise ValueError(f"teacher: {teacher_path} is a {teacher.kind} LM, and the cache options say kind "
                         f"{opts.kind!r}; expected CacheOptions(kind={teacher.kind!r})")
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
    chosen = select_rows(n_all, fields["examples"])                               # (n,) corpus rows
    pairs = chosen[pairing(fields["examples"], opts.seed)]                        # (n_pairs, 2) corpus rows
    if len(pairs) == 0:
        raise ValueError(f"corpus: {n_all} sequence(s); expected at least 2 (one pair)")
    num_shards = math.ceil(len(pairs) / opts.shard_pairs)
    meta = {"fingerprint": fields, "fingerprint_hash": fp_hash, "num_shards": num_shards, "num_pairs": len(pairs),
            "vocab_size": teacher.vocab_size, "id_bits": cache_codec.bits_for(teacher.vocab_size),
            "hidden_size": teacher.hidden_size, "teacher_layers": teacher.num_layers,
            "pad_id": collate_pad_id(tokenizer), "teacher_path": str(teacher_path), "corpus_spec": corpus_spec,
            "corpus_rows": n_all}
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
    collate = Collate(tokenizer, kind=opts.kind, mlm_probability=opts.mlm_probability or 0.15,
                      pad_to_multiple_of=1)
    rows = tokenized_split.select_columns(["input_ids"]).with_format(None)
    mine = list(range(rank, num_shards, world_size))
    todo = [i for i in mine if not _shard_complete(out, i, fp_hash)]
    _remove_stale_temporaries(out, todo)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress, unit="shard",
               desc=f"teacher cache (rank {rank}/{world_size})")
    for i in todo:
        p0 = i * opts.shard_pairs
        tensors = build_shard(teacher, collate, rows, pairs[p0:p0 + opts.shard_pairs], p0, opts, alignment,
                              batch_rows, meta["id_bits"])
        write_shard(out, i, tensors, fp_hash, num_shards)
        bar.update(1)
    bar.close()
    return meta


class CacheWriteError(OSError):
    """A shard could not be written (e.g. the disk is full); the complete shards are kept."""


def write_shard(out: Path, i: int, tensors: dict, fp_hash: str, num_shards: int) -> None:
    """Shard i's file, then its manifest (size, SHA-256, CRC-32, counts): a CacheWriteError if either fails."""
    import safetensors.torch
    # one metadata key: safetensors writes metadata in hash-map order, so with one key the file's bytes
    # are a function of its contents (a rebuilt shard is byte-identical)
    data = safetensors.torch.save(tensors, metadata={"fingerprint_hash": fp_hash})
    manifest = {"shard": i, "format": FORMAT, "fingerprint_hash": fp_hash, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "crc32": zlib.crc32(data),
                "rows": int(tensors["example"].numel()), "tokens": int(tensors["offsets"][-1]),
                "loss_tokens": int(tensors["kd_offsets"][-1]), "cf_targets": int(tensors["cf_offsets"][-1])}
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


# ---------------------------------------------------------------------------------------------------------
# Command line: `iit-fast cache-teacher` and `python -m iit_fast.cache_builder`
# ---------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CacheOptions()
    p.add_argument("--teacher", default=None, help="HF masked or causal LM folder; default: the embedded default "
                                                   "(masked) teacher")
    p.add_argument("--corpus", default=None, help="load_corpus spec (files, folder, hub name); default corpus")
    p.add_argument("--text_column", default="text", help="the corpus column holding the text")
    p.add_argument("--out", required=True, help="the cache folder (a rerun resumes into it)")
    p.add_argument("--max_length", type=int, default=d.max_length)
    p.add_argument("--top_k", type=int, default=d.top_k)
    p.add_argument("--plans", type=int, default=d.plans, help="intervention plans per pair (M)")
    p.add_argument("--hidden", action="store_true", help="store the teacher's last hidden states (for cos)")
    p.add_argument("--logit_tokens", choices=LOGIT_TOKENS, default=d.logit_tokens,
                   help="masked teachers: the loss tokens (causal teachers: every next-token position)")
    p.add_argument("--alignment", default=d.alignment)
    p.add_argument("--student_layers", type=int, default=d.student_layers)
    p.add_argument("--span_fraction", type=float, default=d.span_fraction)
    p.add_argument("--mlm_probability", type=float, default=d.mlm_probability)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the pairing, the masks and the plans")
    p.add_argument("--values", default=d.values, help="the log-probs on disk: g<E> (on a grid of 2^-E nats, default "
                                                      f"{d.values}), bfloat16, float16 or float32 (cache_codec.py)")
    p.add_argument("--compress", choices=cache_codec.COMPRESS, default=d.compress,
                   help="each block's compressor (lzma: smallest; zlib: faster to decode)")
    p.add_argument("--hidden_dtype", choices=tuple(DTYPES), default=d.hidden_dtype)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the teacher's precision: auto = bf16 where this machine is fast at it (as train.py)")
    p.add_argument("--shard_pairs", type=int, default=d.shard_pairs)
    p.add_argument("--max_examples", type=int, default=None,
                   help="cache this many rows, drawn across the whole training split (default: every row)")
    p.add_argument("--batch_rows", type=int, default=32, help="rows per teacher forward")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world_size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--device", default=None)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--num_proc", type=int, default=1)
    p.add_argument("--no_progress", action="store_true")


def run(a) -> dict:
    """Build (or resume) the cache the arguments describe; prints the precision and one summary line."""
    from . import corpus, data
    from .models.load import inspect_model, load_weights
    from .precision import resolve
    if a.teacher is None:
        from .teacher import default_teacher_path
        a.teacher = str(default_teacher_path(a.cache_dir, build_if_missing=True))
    precision, why = resolve(a.precision)
    print(f"precision: {precision} ({why})", flush=True)
    spec, tokenizer = inspect_model(a.teacher, arg="--teacher")
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(CacheOptions) if hasattr(a, f.name)}
    opts = CacheOptions(**fields, kind=spec.kind, teacher_dtype="bfloat16" if precision == "bf16" else "float32")
    dtype = DTYPES[opts.teacher_dtype]
    loaded = (load_weights(spec, dtype), tokenizer)
    tokenized = data.tokenize_corpus(corpus.load_corpus(a.corpus, a.cache_dir, text_column=a.text_column),
                                     tokenizer, opts.max_length, a.num_proc, a.cache_dir, kind=spec.kind)
    try:
        meta = build_cache(a.teacher, tokenized["train"], a.out, opts, loaded=loaded, rank=a.rank,
                           world_size=a.world_size, batch_rows=a.batch_rows, device=a.device,
                           progress=not a.no_progress, corpus_spec=a.corpus)
    except CacheWriteError as e:
        print(f"error: {e.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"teacher cache {a.out}: a {spec.kind} teacher, {meta['num_pairs']} pairs of {meta['corpus_rows']} rows "
          f"in {meta['num_shards']} shards, top-{opts.top_k} ids ({meta['id_bits']} bits) + {opts.values} values, "
          f"{opts.compress} blocks "
          f"(rank {a.rank} of {a.world_size} done)")
    return meta


def main(argv=None) -> int:
    """`python -m iit_fast.cache_builder ARGS` is `iit-fast cache-teacher ARGS` (its errors: one line, exit 2)."""
    from .cli import main as cli
    return cli(["cache-teacher", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
