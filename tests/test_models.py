"""Classifiers, semi-supervised fitting, out-of-fold scores and safe skops persistence."""
import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import make_classification
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from triage.cluster import PoolClusterer
from triage.errors import PipelineError
from triage.models import (
    TRUSTED_TYPES,
    _schema_types,
    fit_semi_supervised,
    fit_weighted,
    load_model,
    make_classifier,
    out_of_fold_proba,
    positive_proba,
    pseudo_weights,
    save_model,
)

MODELS = ["logreg", "svm", "knn", "random_forest"]


def _labelled(n=80, seed=0, sep=2.0):
    X, y = make_classification(n_samples=n, n_features=6, n_informative=4, n_redundant=0,
                               class_sep=sep, random_state=seed)
    return X, np.where(y == 1, "cancer", "normal")


class NotAModel:
    """A custom class: not on the allowlist, so its module code must never run on load."""

    def __init__(self, payload="x"):
        self.payload = payload


# --------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("model", MODELS)
def test_every_classifier_fits_and_predicts(model):
    X, y = _labelled(seed=1)
    pipe = fit_weighted(make_classifier(model, C=1.0, random_state=0), X[:60], y[:60])
    pred = pipe.predict(X[60:])
    assert set(pred) <= {"cancer", "normal"}
    proba = positive_proba(pipe, X[60:], "cancer")
    assert proba.dtype == np.float64 and ((proba >= 0) & (proba <= 1)).all()
    # separable data: every model should rank far better than chance on held-out points
    assert roc_auc_score(y[60:] == "cancer", proba) > 0.8


def test_unknown_model_name():
    with pytest.raises(ValueError, match="xgboost"):
        make_classifier("xgboost")


def test_class_weight_none_and_balanced_differ_on_imbalanced_data():
    X, y = _labelled(n=90, seed=2, sep=0.5)
    keep = np.r_[np.flatnonzero(y == "normal"), np.flatnonzero(y == "cancer")[:10]]
    X, y = X[keep], y[keep]
    bal = fit_weighted(make_classifier("logreg", class_weight="balanced"), X, y)
    none = fit_weighted(make_classifier("logreg", class_weight="none"), X, y)
    assert bal["clf"].class_weight == "balanced" and none["clf"].class_weight is None
    # balancing up-weights the rare positives, raising their predicted probability
    assert positive_proba(bal, X, "cancer").mean() > positive_proba(none, X, "cancer").mean()


def test_positive_proba_requires_the_positive_class():
    X, y = _labelled(seed=3)
    pipe = fit_weighted(make_classifier("logreg"), X, y)
    with pytest.raises(PipelineError, match="'malignant'"):
        positive_proba(pipe, X, "malignant")
    col = list(pipe.classes_).index("cancer")
    # the positive column, snapped to 16 significant bits (triage.canonical)
    np.testing.assert_allclose(positive_proba(pipe, X, "cancer"), pipe.predict_proba(X)[:, col],
                               rtol=2.0 ** -16, atol=0)


# --------------------------------------------------------------------------- persistence


def _small(model, **kw):
    """make_classifier, with a 10-tree forest to keep the tests fast (same types)."""
    pipe = make_classifier(model, **kw)
    if model == "random_forest":
        pipe.set_params(clf__n_estimators=10)
    return pipe


def _bundle(model="logreg", seed=0):
    X, y = _labelled(seed=seed)
    y = y.astype(object)  # as the stage gets labels from pandas: object-dtype classes_
    pipe = fit_weighted(_small(model, random_state=0), X, y)
    return {"model": pipe, "name": "baseline", "positive_class": "cancer", "threshold": 0.42,
            "classes": ["cancer", "normal"], "n_pseudo": 0}, X


def test_save_model_is_byte_stable(tmp_path):
    a, _ = _bundle()
    b, _ = _bundle()  # a different object holding an identical model
    save_model(a, tmp_path / "a.skops")
    save_model(a, tmp_path / "a2.skops")
    save_model(b, tmp_path / "b.skops")
    data = (tmp_path / "a.skops").read_bytes()
    assert data == (tmp_path / "a2.skops").read_bytes()
    assert data == (tmp_path / "b.skops").read_bytes()
    # and it is a change-sensitive encoding, not a constant
    c, _ = _bundle(seed=5)
    save_model(c, tmp_path / "c.skops")
    assert (tmp_path / "c.skops").read_bytes() != data


