"""Causal distillation (DIITO) under DeepSpeed, with the fast step (DESIGN.md section 5).

    # the default run: embedded teacher (built offline on first use), embedded corpus, a 3-layer student
    deepspeed iit_fast/train.py --deepspeed_config ds_configs/zero2.json
    # two ranks on one machine (CPU: two processes on gloo; GPU: two GPUs); 8 GPUs, ZeRO-3, bf16
    deepspeed --num_gpus 2 iit_fast/train.py --deepspeed_config ds_configs/zero2.json
    deepspeed --num_gpus 8 iit_fast/train.py --deepspeed_config ds_configs/zero3_bf16.json --teacher path/to/bert
    # several nodes: the DeepSpeed launcher with a hostfile
    deepspeed --hostfile hosts iit_fast/train.py --deepspeed_config ds_configs/zero3_bf16.json
    # no launcher: one process, or torchrun
    python iit_fast/train.py --max_steps 20
    torchrun --nproc_per_node 2 iit_fast/train.py --deepspeed_config ds_configs/zero1.json
    # continue an interrupted run (same flags, same out_dir)
    deepspeed iit_fast/train.py --deepspeed_config ds_configs/zero2.json --out_dir runs/X --resume
    # every flag below is a TrainConfig field; --config run.json sets any of them (unknown keys are an error)

A batch's walk: `prepare()` (before any process group: every check of the arguments and folders, the
embedded defaults built once under a file lock, models loaded, data tokenized) -> `init_distributed` ->
the student's engine around `step.DistillStep` -> per micro-batch: a plan sampled on the CPU
(`sampling.sample_plan`), `engine(batch, plan)` (DeepSpeed's forward runs the step), one all-reduce of
{non-finite loss, stop signal}, `engine.backward(loss)`, `engine.step()`; per log interval one all-reduce
of the loss terms, a metrics line and DeepSpeed's monitor (TensorBoard / CSV / W&B, as its config enables).

It prints (rank 0) one line about the run, the teacher's and the student's validation perplexity, a
progress bar (loss, tokens/s, ETA), and at the end a summary table. It writes, under --out_dir (default
runs/<UTC timestamp>): train_config.json, metrics.jsonl (one JSON object per logged step: every loss term,
the lr the step used, grad norm, tokens/s, memory; one per validation), checkpoints/ (see
iit_fast/checkpoint.py: a tag becomes `latest` only when complete), student/ (the final student as a Hugging
Face folder), loss.png and val.png. SIGINT / SIGTERM save a checkpoint at the end of the current step and
exit (128 + signal). A non-finite loss skips its micro-batch on every rank; a step DeepSpeed skips
(overflow) counts the same; --max_nonfinite of them stop the run with an error, after saving the last
good state.

Choices worth knowing:
- Batch size and gradient accumulation come from the DeepSpeed config (train_micro_batch_size_per_gpu,
  gradient_accumulation_steps, train_batch_size); a mismatch is an error that names the fields.
- The teacher is frozen (eval, no grad). Under ZeRO-3 it is partitioned across ranks like the student when
  --shard_teacher yes (auto: when it holds more than 1 GiB of parameters); otherwise one copy per rank.
- A row's source is another row of its own micro-batch: the intervention plan (pairing, spans, aligned
  layers) of every micro-batch comes from a torch.Generator seeded by (seed, step, micro-batch draw, rank),
  and its MLM masks from (seed, epoch, batch index, rank). Both are pure functions of the position in the
  run, so resuming restores them exactly without saving any generator state.
- --resume continues the same run: the schedule (max_steps / epochs) is the one the run started with; a
  changed value is refused. A run already at its last step says so and saves nothing.
- A rank that dies makes the others fail within seconds; a rank that stops responding makes the others
  fail after --rank_timeout seconds (default 300): no collective waits longer.
- On CPU: gloo, torch AdamW (no DeepSpeed C++ op is built; nothing is left in /dev/shm); on GPU: nccl,
  fused torch AdamW.
- Loading is safe: weights through safetensors; every file of a checkpoint is first opened with
  torch.load(weights_only=True) before DeepSpeed reads it; configs are plain JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from iit_fast.checkpoint import export_student, latest_tag, load_checkpoint, save_checkpoint
from iit_fast.config import DistillConfig
from iit_fast.optim import make_scheduler, param_groups
from iit_fast.engine import (all_reduce_sum, broadcast, init_distributed, init_engine, param_count,
                             prepare_teacher, read_ds_config, zero_stage)

REPO = Path(__file__).resolve().parent.parent
TERMS = ("ce", "mlm", "cos", "iit", "iit_cos", "mse")
SCHEDULES = ("linear", "cosine", "constant")
# fields that may differ between a run and its --resume (they do not change what is computed)
RESUME_MAY_CHANGE = {"resume", "eval_interval", "eval_sequences", "save_interval", "log_interval", "plots",
                     "num_proc", "max_nonfinite", "out_dir", "cache_dir", "keep_checkpoints", "rank_timeout"}
SHARD_TEACHER_AUTO_BYTES = 2 ** 30


@dataclass
class TrainConfig:
    # what is distilled into what
    teacher: str | None = None        # HF folder of a supported LM (masked or causal); None = the embedded default
    student: str | None = None        # HF folder to start the student from; None = init from the teacher
    student_layers: int = 3           # blocks of a student initialised from the teacher
    corpus: str | None = None         # load_corpus spec; None = the embedded default corpus
    teacher_cache: str | None = None  # a cache of the teacher's outputs (iit-fast cache-teacher): no teacher pass
    max_length: int = 128             # tokens per sequence
    mlm_probability: float = 0.15
    # how long, how fast
    max_steps: int = 60               # optimizer steps (sized for ~10 minutes on 2 CPU cores)
    epochs: int = 0                   # > 0: train this many epochs instead of max_steps
    lr: float = 2e-4
    lr_schedule: str = "linear"       # linear | cosine | constant, after a linear warmup
    warmup_steps: int = 5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    dropout: float | None = None      # override the student's dropout (0 makes runs exactly repeatable)
    max_nonfinite: int = 10           # stop after this many skipped steps (non-finite loss, or overflow)
    # bookkeeping
    eval_interval: int = 20           # steps between validations (and one at the start and the end)
    eval_sequences: int = 160         # validation sequences (fixed rows and masks: any batch shape, same figure)
    save_interval: int = 0            # steps between checkpoints; 0 = only at the end (and on SIGINT/TERM)
    log_interval: int = 1             # steps between metrics lines
    out_dir: str | None = None        # default runs/<UTC timestamp>
    resume: bool = False              # continue the run in out_dir from its latest checkpoint
    seed: int = 0
    deepspeed_config: str = "ds_configs/zero2.json"
    cache_dir: str | None = None      # where the default teacher is built / found
    num_proc: int = 1                 # tokenisation processes
    num_workers: int = 0              # DataLoader workers (batches and masks do not depend on it)
    group_by_length: bool = True      # batches of similar lengths (less padding)
    plots: bool = True
    precision: str = "auto"           # auto (bf16 where a probe finds bf16 GEMMs >= 1.3x fp32) | bf16 | fp32
    keep_checkpoints: int = 0         # keep the newest N intact checkpoints; 0 = keep all
    shard_teacher: str = "auto"       # auto | yes | no: partition the teacher under ZeRO-3 (auto: if > 1 GiB)
    rank_timeout: float = 300.0       # seconds a collective waits for a rank that stopped responding
    distill: DistillConfig = field(default_factory=DistillConfig)  # flags: every DistillConfig field

    def __post_init__(self):
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
        positive = ("student_layers", "max_length", "log_interval", "eval_sequences", "max_nonfinite")
        for f in positive:
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("max_steps", "epochs", "warmup_steps", "eval_interval", "save_interval", "num_proc",
                  "keep_checkpoints"):
            if getattr(self, f) < 0:
                raise ValueError(f"TrainConfig.{f} must be >= 0, got {getattr(self, f)}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("TrainConfig: set max_steps > 0 or epochs > 0")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"TrainConfig.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"TrainConfig: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, "
                             f"min_lr={self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.shard_teacher not in ("auto", "yes", "no"):
            raise ValueError(f"TrainConfig.shard_teacher must be auto, yes or no, got {self.shard_teacher!r}")
        if not self.rank_timeout > 0:
            raise ValueError(f"TrainConfig.rank_timeout must be > 0 seconds, got {self.rank_timeout}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1) or None, got {self.dropout}")

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(d.pop("distill"))
        return d


# ---- configuration: flags, --config run.json, the DeepSpeed config ------------------------------

def _flag_type(f):
    t = str(f.type)
    if "bool" in t:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    if "tuple" in t:  # dims: "start,end"
        return lambda s: None if s.lower() == "none" else tuple(int(x) for x in s.split(","))
    base = float if "float" in t else int if "int" in t else str
    if "None" in t:
        return lambda s: None if s.lower() == "none" else base(s)
    return base


def parse_args(argv=None) -> TrainConfig:
    """Flags map 1:1 to TrainConfig and DistillConfig fields; unknown flags and config keys are errors."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of field values (flags given on the command line win)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    train_fields = [f for f in fields(TrainConfig) if f.name != "distill"]
    for f in train_fields + list(fields(DistillConfig)):
        if f.name == "resume":
            p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out_dir")
            continue
        p.add_argument(f"--{f.name}", type=_flag_type(f), default=None, metavar=f.name.upper())
    args = p.parse_args(argv)
    values: dict = {}
    if args.config:
        values = json.loads(Path(args.config).read_text())
        if not isinstance(values, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of field values")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "local_rank")}
    values.update(given)
    return make_config(values)


def make_config(values: dict) -> TrainConfig:
    """A TrainConfig from flat field values (TrainConfig and DistillConfig names); unknown names are an error."""
    tnames = {f.name for f in fields(TrainConfig)} - {"distill"}
    dnames = set(DistillConfig.field_names())
    unknown = sorted(set(values) - tnames - dnames)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(tnames | dnames)}")
    d = {k: v for k, v in values.items() if k in dnames}
    if isinstance(d.get("dims"), list):
        d["dims"] = tuple(d["dims"])
    return TrainConfig(**{k: v for k, v in values.items() if k in tnames}, distill=DistillConfig(**d))


