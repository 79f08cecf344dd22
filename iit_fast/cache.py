"""Where built things live (``DEFAULT_CACHE``) and how a finished folder is published into it.

The corpus, the tokenized corpus, the teacher and the fine-tuning source task are all built into a
temporary folder and then published with ``publish_folder``, so a folder that exists is complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("IIT_FAST_CACHE", "~/.cache/iit_fast")).expanduser()


def publish_folder(tmp: Path, final: Path, replace: bool) -> None:
    """Move the finished folder ``tmp`` to ``final`` with one rename, so a folder that exists is complete.
    With ``replace=False`` a ``final`` that exists already (another rank or a concurrent run built the same
    thing first) is kept and ``tmp`` dropped: removing it could pull files from under a process that is
    reading it. With ``replace=True`` an old ``final`` is removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # final exists (not empty): someone else published first
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def cache_lock(cache_dir=None):
    """One process at a time builds the embedded defaults and tokenizes (the others wait, then find them
    built). A file lock, not a collective: it holds across a build of many minutes, and the kernel releases
    it if its holder dies."""
    root = Path(cache_dir or DEFAULT_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
