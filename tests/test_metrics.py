"""Clinical metrics: fast implementations against sklearn, thresholds by brute force,
Wilson intervals against the textbook formula and a published example."""
import math
from statistics import NormalDist

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from triage.metrics import (
    BOOTSTRAP,
    METRICS,
    WILSON,
    ece_score,
    evaluate_scores,
    fast_average_precision,
    fast_roc_auc,
    paired_delta,
    point_metrics,
    threshold_for_sensitivity,
    wilson_interval,
)


def _data(seed, n=200, prevalence=0.3, signal=1.5, decimals=None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2] = [0, 1]  # both classes present
    score = 1 / (1 + np.exp(-(rng.normal(size=n) + signal * (2 * y - 1))))
    if decimals is not None:
        score = np.round(score, decimals)  # many ties
    return y, score


# --------------------------------------------------------------------------- fast metrics


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_fast_roc_auc_equals_sklearn(seed, decimals):
    y, p = _data(seed, n=150, decimals=decimals)
    assert fast_roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_fast_average_precision_equals_sklearn(seed, decimals):
    y, p = _data(seed, n=150, decimals=decimals)
    assert fast_average_precision(y, p) == pytest.approx(average_precision_score(y, p),
                                                         abs=1e-12)


def test_fast_metrics_with_all_scores_tied_and_extreme_orders():
    y = np.array([0, 1, 0, 1, 1, 0])
    flat = np.full(6, 0.5)
    assert fast_roc_auc(y, flat) == pytest.approx(roc_auc_score(y, flat)) == pytest.approx(0.5)
    assert fast_average_precision(y, flat) == pytest.approx(average_precision_score(y, flat))
    perfect = y + 0.1
    assert fast_roc_auc(y, perfect) == 1.0 and fast_average_precision(y, perfect) == 1.0
    assert fast_roc_auc(y, -perfect) == 0.0
    assert fast_average_precision(y, -perfect) == pytest.approx(
        average_precision_score(y, -perfect))


# --------------------------------------------------------------------------- threshold


def _sens(y, p, t):
    return ((p >= t) & (y == 1)).sum() / (y == 1).sum()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.97, 1.0])
def test_threshold_is_the_highest_reaching_the_target(seed, target):
    y, p = _data(seed, n=[20, 60, 100, 137, 200][seed], decimals=2 if seed % 2 else None)
    t = threshold_for_sensitivity(y, p, target)
    assert _sens(y, p, t) >= target - 1e-12
    # brute force: sensitivity only changes at observed scores, so the highest threshold
    # that still reaches the target is the largest observed score that does.
    ok = [u for u in np.unique(p) if _sens(y, p, u) >= target - 1e-12]
    assert t == max(ok)
    above = np.unique(p)[np.unique(p) > t]
    if len(above):
        assert _sens(y, p, above[0]) < target


def test_threshold_exact_fraction_edge():
    # 20 positives, target 0.95 -> exactly one positive may fall below the threshold;
    # (1 - 0.95) * 20 is 1.0000000000000009 in floating point.
    y = np.r_[np.ones(20, int), np.zeros(5, int)]
    p = np.r_[np.linspace(0.05, 1.0, 20), np.full(5, 0.5)]
    t = threshold_for_sensitivity(y, p, 0.95)
    assert t == pytest.approx(p[1])
    assert _sens(y, p, t) == pytest.approx(0.95)


def test_threshold_needs_positives():
    with pytest.raises(ValueError):
        threshold_for_sensitivity(np.zeros(5, int), np.linspace(0, 1, 5), 0.9)


# --------------------------------------------------------------------------- Wilson


