"""Shared by the ops: the dtype the references compute in, and the once-per-process path log."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("iit_fast.ops")
_logged: set[str] = set()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in: x's dtype promoted to at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def log_once(msg: str, warning: bool = False) -> None:
    """Log `msg` once per process (a warning for a fallback), e.g. which path an op runs and why."""
    if msg not in _logged:
        _logged.add(msg)
        (log.warning if warning else log.info)(msg)
