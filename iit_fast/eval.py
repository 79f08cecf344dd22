"""Does a distilled student work? Masked-LM perplexity and interchange intervention accuracy (IIA).

    iit-fast eval --model runs/X/student                                 # perplexity, top-1 (default corpus)
    iit-fast eval --model runs/X/student --teacher T --alignment middle  # + IIA and counterfactual KL
    iit-fast eval --model S --teacher T --max-batches 20 --output eval.json

- **Perplexity** of any HF masked LM: exp of the mean cross-entropy over the masked tokens (labels !=
  -100) of the validation batches, and top-1 accuracy on them. Batches are masked with a fixed seed
  (`teacher.EVAL_SEED`), so every model compared sees the same positions. BERT-shaped models go through
  `teacher.evaluate_mlm` (the head runs on the masked rows only); others through their own HF forward.
- **IIA** of a student against its teacher: on held-out batches, an intervention plan is drawn per batch
  (seeded) from the alignment, exactly as in training (`sampling.sample_plan`: one aligned pair, an
  in-batch derangement, spans). Both models run the counterfactual the way the fast step does: swap the
  span at the site with `ops.interchange`, then resume from the next block (a teacher group swaps again
  after each later block of the group, from its plain states, with `interchange_reference`). On the
  masked tokens of the base, IIA = mean [argmax z~_s == argmax z~_t], and `cf_kl` = mean
  KL(softmax(z~_t) || softmax(z~_s)) at T = 1 (nats). A student that is a copy of its teacher under the
  identity alignment (block l <-> block l) has IIA 1 and KL 0.
"""
from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from iit_fast.models import IntervenableMLM
from iit_fast.ops import interchange
from iit_fast.ops.reference import interchange_reference
from iit_fast.sampling import InterventionPlan, make_alignment, sample_plan, validate_alignment

IIA_SEED = 4321  # the plans of the IIA evaluation: the same sites for every student compared


# ---- perplexity ------------------------------------------------------------------------------------

@torch.no_grad()
def mlm_metrics(model, batches, max_batches: int | None = None, progress: bool = False) -> dict:
    """{"perplexity", "top1", "tokens"} of an HF masked LM over the masked tokens of `batches`.

    perplexity = exp(sum of token NLL / number of masked tokens), the NLL of the full softmax over the
    vocabulary; computed by `teacher.evaluate_mlm` (one code path for the whole project)."""
    from iit_fast.teacher import evaluate_mlm
    batches = _progress(_rewind(batches), max_batches, "perplexity", progress)
    return evaluate_mlm(model, batches, max_batches)


# ---- interchange intervention accuracy --------------------------------------------------------------

def counterfactual_hidden(model: IntervenableMLM, batch: dict, layers: tuple[int, ...],
                          plan: InterventionPlan) -> torch.Tensor:
    """Last hidden states (B, S, D) of the counterfactual run: row i's span at the site of `layers[0]`
    takes row plan.pi[i]'s span, the pass resumes from the next block, and after every later block of
    `layers` the span is swapped again from that block's plain states (as `step.fast_step` does)."""
    ids, am, tt = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
    plain = model(ids, am, tt, keep=set(layers), stop=layers[-1] + 1)
    cf = interchange(plain.sites[layers[0]], plan.pi, plan.base_start, plan.source_start, plan.span_len,
                     plan.dims)                                                            # (B, S, D)
    later = {l: partial(interchange_reference, pi=plan.pi, base_start=plan.base_start,
                        source_start=plan.source_start, span_len=plan.span_len, dims=plan.dims,
                        source=plain.sites[l]) for l in layers[1:]}
    return model(None, am, resume_from=layers[0] + 1, states=cf, interventions=later).last_hidden


