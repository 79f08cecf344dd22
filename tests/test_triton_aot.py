"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 on this CPU-only machine, at the
configurations its launcher uses (each module's `aot_configs()`: every variant, BLOCK_D and autotune
candidate), to PTX and a cubin, with no spills and no local memory (cuobjdump's resource usage).

To add kernels: give their module an `aot_configs()` (see iit_fast/ops/interchange/triton.py) and list it in MODULES.
The compiles run in one subprocess without TRITON_INTERPRET (conftest sets it for the interpreter tests;
the real compiler cannot run beside the interpreter) through `iit_fast.ops.aot.compile_configs`.

By hand:  python tests/test_triton_aot.py     (prints registers / spills per kernel, config and arch)
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MODULES = ("iit_fast.ops.interchange.triton",)
ARCHS = (80, 90)
MAX_REGISTERS = 128   # leaves room for >= 2 CTAs of 8 warps per SM


@pytest.fixture(scope="module")
def compiled():
    from iit_fast.ops.aot import run_in_subprocess
    return run_in_subprocess("iit_fast.ops.aot", "compile_configs", list(MODULES), list(ARCHS), timeout=400)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("arch", [f"sm_{a}" for a in ARCHS])
def test_compiles_without_spills(compiled, module, arch):
    rows = [r for r in compiled if r["module"] == module and r["arch"] == arch]
    assert rows, f"nothing compiled for {module} {arch}"
    for r in rows:
        assert r["ptx_target"].startswith(arch) and r["cubin_bytes"] > 0, r
        assert r["local_bytes"] == 0 and r["stack"] == 0 and r["spills"] == 0, r   # no spills
        assert 0 < r["registers"] <= MAX_REGISTERS, r


def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Any CUDA source of an op (iit_fast/ops/<op>/*.cu) compiles with nvcc (there is none yet for these ops: the GPU path is Triton)."""
    import iit_fast.ops as ops_pkg
    sources = sorted(Path(ops_pkg.__file__).parent.glob("*/*.cu"))
    if not sources:
        pytest.skip("no .cu sources in iit_fast/ops/<op>/")
    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    for src in sources:
        for arch in ARCHS:
            subprocess.run([nvcc, "-c", str(src), "-o", str(tmp_path / f"{src.stem}_{arch}.o"),
                            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3"], check=True)


if __name__ == "__main__":
    from iit_fast.ops.aot import compile_configs
    for r in compile_configs(MODULES, ARCHS):
        print(f"{r['arch']} {r['kernel']:36s} {r['dtype']} {r['constexprs']} warps={r['num_warps']}: "
              f"{r['registers']} regs, spills {r['spills']}, local {r['local_bytes']} B")