# ---- before any work: checks, the embedded defaults, models and data ----------------------------

class StopSignal:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._set)

    def _set(self, signum, frame):
        self.signum = signum


def check_out_dir(cfg: TrainConfig) -> str | None:
    """Why out_dir can't be used (None if it can): it must be new, empty, hold only a failed start of
    this same config (train_config.json and nothing else), or, with --resume, a run of the same config
    with a checkpoint. Every rank checks before the process group forms, so no rank has written anything
    yet when another looks."""
    if cfg.out_dir is None:
        return "--resume needs --out_dir: the folder of the run to continue" if cfg.resume else None
    out = Path(cfg.out_dir)
    saved = out / "train_config.json"
    if cfg.resume:
        if not saved.is_file() or latest_tag(out / "checkpoints") is None:
            return f"--resume: {out} holds no run with a checkpoint (train_config.json, checkpoints/latest)"
        old, new = json.loads(saved.read_text()), json.loads(json.dumps(cfg.to_json()))
        diff = sorted(k for k in set(old) | set(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))
        if diff:
            why = ("; --resume continues the same run (the lr schedule was made for its length): start a new "
                   "run from the exported student to train longer") if {"max_steps", "epochs"} & set(diff) else ""
            return (f"--resume: the config differs from the run in {out}: "
                    + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff) + why)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        failed_start = names == ["train_config.json"] and json.loads(saved.read_text()) == \
            json.loads(json.dumps(cfg.to_json()))
        if not failed_start:
            return (f"out_dir {out} already holds another run ({', '.join(names[:5])}); nothing was overwritten: "
                    "pass --resume to continue it, or choose another --out_dir")
    return None


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
    why = choose_precision(cfg, ds)
    if cfg.distill.teacher_dtype == "float16" or cfg.distill.student_autocast == "float16":
        if not torch.cuda.is_available():
            raise ValueError("float16 (teacher_dtype / student_autocast) needs a GPU: this CPU has no fp16 "
                             "training path; use bfloat16 or float32")
    err = check_out_dir(cfg)
    if err:
        raise FileExistsError(err)
    return cfg, ds, why


