"""Ahead-of-time compile of a Triton kernel for a CUDA architecture, on any machine (no GPU needed).

    from iit_fast.ops.aot import compile_kernel
    r = compile_kernel(fn, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, 90,
                       num_warps=4)
    r["ptx"], r["cubin"], r["registers"], r["spills"], r["local_bytes"], r["stack"], r["shared"]

`triton.compile(ASTSource(fn=..., signature=..., constexprs=...), target=GPUTarget("cuda", arch, 32))` runs
the real compiler (ptxas ships inside triton's nvidia backend) and gives PTX and a cubin; the cubin's
resource usage comes from `cuobjdump --dump-resource-usage` (also shipped there). Spill counts come from
ptxas' own report when Triton keeps it in the metadata (`n_spills`), else from the cubin's stack frame
(where ptxas puts spilled registers) and local memory.

It must run in a process where TRITON_INTERPRET is not set: the interpreter patches `triton.language`
and the real compiler then fails. Tests call `run_in_subprocess` (below) from a pytest process, whose
conftest sets TRITON_INTERPRET=1.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["compile_kernel", "compile_configs", "cuobjdump_path", "resource_usage", "run_in_subprocess"]


def cuobjdump_path() -> str:
    """The cuobjdump shipped with triton's nvidia backend (falls back to one on PATH)."""
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(p) if p.exists() else "cuobjdump"


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, from cuobjdump."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local_bytes": local}


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, *, num_warps: int = 4,
                   num_stages: int = 3) -> dict:
    """Compile `fn` (a @triton.jit function) for sm_<arch>.

    signature: every argument name -> Triton type ("*fp32", "*bf16", "i32", "i64", "fp32", ...) or
        "constexpr" for the constexpr parameters.
    constexprs: name -> value of the constexpr parameters.
    Returns dict(ptx=str, cubin=bytes, registers=int, spills=int, local_bytes=int, stack=int, shared=int,
    arch=int, num_warps=int, name=str).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_kernel needs TRITON_INTERPRET unset (use run_in_subprocess)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    ck = triton.compile(src, target=GPUTarget("cuda", int(arch), 32),
                        options={"num_warps": int(num_warps), "num_stages": int(num_stages)})
    cubin = ck.asm["cubin"]
    res = resource_usage(cubin)
    meta_spills = getattr(ck, "n_spills", None)
    if meta_spills is None:
        meta_spills = getattr(getattr(ck, "metadata", None), "n_spills", None) if hasattr(ck, "metadata") else None
    # without ptxas' count: spilled registers live in the stack frame (cuobjdump's STACK; LOCAL is 0 for them)
    res["spills"] = int(meta_spills) if meta_spills is not None else int(bool(res["local_bytes"] or res["stack"]))
    meta_regs = getattr(ck, "n_regs", None)
    if meta_regs is not None and not res["registers"]:
        res["registers"] = int(meta_regs)
    res.update(ptx=ck.asm["ptx"], cubin=cubin, arch=int(arch), num_warps=int(num_warps),
               name=getattr(fn, "__name__", str(fn)))
    return res


def compile_configs(modules=("iit_fast.ops.interchange.triton",), archs=(80, 90)) -> list[dict]:
    """Compile every configuration `module.aot_configs()` lists (dicts with fn, signature, constexprs,
    num_warps, and any other JSON-able keys) for each arch; JSON-able rows with the resource usage."""
    import importlib
    rows = []
    for mod in modules:
        for cfg in importlib.import_module(mod).aot_configs():
            for arch in archs:
                r = compile_kernel(cfg["fn"], cfg["signature"], cfg["constexprs"], arch, num_warps=cfg["num_warps"])
                row = {k: v for k, v in cfg.items() if k not in ("fn", "signature")}
                row.update(module=mod, kernel=r["name"], arch=f"sm_{arch}", registers=r["registers"],
                           spills=r["spills"], local_bytes=r["local_bytes"], stack=r["stack"], shared=r["shared"],
                           ptx_target=(re.search(r"\.target\s+(\w+)", r["ptx"]) or [None, None])[1],
                           cubin_bytes=len(r["cubin"]))
                rows.append(row)
    return rows


def run_in_subprocess(module: str, func: str, *args, timeout: float = 600) -> object:
    """`module.func(*args)` (JSON-able args and result) in a fresh Python without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = (f"import json, sys, importlib; a = json.loads(sys.argv[1]); "
            f"r = getattr(importlib.import_module({module!r}), {func!r})(*a); print('@@AOT@@' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT subprocess failed:\n{proc.stderr[-4000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("@@AOT@@")][-1]
    return json.loads(line[len("@@AOT@@"):])
