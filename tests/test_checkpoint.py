"""Checkpoints (iit_fast/checkpoint.py): a kill at any point of a save never loses the run, resume verifies
and falls back, rotation, safe loading.

The runs are a real DeepSpeed engine (ZeRO-2, gloo, CPU) on a tiny net in a subprocess: this file run as a
script is the worker (a training loop that saves, may crash while saving, may resume, and dumps its full
state: weights, optimizer, scheduler, data position, RNG). The choice of tag and rotation are also tested
in-process on folders with hand-made manifests.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import iit_fast.checkpoint as checkpoint
from iit_fast.checkpoint import (MANIFEST, SAVE_POINTS, _new_tag, _rotate, _write_manifest, check_checkpoint_safe,
                                 checkpoint_tags, latest_tag, resume_tag, tag_damage)
from iit_fast.diskfull import DiskFullError

CRASH_POINTS = SAVE_POINTS  # a test run can be killed at each point of the save's write sequence

HERE = Path(__file__).resolve()
SAVES = (2, 4)   # the run saves at these steps; the crash runs die while saving step 4
STEPS = 6


# ---- the worker (a subprocess) -------------------------------------------------------------------------

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(16, 1))

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.body(x), y)


class Loader:
    """Three batches an epoch, each a pure function of (epoch, index, rank): the data position."""
    def __init__(self, rank: int):
        self.rank, self.epoch, self.index = rank, 0, 0

    def next(self):
        if self.index == 3:
            self.epoch, self.index = self.epoch + 1, 0
        g = torch.Generator().manual_seed(1000 * self.epoch + 10 * self.index + self.rank)
        self.index += 1
        x = torch.randn(4, 8, generator=g)  # (B, 8)
        return x, x.sum(1, keepdim=True).sin()  # (B, 1)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s):
        self.epoch, self.index = s["epoch"], s["index"]


def snapshot(engine, loader) -> dict:
    return {"global_steps": engine.global_steps,
            "module": {k: v.clone() for k, v in engine.module.state_dict().items()},
            "optim": engine.optimizer.state_dict(), "sched": engine.lr_scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "data": loader.state_dict()}


def worker(jobs: list[dict]):
    """Runs the jobs one after the other, each with a fresh engine (one process: imports are the cost)."""
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no C++ build, nothing in /dev/shm
    deepspeed.init_distributed(dist_backend="gloo")
    for job in jobs:
        train(job, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))


def train(job: dict, rank: int, world: int):
    """job: out, dump (folder for state dumps), resume (bool), crash_at (a point, set while saving step 4),
    keep (rotation). Trains to STEPS, saving at SAVES; dumps truth_step{s} before each save, resumed after
    a resume, final at the end."""
    import deepspeed
    from iit_fast.checkpoint import load_checkpoint, save_checkpoint
    out, dump = Path(job["out"]), Path(job["dump"])
    dump.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = Net()
    torch.manual_seed(100 + rank)  # dropout and noise differ per rank
    random.seed(200 + rank)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "steps_per_print": 10 ** 6, "zero_optimization": {"stage": 2}}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s))  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds, lr_scheduler=sched)
    loader, step = Loader(rank), 0
    if job.get("resume"):
        try:
            client, data, tag, note = load_checkpoint(engine, out, rank, world_size=world)
        except RuntimeError as e:
            (dump / f"error_rank{rank}.txt").write_text(str(e))
            return
        loader.load_state_dict(data)
        step = client["step"]
        torch.save({**snapshot(engine, loader), "tag": tag, "note": note}, dump / f"resumed_rank{rank}.pt")
    engine.train()
    while step < STEPS:
        x, y = loader.next()
        x = x + 0.01 * torch.randn_like(x) + 0.01 * random.random()  # both RNGs are part of the state
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        step = engine.global_steps
        if step in SAVES:
            if not job.get("resume"):
                torch.save(snapshot(engine, loader), dump / f"truth_step{step}_rank{rank}.pt")
            if step == 4 and job.get("crash_at"):
                crash_at(job["crash_at"])
            save_checkpoint(engine, out, step, {"step": step}, loader.state_dict(), rank, keep=job.get("keep"))
    torch.save(snapshot(engine, loader), dump / f"final_rank{rank}.pt")


def crash_at(spec: str):
    """`point[@rank]`: from now on, the save kills this process (as SIGKILL would: no cleanup, no flush) when it
    reaches `point` (on every rank, or on `rank` only): checkpoint._reached, a no-op seam, is replaced."""
    point, _, only = spec.partition("@")
    assert point in SAVE_POINTS, point

    def reached(name, rank):
        if name == point and (not only or int(only) == rank):
            os._exit(137)
    checkpoint._reached = reached


# ---- launching ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(jobs: list[dict], log: Path, ranks: int = 1) -> list[subprocess.Popen]:
    """The worker on `ranks` gloo ranks (one process each) running `jobs`; output to log.rank{r}."""
    port = str(free_port())
    log.parent.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE), json.dumps(jobs)], env=env,
                                      stdout=open(f"{log}.rank{r}", "w"), stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[subprocess.Popen], log: Path, rc: int = 0, timeout: float = 120):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = "".join(Path(f"{log}.rank{r}").read_text()[-3000:] for r in range(len(procs)))
    assert [p.returncode for p in procs] == [rc] * len(procs), f"exit codes, expected {rc}:\n{text}"


def run(jobs: list[dict], log: Path, rc: int = 0, ranks: int = 1):
    wait(start(jobs, log, ranks), log, rc)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a, b, where="state"):
    """Bit-exact equality of nested states (tensors: same dtype, shape and bits)."""
    if torch.is_tensor(a):
        same = torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert same, f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_state(got: dict, want: dict, what: str):
    for k in ("global_steps", "module", "optim", "sched", "torch_rng", "python_rng", "data"):
        assert_same(got[k], want[k], f"{what}: {k}")


# ---- the runs -------------------------------------------------------------------------------------------

def in_pairs(groups: dict[str, list[dict]], root: Path, rc: int = 0):
    """Run each group of jobs in its own worker process, two processes at a time (one core each)."""
    pending = list(groups.items())
    while pending:
        batch, pending = pending[:2], pending[2:]
        for name, procs in [(name, start(jobs, root / f"{name}.log")) for name, jobs in batch]:
            wait(procs, root / f"{name}.log", rc)


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """An uninterrupted run: its state at each save and at the end, and its checkpoint folder."""
    root = tmp_path_factory.mktemp("truth")
    run([{"out": str(root / "run"), "dump": str(root / "dump")}], root / "truth.log")
    states = {s: load(root / "dump" / f"truth_step{s}_rank0.pt") for s in SAVES}
    states["final"] = load(root / "dump" / "final_rank0.pt")
    return {"out": root / "run", "states": states}


# damage done to a copy of the uninterrupted run's checkpoints before resuming it
def truncate_model_states(ckpt: Path):
    f = ckpt / "step4/mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:-100])


def delete_rank_file(ckpt: Path):
    (ckpt / "step4/rank0_state.pt").unlink()


def truncate_both_tags(ckpt: Path):
    for tag in ("step2", "step4"):
        f = ckpt / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[:1000])


DAMAGE = {"truncated": truncate_model_states, "no_rank_file": delete_rank_file, "none_intact": truncate_both_tags}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, truth):
    """For each crash point: a run saves at step 2 and is killed while saving step 4 (keep=1, so the
    step-4 save rotates step 2 away). For each DAMAGE: a copy of the uninterrupted run, damaged. Then
    every one is resumed (and continued to step 6). Returns {name: (its out folder, its dump folder)}."""
    root = tmp_path_factory.mktemp("resumed")
    crashes = {p: [{"out": str(root / p), "dump": str(root / f"{p}_crash"), "crash_at": p, "keep": 1}]
               for p in CRASH_POINTS}
    in_pairs(crashes, root, rc=137)
    for name, damage in DAMAGE.items():
        shutil.copytree(truth["out"], root / name)
        damage(root / name / "checkpoints")
    names = list(CRASH_POINTS) + list(DAMAGE)
    left = {}  # what each kill left, before the resume cleans up
    for p in CRASH_POINTS:
        ckpt = root / p / "checkpoints"
        left[p] = (latest_tag(ckpt), checkpoint_tags(ckpt), sorted(f.name for f in ckpt.iterdir()
                                                                   if f.name.startswith(".") or f.suffix == ".part"))
    jobs = [{"out": str(root / n), "dump": str(root / f"{n}_resumed"), "resume": True, "keep": 1 if n in crashes
             else None} for n in names]
    in_pairs({"resume_a": jobs[::2], "resume_b": jobs[1::2]}, root)
    return {n: (root / n, root / f"{n}_resumed") for n in names}, left


# a kill at each point of the save of step 4 leaves: `latest`, the tag folders, the hidden leftovers
AFTER_KILL = {"after_deepspeed": ("step2", ["step2"], [".incomplete-step4"]),
              "mid_rank_file": ("step2", ["step2"], [".incomplete-step4"]),
              "after_rank_files": ("step2", ["step2"], [".incomplete-step4"]),
              "after_manifest": ("step2", ["step2"], [".incomplete-step4"]),
              "after_rename": ("step2", ["step4", "step2"], []),
              "mid_latest": ("step2", ["step4", "step2"], ["latest.part"]),
              "mid_rotation": ("step4", ["step4"], [".deleting-step2"])}
assert set(AFTER_KILL) == set(CRASH_POINTS)


def test_uninterrupted_run_commits_manifested_tags(truth):
    ckpt = truth["out"] / "checkpoints"
    assert checkpoint_tags(ckpt) == ["step4", "step2"] and latest_tag(ckpt) == "step4"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == []  # no leftovers
    for tag in ("step2", "step4"):
        assert tag_damage(ckpt / tag) == (None, json.loads((ckpt / tag / MANIFEST).read_text()))
        files = json.loads((ckpt / tag / MANIFEST).read_text())["files"]
        assert {"rank0_state.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} \
            <= set(files)
        assert set(files) == {p.relative_to(ckpt / tag).as_posix() for p in (ckpt / tag).rglob("*")
                              if p.is_file() and p.name != MANIFEST}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_every_point_of_a_save_then_resume_equals_uninterrupted(point, resumed, truth):
    """The resumed state equals bit-exactly the uninterrupted run's at the tag resumed from (weights,
    optimizer, scheduler, data position, RNG), and continued to step 6, its step 6."""
    (out, dump), left = resumed[0][point], resumed[1][point]
    assert left == AFTER_KILL[point]
    step = int(left[0][4:])  # resumed from the tag `latest` names: the kill never made it damaged
    got = load(dump / "resumed_rank0.pt")
    assert (got["tag"], got["note"]) == (f"step{step}", None)
    assert_state(got, truth["states"][step], f"{point}: resumed at step {step}")
    assert_state(load(dump / "final_rank0.pt"), truth["states"]["final"], f"{point}: step {STEPS}")
    ckpt = out / "checkpoints"
    # the resumed run's save of step 4 removed the leftovers; after mid_rotation it saves nothing
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".") or p.suffix == ".part") == \
        ([".deleting-step2"] if point == "mid_rotation" else [])
    # keep=1: one tag; a new name where the kill left a complete step4 (never rewritten in place)
    assert checkpoint_tags(ckpt) == [latest_tag(ckpt)]
    assert latest_tag(ckpt) == ("step4.1" if point in ("after_rename", "mid_latest") else "step4")


@pytest.mark.parametrize("name, why", [("truncated", r"mp_rank_00_model_states.pt is \d+ bytes, the manifest "
                                                     r"says \d+ \(truncated or rewritten\)"),
                                        ("no_rank_file", r"rank0_state.pt is missing")])
def test_damaged_latest_falls_back_with_a_message(name, why, resumed, truth):
    """A truncated file or a deleted rank file in the tag `latest` names: resume uses step2 and says why,
    in one line; the run continued from there reaches the uninterrupted run's step 6."""
    out, dump = resumed[0][name]
    got = load(dump / "resumed_rank0.pt")
    assert got["tag"] == "step2"
    assert re.fullmatch(f"checkpoint step4 is damaged \\({why}\\); resuming from step2, the newest intact "
                        f"checkpoint", got["note"]), got["note"]
    assert_state(got, truth["states"][2], f"{name}: resumed at step 2")
    assert_state(load(dump / "final_rank0.pt"), truth["states"]["final"], f"{name}: step {STEPS}")