@pytest.mark.parametrize("model", MODELS)
def test_load_model_round_trip_for_every_classifier(tmp_path, model):
    bundle, X = _bundle(model)
    path = tmp_path / f"{model}.skops"
    save_model(bundle, path)
    loaded = load_model(path)
    assert {k: v for k, v in loaded.items() if k != "model"} == \
        {k: v for k, v in bundle.items() if k != "model"}
    np.testing.assert_array_equal(loaded["model"].predict(X), bundle["model"].predict(X))
    np.testing.assert_allclose(loaded["model"].predict_proba(X),
                               bundle["model"].predict_proba(X), rtol=0, atol=0)


def test_load_model_refuses_the_clusterer_which_is_stored_as_json(tmp_path):
    # The cluster stage writes plain JSON (triage.cluster): a skops file holding a
    # clusterer is not something the pipeline makes, so it is not on the allowlist.
    X, _ = _labelled(n=60, seed=4)
    model = PoolClusterer(n_components=4, k=3, random_state=0).fit(X)
    save_model({"model": model, "embedding_fingerprint": "abc"}, tmp_path / "c.skops")
    with pytest.raises(PipelineError, match="PoolClusterer"):
        load_model(tmp_path / "c.skops")


def test_allowlist_holds_only_types_the_classifiers_need(tmp_path):
    needed = set()
    for model in MODELS:
        for cal in ("none", "sigmoid"):
            X, y = _labelled(n=60, seed=1)
            pipe = fit_weighted(make_classifier(model, 1.0, "balanced", 0, cal), X, y)
            save_model({"model": pipe}, tmp_path / "m.skops")
            needed |= set(_schema_types(tmp_path / "m.skops"))
            assert load_model(tmp_path / "m.skops")["model"] is not None
    unused = [t for t in TRUSTED_TYPES if t not in needed and t.split(".")[0] not in ("builtins", "numpy")]
    assert not unused, f"allowlisted but no classifier needs them: {unused}"


def test_canonical_file_still_loads_with_plain_skops(tmp_path):
    bundle, X = _bundle()
    save_model(bundle, tmp_path / "m.skops")
    plain = sio.load(tmp_path / "m.skops",
                     trusted=sio.get_untrusted_types(file=tmp_path / "m.skops"))
    np.testing.assert_array_equal(plain["model"].predict(X), bundle["model"].predict(X))


