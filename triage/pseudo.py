"""Pseudo-labelling strategies for the unlabelled pool.

Every strategy returns one row per *accepted* pool image: id, label, confidence (in
[0, 1]), strategy. Rejected images are simply not pseudo-labelled (they stay unlabelled);
the stage reports coverage so nothing disappears unnoticed.

Strategies (``pseudo.strategy``):

- ``cluster_vote``: majority label of the labelled points of a cluster (min purity, min
  support). HDBSCAN noise (cluster -1) is never labelled.
- ``confidence``: one classifier fitted on the labels, accepted above a threshold.
- ``self_training``: rounds of fit → calibrated, prior-corrected P(class) on the pool →
  accept the top of each class up to a per-class quota that grows each round → refit
  on labelled + accepted (weighted by confidence).
- ``label_spreading``: scikit-learn ``LabelSpreading`` on a kNN graph of labelled + pool
  points in a PCA space fitted on them (unsupervised), with the same quotas; the graph's
  neighbours are found by ``cluster.backend`` (scikit-learn's own ``kernel="knn"``, or
  FAISS through triage.neighbours).
- ``consensus``: ``self_training`` and ``label_spreading`` (and ``cluster_vote`` when
  clusters are given); accepted only where at least two agree.

Every labeller has one interface (``PseudoLabeler``): ``from_params(p, positive, backend)``
builds it from the ``pseudo.*`` params and ``cluster.backend`` (the vector-search library,
read by label spreading only), ``fit_predict(PoolData)`` labels the pool. ``LABELLERS``
maps each ``pseudo.strategy`` choice to its labeller; ``run_strategy`` looks one up.

Class-prior control: the pool's class prior is ``pseudo.class_prior`` (the positive
share) when given, else estimated from the labelled classifier's calibrated pool
probabilities by EM (Saerens, Latinne & Decaestecker 2002). Posteriors are re-weighted to
that prior, and each class gets a quota ``max_fraction × n_pool × prior(class)``, so the
pseudo-labels cannot drift to one class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .canonical import canonical_fit, canonical_reducer, logistic_regression, snap_relative
from .neighbours import KnnKernel, check_backend
from .params import SCHEMA
from .splits import kfold

PSEUDO_COLUMNS = ["id", "label", "confidence", "strategy"]
# the ``pseudo.strategy`` choices, declared once in the params schema; ``LABELLERS`` (below)
# has one labeller per choice
STRATEGIES = SCHEMA["pseudo"]["strategy"].choices


def empty_pseudo() -> pd.DataFrame:
    return pd.DataFrame({"id": pd.Series([], dtype=object), "label": pd.Series([], dtype=object),
                         "confidence": pd.Series([], dtype=float),
                         "strategy": pd.Series([], dtype=object)})


def _finish(out: pd.DataFrame, name: str) -> pd.DataFrame:
    if out.empty:
        return empty_pseudo()
    out = out.copy()
    out["confidence"] = np.clip(out["confidence"].astype(float), 0.0, 1.0)
    out["strategy"] = name
    return out[PSEUDO_COLUMNS].sort_values("id", kind="mergesort").reset_index(drop=True)


def _balance(accepted: pd.DataFrame) -> pd.DataFrame:
    """Keep the same number per class (the most confident), so one class cannot swamp training."""
    if accepted.empty:
        return accepted
    n = accepted.groupby("label").size()
    if len(n) < 2:
        return accepted.iloc[0:0]
    keep = int(n.min())
    return (accepted.sort_values(["confidence", "id"], ascending=[False, True])
            .groupby("label", sort=True).head(keep))


# --------------------------------------------------------------------------- class prior


def adjust_to_prior(p_pos: np.ndarray, train_prior: float, new_prior: float) -> np.ndarray:
    """Bayes re-weighting of P(positive|x) from the training prior to ``new_prior``."""
    p = np.clip(np.asarray(p_pos, float), 1e-12, 1 - 1e-12)
    a = p * new_prior / train_prior
    b = (1 - p) * (1 - new_prior) / (1 - train_prior)
    return a / (a + b)


def estimate_prior(p_pos: np.ndarray, train_prior: float = 0.5, max_iter: int = 200,
                   tol: float = 1e-7) -> float:
    """Positive share of an unlabelled set by EM on its posteriors (Saerens et al. 2002).

    ``p_pos`` must be (roughly) calibrated posteriors under ``train_prior``. Returns a
    value clipped to [0.02, 0.98] so a quota never empties a class entirely.
    """
    p_pos = np.asarray(p_pos, float)
    if len(p_pos) == 0:
        return float(train_prior)
    prior = float(train_prior)
    for _ in range(max_iter):
        new = float(adjust_to_prior(p_pos, train_prior, prior).mean())
        if abs(new - prior) < tol:
            prior = new
            break
        prior = new
    return float(np.clip(prior, 0.02, 0.98))


def class_quotas(n_pool: int, prior_pos: float, fraction: float, positive: str,
                 negative: str) -> dict[str, int]:
    """How many pseudo-labels each class may receive: ``fraction × n_pool × prior``."""
    total = fraction * n_pool
    return {positive: int(np.floor(total * prior_pos + 1e-9)),
            negative: int(np.floor(total * (1 - prior_pos) + 1e-9))}


def select_with_quotas(ids, p_pos: np.ndarray, quotas: dict[str, int], positive: str,
                       negative: str, threshold: float = 0.5,
                       allowed: np.ndarray | None = None) -> pd.DataFrame:
    """Top ``quotas[c]`` pool points of each class by P(c), among those with P(c) ≥ threshold.

    Ties are broken by id so the result is deterministic. ``allowed`` masks out points
    that may never be labelled (e.g. HDBSCAN noise).
    """
    ids = np.asarray(ids, dtype=object)
    p_pos = np.asarray(p_pos, float)
    ok = np.ones(len(ids), bool) if allowed is None else np.asarray(allowed, bool)
    parts = []
    for cls, conf in ((positive, p_pos), (negative, 1 - p_pos)):
        cand = np.flatnonzero(ok & (conf >= threshold) & (conf > 0.5 if cls == positive
                                                            else conf >= 0.5))
        order = np.lexsort((ids[cand], -conf[cand]))  # most confident first, then id
        take = cand[order[: max(quotas.get(cls, 0), 0)]]
        parts.append(pd.DataFrame({"id": ids[take], "label": cls, "confidence": conf[take]}))
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- shared pieces


def _binary(y_lab, positive: str) -> tuple[np.ndarray, str]:
    y_lab = np.asarray(y_lab, dtype=object)
    classes = sorted(set(y_lab.tolist()))
    if positive not in classes or len(classes) != 2:
        raise ValueError(f"pseudo-labelling needs two classes including '{positive}', "
                         f"got {classes}")
    negative = classes[0] if classes[1] == positive else classes[1]
    return (y_lab == positive).astype(int), negative


def fit_space(X_lab, X_pool, n_components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scaler + PCA fitted on labelled + pool (no labels used): the strategies' feature space."""
    X_all = np.concatenate([X_lab, X_pool]).astype(np.float64)
    n_comp = int(max(1, min(n_components, X_all.shape[0] - 1, X_all.shape[1])))
    Z = canonical_reducer(n_comp, seed).fit_transform(X_all)
    return Z[: len(X_lab)], Z[len(X_lab):]