@torch.no_grad()
def interchange_accuracy(teacher: IntervenableMLM, student: IntervenableMLM, batches, alignment,
                         max_batches: int | None = None, seed: int = IIA_SEED, span_fraction: float = 0.3,
                         plans_per_batch: int = 1, dims=None, progress: bool = False) -> dict:
    """IIA and counterfactual KL of `student` against `teacher` (both IntervenableMLM) over `batches`.

    alignment: a list of (teacher blocks, student block) pairs (`sampling.make_alignment`). Per batch,
    `plans_per_batch` plans are drawn from one generator seeded with `seed`. Tokens: the base's masked
    tokens (labels != -100). Returns {"iia", "cf_kl", "tokens", "plans", "per_pair": {pair: iia}}."""
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
        sel = batch["labels"] != -100                                                       # (B, S)
        if not sel.any():
            continue
        for _ in range(plans_per_batch):
            plan = sample_plan(batch["attention_mask"], alignment, g, span_fraction, dims)
            h_t = counterfactual_hidden(teacher, batch, plan.teacher_layers, plan)
            h_s = counterfactual_hidden(student, batch, (plan.student_layer,), plan)
            z_t = teacher.logits(h_t[sel]).float()                                          # (M, V)
            z_s = student.logits(h_s[sel]).float()                                          # (M, V)
            same = (z_t.argmax(-1) == z_s.argmax(-1)).sum().item()
            kl = F.kl_div(F.log_softmax(z_s, -1), F.log_softmax(z_t, -1), log_target=True,
                          reduction="sum").item()
            m = int(sel.sum())
            agree, kl_sum, n, plans = agree + same, kl_sum + kl, n + m, plans + 1
            key = f"{list(plan.teacher_layers)}->{plan.student_layer}"
            a = per_pair.setdefault(key, [0, 0])
            a[0], a[1] = a[0] + same, a[1] + m
    teacher.train(was_t), student.train(was_s)
    if n == 0:
        raise ValueError("batches: no masked token in a batch of >= 2 rows; expected MLM batches with labels")
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

def load_masked_lm(path):
    """(HF masked LM in eval mode, tokenizer) from a local folder or a hub name."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    p = Path(str(path)).expanduser()
    if p.exists() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"model: {p} has no config.json; expected a Hugging Face model folder")
    name = str(p) if p.exists() else str(path)
    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForMaskedLM.from_pretrained(name)
    return model.eval(), tok


def validation_batches(tokenizer, corpus=None, batch_size: int = 32, max_length: int = 128, cache_dir=None,
                       num_proc: int = 1):
    """The validation split of a corpus as MLM batches, masked with the fixed evaluation seed."""
    from iit_fast.data import MLMBatches, load_corpus, tokenize_corpus
    from iit_fast.teacher import EVAL_SEED
    td = tokenize_corpus(load_corpus(corpus, cache_dir), tokenizer, max_length, num_proc, cache_dir)
    return MLMBatches(td["validation"], tokenizer, batch_size, seed=EVAL_SEED, shuffle=False,
                      group_by_length=False, drop_last=False)


def evaluate(model, teacher=None, corpus=None, alignment: str = "middle", max_batches: int | None = 20,
             batch_size: int = 32, max_length: int = 128, seed: int = IIA_SEED, plans_per_batch: int = 1,
             span_fraction: float = 0.3, cache_dir=None, progress: bool = True, threads: int | None = None) -> dict:
    """Perplexity / top-1 of `model` (and of `teacher`), and IIA of model against teacher: one JSON dict."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    m, tok = load_masked_lm(model)
    batches = validation_batches(tok, corpus, batch_size, max_length, cache_dir)
    out = {"model": str(model), "corpus": corpus or "default", "max_batches": max_batches,
           "batch_size": batch_size, "max_length": max_length}
    out["mlm"] = mlm_metrics(m, batches, max_batches, progress)
    if teacher is not None:
        t, ttok = load_masked_lm(teacher)
        if len(ttok) != len(tok) or ttok.get_vocab() != tok.get_vocab():
            raise ValueError(f"teacher {teacher} and model {model} have different vocabularies; IIA compares "
                             f"their predictions token by token and needs the same tokenizer")
        out["teacher"] = str(teacher)
        out["teacher_mlm"] = mlm_metrics(t, batches, max_batches, progress)
        ti, si = IntervenableMLM(t), IntervenableMLM(m)
        pairs = parse_alignment(alignment, ti.num_layers, si.num_layers)
        out["alignment"] = [[list(a), b] for a, b in pairs]
        out["iia"] = interchange_accuracy(ti, si, batches, pairs, max_batches, seed, span_fraction,
                                          plans_per_batch, progress=progress)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _rewind(batches):
    """`MLMBatches` carry their position (and an epoch that reseeds the masks) from one iteration to the next:
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
    p.add_argument("--model", required=True, help="HF masked-LM folder (or hub name) to evaluate")
    p.add_argument("--teacher", default=None, help="teacher folder/name: adds IIA and the teacher's perplexity")
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


def run(a) -> dict:
    res = evaluate(a.model, a.teacher, a.corpus, a.alignment, a.max_batches or None, a.batch_size, a.max_length,
                   a.seed, a.plans_per_batch, a.span_fraction, a.cache_dir, not a.no_progress, a.threads)
    from .cli import print_json
    print_json(res, a.output)
    return res
