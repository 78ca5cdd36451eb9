"""Light classifiers on embeddings, their training with pseudo-labels, and safe persistence.

Models are saved with skops and loaded only if every type in the file is on an
allowlist, so opening a model file cannot execute arbitrary code (unlike pickle).
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from .canonical import canonical_fit, logistic_regression, snap_relative
from .errors import PipelineError
from .io import atomic_path
from .neighbours import check_backend, exact_knn
from .splits import kfold, max_folds

# Types a model file may contain beyond skops' defaults (numpy/builtins are trusted): the
# classifiers of make_classifier, nothing else (tests/test_models.py keeps it minimal).
TRUSTED_TYPES = [
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.svm._classes.SVC",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "triage.models.CappedKNeighborsClassifier",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "numpy.dtype",
    "numpy.ndarray",
    "builtins.slice",
]


class CappedKNeighborsClassifier(KNeighborsClassifier):
    """``KNeighborsClassifier`` whose ``n_neighbors`` is an upper bound: a fit on fewer
    points (a small labelled set, a cross-validation or calibration fold) votes over all of
    them instead of failing with ``Expected n_neighbors <= n_samples_fit``. The parameter
    itself is left as given (scikit-learn's clone/get_params contract)."""

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        if n_neighbors is None:
            # querying the training points themselves excludes each point from its own list
            available = self.n_samples_fit_ - (1 if X is None else 0)
            n_neighbors = max(1, min(self.n_neighbors, available))
        return super().kneighbors(X, n_neighbors, return_distance)


def make_classifier(model: str = "logreg", C: float = 1.0, class_weight: str = "balanced",
                    random_state: int = 0, calibration: str = "none") -> Pipeline:
    """Scaler + light classifier.

    ``calibration="sigmoid"`` wraps the classifier in Platt scaling fitted by 3-fold
    cross-validation (isotonic is not offered: it overfits with ~100 labels).
    """
    cw = None if class_weight == "none" else class_weight
    if model == "logreg":
        clf = logistic_regression(C, cw, random_state)
    elif model == "svm":
        # Platt scaling via CalibratedClassifierCV (SVC(probability=True) is deprecated).
        clf = CalibratedClassifierCV(SVC(C=C, class_weight=cw, random_state=random_state),
                                     method="sigmoid", cv=3, ensemble=False)
    elif model == "knn":
        # kd_tree: distances from its own loops; brute force would use a BLAS product,
        # whose noise could decide a tie for the 15th neighbour (duplicate images)
        clf = CappedKNeighborsClassifier(n_neighbors=15, weights="distance", algorithm="kd_tree")
    elif model == "random_forest":
        clf = RandomForestClassifier(n_estimators=300, class_weight=cw, min_samples_leaf=2,
                                     random_state=random_state, n_jobs=1)
    else:
        raise ValueError(f"unknown train.model {model!r}")
    if calibration == "sigmoid" and model != "svm":  # svm is already Platt-scaled
        clf = CalibratedClassifierCV(clf, method="sigmoid", cv=3, ensemble=False)
    elif calibration not in ("none", "sigmoid"):
        raise ValueError(f"unknown train.calibration {calibration!r}")
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def supports_sample_weight(pipe: Pipeline) -> bool:
    clf = pipe["clf"]
    inner = clf.estimator if isinstance(clf, CalibratedClassifierCV) else clf
    return not isinstance(inner, KNeighborsClassifier)  # the capped one too


def pseudo_weights(confidence: np.ndarray, weighting: str, scale: float) -> np.ndarray:
    """Weight of each pseudo-labelled sample relative to a real label (1.0)."""
    base = np.asarray(confidence, float) if weighting == "confidence" else np.ones(len(confidence))
    return base * scale


def fit_weighted(pipe: Pipeline, X, y, w=None) -> Pipeline:
    pipe = clone(pipe)
    # float64: scikit-learn keeps float32 embeddings in float32, whose rounding noise
    # (~1e-7) would sit too close to the snapping grid (triage.canonical)
    X = np.asarray(X, dtype=np.float64)
    if w is not None and supports_sample_weight(pipe):
        pipe.fit(X, y, clf__sample_weight=w)
    else:
        pipe.fit(X, y)
    return canonical_fit(pipe)


def fit_semi_supervised(pipe, X_lab, y_lab, X_ps, y_ps, w_ps) -> Pipeline:
    """Fit on labelled (weight 1) + pseudo-labelled (weight ``w_ps``) samples."""
    X = np.concatenate([X_lab, X_ps]) if len(X_ps) else X_lab
    y = np.concatenate([y_lab, y_ps]) if len(y_ps) else y_lab
    w = np.concatenate([np.ones(len(y_lab)), w_ps]) if len(y_ps) else np.ones(len(y_lab))
    return fit_weighted(pipe, X, y, w)


def out_of_fold_proba(pipe, X_lab, y_lab, positive, folds: int, seed: int,
                      pseudo_for_fold=None, groups=None) -> np.ndarray:
    """P(positive) for each labelled image from a model that did not see it, nor any
    image of its split group (``groups``: near-duplicates, one patient; ``triage.splits``).

    Used to pick the operating threshold without touching test. With
    ``pseudo_for_fold(train_index) -> (X_ps, y_ps, w_ps)`` each fold's model is also
    trained on pseudo-labelled pool samples (never scored). That callable must make them
    from the fold's training labels only (refit the pseudo-labeller per fold, as
    ``triage.crossval.fold_pseudo_labels`` does): pseudo-labels made with every label
    carry the held-out labels into the fold, the scores become optimistic and the
    threshold misses its target sensitivity.
    """
    y_lab = np.asarray(y_lab)
    if max_folds(y_lab, groups) < 2:
        raise PipelineError("out-of-fold scores need at least 2 labelled images of each class "
                            "(2 split groups: near-duplicates and one patient's images count once)")
    oof = np.zeros(len(y_lab))
    for tr, va in kfold(y_lab, folds, seed, groups)[0]:
        if pseudo_for_fold is not None:
            X_ps, y_ps, w_ps = pseudo_for_fold(tr)
            m = fit_semi_supervised(pipe, X_lab[tr], y_lab[tr], X_ps, y_ps, w_ps)
        else:
            m = fit_weighted(pipe, X_lab[tr], y_lab[tr])
        oof[va] = positive_proba(m, X_lab[va], positive)
    return oof


def positive_proba(model, X, positive: str) -> np.ndarray:
    classes = list(model.classes_)
    if positive not in classes:
        raise PipelineError(f"model was trained without the positive class '{positive}'")
    # snapped (triage.canonical): these probabilities are written and set thresholds
    proba = model.predict_proba(np.asarray(X, dtype=np.float64))
    return snap_relative(proba[:, classes.index(positive)])


# --------------------------------------------------------------------------- OOD reference
# A bundle's ``ood`` field: what the per-image out-of-distribution check needs at serving
# time, fitted by the train stage on the training vectors (labelled + pool).
OOD_STATISTIC = "mean Euclidean distance to the k nearest training vectors (embedding space)"
OOD_BLOCK = 8  # query rows per distance block: 8 x 1,506 x 512 float64 differences = 49 MB


def knn_distance(X, reference, k: int, *, leave_one_out: bool = False,
                 backend: str = "sklearn") -> np.ndarray:
    """Mean Euclidean distance of each row of ``X`` to its ``k`` nearest rows of
    ``reference`` (with ``leave_one_out``, ``X`` *is* the reference and a row's own
    distance is left out), snapped to 16 significant bits.

    Canonical without BLAS: float64 differences, squares and sums along a row (NumPy's
    fixed-order elementwise ops and reductions, as triage.select does), the k smallest
    sorted before their mean; snapped per value (``snap_relative``), so a value does not
    depend on the other rows of ``X`` (one served image or a batch: the same bits).
    ``backend`` (``cluster.backend``): ``faiss`` finds the k nearest with certified FAISS
    candidates re-ranked by the same float64 sums (triage.neighbours.exact_knn), so the
    same bits without the (rows × reference) comparison in NumPy."""
    X = np.asarray(X, dtype=np.float64)
    R = np.asarray(reference, dtype=np.float64)
    k = int(min(k, len(R) - (1 if leave_one_out else 0)))
    if len(X) == 0 or k < 1:
        return np.full(len(X), np.nan)
    if check_backend(backend) == "faiss":
        nearest, _ = exact_knn(X, R, k, backend, leave_one_out=leave_one_out)
        return snap_relative(np.sqrt(nearest).mean(1))
    out = np.empty(len(X))
    for start in range(0, len(X), OOD_BLOCK):
        D = ((X[start:start + OOD_BLOCK, None, :] - R[None]) ** 2).sum(-1)
        if leave_one_out:
            rows = np.arange(len(D))
            D[rows, start + rows] = np.inf
        nearest = np.sort(np.partition(D, k - 1, axis=1)[:, :k], axis=1)
        out[start:start + OOD_BLOCK] = np.sqrt(nearest).mean(1)
    return snap_relative(out)


def ood_reference(X_train, k: int, quantile: float, backend: str = "sklearn") -> dict:
    """The bundle's ``ood`` field: the training vectors themselves (float32, as embedded:
    a PCA copy would be blind to exactly the directions the training images do not span)
    and the threshold, the ``quantile`` of the same statistic over the training vectors,
    each left out of its own neighbours. ``backend`` (``cluster.backend``) finds the
    neighbours (:func:`knn_distance`: the same bits either way); a non-default one is
    recorded in the field so serving searches the same way, the default is not written
    (bundles keep their bytes, and older bundles read as ``sklearn``)."""
    check_backend(backend)
    R = np.ascontiguousarray(X_train, dtype=np.float32)
    if len(R) < 2:
        raise PipelineError("ood: the training set needs at least 2 images for a reference")
    loo = knn_distance(R, R, k, leave_one_out=True, backend=backend)
    threshold = float(snap_relative([np.quantile(loo, quantile)])[0])
    out = {"reference": R, "k": int(min(k, len(R) - 1)), "quantile": float(quantile),
           "threshold": threshold, "statistic": OOD_STATISTIC}
    if backend != "sklearn":
        out["backend"] = backend
    return out


def ood_flags(ood: dict | None, X, backend: str | None = None) -> np.ndarray | None:
    """True for each row of ``X`` farther from the training vectors than the bundle's
    threshold (``ood`` is a bundle's ``ood`` field); None for a bundle without one.
    ``backend``: the neighbour search (``cluster.backend``); None = the one the bundle
    records, ``sklearn`` for a bundle that records none."""
    if not ood:
        return None
    backend = ood.get("backend", "sklearn") if backend is None else backend
    return knn_distance(X, ood["reference"], ood["k"], backend=backend) > float(ood["threshold"])


def _canonical_skops(data: bytes) -> bytes:
    """Rewrite a skops archive so identical models give identical bytes.

    skops names members and ``__id__`` fields after Python ``id()`` values and stamps
    the current time, so two saves of the same model differ and DVC would see a new
    output on every ``dvc repro -f``. Renumber ids in schema order, rename members to
    match, and use a fixed timestamp; the result loads exactly like the original.
    """
    src = zipfile.ZipFile(io.BytesIO(data))
    schema = json.loads(src.read("schema.json"))
    ids: dict[int, int] = {}
    names: dict[str, str] = {}

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for key, val in node.items():
                if key == "__id__" and isinstance(val, int):
                    val = ids.setdefault(val, len(ids) + 1)
                elif key == "file" and isinstance(val, str) and val in src.namelist():
                    val = names.setdefault(val, f"{len(names):05d}{Path(val).suffix}")
                out[key] = walk(val)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    schema = walk(schema)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as dst:
        def put(name: str, payload: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            dst.writestr(info, payload)

        put("schema.json", json.dumps(schema, indent=2, sort_keys=True).encode())
        for old, new in sorted(names.items(), key=lambda kv: kv[1]):
            put(new, src.read(old))
    return buf.getvalue()


# sklearn's array-API adapter for torch: importing it imports torch.
TORCH_SHIM = "sklearn.externals.array_api_compat.torch"


def skops_io():
    """``skops.io``, imported lazily and without pulling in torch.

    Importing skops builds its trusted-type list with ``sklearn.utils.all_estimators()``,
    which imports every sklearn package, including the array-API adapter for torch
    (:data:`TORCH_SHIM`): that alone costs ~1 s and ~600 MB RSS in stages that never touch
    a tensor. The walk skips packages that fail to import and the adapter holds no
    estimator, so only that one module is marked unimportable (``None`` in sys.modules)
    for the import: torch itself stays importable from any thread, the type list is the
    same and the adapter imports normally afterwards (tests/test_models.py).
    """
    if "skops.io" in sys.modules or TORCH_SHIM in sys.modules:
        import skops.io as sio

        return sio
    sys.modules[TORCH_SHIM] = None
    try:
        import skops.io as sio
    finally:
        if sys.modules.get(TORCH_SHIM, ...) is None:
            del sys.modules[TORCH_SHIM]
    return sio


def save_model(bundle: dict, path: str | Path) -> None:
    """Save {'model': Pipeline, ...plain metadata...} with skops, atomically and byte-stable."""
    sio = skops_io()
    with atomic_path(path) as tmp:
        tmp.write_bytes(_canonical_skops(sio.dumps(bundle)))


def load_model(path: str | Path) -> dict:
    """Load a skops model bundle, refusing any type outside :data:`TRUSTED_TYPES`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"model not found: {path} (run `dvc repro train`)")
    sio = skops_io()

    try:
        flagged = set(sio.get_untrusted_types(file=path))
        # skops trusts most sklearn types by default, so its list alone does not enforce
        # TRUSTED_TYPES: also check every class the schema names (plain builtins/numpy
        # containers aside, which skops itself would have flagged if unsafe).
        named = {t for t in _schema_types(path)
                 if t.rsplit(".", 1)[0] not in ("builtins", "numpy")}
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable skops model file ({exc})") from None
    untrusted = sorted(t for t in flagged | named if t not in TRUSTED_TYPES)
    if untrusted:
        raise PipelineError(f"refusing to load {path}: it contains untrusted types {untrusted}")
    return sio.load(path, trusted=sio.get_untrusted_types(file=path))


def _schema_types(path: Path) -> set[str]:
    """Every ``module.Class`` named in a skops file's schema."""
    with zipfile.ZipFile(path) as zf:
        schema = json.loads(zf.read("schema.json"))
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            mod, cls = node.get("__module__"), node.get("__class__")
            if isinstance(mod, str) and isinstance(cls, str):
                found.add(f"{mod}.{cls}")
            for val in node.values():
                walk(val)
        elif isinstance(node, list):
            for val in node:
                walk(val)

    walk(schema)
    return found
