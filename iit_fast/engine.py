"""DeepSpeed and the process group: every scale-out concern of the main job, in one place.

- `read_ds_config(path, world_size)`: the DeepSpeed config, checked before any work (JSON, misspelled keys,
  the `zero_optimization` section against DeepSpeed's own schema, batch fields, precision support).
- `init_distributed()`: join (or, with no launcher, form) the process group: nccl on GPUs, gloo on CPU.
- `init_engine(...)`: the student's engine around `step.DistillStep`, so that every micro-batch goes
  through `engine(batch, plan)` -> `engine.backward(loss)` -> `engine.step()`: DeepSpeed's forward runs
  (ZeRO-3 counts its micro-steps there; skipping it makes each micro-batch's gradient overwrite the last).
- The teacher's plan (`read_teacher_ds_config`, `teacher_plan`, `build_teacher`): the frozen teacher is
  either replicated (loaded once per rank, in the run's precision, straight onto the device) or a ZeRO-3
  inference engine (no optimizer; TRL's `prepare_deepspeed` recipe) whose parameters are partitioned
  across ranks *as it is built* (models.partitioned.load_partitioned) and gathered block by block as it runs.
  Its ZeRO-3 settings are the student's (--shard_teacher, when the student runs ZeRO-3) or its own
  (--teacher_deepspeed_config: e.g. offload_param to CPU, with a student under ZeRO-0/1/2/3). The step
  reads the teacher's tied decoder weight directly (not through a module call): `step.head_losses`
  gathers it explicitly.
"""
from __future__ import annotations

import difflib
import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from .models.load import load_weights
from .models.partitioned import load_partitioned
from .optim import make_optimizer

REPO = Path(__file__).resolve().parent.parent

# DeepSpeed's top-level config keys (its sections; scalar keys come from deepspeed.runtime.constants).
_DS_SECTIONS = {
    "zero_optimization", "optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast", "activation_checkpointing",
    "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "aio", "compression_training",
    "data_efficiency", "curriculum_learning", "elasticity", "autotuning", "nebula", "pipeline", "sparse_attention",
    "checkpoint", "weight_quantization", "hybrid_engine", "compile", "timers", "data_types", "eigenvalue",
    "progressive_layer_drop", "quantize_training", "sequence_parallel_size", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "communication_data_type", "seq_parallel_communication_data_type",
    "gradient_clipping", "graph_harvesting", "use_node_local_storage", "dataloader_drop_last", "dump_state",
    "memory_breakdown", "wall_clock_breakdown", "steps_per_print", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "disable_allgather", "train_batch_size",
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "vocabulary_size", "expert_parallel",
    "tensor_parallel", "mics_shard_size", "mics_hierarchical_params_gather", "load_universal_checkpoint",
    "use_data_before_expert_parallelism", "deepcompile", "checkpoint_parallel_write_pipeline", "fp32",
}


def _known_ds_keys() -> set[str]:
    import deepspeed.runtime.constants as C  # lazy: deepspeed is heavy
    return _DS_SECTIONS | {v for k, v in vars(C).items() if k.isupper() and isinstance(v, str) and v.islower()
                           and " " not in v and "/" not in v}


def find_file(path: str) -> Path:
    """A path as given, or relative to the repository (so ds_configs/... works from any directory)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO / p if (REPO / p).exists() else p


def _read_ds_json(path: str, flag: str) -> tuple[Path, str, dict]:
    """(file, "<flag> <file>" for the errors, its settings): a file that exists and holds a JSON object whose
    every top-level key DeepSpeed knows (a near miss is named). Errors name the flag, the file and the key."""
    p = find_file(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    where = f"{flag} {p}"
    try:
        ds = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"{where}: expected a JSON object of DeepSpeed settings")
    known = _known_ds_keys()
    for key in ds:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f"; did you mean {near[0]!r}?" if near else " (not a DeepSpeed setting this version knows)"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
    return p, where, ds


def _check_zero_section(zero: dict, where: str) -> None:
    """A `zero_optimization` section checked against DeepSpeed's own schema (pydantic, extra keys forbidden)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # lazy: deepspeed is heavy
    try:
        DeepSpeedZeroConfig(**zero)
    except Exception as e:  # pydantic's ValidationError: name the offending key
        first = str(e).splitlines()
        raise ValueError(f"{where}: zero_optimization: {' '.join(first[1:3]).strip()}") from None


