"""Packaging tells the truth: the declared floors work (a scratch venv at the floors runs a smoke subset of the
tests: `test_declared_floors_pass_a_smoke_subset`, slow), every relied-on API imports, the
native build asks for nothing machine-specific, and pyproject reads without deprecation warnings."""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import site
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
    # the mask builders' keywords as the adapters pass them (models/bert.py, gpt2.py, llama.py): inputs_embeds
    # from transformers 5.2, allow_is_*_skip from 5.18, cache (past_key_values before) from 5.24
    "transformers": [("transformers.masking_utils",
                      "create_bidirectional_mask(inputs_embeds, attention_mask, allow_is_bidirectional_skip)"),
                     ("transformers.masking_utils",
                      "create_causal_mask(inputs_embeds, attention_mask, cache, position_ids, allow_is_causal_skip)"),
                     ("transformers.masking_utils",
                      "create_sliding_window_causal_mask(inputs_embeds, attention_mask, cache, allow_is_causal_skip)"),
                     ("transformers", "DataCollatorForLanguageModeling"), ("transformers", "get_scheduler")],
    "deepspeed": [("deepspeed.utils", "safe_get_full_fp32_param"), ("deepspeed.utils", "safe_get_full_grad"),
                  ("deepspeed", "zero"), ("deepspeed.runtime.zero", "GatheredParameters"),
                  ("deepspeed.runtime.zero", "register_external_parameter"),
                  ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig")],
    "tokenizers": [("tokenizers", "Tokenizer"), ("tokenizers.trainers", "BpeTrainer")],
}


def _declared_floors() -> dict[str, str]:
    """name -> the floor as written ("5.2") for every `name>=X` runtime dependency."""
    out = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9.]+)", dep)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _floors() -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(x) for x in v.split(".")) for k, v in _declared_floors().items()}


def _has(module: str, attr: str) -> bool:
    """`attr` of `module`, or `func(a, b)`: func exists and takes parameters of those names."""
    name, _, params = attr.partition("(")
    obj = getattr(importlib.import_module(module), name, None)
    wanted = [p.strip() for p in params.rstrip(")").split(",") if p.strip()]
    return obj is not None and all(p in inspect.signature(obj).parameters for p in wanted)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


@pytest.mark.parametrize("package", sorted(RELIED_ON))
def test_relied_on_apis_import_and_floor_holds(package):
    floors = _floors()
    assert package in floors, f"pyproject declares no floor for {package}"
    assert _version_tuple(version(package)) >= floors[package], (package, version(package), floors[package])
    for module, attr in RELIED_ON[package]:
        assert _has(module, attr), f"{module}.{attr} missing in {package} {version(package)}"


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


# ---- the floors job ------------------------------------------------------------------------------------

# Installed at their declared floors in a scratch venv. torch is not: the installed build (CPU or CUDA) is
# kept, pinned by a constraint so that pip never pulls another. triton is not: its floor concerns the GPU
# path and the AOT tool (tests/test_triton_aot.py), which need the current compiler on a CPU machine.
AT_FLOOR = ("transformers", "tokenizers", "datasets", "accelerate", "deepspeed")
# A few minutes on 2 cores: the APIs at the floors, every model family and its masks (transformers), the
# data pipeline (datasets, tokenizers), the engine and ZeRO configs (deepspeed), fine-tuning through
# transformers' Trainer (accelerate), one step of each family, and one `deepspeed` training run.
SMOKE = ["tests/test_packaging.py::test_relied_on_apis_import_and_floor_holds", "tests/test_models.py",
         "tests/test_models_decoder.py", "tests/test_data.py", "tests/test_engine.py",
         "tests/test_step.py::test_fast_equals_naive_other_families",
         "tests/test_step_decoder.py::test_fused_ops_equal_reference_ops",
         "tests/test_eval.py::test_finetune_sequence_and_token_classification",
         "tests/test_eval.py::test_iia_is_one_for_a_causal_copy_and_below_for_another_model",
         "tests/test_train.py::test_single_rank_deepspeed_overfits_and_exports"]


def floor_venv(root: Path) -> Path:
    """A venv whose own site-packages hold the AT_FLOOR packages at their floors, in front of this
    environment's (imported through a .pth, so everything else, torch included, is the installed one)."""
    venv = root / "floors"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    inner = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                           text=True, check=True).stdout.strip()
    (Path(inner) / "_outer_env.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    (root / "constraints.txt").write_text(f"torch=={version('torch')}\n")
    floors = _declared_floors()
    pins = [f"{name}=={floors[name]}" for name in AT_FLOOR]
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                          str(root / "constraints.txt"), *pins], capture_output=True, text=True)
    assert res.returncode == 0, f"pip cannot install the declared floors {pins}:\n{res.stderr[-3000:]}"
    return py


@pytest.mark.slow
@pytest.mark.timeout(3600)   # ~1 min of installs and ~5 min of tests on 2 idle cores (13 min on a loaded machine)
def test_declared_floors_pass_a_smoke_subset(tmp_path):
    py = floor_venv(tmp_path)
    floors = _declared_floors()
    code = ("import json, importlib.metadata as m; "
            f"print(json.dumps({{n: m.version(n) for n in {list(AT_FLOOR) + ['torch']!r}}}))")
    got = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)
    for name in AT_FLOOR:   # "==5.2" installs 5.2.0
        assert _version_tuple(got[name]) == _version_tuple(floors[name] + ".0.0"), (name, got[name], floors[name])
    assert got["torch"] == version("torch")   # the installed torch, not one pip pulled
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([str(py), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SMOKE], cwd=REPO,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"the smoke subset fails at the floors {got}:\n{res.stdout[-6000:]}"


def _shadowed_module_names(folder: Path) -> dict[str, str]:
    """{script name: what it shadows} for the scripts in `folder` whose name is an importable top-level module
    of this environment (an installed distribution's, or the standard library's)."""
    installed = importlib.metadata.packages_distributions()
    out = {}
    for script in sorted(folder.glob("*.py")):
        name = script.stem
        if name in installed:
            out[name] = f"the installed distribution {installed[name]}"
        elif name in sys.stdlib_module_names:
            out[name] = "a standard-library module"
    return out


@pytest.mark.parametrize("folder", ["benchmarks", "tests"])
def test_scripts_do_not_shadow_an_installed_module(folder):
    # `python benchmarks/X.py` puts benchmarks/ first on sys.path (pytest puts tests/ there), so a file named
    # like a package a library imports replaces that package: transformers 5.25 depends on `kernels` (Hugging
    # Face's hub kernels) and imports it on `from transformers import PreTrainedModel`, which once met
    # benchmarks/kernels.py.
    shadowed = _shadowed_module_names(REPO / folder)
    assert not shadowed, f"rename these files of {folder}/: {shadowed}"


def test_shadowed_module_names_finds_a_script_named_like_an_installed_package(tmp_path):
    # the negative control: the check above can fail
    (tmp_path / "torch.py").write_text("")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "my_benchmark.py").write_text("")
    assert set(_shadowed_module_names(tmp_path)) == {"torch", "json"}
