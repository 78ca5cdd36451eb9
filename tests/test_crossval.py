"""Leak-free cross-validation of the semi-supervised chain (real scikit-learn, tiny data)."""
import numpy as np
import pandas as pd
import pytest

from triage.crossval import FoldPseudoLabels, crossval_semisup, fold_pseudo_labels, fold_splits, mean_ci

PSEUDO = {"strategy": "self_training", "min_purity": 0.8, "min_support": 2,
          "confidence_threshold": 0.95, "C": 0.1, "balance_classes": False, "class_prior": None,
          "max_fraction": 0.5, "min_confidence": 0.5, "rounds": 2, "pca_components": 8,
          "n_neighbors": 8, "spreading_alpha": 0.2, "round_weight": 0.5, "seed": 0}
TRAIN = {"model": "logreg", "C": 0.1, "class_weight": "balanced", "calibration": "none",
         "pseudo_weighting": "confidence", "pseudo_weight_scale": 0.5, "cv_folds": 3, "seed": 0}
CLUSTER = {"pca_components": 8, "k": 4, "seed": 0, "method": "kmeans", "k_min": 2, "k_max": 6,
           "min_cluster_size": 5}


def _params(**over):
    p = {"pseudo": dict(PSEUDO), "train": dict(TRAIN), "cluster": dict(CLUSTER)}
    for dotted, v in over.items():
        sec, key = dotted.split("__")
        p[sec][key] = v
    return p


def _rows(X_lab, y_lab, X_pool, X_test=None):
    n_t = 0 if X_test is None else len(X_test)
    rows = pd.DataFrame({
        "id": [f"l{i:03d}" for i in range(len(X_lab))] + [f"u{i:03d}" for i in range(len(X_pool))]
        + [f"t{i:03d}" for i in range(n_t)],
        "split": ["labeled"] * len(X_lab) + ["unlabeled"] * len(X_pool) + ["test"] * n_t,
        "label": list(y_lab) + [None] * len(X_pool) + ["cancer"] * n_t})
    X = np.concatenate([X_lab, X_pool] + ([] if X_test is None else [X_test]))
    return rows, X


@pytest.fixture(scope="module")
def separable():
    rng = np.random.default_rng(0)
    mu = np.r_[np.full(3, 1.0), np.zeros(9)]
    X_lab = np.r_[rng.normal(0, 1, (20, 12)) + mu, rng.normal(0, 1, (20, 12)) - mu]
    y = ["cancer"] * 20 + ["normal"] * 20
    X_pool = np.r_[rng.normal(0, 1, (40, 12)) + mu, rng.normal(0, 1, (80, 12)) - mu]
    return _rows(X_lab, y, X_pool)


def test_fold_splits_partition_each_repeat():
    y = np.r_[np.ones(10), np.zeros(10)].astype(int)
    splits, k = fold_splits(y, 5, 2, seed=0)
    assert k == 5 and len(splits) == 10
    for r in range(2):
        held = np.concatenate([va for _, va in splits[r * 5:(r + 1) * 5]])
        assert sorted(held) == list(range(20))  # every labelled point held out once per repeat
    for tr, va in splits:
        assert not set(tr) & set(va)
        assert y[va].sum() == 2 and (1 - y[va]).sum() == 2  # stratified
    assert fold_splits(np.r_[np.ones(3), np.zeros(10)].astype(int), 5, 1, 0)[1] == 3  # clamped


def test_mean_ci_and_nadeau_bengio_correction():
    v = np.array([0.1, 0.2, 0.3, 0.4])
    naive = mean_ci(v, 0.95)
    assert naive["mean"] == pytest.approx(0.25)
    half = 3.182446305 * np.std(v, ddof=1) / 2  # t(0.975, 3) * s / sqrt(4)
    assert naive["ci_high"] - naive["mean"] == pytest.approx(half, rel=1e-6)
    corrected = mean_ci(v, 0.95, test_train_ratio=0.25)
    assert corrected["ci_low"] < naive["ci_low"] and corrected["ci_high"] > naive["ci_high"]
    assert 0 < naive["p_value"] < corrected["p_value"] < 1
    assert np.isnan(mean_ci([0.3])["ci_low"])


def test_nadeau_bengio_variance_is_pinned_numerically():
    """var = s²·(1/J + n_test/n_train) on hand-made fold values (not s²/J)."""
    v = np.array([0.70, 0.80, 0.75, 0.90, 0.85])  # J = 5, mean 0.80, s² = 0.00625
    r = mean_ci(v, 0.95, test_train_ratio=10 / 30)
    var = 0.00625 * (1 / 5 + 10 / 30)  # = 0.0033333…
    half = 2.7764451051977934 * np.sqrt(var)  # t(0.975, 4)
    assert r["mean"] == pytest.approx(0.80)
    assert r["ci_high"] - r["mean"] == pytest.approx(half, rel=1e-9)
    assert r["mean"] - r["ci_low"] == pytest.approx(0.1602981329, rel=1e-8)  # literal pin