def calibrated_pool_proba(Z_lab, y_lab, Z_pool, C: float, seed: int, folds: int = 5,
                          Z_ps=None, y_ps=None, w_ps=None,
                          groups=None) -> tuple[np.ndarray, np.ndarray]:
    """P(positive) for the pool from a logistic regression on labelled (+ pseudo) points,
    Platt-calibrated on out-of-fold scores of the labelled points (balanced training
    prior 0.5; folds keep each split group of ``groups`` on one side, ``triage.splits``).
    Returns (pool probabilities, out-of-fold labelled probabilities)."""
    y_lab = np.asarray(y_lab, int)
    has_ps = Z_ps is not None and len(Z_ps) > 0

    def fit(Z, y, w):
        scale = StandardScaler().fit(Z)
        clf = canonical_fit(logistic_regression(C, "balanced", seed).fit(scale.transform(Z), y,
                                                                          sample_weight=w))
        return lambda A: clf.decision_function(scale.transform(A))

    def train_set(idx):
        if not has_ps:
            return Z_lab[idx], y_lab[idx], np.ones(len(idx))
        return (np.concatenate([Z_lab[idx], Z_ps]), np.concatenate([y_lab[idx], y_ps]),
                np.concatenate([np.ones(len(idx)), w_ps]))

    oof = np.zeros(len(y_lab))
    for tr, va in kfold(y_lab, folds, seed, groups)[0]:
        oof[va] = fit(*train_set(tr))(Z_lab[va])
    # Platt scaling with balanced weights: calibrated under a 50/50 prior.
    platt = canonical_fit(logistic_regression(1e4, "balanced").fit(oof[:, None], y_lab))
    if platt.coef_[0, 0] <= 0:
        # Held-out scores do not rise with the true class: the classifier carries no
        # signal here, and a negative slope would turn its ranking upside down. Say so
        # with P = 0.5 everywhere (callers accept nothing from it).
        return np.full(len(Z_pool), 0.5), np.full(len(y_lab), 0.5)
    full = fit(*train_set(np.arange(len(y_lab))))
    return (snap_relative(platt.predict_proba(full(Z_pool)[:, None])[:, 1]),
            snap_relative(platt.predict_proba(oof[:, None])[:, 1]))


