"""The one evaluator: perplexity / top-1 of any LM, and interchange intervention accuracy (IIA) of a student.

    iit-fast eval --model runs/X/student                                 # perplexity, top-1 (default corpus)
    iit-fast eval --model runs/X/student --teacher T --alignment middle  # + IIA and counterfactual KL
    iit-fast eval --model S --teacher T --max-batches 20 --output eval.json
    iit-fast eval --model runs/X/student --lm-eval hellaswag,arc_easy      # + lm-evaluation-harness tasks
    iit-fast eval --model S --lm-eval my_task --lm-eval-include tasks/ --lm-eval-limit 100  # a local task

Every model goes through the intervenable wrapper (`models.IntervenableLM`; a plain Hugging Face model
is wrapped): one pass to the last hidden states, then the wrapper's head on the *scored* rows only, never
(B, S, V). The scored positions depend on the model's kind (`scored_positions`):
- **masked** LM: the masked tokens (labels != -100); batches are masked with a fixed seed (`EVAL_SEED`),
  so every model compared sees the same positions;
- **causal** LM: every real position followed by a real token, scored on that next token (labels shifted
  by one; no masking).
**Perplexity** = exp(mean token NLL of the full softmax over the vocabulary) there, **top-1** the
fraction of argmax hits.

**IIA** of a student against its teacher: on held-out batches, an intervention plan is drawn per batch
(seeded) from the alignment, exactly as in training (`sampling.sample_plan`: one aligned pair, an in-batch
derangement, spans). Both models run the counterfactual as the fast step does
(`step.counterfactual_last_hidden`: swap the span at the site, resume from the next block, swap again after
each later block of a teacher group). On the scored positions of the base, IIA = mean [argmax z~_s ==
argmax z~_t] (masked tokens; next-token argmax for causal LMs), and `cf_kl` = mean KL(softmax(z~_t) ||
softmax(z~_s)) at T = 1 (nats). A student that is a copy of its teacher under the identity alignment
(block l <-> block l) has IIA 1 and KL 0.

**Standard evaluation of causal students** (`--lm-eval TASKS`): EleutherAI's lm-evaluation-harness through
its own Hugging Face model class (`lm_eval.simple_evaluate(model="hf", ...)`), so the figures are the ones
its leaderboards report for the same task names (hellaswag, arc_easy, piqa, lambada_openai, ...; those need
the hub for their data). `--lm-eval-include DIR` adds the YAML tasks of a folder (a task over a local file
needs no hub; `tests/test_eval.py` runs one). Masked LMs are refused: the harness scores causal LMs.
"""
from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from iit_fast.models import IntervenableLM, check_same_tokenizer, load_model
from iit_fast.models.load import inspect_model
from iit_fast.sampling import InterventionPlan, make_alignment, sample_plan, validate_alignment
from iit_fast.step import counterfactual_last_hidden

EVAL_SEED = 1234  # the validation masking: the same positions for every model compared
IIA_SEED = 4321   # the plans of the IIA evaluation: the same sites for every student compared


# ---- the model and the positions it is scored on -----------------------------------------------------

def as_intervenable(model) -> IntervenableLM:
    """The wrapper itself, or a plain Hugging Face LM wrapped (no copy: the wrapper holds the model), in
    the model's mode (a new module is in training mode, whatever the model it wraps)."""
    return model if isinstance(model, IntervenableLM) else IntervenableLM(model).train(model.training)


def scored_positions(batch: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (B, S) bool: the hidden states that are scored, targets (M,): what each should predict).

    masked: rows = labels != -100, targets = those labels. causal: row (i, t) predicts token t + 1, so
    rows = positions whose next label is real (labels[:, 1:] != -100; the last column never), targets =
    labels[:, 1:] there; without "labels", the real input ids (attention_mask) are the labels."""
    if kind == "masked":
        if "labels" not in batch:
            raise ValueError("batch: a masked LM is scored on its MLM labels; expected a 'labels' entry")
        rows = batch["labels"] != -100                                                  # (B, S)
        return rows, batch["labels"][rows]
    if kind != "causal":
        raise ValueError(f"kind must be 'masked' or 'causal', got {kind!r}")
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)     # (B, S)
    nxt = labels[:, 1:] != -100                                                         # (B, S - 1)
    rows = torch.cat([nxt, torch.zeros_like(nxt[:, :1])], dim=1)                        # (B, S)
    return rows, labels[:, 1:][nxt]


def scored_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (M, V), targets (M,)) of `model` (wrapper or plain HF LM) on the scored positions of
    `batch`, with grad if enabled: the training loss of the teacher builder is cross-entropy on these."""
    lm = as_intervenable(model)
    dev = lm.decoder_weight.device
    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    h = lm(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).last_hidden  # (B, S, D)
    rows, targets = scored_positions(batch, lm.kind)
    return lm.logits(h[rows]), targets                                                  # (M, V), (M,)


