"""What train.py's loop logs as it runs: metrics.jsonl and DeepSpeed's monitor (`MetricsLog`), and the running
figures of a log interval, reduced over the ranks once per interval (`Interval`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from iit_fast.diskfull import append_line, write_text_atomic
from iit_fast.engine import all_reduce_sum


def json_or_none(line: str):
    """A metrics line as a dict, or None for a line a kill cut short."""
    try:
        return json.loads(line)
    except ValueError:
        return None


class MetricsLog:
    """out/metrics.jsonl (rank 0: one JSON object a line, unbuffered, a full disk cut back cleanly by
    diskfull.append_line) and DeepSpeed's monitor (TensorBoard / CSV / W&B, as its config enables)."""

    def __init__(self, out: Path, step: int, is_main: bool, engine):
        self.path, self.engine = out / "metrics.jsonl", engine
        if is_main:  # a resumed run drops what was logged after its checkpoint (and a line a kill cut short)
            old = self.path.read_text().splitlines() if self.path.exists() and step else []
            keep = [l for l in old if (r := json_or_none(l)) is not None and r.get("step", 0) <= step]
            write_text_atomic(self.path, "".join(l + "\n" for l in keep), "metrics")
        self.file = open(self.path, "ab", buffering=0) if is_main else None

    def __call__(self, rec: dict) -> None:
        if self.file:
            append_line(self.file, self.path, json.dumps(rec) + "\n", "metrics")
        if self.engine.monitor.enabled:  # DeepSpeed's monitor: TensorBoard / CSV / W&B, as its config enables
            self.engine.monitor.write_events([(f"iit_fast/{k}", float(v), rec["step"]) for k, v in rec.items()
                                              if k != "step" and isinstance(v, (int, float))])

    def close(self) -> None:
        if self.file:
            self.file.close()

    def records(self) -> list[dict]:
        return [r for r in map(json_or_none, self.path.read_text().splitlines()) if r is not None]


class Interval:
    """A log interval's running figures on this rank: the loss and its terms `names` per micro-batch, summed on
    the device (no sync per micro-batch), the tokens trained on, and which micro-batches were continued by the
    student / the teacher (generate.py)."""

    def __init__(self, names: list[str], device):
        self.names = names
        self.sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # loss, terms
        self.n, self.tokens, self.t0 = 0, 0, time.perf_counter()
        self.generated = {"corpus": 0, "student": 0, "teacher": 0}

    def add(self, loss: torch.Tensor, terms: dict, tokens: int) -> None:
        self.sums += torch.stack([loss.detach().double()] + [terms[k].double() for k in self.names])
        self.n += 1
        self.tokens += tokens

    def reduce(self, world: int) -> tuple[list[float], int, float, dict]:
        """One all-reduce (the sums and the tokens of every rank): (the mean loss and terms per micro-batch,
        the interval's tokens on all ranks, tokens/s, this rank's shares of micro-batches continued by the
        student / the teacher); the next interval starts now."""
        red = all_reduce_sum(torch.cat([self.sums, torch.tensor([float(self.tokens)], dtype=torch.float64,
                                                                device=self.sums.device)])).tolist()
        now = time.perf_counter()
        tokens = int(red[-1])
        tps = tokens / (now - self.t0)
        mean = [v / (self.n * world) for v in red[:-1]]
        shares = {"on_policy": self.generated["student"] / self.n, "seq_kd": self.generated["teacher"] / self.n}
        self.sums.zero_()
        self.n, self.tokens, self.t0 = 0, 0, now
        self.generated = dict.fromkeys(self.generated, 0)
        return mean, tokens, tps, shares