def test_no_intact_tag_is_a_clear_error(resumed):
    out, dump = resumed[0]["none_intact"]
    error = (dump / "error_rank0.txt").read_text()
    assert re.fullmatch(f"no intact checkpoint in {re.escape(str(out / 'checkpoints'))}: "
                        r"step4: zero_pp_rank_0_mp_rank_00_optim_states.pt is 1000 bytes, the manifest says \d+ "
                        r"\(truncated or rewritten\); step2: zero_pp_rank_0_mp_rank_00_optim_states.pt is 1000 "
                        r"bytes, the manifest says \d+ \(truncated or rewritten\)", error), error


# ---- choice of tag and rotation, in-process on hand-made folders ----------------------------------------

def fake_tag(ckpt: Path, tag: str, world: int = 1, latest: bool = False) -> Path:
    d = ckpt / tag
    d.mkdir(parents=True)
    torch.save({"w": torch.arange(4.0)}, d / "mp_rank_00_model_states.pt")
    for r in range(world):
        torch.save({"data": {"epoch": 0}}, d / f"rank{r}_state.pt")
    _write_manifest(d, tag, int(tag[4:].split(".")[0]), world)
    if latest:
        (ckpt / "latest").write_text(tag)
    return d


def test_resume_tag_choice_and_messages(tmp_path):
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(RuntimeError, match=f"no checkpoint in {ckpt}"):
        resume_tag(ckpt, 1)
    fake_tag(ckpt, "step2")
    fake_tag(ckpt, "step4")
    fake_tag(ckpt, "step4.1", latest=True)
    assert checkpoint_tags(ckpt) == ["step4.1", "step4", "step2"]
    assert resume_tag(ckpt, 1) == ("step4.1", None)
    # the manifest is the commit mark of a folder: without it, damaged
    (ckpt / "step4.1" / MANIFEST).unlink()
    tag, note = resume_tag(ckpt, 1)
    assert tag == "step4" and note == ("checkpoint step4.1 is damaged (no manifest.json (a save that did not "
                                       "finish, or one older than manifests)); resuming from step4, the newest "
                                       "intact checkpoint")
    assert _new_tag(ckpt, 4) == "step4.2" and _new_tag(ckpt, 5) == "step5"  # a damaged tag is not reused either
    # a flipped byte, same size: the checksum catches it
    f = ckpt / "step4" / "mp_rank_00_model_states.pt"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 1
    f.write_bytes(bytes(b))
    assert "CRC-32" in tag_damage(ckpt / "step4")[0]
    assert resume_tag(ckpt, 1)[0] == "step2"
    # `latest` gone: the newest intact tag, said so
    (ckpt / "latest").unlink()
    assert resume_tag(ckpt, 1) == ("step2", f"checkpoint {ckpt / 'latest'} is missing; resuming from step2, "
                                            "the newest intact checkpoint")
    # `latest` names a folder that is not there
    (ckpt / "latest").write_text("step9")
    assert resume_tag(ckpt, 1)[1].startswith("checkpoint step9 is damaged (the folder is missing)")
    with pytest.raises(ValueError, match="world_size: expected an int >= 1"):
        resume_tag(ckpt, 0)


