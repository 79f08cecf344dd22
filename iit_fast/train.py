"""Causal distillation (DIITO) of a masked LM under DeepSpeed, with the fast step (DESIGN.md section 5).

    # the default run: embedded teacher (built offline on first use), embedded corpus, a 3-layer student;
    # about 10 minutes on 2 CPU cores (one process per NUMA node: one here)
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

It prints (rank 0) one line about the run, the teacher's and the student's validation perplexity, a
progress bar (loss, tokens/s, ETA), and at the end a summary table. It writes, under --out_dir (default
runs/<UTC timestamp>): train_config.json, metrics.jsonl (one JSON object per step: every loss term, lr,
grad norm, tokens/s, memory; one per validation), checkpoints/ (DeepSpeed's save_checkpoint, with the
data position and every rank's RNG states), student/ (the final student as a Hugging Face folder:
consolidated fp32 safetensors + tokenizer), loss.png and val.png. SIGINT / SIGTERM save a checkpoint at
the end of the current step and exit (128 + signal); a non-finite loss skips its micro-batch on every rank,
and --max_nonfinite of them stop the run with an error.

Choices worth knowing:
- Batch size and gradient accumulation come from the DeepSpeed config (train_micro_batch_size_per_gpu,
  gradient_accumulation_steps, train_batch_size); a mismatch is an error that names the fields.
- The first run builds the embedded default teacher (python -m iit_fast.teacher build, ~15 minutes on 2
  cores) and corpus once, into the cache (--cache_dir); the 10 minutes are the distillation run itself.
- The teacher is never given to DeepSpeed: a plain frozen module, eval(), no grad, on every rank. Under
  ZeRO-3 I do not use zero.Init, so it is neither partitioned nor gathered: one copy per rank, as with
  ZeRO-0..2 (at the sizes this project targets the teacher fits; the student is what ZeRO shards).
- The intervention plan of every micro-batch comes from a torch.Generator seeded by (seed, step, draw,
  rank): per rank, since each rank holds different rows. It is a pure function of the position in the
  run, so resuming restores it exactly without saving any generator state.
- On CPU: gloo, torch AdamW (no DeepSpeed C++ op is built: the shared-memory all-reduce op is switched
  off, so nothing is compiled and nothing is left in /dev/shm); on GPU: nccl, fused torch AdamW.
- Loading is safe: weights through safetensors; every file of a checkpoint is first opened with
  torch.load(weights_only=True) before DeepSpeed reads it; configs are plain JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from iit_fast.checkpoint import export_student, latest_tag, load_checkpoint, save_checkpoint
from iit_fast.config import DistillConfig

REPO = Path(__file__).resolve().parent.parent
TERMS = ("ce", "mlm", "cos", "iit", "iit_cos", "mse")
SCHEDULES = ("linear", "cosine", "constant")
# fields that may differ between a run and its --resume (they do not change what is computed)
RESUME_MAY_CHANGE = {"resume", "max_steps", "epochs", "eval_interval", "eval_batches", "save_interval",
                     "log_interval", "plots", "num_proc", "max_nonfinite", "out_dir", "cache_dir"}


@dataclass
class TrainConfig:
    # what is distilled into what
    teacher: str | None = None        # HF folder of a BertForMaskedLM; None = the embedded default teacher
    student: str | None = None        # HF folder to start the student from; None = init from the teacher
    student_layers: int = 3           # blocks of a student initialised from the teacher
    corpus: str | None = None         # load_corpus spec; None = the embedded default corpus
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
    max_nonfinite: int = 10           # stop after this many skipped non-finite losses
    # bookkeeping
    eval_interval: int = 20           # steps between validations (and one at the start and the end)
    eval_batches: int = 10            # validation micro-batches per validation
    save_interval: int = 0            # steps between checkpoints; 0 = only at the end (and on SIGINT/TERM)
    log_interval: int = 1             # steps between metrics lines
    out_dir: str | None = None        # default runs/<UTC timestamp>
    resume: bool = False              # continue the run in out_dir from its latest checkpoint
    seed: int = 0
    deepspeed_config: str = "ds_configs/zero2.json"
    cache_dir: str | None = None      # where the default teacher is built / found
    num_proc: int = 1                 # tokenisation processes
    group_by_length: bool = True      # batches of similar lengths (less padding)
    plots: bool = True
    distill: DistillConfig = field(default_factory=DistillConfig)  # flags: every DistillConfig field

    def __post_init__(self):
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
        positive = ("student_layers", "max_length", "log_interval", "eval_batches", "max_nonfinite")
        for f in positive:
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("max_steps", "epochs", "warmup_steps", "eval_interval", "save_interval", "num_proc"):
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


def find_file(path: str) -> Path:
    """A path as given, or relative to the repository (so ds_configs/... works from any directory)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO / p if (REPO / p).exists() else p


