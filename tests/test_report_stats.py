"""Statistics of the report: bootstrap intervals, paired tests (McNemar, permutation), seeds, and the report's
tables built from per-item results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rega.experiments.stats import Unit, align, bootstrap_ci, mcnemar_p, paired_difference, seed_spread


def test_bootstrap_interval_of_a_proportion_matches_the_normal_approximation():
    scores = [1.0] * 60 + [0.0] * 40  # 100 items, accuracy 0.6
    unit = Unit.of([scores])
    assert unit.binary and unit.value == pytest.approx(0.6)
    lo, hi = bootstrap_ci({"t": unit}, {"t": 1.0}, b=4000)
    half = 1.96 * math.sqrt(0.6 * 0.4 / 100)  # 0.096
    assert lo == pytest.approx(0.6 - half, abs=0.02) and hi == pytest.approx(0.6 + half, abs=0.02)
    assert bootstrap_ci({"t": unit}, {"t": 1.0}) == bootstrap_ci({"t": unit}, {"t": 1.0})  # seeded
    assert bootstrap_ci({"t": Unit.of([[1.0] * 10])}, {"t": 1.0}) == (1.0, 1.0)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    a = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3)
    expected = 2 * sum(math.comb(12, i) for i in range(3)) / 2**12  # 0.0386
    assert mcnemar_p(a, b) == pytest.approx(expected)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert mcnemar_p(a, b) == pytest.approx(scipy_stats.binomtest(2, 12, 0.5).pvalue)
    assert mcnemar_p(a, a) == 1.0


def test_paired_difference_detects_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(1)
    base = (rng.random(300) < 0.4).astype(float)
    better = np.where(rng.random(300) < 0.25, 1.0, base)  # +~15 points on the same items
    a, b = {"t": Unit.of([better])}, {"t": Unit.of([base])}
    out = paired_difference(a, b, {"t": 1.0})
    assert out["test"] == "mcnemar" and out["diff"] == pytest.approx(better.mean() - base.mean())
    assert out["lo"] > 0 and out["p"] < 1e-6
    same = paired_difference(b, {"t": Unit.of([base])}, {"t": 1.0})
    assert same["diff"] == 0 and same["p"] == 1.0 and same["lo"] == same["hi"] == 0
    f1 = {"t": Unit.of([rng.random(50)])}  # not 0/1: a permutation test
    noisy = paired_difference(f1, {"t": Unit.of([rng.random(50)])}, {"t": 1.0})
    assert noisy["test"] == "permutation" and 0 < noisy["p"] <= 1 and noisy["lo"] < 0 < noisy["hi"]


def test_a_paired_test_with_several_seeds_carries_their_variation():
    # Token-weighted drift: per-item log-probabilities vary far more between items than between the two sides.
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 60, size=200).astype(float)
    base = rng.normal(-2.0, 0.6, size=200) * tokens
    shifted = base - 0.05 * tokens  # 0.05 nats/token lower on every item: a real, consistent gap
    a = {"d": Unit(shifted[None], tokens[None])}
    one = paired_difference(a, {"d": Unit(base[None], tokens[None])}, {"d": 1.0})
    assert one["test"] == "permutation" and one["p"] < 0.01 and one["hi"] < 0
    # Two identical seeds: the same models twice, so the same difference, interval and verdict.
    twice = paired_difference(a, {"d": Unit(np.stack([base, base]), np.stack([tokens, tokens]))}, {"d": 1.0})
    assert twice["test"] == "bootstrap" and twice["diff"] == pytest.approx(one["diff"])
    assert twice["lo"] == pytest.approx(one["lo"], abs=0.005)
    assert twice["hi"] == pytest.approx(one["hi"], abs=0.005)
    assert twice["p"] < 0.01
    # Two seeds ±0.1 nats/token apart (mean = base): the gap of 0.05 is within the seed-to-seed variation.
    spread = np.stack([base + 0.1 * tokens, base - 0.1 * tokens])
    seeds = paired_difference(a, {"d": Unit(spread, np.stack([tokens, tokens]))}, {"d": 1.0})
    assert seeds["diff"] == pytest.approx(one["diff"]) and seeds["lo"] < 0 < seeds["hi"] and seeds["p"] > 0.2
    # A side whose tasks have different numbers of seeds (one seed's evaluation lacks a task) still uses them all.
    mixed_b = {"d": Unit(spread, np.stack([tokens, tokens])), "e": Unit(base[None], tokens[None])}
    mixed = paired_difference({**a, "e": Unit(base[None], tokens[None])}, mixed_b, {"d": 0.5, "e": 0.5})
    assert mixed["diff"] == pytest.approx(one["diff"] / 2) and mixed["lo"] < 0 < mixed["hi"]


def test_seeds_spread_and_widen_the_interval():
    rng = np.random.default_rng(0)
    per_seed = [(rng.random(200) < p).astype(float) for p in (0.4, 0.5, 0.6)]
    three = {"t": Unit.of(per_seed)}
    assert three["t"].value == pytest.approx(np.mean(per_seed))
    assert seed_spread(three, {"t": 1.0}) == pytest.approx(np.std([s.mean() for s in per_seed], ddof=1))
    pooled = {"t": Unit.of([np.mean(per_seed, axis=0)])}  # the same items, seed variation averaged away
    lo3, hi3 = bootstrap_ci(three, {"t": 1.0})
    lo1, hi1 = bootstrap_ci(pooled, {"t": 1.0})
    assert hi3 - lo3 > hi1 - lo1  # resampling seeds adds their variation
    assert seed_spread({"t": Unit.of([per_seed[0]])}, {"t": 1.0}) is None
    # A column whose tasks have different seed counts (one seed's evaluation lacks a task) resamples the seeds it has.
    other = {"u": Unit.of([(rng.random(200) < 0.5).astype(float)])}
    lo_mixed, hi_mixed = bootstrap_ci({**three, **other}, {"t": 0.5, "u": 0.5})
    lo_pooled, hi_pooled = bootstrap_ci({**pooled, **other}, {"t": 0.5, "u": 0.5})
    assert hi_mixed - lo_mixed > 1.2 * (hi_pooled - lo_pooled)


def test_weighted_columns_and_token_weighted_drift():
    drift = Unit(np.array([[-10.0, -30.0]]), np.array([[10.0, 20.0]]))
    assert drift.value == pytest.approx(-40 / 30)  # per token, not the mean of per-record means
    tasks = {"a": Unit.of([[1.0, 0.0]]), "b": Unit.of([[1.0, 1.0, 1.0, 0.0]])}
    lo, hi = bootstrap_ci(tasks, {"a": 0.5, "b": 0.5}, b=500)
    assert lo <= 0.5 * 0.5 + 0.5 * 0.75 <= hi


def test_align_keeps_the_shared_items_in_one_order():
    a = {"t": (["x", "y", "z"], Unit.of([[1.0, 0.0, 1.0]]))}
    b = {"t": (["z", "x"], Unit.of([[0.0, 1.0]])), "other": (["x"], Unit.of([[1.0]]))}
    ua, ub, sizes = align(a, b)
    assert set(ua) == {"t"} and sizes == {"t": 2}
    assert ua["t"].num.tolist() == [[1.0, 1.0]] and ub["t"].num.tolist() == [[1.0, 0.0]]
