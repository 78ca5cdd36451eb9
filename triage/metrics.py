"""Clinical metrics with confidence intervals for a binary triage score.

Proportions at the operating point (sensitivity, specificity, PPV, NPV, accuracy) get
Wilson intervals, which behave with small counts; threshold-free scores (ROC-AUC,
PR-AUC, F1, Brier, ECE) get a stratified bootstrap.

The triage KPI (:func:`triage_at_targets`): for each target sensitivity, a threshold set
on out-of-fold scores, then on test the sensitivity, the share of images a reader could
set aside (predicted negative) and the positives among them (missed), each with a CI.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

METRICS = ("roc_auc", "pr_auc", "f1", "accuracy", "sensitivity", "specificity", "ppv", "npv",
           "fn", "threshold", "brier", "ece")
WILSON = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
BOOTSTRAP = ("roc_auc", "pr_auc", "f1", "brier", "ece")


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity (``p >= t``) on (y, p) reaches ``target``.

    Meant for out-of-fold scores of the training labels, never for test.
    """
    y, p = np.asarray(y, int), np.asarray(p, float)
    pos = np.sort(p[y == 1])
    if len(pos) == 0:
        raise ValueError("no positive examples to set a sensitivity threshold on")
    # Allow at most floor((1-target)*n) positives below the threshold.
    k = int(np.floor((1.0 - target) * len(pos) + 1e-9))
    return float(pos[k])


def ece_score(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error with equal-width bins (weighted |accuracy - confidence|)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.sum() * abs(y[sel].mean() - p[sel].mean())
    return float(total / len(y)) if len(y) else float("nan")


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    z = norm.ppf(0.5 + level / 2)
    phat = k / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    # exact at the edges (rounding leaves e.g. 3e-17 for k = 0): a bound then brackets 0 or n
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return float(lo), float(hi)


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float, n_bins: int = 10) -> dict:
    """All metrics of :data:`METRICS` at one threshold (``p >= threshold`` → positive)."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    both = len(np.unique(y)) == 2
    div = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if both else float("nan"),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "accuracy": div(tp + tn, len(y)),
        "sensitivity": div(tp, tp + fn),
        "specificity": div(tn, tn + fp),
        "ppv": div(tp, tp + fp),
        "npv": div(tn, tn + fn),
        "fn": fn, "fp": fp, "tp": tp, "tn": tn,
        "threshold": float(threshold),
        "brier": float(brier_score_loss(y, p)),
        "ece": ece_score(y, p, n_bins),
    }


def fast_roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC (ties count 1/2); equals sklearn's, ~50x faster for bootstraps."""
    from scipy.stats import rankdata

    y = np.asarray(y, int)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fast_average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision with sklearn's step definition (ties grouped), in numpy."""
    y = np.asarray(y, int)
    order = np.argsort(-np.asarray(p, float), kind="mergesort")
    ys, ps = y[order], np.asarray(p, float)[order]
    # Last index of each block of tied scores: precision/recall only change there.
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / max(int(ys.sum()), 1)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = int(((pred == 1) & (y == 1)).sum())
    denom = 2 * tp + int(((pred == 1) & (y == 0)).sum()) + int(((pred == 0) & (y == 1)).sum())
    return 2 * tp / denom if denom else 0.0


def _bootstrap_indices(y: np.ndarray, n_boot: int, seed: int):
    """Stratified resamples: each keeps the class counts, so AUC is always defined."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for _ in range(n_boot):
        yield np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])


def _bootstrap_stats(y, p, threshold, n_boot, seed, n_bins) -> dict[str, np.ndarray]:
    """Metric values over stratified resamples; the same seed gives the same resamples,
    which is what makes :func:`paired_delta` paired."""
    out = {m: [] for m in BOOTSTRAP}
    for idx in _bootstrap_indices(y, n_boot, seed):
        yy, pp = y[idx], p[idx]
        out["roc_auc"].append(fast_roc_auc(yy, pp))
        out["pr_auc"].append(fast_average_precision(yy, pp))
        out["f1"].append(_f1(yy, (pp >= threshold).astype(int)))
        out["brier"].append(np.mean((pp - yy) ** 2))
        out["ece"].append(ece_score(yy, pp, n_bins))
    return {k: np.asarray(v) for k, v in out.items()}


def evaluate_scores(y, p, threshold: float, *, n_bootstrap: int = 1000, level: float = 0.95,
                    seed: int = 0, n_bins: int = 10) -> dict:
    """Point metrics plus ``<metric>_ci_low`` / ``<metric>_ci_high`` bounds."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    res = point_metrics(y, p, threshold, n_bins)
    counts = {"sensitivity": (res["tp"], res["tp"] + res["fn"]),
              "specificity": (res["tn"], res["tn"] + res["fp"]),
              "ppv": (res["tp"], res["tp"] + res["fp"]),
              "npv": (res["tn"], res["tn"] + res["fn"]),
              "accuracy": (res["tp"] + res["tn"], len(y))}
    for m, (k, n) in counts.items():
        res[f"{m}_ci_low"], res[f"{m}_ci_high"] = wilson_interval(k, n, level)
    if n_bootstrap and len(np.unique(y)) == 2:
        boots = _bootstrap_stats(y, p, threshold, n_bootstrap, seed, n_bins)
        a = (1 - level) / 2
        for m, vals in boots.items():
            res[f"{m}_ci_low"] = float(np.quantile(vals, a))
            res[f"{m}_ci_high"] = float(np.quantile(vals, 1 - a))
    return res