def load_ds_config(path: str, world_size: int) -> dict:
    """Read the DeepSpeed config and make its three batch fields agree (error names them if they can't)."""
    p = find_file(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found")
    ds = json.loads(p.read_text())
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    if micro is None and total is None:
        raise ValueError(f"{p}: set train_micro_batch_size_per_gpu (and optionally gradient_accumulation_steps, "
                         "train_batch_size)")
    if micro is None:
        accum = accum or 1
        if total % (accum * world_size):
            raise ValueError(f"{p}: train_batch_size={total} is not divisible by gradient_accumulation_steps="
                             f"{accum} x world size {world_size}")
        micro = total // (accum * world_size)
    if accum is None:
        accum = 1 if total is None else total // (micro * world_size)
    if total is None:
        total = micro * accum * world_size
    if micro < 1 or accum < 1 or total != micro * accum * world_size:
        raise ValueError(f"{p}: train_batch_size ({total}) must equal train_micro_batch_size_per_gpu ({micro}) "
                         f"x gradient_accumulation_steps ({accum}) x world size ({world_size}) = "
                         f"{micro * accum * world_size}")
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, train_batch_size=total)
    opt = ds.get("optimizer")
    if opt and not torch.cuda.is_available() and not opt.get("params", {}).get("torch_adam", False):
        raise ValueError(f"{p}: on CPU an 'optimizer' block needs params.torch_adam = true (DeepSpeed's own "
                         "Adam would compile a C++ op); or leave 'optimizer' out and train.py uses torch AdamW")
    return ds


