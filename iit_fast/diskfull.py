"""A full disk at any write of a run (checkpoint, export, metrics, plots, teacher cache): one clear line that
names the path, the bytes needed and the bytes free; partial files removed; the caller exits non-zero.

Not every writer reports a full disk as ENOSPC: torch.save says `RuntimeError: [enforce fail at
inline_container.cc] unexpected pos ...` or `basic_ios::clear: iostream error`, and safetensors has its own
errors. So a failed write counts as "disk full" when its cause is ENOSPC / EDQUOT, or when the filesystem it
wrote to has less than LOW_BYTES left once it failed.

    with guarded_write("checkpoint", path, need=n_bytes, partial=[tmp_dir]):
        write(...)                 # any failure on a full disk -> DiskFullError(one line), tmp_dir removed
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

LOW_BYTES = 1 << 20  # a failed write with less than this left on its filesystem is a full disk


class DiskFullError(OSError):
    """The disk (or the quota) is full; str(e) is the whole one-line message."""

    def __init__(self, message: str, path=None):
        super().__init__(errno.ENOSPC, message, None if path is None else str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


def free_bytes(path) -> int | None:
    """Bytes free to this user on the filesystem of `path` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path) -> bool:
    """Did this failed write fail for want of space? (see the module docstring)"""
    e, seen = exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    if not isinstance(exc, (OSError, RuntimeError, ValueError)) and "Safetensor" not in type(exc).__name__:
        return False
    free = free_bytes(path)
    return free is not None and free < LOW_BYTES


def human(n: int | None) -> str:
    if n is None:
        return "an unknown number of bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def disk_full_message(what: str, path, need: int | None, free: int | None = None, after: str = "") -> str:
    """'<what> <path>: the disk is full (needs about N, F free)<after>'."""
    free = free_bytes(path) if free is None else free
    needs = f"needs about {human(need)}" if need else "needs more room"
    return f"{what} {path}: the disk is full ({needs}, {human(free)} free){after}"


def remove_partial(paths) -> None:
    """Remove what a failed write left (files or folders); errors ignored (the disk is full, not broken)."""
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


@contextlib.contextmanager
def guarded_write(what: str, path, *, need: int | None = None, partial=(), after: str = ""):
    """Run a write; if it fails on a full disk, remove `partial` and raise DiskFullError (one line naming
    `path`, `need` and the bytes free). Any other failure propagates unchanged."""
    try:
        yield
    except DiskFullError:
        remove_partial(partial)
        raise
    except Exception as e:
        if not is_disk_full(e, path):
            raise
        free = free_bytes(path)
        remove_partial(partial)
        raise DiskFullError(disk_full_message(what, path, need, free, after), path) from e


def replace_atomic(path, data: bytes) -> None:
    """`path` holds `data` whole or is unchanged: a temporary file beside it, fsync, rename; the temporary
    file is removed on any failure. (Also the teacher cache's writer.)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path, text: str, what: str = "file") -> None:
    """`path` holds `text` whole or is unchanged (`replace_atomic`); a full disk is a DiskFullError naming
    `path` and the bytes needed, with the temporary file removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    data = text.encode()
    with guarded_write(what, path, need=len(data), partial=[tmp]):
        replace_atomic(path, data)

def append_line(f, path, line: str, what: str = "file") -> None:
    """Append `line` to `f` (opened "ab", unbuffered) whole or not at all: a write that fails part way is cut
    back off, so the file never ends in half a line; a full disk is a DiskFullError naming `path`."""
    data = line.encode()
    pos = f.seek(0, os.SEEK_END)
    with guarded_write(what, path, need=len(data)):
        try:
            done = 0
            while done < len(data):
                n = f.write(data[done:])
                if not n:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                done += n
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(pos)
            raise