def pool_prior(Z_lab, y_lab, Z_pool, C: float, seed: int, given: float | None,
               groups=None) -> float:
    """The pool's positive share: ``given`` if set, else EM on calibrated posteriors."""
    if given is not None:
        return float(given)
    p_pool, _ = calibrated_pool_proba(Z_lab, y_lab, Z_pool, C, seed, groups=groups)
    return estimate_prior(p_pool, 0.5)


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class PoolData:
    """What every labeller reads: the pool (ids, vectors), the labelled set (vectors,
    labels) and, when the pool was clustered, both sides' cluster ids (HDBSCAN noise = -1).
    """

    pool_ids: Any
    X_pool: np.ndarray
    X_lab: np.ndarray
    y_lab: Any
    pool_clusters: np.ndarray | None = None
    lab_clusters: np.ndarray | None = None
    lab_groups: np.ndarray | None = None  # split groups of the labelled set (triage.splits)

    @property
    def has_clusters(self) -> bool:
        return self.pool_clusters is not None and self.lab_clusters is not None

    @property
    def allowed(self) -> np.ndarray | None:
        """Pool points that may be labelled: all but HDBSCAN noise (None = no clusters)."""
        return None if self.pool_clusters is None else np.asarray(self.pool_clusters) >= 0


class PseudoLabeler(ABC):
    """The one interface of the labellers: built from the ``pseudo.*`` params, then
    ``fit_predict(PoolData)`` → accepted rows (``PSEUDO_COLUMNS``)."""

    name: str  # its ``pseudo.strategy`` choice (the key in ``LABELLERS``)
    uses_clusters = False  # needs (or, in consensus, can use) the pool's cluster ids

    @classmethod
    @abstractmethod
    def from_params(cls, p: dict, positive: str, backend: str = "sklearn") -> PseudoLabeler:
        """Built from the ``pseudo.*`` params ``p`` (seed ``p['seed']``) and
        ``cluster.backend`` (``backend``: the library of its vector searches, if any)."""

    @abstractmethod
    def fit_predict(self, data: PoolData) -> pd.DataFrame:
        """The accepted pool images: ``PSEUDO_COLUMNS``, sorted by id."""