def test_per_model_intervals_use_the_corrected_variance(separable):
    """The baseline and semi-supervised ROC-AUC CIs over overlapping folds use the same
    Nadeau–Bengio variance s²·(1/J + n_test/n_train) as the delta, not plain s²/J."""
    rows, X = separable
    per_fold, s = crossval_semisup(rows, X, _params(), "cancer", 4, 2, seed=0)
    j = len(per_fold)
    ratio = per_fold["n_heldout"].mean() / per_fold["n_train"].mean()  # 10/30
    assert ratio == pytest.approx(1 / 3)
    t = 2.364624251592784  # t(0.975, 7)
    for m in ("baseline", "semi_supervised", "delta"):
        v = per_fold[m].to_numpy()
        half = t * np.sqrt(v.var(ddof=1) * (1 / j + ratio))
        assert s[m]["ci_high"] - s[m]["mean"] == pytest.approx(half, rel=1e-9, abs=1e-12), m
        assert s[m]["mean"] - s[m]["ci_low"] == pytest.approx(half, rel=1e-9, abs=1e-12), m
    assert per_fold["baseline"].var(ddof=1) > 0  # the check above is not vacuous


def test_crossval_summary_contract_and_determinism(separable):
    rows, X = separable
    per_fold, s = crossval_semisup(rows, X, _params(), "cancer", 4, 2, seed=0)
    assert len(per_fold) == 8 and s["n_folds"] == 8
    assert (per_fold["n_heldout"] == 10).all() and (per_fold["n_train"] == 30).all()
    for m in ("baseline", "semi_supervised"):
        assert s[m]["ci_low"] <= s[m]["mean"] <= s[m]["ci_high"]
        assert 0.5 < s[m]["mean"] <= 1.0  # separable classes
    np.testing.assert_allclose(per_fold["delta"], per_fold["semi_supervised"] - per_fold["baseline"])
    assert s["delta"]["mean"] == pytest.approx(per_fold["delta"].mean())
    assert (per_fold["n_pseudo"] > 0).all()
    again_fold, again = crossval_semisup(rows, X, _params(), "cancer", 4, 2, seed=0)
    pd.testing.assert_frame_equal(per_fold, again_fold)
    assert again == s


@pytest.mark.parametrize("strategy", ["self_training", "label_spreading", "cluster_vote",
                                      "consensus"])
def test_held_out_labels_never_reach_training(strategy):
    """Pure-noise features with random labels: a held-out label that leaked into training
    (as a labelled point, or via the pool) is memorised by a distance-weighted kNN
    (distance 0 → its own label) and gives held-out AUC ≈ 1. Without a leak the AUC is
    chance. kNN is used for the final classifiers precisely because it exposes leaks."""
    rng = np.random.default_rng(3)
    X_lab = rng.normal(0, 1, (40, 12))
    y = np.array(["cancer"] * 20 + ["normal"] * 20, dtype=object)
    rng.shuffle(y)
    rows, X = _rows(X_lab, y, rng.normal(0, 1, (60, 12)))
    per_fold, s = crossval_semisup(rows, X, _params(pseudo__strategy=strategy, train__model="knn"),
                                   "cancer", 4, 2, seed=0)
    assert s["baseline"]["mean"] < 0.75 and s["semi_supervised"]["mean"] < 0.75
    # the control: the same data with held-out points in the training set *does* leak
    leaky = rows.copy()
    leaky_X = np.concatenate([X, X_lab])  # copies of the labelled images in the pool...
    leaky = pd.concat([leaky, pd.DataFrame({"id": [f"c{i:03d}" for i in range(40)],
                                            "split": "labeled", "label": y})],
                      ignore_index=True)  # ...labelled: every held-out point has a twin
    _, s_leak = crossval_semisup(leaky, leaky_X, _params(train__model="knn"), "cancer", 4, 1, 0)
    assert s_leak["baseline"]["mean"] > 0.8


def test_test_rows_are_ignored(separable):
    rows, X = separable
    _, s = crossval_semisup(rows, X, _params(), "cancer", 4, 1, seed=0)
    rng = np.random.default_rng(9)
    rows_t, X_t = _rows(X[rows["split"] == "labeled"], rows.loc[rows["split"] == "labeled", "label"],
                        X[rows["split"] == "unlabeled"], rng.normal(0, 5, (30, 12)))
    _, s_t = crossval_semisup(rows_t, X_t, _params(), "cancer", 4, 1, seed=0)
    assert s_t == s


def test_pseudo_accuracy_reported_with_truth(separable):
    rows, X = separable
    truth = pd.DataFrame({"id": [f"u{i:03d}" for i in range(120)],
                          "label": ["cancer"] * 40 + ["normal"] * 80})
    per_fold, s = crossval_semisup(rows, X, _params(), "cancer", 4, 1, seed=0, truth=truth)
    assert 0.7 < s["pseudo_accuracy_mean"] <= 1.0


@pytest.mark.parametrize("strategy", ["self_training", "cluster_vote"])
def test_fold_pseudo_labels_are_named_and_aligned(separable, strategy):
    rows, X = separable
    lab, pool = (rows["split"] == "labeled").to_numpy(), (rows["split"] == "unlabeled").to_numpy()
    ids_pool = rows.loc[pool, "id"].to_numpy(dtype=object)
    fold = fold_pseudo_labels(_params(pseudo__strategy=strategy), "cancer", X[lab],
                              rows.loc[lab, "label"].to_numpy(dtype=object), ids_pool, X[pool])
    assert isinstance(fold, FoldPseudoLabels) and len(fold.rows) > 0
    assert (fold.rows["strategy"] == strategy).all()
    where = {i: k for k, i in enumerate(ids_pool)}
    np.testing.assert_array_equal(fold.X, X[pool][[where[i] for i in fold.rows["id"]]])
    np.testing.assert_array_equal(fold.y, fold.rows["label"].to_numpy(dtype=object))
    # train.pseudo_weighting=confidence: weight = confidence x train.pseudo_weight_scale
    np.testing.assert_allclose(fold.weights, fold.rows["confidence"].to_numpy() * 0.5)
