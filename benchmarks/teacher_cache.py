"""Offline teacher cache (issues 16, 25): bytes per token on disk by encoding, where they go, the decode cost,
and the sparse KL error of each encoding; optionally the cached step against the online fast step.

    python benchmarks/teacher_cache.py --causal-teacher ~/.cache/iit_fast/teacher-gpt2-l4-h256    # sizes (default)
    python benchmarks/teacher_cache.py --sizes-only --rows 64 --ks 64                          # a quick look
    python benchmarks/teacher_cache.py --shapes minilm bert-base --no-sizes                    # the step's speed

SIZES (per teacher kind: the trained MiniLM masked teacher and a causal GPT-2 teacher, `--rows` rows of the
default corpus drawn across it, M = 4 plans, k in `--ks`): one exact cache (float32 values, no compression)
is built per k, then written again in each encoding of `--codecs` (values:compressor; format 3,
`cache_codec.encode_shard`) from the same targets. Per encoding: bytes per real token of the shard files
(everything: tokens, labels, plans, offsets, headers), beside format 2's (q8, packed ids) and format 1's
(fp16 + int32) layouts for the same rows; the bytes of each stream (raw, and compressed alone); the decode
cost: `collate_pairs` of a batch of 8 rows (4 pairs, 1 thread), median over the cache's batches. The error:
on validation rows, the sparse KL (ce, T = 2) of a student initialised from the teacher with the top-k as
each encoding decodes it, against the fp32 top-k (`teacher_cache_quality.encoding_errors`).

STEP (`--shapes`; a random teacher at the shape or --teacher, random rows): the online fast step
(step.distill_step) against the cached step (cached_step.cached_distill_step), forward + backward, median of
`--repeats`, with the FLOP model's prediction (docs/method.md section 2); the sparse KL's error by k.
Results: benchmarks/results/<name>.json and .md (default name teacher-cache).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, markdown_table, median_time, write_results  # noqa: E402
from benchmarks.step import Shape  # noqa: E402  (the step benchmark's shapes: the same fields)


SHAPES = {
    "minilm": Shape("minilm", 6, 3, 384, 12, 30522, 128, 16),       # the default run: MiniLM 6x384 -> 3 layers
    "bert-base": Shape("bert-base", 12, 6, 768, 12, 30522, 128, 8),
    "small": Shape("small", 6, 3, 256, 4, 8000, 64, 16),             # minutes on a shared CPU
}
# (top_k, hidden): each built as its own cache
OPTIONS = [(16, False), (64, False), (256, False), (64, True)]
PLANS = 4


def flops(shape: Shape, site_t: int, site_s: int) -> dict:
    """Multiply-adds x 2 per step. Per token: a block 24 D^2 + 4 S D, the head 2 D^2 + 2 D V (every real
    token takes logits: logit_tokens all); backward = 2 x forward; the teacher has no backward."""
    D, S, V = shape.hidden, shape.seq, shape.vocab
    layer, head = 24 * D * D + 4 * S * D, 2 * D * D + 2 * D * V
    Lt, Ls = shape.teacher_layers, shape.student_layers
    teacher = Lt * layer + head + (Lt - site_t - 1) * layer + head
    student = 3 * (Ls * layer + head) + 3 * ((Ls - site_s - 1) * layer + head)
    tokens = shape.batch * S
    return {"online": (teacher + student) * tokens, "cached": student * tokens}


def _fits(teacher_dir, shape: Shape) -> bool:
    """Does the teacher folder have the shape's depth and width (so the FLOP model describes it)?"""
    cfg = json.loads((Path(teacher_dir) / "config.json").read_text())
    return (cfg.get("num_hidden_layers"), cfg.get("hidden_size")) == (shape.teacher_layers, shape.hidden)


