"""The teacher cache's READER (and its format): what training opens to distil from stored teacher outputs
instead of running the teacher (docs/teacher-cache.md; docs/method.md section 5, "Offline teacher"). The
builder is `cache_builder` (`iit-fast cache-teacher`), the targets' encoding `cache_codec`.

    cache = TeacherCache.open(dir, expect=run_fingerprint(...))    # ValueError naming a field that differs
    pair = cache.read_pair(p, m)                                     # pair p's two rows with plan m, decoded
    python -m iit_fast.teacher_cache verify DIR [--full]             # every shard there and intact

What an example holds (everything the student's step needs, so training runs no teacher at all):
- its input: a masked teacher's corrupted `input_ids` and `labels` (its MLM masking, seeded per example by
  (seed, example), so the cached outputs are those of the very input the student sees); a causal teacher's
  `input_ids` (the labels are the ids);
- the teacher's top-k log-probs at temperature T with their ids, and the log of the mass outside the top k
  (`rest`), at the loss positions: a masked teacher's loss tokens (every real token, or the masked ones), a
  causal teacher's next-token positions (every real position with a real next token);
- its fixed source partner (published style: fixed for the whole run). Examples are paired at random
  once; a pair's two rows are each other's source, and a batch is made of whole pairs;
- M intervention plans per pair (the alignment pair, and per row the spans in base and source), with
  the teacher's counterfactual top-k for each: at a masked teacher's loss tokens, and at a causal teacher's
  next-token positions >= the row's base-span start only (before it the counterfactual is the plain pass);
- optionally the teacher's last hidden states at every real token (`hidden`) for the `cos` loss.

Format 3 (this version; `cache.json`'s fingerprint "format"; `cache_codec` describes it): per pair one
compressed block of its tokens and base targets, per (pair, plan) one of its counterfactual targets coded
against the base ones; log-probs on a grid of 2^-E nats (g8 by default) or as a float dtype. Format-2 caches
(fixed-size rows: packed ids, q<B> values) are still read. A format-1 cache (fp16 values, int32 ids, the
corpus's first rows) is refused with a message saying to rebuild it.

Layout of DIR: `cache.json` (the fingerprint and sizes, written before any shard) and, per shard of
`shard_pairs` pairs, `shard-NNNNN.safetensors` (memory-mapped on read; a batch reads only its slices) and
`shard-NNNNN.json`, its manifest (size, SHA-256, CRC-32, fingerprint hash), written after the shard file is
complete: a shard without a manifest does not exist.

Checks: opening a cache checks every shard's presence, size and header (no read of its data); each shard's
CRC-32 is verified when the process first reads it (one pass over its bytes, which the reads then find in
the page cache; `benchmarks/results/cache-checksum.md` measures it), so same-size corruption is an error
naming the shard, never garbage in training. `verify --full` checks SHA-256 of every shard up front.
`check_run(cache, ...)`: everything a training run asks of the cache that its metadata can refuse (the
step's weights and mode, the batch shape, the number of epochs against the plans per pair), before any work.

Shard tensors (R rows = 2 x pairs, T real tokens, N loss positions, C counterfactual targets, M plans,
K = top_k, D hidden):
    example (R,) int64 corpus row;  offsets (R+1,) into the T tokens;  kd_offsets (R+1,) into the N
    cf_offsets (M R + 1,) into the C, over (plan, row)
    plan_align (R/2, M) int32 index into the alignment;  plan_base_start, plan_source_start, plan_span_len (R, M)
    blocks (bytes,) uint8, block_offsets (R/2 + M R/2 + 1,), id_order (U,) int32 (`cache_codec.encode_shard`)
    hidden (T, D) (with --hidden)
  format 2 instead of the blocks: input_ids, labels (T,) int32; logp, ids, rest [, logp_top, logp_step] (N
  rows) and the same with cf_ (C rows), as `cache_format2.encode` writes them.
Rows 2j and 2j+1 are pair j: each is the other's source.

The fingerprint: the teacher (SHA-256 of config.json and every weight file: sound, and ~1 s per GB),
the tokenizer (its vocabulary and special ids), the corpus (SHA-256 of the cached rows, drawn by
`select_rows`), and every option that changes what is stored. A cache whose fingerprint differs from the
run's is refused, naming the field.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import zlib
from pathlib import Path

import torch

from . import cache_codec, cache_format2
from .cache_fingerprint import (DTYPES, FORMAT, KINDS, LOGIT_TOKENS, READS, RUN_FIELDS,  # noqa: F401 (re-exported)
                                CacheOptions, _fingerprint_hash, compare_fingerprints, corpus_fingerprint,
                                derived_seed, fingerprint_fields, run_fingerprint, select_rows, teacher_fingerprint)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _read_head(folder: Path) -> dict:
    """cache.json, its format checked: a FileNotFoundError / ValueError that says what to do otherwise."""
    head = folder / "cache.json"
    if not head.is_file():
        raise FileNotFoundError(f"teacher cache: {folder} has no cache.json; expected a folder written by "
                                f"`iit-fast cache-teacher --out {folder}`")
    meta = json.loads(head.read_text())
    fmt = meta.get("fingerprint", {}).get("format")
    if fmt not in READS:
        old = " (fp16 values, int32 ids, the corpus's first rows)" if fmt == 1 else ""
        raise ValueError(f"teacher cache {folder}: format {fmt}{old}; this version reads formats "
                         f"{' and '.join(map(str, READS))}: rebuild it with `iit-fast cache-teacher` (the same "
                         f"flags; it writes format {FORMAT})")
    return meta


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

_SMALL = ("example", "offsets", "kd_offsets", "cf_offsets", "plan_align", "plan_base_start", "plan_source_start",
          "plan_span_len")
_BLOCKS = ("block_offsets", "id_order")   # format 3: read with the small tensors


def _required(fp: dict) -> tuple[str, ...]:
    """The tensors every shard of a cache with fingerprint `fp` holds."""
    hidden = ("hidden",) if fp["hidden"] else ()
    if fp["format"] == 3:
        return _SMALL + _BLOCKS + ("blocks",) + hidden
    return (_SMALL + ("input_ids",) + (("labels",) if fp["kind"] == "masked" else ())
            + cache_format2.names(fp["values"]) + cache_format2.names(fp["values"], "cf_") + hidden)


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
        self.kind, self.values, self.id_bits = fp["kind"], fp["values"], meta["id_bits"]
        self.format, self.compress = fp["format"], fp.get("compress", "none")
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
        """Open and check: cache.json (its format), `expect` (the run's fingerprint fields; each one that
        differs is an error naming it), then every shard: manifest there, file of the manifest's size (or,
        verify="full", of its SHA-256) with a readable header of this fingerprint."""
        from safetensors import safe_open
        if verify not in ("size", "full"):
            raise ValueError(f"verify: {verify!r}; expected 'size' or 'full'")
        folder = Path(folder).expanduser()
        meta = _read_head(folder)
        if expect:
            compare_fingerprints(meta["fingerprint"], expect, str(folder))
        fp_hash = meta["fingerprint_hash"]
        required = _required(meta["fingerprint"])
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
            missing = [k for k in required if k not in keys]
            if missing or md.get("fingerprint_hash") != fp_hash:
                raise ValueError(f"{where} lacks {missing or 'its fingerprint'}; delete {name}.json and rebuild")
        return cls(folder, meta)

    def verify_shard(self, i: int) -> None:
        """Shard i's bytes against the checksum its manifest recorded at build (CRC-32; SHA-256 for a
        manifest without one): a ValueError naming the shard if they differ. One pass over the file."""
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
            self._small[i] = {k: f.get_tensor(k) for k in _SMALL + (_BLOCKS if self.format == 3 else ())}
        return self._handles[i], self._small[i]

    def _targets(self, f, a: int, b: int, prefix: str = ""):
        """Rows [a, b) of the base (prefix "") or counterfactual ("cf_") targets, decoded: (logp (n, K) fp32,
        ids (n, K) long, rest (n,) fp32)."""
        parts = {name: f.get_slice(name)[a:b] for name in cache_format2.names(self.values, prefix)}
        return cache_format2.decode(parts, k=self.top_k, values=self.values, id_bits=self.id_bits, prefix=prefix)

    def _blocks(self, f, small, p: int, j: int, m: int):
        """Format 3: pair j's (of its shard) tokens, labels (None: causal), base and plan m's counterfactual
        targets, decoded from its two blocks."""
        off, kdo, cfo, bo = small["offsets"], small["kd_offsets"], small["cf_offsets"], small["block_offsets"]
        R = small["example"].numel()
        P, order = R // 2, small["id_order"].long()
        kw = dict(values=self.values, id_bits=self.id_bits, compress=self.compress,
                  target_bits=cache_codec.bits_for(order.numel()))
        blob = lambda i: f.get_slice("blocks")[int(bo[i]):int(bo[i + 1])].numpy().tobytes()  # noqa: E731
        try:
            ids, lab, (logp, rank, rest) = cache_codec.decode_base_block(
                blob(j), tokens=int(off[2 * j + 2] - off[2 * j]), rows=int(kdo[2 * j + 2] - kdo[2 * j]),
                k=self.top_k, labels=self.kind == "masked", **kw)
            c = cfo[m * R + 2 * j:m * R + 2 * j + 3]
            rows = cache_codec.cf_base_rows(kdo[2 * j:2 * j + 3], c[1:] - c[:-1])
            cf = cache_codec.decode_cf_block(blob(P + m * P + j), logp[rows], rank[rows], **kw)
        except cache_codec.BlockError as e:
            raise ValueError(f"teacher cache {self.folder}: pair {p}'s block {e}: the shard is corrupt or of "
                             f"another version; rebuild it with `iit-fast cache-teacher`") from None
        return ids, lab, (logp, order[rank], rest), (cf[0], order[cf[1]], cf[2])

    def read_pair(self, p: int, m: int) -> dict:
        """Pair p's two rows with plan m: input_ids, labels (lists of two (L_r,) long), the base targets (at
        the loss positions) and the counterfactual ones (at the loss positions the plan can change), each
        (logp (n, K) fp32, ids (n, K) long, rest (n,)), the hidden states (T_pair, D) or None, the plan's
        spans (2,) each and its alignment index."""
        if not 0 <= p < self.num_pairs:
            raise ValueError(f"pair: {p}; expected 0 <= pair < {self.num_pairs}")
        if not 0 <= m < self.plans:
            raise ValueError(f"plan: {m}; expected 0 <= plan < {self.plans}")
        f, small = self._shard(p // self.shard_pairs)
        j = p % self.shard_pairs
        off, kdo, cfo = small["offsets"], small["kd_offsets"], small["cf_offsets"]
        R = small["example"].numel()                                              # rows in this shard
        a, mid, b = (int(x) for x in off[2 * j:2 * j + 3])
        ka, kb = int(kdo[2 * j]), int(kdo[2 * j + 2])
        ca, cb = int(cfo[m * R + 2 * j]), int(cfo[m * R + 2 * j + 2])
        if self.format == 3:
            ids, lab, base, cf = self._blocks(f, small, p, j, m)
        else:
            ids = f.get_slice("input_ids")[a:b].long()
            lab = f.get_slice("labels")[a:b].long() if self.kind == "masked" else None
            base, cf = self._targets(f, ka, kb), self._targets(f, ca, cb, "cf_")
        lab = ids if lab is None else lab                                         # causal: the labels are the ids
        out = {"input_ids": [ids[:mid - a], ids[mid - a:]], "labels": [lab[:mid - a], lab[mid - a:]],
               "base": base, "cf": cf, "hidden": f.get_slice("hidden")[a:b] if self.has_hidden else None,
               "align": int(small["plan_align"][j, m])}
        for k in ("base_start", "source_start", "span_len"):
            out[k] = small[f"plan_{k}"][2 * j:2 * j + 2, m].long()
        return out


def refuse_teacher_kind(kind: str, folder) -> None:
    """A cache holds one kind of teacher's outputs (masked or causal); a run with the other kind is refused
    first (before its options are checked against the cache's, which would name a field instead)."""
    folder = Path(folder).expanduser()
    built = _read_head(folder)["fingerprint"]["kind"]
    if built != kind:
        raise ValueError(f"--teacher_cache {folder} holds a {built} LM teacher's outputs, and this run's teacher "
                         f"is a {kind} LM; expected a cache built from this teacher (`iit-fast cache-teacher "
                         f"--teacher TEACHER`), or drop --teacher_cache")


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
# Command line: `python -m iit_fast.teacher_cache verify DIR` (building: `iit-fast cache-teacher`)
# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m iit_fast.teacher_cache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every shard of a cache (present, complete; --full: checksums)")
    v.add_argument("folder")
    v.add_argument("--full", action="store_true")
    # building is the builder's command (iit-fast cache-teacher, python -m iit_fast.cache_builder): the reader
    # does not import the builder, which imports the reader
    a = p.parse_args(argv)
    try:
        c = TeacherCache.open(a.folder, verify="full" if a.full else "size")
        print(f"teacher cache {a.folder}: a {c.kind} teacher, {c.num_shards} shards, {c.num_pairs} pairs: intact")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
