"""DeepSpeed's contract on real ranks (gloo, CPU, fp32): gradient accumulation, a sharded teacher, faults.

- Accumulation: micro-batch b x accumulation 2 gives the gradient and the weights of micro-batch 2b x
  accumulation 1 over the same 2b rows per rank, for ZeRO 0, 1, 2 and 3, on 1 and on 2 ranks. The engine is
  built as train.py builds it (`engine.init_engine(ds, DistillStep(...), optim.param_groups(...), lr,
  scheduler)`). The comparison holds by construction: every row has the same length and the same number
  of MLM targets, so per-token means over one 2b batch equal the mean of two b batches; the pairing is
  in-batch, so the 2b batch's plan is the two halves' plans side by side (pi block-diagonal, offset by b).
  Negative control: the old bypass (`distill_step(teacher, engine.module.student, ...)` then
  `engine.backward`) fails the ZeRO-3 comparison (each micro-batch's gradient overwrites the last).
- Sharded teacher: `prepare_teacher(teacher, ds, shard=True)` on 2 ranks holds about half the teacher's
  bytes per rank and gives the losses and student gradients of the replicated teacher.
- Faults: a 2-rank `deepspeed --num_gpus 2 train.py` run whose rank 1 is killed or stopped makes rank 0
  exit with an error (at once, or within --rank_timeout).

The rank work runs in subprocesses (this file run as a script under torch.distributed.run: one launch per
world size, looping over stages inside), writing its results to a file that the tests compare.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import multirank
from multirank import grad_error, save_on_rank0

REPO = Path(__file__).resolve().parent.parent
B_HALF, SEQ, TARGETS, VOCAB = 3, 12, 3, 97  # b rows per micro-batch half, row length, MLM targets per row
LR = 1e-2
STEPS = 2
# fp32: one 2b batch and two b batches sum the same terms in another order. Measured differences are
# <= 1.4e-7 relative (gradients) and <= 8.2e-6 absolute (weights after 2 AdamW steps at lr 1e-2, 2 ranks:
# Adam's first steps divide by |g|, so elements with tiny gradients amplify rounding); the bounds leave 70x
# and 12x room. The bypass's ZeRO-3 error is ~0.6 relative (gradient) and ~4e-2 (weights).
GRAD_RTOL = 1e-5      # ||g_accum - g_big|| <= GRAD_RTOL * ||g_big||
WEIGHT_ATOL = 1e-2 * LR  # max |w_accum - w_big| after STEPS optimizer steps (each moves a weight <= ~LR)


# ---- the rank side (run as a script) ------------------------------------------------------------

def _rows(n: int, seed: int) -> dict:
    """n rows of SEQ real tokens, each with exactly TARGETS MLM targets (stand-in [MASK] id 4)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)                       # (n, S)
    labels = torch.full((n, SEQ), -100, dtype=torch.long)                       # (n, S)
    for i in range(n):
        pos = torch.randperm(SEQ, generator=g)[:TARGETS]
        labels[i, pos] = ids[i, pos]
        ids[i, pos] = 4
    return {"input_ids": ids, "attention_mask": torch.ones(n, SEQ, dtype=torch.long), "labels": labels,
            "token_type_ids": torch.zeros(n, SEQ, dtype=torch.long)}


def _half_plan(n: int, seed: int, teacher_layers=(1, 2), student_layer=0):
    """A plan for n rows of SEQ tokens, written directly: derangement, span k = floor(0.3 SEQ), starts."""
    from iit_fast.sampling import InterventionPlan, derangement
    g = torch.Generator().manual_seed(seed)
    k = int(0.3 * SEQ)
    pi = derangement(n, g)                                                      # (n,)
    return InterventionPlan(teacher_layers, student_layer, pi, torch.randint(0, SEQ - k + 1, (n,), generator=g),
                            torch.randint(0, SEQ - k + 1, (n,), generator=g), torch.full((n,), k))


def _side_by_side(a, b, offset: int):
    """The plan of the two halves' rows concatenated: pi block-diagonal (b's sources offset), same spans."""
    from iit_fast.sampling import InterventionPlan
    assert a.teacher_layers == b.teacher_layers and a.student_layer == b.student_layer
    return InterventionPlan(a.teacher_layers, a.student_layer, torch.cat([a.pi, b.pi + offset]),
                            torch.cat([a.base_start, b.base_start]), torch.cat([a.source_start, b.source_start]),
                            torch.cat([a.span_len, b.span_len]))


