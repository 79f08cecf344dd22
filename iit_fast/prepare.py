"""Everything before the first step, in the order the main job does it: the arguments checked
(`check_inputs`), the embedded defaults built once, the models loaded and checked as a pair, the corpus
tokenized, the teacher cache opened (`prepare`), and, once the process group exists, the batches
(`build_batches`) and the student's engine around the step, the teacher loaded on its plan (`build_engine`).
A bad teacher, student, alignment, max_length, corpus or cache stops here with one `error:` line, and nothing
is written.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import activation_checkpointing, batches, corpus, data
from .cache import built_default_teacher, cache_lock
from .cached_step import CachedDistillStep
from .compile import prepare_blocks
from .config import TrainConfig, parse_args
from .activation_checkpointing import check_ds_section
from .engine import build_teacher, init_engine, read_ds_config, read_teacher_ds_config, teacher_plan
from .eval import EVAL_SEED
from .models import IntervenableLM, check_same_tokenizer, load_model
from .models.student import check_student_config, init_student_from_teacher, student_from_config
from .models.load import inspect_model, meta_model
from .models.partitioned import checkpoint_keys, init_student_from_checkpoint, safetensors_index
from .optim import make_scheduler, param_groups
from .precision import DTYPES, choose_precision
from .run_dir import check_out_dir
from .sampling import make_alignment
from .step import DistillStep, check_pair
from .teacher_cache import CacheOptions, TeacherCache, check_run, refuse_teacher_kind, run_fingerprint


def check_inputs(argv) -> tuple[TrainConfig, dict, str]:
    """Everything checkable from the arguments alone: config fields, DeepSpeed config, precision, paths,
    out_dir. Returns (config, DeepSpeed config with the precision applied, a line saying which precision
    runs and why)."""
    cfg = parse_args(argv)
    for name in ("teacher", "student"):
        path = getattr(cfg, name)
        if path is not None and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"--{name} {path}: not a Hugging Face model folder (no config.json there)")
    ds = read_ds_config(cfg.deepspeed_config, int(os.environ.get("WORLD_SIZE", 1)))
    check_ds_section(ds)  # activation checkpointing options this job cannot honour: refused before work
    why = choose_precision(cfg, ds)
    if cfg.distill.teacher_dtype == "float16" or cfg.distill.student_autocast == "float16":
        if not torch.cuda.is_available():
            raise ValueError("float16 (teacher_dtype / student_autocast) needs a GPU: this CPU has no fp16 "
                             "training path; use bfloat16 or float32")
    if cfg.teacher_deepspeed_config is not None:  # the teacher's own plan: refused now if it cannot work
        read_teacher_ds_config(cfg.teacher_deepspeed_config, ds, cfg.distill.teacher_dtype)
    err = check_out_dir(cfg)
    if err:
        raise FileExistsError(err)
    return cfg, ds, why


@dataclass
class TeacherLoad:
    """How the teacher is loaded once the process group exists (engine.build_teacher): its checked folder,
    its DeepSpeed plan (None: replicated), its dtype, and a line saying which and why."""
    spec: object
    plan: dict | None
    dtype: torch.dtype
    why: str


def prepare(cfg: TrainConfig, ds: dict):
    """(teacher, student, tokenizer, tokenized corpus, alignment, teacher cache or None, TeacherLoad), before
    any process group forms. The embedded defaults are built once, under a file lock, by the first process to
    get here. `teacher` has no weights yet (the meta device: its sizes, for every check): they are loaded after
    the process group forms, as TeacherLoad says (engine.build_teacher), and never with a teacher cache."""
    with cache_lock(cfg.cache_dir):
        path = cfg.teacher or default_teacher_apart(cfg.cache_dir)
        teacher, student, tokenizer, spec = build_models(cfg, path)
        tokenized = tokenize(cfg, tokenizer, teacher.kind)
    alignment = make_alignment(cfg.distill.alignment, teacher.num_layers, student.num_layers)
    cache = open_teacher_cache(cfg, path, teacher, tokenizer, tokenized, alignment) if cfg.teacher_cache else None
    return teacher, student, tokenizer, tokenized, alignment, cache, teacher_load(cfg, ds, spec, teacher)


def teacher_load(cfg: TrainConfig, ds: dict, spec, teacher) -> TeacherLoad:
    """The teacher's plan (engine.teacher_plan), and for a partitioned one every tensor checked in the
    safetensors headers (present, of its shape) now, before work."""
    dtype = DTYPES[cfg.distill.teacher_dtype]
    if cfg.teacher_cache:
        return TeacherLoad(spec, None, dtype, "teacher: not loaded (--teacher_cache holds every output the step "
                                              "needs)")
    own = (read_teacher_ds_config(cfg.teacher_deepspeed_config, ds, cfg.distill.teacher_dtype)
           if cfg.teacher_deepspeed_config else None)
    n_bytes = sum(p.numel() for p in teacher.parameters()) * dtype.itemsize
    plan, why = teacher_plan(ds, own, cfg.shard_teacher, n_bytes, teacher.hidden_size, dtype)
    if plan is not None:
        checkpoint_keys(spec, teacher.model, safetensors_index(spec.folder, "--teacher"))
    return TeacherLoad(spec, plan, dtype, why)


def default_teacher_apart(cache_dir) -> Path:
    """The embedded default teacher's folder, built on first use in a child process (`python -m
    iit_fast.teacher build`): the build's memory (its own training run) goes back to the system when the child
    exits, instead of staying in this process's heap for the whole run (allocator.tune_malloc keeps freed
    memory). The caller holds the cache lock; the child takes none."""
    try:
        return built_default_teacher(cache_dir)
    except FileNotFoundError:
        pass
    cmd = [sys.executable, "-m", "iit_fast.teacher", "build"] + (["--cache-dir", str(cache_dir)] if cache_dir else [])
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run(cmd, env=env, stdout=2)  # its progress on stderr (fd 2), as in-process
    if r.returncode:
        raise ValueError(f"building the default teacher failed (`{' '.join(cmd[1:])}` exited {r.returncode}; "
                         f"its error is above)")
    return built_default_teacher(cache_dir)


def build_models(cfg: TrainConfig, teacher_path):
    """(teacher: frozen, eval, on the meta device; student; tokenizer; the teacher's checked folder):
    IntervenableLMs of one supported family, checked as a pair. No teacher weight is read here: a student
    initialised from the teacher reads its own tensors from the teacher's files; with a teacher cache, the
    teacher's weight files are not opened at all (the cache's fingerprint pins them)."""
    spec, tokenizer = inspect_model(teacher_path, arg="--teacher", weights=not cfg.teacher_cache)
    teacher = meta_model(spec, DTYPES[cfg.distill.teacher_dtype])  # the family decides the objective
    if cfg.generates and teacher.kind != "causal":
        raise ValueError(f"{'--seq_kd' if cfg.seq_kd else '--on_policy_fraction'}: generated continuations need a "
                         f"causal LM teacher (GPT-2, Llama-family); the teacher ({teacher.family}) is a "
                         f"{teacher.kind} LM")
    max_pos = getattr(teacher.config, "max_position_embeddings", None)
    max_pos = max_pos or getattr(teacher.config, "n_positions", None)
    if max_pos is not None and cfg.max_length > max_pos - (2 if teacher.family == "roberta" else 0):
        raise ValueError(f"--max_length {cfg.max_length} is more than the teacher's positions ({max_pos}"
                         f"{', two of them reserved by RoBERTa' if teacher.family == 'roberta' else ''})")
    if cfg.student is not None and cfg.student_config is not None:
        raise ValueError("--student_config: a student from a config is initialised from the teacher; expected "
                         "either --student DIR or --student_config, not both")
    if cfg.student is None and cfg.student_config is not None:
        cfg.student_layers = check_student_config(teacher.model, cfg.student_config, cfg.student_layers)
        torch.manual_seed(cfg.seed)
        whole, _ = load_model(teacher_path, arg="--teacher")  # narrower widths: sliced from the whole teacher
        student = IntervenableLM(student_from_config(whole.model, cfg.student_config, cfg.student_layers))
        del whole
    elif cfg.student is None:
        torch.manual_seed(cfg.seed)
        if any(spec.folder.glob("*.safetensors")):  # only the tensors the student copies are read
            student = IntervenableLM(init_student_from_checkpoint(spec, cfg.student_layers))
        else:  # a legacy .bin is one pickle: loaded whole (fp32, on the CPU) for the copy, then dropped
            whole, _ = load_model(teacher_path, arg="--teacher")
            student = IntervenableLM(init_student_from_teacher(whole.model, cfg.student_layers))
            del whole
    else:
        student, s_tok = load_model(cfg.student, kind=teacher.kind, arg="--student")
        check_same_tokenizer(tokenizer, s_tok, "--teacher", "--student")
        if student.vocab_size != teacher.vocab_size and cfg.distill.shared_vocab is None:
            # the same tokenizer, embeddings padded to different sizes: compare over the tokenizer's ids
            cfg.distill.shared_vocab = len(tokenizer)
    if cfg.dropout is not None:
        student.set_dropout(cfg.dropout)
    teacher = teacher.eval().requires_grad_(False)
    student.train()
    if cfg.distill.w_mse and student.hidden_size != teacher.hidden_size:
        student.attach_site_projection(teacher.hidden_size)
    check_pair(teacher, student, cfg.distill)
    return teacher, student, tokenizer, spec


def tokenize(cfg: TrainConfig, tokenizer, kind: str):
    """Masked LMs: paragraphs packed into [CLS] p1 [SEP] p2 [SEP]...; causal LMs: documents packed into
    sequences of exactly max_length tokens, EOS between documents."""
    dd = corpus.load_corpus(cfg.corpus, cfg.cache_dir, text_column=cfg.text_column,
                            num_proc=cfg.num_proc if cfg.num_proc > 1 else None)
    return data.tokenize_corpus(dd, tokenizer, cfg.max_length,
                                cfg.num_proc, cfg.cache_dir, kind=kind)


def open_teacher_cache(cfg: TrainConfig, teacher_path, teacher, tokenizer, tokenized, alignment):
    """The teacher cache, checked against this run (teacher, tokenizer, corpus, max_length, masking, plans:
    a difference is refused naming the field) and for missing or truncated shards, before any work."""
    refuse_teacher_kind(teacher.kind, cfg.teacher_cache)  # before the options: they differ by kind
    d = cfg.distill
    # a cache may hold N rows drawn across the corpus (--max_examples): the run checks those rows
    built = json.loads((Path(cfg.teacher_cache) / "cache.json").read_text()).get("fingerprint", {}) \
        if (Path(cfg.teacher_cache) / "cache.json").is_file() else {}
    opts = CacheOptions(kind=teacher.kind, max_length=cfg.max_length,
                        logit_tokens=d.logit_tokens_for(teacher.kind),
                        alignment=d.alignment, student_layers=cfg.student_layers, span_fraction=d.span_fraction,
                        dims=d.dims, mlm_probability=cfg.mlm_probability, temperature=d.temperature,
                        max_examples=built.get("examples") if isinstance(built.get("examples"), int) else None)
    expect = run_fingerprint(teacher_path=teacher_path, tokenizer=tokenizer, tokenized_split=tokenized["train"],
                             opts=opts, alignment=alignment)
    cache = TeacherCache.open(cfg.teacher_cache, expect=expect)
    world = int(os.environ.get("WORLD_SIZE", 1))
    ds = read_ds_config(cfg.deepspeed_config, world)
    check_run(cache, d, micro_batch=ds["train_micro_batch_size_per_gpu"], accumulation=ds["gradient_accumulation_steps"],
              world_size=world, max_steps=cfg.max_steps, epochs=cfg.epochs)
    return cache


def build_batches(cfg: TrainConfig, tokenized, tokenizer, kind: str, micro_batch: int, rank: int, world: int):
    """Rank-sharded training batches (a resumable DataLoader) and the validation batches: the first
    eval_sequences rows, each masked by its own seeded generator, the same on every rank and for any
    micro-batch, accumulation or world size."""
    train = batches.build_train_loader(tokenized["train"], tokenizer, micro_batch, kind=kind, seed=cfg.seed,
                                    rank=rank, world_size=world, group_by_length=cfg.group_by_length,
                                    mlm_probability=cfg.mlm_probability, num_workers=cfg.num_workers)
    n_val = min(cfg.eval_sequences, len(tokenized["validation"]))
    val = batches.validation_batches(tokenized["validation"], tokenizer, micro_batch, n_sequences=n_val,
                                  seed=EVAL_SEED, kind=kind, mlm_probability=cfg.mlm_probability)
    return train, val


def quiet_deepspeed():
    """DeepSpeed logs at INFO per engine and warns about a deprecated collective it calls itself."""
    from deepspeed.utils import logger as ds_logger  # (imported here: slow, and not needed for bad input)
    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")


def build_engine(cfg: TrainConfig, ds: dict, teacher, student, load: TeacherLoad, cache, max_steps: int, device,
                 say) -> tuple:
    """(engine, teacher), once the process group exists: the student's DeepSpeed engine around the step, with
    the teacher loaded now on its plan (replicated straight onto the device, or partitioned as it is built),
    or, with a teacher cache, around the cached step (the cache holds every teacher output the step needs: the
    teacher stays on the CPU, unused); activation checkpointing and --compile applied. `say` prints each
    choice as it is made."""
    say(load.why)
    if cache is None:
        teacher = build_teacher(load.spec, load.plan, load.dtype, device)
        step_module = DistillStep(teacher, student, cfg.distill)
    else:
        step_module = CachedDistillStep(student, cfg.distill)
    schedule = lambda opt: make_scheduler(opt, cfg.lr_schedule, cfg.warmup_steps, max_steps,  # noqa: E731
                                          cfg.min_lr / cfg.lr)
    ckpt = activation_checkpointing.enable(student, cfg.activation_checkpointing, ds)
    if ckpt:
        say(ckpt)
    engine = init_engine(ds, step_module, param_groups(student, cfg.weight_decay), cfg.lr, schedule)
    if cfg.compile != "off":  # --compile (compile.py): the blocks as the engine left them (its dtype, its device)
        for lm in [engine.module.student] + ([teacher] if cache is None else []):
            say(prepare_blocks(lm, cfg.compile))
    return engine, teacher
