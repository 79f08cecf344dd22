"""The faults a user can hit around the main job (issue 27), each test named after its fault: a signal to
the launcher (test_launcher_*), a frozen rank, a full disk at each kind of write (test_disk_full_*), an
out_dir left by a run that died (test_restart_*), and the smaller messages. The teacher cache's own faults
are in tests/test_teacher_cache.py (test_cache_*), the checkpoint's in tests/test_checkpoint.py.

Runs are subprocesses on the tiny assets of tests/test_train.py; a full disk is a real one (a small tmpfs,
root only: skipped with a message otherwise; tests/test_checkpoint.py also fakes ENOSPC on any machine).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from test_train import PY, REPO, assets, env, finish, flags, launch, run_main, steps_of  # noqa: F401 (fixture)

from iit_fast import lifeline
from iit_fast.config import TrainConfig, make_config, parse_args
from iit_fast.diskfull import DiskFullError, append_line, write_text_atomic
from iit_fast.run_dir import check_out_dir


# ---- helpers -----------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only: skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'mount failed'}); the checkpoint's "
                    f"disk-full handling is also tested with a fake ENOSPC (tests/test_checkpoint.py)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


# a train.py run in which `target` (a name in iit_fast.train) first fills the disk of the out_dir
DRIVER = """
import os, sys
import iit_fast.train as t
target, disk, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
real = getattr(t, target)
def filled(*a, **k):
    st = os.statvfs(disk)
    with open(os.path.join(disk, "filler"), "ab") as f:
        f.write(b"\\0" * max(0, st.f_bavail * st.f_frsize - 40_000))
    return real(*a, **k)