# ---- processes ---------------------------------------------------------------------------------

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Join (or, with no launcher, form) the process group: nccl on GPUs, gloo on CPU."""
    import deepspeed
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed's CPU backend would compile a shared-memory all-reduce op at the first launch (a minute
        # of C++ build) and leave buffers in /dev/shm; gloo's own all-reduce is enough at this scale.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:  # before the process group, so nccl binds each rank to its own GPU
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between this machine's ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


def broadcast(obj, rank):
    import torch.distributed as dist
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class StopSignal:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._set)

    def _set(self, signum, frame):
        self.signum = signum


# ---- out_dir and checkpoints ---------------------------------------------------------------------

def check_out_dir(cfg: TrainConfig) -> str | None:
    """Why out_dir can't be used (None if it can): it must be new or empty, or, with --resume, hold a run of
    the same config with a checkpoint. Every rank checks before the process group forms, so no rank has
    written anything yet when another looks."""
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
            return (f"--resume: the config differs from the run in {out}: "
                    + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff))
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        names = sorted(p.name for p in out.iterdir())[:5] if out.is_dir() else []
        return (f"out_dir {out} already holds another run ({', '.join(names)}); nothing was overwritten: "
                "pass --resume to continue it, or choose another --out_dir")
    return None


def make_out_dir(cfg: TrainConfig, rank: int) -> Path:
    import torch.distributed as dist
    out = Path(cfg.out_dir or broadcast(time.strftime("runs/%Y%m%d-%H%M%S", time.gmtime()), rank))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    dist.barrier()
    return out


# ---- models, data, optimizer ---------------------------------------------------------------------

def build_models(cfg: TrainConfig, rank: int, device):
    """(teacher IntervenableMLM: frozen, eval, not for DeepSpeed; student IntervenableMLM; tokenizer)."""
    import torch.distributed as dist
    from transformers import AutoModelForMaskedLM
    from iit_fast.models import IntervenableMLM, init_student_from_teacher
    from iit_fast import teacher as teacher_lib
    if cfg.teacher is None:
        if rank == 0:  # build the embedded default once, the other ranks wait for it
            teacher_lib.default_teacher_path(cfg.cache_dir, build_if_missing=True)
        dist.barrier()
        path = teacher_lib.default_teacher_path(cfg.cache_dir, build_if_missing=False)
    else:
        path = cfg.teacher
    t_hf, tokenizer = teacher_lib.load_teacher(path)
    if cfg.student is None:
        torch.manual_seed(cfg.seed)
        s_hf = init_student_from_teacher(t_hf, cfg.student_layers)
    else:
        s_hf = AutoModelForMaskedLM.from_pretrained(cfg.student, use_safetensors=True)
    if cfg.dropout is not None:
        s_hf.config.hidden_dropout_prob = s_hf.config.attention_probs_dropout_prob = cfg.dropout
        for m in s_hf.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    teacher = IntervenableMLM(t_hf).eval().to(device=device, dtype=dtype[cfg.distill.teacher_dtype])
    teacher.requires_grad_(False)
    student = IntervenableMLM(s_hf).train()
    if cfg.distill.w_mse and student.hidden_size != teacher.hidden_size:
        student.attach_site_projection(teacher.hidden_size)
    return teacher, student, tokenizer


def build_data(cfg: TrainConfig, tokenizer, micro_batch: int, rank: int, world: int):
    """Rank-sharded training batches and the (same on every rank) validation batches."""
    import torch.distributed as dist
    from iit_fast import data
    def tokenized():
        return data.tokenize_corpus(data.load_corpus(cfg.corpus, cfg.cache_dir), tokenizer, cfg.max_length,
                                    cfg.num_proc, cfg.cache_dir)
    if rank == 0:  # build and tokenise once; the other ranks then read the cache
        tok = tokenized()
    dist.barrier()
    if rank != 0:
        tok = tokenized()
    train = data.MLMBatches(tok["train"], tokenizer, micro_batch, seed=cfg.seed, shuffle=True,
                            group_by_length=cfg.group_by_length, mlm_probability=cfg.mlm_probability,
                            drop_last=True, rank=rank, world_size=world)
    val = data.MLMBatches(tok["validation"], tokenizer, micro_batch, seed=cfg.seed, shuffle=False,
                          group_by_length=False, mlm_probability=cfg.mlm_probability, drop_last=False,
                          rank=0, world_size=1)
    if len(train) == 0:
        raise ValueError(f"the training split gives no full batch of {micro_batch} per rank on {world} ranks")
    return train, val


def lr_lambda(cfg: TrainConfig, max_steps: int):
    def f(step):  # multiplier of cfg.lr after `step` optimizer steps
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        floor = cfg.min_lr / cfg.lr
        if cfg.lr_schedule == "constant":
            return 1.0
        decay = 1 - frac if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        return floor + (1 - floor) * decay
    return f


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "LayerNorm" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_engine(cfg: TrainConfig, ds: dict, student, max_steps: int):
    import deepspeed
    groups = param_groups(student, cfg.weight_decay)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, max_steps))  # noqa: E731
    if "optimizer" in ds:  # the config's own optimizer (its lr is replaced by ours)
        ds["optimizer"].setdefault("params", {})["lr"] = cfg.lr
        engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=groups, config=ds,
                                               lr_scheduler=sched)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                fused=torch.cuda.is_available() and "offload_optimizer" not in
                                ds.get("zero_optimization", {}))
        engine, _, _, _ = deepspeed.initialize(model=student, optimizer=opt, config=ds, lr_scheduler=sched)
    if engine.zero_optimization_stage() == 3:
        # the loss module reads the tied decoder weight and bias without calling the decoder module:
        # tell ZeRO-3 to gather them for it
        m = engine.module
        deepspeed.zero.register_external_parameter(m.lm_loss, m.decoder_weight)
        deepspeed.zero.register_external_parameter(m.lm_loss, m.decoder_bias)
    return engine


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def plan_generator(seed: int, step: int, draw: int, rank: int) -> torch.Generator:
    """The intervention plan's randomness: a pure function of the position in the run (see docstring)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 * 64 + draw * 64 + rank % 64)


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil
    return psutil.Process().memory_info().rss / 2**20


