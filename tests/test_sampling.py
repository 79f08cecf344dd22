"""Alignments, in-batch derangements and spans: span lengths against hand-computed values, and the draws'
distributions (the derangement uniform over all derangements, the two starts uniform and independent, the
alignment pair uniform) by chi-square tests with fixed seeds, each beside a biased sampler that fails it."""
import itertools
import json
import math

import pytest
import torch

from iit_fast.sampling import (InterventionPlan, check_plan, derangement, make_alignment, real_lengths,
                               sample_plan, sample_spans)

# A sampler with the right distribution fails a chi-square test at this level once in a million seeds; the
# seeds are fixed, so the tests are deterministic. The biased samplers below miss it by hundreds of orders.
ALPHA = 1e-6


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """P(chi2 >= observed) for counts against expected counts (same shape), dof = cells - 1."""
    counts, expected = counts.double().flatten(), expected.double().flatten()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))  # the chi2 survival function


def test_chi_square_p_by_hand():
    # dof 1: P(chi2 >= 3.841) = 0.05; dof 2: P(chi2 >= x) = exp(-x / 2)
    assert chi_square_p(torch.tensor([60.0, 40.0]), torch.tensor([50.0, 50.0])) == pytest.approx(0.0455, abs=1e-4)
    c, e = torch.tensor([30.0, 40, 50]), torch.tensor([40.0, 40, 40])
    assert chi_square_p(c, e) == pytest.approx(math.exp(-5.0 / 2), rel=1e-9)


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


LENGTHS = torch.tensor([3, 17, 40, 1, 9, 64, 2, 33])
PI = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])  # min(own, source) length: 3, 17, 1, 1, 9, 2, 2, 3
# k = max(1, floor(p * min)), worked out by hand from the line above
K_BY_HAND = {0.1: [1, 1, 1, 1, 1, 1, 1, 1], 0.3: [1, 5, 1, 1, 2, 1, 1, 1], 0.5: [1, 8, 1, 1, 4, 1, 1, 1],
             1.0: [3, 17, 1, 1, 9, 2, 2, 3]}


@pytest.mark.parametrize("p", list(K_BY_HAND))
def test_span_lengths_by_hand(p):
    k, base_start, source_start = sample_spans(LENGTHS, PI, p, torch.Generator().manual_seed(0))
    assert k.tolist() == K_BY_HAND[p]


def test_spans_inside_real_tokens():
    g = torch.Generator().manual_seed(0)
    am = (torch.arange(64)[None] < LENGTHS[:, None]).long()
    align = make_alignment("middle", 4, 2)
    for p in (0.1, 0.3, 1.0):
        for _ in range(200):
            plan = sample_plan(am, align, g, span_fraction=p)
            src_len = LENGTHS[plan.pi]
            assert (plan.span_len >= 1).all() and (plan.span_len <= torch.minimum(LENGTHS, src_len)).all()
            assert (plan.base_start >= 0).all() and (plan.base_start + plan.span_len <= LENGTHS).all()
            assert (plan.source_start >= 0).all() and (plan.source_start + plan.span_len <= src_len).all()


# ---- distributions ------------------------------------------------------------------------------------

def derangement_p(sample, n: int, per_cell: int = 200, seed: int = 0) -> float:
    """Chi-square p-value of `sample(n, generator)` against the uniform law on the derangements of n."""
    every = [p for p in itertools.permutations(range(n)) if all(p[i] != i for i in range(n))]
    index = {p: i for i, p in enumerate(every)}         # D(3) = 2, D(4) = 9, D(5) = 44
    counts = torch.zeros(len(every))
    g = torch.Generator().manual_seed(seed)
    for _ in range(per_cell * len(every)):
        counts[index[tuple(sample(n, g).tolist())]] += 1  # a KeyError: not a derangement
    return chi_square_p(counts, torch.full_like(counts, per_cell))


def sattolo(n: int, g: torch.Generator) -> torch.Tensor:
    """A uniformly random n-cycle: a derangement, but only (n-1)! of the D(n) (6 of 9 for n = 4)."""
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(torch.randint(i, (1,), generator=g))
        p[i], p[j] = p[j], p[i]
    return torch.tensor(p)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_derangement_is_uniform(n):
    assert derangement_p(derangement, n) > ALPHA


def test_a_biased_derangement_fails_the_uniformity_check():
    assert derangement_p(sattolo, 4) < ALPHA


def starts_p(sampler, reps: int = 3200, seed: int = 0) -> list[float]:
    """Per row of a 4-row batch: the chi-square p-value of the joint (base start, source start) counts
    against the uniform law on {0..len-k} x {0..src_len-k}, over `reps` draws (rows repeated in one call)."""
    lengths, pi, p = torch.tensor([9, 5, 7, 3]), torch.tensor([1, 2, 3, 0]), 0.5
    rows = lengths.numel()
    big_pi = pi.repeat(reps) + rows * torch.arange(reps).repeat_interleave(rows)   # each copy its own batch
    k, base, source = (t.view(reps, rows) for t in sampler(lengths.repeat(reps), big_pi, p,
                                                          torch.Generator().manual_seed(seed)))
    # by hand: min(9, 5) = 5 -> k = floor(2.5) = 2; min(5, 7) = 5 -> 2; min(7, 3) = 3 -> 1; min(3, 9) -> 1
    assert k.tolist() == [[2, 2, 1, 1]] * reps
    out = []
    for r, (nb, ns) in enumerate([(8, 4), (4, 6), (7, 3), (3, 9)]):   # (len - k + 1, src_len - k + 1)
        counts = torch.zeros(nb, ns)
        counts.index_put_((base[:, r], source[:, r]), torch.ones(reps), accumulate=True)
        out.append(chi_square_p(counts, torch.full_like(counts, reps / (nb * ns))))
    return out


def test_span_starts_are_uniform_and_independent():
    assert min(starts_p(sample_spans)) > ALPHA


def never_the_last_start(lengths, pi, p, g):
    k, base, source = sample_spans(lengths, pi, p, g)
    return k, torch.minimum(base, lengths - k - 1).clamp(min=0), source


def one_draw_for_both_starts(lengths, pi, p, g):
    """Each start uniform on its own, but both from one uniform draw: not independent."""
    k, _, _ = sample_spans(lengths, pi, p, g)
    u = torch.rand(lengths.numel(), generator=g, dtype=torch.float64)
    return k, (u * (lengths - k + 1)).floor().long(), (u * (lengths[pi] - k + 1)).floor().long()


@pytest.mark.parametrize("biased", [never_the_last_start, one_draw_for_both_starts])
def test_biased_starts_fail_the_check(biased):
    assert min(starts_p(biased)) < ALPHA


def test_alignment_pair_is_uniform():
    align = make_alignment("full", 12, 6)   # 6 pairs
    g = torch.Generator().manual_seed(0)
    am = torch.ones(4, 8, dtype=torch.long)
    counts = torch.zeros(len(align))
    for _ in range(200 * len(align)):
        plan = sample_plan(am, align, g)
        counts[align.index((plan.teacher_layers, plan.student_layer))] += 1
    assert chi_square_p(counts, torch.full_like(counts, 200)) > ALPHA


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
