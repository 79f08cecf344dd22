"""Students from a teacher cache vs online, the fair comparison (issue 25): the same rows, masks, partners and
plans in both, 3 seeds, paired; a masked and a causal teacher; k = 64 and 256. Also the cache's bytes per
token and the sparse KL error of its encoding against format 1's (fp16 values, int32 ids).

    python benchmarks/teacher_cache_quality.py                       # the default teachers (built first)
    python benchmarks/teacher_cache_quality.py --kinds causal --steps 20 --seeds 0   # one quick look

Per teacher (`python -m iit_fast.teacher build` and `--family gpt2`, or --masked-teacher / --causal-teacher):
1. caches at each k (`cache_builder.build_cache`, M = 4 plans; a finished earlier-format cache of the same rows
   in the work folder is reused, so that later seeds train from the targets the first ones did) of the same
   `steps x batch` rows drawn across the training split; bytes per token on disk (shard bytes / real
   tokens) beside format 1's layout for the same rows;
2. the encoding's error: on validation rows, the sparse KL (ce, T = 2) of a student initialised from the
   teacher, with the top-k values as format 3 (g<E>), format 2 (q<B>) and format 1 (fp16) store them,
   against the fp32 top-k (the encoding's own error) and the full-vocabulary KL (truncation + encoding);
3. training, per seed: three students, each initialised from the teacher, trained `steps` steps on the SAME
   batches (`cached_step.CacheBatches` of the k = 64 cache: the rows, MLM masks, fixed partners and plans of
   each step are the same in every arm): online (the teacher runs every step, full-vocabulary KL,
   `step.distill_step`), cached k = 64 and cached k = 256 (`cached_step.cached_distill_step`); AdamW, linear
   warmup/decay, fp32 student, the teacher in train.py's precision (`precision.resolve`) in both the online
   arm and the builds, cos off (the caches hold no hidden states);
4. evaluation on the validation split's first `eval_batches` x 16 rows (fixed masks): perplexity, top-1,
   KL(teacher || student) at T = 1 on the scored positions, IIA and counterfactual KL (`eval`).
Paired differences (cached - online, per seed), mean and 95% t-interval. The machine is shared: time ratios
come from one run series. Results: benchmarks/results/<name>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, machine, markdown_table, write_results  # noqa: E402
from benchmarks.replicate import interval  # noqa: E402

PLANS = 4
# format 1's fp16, format 2's q<B>, format 3's g<E> (grid of 2^-E nats) and bf16
ENCODINGS = ("float16 (format 1)", "bfloat16", "q8", "q4", "g8", "g7", "g6", "g5")
METRICS = {"eval perplexity": "ppl", "eval top-1": "top1", "KL to teacher": "kl", "IIA": "iia", "cf. KL": "cf_kl"}


def load_teacher(kind: str, path, cache_dir):
    from iit_fast.models import load_model
    from iit_fast.teacher import default_teacher_path
    if path is None:
        path = default_teacher_path(cache_dir, build_if_missing=False, family="minilm" if kind == "masked" else "gpt2")
    teacher, tok = load_model(path, kind=kind, arg="teacher")
    return str(path), teacher, tok


def build_record(folder: Path, t0: float, fields) -> tuple[float, list]:
    """A cache build's seconds (the first build's: a reused folder keeps its `build_seconds.json`) and its
    shards' manifest `fields` summed."""
    timed = folder / "build_seconds.json"
    if not timed.is_file():
        timed.write_text(json.dumps(time.perf_counter() - t0))
    mans = [json.loads(p.read_text()) for p in sorted(folder.glob("shard-*.json"))]
    return json.loads(timed.read_text()), [sum(m[f] for m in mans) for f in fields]