setattr(t, target, filled)
t.main(argv)
"""


def run_filling(assets, out: Path, target: str, disk: Path, **kw) -> subprocess.CompletedProcess:
    cmd = [PY, "-c", DRIVER, target, str(disk)] + flags(assets, out, **kw)
    return subprocess.run(cmd, cwd=assets["root"], env=env(assets), capture_output=True, text=True, timeout=600)


def errors(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith("error:")]


def assert_one_error(r: subprocess.CompletedProcess, pattern: str) -> None:
    """The run exited 1 with exactly one `error:` line, and `pattern` matches that line whole."""
    assert r.returncode == 1, r.stderr[-3000:]
    err = errors(r.stderr)
    assert len(err) == 1 and re.fullmatch(pattern, err[0]), r.stderr[-3000:]


# ---- a full disk -------------------------------------------------------------------------------------

def test_disk_full_at_the_checkpoint_then_restart_in_place(tmp_path, assets, small_disk):
    """The disk fills before the run's only checkpoint (--save_interval 0): one `error:` line naming the
    checkpoint folder, the bytes needed and free; exit 1; no traceback; no partial folder. The same command
    once room is made starts the run again in place (it has no checkpoint: nothing to resume) and completes,
    its metrics those of one run."""
    out = small_disk / "run"
    r = run_filling(assets, out, "save_checkpoint", small_disk, steps=3)
    assert_one_error(r, rf"error: checkpoint {re.escape(str(out))}/checkpoints/step3: the disk is full \(needs about "
                        r"[\d.]+ [KM]iB, [\d.]+ KiB free\); no checkpoint was saved before")
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []
    (small_disk / "filler").unlink()
    text = finish(launch(assets, out, steps=3), out)
    assert "holds this run with no intact checkpoint (it stopped before its first save): starting it again " \
           "from step 0" in text
    assert [r["step"] for r in steps_of(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text() == "step3" and (out / "student" / "config.json").is_file()


def test_disk_full_at_the_export_then_resume_exports(tmp_path, assets, small_disk):
    """The disk fills before the export (the checkpoint is saved): one line naming student/ and how to retry;
    the partial folder removed; `--resume` then exports the complete run and trains nothing."""
    out = small_disk / "run"
    r = run_filling(assets, out, "export_student", small_disk, steps=2)
    assert_one_error(r, rf"error: export {re.escape(str(out))}/student: the disk is full \(needs about [\d.]+ KiB, "
                        rf"[\d.]+ KiB free\); the checkpoint {re.escape(str(out))}/checkpoints/step2 is complete: "
                        r"make room and run the same command with --resume to export it")
    assert not (out / "student").exists() and (out / "checkpoints" / "latest").read_text() == "step2"
    (small_disk / "filler").unlink()
    text = finish(launch(assets, out, steps=2, resume=True), out)
    assert f"exported the student of {out} (checkpoint step2)" in text and "is complete" in text
    assert (out / "student" / "config.json").is_file()


def test_disk_full_at_a_metrics_line_cuts_it_back(small_disk):
    """A metrics line that does not fit is cut back off (the file never ends in half a line) and named with
    its size; an atomic rewrite that does not fit leaves the old file and no temporary."""
    path = small_disk / "metrics.jsonl"
    with open(path, "ab", buffering=0) as f:
        append_line(f, path, '{"step": 1}\n', "metrics")
        fill(small_disk, 0)
        line = json.dumps({"step": 2, "pad": "x" * 100_000}) + "\n"
        with pytest.raises(DiskFullError, match=rf"metrics {re.escape(str(path))}: the disk is full \(needs about "
                                                r"97.7 KiB, 0 bytes free\)"):
            append_line(f, path, line, "metrics")
    assert path.read_text() == '{"step": 1}\n'
    with pytest.raises(DiskFullError, match="train config .*the disk is full"):
        write_text_atomic(small_disk / "train_config.json", "x" * 100_000, "train config")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "metrics.jsonl"]


# ---- the launcher ------------------------------------------------------------------------------------

def session_procs(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def port_of(p: subprocess.Popen) -> int:
    return int(p.args[p.args.index("--master_port") + 1])


def listening(port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.net_connections("tcp"))


def wait_for_steps(out: Path, n: int, p: subprocess.Popen, timeout: float = 300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "metrics.jsonl").is_file() and len(steps_of(out)) >= n:
            return
        assert p.poll() is None, (out.parent / f"{out.name}.log").read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no {n} steps within {timeout} s")


def wait_gone(sid: int, timeout: float) -> float:
    t0 = time.time()
    while session_procs(sid) and time.time() - t0 < timeout:
        time.sleep(0.2)
    return time.time() - t0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_launcher_sigterm_to_deepspeed_reaches_both_ranks(tmp_path, assets, signum):
    """`kill -TERM` (or -INT) of the `deepspeed` runner only (not its process group): it exits at once, as
    before; each rank sees its launcher gone, saves a checkpoint at the end of its step, and exits; within
    seconds nothing of the run is left and the port is free. The checkpoint is complete and resumable."""
    out = tmp_path / "run"
    p = launch(assets, out, launcher="deepspeed", ranks=2, stage=2, steps=10_000, log_interval=1)
    try:
        wait_for_steps(out, 3, p)
        os.kill(p.pid, signum)
        p.wait(timeout=30)
        took = wait_gone(p.pid, 90)
        text = (tmp_path / "run.log").read_text()
        assert not session_procs(p.pid), f"left running after {took:.0f} s:\n{text[-3000:]}"
    finally:
        for q in session_procs(p.pid):
            q.kill()
    assert "its launcher is gone" in text and "SIGTERM: saved" in text, text[-3000:]
    tag = (out / "checkpoints" / "latest").read_text()
    assert {"rank0_state.pt", "rank1_state.pt"} <= {f.name for f in (out / "checkpoints" / tag).iterdir()}
    assert not listening(port_of(p))
    with socket.socket() as s:  # the next run's launcher can take the port (TCPStore binds with SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port_of(p)))


@pytest.mark.slow
def test_launcher_frozen_rank_ends_the_run_within_rank_timeout(tmp_path, assets):
    """Rank 1 frozen (SIGSTOP): rank 0's collective gives up after --rank_timeout, kills its node's other
    ranks and exits with one line; the launcher does not wait its 30 s on the frozen rank, so the whole run
    ends within --rank_timeout and a few seconds (it took ~2x before)."""
    out, timeout = tmp_path / "run", 20
    p = launch(assets, out, launcher="deepspeed", ranks=2, stage=2, steps=10_000, rank_timeout=timeout)
    try:
        wait_for_steps(out, 3, p)
        rank1 = next(q for q in session_procs(p.pid) if "--local_rank=1" in q.cmdline())
        rank1.suspend()
        t0 = time.time()
        p.wait(timeout=timeout + 60)
        wait_gone(p.pid, 30)
        took = time.time() - t0
    finally:
        for q in session_procs(p.pid):
            q.kill()
    text = (tmp_path / "run.log").read_text()
    assert p.returncode != 0 and "a collective gave up waiting for a rank that stopped responding" in text, \
        text[-3000:]
    assert took < timeout + 15, f"{took:.0f} s for --rank_timeout {timeout}"


def test_launcher_chain_is_read_from_the_command_lines():
    assert lifeline.is_launcher(["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"])
    assert lifeline.is_launcher(["/usr/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert lifeline.is_launcher(["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "train.py"])
    assert lifeline.is_launcher(["python", "-m", "torch.distributed.run", "train.py"])
    assert not lifeline.is_launcher(["bash", "-c", "deepspeed train.py"])
    assert not lifeline.is_launcher(["python", "train.py", "--deepspeed_config", "ds.json"])
    # a parent that is not a launcher (this test's): nothing to watch
    assert lifeline.launcher_chain() == [] or all(lifeline.is_launcher(q.cmdline()) for q in lifeline.launcher_chain())


# ---- an out_dir is never a trap ----------------------------------------------------------------------

def cfg_for(out: Path, **kw) -> TrainConfig:
    return make_config({"out_dir": str(out), **kw})


def saved_run(out: Path, checkpoint: bool, **kw):
    out.mkdir(parents=True)
    (out / "train_config.json").write_text(json.dumps(cfg_for(out, **kw).to_json()))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    if checkpoint:
        sys.path.insert(0, str(REPO / "tests"))
        from test_checkpoint import fake_tag
        fake_tag(out / "checkpoints", "step2", latest=True)


def test_restart_rules_of_an_out_dir(tmp_path):
    """Every refusal names a way out that works; a run with no intact checkpoint starts again in place."""
    # died before its first checkpoint: the same command restarts it; --resume too (nothing to resume)
    saved_run(tmp_path / "dead", checkpoint=False)
    for resume in (False, True):
        cfg = cfg_for(tmp_path / "dead", resume=resume)
        assert check_out_dir(cfg) is None and cfg.resume is False
    (tmp_path / "dead" / "checkpoints" / ".incomplete-step4").mkdir(parents=True)  # a killed save: still none
    assert check_out_dir(cfg_for(tmp_path / "dead")) is None
    # another config, no checkpoint: removable, said so
    err = check_out_dir(cfg_for(tmp_path / "dead", lr=1e-3))
    assert re.fullmatch(rf"out_dir {tmp_path}/dead already holds another run \(lr: 0.0002 -> 0.001\); nothing was "
                        rf"overwritten: choose another --out_dir, or remove {tmp_path}/dead \(that run saved no intact "
                        r"checkpoint\)", err), err
    # with a checkpoint: --resume continues it, the same command without it is refused, saying so
    saved_run(tmp_path / "ok", checkpoint=True)
    assert check_out_dir(cfg_for(tmp_path / "ok", resume=True)) is None
    err = check_out_dir(cfg_for(tmp_path / "ok"))
    assert err.endswith("already holds this run, with a checkpoint (step2); nothing was overwritten: pass --resume "
                        "to continue it, or choose another --out_dir"), err
    # every checkpoint damaged: nothing intact to resume, so it starts again (damaged tags are left alone)
    (tmp_path / "ok" / "checkpoints" / "step2" / "rank0_state.pt").unlink()
    cfg = cfg_for(tmp_path / "ok", resume=True)
    assert check_out_dir(cfg) is None and cfg.resume is False
    # not a run at all; an empty folder with --resume
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    assert "holds files that are not a run (notes.txt; no train_config.json); nothing was overwritten: choose " \
           "another --out_dir" in check_out_dir(cfg_for(tmp_path / "junk"))
    (tmp_path / "empty").mkdir()
    assert check_out_dir(cfg_for(tmp_path / "empty", resume=True)).endswith(
        "holds no run (it is empty): start the run without --resume")
    # a live run holds its folder (its lock): refused whatever it holds; a dead run's lock holds nothing
    from iit_fast import run_dir
    run_dir.hold(tmp_path / "dead")
    try:
        assert check_out_dir(cfg_for(tmp_path / "dead")) == (
            f"out_dir {tmp_path}/dead is in use by a run that is still running (it holds {tmp_path}/dead/.run.lock); "
            "nothing was overwritten: wait for it to end or stop it, or choose another --out_dir")
    finally:
        for fh in run_dir._held:
            fh.close()
        run_dir._held.clear()
    assert check_out_dir(cfg_for(tmp_path / "dead")) is None


def test_restart_with_another_max_steps_advice_fits_the_direction(tmp_path):
    saved_run(tmp_path / "r", checkpoint=True, max_steps=6)
    longer = check_out_dir(cfg_for(tmp_path / "r", resume=True, max_steps=10))
    assert longer.endswith("max_steps: 6 -> 10; --resume continues the same run (its lr schedule was made for "
                           "max_steps 6): to train longer, start a new run (another --out_dir) with --student "
                           "<out_dir>/student, the exported student"), longer
    shorter = check_out_dir(cfg_for(tmp_path / "r", resume=True, max_steps=3))
    assert shorter.endswith("max_steps: 6 -> 3; --resume continues the same run (its lr schedule was made for "
                            "max_steps 6): to train for fewer steps, start a new run (another --out_dir) with "
                            "--max_steps 3"), shorter
    assert "longer" not in shorter


# ---- the smaller messages ----------------------------------------------------------------------------

def test_config_not_json_names_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("max_steps: 5\n")
    with pytest.raises(ValueError, match=rf"--config {re.escape(str(bad))}: not JSON \(Expecting value"):
        parse_args(["--config", str(bad)])


class _Engine:
    def __init__(self, bf16=False, fp16=False):
        self.bf16, self.fp16 = bf16, fp16

    def bfloat16_enabled(self):
        return self.bf16

    def fp16_enabled(self):
        return self.fp16


class _Bar:
    def close(self):
        pass


@pytest.mark.parametrize("bf16", [False, True])
def test_nonfinite_stop_advises_fp32_only_to_a_run_that_is_not(bf16, capsys):
    from iit_fast.train import stop_on_error
    cfg = make_config({"max_nonfinite": 3})
    with pytest.raises(SystemExit) as e:
        stop_on_error(cfg, {"nonfinite": 3, "step": 7}, lambda step: Path("runs/x/checkpoints/step7"), _Bar(), None,
                      _Engine(bf16=bf16))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "the last good state is saved in runs/x/checkpoints/step7. Lower --lr or check " \
                                 "the data" in err
    assert ("fp32" in err) == bf16, err


def test_zero0_logs_grad_norm(tmp_path, assets):
    """ZeRO-0 in fp32 logs the gradient norm (DeepSpeed reports none there) and it is ZeRO-1's, same run."""
    runs = {s: launch(assets, tmp_path / f"z{s}", stage=s, steps=3) for s in (0, 1)}
    for s, p in runs.items():
        finish(p, tmp_path / f"z{s}")
    norms = {s: [r["grad_norm"] for r in steps_of(tmp_path / f"z{s}")] for s in runs}
    assert all(isinstance(g, float) and g > 0 for g in norms[0]), norms
    assert norms[0] == pytest.approx(norms[1], rel=1e-4), norms


