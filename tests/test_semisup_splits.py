"""The benchmark's near-duplicate-safe split (benchmarks/semisup_data.py)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "semisup_data", Path(__file__).resolve().parents[1] / "benchmarks" / "semisup_data.py")
sd = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sd)


def _old_split(labels, rng, test_mask=None):
    """The per-image split the benchmark drew before split groups (reference copy)."""
    n = len(labels)
    split = np.full(n, "test", dtype=object)
    cand = np.arange(n) if test_mask is None else np.flatnonzero(~test_mask)
    cand = rng.permutation(cand)
    pos = [i for i in cand if labels[i] == "cancer"][: sd.N_LAB // 2]
    neg = [i for i in cand if labels[i] == "normal"][: sd.N_LAB // 2]
    split[pos + neg] = "labeled"
    rest = [i for i in cand if split[i] == "test"]
    split[rest[: sd.N_POOL]] = "unlabeled"
    if test_mask is not None:
        split[rest[sd.N_POOL:]] = "drop"
    return split


def _data(n=3000, seed=1):
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n) < 0.7, "cancer", "normal").astype(object)
    return labels, rng.random(n) < 0.15


@pytest.mark.parametrize("official_test", [False, True])
def test_without_groups_the_split_is_the_old_one(official_test):
    labels, test_mask = _data()
    tm = test_mask if official_test else None
    old = _old_split(labels, np.random.default_rng(0), tm)
    np.testing.assert_array_equal(sd._split(labels, np.random.default_rng(0), tm), old)
    singletons = np.array([f"id{i}" for i in range(len(labels))], dtype=object)
    np.testing.assert_array_equal(sd._split(labels, np.random.default_rng(0), tm, singletons), old)


@pytest.mark.parametrize("official_test", [False, True])
def test_a_group_lands_wholly_in_one_split(official_test):
    labels, test_mask = _data()
    n = len(labels)
    rng = np.random.default_rng(5)
    groups = np.array([f"id{i}" for i in range(n)], dtype=object)
    for k in range(300):  # near-duplicate groups of 2-6 images sharing a label, a few mixed
        idx = rng.choice(n, rng.integers(2, 7), replace=False)
        groups[idx] = f"g{k}"
        if k % 10:
            labels[idx] = labels[idx[0]]
    tm = test_mask if official_test else None
    split = sd._split(labels, np.random.default_rng(0), tm, groups)
    for g in set(groups):
        kinds = set(split[groups == g]) - {"drop"}
        assert len(kinds) <= 1, (g, kinds)
    assert not sd.leaked_test(split, groups).any()
    lab = split == "labeled"
    assert (labels[lab] == "cancer").sum() == (labels[lab] == "normal").sum() == sd.N_LAB // 2
    assert (split == "unlabeled").sum() == sd.N_POOL
    if official_test:
        assert (split[test_mask] == "test").all() and not (split[~test_mask] == "test").any()
    # most images keep the split they had without groups (same shuffle)
    assert (split == sd._split(labels, np.random.default_rng(0), tm)).mean() > 0.7


def test_leaked_test_counts_test_images_with_a_training_side_copy():
    split = np.array(["labeled", "test", "unlabeled", "test", "test"], dtype=object)
    groups = np.array(["a", "a", "b", "b", "c"], dtype=object)
    assert sd.leaked_test(split, groups).tolist() == [False, True, False, True, False]