def build_caches(kind, path, teacher, tok, tokenized, a, work: Path, dtype: str) -> tuple[dict, list[dict]]:
    """{k: TeacherCache} over the same rows, and their size rows. A finished cache of an earlier format in the
    work folder is reused as it is (the runs made from it stay comparable), if it holds these rows and plans."""
    from iit_fast.cache_builder import build_cache
    from iit_fast.cache_format2 import legacy_bytes_per_row
    from iit_fast.sampling import make_alignment
    from iit_fast.teacher_cache import FORMAT, CacheOptions, TeacherCache, run_fingerprint
    caches, rows = {}, []
    n = a.rows or a.steps * a.batch
    for k in a.ks:
        opts = CacheOptions(kind=kind, max_length=a.max_length, top_k=k, plans=PLANS, student_layers=a.student_layers,
                            max_examples=n, teacher_dtype=dtype, shard_pairs=128)
        folder = work / f"{kind}-k{k}"
        t0 = time.perf_counter()
        built = json.loads((folder / "cache.json").read_text()) if (folder / "cache.json").is_file() else None
        if built and built["fingerprint"]["format"] != FORMAT:
            expect = run_fingerprint(teacher_path=path, tokenizer=tok, tokenized_split=tokenized, opts=opts,
                                     alignment=make_alignment(opts.alignment, teacher.num_layers, a.student_layers),
                                     also=("top_k", "plans", "seed"))
            TeacherCache.open(folder, expect=expect)  # a ValueError naming the field if it is another cache
            meta = built
            print(f"[cache-quality] {folder}: the format-{built['fingerprint']['format']} cache of these rows is "
                  f"reused (its values: {built['fingerprint']['values']})", flush=True)
        else:
            meta = build_cache(path, tokenized, folder, opts, loaded=(teacher, tok), batch_rows=16, progress=False)
        seconds, (tokens, loss, cf, size) = build_record(folder, t0, ("tokens", "loss_tokens", "cf_targets", "bytes"))
        cache = TeacherCache.open(folder)
        # format 1: ids (+ labels) int32, and at every loss token (1 + M) rows of K x (fp16 + int32) + fp32 rest
        legacy = tokens * (8 if kind == "masked" else 4) + loss * (1 + PLANS) * legacy_bytes_per_row(k)
        rows.append({"teacher": kind, "what": f"cache k={k}", "top_k": k, "rows": meta["num_pairs"] * 2,
                     "tokens": tokens, "bytes/token": size / tokens, "format 1 bytes/token": legacy / tokens,
                     "cf targets / loss token": cf / loss / PLANS, "build s": round(seconds, 1),
                     "format": meta["fingerprint"]["format"], "values": meta["fingerprint"]["values"],
                     "build tokens/s": tokens / seconds if seconds else None, "id bits": meta["id_bits"]})
        rows[-1]["cf ids in base top-k"] = shared_ids(cache, kind)
        caches[k] = cache
        print(f"[cache-quality] {rows[-1]}", flush=True)
    return caches, rows


def shared_ids(cache, kind: str, pairs: int = 32) -> float:
    """The fraction of a counterfactual row's top-k ids that are in the base row's top-k at the same position
    (what coding the counterfactual ids against the base ones would save), over the first `pairs` pairs. A
    row's counterfactual targets are at its last positions (causal: from the span start; masked: all)."""
    shared, total = 0, 0
    for p in range(min(pairs, cache.num_pairs)):
        for m in range(cache.plans):
            r = cache.read_pair(p, m)
            nb = [len(x) - 1 if kind == "causal" else None for x in r["input_ids"]]
            b_ids, c_ids = r["base"][1], r["cf"][1]
            if kind != "causal":  # masked: the same positions
                same = (c_ids.unsqueeze(2) == b_ids.unsqueeze(1)).any(2)
            else:
                nc = [max(0, n - int(s)) for n, s in zip(nb, r["base_start"])]
                idx = torch.cat([torch.arange(nb[0] - nc[0], nb[0]), nb[0] + torch.arange(nb[1] - nc[1], nb[1])])
                same = (c_ids.unsqueeze(2) == b_ids[idx].unsqueeze(1)).any(2)
            shared, total = shared + int(same.sum()), total + same.numel()
    return shared / max(total, 1)


