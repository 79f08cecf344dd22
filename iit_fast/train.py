"""Causal distillation (DIITO) under DeepSpeed, with the fast step (docs/method.md).

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
    # every flag is a TrainConfig or DistillConfig field (config.py); --config run.json sets any of them

A batch's walk: `prepare.check_inputs` and `prepare.prepare` (before any process group: every check of the
arguments and folders, the embedded defaults built once under a file lock, models loaded, data tokenized) ->
`init_distributed` -> the student's engine around `step.DistillStep` (`prepare.build_engine`) -> per
micro-batch: with --on_policy_fraction / --seq_kd, for a share of them the student / the teacher continues the
batch's prompts (`generate.GeneratedData`); a plan sampled on the CPU (`sampling.sample_plan`),
`engine(batch, plan)` (DeepSpeed's forward runs the step), one all-reduce of {non-finite loss, stop signal},
`engine.backward(loss)`, `engine.step()`; per log interval one all-reduce of the loss terms
(`run_log.Interval`), a metrics line and DeepSpeed's monitor (`run_log.MetricsLog`: TensorBoard / CSV / W&B,
as its config enables).

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
- The teacher is frozen (eval, no grad) and loaded after the process group forms, never whole on a rank that
  does not keep it whole: one copy per rank (in the run's teacher dtype, straight onto the device), or a
  ZeRO-3 inference engine partitioned as it is built, on the student's ZeRO-3 settings (--shard_teacher yes;
  auto: when it holds more than 1 GiB) or on its own plan (--teacher_deepspeed_config, e.g.
  ds_configs/teacher_zero3_offload.json: parameters offloaded to CPU, any student stage). See docs/scale.md.
  With --teacher_cache its weights are not loaded at all.
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

import hashlib
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from iit_fast import lifeline
from iit_fast.allocator import release_free_memory, tune_malloc
from iit_fast.cached_step import CacheBatches
from iit_fast.checkpoint import load_checkpoint, save_checkpoint
from iit_fast.export import export_student
from iit_fast.generate import GeneratedData
from iit_fast.engine import all_reduce_sum, init_distributed, param_count
from iit_fast.plan import fit_warning as plan_fit_warning
from iit_fast.prepare import build_batches, build_engine, check_inputs, prepare, quiet_deepspeed
from iit_fast.report import TERMS, batch_to, memory_mb, print_summary, validate, write_plots
from iit_fast.diskfull import DiskFullError, guarded_write
from iit_fast.run_dir import make_out_dir
from iit_fast.run_log import Interval, MetricsLog
from iit_fast.sampling import sample_plan
from iit_fast.step import step_index

REPO = Path(__file__).resolve().parent.parent


class StopSignal:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._set)

    def _set(self, signum, frame):
        self.signum = signum


def plan_generator(seed: int, step: int, draw: int, rank: int) -> torch.Generator:
    """The intervention plan's randomness: a pure function of the position in the run (see docstring)."""
    key = hashlib.sha256(f"plan|{seed}|{step}|{draw}|{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2 ** 63 - 1))


def fail(message: str, code: int = 2):
    """One line on stderr, no traceback, exit `code` (2: bad input, before any work)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv=None):
    """The run (`_main`), with its two process-level exits: a full disk at any write is one `error:` line,
    exit 1 (iit_fast/diskfull.py); a collective that gave up on a frozen rank (--rank_timeout) kills this
    node's other ranks at once (the launcher would wait 30 s more for one that ignores SIGTERM). A rank also
    watches its launcher and stops as on SIGTERM when it is gone (iit_fast/lifeline.py)."""
    lifeline.watch_launcher()
    try:
        _main(argv)
    except DiskFullError as e:
        fail(str(e), code=1)
    except RuntimeError as e:
        if not lifeline.is_collective_timeout(e):
            raise
        killed = lifeline.stop_siblings()
        fail(f"a collective gave up waiting for a rank that stopped responding (--rank_timeout): "
             f"{str(e).splitlines()[0][:300]}" + (f"; stopped this node's other ranks ({', '.join(map(str, killed))})"
                                                  if killed else ""), code=1)


def _main(argv=None):
    # ---- before any work: the arguments, the embedded defaults, models and data (no process group yet)
    try:
        cfg, ds, precision_note = check_inputs(argv)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        fail(str(e))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_deepspeed()
    try:
        teacher, student, tokenizer, tokenized, alignment, cache, teacher_load = prepare(cfg, ds)
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e))
    if not torch.cuda.is_available():
        release_free_memory()  # what preparing freed (tokenizing, loading) goes back before the heap is kept
        tune_malloc()  # glibc: keep freed blocks from here on (a CPU step re-faults its memory otherwise)

    # ---- the process group, the out_dir, batches, the engine
    rank, world, device = init_distributed(cfg.rank_timeout)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    say(precision_note)
    out = make_out_dir(cfg, rank)
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    train_batches, val_batches = build_batches(cfg, tokenized, tokenizer, teacher.kind, micro, rank, world)
    if cache is not None:  # whole (row, fixed partner) pairs with the cached masks and plans
        try:
            train_batches = CacheBatches(cache, micro, seed=cfg.seed, rank=rank, world_size=world)
        except ValueError as e:
            fail(f"--teacher_cache {cfg.teacher_cache}: {e}")
    if len(train_batches) == 0:
        fail(f"the training split gives no full batch of {micro} per rank on {world} ranks")
    if micro == 1 and cfg.distill.uses_iit:
        say("warning: micro-batch 1 with IIT: a row is its own source (the swap changes nothing); use a "
            "micro-batch of 2 or more")
    fit = plan_fit_warning(teacher, student, cfg, ds, micro, world, device)  # the planner: a warning, not a refusal
    if fit:
        say(fit)
    steps_per_epoch = len(train_batches) // accum
    max_steps = cfg.epochs * steps_per_epoch if cfg.epochs else cfg.max_steps
    dcfg = cfg.distill
    shard = teacher_load.plan is not None
    engine, teacher = build_engine(cfg, ds, teacher, student, teacher_load, cache, max_steps, device, say)
    student = engine.module.student
    # on-policy / seq_kd: a share of the micro-batches continued by the student / the teacher (generate.py)
    generated = GeneratedData(cfg, tokenizer, engine, teacher, device, rank) if cfg.generates else None

    # ---- resume; the metrics log, the run's line, validation at step 0
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
        if not (out / "student" / "config.json").is_file():  # its export failed (e.g. a full disk): export now
            export(engine, tokenizer, out, rank, out / "checkpoints" / tag)
            say(f"exported the student of {out} (checkpoint {tag}) to {out / 'student'}")
        say(f"the run in {out} is complete (step {step} of {max_steps}); nothing to do")
        return
    log = MetricsLog(out, step, is_main, engine)  # metrics.jsonl (rank 0) and DeepSpeed's monitor
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

    # ---- the loop: per micro-batch a plan, engine(batch, plan), backward, step; per interval a log line
    stop = StopSignal()  # from here on, Ctrl-C / SIGTERM save a checkpoint first (before: they just stop)
    bar = tqdm(total=max_steps, initial=step, disable=not is_main, dynamic_ncols=True, desc="distil")
    data_iter = iter(train_batches)
    names = [k for k in TERMS if getattr(dcfg, f"w_{k}") and (dcfg.uses_iit or k not in ("iit", "iit_cos"))]
    interval = Interval(names, device)  # the loss and its terms, tokens: summed over the log interval
    t_start = time.perf_counter()
    last_val, draw, stopped_by, own_norm = first_val, 0, 0, None
    lr_used = engine.get_lr()[0]
    engine.train()
    while step < max_steps:
        try:
            batch = next(data_iter)
        except StopIteration:  # next epoch (the batches count epochs and reshuffle)
            data_iter = iter(train_batches)
            batch = next(data_iter)
        if cache is None:
            if generated is not None:  # continuations the student / teacher wrote from this batch's prompts
                batch, source = generated(batch, step, draw)
                interval.generated[source] += 1
            # the plan is drawn and checked on the CPU, from the CPU mask: no device sync
            plan = sample_plan(batch["attention_mask"], alignment, plan_generator(cfg.seed, step, draw, rank),
                               dcfg.span_fraction, dcfg.dims)
            tokens = int(batch["attention_mask"].sum())
            # what the fast step reads, from the CPU batch and plan: moved once, no sync in the step
            index = step_index(batch, plan, dcfg, teacher.kind).to(device) if dcfg.mode != "naive" else None
            loss, terms = engine(batch_to(batch, device), plan.to(device), index)
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
                stop_on_error(cfg, state, save, bar, log, engine)
            continue
        if flags[1] > 0 and not stopped_by:  # a signal reached some rank: all stop at this step's end
            stopped_by = stop.signum or signal.SIGTERM
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            lr_used = engine.get_lr()[0]  # the lr this optimizer step uses (the scheduler moves after it)
            if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
                own_norm = grad_norm(engine)  # DeepSpeed reports none here (see grad_norm)
        skipped_before = engine.skipped_steps
        engine.step()
        interval.add(loss, terms, tokens)
        if engine.global_steps == step:  # inside gradient accumulation
            continue

        # ---- an optimizer step is done (or DeepSpeed skipped it: an overflow counts as non-finite)
        step, draw = engine.global_steps, 0
        if engine.skipped_steps > skipped_before:
            state["nonfinite"] += 1
            bar.write(f"step {step}: DeepSpeed skipped the optimizer step (gradient overflow) "
                      f"({state['nonfinite']}/{cfg.max_nonfinite})") if is_main else None
            if state["nonfinite"] >= cfg.max_nonfinite:
                stop_on_error(cfg, state, save, bar, log, engine)
        bar.update(1)
        if step % cfg.log_interval == 0 or step == max_steps:
            mean, interval_tokens, tps, shares = interval.reduce(world)  # the one all-reduce per interval
            state["tokens"] += interval_tokens
            gn = engine.get_global_grad_norm()
            gn = own_norm if gn is None else gn
            rec = {"step": step, "loss": mean[0], **dict(zip(names, mean[1:])), "lr": lr_used,
                   "grad_norm": None if gn is None else float(gn), "tokens_per_s": tps,
                   "tokens": state["tokens"], "memory_mb": memory_mb(device), "nonfinite": state["nonfinite"]}
            if generated is not None:  # this rank's shares of micro-batches the student / teacher continued
                rec.update(**shares, gen_s=generated.seconds)  # and the seconds spent generating them
                generated.seconds = 0.0
            log(rec)
            bar.set_postfix_str(f"loss {mean[0]:.3f} | {tps:,.0f} tok/s")
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
                log.close()
                raise SystemExit(128 + int(stopped_by))
    bar.close()

    # ---- the end: validation, checkpoint, export, plots, summary
    state["step"] = step
    last_val = run_validation(step)
    ckpt = save(step)
    export(engine, tokenizer, out, rank, ckpt)
    log.close()
    if is_main:
        records = log.records()
        if cfg.plots:
            with guarded_write("plots", out / "loss.png", partial=[out / "loss.png", out / "val.png"]):
                write_plots(records, out)
        print_summary(records, state, last_val, out, ckpt)
    dist.barrier()
    dist.destroy_process_group()


def export(engine, tokenizer, out: Path, rank: int, ckpt: Path):
    """The student as a Hugging Face folder; a full disk removes the partial folder and says how to retry."""
    need = 4 * param_count(engine.module.student)  # fp32 weights (the tokenizer is small)
    with guarded_write("export", out / "student", need=need, partial=[out / "student"] if rank == 0 else [],
                       after=f"; the checkpoint {ckpt} is complete: make room and run the same command with "
                             f"--resume to export it"):
        export_student(engine, tokenizer, out / "student", rank)


def grad_norm(engine) -> float:
    """The L2 norm of the gradients this optimizer step applies (before clipping). ZeRO-0 in fp32 reduces the
    gradients into the parameters' .grad in backward at the accumulation boundary, and DeepSpeed drops the
    norm its own clipping computes (clip_fp32_gradients), so get_global_grad_norm() is None there."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else 0.0


def stop_on_error(cfg, state, save, bar, metrics, engine):
    """Too many skipped steps: the weights are the last good ones (a skipped step applies nothing), so save
    them and stop with an error that says where they are."""
    bar.close()
    path = save(state["step"])
    if metrics:
        metrics.close()
    fail(f"stopping: {state['nonfinite']} skipped steps (non-finite loss or gradient overflow; max_nonfinite="
         f"{cfg.max_nonfinite}); the last good state is saved in {path}. Lower --lr or check the data"
         + (", or train in fp32 (--precision fp32)" if engine.bfloat16_enabled() or engine.fp16_enabled() else ""),
         code=1)


if __name__ == "__main__":
    main()
