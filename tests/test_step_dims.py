"""DistillConfig.dims is the run's swapped slice: a plan drawn with other dims is refused by distill_step (it
used to win silently, the config's dims ignored)."""
from __future__ import annotations

import pytest
import torch

from iit_fast.config import DistillConfig
from iit_fast.sampling import make_alignment, sample_plan
from iit_fast.step import distill_step
from tiny import tiny_batch, tiny_pair


def test_dims_plan_disagreeing_with_the_config_is_refused():
    teacher, student = tiny_pair()
    batch = tiny_batch()
    align = make_alignment("middle", teacher.num_layers, student.num_layers)
    draw = lambda dims: sample_plan(batch["attention_mask"], align, torch.Generator().manual_seed(0), 0.3, dims)  # noqa: E731
    cfg = DistillConfig(ops="reference", dims=(4, 20))
    out = distill_step(teacher, student, batch, draw((4, 20)), cfg)  # agreeing: runs
    assert torch.isfinite(out.loss)
    for dims in (None, (0, 16)):
        with pytest.raises(ValueError, match=r"the plan swaps dims .*, but DistillConfig.dims is \(4, 20\)"):
            distill_step(teacher, student, batch, draw(dims), cfg)
    with pytest.raises(ValueError, match=r"the plan swaps dims \(4, 20\), but DistillConfig.dims is None"):
        distill_step(teacher, student, batch, draw((4, 20)), DistillConfig(ops="reference"))
    # the swapped slice changes the step: the config's dims act through the plan it requires
    full = distill_step(teacher, student, batch, draw(None), DistillConfig(ops="reference"))
    assert not torch.allclose(full.terms["iit"], out.terms["iit"])