def paired_delta(y, p_a, p_b, threshold_a: float, threshold_b: float, *, n_bootstrap: int = 1000,
                 level: float = 0.95, seed: int = 0, n_bins: int = 10) -> dict:
    """Delta (b - a) of every metric, with a paired bootstrap CI for the threshold-free ones."""
    y = np.asarray(y, int)
    ma = point_metrics(y, p_a, threshold_a, n_bins)
    mb = point_metrics(y, p_b, threshold_b, n_bins)
    res = {m: float(mb[m] - ma[m]) for m in METRICS}
    if n_bootstrap and len(np.unique(y)) == 2:
        ba = _bootstrap_stats(y, np.asarray(p_a, float), threshold_a, n_bootstrap, seed, n_bins)
        bb = _bootstrap_stats(y, np.asarray(p_b, float), threshold_b, n_bootstrap, seed, n_bins)
        a = (1 - level) / 2
        for m in BOOTSTRAP:
            d = bb[m] - ba[m]  # same resample indices (same seed) → paired
            res[f"{m}_ci_low"] = float(np.quantile(d, a))
            res[f"{m}_ci_high"] = float(np.quantile(d, 1 - a))
    return res


# --------------------------------------------------------------------------- triage KPI
TRIAGE_KPIS = ("sensitivity", "set_aside", "missed")


def triage_key(target: float) -> str:
    """Metric key of a target sensitivity: ``s`` + its whole percentage (0.95 → ``s95``,
    1.0 → ``s100``). A target that is not a whole percentage (0.995) has no key: ValueError
    (params.yaml's ``evaluate.triage_targets`` rejects it up front)."""
    pct = round(100 * float(target))
    if abs(100 * float(target) - pct) > 1e-6:
        raise ValueError(f"target sensitivity {target!r} is not a whole percentage "
                         f"(0.90, 0.95, 0.98, ...): it has no s<percent> metric key")
    return f"s{pct}"


def triage_kpis(y, p, threshold: float, level: float = 0.95) -> dict:
    """The triage figures of a threshold on test (``p >= threshold`` → flagged):

    - ``sensitivity``: flagged positives / positives, Wilson CI;
    - ``set_aside``: share of images predicted negative (a reader could set them aside),
      Wilson CI on (set aside, images);
    - ``missed``: positives among the set-aside images (a count; equals the false
      negatives). Its CI is the Wilson interval of missed / positives scaled by the number
      of positives, i.e. positives × (1 − the sensitivity CI): the two agree exactly.

    The CIs cover the test-set sampling only; the threshold is taken as fixed.
    """
    y, p = np.asarray(y, int), np.asarray(p, float)
    flagged = p >= threshold
    n, n_pos = len(y), int((y == 1).sum())
    missed = int(((y == 1) & ~flagged).sum())
    n_aside = int((~flagged).sum())
    res = {"sensitivity": (n_pos - missed) / n_pos if n_pos else float("nan")}
    res["sensitivity_ci_low"], res["sensitivity_ci_high"] = wilson_interval(n_pos - missed, n_pos,
                                                                            level)
    res["set_aside"] = n_aside / n if n else float("nan")
    res["set_aside_ci_low"], res["set_aside_ci_high"] = wilson_interval(n_aside, n, level)
    lo, hi = wilson_interval(missed, n_pos, level)
    res.update(missed=missed, missed_ci_low=float(n_pos * lo), missed_ci_high=float(n_pos * hi))
    return res


def triage_at_targets(y_oof, p_oof, y_test, p_test, targets, level: float = 0.95) -> dict:
    """``{"s95": {"threshold": t, **triage_kpis(test at t)}, ...}`` for each target: ``t``
    reaches the target sensitivity on the out-of-fold scores (``y_oof``, ``p_oof``: the
    labelled set, as the operating threshold), never on test."""
    out = {}
    for target in targets:
        key = triage_key(target)
        if key in out:
            raise ValueError(f"two targets share the key {key}: {list(targets)}")
        t = threshold_for_sensitivity(y_oof, p_oof, float(target))
        out[key] = {"threshold": float(t), **triage_kpis(y_test, p_test, t, level)}
    return out
