"""optim.py: parameter groups, AdamW, and the schedules against a plain formula (the main job's lr_lambda)."""
from __future__ import annotations

import math

import pytest
import torch

from iit_fast.optim import SCHEDULES, make_optimizer, make_scheduler, param_groups
from tiny import tiny_bert


def reference_multiplier(name: str, step: int, warmup: int, total: int, floor: float) -> float:
    """The multiplier of lr for optimizer step `step` (0-based), written out by hand."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    decay = 1 - frac if name == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return floor + (1 - floor) * decay


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup,total,floor", [(5, 37, 0.0), (0, 11, 0.1), (3, 4, 0.25), (7, 7, 0.0),
                                                 (9, 4, 0.5)])
def test_schedule_equals_the_formula(name, warmup, total, floor):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = make_scheduler(opt, name, warmup, total, floor)
    for step in range(total):  # the lr that optimizer step `step` runs with
        assert opt.param_groups[0]["lr"] == pytest.approx(0.3 * reference_multiplier(name, step, warmup, total,
                                                                                     floor), rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()
    if name == "linear" and total > warmup:  # at the end of a decay: the floor
        assert opt.param_groups[0]["lr"] == pytest.approx(0.3 * floor, abs=1e-15)


def test_first_step_is_not_at_lr_zero_and_warmup_reaches_the_peak():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "linear", 4, 20)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert 0 < lrs[5] < 1.0


def test_schedule_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="name must be one of"):
        make_scheduler(opt, "polynomial", 1, 10)
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        make_scheduler(opt, "linear", 1, 10, 1.5)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        make_scheduler(opt, "linear", 1, 0)


def test_param_groups_no_decay_on_biases_and_norms():
    model = tiny_bert(layers=2)
    groups = param_groups(model, 0.01)
    decay = {id(p) for p in groups[0]["params"]}
    names = dict(model.named_parameters())
    for n, p in names.items():
        no = n.endswith("bias") or "LayerNorm" in n
        assert (id(p) in decay) == (not no), n
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(names)  # the tied decoder weight once
    # frozen parameters are left out; (name, parameter) pairs work as well as a module
    head = [(n, p) for n, p in model.named_parameters() if n.startswith("cls.")]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("cls."))
    got = param_groups(head + [("bert.x", torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False))], 0.1)
    assert sum(len(g["params"]) for g in got) == sum(p.requires_grad for _, p in head) > 0
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(model, -1.0)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        param_groups([("x", torch.nn.Parameter(torch.zeros(1), requires_grad=False))], 0.0)


def test_optimizer_fused_on_cpu_steps_like_the_plain_one():
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 5)
    b = torch.nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    w0 = a.weight.detach().clone()
    oa = make_optimizer(param_groups(a, 0.01), 1e-2)
    ob = make_optimizer(param_groups(b, 0.01), 1e-2, fused=False)
    assert oa.defaults["fused"] and not ob.defaults["fused"]
    x = torch.randn(4, 7)
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-6)
    assert (a.weight - w0).abs().min() > 1e-3  # it did step
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_optimizer(param_groups(a, 0.0), 0.0)