def test_different_rank_count_is_named_only_when_it_is_the_cause(tmp_path):
    ckpt = tmp_path / "checkpoints"
    fake_tag(ckpt, "step2", world=2, latest=True)
    with pytest.raises(RuntimeError, match=r"step2 was written by 2 rank\(s\); this run has 1"):
        resume_tag(ckpt, 1)
    assert resume_tag(ckpt, 2) == ("step2", None)
    # a missing rank file is damage, not another rank count
    (ckpt / "step2" / "rank1_state.pt").unlink()
    with pytest.raises(RuntimeError) as e:
        resume_tag(ckpt, 2)
    assert str(e.value) == f"no intact checkpoint in {ckpt}: step2: rank1_state.pt is missing"
    assert "ranks" not in str(e.value)
    # a manifest that does not list a rank file of its own world size is damaged
    m = json.loads((ckpt / "step2" / MANIFEST).read_text())
    del m["files"]["rank1_state.pt"]
    (ckpt / "step2" / MANIFEST).write_text(json.dumps(m))
    assert tag_damage(ckpt / "step2")[0] == "manifest.json of 2 rank(s) lists no rank1_state.pt"
    (ckpt / "step2" / MANIFEST).write_text("{not json")
    assert tag_damage(ckpt / "step2")[0].startswith("manifest.json is unreadable (JSONDecodeError")


