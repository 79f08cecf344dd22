"""Multi-rank tests on one machine: a test file run as its own rank worker under torch.distributed.run (gloo,
a free port, an environment of its own), and what its ranks hand back to the test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def rank_env(tmp: Path, ranks: int) -> dict:
    """The workers' environment: offline, one thread each, their own torch extensions folder, and no
    rendezvous variables inherited from a launcher around pytest."""
    e = dict(os.environ)
    e.update(TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"), TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", LOCAL_SIZE=str(ranks),
             LOCAL_WORLD_SIZE=str(ranks))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        e.pop(k, None)
    return e


def run_ranks(script, tmp: Path, ranks: int, out: Path, *args, timeout: float, env: dict | None = None) -> Path:
    """`python script out *args` on `ranks` gloo ranks (torch.distributed.run, a free port), in `tmp`, its output
    in `out` with the suffix .log; `out`, which the ranks must have written, with exit 0 (else the log's end)."""
    from iit_fast.engine import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), str(script), str(out), *map(str, args)]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=tmp, env={**rank_env(tmp, ranks), **(env or {})}, stdout=f,
                           stderr=subprocess.STDOUT, timeout=timeout)
    assert p.returncode == 0 and out.exists(), f"exit {p.returncode}:\n{log.read_text()[-5000:]}"
    return out


def save_on_rank0(result, out: Path) -> None:
    """Every rank's `result` gathered; rank 0 saves the list of them (index: the rank) to `out`."""
    import torch.distributed as dist
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        torch.save(everyone, out)


def grad_error(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every parameter's gradient."""
    num = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in b)
    den = sum(float(b[n].double().pow(2).sum()) for n in b)
    return (num / den) ** 0.5
