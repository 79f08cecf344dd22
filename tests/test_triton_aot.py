"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 on this CPU-only machine, at the
configurations its launcher uses, to PTX and a cubin, with no register spills and no local memory (the
cubin's resource usage read by cuobjdump, which ships inside triton's nvidia backend).

The interchange kernels list their configurations in `aot_configs()` (every variant, BLOCK_D and autotune
candidate, fp32 and bf16 storage); the head-loss kernels' are listed here (`head_loss_configs`: the forward
KL kernel's two variants, HAS_LABELS, for fp32 and bf16 logits; the other divergences' kernel for each KIND,
fp32), at the launcher's BLOCK_V and num_warps. A `*_kernel` of an op's triton.py that is in neither list
fails `test_every_kernel_is_compiled`. A kernel written to spill (NEEDS_SPILL below) is
compiled the same way and must be seen spilling: the resource reading can fail.

Everything compiles in one subprocess without TRITON_INTERPRET (conftest sets it for the interpreter tests,
and the interpreter patches `triton.language`, so the real compiler cannot run in the pytest process):
this file run as a script, through `iit_fast.ops.aot.compile_kernel` / `compile_configs`.

By hand:  python tests/test_triton_aot.py     (prints registers / spills per kernel, config and arch)
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS = (80, 90)
MAX_REGISTERS = 128   # leaves room for >= 2 CTAs of 8 warps per SM
CONFIG_MODULES = ("iit_fast.ops.interchange.triton",)   # modules with an aot_configs()
KERNEL_MODULES = CONFIG_MODULES + ("iit_fast.ops.head_loss.triton",)


def head_loss_configs() -> list[dict]:
    """The launcher's configurations of `_distill_head_loss_kernel` (see `head_loss.triton`'s launch)."""
    from iit_fast.ops.head_loss.triton import BLOCK_V, NUM_WARPS, _distill_head_loss_kernel
    rows = []
    for dtype in ("fp32", "bf16"):   # the logits' storage; everything after the loads is fp32
        sig = {"zs_ptr": f"*{dtype}", "zs_stride": "i64", "zt_ptr": f"*{dtype}", "zt_stride": "i64",
               "labels_ptr": "*i64", "w_kd_ptr": "*fp32", "w_lab_ptr": "*fp32", "kl_ptr": "*fp32",
               "ce_ptr": "*fp32", "V": "i32", "inv_T": "fp32", "T": "fp32"}
        for has_labels in (True, False):   # the ce + mlm pass, the iit (KL only) pass
            rows.append({"name": "distill_head_loss", "fn": _distill_head_loss_kernel, "dtype": dtype,
                         "signature": sig, "constexprs": {"HAS_LABELS": has_labels, "BLOCK_V": BLOCK_V},
                         "num_warps": NUM_WARPS})
    # the other divergences: fp32 logit chunks only (the launcher refuses others), one KIND per divergence
    from iit_fast.ops.head_loss.divergence import CODES
    from iit_fast.ops.head_loss.triton import _divergence_head_loss_kernel
    sig = {"zs_ptr": "*fp32", "zs_stride": "i64", "zt_ptr": "*fp32", "zt_stride": "i64", "labels_ptr": "*i64",
           "w_kd_ptr": "*fp32", "w_lab_ptr": "*fp32", "d_ptr": "*fp32", "ce_ptr": "*fp32", "V": "i32",
           "inv_T": "fp32", "T": "fp32", "prm": "fp32"}
    for kind, code in CODES.items():
        for has_labels in (True, False):
            if kind != "forward_kl":   # forward KL runs in _distill_head_loss_kernel
                rows.append({"name": f"divergence_head_loss[{kind}]", "fn": _divergence_head_loss_kernel,
                             "dtype": "fp32", "signature": sig, "num_warps": NUM_WARPS,
                             "constexprs": {"KIND": code, "HAS_LABELS": has_labels, "BLOCK_V": BLOCK_V}})
    return rows


def spilling_config() -> dict:
    """A kernel that holds 16k fp32 values per program with one warp (512 per thread) across a reduction:
    over the 255 registers a thread can have, so ptxas must spill. The negative control of the spill check."""
    import triton
    import triton.language as tl

    @triton.jit
    def needs_spill(x_ptr, out_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        tl.store(out_ptr + offs, x - tl.max(x, 0))   # every x stays live until the max is known

    return {"name": "NEEDS_SPILL", "fn": needs_spill, "dtype": "fp32",
            "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32"}, "constexprs": {"BLOCK": 16384}, "num_warps": 1}