class ClusterVotePseudoLabeler(PseudoLabeler):
    """Label a pool image with the majority label of the labelled points in its cluster.

    Only clusters with at least ``min_support`` labelled points and purity ≥
    ``min_purity`` vote. Confidence is the Laplace-smoothed purity, so a cluster backed by
    3/3 labels (0.8) counts less than one backed by 30/30 (0.97). Cluster -1 (HDBSCAN
    noise) never votes.
    """

    name = "cluster_vote"
    uses_clusters = True

    def __init__(self, min_purity: float = 0.8, min_support: int = 3, balance_classes: bool = False):
        self.min_purity, self.min_support = min_purity, min_support
        self.balance_classes = balance_classes

    @classmethod
    def from_params(cls, p: dict, positive: str, backend: str = "sklearn") -> ClusterVotePseudoLabeler:
        return cls(p["min_purity"], p["min_support"], p["balance_classes"])

    def fit_predict(self, data: PoolData) -> pd.DataFrame:
        if not data.has_clusters:
            raise ValueError("cluster_vote needs cluster assignments")
        lab = pd.DataFrame({"cluster": np.asarray(data.lab_clusters), "y": np.asarray(data.y_lab)})
        votes = {}
        for c, g in lab.groupby("cluster"):
            if c < 0:  # noise
                continue
            counts = g["y"].value_counts()
            top = counts.index[0] if counts.iloc[0] != counts.iloc[-1] or len(counts) == 1 else None
            n = len(g)
            purity = counts.iloc[0] / n
            if top is None or n < self.min_support or purity < self.min_purity:
                continue
            votes[c] = (top, (counts.iloc[0] + 1) / (n + 2))
        rows = [(i, *votes[c]) for i, c in zip(data.pool_ids, data.pool_clusters) if c in votes]
        out = pd.DataFrame(rows, columns=["id", "label", "confidence"])
        if self.balance_classes:
            out = _balance(out)
        return _finish(out, self.name)


class ConfidencePseudoLabeler(PseudoLabeler):
    """Accept pool images a classifier fitted on the labelled set is confident about."""

    name = "confidence"

    def __init__(self, threshold: float = 0.9, C: float = 0.1, balance_classes: bool = False,
                 random_state: int = 0):
        self.threshold, self.C = threshold, C
        self.balance_classes, self.random_state = balance_classes, random_state

    @classmethod
    def from_params(cls, p: dict, positive: str, backend: str = "sklearn") -> ConfidencePseudoLabeler:
        return cls(p["confidence_threshold"], p["C"], p["balance_classes"], random_state=p["seed"])

    def fit_predict(self, data: PoolData) -> pd.DataFrame:
        """HDBSCAN noise (``data.allowed``) is masked out before any class balancing, so
        that the balance holds in what is returned."""
        X_pool = data.X_pool
        clf = make_pipeline(StandardScaler(), logistic_regression(
            self.C, "balanced", self.random_state))
        canonical_fit(clf.fit(np.asarray(data.X_lab, np.float64), data.y_lab))
        proba = (snap_relative(clf.predict_proba(np.asarray(X_pool, np.float64))) if len(X_pool)
                 else np.zeros((0, len(clf.classes_))))
        best = proba.argmax(axis=1) if len(proba) else np.zeros(0, int)
        conf = proba.max(axis=1) if len(proba) else np.zeros(0)
        keep = conf >= self.threshold
        if data.allowed is not None:
            keep &= data.allowed
        out = pd.DataFrame({"id": np.asarray(data.pool_ids)[keep],
                            "label": clf.classes_[best[keep]],
                            "confidence": conf[keep]})
        if self.balance_classes:
            out = _balance(out)
        return _finish(out, self.name)