@torch.no_grad()
def validate(model, batches, n, device):
    """MLM perplexity / top-1 of an HF model on the first n validation batches (every rank, same batches)."""
    from iit_fast import data, teacher
    evaluate_mlm = getattr(data, "evaluate_mlm", None) or teacher.evaluate_mlm
    was = model.training
    model.eval()
    res = evaluate_mlm(model, _OnDevice(batches, device), n)
    model.train(was)
    return res


class _OnDevice:
    def __init__(self, batches, device):
        self.batches, self.device = batches, device

    def __iter__(self):  # the same batches, the same masks, at every validation
        self.batches.load_state_dict({"epoch": 0, "batch_index": 0})
        return (batch_to(b, self.device) for b in self.batches)

    def __len__(self):
        return len(self.batches)


# ---- the run -------------------------------------------------------------------------------------

def check_inputs(argv):
    """Everything that can be checked before any process group forms: config, DeepSpeed config, paths."""
    cfg = parse_args(argv)
    for name in ("teacher", "student"):
        path = getattr(cfg, name)
        if path is not None and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"--{name} {path}: not a Hugging Face model folder (no config.json there)")
    ds = load_ds_config(cfg.deepspeed_config, int(os.environ.get("WORLD_SIZE", 1)))
    err = check_out_dir(cfg)
    if err:
        raise FileExistsError(err)
    return cfg, ds


