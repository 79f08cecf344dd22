"""A frozen teacher replicated on every rank vs partitioned across ranks under ZeRO-3 (engine.prepare_teacher):
teacher bytes held per rank and the step time, on 1 and 2 gloo ranks (CPU).

    python benchmarks/teacher_shard.py            # writes benchmarks/results/teacher-shard.{json,md}

Shapes: a 12-layer x 256 BERT teacher (vocabulary 30522) -> a 3-layer student initialised from it, batch 8 x 64
per rank, the default losses (ce, mlm, cos, iit; fast step), ZeRO-3 for the student in every run. Each world
size is one launch (torch.distributed.run), which runs both teacher settings one after the other.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LAYERS, HIDDEN, HEADS, VOCAB, STUDENT_LAYERS = 12, 256, 4, 30522, 3
BATCH, SEQ, WARMUP, STEPS = 8, 64, 2, 6


def rank_main(out: Path):
    import torch.distributed as dist
    from transformers import BertConfig, BertForMaskedLM
    from iit_fast.config import DistillConfig
    from iit_fast.engine import init_distributed, init_engine, local_param_bytes, prepare_teacher, read_ds_config
    from iit_fast.models import IntervenableMLM, init_student_from_teacher
    from iit_fast.optim import make_scheduler, param_groups
    from iit_fast.sampling import make_alignment, sample_plan
    from iit_fast.step import DistillStep
    rank, world, _ = init_distributed(600)
    cfg_path = out.parent / "zero3.json"
    if rank == 0:
        cfg_path.write_text(json.dumps({"train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10 ** 9,
                                        "zero_optimization": {"stage": 3}}))
    dist.barrier()
    ds = read_ds_config(str(cfg_path), world)
    rows = []
    for shard in (False, True):
        torch.manual_seed(0)
        hf = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                                        max_position_embeddings=128, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)).eval()
        student = IntervenableMLM(init_student_from_teacher(hf, STUDENT_LAYERS)).train()
        teacher_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        teacher = prepare_teacher(IntervenableMLM(hf), dict(ds), shard)
        engine = init_engine(dict(ds), DistillStep(teacher, student, DistillConfig()), param_groups(student, 0.01),
                             1e-4, lambda opt: make_scheduler(opt, "constant", 0, WARMUP + STEPS))
        held = local_param_bytes(teacher)
        alignment = make_alignment("middle", LAYERS, STUDENT_LAYERS)
        g = torch.Generator().manual_seed(rank)
        times = []
        for i in range(WARMUP + STEPS):
            ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)                      # (B, S)
            labels = torch.where(torch.rand(BATCH, SEQ, generator=g) < 0.15, ids, -100)   # (B, S)
            labels[:, 0] = ids[:, 0]  # at least one target per row
            batch = {"input_ids": torch.where(labels != -100, 4, ids), "labels": labels,
                     "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
                     "token_type_ids": torch.zeros(BATCH, SEQ, dtype=torch.long)}
            plan = sample_plan(batch["attention_mask"], alignment, g)
            dist.barrier()
            t0 = time.perf_counter()
            loss, _ = engine(batch, plan)
            engine.backward(loss)
            engine.step()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
        rows.append({"ranks": world, "teacher": "sharded" if shard else "replicated", "rank": rank,
                     "teacher_MB": teacher_bytes / 2 ** 20, "teacher_MB_per_rank": held / 2 ** 20,
                     "step_s": statistics.median(times), "step_s_all": times, "loss": float(loss.detach())})
        engine.destroy()
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        out.write_text(json.dumps([r for per_rank in gathered for r in per_rank]))


def main():
    sys.path.insert(0, str(REPO))
    from benchmarks.common import machine, write_results
    from iit_fast.engine import free_port
    tmp = REPO / ".cache" / "teacher_shard"
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    for ranks in (1, 2):
        out = tmp / f"rows-{ranks}.json"
        out.unlink(missing_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)),
                   LOCAL_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), TOKENIZERS_PARALLELISM="false",
                   TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), __file__, "--rank", str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        per_rank = json.loads(out.read_text())
        for setting in ("replicated", "sharded"):
            rs = [r for r in per_rank if r["teacher"] == setting]
            rows.append({"ranks": ranks, "teacher": setting, "teacher_MB": rs[0]["teacher_MB"],
                         "teacher_MB_per_rank": max(r["teacher_MB_per_rank"] for r in rs),
                         "step_s": max(r["step_s"] for r in rs), "loss": rs[0]["loss"]})
    load_after = os.getloadavg()
    m = machine()
    m["load_before"], m["load_after"] = load_before, load_after
    notes = (f"Teacher {LAYERS} x {HIDDEN} BERT (vocab {VOCAB}, {rows[0]['teacher_MB']:.1f} MB fp32) -> {STUDENT_LAYERS}-layer "
             f"student; batch {BATCH} x {SEQ} per rank; ZeRO-3 student in every row; step time = median of {STEPS} "
             f"steps after {WARMUP} (slowest rank; each rank runs cpu_count / ranks torch threads); teacher MB per rank = the largest rank's `local_param_bytes` "
             "(partition + anything kept whole: tensors under the persistence threshold, 10 x hidden). "
             f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
             f"{tuple(round(x, 2) for x in load_after)}: "
             + ("**the machine was shared with other work while this ran**, so the step times are indicative only; "
                "re-run on a quiet machine for timing." if load_before[0] > (os.cpu_count() or 1) + 0.5 else
                "a quiet machine (a load of about the core count is this benchmark's own ranks).")
             + " The bytes do not depend on load.")
    write_results("teacher-shard", {"machine": m, "shapes": {"teacher_layers": LAYERS, "hidden": HIDDEN,
                                                             "vocab": VOCAB, "student_layers": STUDENT_LAYERS,
                                                             "batch": BATCH, "seq": SEQ}},
                  rows, ["ranks", "teacher", "teacher_MB", "teacher_MB_per_rank", "step_s", "loss"],
                  title="Frozen teacher: replicated vs ZeRO-3 sharded (CPU, gloo)", notes=notes)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(Path(sys.argv[2]))
    else:
        main()