def _slice(batch: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def _engine(tmp: Path, stage: int, micro: int, accum: int, world: int, shard_teacher: bool = False,
            hidden: int = 32):
    """(teacher, engine) exactly as train.py builds them, from a config file read by read_ds_config."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_pair
    from iit_fast.config import DistillConfig
    from iit_fast.engine import init_engine, prepare_teacher, read_ds_config
    from iit_fast.optim import make_scheduler, param_groups
    from iit_fast.step import DistillStep
    # one file per rank: every rank writes its config, and a shared file could be read half-written
    path = tmp / f"zero{stage}_{micro}x{accum}_rank{os.environ.get('RANK', 0)}.json"
    # persistence threshold 0: ZeRO-3 partitions even these tiny tensors (its default keeps < 1e5 whole)
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                                "steps_per_print": 10 ** 9, "zero_optimization": zero}))
    ds = read_ds_config(str(path), world)
    teacher, student = tiny_pair(4, 2, hidden=hidden, vocab=VOCAB, seed=0)  # dropout 0: deterministic
    teacher = prepare_teacher(teacher, ds, shard_teacher)
    schedule = lambda opt: make_scheduler(opt, "constant", 0, STEPS)  # noqa: E731
    engine = init_engine(ds, DistillStep(teacher, student, DistillConfig()), param_groups(student, 0.01), LR,
                         schedule)
    return teacher, engine


def _full_grads(engine) -> dict:
    from deepspeed.utils import safe_get_full_grad
    return {n: safe_get_full_grad(p).detach().clone().float() for n, p in engine.module.student.named_parameters()}


def _full_weights(engine) -> dict:
    """fp32 master weights (ZeRO 1-3: the optimizer's, gathered; ZeRO 0 has no master copy: the parameters)."""
    from deepspeed.utils import safe_get_full_fp32_param
    get = safe_get_full_fp32_param if engine.zero_optimization_stage() else (lambda p: p)
    return {n: get(p).detach().clone() for n, p in engine.module.student.named_parameters()}


def _train(engine, teacher, rank: int, variant: str) -> dict:
    """STEPS optimizer steps over 2b rows per rank each; variant: accum (b x 2), big (2b x 1) or bypass
    (b x 2 with the step called around the engine, as train.py did before)."""
    from iit_fast.step import distill_step
    b = B_HALF
    grads, losses, start = None, [], _full_weights(engine)
    for step in range(STEPS):
        rows = _rows(2 * b, seed=1000 * rank + step)                           # (2b, S) this rank's rows
        plans = [_half_plan(b, seed=7000 + 100 * rank + 10 * step + h) for h in (0, 1)]
        if variant == "big":
            micro = [(rows, _side_by_side(plans[0], plans[1], b))]
        else:
            micro = [(_slice(rows, slice(h * b, (h + 1) * b)), plans[h]) for h in (0, 1)]
        for batch, plan in micro:
            if variant == "bypass":
                loss = distill_step(teacher, engine.module.student, batch, plan, engine.module.cfg).loss
            else:
                loss, _ = engine(batch, plan)
            engine.backward(loss)
            losses.append(float(loss.detach()))
            if step == 0 and engine.is_gradient_accumulation_boundary():
                grads = _full_grads(engine)  # before engine.step(): the reduced, accumulated gradient
            engine.step()
    assert engine.global_steps == STEPS, engine.global_steps
    return {"grads": grads, "start": start, "weights": _full_weights(engine), "losses": losses}


def worker_accum(out: Path, stages: list[int]):
    from iit_fast.engine import init_distributed, param_count
    rank, world, _ = init_distributed(120)
    tmp = out.parent
    results = {}
    for stage in stages:
        for variant in ("accum", "big") + (("bypass",) if stage == 3 else ()):
            micro, accum = (2 * B_HALF, 1) if variant == "big" else (B_HALF, 2)
            teacher, engine = _engine(tmp, stage, micro, accum, world)
            try:
                results[f"{stage}/{variant}"] = _train(engine, teacher, rank, variant)
            except RuntimeError as e:  # the bypass under ZeRO-3: the decoder is gathered by the engine only
                if variant != "bypass":
                    raise
                results[f"{stage}/{variant}"] = {"error": str(e)[:300]}
            if stage == 3 and variant == "big":
                results["param_count_zero3"] = param_count(engine.module.student)
                results["local_numel_zero3"] = sum(p.numel() for p in engine.module.student.parameters())
            engine.destroy()
    if rank == 0:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import tiny_pair
        _, student = tiny_pair(4, 2, hidden=32, vocab=VOCAB, seed=0)
        results["param_count_plain"] = sum(p.numel() for p in student.parameters())
        torch.save(results, out)


def worker_shard(out: Path):
    """One ZeRO-3 run with the teacher replicated and one with it sharded: losses, grads, bytes."""
    import torch.distributed as dist
    from iit_fast.step import common as step_lib  # where head_losses looks _gathered up
    from iit_fast.engine import init_distributed, local_param_bytes
    rank, world, _ = init_distributed(120)
    results = {}
    for shard in (False, True):
        teacher, engine = _engine(out.parent, 3, 2 * B_HALF, 1, world, shard_teacher=shard)
        rows = _rows(2 * B_HALF, seed=1000 * rank)
        plans = [_half_plan(B_HALF, seed=7000 + 100 * rank + h) for h in (0, 1)]
        plan = _side_by_side(plans[0], plans[1], B_HALF)
        r = {"teacher_local_bytes": local_param_bytes(teacher),
             "teacher_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in teacher.parameters()),
             "decoder_local_numel": teacher.decoder_weight.numel(), "terms": [], "losses": []}
        for i in range(2):  # two steps: the second runs on DeepSpeed's recorded trace of the first
            loss, terms = engine(rows, plan)
            engine.backward(loss)
            if i == 0:
                r["grads"] = _full_grads(engine)
            engine.step()
            r["losses"].append(float(loss))
            r["terms"].append({k: float(v) for k, v in terms.items()})
        r["teacher_gathered_after"] = sum(p.numel() for p in teacher.parameters() if hasattr(p, "ds_id")
                                          and p.ds_status.name == "AVAILABLE" and not getattr(p, "ds_persist", False))
        if shard:  # negative control: without step.common._gathered the head loss cannot read the tied decoder
            real = step_lib._gathered
            step_lib._gathered = lambda *p: __import__("contextlib").nullcontext()
            try:
                engine(rows, plan)
                r["ungathered"] = "no error"
            except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
                r["ungathered"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                step_lib._gathered = real
        results["sharded" if shard else "replicated"] = r
        dist.barrier()
    save_on_rank0(results, out)


# ---- the test side ------------------------------------------------------------------------------

def run_ranks(tmp: Path, ranks: int, *args, timeout=600) -> Path:
    """Run this file's worker on `ranks` gloo ranks (multirank.run_ranks); its result file."""
    return multirank.run_ranks(__file__, tmp, ranks, tmp / f"{args[0]}-{ranks}.pt", *args, timeout=timeout)


def _weight_error(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in b)


def check_accumulation(res: dict, stages):
    for stage in stages:
        acc, big = res[f"{stage}/accum"], res[f"{stage}/big"]
        assert set(acc["grads"]) == set(big["grads"]) and len(big["grads"]) > 10
        g_err = grad_error(acc["grads"], big["grads"])
        w_err = _weight_error(acc["weights"], big["weights"])
        assert g_err <= GRAD_RTOL, f"ZeRO-{stage}: gradient differs by {g_err:.3g} relative"
        assert w_err <= WEIGHT_ATOL, f"ZeRO-{stage}: weights differ by {w_err:.3g} after {STEPS} steps"
        # the weights moved (not two untouched models), and every stage trains the same model
        assert _weight_error(big["weights"], big["start"]) > 100 * WEIGHT_ATOL
        assert grad_error(big["grads"], res[f"{stages[0]}/big"]["grads"]) <= GRAD_RTOL
    # the losses of the micro-batches average to the big batch's loss (per-token means agree)
    for stage in stages:
        acc, big = res[f"{stage}/accum"]["losses"], res[f"{stage}/big"]["losses"]
        for s in range(STEPS):
            assert abs((acc[2 * s] + acc[2 * s + 1]) / 2 - big[s]) <= 1e-5 * abs(big[s])
    bypass, big = res["3/bypass"], res["3/big"]
    if "error" in bypass:
        # the step reads the decoder directly; the engine gathers it (registered with the step module), so a
        # step called around the engine cannot read it at all: it fails loudly instead of training wrong
        assert "exceeds dimension size" in bypass["error"] or "shape" in bypass["error"], bypass["error"]
        return
    g_err = grad_error(bypass["grads"], big["grads"])
    assert g_err > 100 * GRAD_RTOL, f"the bypass should break ZeRO-3 accumulation, differs by only {g_err:.3g}"
    assert _weight_error(bypass["weights"], big["weights"]) > 100 * WEIGHT_ATOL


def test_accumulation_equals_bigger_batch_one_rank(tmp_path):
    res = torch.load(run_ranks(tmp_path, 1, "accum", "0,1,2,3"), weights_only=False)
    check_accumulation(res, (0, 1, 2, 3))
    # param_count reads ds_numel under ZeRO-3, where each local tensor is empty
    assert res["local_numel_zero3"] == 0
    assert res["param_count_zero3"] == res["param_count_plain"] > 0


@pytest.mark.slow
def test_accumulation_equals_bigger_batch_two_ranks(tmp_path):
    res = torch.load(run_ranks(tmp_path, 2, "accum", "0,1,2,3"), weights_only=False)
    check_accumulation(res, (0, 1, 2, 3))
    assert res["local_numel_zero3"] == 0 < res["param_count_zero3"] == res["param_count_plain"]


@pytest.mark.slow
def test_sharded_teacher_equals_replicated_two_ranks(tmp_path):
    ranks = torch.load(run_ranks(tmp_path, 2, "shard"), weights_only=False)
    for rank, res in enumerate(ranks):
        rep, sh = res["replicated"], res["sharded"]
        total = rep["teacher_bytes"]
        assert sh["teacher_bytes"] == total == rep["teacher_local_bytes"]
        # about half per rank: matrices are partitioned; biases and norms (< 10 x hidden) stay whole
        assert 0.4 * total <= sh["teacher_local_bytes"] <= 0.6 * total, (sh["teacher_local_bytes"], total)
        assert sh["decoder_local_numel"] == 0  # the tied decoder weight is sharded: the step must gather it
        assert sh["teacher_gathered_after"] == 0  # and released afterwards
        assert "no error" not in sh["ungathered"], "the head loss read the sharded decoder without gathering it"
        for s in range(2):
            assert sh["terms"][s].keys() == rep["terms"][s].keys() >= {"ce", "mlm", "cos", "iit"}
            for k, v in rep["terms"][s].items():
                assert abs(sh["terms"][s][k] - v) <= 1e-5 * abs(v) + 1e-7, (rank, s, k, sh["terms"][s][k], v)
        assert grad_error(sh["grads"], rep["grads"]) <= GRAD_RTOL


# ---- faults across ranks -------------------------------------------------------------------------

RANK_TIMEOUT = 20  # seconds: --rank_timeout of the fault runs
MARGIN = 25        # seconds past it allowed for an exit on a loaded, shared machine


def _rank_process(launcher: subprocess.Popen, local_rank: int, timeout=300):
    """The train.py process of `local_rank` under a deepspeed launcher (its --local_rank=N child)."""
    import psutil
    end = time.time() + timeout
    while time.time() < end:
        for c in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={local_rank}" in c.cmdline():
                    return c
            except psutil.NoSuchProcess:
                pass
        assert launcher.poll() is None, "the launcher exited before its ranks started"
        time.sleep(0.5)
    raise TimeoutError(f"no rank {local_rank} process after {timeout} s")


def _wait_training(launcher, out: Path, timeout=300):
    """Until the run has logged an optimizer step (both ranks are in the loop's collectives)."""
    end = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < end:
        if metrics.exists() and any('"loss"' in l for l in metrics.read_text().splitlines()):
            return
        assert launcher.poll() is None, f"the run ended before training:\n{(out.parent / f'{out.name}.log').read_text()[-3000:]}"
        time.sleep(0.5)
    raise TimeoutError("the run logged no step")


def _exit_time(proc, timeout: float) -> float | None:
    """Seconds until `proc` (a psutil.Process) exits, or None if it is still running after `timeout`."""
    import psutil
    t0 = time.time()
    try:
        proc.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        return None
    return time.time() - t0


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_rank_fault_stops_the_other_rank(tmp_path, fault):
    """SIGKILL rank 1 of a 2-rank deepspeed run: rank 0 exits within seconds. SIGSTOP it (a hung rank):
    rank 0 exits with a timeout error within --rank_timeout (+ margin), not after gloo's default 30 min."""
    from test_train import launch, tiny_assets
    root = tmp_path / "assets"
    teacher, corpus = tiny_assets(root)
    ds = root / "zero2.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                              "zero_optimization": {"stage": 2}}))
    assets = {"root": root, "teacher": teacher, "corpus": corpus, "ds": {2: ds}}
    out = tmp_path / "run"
    p = launch(assets, out, launcher="deepspeed", ranks=2, stage=2, steps=10 ** 6, log_interval=1,
               rank_timeout=RANK_TIMEOUT, save_interval=0)
    try:
        rank0, rank1 = _rank_process(p, 0), _rank_process(p, 1)
        _wait_training(p, out)
        rank1.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        took = _exit_time(rank0, 10 if fault == "kill" else RANK_TIMEOUT + MARGIN)
        log = (tmp_path / "run.log").read_text()
        assert took is not None, f"rank 0 still running after rank 1's {fault}:\n{log[-3000:]}"
        if fault == "stop":
            # rank 0 waited for the stopped rank, then gloo's timeout (ours, not its 30 min default) fired
            assert took >= RANK_TIMEOUT - 5, f"rank 0 exited after {took:.1f} s, before the timeout:\n{log[-3000:]}"
            assert "timed out" in log.lower() or "timeout" in log.lower(), log[-3000:]
        p.wait(timeout=60)
        assert p.returncode != 0
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher's session: the launcher and both ranks
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_path, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "accum":
        worker_accum(out_path, [int(s) for s in sys.argv[3].split(",")])
    elif mode == "shard":
        worker_shard(out_path)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