class SelfTrainingPseudoLabeler(PseudoLabeler):
    """Iterative self-training with calibrated confidence and per-class quotas.

    Round r (1..rounds): fit on labelled + accepted pseudo-labels (weighted by
    confidence × ``round_weight``), Platt-calibrate on out-of-fold labelled scores,
    re-weight to the pool prior, then accept in each class the most probable pool points
    (P ≥ ``threshold``) up to ``quota(class) × r / rounds``. Accepted labels are re-chosen
    each round from the refitted model (a point can change class or drop out).
    """

    name = "self_training"

    def __init__(self, positive: str, rounds: int = 3, max_fraction: float = 0.5,
                 threshold: float = 0.5, C: float = 0.03, pca_components: int = 64,
                 class_prior: float | None = None, round_weight: float = 0.5,
                 random_state: int = 0):
        self.positive, self.rounds, self.max_fraction = positive, rounds, max_fraction
        self.threshold, self.C, self.pca_components = threshold, C, pca_components
        self.class_prior, self.round_weight = class_prior, round_weight
        self.random_state = random_state

    @classmethod
    def from_params(cls, p: dict, positive: str,
                    backend: str = "sklearn") -> SelfTrainingPseudoLabeler:
        return cls(positive, p["rounds"], p["max_fraction"], p["min_confidence"], p["C"],
                   p["pca_components"], p.get("class_prior"), p["round_weight"], p["seed"])

    def fit_predict(self, data: PoolData) -> pd.DataFrame:
        pool_ids = np.asarray(data.pool_ids, dtype=object)
        if len(pool_ids) == 0:
            return empty_pseudo()
        y, negative = _binary(data.y_lab, self.positive)
        Z_lab, Z_pool = fit_space(data.X_lab, data.X_pool, self.pca_components, self.random_state)
        p_pool, _ = calibrated_pool_proba(Z_lab, y, Z_pool, self.C, self.random_state,
                                          groups=data.lab_groups)
        if np.all(p_pool == 0.5):  # no signal in the labels' classifier: label nothing
            self.prior_ = float(self.class_prior) if self.class_prior is not None else 0.5
            return empty_pseudo()
        prior = (self.class_prior if self.class_prior is not None
                 else estimate_prior(p_pool, 0.5))
        self.prior_ = float(prior)
        quotas = class_quotas(len(pool_ids), prior, self.max_fraction, self.positive, negative)
        index = {i: k for k, i in enumerate(pool_ids)}
        out = pd.DataFrame(columns=["id", "label", "confidence"])
        for r in range(1, self.rounds + 1):
            if r > 1:
                take = np.array([index[i] for i in out["id"]], dtype=int)
                p_pool, _ = calibrated_pool_proba(
                    Z_lab, y, Z_pool, self.C, self.random_state,
                    Z_ps=Z_pool[take], y_ps=(out["label"] == self.positive).to_numpy(int),
                    w_ps=out["confidence"].to_numpy(float) * self.round_weight,
                    groups=data.lab_groups)
            p_adj = adjust_to_prior(p_pool, 0.5, prior)
            grow = {c: int(np.floor(q * r / self.rounds)) for c, q in quotas.items()}
            out = select_with_quotas(pool_ids, p_adj, grow, self.positive, negative,
                                     self.threshold, data.allowed)
            if out.empty:
                break
        return _finish(out, self.name)