def native_bf16() -> tuple[bool, str]:
    """(does bf16 pay on this machine, why we think so). A GPU: its bf16 support. A CPU: an instruction set
    flag is not enough (avx512_bf16 without AMX can run bf16 GEMMs at half the fp32 speed), so a 0.1 s probe
    times the step's own GEMM shape in both dtypes and bf16 must be at least 1.3x faster."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {torch.cuda.get_device_name()} {'has' if ok else 'has no'} native bf16"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if not found:
        return False, "this CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated)"
    ratio = bf16_gemm_speedup()
    return ratio >= 1.3, f"{found[0]}: a bf16 GEMM measured {ratio:.2f}x the fp32 one here"


def bf16_gemm_speedup(m: int = 1024, k: int = 768, n: int = 3072, repeats: int = 3) -> float:
    """fp32 time / bf16 time of an (m, k) x (k, n) GEMM (a BERT-base MLP's shape), best of `repeats`,
    the dtypes alternating so that a loaded machine slows both alike."""
    import time as _time
    a, b = torch.randn(m, k), torch.randn(k, n)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = {dt: float("inf") for dt in pairs}
    for _ in range(repeats + 1):  # the first round warms up
        for dt, (x, y) in pairs.items():
            t0 = _time.perf_counter()
            x @ y
            best[dt] = min(best[dt], _time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def choose_precision(cfg: TrainConfig, ds: dict) -> str:
    """Apply --precision to the DeepSpeed config (bf16: DeepSpeed's bf16 mode, i.e. bf16 weights and
    activations with fp32 master weights in the optimizer; the teacher in bf16) and say what was chosen."""
    if ds.get("fp16", {}).get("enabled"):
        return "precision: fp16 (the DeepSpeed config enables it)"
    native, hw = native_bf16()
    asked = ds.get("bf16", {}).get("enabled", False)
    if cfg.precision == "fp32":
        ds["bf16"] = {"enabled": False}
        return f"precision: fp32 (--precision fp32{'; overrides the config bf16' if asked else ''})"
    if cfg.precision == "auto" and not native and not asked:
        return f"precision: fp32 ({hw}; --precision bf16 forces bf16)"
    if not native:
        print(f"warning: bf16 asked, but {hw}: it will run slower than fp32 (--precision fp32 is faster)",
              flush=True)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    cfg.distill.teacher_dtype = "bfloat16"
    src = "--precision bf16" if cfg.precision == "bf16" else ("the DeepSpeed config" if asked else hw)
    return f"precision: bf16, fp32 master weights ({src}; --precision fp32 forces fp32)"


@contextlib.contextmanager
def cache_lock(cache_dir):
    """One process at a time builds the embedded defaults and tokenizes (the others wait, then find them
    built). A file lock, not a collective: it holds across a build of many minutes, and the kernel releases
    it if its holder dies."""
    from iit_fast.cache import DEFAULT_CACHE
    root = Path(cache_dir or DEFAULT_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(cfg: TrainConfig):
    """Models and data, every check that reads a folder, before any process group forms: a bad teacher,
    student, alignment, max_length or corpus stops here with one `error:` line, and nothing is written."""
    from iit_fast import teacher as teacher_lib
    from iit_fast.sampling import make_alignment
    with cache_lock(cfg.cache_dir):
        path = cfg.teacher or teacher_lib.default_teacher_path(cfg.cache_dir, build_if_missing=True)
        teacher, student, tokenizer = build_models(cfg, path)
        tokenized = tokenize(cfg, tokenizer, teacher.kind)
    alignment = make_alignment(cfg.distill.alignment, teacher.num_layers, student.num_layers)
    cache = open_teacher_cache(cfg, path, teacher, tokenizer, tokenized, alignment) if cfg.teacher_cache else None
    return teacher, student, tokenizer, tokenized, alignment, cache


def open_teacher_cache(cfg: TrainConfig, teacher_path, teacher, tokenizer, tokenized, alignment):
    """The teacher cache, checked against this run (teacher, tokenizer, corpus, max_length, masking, plans:
    a difference is refused naming the field) and for missing or truncated shards, before any work."""
    from iit_fast.teacher_cache import CacheOptions, TeacherCache, run_fingerprint
    d = cfg.distill
    # a cache may hold the first N rows of the corpus only (--max_examples): the run checks those rows
    built = json.loads((Path(cfg.teacher_cache) / "cache.json").read_text()).get("fingerprint", {}) \
        if (Path(cfg.teacher_cache) / "cache.json").is_file() else {}
    opts = CacheOptions(max_length=cfg.max_length, logit_tokens=d.logit_tokens_for(teacher.kind),
                        alignment=d.alignment, student_layers=cfg.student_layers, span_fraction=d.span_fraction,
                        dims=d.dims, mlm_probability=cfg.mlm_probability, temperature=d.temperature,
                        max_examples=built.get("examples") if isinstance(built.get("examples"), int) else None)
    expect = run_fingerprint(teacher_path=teacher_path, tokenizer=tokenizer, tokenized_split=tokenized["train"],
                             opts=opts, alignment=alignment)
    return TeacherCache.open(cfg.teacher_cache, expect=expect)


def build_models(cfg: TrainConfig, teacher_path):
    """(teacher: frozen, eval; student; tokenizer): IntervenableLMs of one supported family, checked as a pair."""
    from iit_fast.models import check_same_tokenizer, init_student_from_teacher, IntervenableLM, load_model
    from iit_fast.step import check_pair
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    teacher, tokenizer = load_model(teacher_path, arg="--teacher")  # the family decides the objective
    max_pos = getattr(teacher.config, "max_position_embeddings", None)
    max_pos = max_pos or getattr(teacher.config, "n_positions", None)
    if max_pos is not None and cfg.max_length > max_pos - (2 if teacher.family == "roberta" else 0):
        raise ValueError(f"--max_length {cfg.max_length} is more than the teacher's positions ({max_pos}"
                         f"{', two of them reserved by RoBERTa' if teacher.family == 'roberta' else ''})")
    if cfg.student is None:
        torch.manual_seed(cfg.seed)
        student = IntervenableLM(init_student_from_teacher(teacher.model, cfg.student_layers))
    else:
        student, s_tok = load_model(cfg.student, kind=teacher.kind, arg="--student")
        check_same_tokenizer(tokenizer, s_tok, "--teacher", "--student")
        if student.vocab_size != teacher.vocab_size and cfg.distill.shared_vocab is None:
            # the same tokenizer, embeddings padded to different sizes: compare over the tokenizer's ids
            cfg.distill.shared_vocab = len(tokenizer)
    if cfg.dropout is not None:
        student.set_dropout(cfg.dropout)
    teacher = teacher.to(dtype=dtype[cfg.distill.teacher_dtype]).eval().requires_grad_(False)
    student.train()
    if cfg.distill.w_mse and student.hidden_size != teacher.hidden_size:
        student.attach_site_projection(teacher.hidden_size)
    check_pair(teacher, student, cfg.distill)
    return teacher, student, tokenizer


def tokenize(cfg: TrainConfig, tokenizer, kind: str):
    """Masked LMs: paragraphs packed into [CLS] p1 [SEP] p2 [SEP]...; causal LMs: documents packed into
    sequences of exactly max_length tokens, EOS between documents."""
    from iit_fast import corpus, data
    return data.tokenize_corpus(corpus.load_corpus(cfg.corpus, cfg.cache_dir), tokenizer, cfg.max_length,
                                cfg.num_proc, cfg.cache_dir, kind=kind)


def build_batches(cfg: TrainConfig, tokenized, tokenizer, kind: str, micro_batch: int, rank: int, world: int):
    """Rank-sharded training batches (a resumable DataLoader) and the validation batches: the first
    eval_sequences rows, each masked by its own seeded generator, the same on every rank and for any
    micro-batch, accumulation or world size."""
    from iit_fast import data
    from iit_fast.eval import EVAL_SEED
    train = data.build_train_loader(tokenized["train"], tokenizer, micro_batch, kind=kind, seed=cfg.seed,
                                    rank=rank, world_size=world, group_by_length=cfg.group_by_length,
                                    mlm_probability=cfg.mlm_probability, num_workers=cfg.num_workers)
    n_val = min(cfg.eval_sequences, len(tokenized["validation"]))
    val = data.validation_batches(tokenized["validation"], tokenizer, micro_batch, n_sequences=n_val,
                                  seed=EVAL_SEED, kind=kind, mlm_probability=cfg.mlm_probability)
    return train, val


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def plan_generator(seed: int, step: int, draw: int, rank: int) -> torch.Generator:
    """The intervention plan's randomness: a pure function of the position in the run (see docstring)."""
    import hashlib
    key = hashlib.sha256(f"plan|{seed}|{step}|{draw}|{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2 ** 63 - 1))


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil
    return psutil.Process().memory_info().rss / 2**20


@torch.no_grad()
def validate(model, batches, device) -> dict:
    """MLM perplexity / top-1 of an HF model on the validation batches (every rank, the same batches).
    A diverged model gives perplexity inf, not an OverflowError."""
    from iit_fast.eval import lm_metrics
    was = model.training
    model.eval()
    try:
        res = lm_metrics(model, [batch_to(b, device) for b in batches])
    except OverflowError:
        res = {"perplexity": float("inf"), "top1": float("nan")}
    model.train(was)
    return res


# ---- the run -------------------------------------------------------------------------------------

def fail(message: str, code: int = 2):
    """One line on stderr, no traceback, exit `code` (2: bad input, before any work)."""
    import sys
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv=None):
    try:
        cfg, ds, precision_note = check_inputs(argv)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        fail(str(e))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        from iit_fast.allocator import tune_malloc
        tune_malloc()  # glibc: keep freed blocks (a CPU step re-faults its memory otherwise)
    import logging
    import warnings
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")
    try:
        teacher, student, tokenizer, tokenized, alignment, cache = prepare(cfg)
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e))

    rank, world, device = init_distributed(cfg.rank_timeout)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    say(precision_note)
    out = make_out_dir(cfg, rank)
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    from iit_fast.sampling import sample_plan
    from iit_fast.step import DistillStep
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    train_batches, val_batches = build_batches(cfg, tokenized, tokenizer, teacher.kind, micro, rank, world)
    if cache is not None:  # whole (row, fixed partner) pairs with the cached masks and plans
        from iit_fast.cached_step import CacheBatches
        try:
            train_batches = CacheBatches(cache, micro, seed=cfg.seed, rank=rank, world_size=world)
        except ValueError as e:
            fail(f"--teacher_cache {cfg.teacher_cache}: {e}")
    if len(train_batches) == 0:
        fail(f"the training split gives no full batch of {micro} per rank on {world} ranks")
    if micro == 1 and cfg.distill.uses_iit:
        say("warning: micro-batch 1 with IIT: a row is its own source (the swap changes nothing); use a "
            "micro-batch of 2 or more")
    steps_per_epoch = len(train_batches) // accum
    max_steps = cfg.epochs * steps_per_epoch if cfg.epochs else cfg.max_steps
    dcfg = cfg.distill
    t_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    shard = cfg.shard_teacher == "yes" or (cfg.shard_teacher == "auto" and zero_stage(ds) == 3
                                           and t_bytes > SHARD_TEACHER_AUTO_BYTES)
    if cache is None:
        teacher = prepare_teacher(teacher.to(device), ds, shard)
        step_module = DistillStep(teacher, student, dcfg)
    else:  # the cache holds every teacher output the step needs: the teacher stays on the CPU, unused
        from iit_fast.cached_step import CachedDistillStep
        step_module = CachedDistillStep(student, dcfg)
    schedule = lambda opt: make_scheduler(opt, cfg.lr_schedule, cfg.warmup_steps, max_steps,  # noqa: E731
                                          cfg.min_lr / cfg.lr)
    engine = init_engine(ds, step_module, param_groups(student, cfg.weight_decay), cfg.lr, schedule)
    student = engine.module.student

    state = {"step": 0, "tokens": 0, "nonfinite": 0, "wall": 0.0}
    if cfg.resume:
        client, data_state, tag, note = load_checkpoint(engine, out, rank, world_size=world)
        if note:
            say(note)
        state.update(client.get("iit_fast", {}))
        train_batches.load_state_dict(data_state)
        say(f"resumed {out} at step {state['step']} (checkpoint {tag})")
    step = state["step"]
    if step >= max_steps:
        say(f"the run in {out} is complete (step {step} of {max_steps}); nothing to do")
        return
    metrics_path = out / "metrics.jsonl"
    if is_main:  # a resumed run drops what was logged after its checkpoint
        old = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        keep = [l for l in old if json.loads(l).get("step", 0) <= step]
        metrics_path.write_text("".join(l + "\n" for l in keep))
    metrics = open(metrics_path, "a") if is_main else None

    def log(rec):
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if engine.monitor.enabled:  # DeepSpeed's monitor: TensorBoard / CSV / W&B, as its config enables
            engine.monitor.write_events([(f"iit_fast/{k}", float(v), rec["step"]) for k, v in rec.items()
                                         if k != "step" and isinstance(v, (int, float))])

    say(f"teacher {teacher.num_layers} layers x {teacher.hidden_size}{' (sharded)' if shard else ''} -> student "
        f"{student.num_layers} layers ({param_count(student) / 1e6:.1f}M params) | {world} rank(s) on "
        f"{device.type}, ZeRO-{engine.zero_optimization_stage()}{', bf16' if engine.bfloat16_enabled() else ''} | "
        f"batch {micro} x {accum} accum x {world} = {micro * accum * world} x {cfg.max_length} tokens | "
        f"{max_steps} steps | mode {dcfg.mode} | out {out}")

    def run_validation(at_step):
        res = validate(student, val_batches, device)
        rec = {"step": at_step, "val_perplexity": res["perplexity"], "val_top1": res["top1"]}
        log(rec)
        return rec

    first_val = None
    if step == 0:
        first_val = run_validation(0)
        if cache is None:  # (with a cache: no teacher pass at all)
            teacher_val = validate(teacher, val_batches, device)
            log({"step": 0, "teacher_val_perplexity": teacher_val["perplexity"],
                 "teacher_val_top1": teacher_val["top1"]})
        say(f"validation at step 0: student perplexity {first_val['val_perplexity']:.1f}"
            + (f", teacher {teacher_val['perplexity']:.1f}" if cache is None else ""))

    def save(at_step):
        state["wall"] += time.perf_counter() - t_start
        state["step"] = at_step
        return save_checkpoint(engine, out, at_step, {"iit_fast": state}, train_batches.state_dict(), rank,
                               keep=cfg.keep_checkpoints or None)

    stop = StopSignal()  # from here on, Ctrl-C / SIGTERM save a checkpoint first (before: they just stop)
    from tqdm import tqdm
    bar = tqdm(total=max_steps, initial=step, disable=not is_main, dynamic_ncols=True, desc="distil")
    data_iter = iter(train_batches)
    names = [k for k in TERMS if getattr(dcfg, f"w_{k}") and (dcfg.uses_iit or k not in ("iit", "iit_cos"))]
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # loss, terms: over the interval
    n_sums, tok_log = 0, 0
    t_log = t_start = time.perf_counter()
    last_val, draw, stopped_by = first_val, 0, 0
    lr_used = engine.get_lr()[0]
    engine.train()
    while step < max_steps:
        try:
            batch = next(data_iter)
        except StopIteration:  # next epoch (the batches count epochs and reshuffle)
            data_iter = iter(train_batches)
            batch = next(data_iter)
        if cache is None:
            # the plan is drawn and checked on the CPU, from the CPU mask: no device sync
            plan = sample_plan(batch["attention_mask"], alignment, plan_generator(cfg.seed, step, draw, rank),
                               dcfg.span_fraction, dcfg.dims)
            tokens = int(batch["attention_mask"].sum())
            loss, terms = engine(batch_to(batch, device), plan.to(device))
        else:  # a cached batch carries its masks, pairs, plans and the teacher's top-k
            tokens = int(batch.batch["attention_mask"].sum())
            loss, terms = engine(batch.to(device))
        draw += 1
        # the one sync per micro-batch the step needs: the ranks agree on skipping it and on stopping
        flags = torch.stack([(~torch.isfinite(loss.detach())).double(),
                             torch.tensor(float(stop.signum != 0), dtype=torch.float64, device=device)])
        flags = all_reduce_sum(flags).tolist()
        if flags[0] > 0:  # some rank's loss is not finite: all skip this micro-batch
            state["nonfinite"] += 1
            bar.write(f"step {step}: non-finite loss on {int(flags[0])} rank(s), skipped "
                      f"({state['nonfinite']}/{cfg.max_nonfinite})") if is_main else None
            if state["nonfinite"] >= cfg.max_nonfinite:
                stop_on_error(cfg, state, save, bar, metrics)
            continue
        if flags[1] > 0 and not stopped_by:  # a signal reached some rank: all stop at this step's end
            stopped_by = stop.signum or signal.SIGTERM
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            lr_used = engine.get_lr()[0]  # the lr this optimizer step uses (the scheduler moves after it)
        skipped_before = engine.skipped_steps
        engine.step()
        sums += torch.stack([loss.detach().double()] + [terms[k].double() for k in names])
        n_sums += 1
        tok_log += tokens
        if engine.global_steps == step:  # inside gradient accumulation
            continue

        # ---- an optimizer step is done (or DeepSpeed skipped it: an overflow counts as non-finite)
        step, draw = engine.global_steps, 0
        if engine.skipped_steps > skipped_before:
            state["nonfinite"] += 1
            bar.write(f"step {step}: DeepSpeed skipped the optimizer step (gradient overflow) "
                      f"({state['nonfinite']}/{cfg.max_nonfinite})") if is_main else None
            if state["nonfinite"] >= cfg.max_nonfinite:
                stop_on_error(cfg, state, save, bar, metrics)
        bar.update(1)
        if step % cfg.log_interval == 0 or step == max_steps:
            # one all-reduce per log interval: the terms' sums and the tokens of every rank
            red = all_reduce_sum(torch.cat([sums, torch.tensor([float(tok_log)], dtype=torch.float64,
                                                               device=device)])).tolist()
            now = time.perf_counter()
            interval_tokens = int(red[-1])
            state["tokens"] += interval_tokens
            tps = interval_tokens / (now - t_log)
            mean = [v / (n_sums * world) for v in red[:-1]]
            gn = engine.get_global_grad_norm()
            rec = {"step": step, "loss": mean[0], **dict(zip(names, mean[1:])), "lr": lr_used,
                   "grad_norm": None if gn is None else float(gn), "tokens_per_s": tps,
                   "tokens": state["tokens"], "memory_mb": memory_mb(device), "nonfinite": state["nonfinite"]}
            log(rec)
            bar.set_postfix_str(f"loss {mean[0]:.3f} | {tps:,.0f} tok/s")
            sums.zero_()
            n_sums, tok_log, t_log = 0, 0, now
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < max_steps:
            last_val = run_validation(step)
            bar.write(f"step {step}: val perplexity {last_val['val_perplexity']:.1f}") if is_main else None
        state["step"] = step
        if stopped_by or (cfg.save_interval and step % cfg.save_interval == 0 and step < max_steps):
            path = save(step)
            t_start = time.perf_counter()
            if stopped_by:
                bar.close()
                say(f"{signal.Signals(stopped_by).name}: saved {path}; continue with the same flags and "
                    f"--out_dir {out} --resume")
                if metrics:
                    metrics.close()
                raise SystemExit(128 + int(stopped_by))
    bar.close()

    # ---- the end: validation, checkpoint, export, plots, summary
    state["step"] = step
    last_val = run_validation(step)
    ckpt = save(step)
    export_student(engine, tokenizer, out / "student", rank)
    if metrics:
        metrics.close()
    if is_main:
        records = [json.loads(l) for l in metrics_path.read_text().splitlines()]
        if cfg.plots:
            write_plots(records, out)
        print_summary(records, state, last_val, out, ckpt)
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def stop_on_error(cfg, state, save, bar, metrics):
    """Too many skipped steps: the weights are the last good ones (a skipped step applies nothing), so save
    them and stop with an error that says where they are."""
    bar.close()
    path = save(state["step"])
    if metrics:
        metrics.close()
    fail(f"stopping: {state['nonfinite']} skipped steps (non-finite loss or gradient overflow; max_nonfinite="
         f"{cfg.max_nonfinite}); the last good state is saved in {path}. Lower --lr, check the data, or use fp32",
         code=1)