@torch.no_grad()
def encoding_errors(kind, teacher, student, val, a) -> list[dict]:
    """The sparse KL (ce at T) of `student` against the teacher's top-k stored each way, on `val` batches."""
    from iit_fast.cache_codec import FLOAT_VALUES, bits_for, quantise
    from iit_fast.cache_format2 import decode, encode
    from iit_fast.eval import scored_positions
    from iit_fast.ops.head_loss.sparse import sparse_distill_head_loss_reference
    T = 2.0
    h_s, z_t = [], []
    for b in val[:a.eval_batches]:
        rows, _ = scored_positions(b, kind)
        tt = b.get("token_type_ids")
        z_t.append(teacher.logits(teacher(b["input_ids"], b["attention_mask"], tt).last_hidden[rows]).float())
        h_s.append(student.head_transform(student(b["input_ids"], b["attention_mask"], tt).last_hidden[rows]))
    h_s, z_t = torch.cat(h_s), torch.cat(z_t)                                    # (N, D), (N, V)
    W, bias = student.decoder_weight, student.decoder_bias
    z_s = h_s @ W.t() + (bias if bias is not None else 0)
    logq, logp = F.log_softmax(z_t / T, -1), F.log_softmax(z_s.float() / T, -1)
    full = (T * T * (logq.exp() * (logq - logp)).sum(-1).mean()).item()          # dense KL at T
    out = []
    V = z_t.shape[1]
    def row_kl(lq, ids, r):  # (N,) the sparse KL per token (sparse_distill_head_loss_reference's, unreduced)
        lp = torch.cat([logp.gather(1, ids), torch.logsumexp(logp.scatter(1, ids, float("-inf")), 1, keepdim=True)], 1)
        lq = torch.cat([lq, r.unsqueeze(1)], 1)
        lq = lq - torch.logsumexp(lq, 1, keepdim=True)
        return T * T * (lq.exp() * (lq - lp)).sum(1)

    for k in a.ks:
        top = logq.topk(k, -1)
        rest = torch.logsumexp(logq.scatter(1, top.indices, float("-inf")), -1)
        exact = sparse_distill_head_loss_reference(h_s, W, bias, top.values, top.indices, rest, None, T)[0].item()
        exact_rows = row_kl(top.values, top.indices, rest)
        for name in ENCODINGS:
            values = name.split()[0]
            if values == "float16":  # format 1: fp16 values, fp32 rest
                lq, r = top.values.half().float(), rest
            elif values.startswith("g"):  # format 3: the grid, fp16 rest
                lq, r = quantise(top.values, values), rest.half().float()
            else:
                lq, _, r = decode(encode(top.values, top.indices, rest, values=values, id_bits=bits_for(V)),
                                  k=k, values=values, id_bits=bits_for(V))
            got = sparse_distill_head_loss_reference(h_s, W, bias, lq, top.indices, r, None, T)[0].item()
            value_bits = torch.finfo(FLOAT_VALUES[values]).bits if values in FLOAT_VALUES else int(values[1:])
            # format 3's are variable (compressed blocks): benchmarks/teacher_cache.py measures them
            per_entry = (2 + 4) if values == "float16" else None if values.startswith("g") else \
                (bits_for(V) + value_bits) / 8
            out.append({"teacher": kind, "what": f"encoding k={k}", "top_k": k, "values": name,
                        "bytes/entry": per_entry, "rel. error vs fp32 top-k": abs(got - exact) / exact,
                        "rel. error vs full KL": abs(got - full) / full, "tokens": int(h_s.shape[0]),
                        # per token, so that errors of opposite sign on two tokens do not cancel
                        "per-token rel. error vs fp32 top-k": ((row_kl(lq, top.indices, r) - exact_rows).abs().mean()
                                                               / exact_rows.mean()).item()})
    return out


def make_student(teacher, layers: int):
    from iit_fast.models import IntervenableLM
    from iit_fast.models.student import init_student_from_teacher
    return IntervenableLM(init_student_from_teacher(teacher.model, layers)).train()


def train(arm: str, teacher, caches, a, seed: int) -> tuple:
    """The student of one arm and seed, trained `a.steps` steps on the k = 64 cache's batches."""
    from iit_fast.cached_step import CacheBatches, cached_distill_step
    from iit_fast.config import DistillConfig
    from iit_fast.optim import make_optimizer, make_scheduler, param_groups
    from iit_fast.step import distill_step
    torch.manual_seed(seed)
    student = make_student(teacher, a.student_layers)
    opt = make_optimizer(param_groups(student, 0.01), a.lr)
    sched = make_scheduler(opt, "linear", a.warmup, a.steps)
    cfg = DistillConfig(ops="fused", w_cos=0.0)
    cache = caches[min(caches)] if arm == "online" else caches[int(arm.split("k=")[1])]
    batches = CacheBatches(cache, a.batch, seed=seed)
    tokens, t0, losses = 0, time.perf_counter(), []
    for step, cb in enumerate(batches.forever()):
        if step == a.steps:
            break
        opt.zero_grad(set_to_none=True)
        if arm == "online":
            ((_, plan),) = cb.groups()
            out = distill_step(teacher, student, cb.batch, plan, cfg)
        else:
            out = cached_distill_step(student, cb, cfg)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += int(cb.batch["attention_mask"].sum())
        losses.append(out.loss.item())
    return student.eval(), {"train tokens": tokens, "train s": time.perf_counter() - t0,
                            "train tokens/s": tokens / (time.perf_counter() - t0), "last loss": losses[-1]}