def read_ds_config(path: str, world_size: int) -> dict:
    """Read and check the DeepSpeed config; make its three batch fields agree. Errors name the file and key."""
    p, where, ds = _read_ds_json(path, "--deepspeed_config")
    if "zero_optimization" in ds:  # DeepSpeed's own schema, checked now
        _check_zero_section(ds["zero_optimization"], where)
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
    if ds.get("fp16", {}).get("enabled"):
        if not torch.cuda.is_available():
            raise ValueError(f"{p}: fp16 is enabled, but this machine has no GPU and the CPU has no fp16 "
                             "training path; use a *_bf16.json config (bf16 needs no loss scaling) or fp32")
        if ds["fp16"].get("loss_scale", 0) == 1 and not ds["fp16"].get("dynamic_loss_scale", False):
            raise ValueError(f"{p}: fp16 without loss scaling (loss_scale 1) underflows gradients; use bf16, or "
                             "fp16 with dynamic loss scaling (loss_scale 0)")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# ---- processes -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float):
    """Join (or, with no launcher, form) the process group: nccl on GPUs, gloo on CPU.

    `timeout_s` bounds every collective, on every process group made from here on: a rank that stops
    responding makes the others fail with an error after that long instead of DeepSpeed's default 10 minutes
    (or torch's 30 for groups made later); a rank that dies is noticed at once."""
    import deepspeed  # lazy: heavy (its import pulls in its ops and accelerator)
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
    timeout = timedelta(seconds=timeout_s)
    # The timeout given to init_process_group holds for the default group only: torch gives every group made
    # later its module default (30 min on gloo), and DeepSpeed's gradient all-reduces run on such a group (a
    # copy of the world group, deepspeed.utils.groups._clone_world_group). Make ours the default for them too.
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if not hasattr(distributed_c10d, name):
            raise RuntimeError(f"torch.distributed.distributed_c10d.{name} is gone in torch {torch.__version__}: "
                               "--rank_timeout would not reach DeepSpeed's process groups; update init_distributed")
        setattr(distributed_c10d, name, timeout)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
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
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


# ---- engines -------------------------------------------------------------------------------------

def init_engine(ds: dict, step_module, optimizer_groups, lr: float, scheduler_fn):
    """The student's DeepSpeed engine around `step_module` (a `step.DistillStep`)."""
    import deepspeed  # lazy: heavy
    if "optimizer" in ds:  # the config's own optimizer (its lr is replaced by ours)
        ds["optimizer"].setdefault("params", {})["lr"] = lr
        engine, _, _, _ = deepspeed.initialize(model=step_module, model_parameters=optimizer_groups, config=ds,
                                               lr_scheduler=scheduler_fn)
    else:
        offload = "offload_optimizer" in ds.get("zero_optimization", {})
        # fused on GPUs; not with an offloaded optimizer (its states live on the CPU) nor on CPU ranks, where
        # the loop kernel is what every committed figure and resume test used
        opt = make_optimizer(optimizer_groups, lr, fused=torch.cuda.is_available() and not offload)
        engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=opt, config=ds,
                                               lr_scheduler=scheduler_fn)
    if engine.zero_optimization_stage() == 3:
        # the step reads the tied decoder weight and bias directly (ops.distill_head_loss, not through the
        # decoder module): registered with the step module, ZeRO-3 gathers them at its forward and again at
        # its backward (the head loss's backward recomputes the logits from the weight), as DeepSpeed's docs
        # prescribe for a parameter used outside its module
        student = engine.module.student
        deepspeed.zero.register_external_parameter(engine.module, student.decoder_weight)
        if student.decoder_bias is not None:
            deepspeed.zero.register_external_parameter(engine.module, student.decoder_bias)
    return engine


# ---- the teacher's plan --------------------------------------------------------------------------