def test_load_model_refuses_an_untrusted_sklearn_type(tmp_path):
    X, y = _labelled(n=40, seed=6)
    gb = GradientBoostingClassifier(n_estimators=3, random_state=0).fit(X, y)
    path = tmp_path / "gb.skops"
    sio.dump({"model": gb}, path)
    with pytest.raises(PipelineError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "refusing" in msg and "GradientBoostingClassifier" in msg and str(path) in msg


def test_load_model_refuses_a_custom_class(tmp_path):
    path = tmp_path / "evil.skops"
    sio.dump({"model": NotAModel("payload")}, path)
    with pytest.raises(PipelineError, match="NotAModel"):
        load_model(path)


def test_load_model_corrupt_file(tmp_path):
    path = tmp_path / "m.skops"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(PipelineError, match="not a readable skops"):
        load_model(path)


def test_load_model_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_model(tmp_path / "nope.skops")


def test_save_model_writes_atomically_and_leaves_no_temp(tmp_path):
    bundle, _ = _bundle()
    save_model(bundle, tmp_path / "sub" / "m.skops")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.skops"]


# --------------------------------------------------------------------------- out-of-fold


def _twins(n_pairs=30, seed=0):
    """Pairs of nearly identical points with opposite labels, pairs far apart.

    A 1-NN that has seen a point predicts its own label; one that has not seen it but
    has seen its twin predicts the opposite label.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=50.0, size=(n_pairs, 3))
    X = np.concatenate([centres, centres + 1e-3])
    y = np.array(["cancer"] * n_pairs + ["normal"] * n_pairs)
    return X, y


def test_out_of_fold_never_scores_a_sample_with_a_model_that_saw_it():
    X, y = _twins()
    one_nn = Pipeline([("scale", StandardScaler()), ("clf", KNeighborsClassifier(1))])
    in_sample = positive_proba(fit_weighted(one_nn, X, y), X, "cancer")
    y_bin = (y == "cancer").astype(float)
    np.testing.assert_array_equal(in_sample, y_bin)  # memorises the training set
    oof = out_of_fold_proba(one_nn, X, y, "cancer", folds=5, seed=0)
    assert oof.shape == (len(y),)
    # a leak-free OOF model only saw the twin (opposite label) or neither; a leaky one
    # would reproduce every label exactly.
    agree = (oof == y_bin).mean()
    assert agree < 0.5
    assert roc_auc_score(y_bin, oof) < 0.5


def test_out_of_fold_pseudo_labels_come_from_the_fold_training_labels_only():
    X, y = _twins(n_pairs=20, seed=1)
    one_nn = Pipeline([("scale", StandardScaler()), ("clf", KNeighborsClassifier(1))])
    seen = []

    def pseudo_for_fold(tr):
        # pseudo-labelled exact copies of the *training* points: all a fold may know
        seen.append(set(tr.tolist()))
        return X[tr].copy(), y[tr].copy(), np.ones(len(tr))

    oof = out_of_fold_proba(one_nn, X, y, "cancer", folds=4, seed=0,
                            pseudo_for_fold=pseudo_for_fold)
    assert len(seen) == 4
    held_out = [set(range(len(y))) - s for s in seen]
    assert all(h and not (h & s) for h, s in zip(held_out, seen))  # called with train only
    assert set().union(*held_out) == set(range(len(y)))
    # Copies of training points teach nothing about the held-out twins: still no better
    # than chance. (Copies of *all* points — the pipeline's pseudo-labels, made with every
    # label — would reproduce each held-out label exactly: the leak this API prevents.)
    assert roc_auc_score((y == "cancer").astype(int), oof) < 0.5
    leaky = out_of_fold_proba(one_nn, X, y, "cancer", folds=4, seed=0,
                              pseudo_for_fold=lambda tr: (X.copy(), y.copy(), np.ones(len(y))))
    np.testing.assert_array_equal(leaky, (y == "cancer").astype(float))


def test_out_of_fold_needs_two_labels_per_class():
    X, y = _labelled(n=20, seed=8)
    keep = np.r_[np.flatnonzero(y == "normal"), np.flatnonzero(y == "cancer")[:1]]
    with pytest.raises(PipelineError, match="at least 2 labelled images of each class"):
        out_of_fold_proba(make_classifier("logreg"), X[keep], y[keep], "cancer", 5, seed=0)


def test_out_of_fold_reduces_folds_for_a_small_class():
    X, y = _labelled(n=40, seed=8)
    keep = np.r_[np.flatnonzero(y == "normal"), np.flatnonzero(y == "cancer")[:3]]
    oof = out_of_fold_proba(make_classifier("logreg"), X[keep], y[keep], "cancer",
                            folds=10, seed=0)
    assert oof.shape == (len(keep),) and ((oof > 0) & (oof < 1)).all()


def test_out_of_fold_is_seeded():
    X, y = _labelled(seed=9)
    a = out_of_fold_proba(make_classifier("logreg"), X, y, "cancer", 5, seed=3)
    b = out_of_fold_proba(make_classifier("logreg"), X, y, "cancer", 5, seed=3)
    c = out_of_fold_proba(make_classifier("logreg"), X, y, "cancer", 5, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------------------- pseudo-labels


def test_pseudo_weights_confidence_vs_uniform():
    conf = np.array([0.8, 0.9, 0.97])
    np.testing.assert_allclose(pseudo_weights(conf, "confidence", 0.5), [0.4, 0.45, 0.485])
    np.testing.assert_allclose(pseudo_weights(conf, "uniform", 0.5), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(pseudo_weights(conf, "uniform", 1.0), [1, 1, 1])
    assert pseudo_weights(np.array([]), "confidence", 0.5).shape == (0,)


@pytest.mark.parametrize("model", MODELS)
def test_semi_supervised_with_no_pseudo_labels_equals_baseline(model):
    X, y = _labelled(seed=10)
    pipe = _small(model, random_state=0)
    base = fit_weighted(pipe, X, y)
    semi = fit_semi_supervised(pipe, X, y, X[:0], y[:0], np.zeros(0))
    np.testing.assert_allclose(semi.predict_proba(X), base.predict_proba(X), atol=1e-9)


def test_semi_supervised_pseudo_labels_change_the_model_and_weights_matter():
    X, y = _labelled(n=60, seed=11, sep=0.8)
    rng = np.random.default_rng(0)
    X_ps = rng.normal(size=(40, X.shape[1]))
    y_ps = np.array(["cancer"] * 40)  # all pseudo-labelled positive
    pipe = make_classifier("logreg", C=1.0)
    base = positive_proba(fit_weighted(pipe, X, y), X, "cancer").mean()
    light = positive_proba(fit_semi_supervised(pipe, X, y, X_ps, y_ps, np.full(40, 0.1)),
                           X, "cancer").mean()
    heavy = positive_proba(fit_semi_supervised(pipe, X, y, X_ps, y_ps, np.full(40, 1.0)),
                           X, "cancer").mean()
    assert base < light < heavy


def test_fit_weighted_does_not_modify_the_template():
    X, y = _labelled(seed=12)
    pipe = make_classifier("logreg")
    fit_weighted(pipe, X, y)
    assert not hasattr(pipe["clf"], "coef_")


def test_sigmoid_calibration_improves_an_overconfident_model(tmp_path):
    """Platt scaling pulls an overfit logistic regression's probabilities back to reality."""
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 40))
    y = np.where(X[:, 0] + rng.normal(scale=1.5, size=400) > 0, "cancer", "normal")
    raw = fit_weighted(make_classifier("logreg", C=100.0), X[:150], y[:150])
    cal = fit_weighted(make_classifier("logreg", C=100.0, calibration="sigmoid"), X[:150], y[:150])
    yt = (y[150:] == "cancer").astype(int)
    b_raw = brier_score_loss(yt, positive_proba(raw, X[150:], "cancer"))
    b_cal = brier_score_loss(yt, positive_proba(cal, X[150:], "cancer"))
    assert b_cal < b_raw
    save_model({"model": cal}, tmp_path / "c.skops")
    again = load_model(tmp_path / "c.skops")["model"]
    np.testing.assert_allclose(positive_proba(again, X[:5], "cancer"),
                               positive_proba(cal, X[:5], "cancer"))


