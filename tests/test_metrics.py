"""Clinical metrics: fast implementations against sklearn, thresholds by brute force,
Wilson intervals against the textbook formula and a published example."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import yaml
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
    triage_at_targets,
    triage_key,
    triage_kpis,
    wilson_interval,
)
from triage.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------- triage KPI
# Hand-built: OOF (labelled) scores set the thresholds; the test scores are elsewhere, so
# the test-optimal threshold differs from the OOF one at every target.
OOF_POS = [0.30, 0.35, 0.40] + list(np.linspace(0.5, 0.95, 17))   # 20 positives
OOF_NEG = [0.1, 0.2, 0.3, 0.45, 0.6]
Y_OOF = np.array([1] * len(OOF_POS) + [0] * len(OOF_NEG))
P_OOF = np.array(OOF_POS + OOF_NEG)
TEST_POS = [0.32, 0.38, 0.42, 0.6, 0.7, 0.9]                      # 6 positives
TEST_NEG = [0.05, 0.2, 0.31, 0.36, 0.5, 0.8]                      # 6 negatives
Y_TEST = np.array([1] * 6 + [0] * 6)
P_TEST = np.array(TEST_POS + TEST_NEG)
CONTRACT = {f"{k}{suffix}" for k in ("sensitivity", "set_aside", "missed")
            for suffix in ("", "_ci_low", "_ci_high")}


@pytest.mark.parametrize("target,key", [(0.90, "s90"), (0.95, "s95"), (0.98, "s98"),
                                        (0.5, "s50"), (0.57, "s57"), (1.0, "s100")])
def test_triage_key_is_s_and_the_whole_percentage(target, key):
    assert triage_key(target) == key


@pytest.mark.parametrize("target", [0.995, 0.905, 0.9501])
def test_triage_key_refuses_a_target_that_is_not_a_whole_percentage(target):
    with pytest.raises(ValueError, match="whole percentage"):
        triage_key(target)


# target, key, OOF threshold (20 positives: floor((1-t)*20) may be below it), the
# test-optimal threshold (6 positives), test sensitivity, set aside (of 12), missed
HAND = [
    (0.90, "s90", 0.40, 0.32, 4 / 6, 6 / 12, 2),  # below 0.40: pos .32 .38; neg .05 .2 .31 .36
    (0.95, "s95", 0.35, 0.32, 5 / 6, 4 / 12, 1),  # below 0.35: pos .32; neg .05 .2 .31
    (0.98, "s98", 0.30, 0.32, 6 / 6, 2 / 12, 0),  # below 0.30: neg .05 .2
]


@pytest.mark.parametrize("target,key,thr,test_thr,sens,aside,missed", HAND)
def test_triage_at_targets_on_a_hand_built_example(target, key, thr, test_thr, sens, aside, missed):
    res = triage_at_targets(Y_OOF, P_OOF, Y_TEST, P_TEST, [0.90, 0.95, 0.98], level=0.95)
    assert list(res) == ["s90", "s95", "s98"]
    m = res[key]
    assert set(m) == CONTRACT | {"threshold"}
    # the threshold is the OOF one, not the one the test scores would pick
    assert m["threshold"] == pytest.approx(thr)
    assert m["threshold"] == threshold_for_sensitivity(Y_OOF, P_OOF, target)
    assert threshold_for_sensitivity(Y_TEST, P_TEST, target) == pytest.approx(test_thr) != thr
    assert m["sensitivity"] == pytest.approx(sens)
    # set aside = the share of test images predicted negative at the OOF threshold
    assert m["set_aside"] == pytest.approx(aside) == pytest.approx(np.mean(P_TEST < thr))
    # missed = the positives among the set-aside images (= false negatives), a count
    assert m["missed"] == missed == int(((Y_TEST == 1) & (P_TEST < thr)).sum())
    assert isinstance(m["missed"], int)
    assert m["missed"] == point_metrics(Y_TEST, P_TEST, thr)["fn"]
    for k in ("sensitivity", "set_aside", "missed"):
        assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"], k


def test_triage_cis_are_wilson_and_missed_is_scaled_from_the_positives():
    level = 0.9
    m = triage_kpis(Y_TEST, P_TEST, 0.40, level=level)
    assert (m["sensitivity_ci_low"], m["sensitivity_ci_high"]) == wilson_interval(4, 6, level)
    assert (m["set_aside_ci_low"], m["set_aside_ci_high"]) == wilson_interval(6, 12, level)
    lo, hi = wilson_interval(2, 6, level)
    assert m["missed_ci_low"] == pytest.approx(6 * lo) and m["missed_ci_high"] == pytest.approx(6 * hi)
    # missed and sensitivity are one proportion of the positives: their CIs agree
    assert m["missed_ci_low"] == pytest.approx(6 * (1 - m["sensitivity_ci_high"]))
    assert m["missed_ci_high"] == pytest.approx(6 * (1 - m["sensitivity_ci_low"]))
    wide = triage_kpis(Y_TEST, P_TEST, 0.40, level=0.99)
    assert wide["set_aside_ci_low"] < m["set_aside_ci_low"] < m["set_aside_ci_high"] < wide["set_aside_ci_high"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.90, 0.95, 0.98, 1.0])
def test_triage_ci_bounds_bracket_the_value(seed, target):
    y_oof, p_oof = _data(seed, n=120, prevalence=0.5)
    y, p = _data(seed + 100, n=200, prevalence=0.4, signal=1.0)
    m = triage_at_targets(y_oof, p_oof, y, p, [target])[triage_key(target)]
    for k in ("sensitivity", "set_aside", "missed"):
        assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"], k
    assert 0 <= m["missed_ci_low"] and m["missed_ci_high"] <= y.sum()
    # a higher target never sets aside more images nor misses more positives
    lower = triage_at_targets(y_oof, p_oof, y, p, [0.5])["s50"]
    assert m["set_aside"] <= lower["set_aside"] and m["missed"] <= lower["missed"]


def test_wilson_bounds_are_exact_at_zero_and_n():
    # without it missed = 0 would get a CI from 6 x 3e-17, not bracketing its value 0
    assert wilson_interval(0, 6)[0] == 0.0 and wilson_interval(6, 6)[1] == 1.0
    assert triage_kpis(Y_TEST, P_TEST, 0.30)["missed_ci_low"] == 0.0


def test_triage_at_targets_refuses_two_targets_with_one_key():
    with pytest.raises(ValueError, match="s95"):
        triage_at_targets(Y_OOF, P_OOF, Y_TEST, P_TEST, [0.95, 0.950000001])


# --------------------------------------------------------------------------- triage params
def _params_file(tmp_path, targets) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["triage_targets"] = targets
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_shipped_triage_targets_are_90_95_98():
    assert load_params(ROOT / "params.yaml")["evaluate"]["triage_targets"] == [0.90, 0.95, 0.98]


@pytest.mark.parametrize("targets", [[0.9, 0.95, 0.98], [0.8], [0.5, 1.0], [0.97, 0.9]])
def test_valid_triage_targets(tmp_path, targets):
    assert load_params(_params_file(tmp_path, targets))["evaluate"]["triage_targets"] == targets


@pytest.mark.parametrize("targets,says", [
    ([0.995], r"'evaluate\.triage_targets\[0\]' must be a whole percentage"),
    ([0.9, 0.905], r"'evaluate\.triage_targets\[1\]' must be a whole percentage"),
    ([0.95, 0.95], "lists a target twice"),
    ([], "non-empty list"),
    (0.95, "non-empty list"),
    (["0.9"], r"'evaluate\.triage_targets\[0\]' must be"),
    ([True], r"'evaluate\.triage_targets\[0\]' must be"),
    ([0.4], r"'evaluate\.triage_targets\[0\]' must be >= 0\.5"),
    ([1.5], r"must be <= 1\.0"),
    (None, "must be a non-empty list"),
])
def test_bad_triage_targets_are_a_params_error_naming_the_key(tmp_path, targets, says):
    with pytest.raises(ParamsError, match=says) as exc:
        load_params(_params_file(tmp_path, targets))
    assert "evaluate.triage_targets" in str(exc.value)


# --------------------------------------------------------------------------- evaluate stage
def _evaluate_workspace(tmp: Path, finetuned: bool = False, oof: bool = True) -> Path:
    """stages/, triage/, params.yaml, embeddings and both models as train leaves them:
    thresholds set on the OOF parquet for evaluate.target_sensitivity."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from triage.models import fit_weighted, make_classifier, save_model
    from triage.store import EMBEDDING_SCHEMA

    for rel in ("stages", "triage"):
        shutil.copytree(ROOT / rel, tmp / rel, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["n_bootstrap"] = 20
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rng = np.random.default_rng(0)
    n_lab, n_test = 40, 40
    ids = [f"l{i}" for i in range(n_lab)] + [f"t{i}" for i in range(n_test)]
    split = ["labeled"] * n_lab + ["test"] * n_test
    label = ["cancer" if i % 2 else "normal" for i in range(n_lab + n_test)]
    X = rng.normal(size=(n_lab + n_test, 512)).astype(np.float32)
    X[1::2, 0] += 1.5
    schema = EMBEDDING_SCHEMA.with_metadata(
        {b"embedding_fingerprint": json.dumps({"fingerprint": "abc"}).encode()})
    (tmp / "data/features").mkdir(parents=True)
    pq.write_table(pa.Table.from_arrays([
        pa.array(ids), pa.array(split), pa.array(label),
        pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 512)], schema=schema),
        tmp / "data/features/embeddings.parquet")
    y_lab = np.array(label[:n_lab], dtype=object)
    model = fit_weighted(make_classifier("logreg", 0.1, "balanced", 0), X[:n_lab], y_lab)
    target = params["evaluate"]["target_sensitivity"]
    oof_rows = []
    for k, name in enumerate(("baseline", "semi_supervised")):
        p_oof = np.clip(0.35 * (y_lab == "cancer") + rng.random(n_lab) * 0.65 + 0.01 * k, 0, 1)
        thr = threshold_for_sensitivity((y_lab == "cancer").astype(int), p_oof, target)
        save_model({"model": model, "name": name, "threshold": float(thr),
                    "target_sensitivity": float(target), "embedding_fingerprint": "abc"},
                   tmp / f"data/models/{name}.skops")
        oof_rows.append(pd.DataFrame({"id": ids[:n_lab], "model": name, "label": y_lab,
                                      "proba": p_oof}))
    if oof:
        pd.concat(oof_rows, ignore_index=True).to_parquet(tmp / "data/models/oof_predictions.parquet")
    ft_dir = tmp / "data/finetune"
    ft_dir.mkdir(parents=True)
    if finetuned:
        y2 = np.array(label)
        pd.DataFrame({"id": ids, "split": split, "label": y2,
                      "proba": np.where(y2 == "cancer", 0.4, 0.0) + 0.6 * rng.random(len(ids)),
                      "kind": ["oof"] * n_lab + ["test"] * n_test}).to_parquet(ft_dir / "predictions.parquet")
    else:
        (ft_dir / "disabled.json").write_text('{"enabled": false}\n')
    return tmp