class LabelSpreadingPseudoLabeler(PseudoLabeler):
    """``LabelSpreading`` (kNN graph) on labelled + pool points in a PCA space, with quotas.

    Label distributions are read as P(class) under the labelled set's 50/50 prior,
    re-weighted to the pool prior, then the most probable points of each class are kept
    up to its quota.

    ``backend`` (``cluster.backend``) finds the graph's neighbours: ``sklearn`` is
    scikit-learn's ``kernel="knn"`` (the committed path, untouched); ``faiss`` passes the
    same connectivity graph (each point's ``n_neighbors`` nearest, itself included) as a
    callable kernel built by triage.neighbours (exact distances, ties to the lower index:
    the same graph unless a point's n-th neighbour is tied, where scikit-learn's pick is
    argpartition's; tests/test_faiss.py states the agreement).
    """

    name = "label_spreading"

    def __init__(self, positive: str, n_neighbors: int = 10, alpha: float = 0.2,
                 max_fraction: float = 0.5, threshold: float = 0.5, C: float = 0.03,
                 pca_components: int = 32, class_prior: float | None = None,
                 random_state: int = 0, backend: str = "sklearn"):
        self.positive, self.n_neighbors, self.alpha = positive, n_neighbors, alpha
        self.max_fraction, self.threshold, self.C = max_fraction, threshold, C
        self.pca_components, self.class_prior = pca_components, class_prior
        self.random_state = random_state
        self.backend = check_backend(backend)

    @classmethod
    def from_params(cls, p: dict, positive: str,
                    backend: str = "sklearn") -> LabelSpreadingPseudoLabeler:
        return cls(positive, p["n_neighbors"], p["spreading_alpha"], p["max_fraction"],
                   p["min_confidence"], p["C"], p["pca_components"], p.get("class_prior"),
                   p["seed"], backend=backend)

    def fit_predict(self, data: PoolData) -> pd.DataFrame:
        from sklearn.semi_supervised import LabelSpreading

        pool_ids = np.asarray(data.pool_ids, dtype=object)
        if len(pool_ids) == 0:
            return empty_pseudo()
        y, negative = _binary(data.y_lab, self.positive)
        Z_lab, Z_pool = fit_space(data.X_lab, data.X_pool, self.pca_components, self.random_state)
        Z = np.concatenate([Z_lab, Z_pool])
        target = np.r_[y, -np.ones(len(Z_pool), int)]
        k = int(min(self.n_neighbors, len(Z) - 1))
        if self.backend == "sklearn":
            ls = LabelSpreading(kernel="knn", n_neighbors=k, alpha=self.alpha, max_iter=100)
        else:
            ls = LabelSpreading(kernel=KnnKernel(k, self.backend), alpha=self.alpha,
                                max_iter=100)
        ls.fit(Z, target)
        dist = snap_relative(ls.label_distributions_[len(Z_lab):])
        # Spread mass follows the labelled class ratio: divide by the class counts so the
        # distributions read as P(class) under a 50/50 prior whatever the labelled mix
        # (annotation rounds unbalance it), then re-weight to the pool prior below.
        counts = np.bincount(y, minlength=2).astype(float)
        dist = dist / counts[np.asarray(ls.classes_, int)]
        col = list(ls.classes_).index(1)
        with np.errstate(invalid="ignore"):
            p = dist[:, col] / dist.sum(axis=1)
        p = np.nan_to_num(p, nan=0.5)  # points the graph never reached
        prior = pool_prior(Z_lab, y, Z_pool, self.C, self.random_state, self.class_prior,
                           data.lab_groups)
        self.prior_ = float(prior)
        p_adj = adjust_to_prior(p, 0.5, prior)
        quotas = class_quotas(len(pool_ids), prior, self.max_fraction, self.positive, negative)
        out = select_with_quotas(pool_ids, p_adj, quotas, self.positive, negative,
                                 self.threshold, data.allowed)
        return _finish(out, self.name)


def consensus(results: list[pd.DataFrame], min_agree: int = 2) -> pd.DataFrame:
    """Points labelled identically by at least ``min_agree`` strategies; confidence = mean
    confidence of the agreeing strategies (a point two strategies label differently is
    dropped even if a third agrees with one of them, when that leaves < min_agree)."""
    results = [r for r in results if not r.empty]
    if len(results) < min_agree:
        return empty_pseudo()
    allr = pd.concat([r[["id", "label", "confidence"]] for r in results], ignore_index=True)
    grouped = allr.groupby(["id", "label"], sort=True).agg(
        n=("confidence", "size"), confidence=("confidence", "mean")).reset_index()
    n_labels = grouped.groupby("id")["label"].transform("size")
    out = grouped[(grouped["n"] >= min_agree) & (n_labels == 1)]
    return _finish(out[["id", "label", "confidence"]], "consensus")


