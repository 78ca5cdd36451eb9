"""Folds keep a split group (near-duplicates, one patient) on one side (triage.splits)."""
import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

from triage.crossval import fold_splits, pool_outside
from triage.models import out_of_fold_proba
from triage.splits import groups_for, kfold, max_folds, repeated_kfold


def _labels(n=40, seed=0):
    return np.random.default_rng(seed).permutation(np.r_[np.ones(n // 2), np.zeros(n // 2)]).astype(int)


def _pair_groups(n):
    """Images 2j and 2j+1 are one group (a near-duplicate pair)."""
    return np.array([f"g{i // 2}" for i in range(n)], dtype=object)


@pytest.mark.parametrize("folds,repeats,seed", [(5, 1, 0), (3, 2, 7), (10, 1, 3)])
def test_without_groups_the_folds_are_scikit_learns(folds, repeats, seed):
    # a set without duplicates must give the results it always gave
    y = _labels()
    ids = np.array([f"id{i}" for i in range(len(y))], dtype=object)  # every group alone
    got, _ = repeated_kfold(y, folds, repeats, seed, ids)
    ref = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed).split(
        np.zeros(len(y)), y)
    for (a, b), (c, d) in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    one, _ = kfold(y, folds, seed, None)
    ref1 = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    for (a, b), (c, d) in zip(one, ref1, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


@pytest.mark.parametrize("make", [
    lambda y, groups: kfold(y, 5, 0, groups)[0],
    lambda y, groups: repeated_kfold(y, 4, 3, 1, groups)[0],
    lambda y, groups: fold_splits(y, 5, 2, 0, groups)[0],
])
def test_no_group_straddles_a_training_part_and_its_held_out_part(make):
    y = np.repeat(_labels(40, 1)[:20], 2)  # a pair shares its label
    groups = _pair_groups(len(y))
    splits = make(y, groups)
    assert splits
    for tr, va in splits:
        assert set(groups[tr]).isdisjoint(groups[va])
        assert set(y[va]) == {0, 1}  # still stratified enough to score


def test_fold_count_is_clamped_to_the_groups_of_the_rarest_class():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    groups = np.array(["a", "a", "b", "b", "c", "d", "e", "f", "g", "h"], dtype=object)
    assert max_folds(y, groups) == 2 and max_folds(y) == 4
    assert kfold(y, 5, 0, groups)[1] == 2


def test_out_of_fold_scores_do_not_see_a_near_copy_of_the_scored_image():
    # 1-NN on pairs of identical vectors: a fold that holds the copy scores its twin
    # perfectly; with the pairs as groups the copy is held out too (no optimism)
    rng = np.random.default_rng(3)
    X = np.repeat(rng.normal(size=(30, 4)), 2, axis=0)
    y = np.repeat(rng.permutation(np.r_[["cancer"] * 15, ["normal"] * 15]), 2)
    one_nn = Pipeline([("clf", KNeighborsClassifier(1))])
    leaky = out_of_fold_proba(one_nn, X, y, "cancer", 5, 0)
    assert ((leaky > 0.5) == (y == "cancer")).mean() >= 0.85  # the twin gives the answer
    safe = out_of_fold_proba(one_nn, X, y, "cancer", 5, 0, groups=_pair_groups(len(y)))
    assert ((safe > 0.5) == (y == "cancer")).mean() <= 0.6  # random vectors: no real signal


def test_a_fold_keeps_pool_near_copies_of_its_held_out_images_out():
    keep = pool_outside(np.array(["g1", "p2", "g3"], dtype=object), np.array(["g1", "g9"]))
    assert keep.tolist() == [False, True, True]
    assert pool_outside(None, np.array(["g1"])) == slice(None)


def test_groups_come_from_the_clean_manifest_and_default_to_the_id(tmp_path):
    path = tmp_path / "clean.parquet"
    pd.DataFrame({"id": ["a", "b"], "group": ["a", "a"]}).to_parquet(path)
    assert groups_for(["b", "a", "z"], path).tolist() == ["a", "a", "z"]
    pd.DataFrame({"id": ["a"]}).to_parquet(path)  # a manifest from before the column
    assert groups_for(["a"], path).tolist() == ["a"]
