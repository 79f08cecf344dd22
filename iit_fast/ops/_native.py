"""Loader of the ops' native CPU kernels (`iit_fast/ops/<op>/native.cpp`: C++ with OpenMP, plain C ABI, called through ctypes).

    lib = load_native("iit_fast_interchange", ["interchange/native.cpp"])   # ctypes.CDLL, or raises NativeUnavailable

The sources are compiled once, on first use, by `torch.utils.cpp_extension.load(..., is_python_module=False)`
into its cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions): a few seconds, announced on
stderr; later processes load the cached library at once. No torch headers are included, so the build is
quick and the library is independent of the torch ABI. Flags: `-O3 -fopenmp`, nothing else: no `-march=native`
(a cache directory may be shared by machines of different CPUs; sources that want AVX2 / AVX-512 compile their
hot functions for several targets with `target_clones`, dispatched at load time) and no `-ffast-math` (it
would let the compiler reorder sums and, linked, flush denormals for the whole process; the inner loops carry
`#pragma omp simd`, and exp is hand-written where it must vectorise).
Several sources may go into one library; each (name, sources, flags) is built and loaded once per process.
Other ops can reuse `load_native` with their own name and sources (and list them in LIBRARIES, which
`python -m iit_fast.ops._native` builds ahead of first use, e.g. in an install or CI step).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("iit_fast.ops")

DEFAULT_CFLAGS = ("-O3", "-fopenmp")
DEFAULT_LDFLAGS = ("-fopenmp",)

_cache: dict[tuple, ctypes.CDLL | Exception] = {}


FIX_HINT = "fix: install a C++ compiler (g++) and ninja (pip install ninja)"


class NativeUnavailable(RuntimeError):
    """The native library could not be built or loaded (no compiler, no ninja, build error); the message
    says why and how to fix it."""


def ops_dir() -> Path:
    """iit_fast/ops/, the folder the sources are named relative to (installed as package data)."""
    return Path(__file__).resolve().parent


def load_native(name: str, sources, extra_cflags=DEFAULT_CFLAGS, extra_ldflags=DEFAULT_LDFLAGS) -> ctypes.CDLL:
    """Build (first use, cached) and load the C ABI library `name` made of `sources` (paths relative to
    `iit_fast/ops/`, e.g. "head_loss/native.cpp", or absolute). Raises NativeUnavailable, with the reason, when that cannot be done; the failure
    is remembered, so a process tries once."""
    paths = tuple(str(p if Path(p).is_absolute() else ops_dir() / p) for p in sources)
    key = (name, paths, tuple(extra_cflags), tuple(extra_ldflags))
    hit = _cache.get(key)
    if isinstance(hit, ctypes.CDLL):
        return hit
    if isinstance(hit, Exception):
        raise NativeUnavailable(_reason(hit)) from hit
    try:
        if shutil.which("ninja") is None and not _has_ninja_module():
            raise NativeUnavailable("ninja is not installed")
        from torch.utils.cpp_extension import _get_build_directory, load

        build_dir = _get_build_directory(name, verbose=False)
        so = Path(build_dir) / f"{name}.so"
        fresh = not so.exists()
        if fresh:
            print(f"[iit_fast] building native CPU kernels '{name}' from {', '.join(Path(p).name for p in paths)} "
                  f"into {build_dir} (first use only, a few seconds) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        lib_path = load(name=name, sources=list(paths), extra_cflags=list(extra_cflags),
                        extra_ldflags=list(extra_ldflags), is_python_module=False, verbose=False)
        if fresh:
            print(f"[iit_fast] built '{name}' in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        lib = ctypes.CDLL(lib_path)
    except Exception as e:  # compiler missing, build error: remember and report
        _cache[key] = e
        raise NativeUnavailable(_reason(e)) from e
    _cache[key] = lib
    return lib


def _reason(e: Exception) -> str:
    msg = str(e) if isinstance(e, NativeUnavailable) else f"{type(e).__name__}: {e}"
    if FIX_HINT in msg:
        return msg
    msg = " ".join(msg.split())   # a build log on one line; its end holds the compiler's error
    return f"{msg if len(msg) <= 400 else '...' + msg[-400:]}; {FIX_HINT}"


def _has_ninja_module() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available
        return is_ninja_available()
    except Exception:
        return False


def num_threads() -> int:
    import torch
    return max(1, torch.get_num_threads())


def extensions_dir() -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))


# Libraries of the package's ops, so that an install step or CI can build them ahead of first use:
#     python -m iit_fast.ops._native
LIBRARIES = {"iit_fast_interchange": ("interchange/native.cpp",), "iit_fast_head_loss": ("head_loss/native.cpp",)}


def build_all() -> dict[str, str]:
    """Build (or find in the cache) every library in LIBRARIES; name -> path or the error."""
    out = {}
    for name, sources in LIBRARIES.items():
        try:
            out[name] = load_native(name, sources)._name
        except NativeUnavailable as e:
            out[name] = f"unavailable: {e}"
    return out


if __name__ == "__main__":
    for name, where in build_all().items():
        print(f"{name}: {where}")
