"""Offline teacher cache (issue 16): bytes per token on disk for each option, build time, the cached step
against the online fast step with the FLOP model's prediction beside it, and the sparse KL's error by k.

    python benchmarks/teacher_cache.py                                  # minilm + bert-base, writes results
    python benchmarks/teacher_cache.py --shapes small --repeats 2 --name teacher-cache-small   # minutes
    python benchmarks/teacher_cache.py --teacher PATH                   # a trained teacher: KL errors that mean something

Per shape: a teacher (random weights at the shape, or --teacher), a corpus of random full-length rows,
one cache per option (top_k, --hidden; M plans, q8 log-probs, bf16 hidden states), built and timed;
then, on one batch of whole pairs from the k = 64 + hidden cache, with the same masks, pairing and plan:
- the online fast step (step.distill_step: teacher forward + student, fused head loss) and the cached step
  (cached_step.cached_distill_step: student only, sparse head loss), forward + backward, median of
  `--repeats` after a warm-up;
- the FLOP model (docs/method.md section 2): online = teacher full pass + resumed part with heads + student
  (3x: forward + backward) full + resumed with heads; cached = the student's part alone. The cached step's
  predicted time is the online time x FLOPs(cached) / FLOPs(online); goal: measured within 1.05x of it;
- the sparse KL's relative error in ce and iit against the online step's exact terms, for k = 16, 64,
  256 (the random teacher's decoder bias is Zipf-like, see make_teacher; a trained teacher's errors are
  the ones that matter: pass --teacher).
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
from benchmarks.common import machine, median_time, write_results  # noqa: E402
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
    from iit_fast.cache_codec import bytes_per_row
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
        model = 8 + (1 + PLANS) * bytes_per_row(k, vocab, opts.values) + (2 * teacher.hidden_size if hidden else 0)
        out.append({"shape": shape.name, "what": f"build k={k}{' +hidden' if hidden else ''}", "top_k": k,
                    "hidden": hidden, "bytes/token": size / tokens, "bytes/token (layout)": model,
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["minilm", "bert-base"], choices=list(SHAPES))
    p.add_argument("--teacher", default=None, help="a trained HF masked-LM folder (default: random weights)")
    p.add_argument("--batches", type=int, default=2, help="batches' worth of rows in each cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="teacher-cache")
    p.add_argument("--notes", default="")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    rows, extra = [], {}
    work = Path(tempfile.mkdtemp(prefix="teacher-cache-bench-"))
    try:
        for name in args.shapes:
            r, e = bench_shape(SHAPES[name], args, work)
            rows += r
            extra[name] = e
            for row in r:
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_write:
        cols = ["shape", "what", "bytes/token", "bytes/token (layout)", "build tokens/s", "online s", "cached s",
                "online/cached", "model online/cached", "cached / model's time", "ce rel err", "iit rel err"]
        cmd = (f"python benchmarks/teacher_cache.py --shapes {' '.join(args.shapes)} --batches {args.batches} "
               f"--repeats {args.repeats}" + (f" --teacher {args.teacher}" if args.teacher else "")
               + (f" --name {args.name}" if args.name != "teacher-cache" else ""))
        notes = (f"Command: `{cmd}`. M = {PLANS} plans, format 2 (cache_codec: bit-packed ids, q8 log-probs, "
                 f"fp16 rest), bf16 hidden "
                 f"states. Goals: cached within 1.05x of the model's time; ~1.5x faster than online at bert-base. "
                 + args.notes)
        write_results(args.name, {"machine": machine(), "shapes": extra}, rows, cols,
                      "Offline teacher cache: disk, build, cached step vs online fast step, sparse KL error", notes)


if __name__ == "__main__":
    main()