def test_rotation_keeps_the_newest_intact_and_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for tag in ("step2", "step4", "step6", "step8"):
        fake_tag(ckpt, tag)
    (ckpt / "step8" / "rank0_state.pt").unlink()  # damaged: not counted, removed
    (ckpt / "latest").write_text("step2")          # latest is never removed
    crashes = []
    _rotate(ckpt, 2, crashes.append)
    assert checkpoint_tags(ckpt) == ["step6", "step4", "step2"]
    assert crashes == ["mid_rotation"] and not [p for p in ckpt.iterdir() if p.name.startswith(".")]
    (ckpt / "latest").write_text("step6")
    _rotate(ckpt, 1, crashes.append)
    assert checkpoint_tags(ckpt) == ["step6"]


def test_bad_arguments_are_named(tmp_path, monkeypatch):
    from iit_fast.checkpoint import save_checkpoint
    for kw, msg in (({"step": -1}, "step: expected an int >= 0"), ({"data_state": object()}, "data_state: expected"),
                    ({"client_state": [1]}, "client_state: expected a dict"), ({"keep": 0}, "keep: expected None")):
        args = {"engine": None, "out": tmp_path, "step": 1, "client_state": {}, "data_state": {}, "rank": 0, **kw}
        with pytest.raises((ValueError, TypeError), match=msg):
            save_checkpoint(**args)
    from iit_fast.checkpoint import load_checkpoint
    with pytest.raises(ValueError, match="world_size: expected this run's number of ranks, 1; got 2"):
        load_checkpoint(None, tmp_path, 0, world_size=2)  # no process group: a world of one
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_two_ranks_kill_one_rank_mid_file_then_resume(tmp_path):
    """Two gloo ranks: rank 1 is killed while writing its file at step 4; rank 0, left waiting at the
    barrier, is killed too (as a launcher would). Resuming on one rank is refused with the rank count;
    on two ranks it continues from step 2 and reaches the uninterrupted run's step 6 on both ranks."""
    ref = {"out": str(tmp_path / "ref"), "dump": str(tmp_path / "ref_dump")}
    run([ref], tmp_path / "ref.log", ranks=2)
    cut = {"out": str(tmp_path / "cut"), "dump": str(tmp_path / "cut_dump"), "crash_at": "mid_rank_file@1"}
    procs = start([cut], tmp_path / "cut.log", ranks=2)
    try:
        assert procs[1].wait(timeout=120) == 137
    finally:
        procs[0].kill()
        procs[0].wait()
    ckpt = tmp_path / "cut" / "checkpoints"
    assert latest_tag(ckpt) == "step2" and checkpoint_tags(ckpt) == ["step2"]
    assert not (ckpt / ".incomplete-step4" / "rank1_state.pt").exists()
    one = {"out": cut["out"], "dump": str(tmp_path / "one_dump"), "resume": True}
    run([one], tmp_path / "one.log")
    assert (Path(one["dump"]) / "error_rank0.txt").read_text() == (
        f"checkpoint {ckpt / 'step2'} was written by 2 rank(s); this run has 1: resume with 2 rank(s)")
    res = {"out": cut["out"], "dump": str(tmp_path / "res_dump"), "resume": True}
    run([res], tmp_path / "res.log", ranks=2)
    for r in (0, 1):
        got = load(Path(res["dump"]) / f"resumed_rank{r}.pt")
        assert (got["tag"], got["note"]) == ("step2", None)
        assert_state(got, load(Path(ref["dump"]) / f"truth_step2_rank{r}.pt"), f"rank {r} resumed")
        assert_state(load(Path(res["dump"]) / f"final_rank{r}.pt"), load(Path(ref["dump"]) / f"final_rank{r}.pt"),
                     f"rank {r} step {STEPS}")
    assert checkpoint_tags(ckpt) == ["step4", "step2"] and latest_tag(ckpt) == "step4"