def _run_evaluate(ws: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DVCLIVE_TEST"}
    env["PYTHONPATH"] = str(ws)
    res = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=ws, env=env,
                         capture_output=True, text=True)
    if check:
        assert res.returncode == 0, res.stderr
    return res


@pytest.mark.parametrize("finetuned", [False, True])
def test_evaluate_logs_the_triage_contract_for_every_model(tmp_path, finetuned):
    ws = _evaluate_workspace(tmp_path, finetuned=finetuned)
    out = _run_evaluate(ws).stdout
    metrics = json.loads((ws / "metrics/evaluate/metrics.json").read_text())
    models = ["baseline", "semi_supervised"] + (["finetuned"] if finetuned else [])
    assert set(metrics) == set(models) | {"delta", "n_test"}
    oof = pd.read_parquet(ws / "data/models/oof_predictions.parquet")
    preds = pd.read_parquet(ws / "data/evaluate/test_predictions.parquet")
    ft = pd.read_parquet(ws / "data/finetune/predictions.parquet") if finetuned else None
    for model in models:
        triage = metrics[model]["triage"]
        assert set(triage) == {"s90", "s95", "s98"}, model
        rows = oof[oof["model"] == model] if model != "finetuned" else ft[ft["kind"] == "oof"]
        test = preds[preds["model"] == model]
        y, p = (test["label"] == "cancer").to_numpy(int), test["proba"].to_numpy()
        for key, target in (("s90", 0.90), ("s95", 0.95), ("s98", 0.98)):
            m = triage[key]
            assert set(m) == CONTRACT | {"threshold"}, (model, key)
            thr = threshold_for_sensitivity((rows["label"] == "cancer").to_numpy(int),
                                            rows["proba"].to_numpy(), target)
            assert m["threshold"] == pytest.approx(thr, abs=1e-6)  # from OOF, never test
            assert m["set_aside"] == pytest.approx(np.mean(p < thr), abs=1e-6)
            assert m["missed"] == int(((y == 1) & (p < thr)).sum())
            for k in ("sensitivity", "set_aside", "missed"):
                assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"], (model, key, k)
        # at the operating target the KPI is the model's own operating point
        assert triage["s95"]["sensitivity"] == metrics[model]["sensitivity"]
        assert triage["s95"]["missed"] == metrics[model]["fn"]
    assert "at the 0.95 target" in out


def test_evaluate_needs_the_oof_predictions(tmp_path):
    res = _run_evaluate(_evaluate_workspace(tmp_path, oof=False), check=False)
    assert res.returncode != 0
    assert "out-of-fold predictions not found" in res.stderr and "oof_predictions.parquet" in res.stderr


def test_evaluate_refuses_oof_predictions_that_do_not_give_the_models_threshold(tmp_path):
    ws = _evaluate_workspace(tmp_path)
    path = ws / "data/models/oof_predictions.parquet"
    oof = pd.read_parquet(path)
    oof["proba"] = oof["proba"] * 0.5  # stale: not the scores the bundles' thresholds came from
    oof.to_parquet(path)
    res = _run_evaluate(ws, check=False)
    assert res.returncode != 0 and "does not reproduce model baseline's threshold" in res.stderr