def main(argv=None):
    try:
        cfg, ds = check_inputs(argv)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
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

    rank, world, device = init_distributed()
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    out = make_out_dir(cfg, rank)
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    from iit_fast.sampling import make_alignment, sample_plan
    from iit_fast.step import distill_step

    teacher, student, tokenizer = build_models(cfg, rank, device)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    train_batches, val_batches = build_data(cfg, tokenizer, micro, rank, world)
    steps_per_epoch = len(train_batches) // accum
    max_steps = cfg.epochs * steps_per_epoch if cfg.epochs else cfg.max_steps
    alignment = make_alignment(cfg.distill.alignment, teacher.num_layers, student.num_layers)
    engine = init_engine(cfg, ds, student, max_steps)
    dcfg = cfg.distill

    state = {"step": 0, "tokens": 0, "nonfinite": 0, "wall": 0.0}
    if cfg.resume:
        state.update(load_checkpoint(engine, out, train_batches, rank).get("iit_fast", {}))
        say(f"resumed {out} at step {state['step']}")
    step = state["step"]
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

    n_params = sum(p.numel() for p in student.parameters())
    say(f"teacher {teacher.num_layers} layers x {teacher.hidden_size} -> student {student.num_layers} layers "
        f"({n_params / 1e6:.1f}M params) | {world} rank(s) on {device.type}, ZeRO-{engine.zero_optimization_stage()}"
        f"{', bf16' if engine.bfloat16_enabled() else ''} | batch {micro} x {accum} accum x {world} = "
        f"{micro * accum * world} x {cfg.max_length} tokens | {max_steps} steps | mode {dcfg.mode} | out {out}")

    def run_validation(at_step):
        res = validate(engine.module.model, val_batches, cfg.eval_batches, device)
        rec = {"step": at_step, "val_perplexity": res["perplexity"], "val_top1": res["top1"]}
        log(rec)
        return rec

    first_val = teacher_val = None
    if step == 0:
        teacher_val = validate(teacher.model, val_batches, cfg.eval_batches, device)
        first_val = run_validation(0)
        log({"step": 0, "teacher_val_perplexity": teacher_val["perplexity"], "teacher_val_top1": teacher_val["top1"]})
        say(f"validation at step 0: student perplexity {first_val['val_perplexity']:.1f}, teacher "
            f"{teacher_val['perplexity']:.1f}")

    stop = StopSignal()  # from here on, Ctrl-C / SIGTERM save a checkpoint first (before: they just stop)
    from tqdm import tqdm
    bar = tqdm(total=max_steps, initial=step, disable=not is_main, dynamic_ncols=True, desc="distil")
    data_iter = iter(train_batches)
    names = None
    sums = None  # per step: [loss, terms..., tokens, micro-batches]
    t_log, tok_log = time.perf_counter(), 0.0
    t_start = time.perf_counter()
    last_val = first_val
    draw = 0
    stopped_by = 0
    engine.train()
    while step < max_steps:
        try:
            batch = next(data_iter)
        except StopIteration:  # next epoch (MLMBatches counts epochs and reshuffles)
            data_iter = iter(train_batches)
            batch = next(data_iter)
        batch = batch_to(batch, device)
        plan = sample_plan(batch["attention_mask"], alignment, plan_generator(cfg.seed, step, draw, rank),
                           dcfg.span_fraction, dcfg.dims)
        draw += 1
        out_step = distill_step(teacher, engine.module, batch, plan, dcfg)
        if names is None:
            names = [k for k in TERMS if k in out_step.terms]
        finite = bool(torch.isfinite(out_step.loss).item())
        # one small all-reduce per micro-batch: the ranks agree on skipping and on stopping
        vals = [float(not finite), float(stop.signum != 0), out_step.tokens,
                out_step.loss.item() if finite else 0.0] + [out_step.terms[k].item() if finite else 0.0 for k in names]
        red = all_sum(vals, device)
        if red[0] > 0:  # some rank's loss is not finite: all skip this micro-batch
            state["nonfinite"] += 1
            bar.write(f"step {step}: non-finite loss on {int(red[0])} rank(s), skipped "
                      f"({state['nonfinite']}/{cfg.max_nonfinite})") if is_main else None
            if state["nonfinite"] >= cfg.max_nonfinite:
                raise SystemExit(f"error: stopping: {state['nonfinite']} non-finite losses (max_nonfinite="
                                 f"{cfg.max_nonfinite}); lower --lr, check the data, or use fp32")
            continue
        if red[1] > 0 and not stopped_by:  # a signal reached some rank: all stop at this step's end
            stopped_by = stop.signum or signal.SIGTERM
        engine.backward(out_step.loss)
        engine.step()
        row = [red[3] / world] + [v / world for v in red[4:]] + [red[2], 1.0]
        sums = row if sums is None else [a + b for a, b in zip(sums, row)]
        if engine.global_steps == step:  # inside gradient accumulation
            continue

        # ---- an optimizer step is done
        step, draw = engine.global_steps, 0
        n_micro = sums[-1]
        tokens = sums[-2]
        state["tokens"] += int(tokens)
        tok_log += tokens
        loss = sums[0] / n_micro
        terms = {k: sums[1 + i] / n_micro for i, k in enumerate(names)}
        sums = None
        bar.update(1)
        if step % cfg.log_interval == 0 or step == max_steps:
            now = time.perf_counter()
            tps = tok_log / (now - t_log)
            t_log, tok_log = now, 0.0
            gn = engine.get_global_grad_norm()
            rec = {"step": step, "loss": loss, **terms, "lr": engine.get_lr()[0],
                   "grad_norm": None if gn is None else float(gn), "tokens_per_s": tps,
                   "tokens": state["tokens"], "memory_mb": memory_mb(device), "nonfinite": state["nonfinite"]}
            log(rec)
            bar.set_postfix_str(f"loss {loss:.3f} | {tps:,.0f} tok/s")
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < max_steps:
            last_val = run_validation(step)
            bar.write(f"step {step}: val perplexity {last_val['val_perplexity']:.1f}") if is_main else None
        state["step"] = step
        if stopped_by or (cfg.save_interval and step % cfg.save_interval == 0 and step < max_steps):
            state["wall"] += time.perf_counter() - t_start
            t_start = time.perf_counter()
            path = save_checkpoint(engine, out, step, {"iit_fast": state}, train_batches, rank)
            if stopped_by:
                bar.close()
                say(f"{signal.Signals(stopped_by).name}: saved {path}; continue with the same flags and "
                    f"--out_dir {out} --resume")
                if metrics:
                    metrics.close()
                raise SystemExit(128 + int(stopped_by))
    bar.close()

    # ---- the end: validation, checkpoint, export, plots, summary
    state["wall"] += time.perf_counter() - t_start
    state["step"] = step
    last_val = run_validation(step)
    ckpt = save_checkpoint(engine, out, step, {"iit_fast": state}, train_batches, rank)
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
    ax.set_xlabel("step"), ax.set_ylabel("validation MLM perplexity"), ax.set_yscale("log"), ax.legend()
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
