"""benchmarks/replicate.py's statistics: runs are paired by seed with their baseline mode, and the 95%
interval is Student's t over the per-seed differences (hand-computed values, so a wrong pairing, sign or
quantile fails)."""
import math

import pytest

from benchmarks.replicate import COMPARISONS, MODES, differences, interval, paired_runs


def run(mode, seed, ppl, wall=100.0):
    return {"mode": mode, "seed": seed, "wall_s": wall,
            "eval": {"mlm": {"perplexity": ppl, "top1": 0.2}, "iia": {"iia": 0.5, "cf_kl": 0.3}}}


def test_interval_is_students_t():
    m, h = interval([1.0, 2.0, 3.0])            # sd 1, n 3: 4.303 / sqrt(3)
    assert m == 2.0 and h == pytest.approx(4.303 / math.sqrt(3))
    m, h = interval([-1.0, 1.0])                # sd sqrt(2), n 2: 12.706 * sqrt(2) / sqrt(2)
    assert m == 0.0 and h == pytest.approx(12.706)
    assert math.isnan(interval([5.0])[1])       # one seed: no interval


def test_pairs_are_by_seed_and_baseline():
    infos = [run("standard", 0, 100.0), run("causal", 1, 90.0), run("standard", 1, 95.0),
             run("causal", 0, 99.0), run("causal-nomlm", 0, 50.0), run("standard-nomlm", 0, 60.0)]
    assert [(b["seed"], c["seed"]) for b, c in paired_runs(infos, "causal", "standard")] == [(1, 1), (0, 0)]
    assert [b["mode"] for b, _ in paired_runs(infos, "causal-nomlm", "standard-nomlm")] == ["standard-nomlm"]
    assert paired_runs(infos, "causal-masked", "standard") == []  # no run of that mode: no pair
    rows = {(r["comparison"], r["metric"]): r for r in differences(infos)}
    ppl = rows[("causal - standard", "val. perplexity")]
    assert ppl["values"] == [-5.0, -1.0] and ppl["mean_value"] == -3.0
    assert ppl["half_width"] == pytest.approx(12.706 * math.sqrt(8) / math.sqrt(2))
    assert rows[("causal-nomlm - standard-nomlm", "val. perplexity")]["values"] == [-10.0]
    assert ("causal - standard", "downstream acc.") not in rows  # no downstream run: no row


def test_every_comparison_names_two_modes():
    for mode, base in COMPARISONS:
        assert mode in MODES and base in MODES and mode != base
    assert all("--mode" in flags for flags in MODES.values())
