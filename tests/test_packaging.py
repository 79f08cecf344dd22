"""Packaging tells the truth: version floors hold for what is installed, every relied-on API imports, the
native build asks for nothing machine-specific, and pyproject reads without deprecation warnings."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# (module, attribute path) the code calls; the floor in pyproject is the first release that has them all
RELIED_ON = {
    "torch": [("torch.serialization", "safe_globals"), ("torch.utils.cpp_extension", "load"),
              ("torch.optim", "AdamW")],
    "transformers": [("transformers.masking_utils", "create_bidirectional_mask"),
                     ("transformers.masking_utils", "create_causal_mask"),
                     ("transformers.masking_utils", "create_sliding_window_causal_mask"),
                     ("transformers", "DataCollatorForLanguageModeling"), ("transformers", "get_scheduler")],
    "deepspeed": [("deepspeed.utils", "safe_get_full_fp32_param"), ("deepspeed.utils", "safe_get_full_grad"),
                  ("deepspeed", "zero"), ("deepspeed.runtime.zero", "GatheredParameters"),
                  ("deepspeed.runtime.zero", "register_external_parameter"),
                  ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig")],
    "tokenizers": [("tokenizers", "Tokenizer"), ("tokenizers.trainers", "BpeTrainer")],
}


def _floors() -> dict[str, tuple[int, ...]]:
    out = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9.]+)", dep)
        if m:
            out[m.group(1).lower()] = tuple(int(x) for x in m.group(2).split("."))
    return out


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


@pytest.mark.parametrize("package", sorted(RELIED_ON))
def test_relied_on_apis_import_and_floor_holds(package):
    floors = _floors()
    assert package in floors, f"pyproject declares no floor for {package}"
    assert _version_tuple(version(package)) >= floors[package], (package, version(package), floors[package])
    for module, attr in RELIED_ON[package]:
        assert hasattr(importlib.import_module(module), attr), f"{module}.{attr} missing in {package} {version(package)}"


def test_deepspeed_shm_comm_op_switch_exists():
    """train.py switches DeepSpeed's CPU shm all-reduce op off by this name (else it compiles C++ at launch)."""
    import deepspeed
    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__


def test_native_build_needs_are_declared_and_portable():
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    assert "ninja" in deps, "the native kernels compile with ninja: it must be a runtime dependency"
    for f in list((REPO / "iit_fast").rglob("*.py")) + list((REPO / "iit_fast").rglob("*.cpp")):
        text = f.read_text(errors="replace")
        for flag in ("-march=native", "-ffast-math"):
            assert f"\"{flag}\"" not in text and f"'{flag}'" not in text, f"{f.relative_to(REPO)} builds with {flag}"
    assert "minilm" in PYPROJECT["project"]["optional-dependencies"]


def test_pyproject_reads_without_deprecation_warnings():
    code = ("import warnings; warnings.simplefilter('error');"
            "from setuptools.config.pyprojecttoml import read_configuration;"
            f"read_configuration({str(REPO / 'pyproject.toml')!r})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_setuptools_floor_admits_the_license_string():
    """`license = "Apache-2.0"` (an SPDX string) needs setuptools >= 77; the build floor says so."""
    assert isinstance(PYPROJECT["project"]["license"], str)
    assert any(r.startswith("setuptools>=77") for r in PYPROJECT["build-system"]["requires"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _version_tuple(version("setuptools")) >= (77,)
