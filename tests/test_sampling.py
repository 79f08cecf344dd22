"""Alignments, in-batch derangements and spans."""
import json

import pytest
import torch

from iit_fast.sampling import (InterventionPlan, check_plan, derangement, make_alignment, real_lengths,
                               sample_plan)


def test_presets():
    assert make_alignment("middle", 12, 6) == [((5,), 2)]
    assert make_alignment("late", 12, 6) == [((8,), 4)]
    full = make_alignment("full", 12, 6)
    assert full == [((0, 1), 0), ((2, 3), 1), ((4, 5), 2), ((6, 7), 3), ((8, 9), 4), ((10, 11), 5)]
    full = make_alignment("full", 7, 3)  # uneven groups still cover every teacher block once
    assert [l for t, _ in full for l in t] == list(range(7)) and [s for _, s in full] == [0, 1, 2]
    assert make_alignment("middle", 1, 1) == [((0,), 0)]


def test_alignment_json(tmp_path):
    path = tmp_path / "align.json"
    path.write_text(json.dumps([{"teacher": [3, 4], "student": 1}, [[0], 0]]))
    assert make_alignment(str(path), 6, 3) == [((3, 4), 1), ((0,), 0)]
    path.write_text(json.dumps([{"teacher": [6], "student": 1}]))
    with pytest.raises(ValueError, match="teacher block"):
        make_alignment(str(path), 6, 3)
    path.write_text(json.dumps([{"teacher": [1], "student": 3}]))
    with pytest.raises(ValueError, match="student block 3"):
        make_alignment(str(path), 6, 3)
    with pytest.raises(ValueError, match="preset|JSON"):
        make_alignment("nowhere.json", 6, 3)
    with pytest.raises(ValueError, match="teacher_layers >= student_layers"):
        make_alignment("full", 2, 3)


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_derangement_has_no_fixed_points(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(50):
        p = derangement(n, g)
        assert sorted(p.tolist()) == list(range(n))
        assert not (p == torch.arange(n)).any()


def test_spans_inside_real_tokens_and_respect_p():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 17, 40, 1, 9, 64, 2, 33])
    am = (torch.arange(64)[None] < lengths[:, None]).long()
    align = make_alignment("middle", 4, 2)
    for p in (0.1, 0.3, 1.0):
        for _ in range(200):
            plan = sample_plan(am, align, g, span_fraction=p)
            src_len = lengths[plan.pi]
            expect_k = torch.clamp((p * torch.minimum(lengths, src_len).double()).floor().long(), min=1)
            assert torch.equal(plan.span_len, expect_k)
            assert (plan.base_start >= 0).all() and (plan.base_start + plan.span_len <= lengths).all()
            assert (plan.source_start >= 0).all() and (plan.source_start + plan.span_len <= src_len).all()


def test_sampling_is_seeded():
    am = torch.ones(4, 10, dtype=torch.long)
    a = sample_plan(am, make_alignment("full", 4, 2), torch.Generator().manual_seed(3))
    b = sample_plan(am, make_alignment("full", 4, 2), torch.Generator().manual_seed(3))
    assert a.teacher_layers == b.teacher_layers and torch.equal(a.pi, b.pi) and torch.equal(a.base_start, b.base_start)


def test_bad_plans_and_masks():
    am = (torch.arange(6)[None] < torch.tensor([[6], [3]])).long()
    plan = InterventionPlan((1,), 0, torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([0, 0]),
                            torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="longer than its base"):
        check_plan(plan, am)
    plan.base_start, plan.source_start = torch.tensor([3, 0]), torch.tensor([1, 0])
    with pytest.raises(ValueError, match="longer than its source"):
        check_plan(plan, am)
    plan = InterventionPlan((1,), 0, torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([0, 0]),
                            torch.tensor([1, 1]), dims=(0, 40))
    with pytest.raises(ValueError, match="dims"):
        check_plan(plan, am, (32,))
    assert real_lengths(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist() == [2, 2]  # left and right padding
    with pytest.raises(ValueError, match="one block"):
        real_lengths(torch.tensor([[1, 0, 1]]))


def test_batch_of_one_warns():
    import torch
    import pytest
    from iit_fast.sampling import make_alignment, sample_plan
    with pytest.warns(UserWarning, match="its own source"):
        plan = sample_plan(torch.ones(1, 5, dtype=torch.long), make_alignment("middle", 4, 2),
                           torch.Generator().manual_seed(0))
    assert plan.pi.tolist() == [0]