def make_teacher(shape: Shape, folder: Path) -> str:
    """A random BertForMaskedLM at the shape and a WordPiece tokenizer of its vocabulary, saved to `folder`.
    Its decoder bias is Zipf-like, -3 log(rank): random weights alone give a nearly uniform teacher at T = 2,
    whose top k hold almost none of its mass; this gives it a long tail closer to a trained MLM's."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.teacher_layers,
                     num_attention_heads=shape.heads, intermediate_size=4 * shape.hidden,
                     max_position_embeddings=max(512, shape.seq), hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        rank = torch.randperm(shape.vocab, generator=torch.Generator().manual_seed(0)).double() + 1
        model.cls.predictions.bias.copy_(-3.0 * rank.log())
    model.save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(shape.vocab - 5)]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False).save_pretrained(folder)
    return str(folder)


def random_corpus(shape: Shape, rows: int, vocab: int):
    """`rows` full-length rows: [CLS] random ids [SEP]."""
    import datasets
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (rows, shape.seq), generator=g)   # (rows, S)
    ids[:, 0], ids[:, -1] = 2, 3
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "length": [shape.seq] * rows})


def bench_shape(shape: Shape, args, work: Path) -> tuple[list[dict], dict]:
    from iit_fast.cached_step import cached_distill_step, collate_pairs
    from iit_fast.config import DistillConfig
    from iit_fast.models import IntervenableLM, load_model
    from iit_fast.models.student import init_student_from_teacher
    from iit_fast.step import distill_step
    from iit_fast.cache_builder import build_cache
    from iit_fast.cache_format2 import bytes_per_row
    from iit_fast.teacher_cache import CacheOptions, TeacherCache

    teacher_dir = args.teacher if args.teacher and _fits(args.teacher, shape) else \
        make_teacher(shape, work / f"teacher-{shape.name}")
    if args.teacher and teacher_dir != args.teacher:
        print(f"[teacher-cache] {shape.name}: --teacher is not {shape.teacher_layers} x {shape.hidden}; a random "
              f"teacher of the shape is used (the speed figures need the shape, not the weights)", flush=True)
    teacher, tok = load_model(teacher_dir, kind="masked")
    vocab = teacher.vocab_size
    rows = 2 * shape.batch * args.batches
    ds = random_corpus(shape, rows, vocab)
    tokens = rows * shape.seq
    caches, out = {}, []
    for k, hidden in OPTIONS:
        opts = CacheOptions(max_length=shape.seq, top_k=k, plans=PLANS, hidden=hidden,
                            student_layers=shape.student_layers, shard_pairs=shape.batch)
        folder = work / f"{shape.name}-k{k}{'-h' if hidden else ''}"
        t0 = time.perf_counter()
        build_cache(teacher_dir, ds, folder, opts, loaded=(teacher, tok), batch_rows=shape.batch, progress=False)
        seconds = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in folder.glob("shard-*.safetensors"))
        # the layout's count: ids + labels int32, per loss token (1 + M) rows of targets (cache_codec: packed ids,
        # q8 values, fp16 rest), hidden bf16
        model = 8 + (1 + PLANS) * bytes_per_row(k, vocab, "q8") + (2 * teacher.hidden_size if hidden else 0)
        out.append({"shape": shape.name, "what": f"build k={k}{' +hidden' if hidden else ''}", "top_k": k,
                    "hidden": hidden, "bytes/token": size / tokens, "bytes/token (format 2 layout)": model,
                    "build s": seconds, "build tokens/s": tokens / seconds})
        caches[(k, hidden)] = TeacherCache.open(folder)

    # one batch of whole pairs, plan 0 of each, from the k = 64 + hidden cache
    cache = caches[(64, True)]
    pairs = list(range(shape.batch // 2))
    cb = collate_pairs(cache, pairs, [0] * len(pairs))
    ((_, plan),) = cb.groups()
    torch.manual_seed(0)
    student = IntervenableLM(init_student_from_teacher(teacher.model, shape.student_layers)).train()
    teacher = teacher.eval().requires_grad_(False)
    cfg = DistillConfig(ops="fused")
    params = list(student.parameters())

    def step(fn):
        def go():
            for p in params:
                p.grad = None
            o = fn()
            o.loss.backward()
            return o
        return go

    online = step(lambda: distill_step(teacher, student, cb.batch, plan, cfg))
    cached = step(lambda: cached_distill_step(student, cb, cfg))
    t_on, _ = median_time(online, repeats=args.repeats, warmup=1)
    t_ca, _ = median_time(cached, repeats=args.repeats, warmup=1)
    f = flops(shape, plan.teacher_layers[0], plan.student_layer)
    predicted = t_on * f["cached"] / f["online"]
    step_tokens = int(cb.batch["attention_mask"].sum())
    out.append({"shape": shape.name, "what": "step (fwd+bwd), fp32, k=64 +hidden", "online s": t_on,
                "cached s": t_ca, "online/cached": t_on / t_ca, "model online/cached": f["online"] / f["cached"],
                "cached / model's time": t_ca / predicted, "cached tokens/s": step_tokens / t_ca})

    # the sparse KL's error by k, against the online step's exact terms on this batch (same masks, plan)
    with torch.no_grad():
        exact = distill_step(teacher, student, cb.batch, plan, cfg).terms
        for k in (16, 64, 256):
            cbk = collate_pairs(caches[(k, False)], pairs, [0] * len(pairs))
            got = cached_distill_step(student, cbk, DistillConfig(ops="fused", w_cos=0)).terms
            what = f"KL error k={k} ({caches[(k, False)].values} values)"
            out.append({"shape": shape.name, "what": what, "top_k": k,
                        "ce rel err": abs(got["ce"] - exact["ce"]).item() / exact["ce"].item(),
                        "iit rel err": abs(got["iit"] - exact["iit"]).item() / exact["iit"].item()})
    return out, {"flops": f, "teacher": args.teacher or "random weights, Zipf-like decoder bias", "rows": rows,
                 "plans": PLANS}


# ---------------------------------------------------------------------------------------------------------
# Sizes: one exact cache per (teacher, k), written again in each encoding
# ---------------------------------------------------------------------------------------------------------

def shard_targets(cache, i: int) -> dict:
    """Shard i of an exact (float32) cache as `cache_codec.encode_shard`'s inputs: tokens, labels, and the
    base and counterfactual targets over all pairs and plans, each row sorted largest first again."""
    small = cache._shard(i)[1]
    pairs = range(i * cache.shard_pairs, min((i + 1) * cache.shard_pairs, cache.num_pairs))
    reads = {(p, m): cache.read_pair(p, m) for p in pairs for m in range(cache.plans)}

    def rows(key, plans):
        lp, ids, rest = (torch.cat([reads[p, m][key][j] for m in plans for p in pairs]) for j in range(3))
        o = lp.argsort(dim=1, descending=True, stable=True)
        return lp.gather(1, o), ids.gather(1, o), rest

    return {"small": {k: v for k, v in small.items() if k not in ("block_offsets", "id_order")},
            "input_ids": torch.cat([x for p in pairs for x in reads[p, 0]["input_ids"]]),
            "labels": torch.cat([x for p in pairs for x in reads[p, 0]["labels"]]) if cache.kind == "masked" else None,
            "base": rows("base", [0]), "cf": rows("cf", range(cache.plans))}


def transcode(exact, folder: Path, values: str, compress: str) -> dict:
    """The exact cache written again with `values` and `compress` into `folder` (a cache that opens and
    trains like a built one); returns the streams' byte counts (cache_codec.STATS)."""
    from iit_fast import cache_codec, cache_format2
    from iit_fast.cache_builder import write_shard
    from iit_fast.teacher_cache import _fingerprint_hash
    fmt2 = values.startswith("q")                                                 # format 2's rows, to compare
    fields = dict(exact.fingerprint, values=values, compress=compress)
    if fmt2:
        fields["format"] = 2
        del fields["compress"]
    meta = dict(exact.meta, fingerprint=fields, fingerprint_hash=_fingerprint_hash(fields))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cache.json").write_text(json.dumps(meta, indent=1) + "\n")
    cache_codec.STATS = {}
    try:
        for i in range(exact.num_shards):
            t = shard_targets(exact, i)
            sm = t["small"]
            if fmt2:  # fixed-size rows (cache_format2.encode), int32 tokens and labels
                tensors = dict(sm, input_ids=t["input_ids"].int(),
                               **cache_format2.encode(*t["base"], values=values, id_bits=exact.id_bits),
                               **cache_format2.encode(*t["cf"], values=values, id_bits=exact.id_bits, prefix="cf_"))
                if t["labels"] is not None:
                    tensors["labels"] = t["labels"].int()
            else:
                tensors = dict(sm, **cache_codec.encode_shard(
                    t["input_ids"], t["labels"], t["base"], t["cf"], sm["offsets"], sm["kd_offsets"],
                    sm["cf_offsets"], plans=exact.plans, values=values, id_bits=exact.id_bits, compress=compress))
            write_shard(folder, i, {k: v.contiguous() for k, v in tensors.items()}, meta["fingerprint_hash"],
                        exact.num_shards)
        return cache_codec.STATS
    finally:
        cache_codec.STATS = None


