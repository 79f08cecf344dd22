"""Ranks that outlive their launcher, and ranks that wait for a frozen peer: both end here.

Why: `deepspeed train.py` runs three layers of processes: the runner (`deepspeed`, what a user, `timeout`
or a job scheduler signals), `deepspeed.launcher.launch` (one per node) and the ranks. The runner forwards
no signal on a single node (deepspeed/launcher/runner.py installs its handler for multi-node pdsh only):
a SIGTERM ends it at once, and launch.py and the ranks, reparented to init, train on to the last step,
holding the port. launch.py would forward SIGINT/SIGTERM to the ranks, but it is never signalled.

`watch_launcher()` (every rank, first thing): a daemon thread notes the chain of launcher processes above
this rank (its parent and grandparents while their command line is a launcher's: deepspeed's runner and
launch.py, torchrun / torch.distributed.run) and checks every `interval` seconds that the chain is whole
(each one still the parent of the one below). When it breaks (the runner or the launcher exited, for
whatever reason, SIGKILL included), the rank sends itself SIGTERM: in the training loop that saves a
checkpoint at the end of the current step and exits 143 (iit_fast/train.py); before the loop it simply
stops. launch.py then sees its ranks exit and exits too: nothing outlives the launcher by more than the
save. A rank with no launcher above it (plain `python train.py`) watches nothing.

`stop_siblings()`: a rank whose collective timed out (--rank_timeout) kills the other ranks of its node
at once. The frozen one may be stopped (SIGSTOP) or stuck in native code, and then ignores the SIGTERM
the launcher sends when a rank fails: launch.py and torchrun wait 30 s more before SIGKILL.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

LAUNCHER_SCRIPTS = ("deepspeed", "ds", "torchrun")
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                    "torch.distributed.launch")

_watcher: threading.Thread | None = None


def is_launcher(argv: list[str]) -> bool:
    """Is this command line a launcher's? (`deepspeed ...`, `python -m deepspeed.launcher.launch ...`,
    `torchrun ...`, `python -m torch.distributed.run ...`)"""
    if any(os.path.basename(a) in LAUNCHER_SCRIPTS for a in argv[:2]):
        return True
    return any(a == "-m" and b in LAUNCHER_MODULES for a, b in zip(argv, argv[1:]))


def launcher_chain(pid: int | None = None) -> list:
    """psutil.Process of each launcher above `pid` (default: this process), nearest first."""
    import psutil
    chain, p = [], psutil.Process(pid).parent()
    while p is not None and p.pid > 1:
        try:
            if not is_launcher(p.cmdline()):
                break
            chain.append(p)
            p = p.parent()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
    return chain


def chain_whole(chain: list) -> bool:
    """Is each launcher still alive and still the parent of the process below it? (A process whose parent
    exits is reparented at once, even while the dead parent waits to be reaped as a zombie.)"""
    import psutil
    try:
        if chain and os.getppid() != chain[0].pid:
            return False
        return all(child.ppid() == parent.pid for child, parent in zip(chain, chain[1:]))
    except psutil.NoSuchProcess:
        return False


def watch_launcher(interval: float = 0.5, signum: int = signal.SIGTERM) -> list:
    """Start the watch (once per process); returns the launcher chain watched (empty: nothing to watch)."""
    global _watcher
    if _watcher is not None or "RANK" not in os.environ:
        return []
    try:
        chain = launcher_chain()
    except Exception:  # psutil cannot read this system's process table: say so, train unwatched
        print("warning: cannot read the launcher processes (psutil); a signal to the launcher may not reach "
              "this rank", file=sys.stderr, flush=True)
        return []
    if not chain:
        return []
    stop = threading.Event()

    def watch():
        while not stop.wait(interval):
            if not chain_whole(chain):
                pids = ", ".join(str(p.pid) for p in chain)
                print(f"rank {os.environ.get('RANK')}: its launcher is gone (pids {pids}); stopping as on "
                      f"{signal.Signals(signum).name}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signum)
                return

    _watcher = threading.Thread(target=watch, name="iit_fast-lifeline", daemon=True)
    _watcher.stop = stop
    _watcher.start()
    return chain


def is_collective_timeout(e: BaseException) -> bool:
    """Did a collective give up waiting for a rank (gloo / nccl / the store, after --rank_timeout)?"""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)


def stop_siblings() -> list[int]:
    """SIGKILL the other ranks under this rank's launcher (this node); returns their pids."""
    import psutil
    chain = launcher_chain() if "RANK" in os.environ else []
    if not chain:
        return []
    me, killed = os.getpid(), []
    for p in chain[0].children():
        if p.pid != me:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
    return killed
