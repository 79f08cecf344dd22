"""On-policy and sequence-level data for causal LMs (TRL's GKDTrainer `lmbda` / `seq_kd`; MiniLLM, DistiLLM).

    --on_policy_fraction L   a share L of the micro-batches: the STUDENT continues prompts drawn from the corpus
    --seq_kd                 of the other micro-batches: the TEACHER continues them (sequence-level KD)
    --gen_temperature T      sampling temperature of both (default 1: the model's own distribution; no top-k/p)
    --max_new_tokens N       continuation length (default max_length // 2); generation stops at EOS

Which micro-batches (`source_of`): one uniform draw u per micro-batch from (seed, step, micro-batch draw), the
same on every rank (under ZeRO-3 gathering is collective: every rank must generate together). u < L: the
student generates; else with --seq_kd the teacher; else the corpus batch as it is. This is TRL's rule.

The prompt rule (`prompt_length`): the first P = min(max_length - N, shortest row of the micro-batch) tokens of
every corpus row (the corpus packs documents into full max_length rows, so P = max_length - N in practice):
the generated row is then at most max_length long, like a corpus row, and its prompt has no padding.

A generated row (`continuation_batch`): prompt, then the continuation up to and including its first EOS
(the model chose to end: that token is real and is a target), then right padding (attention 0, labels -100).
The next-token losses are taken where the NEXT token was generated (`loss_mask`: positions P - 1 ...
last - 1; the distribution at P - 1 is the one the first new token was sampled from), never on the prompt,
which is corpus text the off-policy micro-batches already cover. `ce` and `iit` compare the teacher's and the
student's distributions there (the teacher scores the row in the step's own teacher pass). The LM term's
labels: the teacher's tokens under --seq_kd (Kim & Rush's sequence-level KD: the teacher's samples are
targets), none for the student's own samples (training on them would be self-training, not distillation;
TRL's GKD has no LM term at all). `cos` compares states at every real token, prompt included.

Interchange spans are drawn as for corpus rows, anywhere in a row's real tokens (prompt or continuation):
the plan's distribution is then the same for every micro-batch (lambda changes the data, not the
intervention), and a swap in the prompt reaches every generated position after it, where `iit` is taken.

Generation runs without gradient, in eval mode (no dropout), through transformers' `generate` on the wrapped
Hugging Face model (`IntervenableLM.model`) with its KV cache, on a torch RNG seeded from (seed, step, draw,
rank) inside `torch.random.fork_rng` (the run's own RNG stream is untouched): a pure function of the position
in the run, so a resumed run generates exactly what an uninterrupted one does. Under ZeRO-3 (the student's
engine, or a partitioned teacher's) the model's parameters are gathered whole for the call and the engine's
hooks are taken off meanwhile and put back after (`gathered_for_generation`, TRL's
`unwrap_model_for_generation` recipe): a rank briefly holds the whole generating model.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from .precision import student_autocast

SOURCES = ("corpus", "student", "teacher")


def _uniform(*key) -> float:
    h = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64


def derived_seed(*key) -> int:
    h = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def source_of(seed: int, step: int, draw: int, fraction: float, seq_kd: bool) -> str:
    """Who writes this micro-batch's continuations: "student", "teacher" or "corpus" (none). No rank in the
    key: every rank decides the same (ZeRO-3 gathers collectively)."""
    if fraction <= 0 and not seq_kd:
        return "corpus"
    if _uniform("source", seed, step, draw) < fraction:
        return "student"
    return "teacher" if seq_kd else "corpus"


def prompt_length(attention_mask: torch.Tensor, max_length: int, max_new_tokens: int) -> int:
    """P: the prompt's length for this micro-batch (see the module docstring), at least 1."""
    shortest = int(attention_mask.sum(1).min())
    return max(1, min(max_length - max_new_tokens, shortest))