SKOPS_TYPES = ("import json, sys\n{pre}import skops.io._trusted_types as t\n"
               "print(json.dumps({{'torch': 'torch' in sys.modules, "
               "'types': sorted(t.SKLEARN_ESTIMATOR_TYPE_NAMES)}}))")


def test_skops_loads_without_torch_and_trusts_the_same_types():
    # skops' type scan walks sklearn's array-API shim for torch: ~1 s and ~600 MB RSS in
    # stages that never touch a tensor. skops_io() hides that adapter for the import only.
    import json
    import subprocess
    import sys

    def run(pre):
        out = subprocess.run([sys.executable, "-c", SKOPS_TYPES.format(pre=pre)],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    plain = run("")
    hidden = run("from triage.models import skops_io; skops_io()\n")
    assert plain["torch"] and not hidden["torch"]
    assert hidden["types"] == plain["types"] and len(plain["types"]) > 100
    # torch and sklearn's torch adapter import normally afterwards
    after = subprocess.run([sys.executable, "-c", "from triage.models import skops_io; skops_io(); "
                            "import sklearn.externals.array_api_compat.torch as shim, torch; "
                            "print(shim.__name__, torch.ones(3).sum().item())"],
                           capture_output=True, text=True, check=True).stdout
    assert after.strip() == "sklearn.externals.array_api_compat.torch 3.0"


@pytest.mark.parametrize("calibration", ["none", "sigmoid"])
def test_knn_fits_a_training_set_smaller_than_its_neighbour_count(calibration):
    # 9 labelled images (3-fold calibration trains on 6): plain KNeighborsClassifier(15) fails
    X, y = _labelled(n=9, seed=3)
    plain = make_classifier("knn", 1.0, "balanced", 0, calibration)
    with pytest.raises(ValueError, match="n_neighbors <= n_samples"):
        Pipeline([("scale", StandardScaler()),
                  ("clf", KNeighborsClassifier(15, weights="distance"))]).fit(X, y).predict_proba(X)
    pipe = fit_weighted(plain, X, y)
    proba = pipe.predict_proba(X)
    assert proba.shape == (9, 2) and np.isfinite(proba).all()
    inner = pipe["clf"] if calibration == "none" else pipe["clf"].calibrated_classifiers_[0].estimator
    assert inner.n_neighbors == 15  # the parameter stays as given; only the query is capped
    _, idx = inner.kneighbors(X[:2])
    assert idx.shape == (2, len(inner._fit_X))
    # with enough points the cap does nothing: same neighbours as the plain classifier
    Xb, yb = _labelled(n=60, seed=3)
    capped = make_classifier("knn", 1.0, "balanced", 0, "none").fit(Xb, yb)
    ref = Pipeline([("scale", StandardScaler()), ("clf", KNeighborsClassifier(
        15, weights="distance", algorithm="kd_tree"))]).fit(Xb, yb)
    np.testing.assert_array_equal(capped.predict_proba(Xb), ref.predict_proba(Xb))