def make_out_dir(cfg: TrainConfig, rank: int) -> Path:
    import torch.distributed as dist
    out = Path(cfg.out_dir or broadcast(time.strftime("runs/%Y%m%d-%H%M%S", time.gmtime()), rank))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    dist.barrier()
    return out


def write_plots(records, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in ("loss",) + TERMS:
        pts = [(r["step"], r[k]) for r in steps if k in r]
        if pts:
            ax.plot(*zip(*pts), label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("step"), ax.set_ylabel("loss term"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out / "loss.png", dpi=120), plt.close(fig)
    vals = [(r["step"], r["val_perplexity"]) for r in records if "val_perplexity" in r]
    teacher = [r["teacher_val_perplexity"] for r in records if "teacher_val_perplexity" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if vals:
        ax.plot(*zip(*vals), marker="o", label="student")
    if teacher:
        ax.axhline(teacher[0], color="gray", ls="--", label="teacher")
    ax.set_xlabel("step"), ax.set_ylabel("validation perplexity"), ax.set_yscale("log"), ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out / "val.png", dpi=120), plt.close(fig)


def print_summary(records, state, last_val, out: Path, ckpt: Path):
    steps = [r for r in records if "loss" in r]
    tail = steps[-10:]
    tps = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    vals = [r for r in records if "val_perplexity" in r]
    teacher = next((r for r in records if "teacher_val_perplexity" in r), None)
    rows = [("steps", f"{state['step']}"), ("tokens", f"{state['tokens']:,}"),
            ("wall time (train)", f"{state['wall']:.0f} s"),
            ("tokens/s (median)", f"{sorted(tps)[len(tps) // 2]:,.0f}" if tps else "-")]
    for k in ("loss",) + TERMS:
        if tail and k in tail[-1]:
            first = steps[0][k]
            rows.append((f"{k} (first -> last 10 mean)", f"{first:.4f} -> {sum(r[k] for r in tail) / len(tail):.4f}"))
    if vals:
        rows.append(("val perplexity", f"{vals[0]['val_perplexity']:.1f} -> {last_val['val_perplexity']:.1f}"))
        rows.append(("val top-1", f"{vals[0]['val_top1']:.3f} -> {last_val['val_top1']:.3f}"))
    if teacher:
        rows.append(("teacher val perplexity", f"{teacher['teacher_val_perplexity']:.1f}"))
    rows += [("non-finite steps skipped", str(state["nonfinite"])), ("metrics", str(out / "metrics.jsonl")),
             ("checkpoint", str(ckpt)), ("student (HF)", str(out / "student"))]
    if (out / "loss.png").exists():
        rows.append(("plots", f"{out / 'loss.png'}, {out / 'val.png'}"))
    w = max(len(a) for a, _ in rows)
    print("\n" + "-" * (w + 40))
    for a, b in rows:
        print(f"{a:<{w}}  {b}")
    print("-" * (w + 40), flush=True)


if __name__ == "__main__":
    main()
