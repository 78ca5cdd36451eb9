"""Canonical numerics: the same inputs give the same bits on any CPU, BLAS kernel and thread count.

Why this exists: BLAS/LAPACK (OpenBLAS picks its kernels per CPU, threads split long
reductions), NumPy's SIMD dispatch and libm variants add the same numbers in different
orders, with or without fused multiply-add. The results differ in their last bits
(measured on the demo: PCA components ±3e-14, k-means centres ±2e-13, float32 logistic
regression ±2.4e-3 in out-of-fold probabilities). Such
differences mean nothing numerically, but they change a file's hash, so the committed
``dvc.lock`` only reproduces on the CPU that wrote it, and at a near tie they flip a
discrete choice (a pseudo-label quota cut, an operating threshold, an argmax).

The rule, applied wherever a library computes floats that are then written or compared:

1. fits run in float64 (scikit-learn keeps float32 inputs in float32, whose noise is
   10^8 times larger), and where a stopping test could sit on a tie it is removed
   (k-means runs to strict convergence: no label changes);
2. every such float is snapped (:func:`snap`) to a grid far coarser than the noise:
   multiples of ``2**(E - SNAP_BITS)`` where ``2**E`` bounds the array's largest magnitude.
   A kernel-dependent error of ~1e-13 relative then survives only if a value lies within
   1e-13 of a grid midpoint: about ``2e-13 / 2**-16 ≈ 1.3e-8`` per value, ~1e-4 per run for
   the ~10^4 values the demo writes. Values that are equal in exact arithmetic come out
   equal, so ties are real ties, broken by image id, never by rounding noise;
3. reductions whose order NumPy fixes (sums, means, sorting, elementwise maths on snapped
   inputs) are deterministic and need no snapping.

Embeddings are made bit-identical instead (one capped kernel family, ``triage.embed``): a
grid cannot absorb float32 convolution noise (2e-6) over 10^6 values.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

# 16 bits ≈ 4.8 significant digits of an array's largest |value|: finer than anything the
# pipeline reports (metrics keep 6 decimals of values in [0, 1] only where they are
# computed from snapped inputs), coarse enough that float noise almost never crosses.
SNAP_BITS = 16


def snap(values, bits: int = SNAP_BITS, axis: int | None = None) -> np.ndarray:
    """``values`` (float64) rounded to multiples of ``2**(E - bits)``, ``2**E`` > max |value|.

    Block rounding (one grid per array, or per slice along ``axis``) rather than per-value
    significant digits: the noise of a sum is relative to the size of its terms, not of
    its result, so a small value born of cancellation is as noisy as a large one. Use
    ``axis=1`` for per-sample outputs (one grid per row), so that a sample's value does not
    depend on which other samples shared its batch. Non-finite values pass through.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    finite = np.isfinite(x)
    magnitude = np.where(finite, np.abs(x), 0.0)
    top = np.max(magnitude, axis=axis, keepdims=axis is not None)
    _, exponent = np.frexp(top)  # top = m * 2**exponent, 0.5 <= m < 1 (0 → exponent 0)
    quantum = np.ldexp(1.0, exponent.astype(np.int64) - bits)
    out = np.where(finite, np.rint(x / quantum) * quantum, x)  # power-of-two scaling: exact
    return out + 0.0  # -0.0 → 0.0: the same value must have the same bytes


def snap_relative(values, bits: int = SNAP_BITS) -> np.ndarray:
    """Per-value rounding to ``bits`` significant bits, for probabilities and scales: a
    probability's noise is relative to itself (it is a sigmoid of a noisy logit), a
    per-value grid keeps 1e-7 distinct from 0, and a sample's value does not depend on its
    batch."""
    x = np.asarray(values, dtype=np.float64)
    mantissa, exponent = np.frexp(x)
    return np.ldexp(np.rint(np.ldexp(mantissa, bits)), exponent - bits) + 0.0


def logistic_regression(C: float, class_weight=None, random_state: int = 0):
    """The L2 logistic regression every stage uses (lbfgs), to be fitted on float64.

    On float32 embeddings scikit-learn solves in float32: coefficients then differ by
    ~2e-7 relative between OpenBLAS kernels and lbfgs' path drifts with them (out-of-fold
    probabilities moved by 2.4e-3, the operating threshold with them). In float64 the
    measured difference is ~1e-15, and lbfgs' stopping test, which moves by orders of
    magnitude over its iterations, is practically never within that of its tolerance, so
    both machines stop at the same iteration. (Newton-Cholesky gave the same bytes under
    every knob too, at 25 % more train/crossval time.)
    """
    return LogisticRegression(C=C, class_weight=class_weight, solver="lbfgs", tol=1e-4,
                              max_iter=5000, random_state=random_state)


# Fitted attributes that carry kernel noise, per estimator; snapped in place after fit.
_NOISY = ("coef_", "intercept_", "components_", "explained_variance_",
          "explained_variance_ratio_", "singular_values_", "cluster_centers_",
          "dual_coef_", "a_", "b_")
_POSITIVE = ("noise_variance_",)


def canonical_fit(estimator):
    """Snap the noisy fitted attributes of ``estimator`` and of everything it wraps
    (Pipeline steps, CalibratedClassifierCV members), in place; returns it.

    Predictions are then computed from canonical parameters; the prediction itself
    (a BLAS product) is snapped by the caller (:func:`snap`)."""
    for step in _members(estimator):
        for name in _NOISY:
            value = getattr(step, name, None)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                setattr(step, name, snap(value).astype(value.dtype))
            elif isinstance(value, float):
                setattr(step, name, float(snap([value])[0]))
        for name in _POSITIVE:
            value = getattr(step, name, None)
            if isinstance(value, (float, np.floating)):
                setattr(step, name, float(snap_relative([value])[0]))
    return estimator


def _members(estimator):
    yield estimator
    steps = getattr(estimator, "steps", None)
    if steps:
        for _, step in steps:
            yield from _members(step)
    for cal in getattr(estimator, "calibrated_classifiers_", None) or ():
        yield from _members(cal.estimator)
        for calibrator in cal.calibrators:
            yield from _members(calibrator)



class CanonicalPipeline(Pipeline):
    """A Pipeline that computes in float64 (scikit-learn keeps float32 inputs in float32,
    whose noise, ~1e-7, is too close to the grid), snaps its fitted attributes after fit
    and its transform output per row."""

    def fit(self, X, y=None, **params):
        super().fit(np.asarray(X, dtype=np.float64), y, **params)
        return canonical_fit(self)

    def transform(self, X, **params):
        return snap(super().transform(np.asarray(X, dtype=np.float64), **params), axis=1)

    def fit_transform(self, X, y=None, **params):
        return self.fit(X, y, **params).transform(X)


def canonical_reducer(n_components: int, seed: int) -> CanonicalPipeline:
    """StandardScaler → PCA (float64) with snapped components; outputs snapped per row.

    The solver stays scikit-learn's ``auto`` (randomized for these shapes, seeded): its
    kernel noise (±3e-14 measured) is as small as an exact eigendecomposition's, and it is
    several times faster on 512-d embeddings."""
    return CanonicalPipeline([("scale", StandardScaler()),
                              ("pca", PCA(n_components=n_components, random_state=seed))])
