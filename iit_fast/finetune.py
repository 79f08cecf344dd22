"""Downstream evaluation: fine-tune a (distilled) masked LM's encoder on a classification task with
transformers' `Trainer`, and report validation metrics.

    iit-fast finetune --model runs/X/student --task seq --train-file train.csv --validation-file dev.csv
    iit-fast finetune --model runs/X/student --task seq --dataset glue:sst2 --max-steps 500
    iit-fast finetune --model runs/X/student --task token --train-file train.jsonl --validation-file dev.jsonl
    iit-fast finetune --model runs/X/student --task token --dataset conll2003
    iit-fast finetune --model runs/X/student --task seq --source-task runs/source-task   # offline, built here

Tasks:
- `seq` (GLUE-style sequence classification, `AutoModelForSequenceClassification`): columns `text`, or a
  pair (`sentence1`/`sentence2`; GLUE's own names `sentence`, `question`/`sentence`, `premise`/`hypothesis`,
  `question1`/`question2` are recognised too), and `label` (ints, or strings mapped to ids). Metrics:
  accuracy and macro F1 over the classes.
- `token` (CoNLL-style token classification, `AutoModelForTokenClassification`): columns `tokens` (a list
  of words) and `tags` (a list of labels, ints or strings; `ner_tags` / `pos_tags` also accepted). The label
  goes on each word's first sub-token; the other sub-tokens are ignored. Metrics: token-level (word-level)
  accuracy and macro F1 over the tag classes, a simple implementation (not seqeval's entity-level F1).

Local files (always available): `.csv`, `.tsv`, `.json` / `.jsonl` (JSON lines). Hub datasets
(`name[:config]`) when the hub is reachable; for GLUE's validation split name, see `--validation-split`.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

PAIR_COLUMNS = [("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                ("question1", "question2")]
SINGLE_COLUMNS = ["text", "sentence"]
TOKEN_COLUMNS = ["tokens", "words"]
TAG_COLUMNS = ["tags", "ner_tags", "pos_tags", "labels"]


# ---- data ------------------------------------------------------------------------------------------

def _load_file(path, split: str):
    import datasets
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{split} file {p} does not exist; expected a .csv, .tsv, .json or .jsonl file")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return datasets.load_dataset("csv", data_files={split: str(p)}, split=split,
                                     delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files={split: str(p)}, split=split)
    raise ValueError(f"{split} file {p}: unknown format {suffix!r}; expected .csv, .tsv, .json or .jsonl")


def load_task_data(train_file=None, validation_file=None, dataset=None, validation_split=None, cache_dir=None):
    """(train, validation) `datasets.Dataset`s from local files or a hub dataset 'name[:config]'."""
    import datasets
    if dataset:
        name, _, config = dataset.partition(":")
        dsd = datasets.load_dataset(name, config or None, cache_dir=cache_dir)
        val = validation_split or next((s for s in ("validation", "validation_matched", "dev", "test") if s in dsd),
                                       None)
        if "train" not in dsd or val is None:
            raise ValueError(f"dataset {dataset}: needs a train and a validation split, has {list(dsd)}")
        return dsd["train"], dsd[val]
    if not train_file or not validation_file:
        raise ValueError("give --train-file and --validation-file (local files), or --dataset name[:config]")
    return _load_file(train_file, "train"), _load_file(validation_file, "validation")


def _label_names(train, column: str, nested: bool) -> list | None:
    """The class names when labels are strings (or a ClassLabel), else None (ints used as they are)."""
    feat = train.features[column]
    inner = getattr(feat, "feature", None) if nested else feat
    if inner is not None and hasattr(inner, "names"):
        return list(inner.names)
    values = train[column]
    flat = [v for row in values for v in row] if nested else values
    if flat and isinstance(flat[0], str):
        return sorted(set(flat))
    return None


def _num_labels(train, val, column, nested, names):
    if names is not None:
        return len(names)
    flat = [v for ds in (train, val) for row in ds[column] for v in (row if nested else [row])]
    if any(not isinstance(v, (int, np.integer)) or v < 0 for v in flat):
        raise ValueError(f"column {column!r}: labels must be non-negative ints or strings")
    return int(max(flat)) + 1


def prepare_seq(train, val, tokenizer, max_length: int):
    cols = train.column_names
    pair = next(((a, b) for a, b in PAIR_COLUMNS if a in cols and b in cols), None)
    single = next((c for c in SINGLE_COLUMNS if c in cols), None)
    if pair is None and single is None:
        raise ValueError(f"sequence task: no text column among {cols}; expected 'text' or 'sentence1'/'sentence2'")
    if "label" not in cols:
        raise ValueError(f"sequence task: no 'label' column among {cols}")
    names = _label_names(train, "label", False)
    n = _num_labels(train, val, "label", False, names)
    index = {v: i for i, v in enumerate(names)} if names else None

    def enc(batch):
        args = (batch[pair[0]], batch[pair[1]]) if pair else (batch[single],)
        out = tokenizer(*args, truncation=True, max_length=max_length)
        lab = batch["label"]
        out["labels"] = [index[v] if index and isinstance(v, str) else int(v) for v in lab]
        return out

    mk = lambda ds: ds.map(enc, batched=True, remove_columns=ds.column_names)  # noqa: E731
    return mk(train), mk(val), n, names


def prepare_token(train, val, tokenizer, max_length: int):
    cols = train.column_names
    tcol = next((c for c in TOKEN_COLUMNS if c in cols), None)
    gcol = next((c for c in TAG_COLUMNS if c in cols), None)
    if tcol is None or gcol is None:
        raise ValueError(f"token task: need a 'tokens' and a 'tags' column, got {cols}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("token task: needs a fast tokenizer (word_ids) for the word -> sub-token alignment")
    names = _label_names(train, gcol, True)
    n = _num_labels(train, val, gcol, True, names)
    index = {v: i for i, v in enumerate(names)} if names else None

    def enc(batch):
        out = tokenizer(batch[tcol], is_split_into_words=True, truncation=True, max_length=max_length)
        labels = []
        for i, tags in enumerate(batch[gcol]):
            if len(tags) != len(batch[tcol][i]):
                raise ValueError(f"token task: a row has {len(batch[tcol][i])} tokens but {len(tags)} tags")
            prev, row = None, []
            for w in out.word_ids(i):
                if w is None or w == prev:
                    row.append(-100)  # special tokens and non-first sub-tokens: no label
                else:
                    t = tags[w]
                    row.append(index[t] if index and isinstance(t, str) else int(t))
                prev = w
            labels.append(row)
        out["labels"] = labels
        return out

    mk = lambda ds: ds.map(enc, batched=True, remove_columns=ds.column_names)  # noqa: E731
    return mk(train), mk(val), n, names


# ---- an offline downstream task ------------------------------------------------------------------------

# Five manuals of technical prose (all in the default corpus): which one a paragraph comes from is a
# topic/register classification that needs more than surface cues (three of them are about Debian).
SOURCE_TASK_CLASSES = ("python-docs", "debian-reference", "developers-reference", "maint-guide", "gnu-standards")


def build_source_task(out_dir, per_class_train: int = 500, per_class_validation: int = 120, seed: int = 0,
                      sources=None, progress: bool = True) -> tuple[Path, Path]:
    """Write an offline sequence-classification task, ``out_dir/{train,validation}.jsonl`` (columns `text`,
    `label` = the source's name): balanced samples of paragraphs of each of ``sources`` (default: the
    default corpus's sources named in SOURCE_TASK_CLASSES), cleaned as the corpus is. Hub datasets (GLUE,
    CoNLL) cannot be reached here; this one is built from the same Debian packages. The paragraphs are
    also in the (unlabelled) distillation corpus, as pre-training text is for GLUE. Reused when
    ``out_dir/task.json`` records the same parameters; written to a temporary folder and renamed."""
    import random
    import shutil

    from .cache import publish_folder
    from .corpus_build import DEBIAN_PACKAGES, DEFAULT_SOURCES
    out_dir = Path(out_dir)
    if sources is None:
        sources = [s for s in DEFAULT_SOURCES if s.name in SOURCE_TASK_CLASSES]
    params = {"sources": [s.name for s in sources], "per_class_train": per_class_train,
              "per_class_validation": per_class_validation, "seed": seed}
    train_path, val_path = out_dir / "train.jsonl", out_dir / "validation.jsonl"
    meta_path = out_dir / "task.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("params") == params:
        return train_path, val_path
    if per_class_train < 1 or per_class_validation < 1:
        raise ValueError(f"per_class_train and per_class_validation must be >= 1, got {per_class_train} and "
                         f"{per_class_validation}")
    rng = random.Random(seed)
    rows = {"train": [], "validation": []}
    counts = {}
    for src in sources:
        seen, pars = set(), []
        for key, par in src.paragraphs():
            if key not in seen:
                seen.add(key)
                pars.append(par)
        need = per_class_train + per_class_validation
        if len(pars) < need:
            raise ValueError(f"source task: source {src.name!r} has {len(pars)} paragraphs, expected at least "
                             f"{need} (per_class_train + per_class_validation); is its Debian package installed? "
                             f"(`bash setup.sh` as root installs '{DEBIAN_PACKAGES}')")
        rng.shuffle(pars)
        rows["validation"] += [{"text": t, "label": src.name} for t in pars[:per_class_validation]]
        rows["train"] += [{"text": t, "label": src.name} for t in pars[per_class_validation:need]]
        counts[src.name] = len(pars)
        if progress:
            print(f"[source-task] {src.name}: {len(pars):,d} paragraphs", flush=True)
    for part in rows.values():
        rng.shuffle(part)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, path in (("train", train_path), ("validation", val_path)):
        (tmp / path.name).write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
    (tmp / "task.json").write_text(json.dumps({"params": params, "paragraphs_per_source": counts}, indent=1) + "\n")
    publish_folder(tmp, out_dir, replace=True)  # missing, or built with other parameters
    return train_path, val_path


# ---- metrics -----------------------------------------------------------------------------------------

def accuracy_macro_f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict:
    """Accuracy and macro F1 (mean over the classes present in gold or pred of 2PR/(P+R), 0 where undefined)."""
    pred, gold = np.asarray(pred).ravel(), np.asarray(gold).ravel()
    keep = gold != -100
    pred, gold = pred[keep], gold[keep]
    if gold.size == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 0}
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue  # a class absent from both: not counted
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((pred == gold).mean()), "macro_f1": float(np.mean(f1s)), "n": int(gold.size)}


# ---- fine-tuning ------------------------------------------------------------------------------------

def finetune(model: str, task: str, train_file=None, validation_file=None, dataset=None, *, output_dir=None,
             max_steps: int = 200, batch_size: int = 16, lr: float = 5e-5, max_length: int = 128,
             seed: int = 0, validation_split=None, max_train_samples: int | None = None,
             max_eval_samples: int | None = None, progress: bool = True, cache_dir=None) -> dict:
    """Fine-tune `model` (HF folder or hub name) on a `seq` or `token` task; returns validation metrics."""
    import tempfile

    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging
    if task not in ("seq", "token"):
        raise ValueError(f"task must be 'seq' or 'token', got {task!r}")
    t0 = time.time()
    p = Path(str(model)).expanduser()
    name = str(p) if p.exists() else str(model)
    if p.exists() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"model: {p} has no config.json; expected a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(name)
    train, val = load_task_data(train_file, validation_file, dataset, validation_split, cache_dir)
    if max_train_samples:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples:
        val = val.select(range(min(max_eval_samples, len(val))))
    prep = prepare_seq if task == "seq" else prepare_token
    train_t, val_t, num_labels, names = prep(train, val, tokenizer, max_length)
    cls = AutoModelForSequenceClassification if task == "seq" else AutoModelForTokenClassification
    kw = {}
    if names:
        kw = {"id2label": dict(enumerate(map(str, names))), "label2id": {str(v): i for i, v in enumerate(names)}}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        net = cls.from_pretrained(name, num_labels=num_labels, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    collator = (DataCollatorWithPadding(tokenizer) if task == "seq"
                else DataCollatorForTokenClassification(tokenizer))

    def compute_metrics(ev):
        logits, labels = ev.predictions, ev.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        return accuracy_macro_f1(np.argmax(logits, -1), labels, num_labels)

    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="iit-fast-finetune-")
        output_dir = tmp.name
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
                             per_device_eval_batch_size=batch_size, learning_rate=lr, warmup_steps=max(1, max_steps // 10),
                             weight_decay=0.01, seed=seed, eval_strategy="no", save_strategy="no", report_to=[],
                             logging_strategy="steps", logging_steps=max(1, max_steps // 10),
                             disable_tqdm=not progress, use_cpu=not _cuda(), dataloader_num_workers=0)
    trainer = Trainer(model=net, args=args, data_collator=collator, train_dataset=train_t, eval_dataset=val_t,
                      processing_class=tokenizer, compute_metrics=compute_metrics)
    train_out = trainer.train()
    metrics = trainer.evaluate()
    if tmp is not None:
        tmp.cleanup()
    res = {"model": str(model), "task": task, "data": dataset or {"train": str(train_file),
                                                                  "validation": str(validation_file)},
           "num_labels": num_labels, "train_examples": len(train_t), "validation_examples": len(val_t),
           "max_steps": max_steps, "batch_size": batch_size, "lr": lr, "seed": seed,
           "train_loss": float(train_out.training_loss),
           "accuracy": metrics.get("eval_accuracy"), "macro_f1": metrics.get("eval_macro_f1"),
           "eval_loss": metrics.get("eval_loss"), "evaluated_labels": metrics.get("eval_n"),
           "seconds": round(time.time() - t0, 1),
           "metric_note": ("token-level accuracy and macro F1 over tag classes (first sub-token of each word), "
                           "not entity-level seqeval F1") if task == "token" else "accuracy and macro F1 over classes"}
    if res["eval_loss"] is not None and not math.isfinite(res["eval_loss"]):
        res["warning"] = "non-finite validation loss"
    return res


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def add_arguments(p):
    p.add_argument("--model", required=True, help="HF folder (e.g. a run's student/) or hub name")
    p.add_argument("--task", choices=("seq", "token"), required=True,
                   help="seq: sequence classification (GLUE-style); token: token classification (CoNLL-style)")
    p.add_argument("--train-file", default=None, help=".csv/.tsv/.json/.jsonl")
    p.add_argument("--validation-file", default=None)
    p.add_argument("--dataset", default=None, help="hub dataset name[:config], e.g. glue:sst2, conll2003")
    p.add_argument("--source-task", default=None, metavar="DIR",
                   help="the offline task (which of five Debian/Python manuals a paragraph comes from; task "
                        "seq), built in DIR or reused from it")
    p.add_argument("--validation-split", default=None, help="hub split to evaluate on (default: validation)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--output-dir", default=None, help="Trainer's folder (default: a temporary one)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--output", default=None, help="write the JSON result here (it is printed too)")
    p.add_argument("--no-progress", action="store_true")


def run(a) -> dict:
    if a.source_task:
        if a.train_file or a.validation_file or a.dataset or a.task != "seq":
            raise ValueError("--source-task is a seq task and replaces --train-file/--validation-file/--dataset; "
                             "give it alone with --task seq")
        a.train_file, a.validation_file = build_source_task(a.source_task, progress=not a.no_progress)
    res = finetune(a.model, a.task, a.train_file, a.validation_file, a.dataset, output_dir=a.output_dir,
                   max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr, max_length=a.max_length, seed=a.seed,
                   validation_split=a.validation_split, max_train_samples=a.max_train_samples,
                   max_eval_samples=a.max_eval_samples, progress=not a.no_progress, cache_dir=a.cache_dir)
    from .cli import print_json
    print_json(res, a.output)
    return res