def continuation_batch(sequences: torch.Tensor, prompt_len: int, eos_id: int, pad_id: int, *,
                       labels_from_continuation: bool) -> dict[str, torch.Tensor]:
    """The step's batch from generated `sequences` (B, P + n) (prompt, then n <= max_new_tokens tokens).

    attention_mask: the prompt, and each continuation up to and including its first EOS; after it padding
    (`pad_id`). labels: the continuation's ids where `labels_from_continuation` (seq_kd), else -100; -100 on
    the prompt and padding. loss_mask (bool): the positions whose next token was generated (the step takes
    every next-token loss there only). All (B, P + n), on the CPU."""
    seqs = sequences.cpu()
    B, S = seqs.shape
    cols = torch.arange(S)[None]                                                    # (1, S)
    gen = seqs[:, prompt_len:]                                                      # (B, n)
    is_eos = gen == eos_id
    # the first EOS of the continuation (n when none): a row ends there, EOS included
    first = torch.where(is_eos.any(1), is_eos.long().argmax(1), torch.full((B,), gen.shape[1]))   # (B,)
    end = prompt_len + torch.clamp(first + 1, max=gen.shape[1])                     # (B,) exclusive
    am = (cols < end[:, None]).long()                                               # (B, S)
    ids = seqs.masked_fill(am == 0, pad_id)
    cont = (cols >= prompt_len) & (am == 1)                                         # (B, S) generated, real
    labels = ids.masked_fill(~cont, -100) if labels_from_continuation else torch.full_like(ids, -100)
    loss_mask = torch.zeros(B, S, dtype=torch.bool)
    loss_mask[:, :-1] = cont[:, 1:]                                                 # next token generated
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "loss_mask": loss_mask}


# ---- ZeRO-3: the whole model for the call (TRL's unwrap_model_for_generation) --------------------------

def _zero3_offload(engine):
    """The ZeRO-3 parameter-offload object that holds the engine's hooks (a training engine's optimizer's, or an
    inference engine's DeepSpeedZeRoOffload), or None when the engine is not ZeRO-3."""
    opt = getattr(engine, "optimizer", None)
    if opt is None or engine.zero_optimization_stage() != 3:
        return None
    return getattr(opt, "parameter_offload", opt)


def _params_of(module):
    for m in module.modules():
        yield from m.parameters(recurse=False)
        if hasattr(m, "ds_external_parameters"):
            yield from (p for _, p in m.ds_external_parameters())


@contextlib.contextmanager
def gathered_for_generation(engine):
    """Inside: every parameter of `engine`'s module whole on this rank, and the engine's ZeRO-3 hooks off (so
    the generate call's forwards neither re-gather nor release them); outside: partitioned again, hooks back,
    the coordinator's recorded module order invalidated (generation ran the modules in another order).
    A no-op for an engine that is not ZeRO-3 (or no engine: a replicated teacher). All ranks must enter."""
    offload = _zero3_offload(engine) if engine is not None else None
    if offload is None:
        yield
        return
    import deepspeed
    module = offload.module
    with deepspeed.zero.GatheredParameters(list(_params_of(module))):
        for p in _params_of(module):
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            coordinator = getattr(offload, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()
            offload._register_deepspeed_module(module)


# ---- generation -------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, prompt: torch.Tensor, *, max_new_tokens: int, temperature: float, eos_id: int, pad_id: int,
           seed: int, autocast=None) -> torch.Tensor:
    """(B, P + n) sequences: `model` (an IntervenableLM of a causal LM) continues `prompt` (B, P), all real
    tokens, by ancestral sampling at `temperature` from its full distribution (no top-k, no top-p), with the
    KV cache, until every row has written EOS or `max_new_tokens` tokens. Eval mode for the call; the RNG is
    seeded with `seed` inside fork_rng (the caller's stream is untouched)."""
    hf = model.model
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos_id,
                              pad_token_id=pad_id, use_cache=True, num_beams=1, repetition_penalty=1.0)
    was_training = hf.training
    hf.eval()
    devices = [prompt.device] if prompt.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), (autocast or contextlib.nullcontext()):
            torch.manual_seed(seed)
            return hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                               generation_config=config)
    finally:
        hf.train(was_training)


