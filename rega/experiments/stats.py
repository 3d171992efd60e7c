"""Statistics for the report: bootstrap confidence intervals, paired tests, aggregation over seeds.

A score is built from *units*: one task, general multiple-choice set or drift source, holding per-item numerators
and denominators for every seed (``num``, ``den``: arrays [seeds, items], items in one shared order). A unit's
value is sum(num) / sum(den) — a mean of per-item scores when ``den`` is 1, a token-weighted mean log-probability
for drift. A column is a weighted sum of unit values (a task: one unit; a domain mean: its tasks, 1/k each; the
mean over domains: each task weighted by 1/(domains × tasks of its domain)).

* **Confidence interval** of a column: percentile bootstrap, resampling items within each unit (stratified, so
  every task keeps its size) and, with several seeds, the seeds too (two-stage: the interval covers item and seed
  variation). ``B`` resamples from a fixed generator: the same data give the same interval.
* **Paired difference** A − B on the same items, of the seed-means; the interval resamples the items once for both
  sides (paired bootstrap) and, where a side has several seeds, that side's seeds too (each side's own draw: two
  strategies are trained apart), so a difference between strategies carries their seed-to-seed variation and not
  only that of the items. The p-value: an exact McNemar test when both sides are one seed of one closed task (0/1
  per item), a paired permutation test (each item's two sides swapped at random) for other one-seed comparisons,
  and with several seeds the two-sided bootstrap p-value of that same resampling (twice the share of resamples on
  the far side of 0), so it agrees with the interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

B_DEFAULT = 2000
ALPHA = 0.05


@dataclass
class Unit:
    """Per-item results of one unit: ``num`` and ``den`` arrays [seeds, items]; ``binary``: 0/1 scores."""

    num: np.ndarray
    den: np.ndarray
    binary: bool = False

    @classmethod
    def of(cls, per_seed: Sequence[Sequence[float]], den: Sequence[Sequence[float]] | None = None) -> Unit:
        num = np.asarray(per_seed, dtype=np.float64)
        weights = np.ones_like(num) if den is None else np.asarray(den, dtype=np.float64)
        binary = den is None and bool(np.isin(num, (0.0, 1.0)).all())
        return cls(num, weights, binary)

    @property
    def value(self) -> float:
        return float(self.num.sum() / self.den.sum())

    def seed_values(self) -> np.ndarray:
        return self.num.sum(1) / self.den.sum(1)


Column = Mapping[str, float]  # unit name -> weight


def column_value(units: Mapping[str, Unit], column: Column) -> float:
    return sum(w * units[name].value for name, w in column.items())


def seed_spread(units: Mapping[str, Unit], column: Column) -> float | None:
    """Standard deviation over seeds of the column's per-seed values (None for one seed)."""
    seeds = {units[name].num.shape[0] for name in column}
    if seeds != {next(iter(seeds))} or next(iter(seeds)) < 2:
        return None
    values = sum(w * units[name].seed_values() for name, w in column.items())
    return float(np.std(values, ddof=1))


def _resampled_value(unit: Unit, items: np.ndarray, seeds: np.ndarray | None) -> np.ndarray:
    """Unit values [B] for item resamples ``items`` [B, n] and seed resamples ``seeds`` [B, S] (or None)."""
    num = unit.num[:, items].sum(-1).T  # [B, S]
    den = unit.den[:, items].sum(-1).T
    if seeds is not None:
        num, den = np.take_along_axis(num, seeds, 1), np.take_along_axis(den, seeds, 1)
    return num.sum(1) / den.sum(1)


def _seed_draws(units: Mapping[str, Unit], column: Column, rng, b: int) -> dict[str, np.ndarray | None]:
    """{unit: seeds drawn per resample} for one side: one draw shared by its units with the same number of seeds
    (a seed is one trained model answering every task); None for a unit of one seed."""
    counts = {name: units[name].num.shape[0] for name in column}
    shared = {s: rng.integers(0, s, size=(b, s)) for s in sorted(set(counts.values())) if s > 1}
    return {name: shared.get(s) for name, s in counts.items()}