# ---- a full disk, and a save killed before `latest` (in-process, a stand-in engine) ----------------------

class FakeEngine:
    """What save_checkpoint asks of a DeepSpeed engine: `module.parameters()` (the space estimate) and
    `save_checkpoint`, which here writes `nbytes` of model state, or raises `fail` after a partial write."""

    def __init__(self, nbytes: int, params: int = 1000, fail: Exception | None = None):
        self.nbytes, self.fail = nbytes, fail
        self.module = torch.nn.Linear(params, 1, bias=False)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "mp_rank_00_model_states.pt", "wb") as f:
            f.write(os.urandom(self.nbytes // 2))
            if self.fail:
                raise self.fail
            f.write(os.urandom(self.nbytes - self.nbytes // 2))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only: skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'mount failed'}); "
                    "test_disk_full_is_faked_without_a_tmpfs covers the same with a fake ENOSPC")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `disk`."""
    free = shutil.disk_usage(disk).free
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def visible(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir())


def test_disk_full_at_a_checkpoint_is_refused_before_writing(small_disk):
    """The space check: the committed checkpoint's size against the space free; refused on a full disk with
    one line naming the folder and both figures; `latest` and its checkpoint untouched; nothing written.
    After making room the same save commits."""
    out, eng = small_disk / "run", FakeEngine(300_000)
    checkpoint.save_checkpoint(eng, out, 2, {}, {}, 0)
    ckpt = out / "checkpoints"
    before = tag_damage(ckpt / "step2")
    filler = fill(small_disk, 200_000)
    with pytest.raises(DiskFullError) as e:
        checkpoint.save_checkpoint(eng, out, 4, {}, {}, 0)
    assert re.fullmatch(rf"checkpoint {re.escape(str(ckpt / 'step4'))}: the disk is full \(needs about 30\d\.\d KiB, "
                        rf"1\d\d\.\d KiB free\); the last good checkpoint {re.escape(str(ckpt / 'step2'))} is kept",
                        str(e.value)), str(e.value)
    assert visible(ckpt) == ["latest", "step2"] and latest_tag(ckpt) == "step2" and tag_damage(ckpt / "step2") == before
    filler.unlink()
    assert checkpoint.save_checkpoint(eng, out, 4, {}, {}, 0) == ckpt / "step4" and latest_tag(ckpt) == "step4"


def test_disk_full_mid_checkpoint_write_removes_the_partial_folder(small_disk):
    """No committed checkpoint yet (the estimate is a floor from the parameters, which fits), but the write
    runs out of room half way: a real ENOSPC from the filesystem; the hidden folder is removed, the error
    names the path, and the filesystem is as before the save (but the empty checkpoints/ folder)."""
    out = small_disk / "run"
    fill(small_disk, 600_000)
    with pytest.raises(DiskFullError) as e:
        checkpoint.save_checkpoint(FakeEngine(1_000_000, params=1000), out, 3, {}, {}, 0)
    ckpt = out / "checkpoints"
    assert re.fullmatch(rf"checkpoint {re.escape(str(ckpt / 'step3'))}: the disk is full \(needs about 11.7 KiB, "
                        r"\d+ bytes free\); no checkpoint was saved before; the partial \.incomplete-step3 was "
                        r"removed", str(e.value)), str(e.value)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == 28
    assert visible(ckpt) == []


def test_disk_full_is_faked_without_a_tmpfs(tmp_path):
    """The same handling on any machine: a write that fails with ENOSPC (faked) removes its partial folder and
    raises DiskFullError; another error (not a full disk) propagates unchanged, its partial folder left for
    the next save to clear."""
    import errno
    out = tmp_path / "run"
    checkpoint.save_checkpoint(FakeEngine(1000), out, 2, {}, {}, 0)
    ckpt = out / "checkpoints"
    with pytest.raises(DiskFullError, match=r"the disk is full.*the last good checkpoint .*step2 is kept; the "
                                            r"partial \.incomplete-step4 was removed"):
        checkpoint.save_checkpoint(FakeEngine(1000, fail=OSError(errno.ENOSPC, "No space left on device")), out, 4,
                                   {}, {}, 0)
    assert visible(ckpt) == ["latest", "step2"]
    with pytest.raises(ZeroDivisionError):  # a bug is not a full disk (lots of room here)
        checkpoint.save_checkpoint(FakeEngine(1000, fail=ZeroDivisionError()), out, 4, {}, {}, 0)
    assert visible(ckpt) == [".incomplete-step4", "latest", "step2"]
    checkpoint.save_checkpoint(FakeEngine(1000), out, 4, {}, {}, 0)
    assert visible(ckpt) == ["latest", "step2", "step4"]


def test_restart_after_kill_between_rename_and_latest_removes_the_uncommitted_tag(tmp_path, monkeypatch):
    """A save killed after renaming its folder but before `latest` leaves a complete, uncommitted step4; the
    resumed run (from step2) saves step 4 again as step4.1 and, once that is committed, removes step4 (with
    keep_checkpoints 0: rotation would not). A `latest` that names a damaged tag removes nothing."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    checkpoint.save_checkpoint(FakeEngine(1000), out, 2, {}, {}, 0)

    class Killed(BaseException):
        pass

    def reached(point, rank):
        if point == "after_rename":
            raise Killed
    monkeypatch.setattr(checkpoint, "_reached", reached)
    with pytest.raises(Killed):
        checkpoint.save_checkpoint(FakeEngine(1000), out, 4, {}, {}, 0)
    monkeypatch.undo()
    assert visible(ckpt) == ["latest", "step2", "step4"] and latest_tag(ckpt) == "step2"
    assert checkpoint.save_checkpoint(FakeEngine(1000), out, 4, {}, {}, 0) == ckpt / "step4.1"
    assert visible(ckpt) == ["latest", "step2", "step4.1"] and latest_tag(ckpt) == "step4.1"
    # `latest` names a damaged tag (the run fell back past it): newer tags are not judged uncommitted
    fake_tag(ckpt, "step6")
    (ckpt / "step4.1" / MANIFEST).unlink()
    checkpoint.save_checkpoint(FakeEngine(1000), out, 5, {}, {}, 0)
    assert checkpoint_tags(ckpt) == ["step6", "step5", "step4.1", "step2"]


def test_checkpoint_with_code_is_refused(tmp_path):
    """A checkpoint file that is more than plain data (a pickle that would call a function) is refused
    before DeepSpeed's own torch.load(weights_only=False) can run it."""
    tag = tmp_path / "step1"
    tag.mkdir()
    torch.save({"w": torch.ones(2), "step": 1}, tag / "mp_rank_00_model_states.pt")
    check_checkpoint_safe(tag)  # plain data passes
    torch.save({"evil": _Evil(tmp_path / "pwned")}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(RuntimeError, match="not plain data"):
        check_checkpoint_safe(tag)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling would create a file
        return (Path.touch, (self.path,))


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