class GeneratedData:
    """The main job's micro-batches, with a share generated (see the module docstring). Call it on every
    corpus micro-batch: it returns (batch, source), the batch unchanged for source "corpus"."""

    def __init__(self, cfg, tokenizer, student_engine, teacher, device, rank: int):
        self.cfg, self.engine, self.teacher, self.device, self.rank = cfg, student_engine, teacher, device, rank
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.max_new_tokens = cfg.max_new_tokens_or_default
        self.seconds = 0.0  # spent generating (the loop logs it per interval)

    @property
    def enabled(self) -> bool:
        return self.cfg.on_policy_fraction > 0 or self.cfg.seq_kd

    def __call__(self, batch: dict, step: int, draw: int) -> tuple[dict, str]:
        cfg = self.cfg
        source = source_of(cfg.seed, step, draw, cfg.on_policy_fraction, cfg.seq_kd)
        if source == "corpus":
            return batch, source
        t0 = time.perf_counter()
        P = prompt_length(batch["attention_mask"], cfg.max_length, self.max_new_tokens)
        prompt = batch["input_ids"][:, :P].to(self.device)                                      # (B, P)
        if source == "student":
            model, engine = self.engine.module.student, self.engine
            autocast = student_autocast(cfg.distill, self.device)
        else:
            model, engine = self.teacher, (getattr(self.teacher, "_zero3_engine", None) or [None])[0]
            autocast = None
        with gathered_for_generation(engine):
            seqs = sample(model, prompt, max_new_tokens=self.max_new_tokens, temperature=cfg.gen_temperature,
                          eos_id=self.eos_id, pad_id=self.pad_id, autocast=autocast,
                          seed=derived_seed("generate", cfg.seed, step, draw, self.rank))
        out = continuation_batch(seqs, P, self.eos_id, self.pad_id, labels_from_continuation=source == "teacher")
        self.seconds += time.perf_counter() - t0
        return out, source


# ---- generation quality without a reference (benchmarks/objectives.py) --------------------------------

@torch.no_grad()
def sample_quality(student, teacher, batches, *, prompt_len: int, max_new_tokens: int, eos_id: int, pad_id: int,
                   temperature: float = 1.0, seed: int = 0) -> dict:
    """How good the student's own text is, judged by the teacher, with no reference and no hub. The student
    continues the first `prompt_len` tokens of every row of `batches` (rows with more real tokens only) by
    sampling at `temperature`; on those continuations:
    - `reverse_kl_per_token`: mean over the sampled tokens of log p_student - log p_teacher (both at T = 1, the
      student's own sampling distribution at temperature 1): a Monte-Carlo estimate of the sequence-level
      KL(student || teacher) per token (MiniLLM's objective), >= 0 in expectation, 0 when the student
      generates as the teacher does; lower is better;
    - `teacher_ppl_of_samples`: exp of the teacher's mean NLL of them. Not monotone in quality: a student
      more peaked than the teacher (repetitive, mode-seeking) scores lower than the teacher's own samples
      do, so compare it with the teacher's own samples' figure, not with 0;
    - `distinct_2` (distinct bigrams per bigram within a row: a repetition check) and `mean_new_tokens`.
    Batch b's sampling is seeded by (seed, b): the same prompts and seeds for every student compared."""
    t_nll, s_nll, n, bigrams, distinct, lengths = 0.0, 0.0, 0, 0, set(), []
    modes = teacher.training, student.training
    teacher.eval(), student.eval()
    for b, batch in enumerate(batches):
        keep = batch["attention_mask"].sum(1) > prompt_len                                # (B,)
        if not keep.any():
            continue
        prompt = batch["input_ids"][keep, :prompt_len]                                    # (B', P)
        seqs = sample(student, prompt, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                      pad_id=pad_id, seed=derived_seed("quality", seed, b))
        rows = continuation_batch(seqs, prompt_len, eos_id, pad_id, labels_from_continuation=True)
        target = rows["input_ids"][:, 1:, None]                                           # (B', S-1, 1)
        mask = rows["loss_mask"][:, :-1]                                                  # next token generated
        for model, sign in ((teacher, 1.0), (student, -1.0)):
            logits = model.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
            logp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, target)[..., 0]  # (B', S-1)
            nll = -float(logp[mask].sum())
            t_nll, s_nll = (t_nll + nll, s_nll) if sign > 0 else (t_nll, s_nll + nll)
        n += int(mask.sum())
        for i in range(seqs.shape[0]):
            cont = rows["input_ids"][i, prompt_len:][rows["attention_mask"][i, prompt_len:].bool()].tolist()
            lengths.append(len(cont))
            pairs = list(zip(cont, cont[1:]))
            bigrams += len(pairs)
            distinct |= {(b, i) + p for p in pairs}  # distinct within a row (a row repeating itself counts)
    teacher.train(modes[0]), student.train(modes[1])
    n = max(n, 1)
    return {"reverse_kl_per_token": (t_nll - s_nll) / n, "teacher_ppl_of_samples": math.exp(t_nll / n),
            "student_ppl_of_samples": math.exp(s_nll / n), "distinct_2": len(distinct) / max(bigrams, 1),
            "mean_new_tokens": sum(lengths) / max(len(lengths), 1), "scored_tokens": n}