def test_cache_mismatch_fails_before_work(tmp_path, assets, capsys):
    """A cache built without --hidden and a run with w_cos > 0: one `error:` line, exit 2, before the process
    group and the out_dir (it failed after the step-0 validation before)."""
    from iit_fast.cli import main as cli
    cache = tmp_path / "nohidden"
    assert cli(["cache-teacher", "--teacher", str(assets["teacher"]), "--corpus", str(assets["corpus"]),
                "--top_k", "8", "--plans", "2", "--student_layers", "2", "--cache_dir", str(assets["root"] / "cache"),
                "--max_length", "16", "--max_examples", "48", "--no_progress", "--out", str(cache)]) == 0
    code, err = run_main(flags(assets, tmp_path / "out", teacher_cache=cache, steps=3), capsys)
    assert code == 2 and re.search(r"error: --w_cos 0.25 needs the teacher's hidden states, and --teacher_cache "
                                   r".* was built without them", err), err
    assert not (tmp_path / "out").exists()


# ---- memory: the default teacher is built apart --------------------------------------------------------

def test_memory_default_teacher_built_in_a_child_process(tmp_path, capsys):
    """The embedded teacher is built by `python -m iit_fast.teacher build` in a child process (its memory goes
    back to the system when it exits; benchmarks/results/train-memory.md): a built one is found without a
    child; a failed build is one error naming the command and its exit status."""
    from iit_fast.prepare import default_teacher_apart
    from iit_fast.teacher import default_teacher_dir
    built = default_teacher_dir(tmp_path / "cache")
    built.mkdir(parents=True)
    (built / "metrics.json").write_text("{}")
    assert default_teacher_apart(tmp_path / "cache") == built
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(ValueError, match=rf"building the default teacher failed \(`-m iit_fast.teacher build "
                                         rf"--cache-dir {re.escape(str(not_a_folder))}` exited 1; its error is above\)"):
        default_teacher_apart(not_a_folder)