def compile_all() -> list[dict]:
    """Every configuration for every arch, JSON-able rows; runs without TRITON_INTERPRET."""
    from iit_fast.ops.aot import compile_kernel
    rows = []
    configs = [(m, importlib.import_module(m).aot_configs()) for m in CONFIG_MODULES]
    configs += [("iit_fast.ops.head_loss.triton", head_loss_configs()), ("test", [spilling_config()])]
    for module, cfgs in configs:
        for cfg in cfgs:
            for arch in ARCHS:
                r = compile_kernel(cfg["fn"], cfg["signature"], cfg["constexprs"], arch, num_warps=cfg["num_warps"])
                rows.append({"module": module, "name": cfg["name"], "kernel": r["name"], "dtype": cfg["dtype"],
                             "constexprs": cfg["constexprs"], "num_warps": cfg["num_warps"], "arch": f"sm_{arch}",
                             "registers": r["registers"], "spills": r["spills"], "local_bytes": r["local_bytes"],
                             "stack": r["stack"], "shared": r["shared"],
                             "ptx_target": (re.search(r"\.target\s+(\w+)", r["ptx"]) or [None, None])[1],
                             "ptx_calls": len(re.findall(r"^\s*call", r["ptx"], re.M)),
                             "cubin_bytes": len(r["cubin"])})
    return rows


@pytest.fixture(scope="module")
def compiled():
    from iit_fast.ops.aot import cuobjdump_path
    import shutil
    if shutil.which(cuobjdump_path()) is None:
        pytest.skip(f"cuobjdump not found (looked for {cuobjdump_path()}, shipped in triton's nvidia backend)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env,
                          timeout=1200)   # ~150 compiles: ~1 min on 2 idle cores
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows_of(compiled, arch, module=None):
    return [r for r in compiled if r["arch"] == arch and r["module"] != "test"
            and (module is None or r["module"] == module)]


@pytest.mark.parametrize("module", KERNEL_MODULES)
@pytest.mark.parametrize("arch", [f"sm_{a}" for a in ARCHS])
def test_compiles_without_spills(compiled, module, arch):
    rows = rows_of(compiled, arch, module)
    assert rows, f"nothing compiled for {module} {arch}"
    for r in rows:
        assert r["ptx_target"].startswith(arch) and r["cubin_bytes"] > 0, r   # sm_90a for sm_90
        assert r["local_bytes"] == 0 and r["stack"] == 0 and r["spills"] == 0, r   # no spills
        assert 0 < r["registers"] <= MAX_REGISTERS, r
        assert r["ptx_calls"] == 0, r   # no libdevice calls left (tl.log / tl.exp lower to PTX instructions)


def test_the_spill_check_can_fail(compiled):
    spilling = [r for r in compiled if r["module"] == "test" and r["arch"]]
    assert len(spilling) == len(ARCHS)
    for r in spilling:
        assert r["stack"] > 0 and r["spills"] > 0, r   # what test_compiles_without_spills refuses


def kernel_names() -> dict[str, list[str]]:
    """module -> its `*_kernel` Triton functions (listed in the compiling process: under TRITON_INTERPRET
    @triton.jit gives an interpreter object instead)."""
    import triton
    return {m: sorted(n for n, f in vars(importlib.import_module(m)).items()   # @triton.jit or autotune over it
                      if isinstance(f, triton.runtime.KernelInterface) and n.endswith("_kernel"))
            for m in KERNEL_MODULES}


BF16_KERNELS = {"_interchange_fwd_kernel", "_interchange_bwd_kernel", "_hidden_loss_kernel",
                "_interchange_hidden_loss_kernel", "_distill_head_loss_kernel"}   # their launchers take bf16


def test_every_kernel_is_compiled(compiled):
    """Each `*_kernel` of an op's triton.py is compiled for each arch in fp32, and in bf16 where it takes it."""
    for module, kernels in compiled[-1]["kernels"].items():
        assert kernels, module
        want = {(k, "fp32") for k in kernels} | {(k, "bf16") for k in kernels if k in BF16_KERNELS}
        for arch in ARCHS:
            done = {(r["kernel"], r["dtype"]) for r in rows_of(compiled, f"sm_{arch}", module)}
            assert want <= done, (module, arch, sorted(want - done))


if __name__ == "__main__":
    if "--json" in sys.argv:
        print(json.dumps(compile_all() + [{"module": "test", "arch": None, "kernels": kernel_names()}]))
    else:
        for r in compile_all():
            print(f"{r['arch']} {r['kernel']:36s} {r['dtype']} {r['constexprs']} warps={r['num_warps']}: "
                  f"{r['registers']} regs, spills {r['spills']}, local {r['local_bytes']} B, stack {r['stack']} B")