@torch.no_grad()
def lm_metrics(model, batches, max_batches: int | None = None, progress: bool = False) -> dict:
    """{"perplexity", "top1", "tokens"} of `model` (wrapper or plain HF LM) over the scored positions
    of `batches`: perplexity = exp(sum of token NLL / tokens). The model's mode is put back."""
    was_training = model.training
    lm = as_intervenable(model).eval()
    nll, correct, n = 0.0, 0, 0
    for i, batch in enumerate(_progress(_rewind(batches), max_batches, "perplexity", progress)):
        if max_batches is not None and i >= max_batches:
            break
        logits, targets = scored_logits(lm, batch)
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        n += targets.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("batches: no scored token to evaluate; expected masked LM batches with labels != -100 "
                         "or causal LM batches with at least two real tokens in a row")
    return {"perplexity": math.exp(nll / n), "top1": correct / n, "tokens": n}


def unigram_log_probs(tokenized_train, vocab_size: int, special_ids) -> torch.Tensor:
    """(V,) log p(token) from the training token counts, add-one smoothed; special tokens get the floor."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in tokenized_train["input_ids"]:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size).double()
    counts[list(special_ids)] = 0
    counts += 1.0
    return (counts / counts.sum()).log().float()


def unigram_metrics(log_probs: torch.Tensor, batches, kind: str = "masked") -> dict:
    """`lm_metrics` of the unigram model `log_probs` (V,): the same scored positions and targets."""
    nll, correct, n = 0.0, 0, 0
    best = int(log_probs.argmax())
    for batch in _rewind(batches):
        t = scored_positions(batch, kind)[1].cpu()
        nll -= log_probs[t].double().sum().item()
        correct += (t == best).sum().item()
        n += t.numel()
    if n == 0:
        raise ValueError("batches: no scored token to evaluate")
    return {"perplexity": math.exp(nll / n), "top1": correct / n, "tokens": n}


# ---- interchange intervention accuracy --------------------------------------------------------------

def counterfactual_hidden(model: IntervenableLM, batch: dict, layers: tuple[int, ...],
                          plan: InterventionPlan) -> torch.Tensor:
    """Last hidden states (B, S, D) of the counterfactual run: a plain pass up to the last block of
    `layers`, keeping their sites, then `step.counterfactual_last_hidden` (the fast step's own code)."""
    ids, am, tt = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
    plain = model(ids, am, tt, keep=set(layers), stop=layers[-1] + 1)
    return counterfactual_last_hidden(model, plain.sites, am, layers, plan)


@torch.no_grad()
def interchange_accuracy(teacher: IntervenableLM, student: IntervenableLM, batches, alignment,
                         max_batches: int | None = None, seed: int = IIA_SEED, span_fraction: float = 0.3,
                         plans_per_batch: int = 1, dims=None, progress: bool = False) -> dict:
    """IIA and counterfactual KL of `student` against `teacher` (both wrappers, of one kind) over `batches`.

    alignment: a list of (teacher blocks, student block) pairs (`sampling.make_alignment`). Per batch,
    `plans_per_batch` plans are drawn from one generator seeded with `seed`. Tokens: the base's scored
    positions (`scored_positions`). Returns {"iia", "cf_kl", "tokens", "plans", "per_pair": {pair: iia}}."""
    kind = teacher.kind
    if student.kind != kind:
        raise ValueError(f"student: a {student.kind} LM cannot be compared with a {kind} teacher; "
                         f"expected both of one kind")
    alignment = validate_alignment(alignment, teacher.num_layers, student.num_layers)
    was_t, was_s = teacher.training, student.training
    teacher.eval(), student.eval()
    g = torch.Generator().manual_seed(seed)
    agree, kl_sum, n, plans = 0, 0.0, 0, 0
    per_pair: dict[str, list[int]] = {}
    for i, batch in enumerate(_progress(_rewind(batches), max_batches, "IIA", progress)):
        if max_batches is not None and i >= max_batches:
            break
        if batch["attention_mask"].shape[0] < 2:
            continue  # no other row to take a source from
        rows, _ = scored_positions(batch, kind)                                             # (B, S)
        if not rows.any():
            continue
        for _ in range(plans_per_batch):
            plan = sample_plan(batch["attention_mask"], alignment, g, span_fraction, dims)
            h_t = counterfactual_hidden(teacher, batch, plan.teacher_layers, plan)
            h_s = counterfactual_hidden(student, batch, (plan.student_layer,), plan)
            z_t = teacher.logits(h_t[rows]).float()                                         # (M, V)
            z_s = student.logits(h_s[rows]).float()                                         # (M, V)
            same = (z_t.argmax(-1) == z_s.argmax(-1)).sum().item()
            kl = F.kl_div(F.log_softmax(z_s, -1), F.log_softmax(z_t, -1), log_target=True,
                          reduction="sum").item()
            m = int(rows.sum())
            agree, kl_sum, n, plans = agree + same, kl_sum + kl, n + m, plans + 1
            key = f"{list(plan.teacher_layers)}->{plan.student_layer}"
            a = per_pair.setdefault(key, [0, 0])
            a[0], a[1] = a[0] + same, a[1] + m
    teacher.train(was_t), student.train(was_s)
    if n == 0:
        raise ValueError("batches: no scored token in a batch of >= 2 rows; expected batches with labels")
    return {"iia": agree / n, "cf_kl": kl_sum / n, "tokens": n, "plans": plans,
            "per_pair": {k: v[0] / v[1] for k, v in per_pair.items()}}


def identity_alignment(layers: int) -> list:
    """Block l <-> block l, for a student that has its teacher's depth."""
    return [((l,), l) for l in range(layers)]


def parse_alignment(spec, teacher_layers: int, student_layers: int) -> list:
    """A preset / JSON file (`make_alignment`), "identity", or inline JSON pairs ('[[[5], 2]]')."""
    if isinstance(spec, list):
        return validate_alignment([(tuple(t) if not isinstance(t, int) else (t,), s) for t, s in spec],
                                  teacher_layers, student_layers)
    if spec == "identity":
        if teacher_layers != student_layers:
            raise ValueError(f"alignment 'identity' needs equal depths, got teacher {teacher_layers} and "
                             f"student {student_layers} blocks")
        return identity_alignment(teacher_layers)
    if isinstance(spec, str) and spec.lstrip().startswith("["):
        return parse_alignment(json.loads(spec), teacher_layers, student_layers)
    return make_alignment(spec, teacher_layers, student_layers)


# ---- loading and the command ------------------------------------------------------------------------

def load_validation(tokenizer, corpus=None, batch_size: int = 32, max_length: int = 128, cache_dir=None, *,
                    kind: str = "masked", max_batches: int | None = None, num_proc: int = 1) -> list[dict]:
    """The first `max_batches` batches (None: all) of a corpus's validation split (`load_corpus` spec; None =
    the default corpus), of the given kind, rows fixed and masked per row with `EVAL_SEED`
    (`batches.validation_batches`): every model compared, at any batch size, is scored on the same tokens."""
    from iit_fast.corpus import load_corpus
    from iit_fast.batches import validation_batches
    from iit_fast.data import tokenize_corpus
    val = tokenize_corpus(load_corpus(corpus, cache_dir), tokenizer, max_length, num_proc, cache_dir,
                          kind=kind)["validation"]
    n = len(val) if max_batches is None else min(len(val), max_batches * batch_size)
    return validation_batches(val, tokenizer, batch_size, n_sequences=n, seed=EVAL_SEED, kind=kind)


def evaluate(model, teacher=None, corpus=None, alignment: str = "middle", max_batches: int | None = 20,
             batch_size: int = 32, max_length: int = 128, seed: int = IIA_SEED, plans_per_batch: int = 1,
             span_fraction: float = 0.3, cache_dir=None, progress: bool = True, threads: int | None = None,
             lm_eval_tasks: list[str] | None = None, lm_eval_include: str | None = None,
             lm_eval_limit: int | None = None) -> dict:
    """Perplexity / top-1 of the model folder `model` (and of `teacher`), and IIA of model against teacher:
    one JSON dict. The model's kind (masked or causal, `load_model`) picks the batches and positions."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    if lm_eval_tasks:  # before any work: the harness scores causal LMs only
        spec, _ = inspect_model(model, arg="--model", weights=False)
        if spec.kind != "causal":
            raise ValueError(f"--lm-eval: {model} holds a {spec.kind} LM; lm-evaluation-harness scores causal "
                             "LMs (use the perplexity, IIA and fine-tuning evaluations for masked LMs)")
    m, tok = load_model(model, arg="model")
    kind = m.kind
    batches = load_validation(tok, corpus, batch_size, max_length, cache_dir, kind=kind, max_batches=max_batches)
    out = {"model": str(model), "kind": kind, "corpus": corpus or "default", "max_batches": max_batches,
           "batch_size": batch_size, "max_length": max_length}
    out["lm"] = lm_metrics(m, batches, progress=progress)
    if teacher is not None:
        t, ttok = load_model(teacher, kind=kind, arg="teacher")
        check_same_tokenizer(ttok, tok, f"teacher {teacher}", f"model {model}")
        out["teacher"] = str(teacher)
        out["teacher_lm"] = lm_metrics(t, batches, progress=progress)
        pairs = parse_alignment(alignment, t.num_layers, m.num_layers)
        out["alignment"] = [[list(a), b] for a, b in pairs]
        out["iia"] = interchange_accuracy(t, m, batches, pairs, seed=seed, span_fraction=span_fraction,
                                          plans_per_batch=plans_per_batch, progress=progress)
    if lm_eval_tasks:
        out["lm_eval"] = lm_eval_harness(model, lm_eval_tasks, lm_eval_include, lm_eval_limit, batch_size)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def lm_eval_harness(model, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                    batch_size: int = 32) -> dict:
    """{task: {metric: value}} of lm-evaluation-harness's `tasks` on the causal LM folder `model`, through
    the harness's own HF model class (on the GPU where there is one, in the checkpoint's dtype).
    `include_path`: a folder of extra YAML tasks; `limit`: at most this many documents per task."""
    import lm_eval  # (optional, heavy: `pip install lm_eval`, in the [eval] extra)
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--lm-eval: unknown task(s) {unknown}; lm-evaluation-harness knows "
                         f"{len(manager.all_tasks)} (`lm-eval ls tasks`); a local YAML task needs --lm-eval-include")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=auto,device={device}",
                                  tasks=list(tasks), task_manager=manager, batch_size=batch_size, limit=limit,
                                  log_samples=False)
    out = {"harness_version": lm_eval.__version__, "limit": limit}
    for task, metrics in res["results"].items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and k not in ("name", "alias")}
    return out


def _rewind(batches):
    """Training-style batches (`batches.build_train_loader`) carry their position (and an epoch that reseeds the masks) from one iteration to the next:
    start every evaluation at epoch 0, batch 0, so every model sees the same batches and masks."""
    if hasattr(batches, "load_state_dict"):
        batches.load_state_dict({"epoch": 0, "batch_index": 0})
    return batches


def _progress(batches, max_batches, desc, on):
    if not on:
        return batches
    from tqdm.auto import tqdm
    try:
        total = len(batches)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(batches, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def add_arguments(p):
    p.add_argument("--model", required=True, help="local HF LM folder (masked or causal) to evaluate")
    p.add_argument("--teacher", default=None, help="teacher folder: adds IIA and the teacher's perplexity")
    p.add_argument("--corpus", default=None, help="load_corpus spec (files, folder, hub name); default corpus")
    p.add_argument("--alignment", default="middle",
                   help="middle | late | full | identity | JSON file | inline JSON pairs '[[[5],2]]'")
    p.add_argument("--max-batches", type=int, default=20, help="validation batches (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--plans-per-batch", type=int, default=1)
    p.add_argument("--span-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=IIA_SEED, help="seed of the IIA intervention plans")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="write the JSON result here (it is printed too)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks (causal LMs), e.g. hellaswag,arc_easy")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR", help="a folder of extra YAML tasks")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="at most this many documents per task")


def run(a) -> dict:
    res = evaluate(a.model, a.teacher, a.corpus, a.alignment, a.max_batches or None, a.batch_size, a.max_length,
                   a.seed, a.plans_per_batch, a.span_fraction, a.cache_dir, not a.no_progress, a.threads,
                   lm_eval_tasks=[t for t in (a.lm_eval or "").split(",") if t], lm_eval_include=a.lm_eval_include,
                   lm_eval_limit=a.lm_eval_limit)
    from .cli import print_json
    print_json(res, a.output)
    return res