def bootstrap_ci(
    units: Mapping[str, Unit], column: Column, b: int = B_DEFAULT, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of the column over items and, where a unit has several seeds, its seeds (drawn as
    in ``_seed_draws``)."""
    rng = np.random.default_rng(seed)
    seeds = _seed_draws(units, column, rng, b)
    total = np.zeros(b)
    for name in sorted(column):
        unit = units[name]
        items = rng.integers(0, unit.num.shape[1], size=(b, unit.num.shape[1]))
        total += column[name] * _resampled_value(unit, items, seeds[name])
    lo, hi = np.quantile(total, [ALPHA / 2, 1 - ALPHA / 2])
    return float(lo), float(hi)


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar test of paired 0/1 outcomes: a binomial test on the discordant pairs."""
    only_a = int(((a == 1) & (b == 0)).sum())
    only_b = int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(
    a: Mapping[str, Unit], b: Mapping[str, Unit], column: Column, n_resamples: int = B_DEFAULT, seed: int = 0
) -> dict:
    """A − B on the column over the items both share (units aligned by the caller): the difference of the
    seed-means, its 95 % paired-bootstrap interval, a p-value and the test that gave it."""
    rng = np.random.default_rng(seed)
    diff = column_value(a, column) - column_value(b, column)
    seeds_a, seeds_b = _seed_draws(a, column, rng, n_resamples), _seed_draws(b, column, rng, n_resamples)
    several = any(d is not None for d in (*seeds_a.values(), *seeds_b.values()))
    boot = np.zeros(n_resamples)
    perm = np.zeros(n_resamples)
    for name in sorted(column):
        n = a[name].num.shape[1]
        items = rng.integers(0, n, size=(n_resamples, n))
        if several:
            boot += column[name] * (
                _resampled_value(a[name], items, seeds_a[name])
                - _resampled_value(b[name], items, seeds_b[name])
            )
            continue
        (na, da), (nb, db) = (a[name].num[0], a[name].den[0]), (b[name].num[0], b[name].den[0])
        boot += column[name] * (na[items].sum(-1) / da[items].sum(-1) - nb[items].sum(-1) / db[items].sum(-1))
        swap = rng.random((n_resamples, n)) < 0.5
        pa_num, pa_den = np.where(swap, nb, na).sum(-1), np.where(swap, db, da).sum(-1)
        pb_num, pb_den = np.where(swap, na, nb).sum(-1), np.where(swap, da, db).sum(-1)
        perm += column[name] * (pa_num / pa_den - pb_num / pb_den)
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    out = {"diff": diff, "lo": float(lo), "hi": float(hi)}
    only = next(iter(column)) if len(column) == 1 else None
    if several:
        far = min(int((boot <= 0).sum()), int((boot >= 0).sum()))
        out.update(p=min(1.0, 2 * (far + 1) / (n_resamples + 1)), test="bootstrap")
    elif only and a[only].binary and b[only].binary:
        out.update(p=mcnemar_p(a[only].num[0], b[only].num[0]), test="mcnemar")
    else:
        # +1 in both counts: the observed assignment is one of the permutations (never p = 0).
        extreme = int((np.abs(perm) >= abs(diff) - 1e-12).sum())
        out.update(p=(extreme + 1) / (n_resamples + 1), test="permutation")
    return out


def align(units_a: Mapping[str, tuple[list[str], Unit]], units_b: Mapping[str, tuple[list[str], Unit]]):
    """Both sides restricted to the items they share, in one order: ({name: Unit}, {name: Unit}, {name: n})."""
    out_a, out_b, sizes = {}, {}, {}
    for name in sorted(set(units_a) & set(units_b)):
        ids_a, ua = units_a[name]
        ids_b, ub = units_b[name]
        index_b = {item: k for k, item in enumerate(ids_b)}
        shared = [(k, index_b[item]) for k, item in enumerate(ids_a) if item in index_b]
        if not shared:
            continue
        ka, kb = (np.array(x) for x in zip(*shared))
        out_a[name] = Unit(ua.num[:, ka], ua.den[:, ka], ua.binary)
        out_b[name] = Unit(ub.num[:, kb], ub.den[:, kb], ub.binary)
        sizes[name] = len(shared)
    return out_a, out_b, sizes