def _wilson_by_quadratic(k, n, level):
    """Wilson bounds are the roots in p of (phat - p)^2 = z^2 p (1 - p) / n."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    phat = k / n
    a = 1 + z * z / n
    b = -(2 * phat + z * z / n)
    c = phat * phat
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


def test_wilson_textbook_example():
    # Newcombe (1998), Stat Med 17:857, method 3 for 81/263: 0.2553 to 0.3662
    lo, hi = wilson_interval(81, 263, 0.95)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)


@pytest.mark.parametrize("k,n,level", [(81, 263, 0.95), (1, 10, 0.95), (9, 10, 0.9),
                                       (15, 148, 0.99), (50, 100, 0.8), (3, 7, 0.95)])
def test_wilson_equals_the_quadratic_roots(k, n, level):
    lo, hi = wilson_interval(k, n, level)
    elo, ehi = _wilson_by_quadratic(k, n, level)
    assert lo == pytest.approx(elo, abs=1e-10) and hi == pytest.approx(ehi, abs=1e-10)
    assert lo <= k / n <= hi


def test_wilson_edges():
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(
        _wilson_by_quadratic(0, 10, 0.95)[1])
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0, abs=1e-12) and 0.6 < lo < 0.8
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    assert wilson_interval(5, 10, 0.99)[0] < wilson_interval(5, 10, 0.9)[0]


# --------------------------------------------------------------------------- ECE


def test_ece_of_perfectly_calibrated_bins_is_zero():
    # every bin holds one score value whose positive rate is exactly that value
    ys, ps = [], []
    for value, n in [(0.05, 20), (0.25, 20), (0.5, 10), (0.7, 10), (0.95, 20)]:
        k = round(value * n)
        ys += [1] * k + [0] * (n - k)
        ps += [value] * n
    assert ece_score(np.array(ys), np.array(ps), 10) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_known_miscalibration():
    # all scores 0.9, half positive: |0.5 - 0.9| = 0.4 in the only bin
    y = np.array([0, 1] * 10)
    assert ece_score(y, np.full(20, 0.9)) == pytest.approx(0.4)
    # two bins, weighted by size: 10 at 0.1 with 5 positives (0.4 off), 30 at 0.8 all positive
    y = np.r_[np.ones(5), np.zeros(5), np.ones(30)]
    p = np.r_[np.full(10, 0.1), np.full(30, 0.8)]
    assert ece_score(y, p, 10) == pytest.approx((10 * 0.4 + 30 * 0.2) / 40)


def test_ece_score_of_one_lands_in_the_last_bin():
    assert ece_score(np.array([1, 1]), np.array([1.0, 1.0]), 10) == pytest.approx(0.0)


# --------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def example():
    y, p = _data(42, n=300, prevalence=0.35)
    t = threshold_for_sensitivity(y, p, 0.9)
    res = evaluate_scores(y, p, t, n_bootstrap=300, level=0.95, seed=1)
    return y, p, t, res


def test_evaluate_scores_keys(example):
    *_, res = example
    for m in METRICS:
        assert m in res
    for m in WILSON + BOOTSTRAP:
        assert f"{m}_ci_low" in res and f"{m}_ci_high" in res


def test_evaluate_point_values_match_sklearn(example):
    y, p, t, res = example
    pred = (p >= t).astype(int)
    assert res["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert res["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert res["f1"] == pytest.approx(f1_score(y, pred))
    assert res["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert res["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert res["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert res["ppv"] == pytest.approx(precision_score(y, pred))
    assert res["npv"] == pytest.approx(precision_score(1 - y, 1 - pred))
    assert res["brier"] == pytest.approx(brier_score_loss(y, p))
    assert res["fn"] == int(((pred == 0) & (y == 1)).sum())
    assert res["threshold"] == t


def test_evaluate_intervals_bracket_the_point(example):
    *_, res = example
    for m in WILSON + BOOTSTRAP:
        lo, hi = res[f"{m}_ci_low"], res[f"{m}_ci_high"]
        assert lo <= res[m] <= hi, m
        assert lo < hi, m


def test_evaluate_wilson_intervals_use_the_confusion_counts(example):
    y, p, t, res = example
    pred = p >= t
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    lo, hi = _wilson_by_quadratic(tp, tp + fn, 0.95)
    assert res["sensitivity_ci_low"] == pytest.approx(lo)
    assert res["sensitivity_ci_high"] == pytest.approx(hi)


def test_evaluate_bootstrap_is_seeded_and_narrows_with_level(example):
    y, p, t, res = example
    again = evaluate_scores(y, p, t, n_bootstrap=300, level=0.95, seed=1)
    assert again == res
    narrow = evaluate_scores(y, p, t, n_bootstrap=300, level=0.6, seed=1)
    assert narrow["roc_auc_ci_high"] - narrow["roc_auc_ci_low"] < \
        res["roc_auc_ci_high"] - res["roc_auc_ci_low"]


def test_evaluate_without_bootstrap_has_only_wilson_intervals(example):
    y, p, t, _ = example
    res = evaluate_scores(y, p, t, n_bootstrap=0)
    assert "sensitivity_ci_low" in res and "roc_auc_ci_low" not in res


# --------------------------------------------------------------------------- paired delta


def test_paired_delta_of_identical_scores_is_zero():
    y, p = _data(3, n=200)
    res = paired_delta(y, p, p.copy(), 0.5, 0.5, n_bootstrap=200, seed=0)
    for m in METRICS:
        assert res[m] == 0.0, m
    for m in BOOTSTRAP:
        assert res[f"{m}_ci_low"] == 0.0 and res[f"{m}_ci_high"] == 0.0, m


def test_paired_delta_detects_a_better_model():
    rng = np.random.default_rng(7)
    y, good = _data(7, n=240, signal=2.0)
    noise = rng.random(len(y))
    res = paired_delta(y, noise, good, 0.5, 0.5, n_bootstrap=300, seed=0)
    assert res["roc_auc"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, noise))
    assert res["roc_auc_ci_low"] > 0  # b clearly better than a
    assert res["roc_auc_ci_low"] <= res["roc_auc"] <= res["roc_auc_ci_high"]
    swapped = paired_delta(y, good, noise, 0.5, 0.5, n_bootstrap=300, seed=0)
    assert swapped["roc_auc_ci_high"] == pytest.approx(-res["roc_auc_ci_low"])


def test_point_metrics_single_class_has_nan_auc():
    res = point_metrics(np.ones(5, int), np.linspace(0.1, 0.9, 5), 0.5)
    assert math.isnan(res["roc_auc"]) and math.isnan(res["specificity"])
    assert res["sensitivity"] == pytest.approx(3 / 5)  # 0.5, 0.7, 0.9 of 0.1..0.9
