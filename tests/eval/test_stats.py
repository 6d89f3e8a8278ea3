"""Seed statistics against values worked out by hand (t quantiles from printed tables)."""
import math

import pytest

from kdray.eval.stats import describe, paired

T975_DF2 = 4.302652729911275   # Student t, 97.5 % quantile, 2 degrees of freedom
T975_DF3 = 3.182446305284263


def test_describe_three_values():
    d = describe([1.0, 2.0, 3.0])
    # mean 2, std sqrt(((1)^2 + 0 + 1^2) / 2) = 1, half-width t * 1 / sqrt(3)
    assert d["n"] == 3 and d["mean"] == 2.0 and d["std"] == pytest.approx(1.0, rel=1e-12)
    assert d["ci95"] == pytest.approx(T975_DF2 / math.sqrt(3), rel=1e-9)


def test_describe_four_values():
    d = describe([60.0, 62.0, 61.0, 65.0])
    # mean 62; squared deviations 4, 0, 1, 9 -> var 14/3
    assert d["mean"] == 62.0 and d["std"] == pytest.approx(math.sqrt(14 / 3), rel=1e-12)
    assert d["ci95"] == pytest.approx(T975_DF3 * math.sqrt(14 / 3) / 2, rel=1e-9)


def test_describe_one_and_no_values_have_no_interval():
    one = describe([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["std"]) and math.isnan(one["ci95"])
    assert describe([])["n"] == 0 and math.isnan(describe([])["mean"])


def test_paired_unresolved_by_hand():
    # differences 2, 3, 1: mean 2, std 1; t = 2 / (1 / sqrt 3) = sqrt 12; with 2 df the t CDF is
    # 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12 / 14)
    r = paired([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])
    half = T975_DF2 / math.sqrt(3)
    assert r["diff"] == 2.0
    assert (r["ci_lo"], r["ci_hi"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert r["p"] == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    assert r["resolved"] is False          # -0.48 < 0 < 4.48


def test_paired_resolved_by_hand():
    # differences 1.0, 1.2, 0.8: mean 1, std 0.2 -> half-width t * 0.2 / sqrt 3 = 0.4968 < 1
    r = paired([11.0, 21.2, 30.8], [10.0, 20.0, 30.0])
    assert r["diff"] == pytest.approx(1.0, rel=1e-12)
    assert r["ci_lo"] == pytest.approx(1 - T975_DF2 * 0.2 / math.sqrt(3), rel=1e-9)
    # t = 1 / (0.2 / sqrt 3) = 5 sqrt 3; p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(75 / 77)
    assert r["p"] == pytest.approx(1 - math.sqrt(75 / 77), rel=1e-9)
    assert r["resolved"] is True
    # the same rows unpaired would not be resolved: the seed effect (10, 20, 30) dominates
    assert describe([11.0, 21.2, 30.8])["ci95"] > 20


def test_paired_edge_cases():
    same = paired([2.0, 3.0], [1.0, 2.0])                 # identical differences: zero width
    assert (same["ci_lo"], same["ci_hi"], same["p"], same["resolved"]) == (1.0, 1.0, 0.0, True)
    one = paired([2.0], [1.0])
    assert one["diff"] == 1.0 and math.isnan(one["p"]) and one["resolved"] is False
    with pytest.raises(ValueError, match="2 values against 3"):
        paired([1.0, 2.0], [1.0, 2.0, 3.0])
