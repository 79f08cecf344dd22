"""Keep glibc malloc from handing big tensors back to the OS every step.

glibc serves large blocks (>= 128 KiB, adaptively up to 32 MiB) with mmap and unmaps them on free, so a
training step at BERT-base size re-faults gigabytes of fresh pages each time: seconds per step on a CPU,
and noisy. jemalloc (LD_PRELOAD) avoids it; without it, `tune_malloc()` tells glibc, in-process, to serve
every block from its heap (M_MMAP_MAX = 0) and never to trim it (M_TRIM_THRESHOLD huge). CUDA memory is
unaffected (PyTorch's caching allocator already keeps it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("iit_fast")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_state: str | None = None


def tune_malloc() -> str:
    """Make the CPU allocator keep its memory; returns (and logs once) which allocator runs and how."""
    global _state
    if _state is not None:
        return _state
    if "jemalloc" in os.environ.get("LD_PRELOAD", "") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        _state = f"{os.environ['LD_PRELOAD']} (LD_PRELOAD)"
    elif os.environ.get("IIT_FAST_MALLOC", "tune") == "default":
        _state = "glibc malloc, defaults (IIT_FAST_MALLOC=default)"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
            _state = ("glibc malloc, tuned: no mmap, no trim (IIT_FAST_MALLOC=default to undo)" if ok
                      else "glibc malloc, defaults (mallopt refused)")
        except (OSError, AttributeError):
            _state = "system malloc, defaults (not glibc: mallopt unavailable)"
    log.info("CPU allocator: %s", _state)
    return _state


def release_free_memory() -> bool:
    """Hand the memory this process has freed back to the OS (glibc malloc_trim(0), after a garbage
    collection): called once preparing is over and before `tune_malloc` makes the allocator keep what it
    frees, so that the run's steady state does not carry what loading and tokenizing used. True if glibc
    released something. (The default teacher is built in a child process: iit_fast/prepare.py.)"""
    import gc
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
