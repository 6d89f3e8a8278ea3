"""Seed statistics for ablation tables (docs/methods.md section 5, "Reading a table").

A row of a table is run with several seeds; whether it differs from the table's baseline row is a
question about the *paired* differences (same seed = same data order, augmentation and initial
weights of everything the seed moves), which cancel most of the seed noise both rows share.

- :func:`describe`: mean, sample std (ddof 1) and the half-width of the two-sided 95 % Student-t
  confidence interval of the mean, ``t_{0.975, n-1} * std / sqrt(n)``.
- :func:`paired`: the same for the per-seed differences ``row - baseline``, the paired t-test's
  two-sided p-value, and ``resolved`` when the interval excludes 0.

scipy.stats supplies the t quantile and the test; with fewer than two seeds there is no interval
(NaN) and nothing is resolved.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats


def describe(values: Sequence[float]) -> dict:
    """{"n", "mean", "std", "ci95"}: ci95 is the interval's half-width (NaN when n < 2)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": math.nan}
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": float(x.mean()), "std": std, "ci95": half}


def paired(values: Sequence[float], baseline: Sequence[float]) -> dict:
    """Row minus baseline, seed by seed (equal lengths, same seed order).

    {"n", "diff", "ci_lo", "ci_hi", "p", "resolved"}: the mean difference, its 95 % interval,
    the paired t-test's two-sided p and whether the interval excludes 0. Identical differences
    on every seed (std 0) give a zero-width interval: p = 0 unless the difference is 0."""
    if len(values) != len(baseline):
        raise ValueError(f"paired: {len(values)} values against {len(baseline)} baseline values")
    d = describe(np.asarray(values, np.float64) - np.asarray(baseline, np.float64))
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    if d["n"] < 2:
        p = math.nan
    elif d["std"] == 0.0:
        p = 1.0 if d["mean"] == 0.0 else 0.0
    else:
        p = float(stats.ttest_rel(values, baseline).pvalue)
    resolved = bool(d["n"] >= 2 and (lo > 0.0 or hi < 0.0))
    return {"n": d["n"], "diff": d["mean"], "ci_lo": lo, "ci_hi": hi, "p": p,
            "resolved": resolved}