@torch.no_grad()
def evaluate(teacher, student, val, alignment, a) -> dict:
    from iit_fast.eval import interchange_accuracy, lm_metrics, scored_logits
    lm = lm_metrics(student, val[:a.eval_batches])
    kl, n = 0.0, 0
    for b in val[:a.eval_batches]:
        z_s, _ = scored_logits(student, b)
        z_t, _ = scored_logits(teacher, b)
        kl += F.kl_div(F.log_softmax(z_s.float(), -1), F.log_softmax(z_t.float(), -1), log_target=True,
                       reduction="sum").item()
        n += z_s.shape[0]
    iia = interchange_accuracy(teacher, student, val[:a.eval_batches], alignment)
    return {"ppl": lm["perplexity"], "top1": lm["top1"], "kl": kl / n, "iia": iia["iia"], "cf_kl": iia["cf_kl"]}


def run_teacher(kind: str, a, work: Path, done: dict) -> list[dict]:
    from iit_fast import corpus, data
    from iit_fast.eval import load_validation
    from iit_fast.precision import resolve
    from iit_fast.sampling import make_alignment
    from iit_fast.teacher_cache import DTYPES
    precision, why = resolve(a.precision)
    dtype = "bfloat16" if precision == "bf16" else "float32"
    print(f"[cache-quality] {kind}: the teacher in {precision} ({why})", flush=True)
    path, teacher, tok = load_teacher(kind, a.masked_teacher if kind == "masked" else a.causal_teacher, a.cache_dir)
    tokenized = data.tokenize_corpus(corpus.load_corpus(a.corpus, a.cache_dir), tok, a.max_length, 1, a.cache_dir,
                                     kind=kind)["train"]
    caches, rows = build_caches(kind, path, teacher, tok, tokenized, a, work, dtype)
    teacher = teacher.to(DTYPES[dtype]).eval().requires_grad_(False)
    val = load_validation(tok, a.corpus, 16, a.max_length, a.cache_dir, kind=kind, max_batches=a.eval_batches)
    alignment = make_alignment("middle", teacher.num_layers, a.student_layers)
    enc = work / f"encoding-{kind}-v4.json"  # computed once (a dense pass over the vocabulary per encoding)
    if not enc.is_file():
        enc.write_text(json.dumps(encoding_errors(kind, teacher, make_student(teacher, a.student_layers).eval(),
                                                  val, a), indent=1))
    rows += json.loads(enc.read_text())
    runs = []
    arms = ["online"] + [f"cached k={k}" for k in a.ks]
    for seed in a.seeds:
        for arm in arms:
            key = f"{kind}|{arm}|{seed}|{a.steps}|{a.batch}"
            if key not in done and a.write_only:
                print(f"[cache-quality] {key}: not run (--write-only)", flush=True)
                continue
            if key not in done:
                student, info = train(arm, teacher, caches, a, seed)
                info.update(evaluate(teacher, student, val, alignment, a))
                done[key] = info
                (work / f"runs-{kind}.json").write_text(json.dumps(
                    {k: v for k, v in done.items() if k.startswith(kind + "|")}, indent=1))
            runs.append({"teacher": kind, "what": "run", "arm": arm, "seed": seed, **done[key]})
            print(f"[cache-quality] {runs[-1]}", flush=True)
    rows += runs
    for arm in arms[1:]:
        for label, m in METRICS.items():
            diffs = [c[m] - o[m] for o in runs if o["arm"] == "online"
                     for c in runs if c["arm"] == arm and c["seed"] == o["seed"]]
            if not diffs:
                continue
            mean, half = interval(diffs)
            online = [o[m] for o in runs if o["arm"] == "online"]
            rows.append({"teacher": kind, "what": "paired", "arm": f"{arm} - online", "metric": label,
                         "mean diff": mean, "95% half-width": half, "online mean": sum(online) / len(online),
                         "diffs": [float(f"{d:.4g}") for d in diffs]})
        ratio = [o["train s"] / c["train s"] for o in runs if o["arm"] == "online"
                 for c in runs if c["arm"] == arm and c["seed"] == o["seed"]]
        if not ratio:
            continue
        rows.append({"teacher": kind, "what": "paired", "arm": f"{arm} - online", "metric": "online / cached time",
                     "mean diff": sum(ratio) / len(ratio), "diffs": [float(f"{r:.3g}") for r in ratio]})
    return rows


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = sorted({r["teacher"] for r in rows if r["what"] == "paired"})
    fig, axes = plt.subplots(len(kinds), len(METRICS), figsize=(3.2 * len(METRICS), 2.8 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, label in enumerate(METRICS):
            ax = axes[i][j]
            sel = [r for r in rows if r["what"] == "paired" and r["teacher"] == kind and r["metric"] == label]
            ax.bar(range(len(sel)), [r["mean diff"] for r in sel],
                   yerr=[r["95% half-width"] for r in sel], capsize=4, color="tab:blue")
            for x, r in enumerate(sel):
                ax.scatter([x] * len(r["diffs"]), r["diffs"], color="k", s=8, zorder=3)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(range(len(sel)), [r["arm"].split(" - ")[0].replace("cached ", "") for r in sel])
            ax.set_title(f"{kind}: {label}", fontsize=9)
    fig.suptitle("cached - online, paired by seed (mean, 95% CI, seeds as dots)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=["masked", "causal"], choices=["masked", "causal"])
    p.add_argument("--masked-teacher", default=None, help="default: the embedded MiniLM teacher")
    p.add_argument("--causal-teacher", default=None, help="default: the embedded GPT-2 teacher (--family gpt2)")
    p.add_argument("--corpus", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--ks", nargs="+", type=int, default=[64, 256])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rows", type=int, default=None, help="rows in each cache (default: steps x batch, one epoch)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/teacher-cache-quality", help="caches and finished runs (reused)")
    p.add_argument("--name", default="teacher-cache-quality")
    p.add_argument("--notes", default="", help="text appended to the .md (the reading)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--write-only", action="store_true", help="no training: report the finished runs")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    done = {}  # finished runs, one file per teacher kind (runs.json: an earlier version's)
    for f in sorted(work.glob("runs*.json")):
        done.update(json.loads(f.read_text()))
    rows = []
    for kind in a.kinds:
        rows += run_teacher(kind, a, work, done)
    if a.no_write:
        return rows
    kinds = f" --kinds {' '.join(a.kinds)}" if a.kinds != ["masked", "causal"] else ""
    cmd = (f"python benchmarks/teacher_cache_quality.py{kinds} --steps {a.steps} --batch {a.batch} "
           + (f"--rows {a.rows} " if a.rows else "")
           + (f"--causal-teacher {str(a.causal_teacher).replace(str(Path.home()), '~')} " if a.causal_teacher else "")
           + f"--eval-batches {a.eval_batches} --seeds {' '.join(map(str, a.seeds))} --ks {' '.join(map(str, a.ks))}")
    pick = lambda what: [r for r in rows if r["what"].startswith(what)]  # noqa: E731
    notes = (f"Command: `{cmd}`. Each run: {a.steps} steps of {a.batch} rows x <= {a.max_length} tokens (the "
             f"'train tokens' column below), the three arms of a seed on the same batches (rows drawn across the "
             f"corpus, masks, partners, plans); M = {PLANS} plans; the caches' format and values are in the size "
             f"table (format 2 = packed ids + q8 log-probs + fp16 rest; format 3 = benchmarks/teacher_cache.py). "
             f"Evaluation: the validation split's first {a.eval_batches * 16} rows. The machine was shared "
             f"with other jobs: times are ratios within one series.\n\n"
             "## Cache size (bytes per real token on disk; format 1 = its layout for the same rows)\n\n"
             + markdown_table(pick("cache"), ["teacher", "top_k", "format", "values", "id bits", "rows", "tokens",
                                              "bytes/token",
                                              "format 1 bytes/token", "cf targets / loss token",
                                              "cf ids in base top-k", "build tokens/s"])
             + "\n## The encoding's sparse KL error (ce at T = 2, a student initialised from the teacher, "
               "validation rows)\n\n"
             + markdown_table(pick("encoding"), ["teacher", "top_k", "values", "bytes/entry",
                                                 "rel. error vs fp32 top-k", "per-token rel. error vs fp32 top-k",
                                                 "rel. error vs full KL", "tokens"])
             + "\n## Runs\n\n"
             + markdown_table(pick("run"), ["teacher", "arm", "seed", "ppl", "top1", "kl", "iia", "cf_kl",
                                            "train tokens", "train s", "last loss"])
             + (f"\n{a.notes}\n" if a.notes else ""))
    args = {k: v.replace(str(Path.home()), "~") if isinstance(v, str) else v for k, v in vars(a).items()}
    write_results(a.name, {"machine": machine(), "args": args, "all_rows": rows}, pick("paired"),
                  ["teacher", "arm", "metric", "online mean", "mean diff", "95% half-width", "diffs"],
                  "Students from a teacher cache vs online: same rows, paired by seed", notes)
    plot(rows, RESULTS / f"{a.name}.png")
    return rows


if __name__ == "__main__":
    main()