def decode_ms(cache, batch_rows: int = 8) -> float:
    """Median ms of `collate_pairs` (read + decode + pad) of a batch of `batch_rows` rows, one thread."""
    from iit_fast.cached_step import collate_pairs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = min(batch_rows // 2, cache.num_pairs)
        times = []
        for b in range(0, cache.num_pairs - n + 1, n):
            t0 = time.perf_counter()
            collate_pairs(cache, list(range(b, b + n)), [b % cache.plans] * n)
            times.append(time.perf_counter() - t0)
        return 1000 * sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(threads)


def bench_sizes(kind: str, a, work: Path) -> list[dict]:
    from benchmarks.teacher_cache_quality import build_record, encoding_errors, load_teacher, make_student
    from iit_fast import corpus, data
    from iit_fast.cache_builder import build_cache
    from iit_fast.cache_format2 import legacy_bytes_per_row
    from iit_fast.eval import load_validation
    from iit_fast.precision import resolve
    from iit_fast.teacher_cache import CacheOptions, TeacherCache
    precision, _ = resolve("auto")
    dtype = "bfloat16" if precision == "bf16" else "float32"
    path, teacher, tok = load_teacher(kind, a.masked_teacher if kind == "masked" else a.causal_teacher, None)
    tokenized = data.tokenize_corpus(corpus.load_corpus(None, None), tok, 128, 1, None, kind=kind)["train"]
    out = []
    for k in a.ks:
        opts = CacheOptions(kind=kind, max_length=128, top_k=k, plans=PLANS, max_examples=a.rows, values="float32",
                            compress="none", teacher_dtype=dtype, shard_pairs=128)
        folder = Path(a.work) / f"{kind}-k{k}-exact"                                # kept: a rerun reuses it
        t0 = time.perf_counter()
        meta = build_cache(path, tokenized, folder, opts, loaded=(teacher, tok), batch_rows=16, progress=False)
        build_s, (tokens, loss, cf) = build_record(folder, t0, ("tokens", "loss_tokens", "cf_targets"))
        exact = TeacherCache.open(folder)
        tok_bytes = 8 if kind == "masked" else 4                                   # int32 ids (+ labels)
        base = {"teacher": kind, "top_k": k, "rows": meta["num_pairs"] * 2, "tokens": tokens,
                "cf rows / token": cf / tokens, "id bits": meta["id_bits"]}
        out.append({**base, "what": "size", "encoding": "format 1 (fp16 + int32 ids, layout)",
                    "bytes/token": (tokens * tok_bytes + (loss + cf) * legacy_bytes_per_row(k)) / tokens})
        for codec in ["q8:none"] + a.codecs:                                       # format 2 (q8) first
            values, compress = codec.split(":")
            dst = work / f"{kind}-k{k}-{values}-{compress}"
            t0 = time.perf_counter()
            stats = transcode(exact, dst, values, compress)
            enc_s = time.perf_counter() - t0
            cache = TeacherCache.open(dst)
            size = sum(p.stat().st_size for p in dst.glob("shard-*.safetensors"))
            name = "format 2 q8 (packed ids)" if values.startswith("q") else f"format 3 {values} {compress}"
            row = {**base, "what": "size", "encoding": name, "bytes/token": size / tokens,
                   "decode ms / batch of 8 rows": decode_ms(cache), "encode tokens/s": tokens / enc_s,
                   "teacher build tokens/s": tokens / build_s}
            out.append(row)
            for (part, stream), (raw, alone) in sorted(stats.items()):
                out.append({**base, "what": "stream", "encoding": name,
                            "stream": f"{part}: {stream}", "raw bytes/token": raw / tokens,
                            "compressed alone bytes/token": alone / tokens})
            print(f"[teacher-cache] {row}", flush=True)
            shutil.rmtree(dst, ignore_errors=True)
    val = load_validation(tok, None, 16, 128, None, kind=kind, max_batches=a.eval_batches)
    teacher = teacher.eval().requires_grad_(False)
    student = make_student(teacher, 3).eval()
    for r in encoding_errors(kind, teacher, student, val, a):
        out.append({**r, "what": "error", "encoding": r["values"]})
    return out


def main(argv=None):
    from iit_fast.teacher_cache import CacheOptions
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="*", default=["masked", "causal"], choices=["masked", "causal"],
                   help="teachers whose cache sizes and errors are measured (none: --kinds)")
    p.add_argument("--masked-teacher", default=None, help="default: the embedded MiniLM teacher")
    p.add_argument("--causal-teacher", default=None, help="default: the embedded GPT-2 teacher (--family gpt2)")
    p.add_argument("--rows", type=int, default=64, help="rows in each size cache, drawn across the corpus")
    p.add_argument("--ks", nargs="+", type=int, default=[64, 256])
    p.add_argument("--codecs", nargs="+", default=["g8:lzma", "g7:lzma", "g7:zlib", "g6:lzma", "g5:lzma"],
                   help="format-3 encodings, values:compressor (format 2's q8 is always measured first)")
    p.add_argument("--eval-batches", type=int, default=2, help="validation batches of 16 rows for the error")
    p.add_argument("--work", default="runs/teacher-cache-sizes", help="the exact caches (kept, reused)")
    p.add_argument("--shapes", nargs="*", default=[], choices=list(SHAPES), help="the step's speed at these shapes")
    p.add_argument("--teacher", default=None, help="--shapes: a trained HF masked-LM folder (default: random)")
    p.add_argument("--batches", type=int, default=2, help="--shapes: batches' worth of rows in each cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="teacher-cache")
    p.add_argument("--notes", default="")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    rows, extra = [], {}
    work = Path(tempfile.mkdtemp(prefix="teacher-cache-bench-"))
    try:
        for kind in args.kinds:
            rows += bench_sizes(kind, args, work)
        for name in args.shapes:
            r, e = bench_shape(SHAPES[name], args, work)
            rows += r
            extra[name] = e
            for row in r:
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.no_write:
        return rows
    home = str(Path.home())
    cmd = ("python benchmarks/teacher_cache.py"
           + (f" --kinds {' '.join(args.kinds)}" if args.kinds != ["masked", "causal"] else "")
           + (f" --causal-teacher {args.causal_teacher.replace(home, '~')}" if args.causal_teacher else "")
           + (f" --rows {args.rows} --ks {' '.join(map(str, args.ks))} --codecs {' '.join(args.codecs)}"
              if args.kinds else "")
           + (f" --shapes {' '.join(args.shapes)} --batches {args.batches} --repeats {args.repeats}"
              if args.shapes else "")
           + (f" --teacher {args.teacher.replace(home, '~')}" if args.teacher else "")
           + (f" --name {args.name}" if args.name != "teacher-cache" else ""))
    pick = lambda what: [r for r in rows if r["what"] == what]  # noqa: E731
    d = CacheOptions()
    default = f"format 3 {d.values} {d.compress}"                                # the streams of the default
    notes = (f"Command: `{cmd}`. M = {PLANS} plans. Sizes: bytes per real token of the shard files (all of "
             f"it: tokens, labels, plans, offsets, safetensors headers); format 1 and 2 rows are their layouts "
             f"for the same rows. Decode: `collate_pairs` of 8 rows (4 pairs) on one thread, median; the "
             f"machine was shared with other jobs (2 cores, load 3-10): ratios within a column, not absolute "
             f"times.\n\n"
             f"## Where the bytes go ({default}, the default; each stream's bytes raw, and compressed alone: "
             f"the block compresses them together, a little smaller; every encoding's in the .json)\n\n"
             + markdown_table([r for r in pick("stream") if r["encoding"] == default and r["raw bytes/token"]],
                              ["teacher", "top_k", "stream", "raw bytes/token", "compressed alone bytes/token"])
             + "\n## The encoding's sparse KL error (ce at T = 2, a student initialised from the teacher, "
               "validation rows; fp16 = format 1, q8 = format 2, g7 = format 3's default)\n\n"
             + markdown_table(pick("error"), ["teacher", "top_k", "encoding", "rel. error vs fp32 top-k",
                                              "per-token rel. error vs fp32 top-k", "rel. error vs full KL",
                                              "tokens"])
             + ("\n## The step (fwd+bwd): online vs cached\n\n"
                + markdown_table([r for r in rows if r["what"].startswith(("step", "KL error", "build"))],
                                 ["shape", "what", "bytes/token", "online s", "cached s", "online/cached",
                                  "model online/cached", "cached / model's time", "ce rel err", "iit rel err"])
                if args.shapes else "")
             + (f"\n{args.notes}\n" if args.notes else ""))
    write_results(args.name, {"machine": machine(), "shapes": extra, "all_rows": rows}, pick("size"),
                  ["teacher", "top_k", "encoding", "bytes/token", "decode ms / batch of 8 rows", "cf rows / token",
                   "id bits", "rows", "tokens"],
                  "Offline teacher cache: bytes per token by encoding, where they go, decode cost, sparse KL error",
                  notes)
    return rows


if __name__ == "__main__":
    main()