TEACHER_SHARD_AUTO_BYTES = 2 ** 30  # --shard_teacher auto partitions a teacher above this (student ZeRO-3)
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def has_native_bf16() -> tuple[bool, str]:
    """(does this machine compute in bf16 at all, what it has): a GPU's bf16 support, a CPU's bf16
    instructions (avx512_bf16 / amx_bf16). Whether bf16 *pays* is precision.py's question, not this one."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {torch.cuda.get_device_name()} {'has' if ok else 'has no'} bf16"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return bool(found), (f"the CPU has {found[0]}" if found else "the CPU has neither avx512_bf16 nor amx_bf16")


def read_teacher_ds_config(path: str, student_ds: dict, teacher_dtype: str) -> dict:
    """--teacher_deepspeed_config: the teacher's own plan, checked before any work. It must be a ZeRO-3
    inference plan (zero_optimization.stage 3; offload_param to CPU or not) with no optimizer, scheduler or
    optimizer offload; its precision must be the teacher's (`teacher_dtype`, DistillConfig's: bf16 needs a
    machine with bf16); batch fields, if given, must be the student's (the teacher runs on its batches).
    Errors name the file and the key."""
    _, where, ds = _read_ds_json(path, "--teacher_deepspeed_config")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{where}: has an {key!r} section, but the teacher is frozen (an inference engine: no "
                             f"optimizer, no scheduler); remove it")
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else None
    if stage != 3:
        if isinstance(zero, dict) and "offload_param" in zero:
            raise ValueError(f"{where}: offload_param needs zero_optimization.stage 3 (only ZeRO-3 partitions "
                             f"parameters, so only ZeRO-3 can offload them), got stage {stage}")
        raise ValueError(f"{where}: the teacher's plan is a ZeRO-3 inference engine: expected zero_optimization."
                         f"stage 3, got {stage}; for a replicated teacher leave --teacher_deepspeed_config out")
    if "offload_optimizer" in zero:
        raise ValueError(f"{where}: zero_optimization.offload_optimizer: the teacher has no optimizer; remove it")
    device = zero.get("offload_param", {}).get("device", "none")
    if device not in ("cpu", "none"):
        raise ValueError(f"{where}: zero_optimization.offload_param.device {device!r}: the teacher's partitions are "
                         f"read into memory (models.partitioned.load_partitioned); expected 'cpu' or 'none'")
    _check_zero_section(zero, where)
    for key in _BATCH_KEYS:
        if key in ds and ds[key] != student_ds.get(key):
            raise ValueError(f"{where}: {key} = {ds[key]}, but the teacher runs on the student's batches "
                             f"({key} = {student_ds.get(key)} in --deepspeed_config); leave it out")
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError(f"{where}: fp16 is enabled; the teacher runs in the run's teacher dtype ({teacher_dtype}): "
                         f"use bf16 (or nothing: the teacher's dtype is filled in)")
    if "bf16" in ds:
        want = bool(ds["bf16"].get("enabled", False))
        if want:
            ok, hw = has_native_bf16()
            if not ok:
                raise ValueError(f"{where}: bf16 is enabled, but this machine has no bf16 ({hw}); remove the bf16 "
                                 f"section (the teacher then runs in {teacher_dtype})")
        if want != (teacher_dtype == "bfloat16"):
            raise ValueError(f"{where}: bf16.enabled is {want}, but the teacher runs in {teacher_dtype} (--precision / "
                             f"--teacher_dtype); make them agree, or leave bf16 out (it is filled in)")
    return ds


def teacher_plan(student_ds: dict, teacher_ds: dict | None, shard_teacher: str, teacher_bytes: int, hidden: int,
                 teacher_dtype: torch.dtype) -> tuple[dict | None, str]:
    """(the teacher's DeepSpeed config, or None for a replicated teacher; a line saying which and why).

    - --teacher_deepspeed_config given (`teacher_ds`): its own ZeRO-3 plan, whatever the student's stage.
    - else --shard_teacher yes, or auto with a teacher above TEACHER_SHARD_AUTO_BYTES: the student's ZeRO-3
      settings (an error unless the student runs ZeRO-3), less its optimizer offload.
    - else replicated (one copy per rank): today's default for a small teacher.
    ZeRO-3 sizes (the plan's own, where it sets them): TRL's `prepare_deepspeed` persistence threshold
    (10 x hidden) and reduce bucket (hidden^2), no prefetch and no reuse (see below)."""
    if teacher_ds is not None:
        if shard_teacher == "no":
            raise ValueError("--shard_teacher no contradicts --teacher_deepspeed_config (a partitioned teacher's "
                             "plan); drop one of them")
        zero, why = dict(teacher_ds["zero_optimization"]), "its own plan (--teacher_deepspeed_config)"
    else:
        shard = shard_teacher == "yes" or (shard_teacher == "auto" and zero_stage(student_ds) == 3
                                           and teacher_bytes > TEACHER_SHARD_AUTO_BYTES)
        if not shard:
            why = ("--shard_teacher no" if shard_teacher == "no" else
                   f"{teacher_bytes / 2**30:.2f} GiB <= {TEACHER_SHARD_AUTO_BYTES / 2**30:.0f} GiB" if zero_stage(student_ds) == 3
                   else f"the student runs ZeRO-{zero_stage(student_ds)} and no --teacher_deepspeed_config is given")
            return None, f"teacher: replicated, one copy per rank ({why})"
        if zero_stage(student_ds) != 3:
            raise ValueError(f"--shard_teacher {shard_teacher}: the teacher is partitioned with the student's ZeRO "
                             f"settings, but --deepspeed_config runs ZeRO-{zero_stage(student_ds)}; use a ZeRO-3 "
                             f"config, or give the teacher a plan of its own: --teacher_deepspeed_config "
                             f"ds_configs/teacher_zero3.json (or teacher_zero3_offload.json)")
        zero = {k: v for k, v in student_ds.get("zero_optimization", {}).items()
                if k not in ("offload_optimizer", "sub_group_size")}
        why = "the student's ZeRO-3 settings (--shard_teacher " + shard_teacher + ")"
    zero["stage"] = 3
    # TRL's persistence threshold and bucket (biases and norms kept whole, every matrix gathered on use), and
    # no prefetch, no reuse: the counterfactual pass resumes at a block the plan draws, so the module order
    # changes every step, and DeepSpeed's prefetch then keeps blocks gathered that the pass never reaches
    # (measured, benchmarks/teacher_shard.py: a 16-block teacher held 1/world + 2.5 blocks and stepped 2.5x
    # slower). A plan of its own may set these; the student's are not the teacher's.
    sizes = {"stage3_param_persistence_threshold": 10 * hidden, "reduce_bucket_size": hidden * hidden,
             "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0}
    for k, v in sizes.items():
        if teacher_ds is None or k not in zero:
            zero[k] = v
    cfg = {**(teacher_ds or {}), "train_micro_batch_size_per_gpu": student_ds["train_micro_batch_size_per_gpu"],
           "gradient_accumulation_steps": 1, "zero_optimization": zero,
           "bf16": {"enabled": teacher_dtype == torch.bfloat16}, "fp16": {"enabled": teacher_dtype == torch.float16}}
    cfg.pop("train_batch_size", None)  # the student's, with its accumulation: recomputed by DeepSpeed
    offload = zero.get("offload_param", {}).get("device", "none")
    return cfg, (f"teacher: ZeRO-3 partitioned across ranks{', parameters offloaded to CPU' if offload == 'cpu' else ''}"
                 f", {why}")


def init_teacher_engine(teacher, plan: dict):
    """The frozen teacher's ZeRO-3 engine (no optimizer): partitions the parameters if they are not yet
    (a teacher built whole), or takes over those partitioned as it was built (load_partitioned).
    Returns the module to call (the engine's: its hooks gather each block's parameters on each call)."""
    import deepspeed  # lazy: heavy
    teacher.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=teacher, config=plan)
    engine.eval()
    # the engine's __del__ would remove the gathering hooks: the teacher keeps it alive (in a list, so it is
    # not registered as a submodule)
    teacher._zero3_engine = [engine]
    return engine.module


def build_teacher(spec, plan: dict | None, dtype: torch.dtype, device, on_tensor=None):
    """The frozen teacher for this run, after the process group formed: replicated (`plan` None: loaded once
    on this rank, in `dtype`, straight onto `device`) or partitioned as it is built (ZeRO-3 `plan`: no rank
    ever holds it whole, see models.partitioned.load_partitioned). `spec`: models.load.inspect_model's."""
    if plan is None:
        return load_weights(spec, dtype, device).requires_grad_(False)
    return init_teacher_engine(load_partitioned(spec, plan, dtype, on_tensor=on_tensor), plan)


def prepare_teacher(teacher, ds: dict, shard: bool):
    """A frozen teacher already built whole (tests, benchmarks): eval, no grad; with `shard`, partitioned
    across ranks by a ZeRO-3 engine with the student's settings (`ds` must be ZeRO-3). A run builds its
    teacher with `build_teacher` instead, which never holds it whole."""
    teacher.eval().requires_grad_(False)
    if not shard:
        return teacher
    plan, _ = teacher_plan(ds, None, "yes", 0, teacher.hidden_size, next(teacher.parameters()).dtype)
    return init_teacher_engine(teacher, plan)


def local_param_bytes(module) -> int:
    """Bytes of parameters this rank holds now. ZeRO-3: its partition (`ds_tensor`) plus whatever is gathered
    in `data`: empty for a released parameter, the whole tensor for one kept whole (`ds_persist`: smaller
    than stage3_param_persistence_threshold)."""
    n = 0
    for p in module.parameters():
        part = getattr(p, "ds_tensor", None)
        n += (p.data.numel() + (part.numel() if part is not None else 0)) * p.element_size()
    return n


def param_count(module) -> int:
    """Parameters of the whole model, also under ZeRO-3 (where each local tensor is empty: ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
