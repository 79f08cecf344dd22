"""iit_fast/engine.py: the DeepSpeed config checked before any work; the process group's timeout reaching
DeepSpeed's own groups; param_count under ZeRO-3. (Real-rank behaviour: tests/test_scale.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iit_fast.engine import read_ds_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, cfg, name="ds.json") -> str:
    p = tmp_path / name
    p.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(p)


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"--deepspeed_config .*ds\.json: not JSON"):
        read_ds_config(write(tmp_path, "{'train_micro_batch_size_per_gpu': 2"), 1)
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_ds_config(write(tmp_path, "[1, 2]"), 1)
    with pytest.raises(FileNotFoundError, match="--deepspeed_config .*nope.json: no such file"):
        read_ds_config(str(tmp_path / "nope.json"), 1)


def test_misspelled_top_level_key_suggests_the_right_one(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_acumulation_steps": 2}
    with pytest.raises(ValueError, match="unknown key 'gradient_acumulation_steps'; did you mean "
                                         "'gradient_accumulation_steps'"):
        read_ds_config(write(tmp_path, cfg), 1)
    with pytest.raises(ValueError, match="unknown key 'zzz_nothing_like_it' .not a DeepSpeed setting"):
        read_ds_config(write(tmp_path, {"train_micro_batch_size_per_gpu": 2, "zzz_nothing_like_it": 1}), 1)


def test_misspelled_zero_key_is_named(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2, "overlap_com": True}}
    with pytest.raises(ValueError, match="zero_optimization: .*overlap_com"):
        read_ds_config(write(tmp_path, cfg), 1)
    cfg["zero_optimization"] = {"stage": "two"}
    with pytest.raises(ValueError, match="zero_optimization: .*stage"):
        read_ds_config(write(tmp_path, cfg), 1)


def test_batch_fields(tmp_path):
    bad = {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    with pytest.raises(ValueError, match=r"train_batch_size \(10\) must equal train_micro_batch_size_per_gpu "
                                         r"\(4\) x gradient_accumulation_steps \(2\) x world size \(1\) = 8"):
        read_ds_config(write(tmp_path, bad), 1)
    with pytest.raises(ValueError, match="set train_micro_batch_size_per_gpu"):
        read_ds_config(write(tmp_path, {"gradient_accumulation_steps": 2}), 1)
    with pytest.raises(ValueError, match="train_batch_size=12 is not divisible by gradient_accumulation_steps=1 "
                                         "x world size 8"):
        read_ds_config(write(tmp_path, {"train_batch_size": 12}), 8)
    # the missing fields are filled in so that all three agree
    ds = read_ds_config(write(tmp_path, {"train_batch_size": 24, "gradient_accumulation_steps": 3}), 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    ds = read_ds_config(write(tmp_path, {"train_micro_batch_size_per_gpu": 5}), 3)
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 15)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusals")
def test_cpu_refuses_fp16_and_deepspeed_adam(tmp_path):
    with pytest.raises(ValueError, match="fp16 is enabled, but this machine has no GPU.*bf16"):
        read_ds_config(write(tmp_path, {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}}), 1)
    adam = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ValueError, match="torch_adam = true"):
        read_ds_config(write(tmp_path, adam), 1)
    adam["optimizer"]["params"]["torch_adam"] = True
    assert read_ds_config(write(tmp_path, adam), 1)["optimizer"]["type"] == "AdamW"


def test_every_shipped_config_passes():
    names = sorted((REPO / "ds_configs").glob("*.json"))
    assert len(names) >= 8
    for path in names:
        if path.name.startswith("teacher_"):
            continue  # a teacher's plan (--teacher_deepspeed_config): tests/test_teacher_shard.py checks those
        if not torch.cuda.is_available() and json.loads(path.read_text()).get("fp16", {}).get("enabled"):
            continue  # an fp16 config is for GPUs (refused on CPU, tested above)
        for world in (1, 2, 4):
            ds = read_ds_config(f"ds_configs/{path.name}", world)  # relative to the repository, from any cwd
            assert ds["train_batch_size"] == (world * ds["train_micro_batch_size_per_gpu"]
                                              * ds["gradient_accumulation_steps"]), path.name


PROCESS_CHECK = r"""
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from iit_fast.engine import init_distributed, init_engine, param_count, read_ds_config
from iit_fast.config import DistillConfig
from iit_fast.optim import param_groups
from iit_fast.step import DistillStep
from tiny import tiny_pair
init_distributed(17)
cpu = torch.device("cpu")
timeouts = {"default": dist.group.WORLD._get_backend(cpu).options._timeout.total_seconds()}
teacher, student = tiny_pair(4, 2)
plain = sum(p.numel() for p in student.parameters())
ds = read_ds_config(sys.argv[2], 1)
engine = init_engine(ds, DistillStep(teacher, student, DistillConfig()), param_groups(student, 0.01), 1e-3,
                     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
from deepspeed.utils import groups
timeouts["deepspeed_world_copy"] = groups._clone_world_group()._get_backend(cpu).options._timeout.total_seconds()
s = engine.module.student
print(json.dumps({"plain": plain, "count": param_count(s), "local": sum(p.numel() for p in s.parameters()),
                  "timeouts": timeouts}))
"""


def test_zero3_param_count_and_timeout_of_deepspeed_groups(tmp_path):
    """A world of one under ZeRO-3: each local tensor is empty, param_count still counts the model; the
    process group timeout also holds on the group DeepSpeed's all-reduces use (a copy of the world)."""
    ds = write(tmp_path, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}})
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", PROCESS_CHECK, str(REPO / "tests"), ds], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["local"] == 0 < res["plain"] == res["count"]
    assert res["timeouts"] == {"default": 17.0, "deepspeed_world_copy": 17.0}