class ConsensusPseudoLabeler(PseudoLabeler):
    """Its members' labels where at least ``min_agree`` of them agree (``consensus``).
    A member that uses clusters (cluster_vote) takes part only when the pool was clustered.
    """

    name = "consensus"
    uses_clusters = True
    MEMBERS = (SelfTrainingPseudoLabeler, LabelSpreadingPseudoLabeler, ClusterVotePseudoLabeler)

    def __init__(self, members: list[PseudoLabeler], min_agree: int = 2):
        self.members, self.min_agree = list(members), min_agree

    @classmethod
    def from_params(cls, p: dict, positive: str, backend: str = "sklearn") -> ConsensusPseudoLabeler:
        return cls([member.from_params(p, positive, backend) for member in cls.MEMBERS])

    def fit_predict(self, data: PoolData) -> pd.DataFrame:
        return consensus([m.fit_predict(data) for m in self.members
                          if data.has_clusters or not m.uses_clusters], self.min_agree)


LABELLERS: dict[str, type[PseudoLabeler]] = {
    labeller.name: labeller
    for labeller in (ClusterVotePseudoLabeler, ConfidencePseudoLabeler, SelfTrainingPseudoLabeler,
                     LabelSpreadingPseudoLabeler, ConsensusPseudoLabeler)
}


def labeller_for(strategy: str) -> type[PseudoLabeler]:
    """The labeller class of a ``pseudo.strategy`` (ValueError naming the choices)."""
    try:
        return LABELLERS[strategy]
    except KeyError:
        raise ValueError(f"unknown pseudo.strategy {strategy!r} (one of {sorted(LABELLERS)})") from None


def run_strategy(p: dict, positive: str, pool_ids, X_pool, X_lab, y_lab,
                 pool_clusters=None, lab_clusters=None, lab_groups=None,
                 backend: str = "sklearn") -> pd.DataFrame:
    """The labeller ``p['strategy']`` built from the ``pseudo.*`` params ``p`` (seed
    ``p['seed']``), fitted on this pool: the one entry point the stage and the
    cross-validation share. ``pool_clusters``/``lab_clusters`` are needed by cluster_vote;
    ``pool_clusters`` excludes HDBSCAN noise (cluster -1) in every strategy;
    ``lab_groups`` keeps each split group on one side of the calibration folds;
    ``backend`` is ``cluster.backend`` (label spreading's neighbour search)."""
    return labeller_for(p["strategy"]).from_params(p, positive, backend).fit_predict(
        PoolData(pool_ids, X_pool, X_lab, y_lab, pool_clusters, lab_clusters, lab_groups))


def pseudo_label_quality(pseudo: pd.DataFrame, truth: pd.DataFrame, classes: list[str]) -> dict:
    """Accuracy and per-class precision of accepted pseudo-labels against hidden truth (id, label)."""
    if truth.empty or pseudo.empty:
        return {}
    merged = pseudo.merge(truth[["id", "label"]].rename(columns={"label": "truth"}), on="id")
    if merged.empty:
        return {}
    out = {"accuracy": float((merged["label"] == merged["truth"]).mean()),
           "n_with_truth": int(len(merged))}
    for c in classes:
        sel = merged[merged["label"] == c]
        if len(sel):
            out[f"precision/{c}"] = float((sel["truth"] == c).mean())
        n_true = int((truth["label"] == c).sum())
        if n_true:
            out[f"recall/{c}"] = float(((merged["label"] == c) & (merged["truth"] == c)).sum() / n_true)
    return out
