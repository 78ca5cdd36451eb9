"""Drift of a new batch of images against the training pool (labelled + unlabelled).

Three families of signals, each tested at ``alpha`` (Bonferroni inside a family):

* **embedding** — kernel two-sample test: MMD² with an RBF kernel (median-distance
  bandwidth) in a PCA space fitted on pool and batch together (the pooled sample, no group
  labels, so the two groups stay exchangeable under the permutation null), permutation
  p-value; plus a KS test per PCA component (Bonferroni over components). The family has
  two tests, so each is compared to ``alpha / 2`` (Bonferroni): either significant →
  embedding drift, with a family-wise error rate of at most ``alpha``.
* **image statistics** (the QC measurements) — KS on per-image mean intensity, contrast
  (pixel std) and sharpness (mean |Laplacian| after resizing to the embedding size).
* **prediction** — predicted-positive rate at the operating threshold, Fisher exact test.
  A change can be a real change of prevalence rather than of the images, so it is
  reported on its own (``prediction_shift``) and does not make ``drift`` true by itself.
  With ``drift.match_prevalence`` the embedding and image tests compare the batch with a
  reference resampled to the batch's predicted-positive rate (``prevalence_matched``), so
  that a change of prevalence alone does not read as a change of the images.

Everything is seeded (subsampling, permutations): the same inputs give the same numbers.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np
from scipy.stats import fisher_exact, ks_2samp

from .canonical import canonical_reducer, snap, snap_relative
from .errors import PipelineError
from .images import load_grey
from .pages import (
    BASE_CSS,
    PAGE_END,
    density_histograms_svg,
    grid,
    img_html,
    page_head,
    plural,
    table,
    thumbnail_uri,
)

STAT_NAMES = ("mean_intensity", "contrast", "sharpness")


def subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``k`` of ``n`` items (all when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def prevalence_matched(pred_ref: np.ndarray, batch_rate: float, k: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``k`` reference items whose predicted-positive share is
    ``batch_rate`` (a stratified subsample by the model's decision).

    The images of a batch with another prevalence (more cancers) differ from the pool's
    by that alone; comparing against a reference with the batch's predicted mix asks
    whether the images changed *beyond* the change of prevalence, which the
    predicted-positive-rate test reports on its own. Uses predictions only, no labels.
    """
    pred_ref = np.asarray(pred_ref, bool)
    pos, neg = np.flatnonzero(pred_ref), np.flatnonzero(~pred_ref)
    rate = float(np.clip(batch_rate, 0.0, 1.0))
    n = k
    if rate > 0:
        n = min(n, int(np.floor(len(pos) / rate)))
    if rate < 1:
        n = min(n, int(np.floor(len(neg) / (1 - rate))))
    n_pos = int(round(n * rate))
    n_pos, n_neg = min(n_pos, len(pos)), min(n - n_pos, len(neg))
    take = np.r_[rng.choice(pos, size=n_pos, replace=False) if n_pos else np.zeros(0, int),
                 rng.choice(neg, size=n_neg, replace=False) if n_neg else np.zeros(0, int)]
    return np.sort(take.astype(int))


def image_stats(paths, size: int) -> np.ndarray:
    """(n, 3) mean intensity, contrast (std) and sharpness (mean |Laplacian|), 0-255 scale,
    of each image as the embedding sees it (greyscale, resized to size×size)."""
    out = np.full((len(paths), 3), np.nan)
    for i, p in enumerate(paths):
        try:
            a = np.asarray(load_grey(str(p), size), dtype=np.float64)
        except Exception:  # noqa: BLE001 - unreadable images are QC's business
            continue
        lap = (4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:])
        out[i] = a.mean(), a.std(), np.abs(lap).mean()
    return out


def rbf_mmd_test(A: np.ndarray, B: np.ndarray, n_permutations: int, seed: int) -> dict:
    """Biased MMD² (RBF, median heuristic) and its permutation p-value."""
    Z = np.concatenate([A, B]).astype(np.float64)
    sq = (Z * Z).sum(1)
    # snapped (triage.canonical): Z @ Z.T is a BLAS product and np.exp is SIMD-dispatched,
    # both CPU-dependent in the last bits; the p-value compares sums of these.
    D2 = snap(np.maximum(sq[:, None] + sq[None] - 2 * Z @ Z.T, 0.0))
    iu = np.triu_indices(len(Z), 1)
    sigma2 = float(np.median(D2[iu])) or 1.0
    K = snap(np.exp(-D2 / (2 * sigma2)))
    nA, nB = len(A), len(B)
    w = np.concatenate([np.full(nA, 1.0 / nA), np.full(nB, -1.0 / nB)])
    stat = float(snap_relative(w @ K @ w))
    rng = np.random.default_rng(seed)
    perms = snap_relative([(lambda v: v @ K @ v)(rng.permutation(w)) for _ in range(n_permutations)])
    p = (1 + int((perms >= stat).sum())) / (1 + n_permutations)
    # witness: how much each point looks like the batch rather than the pool
    witness = K[:, nA:].mean(1) - K[:, :nA].mean(1)
    return {"mmd2": stat, "p_value": p, "null_mean": float(perms.mean()),
            "bandwidth": float(np.sqrt(sigma2)), "witness_batch": witness[nA:]}


def ks_family(ref: np.ndarray, new: np.ndarray, names) -> list[dict]:
    """KS per column, with Bonferroni-adjusted p-values over the columns."""
    rows = []
    k = ref.shape[1]
    for j, name in enumerate(names):
        a, b = ref[:, j], new[:, j]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if len(a) < 2 or len(b) < 2:
            continue
        r = ks_2samp(a, b)
        rows.append({"name": name, "ks": float(r.statistic), "p_value": float(r.pvalue),
                     "p_adjusted": float(min(1.0, r.pvalue * k)),
                     "ref_mean": float(a.mean()), "batch_mean": float(b.mean())})
    return rows


def compare(X_ref: np.ndarray, X_new: np.ndarray, stats_ref: np.ndarray, stats_new: np.ndarray,
            p_ref: np.ndarray, p_new: np.ndarray, threshold: float, *, alpha: float,
            n_permutations: int, pca_components: int, seed: int) -> dict:
    """All drift signals of ``new`` vs ``ref`` (already subsampled); see module docstring.

    The scaler + PCA are fitted on the pooled sample ``X_ref ∪ X_new``: fitted on the
    reference alone, the reference is over-fitted by its own principal axes and the groups
    are no longer exchangeable, so MMD and KS p-values come out too small under the null.
    The embedding family (MMD, min Bonferroni KS over components) is Bonferroni-corrected:
    each p-value is compared to ``alpha / 2`` (``res["embedding_alpha"]``).
    """
    if 1.0 / (n_permutations + 1) >= alpha / 2:
        raise PipelineError(f"drift.n_permutations={n_permutations} cannot give an MMD p-value below "
                            f"drift.alpha/2={alpha / 2:g} (Bonferroni over the embedding family): "
                            f"use at least {int(np.ceil(2 / alpha))}")
    pooled = np.r_[X_ref, X_new]
    n_comp = int(min(pca_components, len(pooled) - 1, X_ref.shape[1]))
    space = canonical_reducer(n_comp, seed).fit(pooled)
    Z_ref, Z_new = space.transform(X_ref), space.transform(X_new)
    mmd = rbf_mmd_test(Z_ref, Z_new, n_permutations, seed)
    comps = ks_family(Z_ref, Z_new, [f"pc{i + 1}" for i in range(n_comp)])
    ks_min = min((c["p_adjusted"] for c in comps), default=1.0)
    stats = ks_family(stats_ref, stats_new, STAT_NAMES)
    stats_min = min((s["p_adjusted"] for s in stats), default=1.0)
    pos_ref, pos_new = p_ref >= threshold, p_new >= threshold
    table = [[int(pos_new.sum()), int((~pos_new).sum())], [int(pos_ref.sum()), int((~pos_ref).sum())]]
    rate_p = float(fisher_exact(table).pvalue) if len(p_ref) and len(p_new) else 1.0
    emb_alpha = alpha / 2  # Bonferroni over the two tests of the embedding family
    embedding = bool(mmd["p_value"] < emb_alpha or ks_min < emb_alpha)
    image = bool(stats_min < alpha)
    prediction = bool(rate_p < alpha)
    return {
        "n_reference": int(len(X_ref)), "n_batch": int(len(X_new)),
        "drift": int(embedding or image),
        "embedding_drift": int(embedding), "image_stats_drift": int(image),
        "prediction_shift": int(prediction),
        "mmd": {k: v for k, v in mmd.items() if k != "witness_batch"},
        "witness_batch": mmd["witness_batch"], "Z_ref": Z_ref, "Z_new": Z_new,
        "pca_ks": comps, "pca_ks_min_p_adjusted": ks_min,
        "pca_explained_variance": float(space["pca"].explained_variance_ratio_.sum()),
        "image_stats": stats, "image_stats_min_p_adjusted": stats_min,
        "positive_rate": {"reference": float(pos_ref.mean()) if len(pos_ref) else float("nan"),
                          "batch": float(pos_new.mean()) if len(pos_new) else float("nan"),
                          "p_value": rate_p, "threshold": float(threshold)},
        "alpha": alpha, "embedding_alpha": emb_alpha,
    }


def flat_metrics(res: dict, extra: dict | None = None) -> dict:
    """Rounded scalar metrics for DVCLive (``a/b`` keys nest)."""
    r6 = lambda v: round(float(v), 6)  # noqa: E731
    m = {"drift": res["drift"], "embedding_drift": res["embedding_drift"],
         "image_stats_drift": res["image_stats_drift"], "prediction_shift": res["prediction_shift"],
         "n_reference": res["n_reference"], "n_batch": res["n_batch"],
         "embedding/mmd2": r6(res["mmd"]["mmd2"]), "embedding/mmd_p_value": r6(res["mmd"]["p_value"]),
         "embedding/pca_ks_min_p_adjusted": r6(res["pca_ks_min_p_adjusted"]),
         "embedding/pca_ks_max": r6(max((c["ks"] for c in res["pca_ks"]), default=0.0)),
         "positive_rate/reference": r6(res["positive_rate"]["reference"]),
         "positive_rate/batch": r6(res["positive_rate"]["batch"]),
         "positive_rate/p_value": r6(res["positive_rate"]["p_value"])}
    for s in res["image_stats"]:
        m[f"image_stats/{s['name']}/ks"] = r6(s["ks"])
        m[f"image_stats/{s['name']}/p_adjusted"] = r6(s["p_adjusted"])
        m[f"image_stats/{s['name']}/reference_mean"] = r6(s["ref_mean"])
        m[f"image_stats/{s['name']}/batch_mean"] = r6(s["batch_mean"])
    m.update(extra or {})
    return m


# --------------------------------------------------------------------------- HTML
# The QC page's look (shared with the error report), plus the verdict boxes of this page.
CSS = BASE_CSS + """
.bad{background:#fdecea;border-left:4px solid #c62828;padding:8px 12px}
.ok{background:#e8f5e9;border-left:4px solid #2e7d32;padding:8px 12px}
.card{width:110px;border:none;text-align:center}
"""
NUM_CLASS = " class=n"   # this page spells the numeric cell class unquoted (bytes as in dvc.lock)
ID_CHARS = 8             # image id (sha256 of the bytes) prefix in a caption: never a path or name
# The smallest shift the page calls worth detecting: a medium effect, half a standard
# deviation between the means of two normal distributions (Cohen's d = 0.5). Its KS
# distance is 2·Φ(d/2) − 1 = erf(d / (2√2)) ≈ 0.197.
MEDIUM_EFFECT_D = 0.5
MEDIUM_EFFECT_KS = math.erf(MEDIUM_EFFECT_D / (2 * math.sqrt(2)))


def ks_detectable_distance(n: int, m: int, alpha: float) -> float:
    """The KS distance two samples of ``n`` and ``m`` must show to be significant at
    ``alpha`` (two-sided, asymptotic): c(α)·√((n + m)/(n·m)), c(α) = √(−ln(α/2)/2).

    A true shift of exactly this size is detected about half the time; a smaller one
    less often than not. Used by the page only (the verdict's low-power warning)."""
    if n < 1 or m < 1:
        return float("inf")
    return _ks_c(alpha) * math.sqrt((n + m) / (n * m))


def _ks_c(alpha: float) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2)


def power_note(res: dict) -> dict:
    """The image-statistics KS tests' resolution at this sample size: the distance they
    need (``detectable``, at α / number of statistics, their Bonferroni level) and whether
    a medium shift (:data:`MEDIUM_EFFECT_KS`) is below it (``low_power``)."""
    k = max(len(res.get("image_stats") or ()), 1)
    level = res["alpha"] / k
    m = res["n_reference"]
    d = ks_detectable_distance(res["n_batch"], m, level)
    # smallest batch whose detectable distance is the medium shift's, with this pool sample
    room = (MEDIUM_EFFECT_KS / _ks_c(level)) ** 2 - 1 / max(m, 1)
    return {"detectable": d, "level": level, "n_statistics": k, "low_power": d > MEDIUM_EFFECT_KS,
            "min_batch": math.ceil(1 / room) if room > 0 else None}


def _verdict(res: dict, batch_name: str) -> str:
    verdict = res["drift"]
    box = (f'<div class="{"bad" if verdict else "ok"}"><b>{"Drift detected" if verdict else "No drift detected"}</b>'
           f' for {escape(batch_name)} against the training pool (embedding: '
           f'{"drift" if res["embedding_drift"] else "no drift"}; image statistics: '
           f'{"drift" if res["image_stats_drift"] else "no drift"}). Predicted-positive rate '
           f'{res["positive_rate"]["batch"]:.1%} vs {res["positive_rate"]["reference"]:.1%} in the pool'
           f'{" — <b>shifted</b>" if res["prediction_shift"] else " — no significant shift"}.</div>')
    pw = power_note(res)
    if not verdict and pw["low_power"]:
        more = (f"Compare a batch of at least {plural(pw['min_batch'], 'image')} before trusting "
                f"this verdict." if pw["min_batch"] else
                "Compare a larger batch (and pool sample) before trusting this verdict.")
        box += (f'<div class="warn low-power"><b>⚠ Low power: “no drift detected” is not evidence '
                f'of no drift at this sample size.</b> With {plural(res["n_batch"], "batch image")} '
                f'against {plural(res["n_reference"], "pool image")}, the KS tests flag a shift only '
                f'when the two distributions differ by a KS distance of at least '
                f'{pw["detectable"]:.2f}; a medium shift (half a standard deviation, KS distance '
                f'{MEDIUM_EFFECT_KS:.2f}) would more often be missed than found. {more}</div>')
    return box


def _ood_line(res: dict) -> list[str]:
    """One line: how many batch images the served model's per-image out-of-distribution
    check flags (``res["ood"]``, set by the drift stage when the bundle has a reference)."""
    o = res.get("ood")
    if not o:
        return []
    share = o["count"] / o["n"] if o["n"] else 0.0
    return [f"<p class='ood'><b>Out of distribution: {plural(o['count'], 'batch image')} of "
            f"{o['n']} ({share:.1%})</b>, farther from the training images (mean distance to "
            f"the {o['k']} nearest) than {o['quantile']:.0%} of the training images are from "
            f"each other: the model answers them with needs_review.</p>"]


def _signal_rows(res: dict) -> list[list]:
    """signal, statistic, p, significant: the embedding family, image statistics, prediction."""
    emb_alpha = res.get("embedding_alpha", res["alpha"] / 2)
    rows = [[f"MMD² (RBF, PCA space), permutation p (vs α/2 = {emb_alpha:.4g})", res["mmd"]["mmd2"],
             res["mmd"]["p_value"], "yes" if res["mmd"]["p_value"] < emb_alpha else "no"],
            [f"KS per PCA component, min Bonferroni p (vs α/2 = {emb_alpha:.4g})",
             max((c["ks"] for c in res["pca_ks"]), default=0.0),
             res["pca_ks_min_p_adjusted"], "yes" if res["pca_ks_min_p_adjusted"] < emb_alpha else "no"]]
    for s in res["image_stats"]:
        rows.append([f"KS {s['name']} (mean {s['ref_mean']:.3g} → {s['batch_mean']:.3g}), Bonferroni p",
                     s["ks"], s["p_adjusted"], "yes" if s["p_adjusted"] < res["alpha"] else "no"])
    pr = res["positive_rate"]
    rows.append([f"predicted-positive rate {pr['reference']:.3f} → {pr['batch']:.3f} (Fisher exact)",
                 pr["batch"] - pr["reference"], pr["p_value"], "yes" if res["prediction_shift"] else "no"])
    return rows


def _intro(res: dict, qc_failed: int, n_files: int | None) -> list[str]:
    body = [f"<p class='muted'>{res['n_batch']} batch images vs {res['n_reference']} pool images "
            f"(each side subsampled, seeded). Significance α = {res['alpha']} per family "
            f"(Bonferroni inside a family: the embedding family's two tests, MMD and KS, "
            f"are each compared to α/2). PCA ({len(res['pca_ks'])} components, "
            f"{res['pca_explained_variance']:.0%} of the variance) fitted on pool and batch "
            f"together.</p>"]
    if res.get("prevalence_matched"):
        body.append("<p class='muted'>The image and embedding tests use pool images resampled to "
                    "the batch's predicted-positive rate, so a change of prevalence alone is not "
                    "read as a change of the images; the predicted-positive-rate row compares "
                    "with the whole pool.</p>")
    pw = power_note(res)
    body.append(f"<p class='muted'>Resolution at this sample size: the image-statistics KS tests "
                f"(level α/{pw['n_statistics']} = {pw['level']:.2g}) flag a "
                f"shift only when the batch and pool distributions differ by a KS distance of at "
                f"least {pw['detectable']:.2f} (c(α)·√((n+m)/(n·m)) for n batch and m pool images, "
                f"c(α) = √(−ln(α/2)/2)). When that exceeds {MEDIUM_EFFECT_KS:.2f}, the KS distance of "
                f"a medium shift (half a standard deviation between the means), a “no drift” "
                f"verdict comes with a low-power warning.</p>")
    if n_files is not None:
        body.append(f"<p>{plural(n_files, 'file')} in the batch, {qc_failed} failed QC (not compared).</p>")
    return body


def _charts(Z_ref, Z_new, stats_ref, stats_new, p_ref, p_new) -> list[str]:
    """Pool vs batch histograms: first PCA components, image statistics, P(positive)."""
    charts = []
    if Z_ref is not None and Z_new is not None:
        for j in range(min(3, Z_ref.shape[1])):
            lo, hi = np.percentile(np.concatenate([Z_ref[:, j], Z_new[:, j]]), [0.5, 99.5])
            charts.append(density_histograms_svg({"pool": Z_ref[:, j], "batch": Z_new[:, j]}, lo, hi,
                                                 f"PCA component {j + 1}"))
    if stats_ref is not None and stats_new is not None:
        for j, name in enumerate(STAT_NAMES):
            both = np.concatenate([stats_ref[:, j], stats_new[:, j]])
            both = both[np.isfinite(both)]
            if len(both):
                lo, hi = np.percentile(both, [0.5, 99.5])
                charts.append(density_histograms_svg({"pool": stats_ref[:, j], "batch": stats_new[:, j]},
                                                     lo, hi, name))
    if p_ref is not None and p_new is not None:
        charts.append(density_histograms_svg({"pool": p_ref, "batch": p_new}, 0.0, 1.0, "P(positive)"))
    return charts


def _caption(image_id, split: str, score) -> str:
    """A thumbnail's caption: image id prefix, split, witness score; never a path or name."""
    parts = []
    if image_id:
        parts.append(f"<code title='image id (sha256 of the file)'>{escape(str(image_id)[:ID_CHARS])}</code>")
    if split:
        parts.append(escape(split))
    if score is not None and np.isfinite(score):
        parts.append(f"witness {float(score):.3g}")
    return f"<div class='muted'>{'<br>'.join(parts)}</div>" if parts else ""


def _typical(typical_paths, ids, split: str, scores) -> list[str]:
    n = len(typical_paths)
    ids = list(ids) + [None] * (n - len(ids))
    scores = list(scores) + [None] * (n - len(scores))
    cards = []
    for p, i, w in zip(typical_paths, ids, scores):
        alt = f"image {str(i)[:ID_CHARS]}" if i else "batch image"
        thumb = img_html(thumbnail_uri(p), alt=alt, missing="<div>no preview</div>")
        cards.append(f'<div class="card">{thumb}{_caption(i, split, w)}</div>')
    return ["<h2>Batch images most unlike the pool</h2>",
            "<p class='muted'>Largest MMD witness values: where the batch differs most. Caption: "
            f"the first {ID_CHARS} characters of the image id (the sha256 of the file's bytes, as "
            "<code>sha256sum</code> prints it: no file name), its split, and its witness value (mean "
            "kernel similarity to the batch minus that to the pool; higher = more unlike the pool).</p>",
            grid(cards)]


def render_html(res: dict, *, batch_name: str, Z_ref=None, Z_new=None, stats_ref=None,
                stats_new=None, p_ref=None, p_new=None, typical_paths=(), qc_failed: int = 0,
                n_files: int | None = None, typical_ids=(), typical_split: str = "",
                typical_scores=()) -> str:
    """Self-contained drift page (no external resources, no timestamps: deterministic).

    ``typical_ids``/``typical_scores``: the content id and witness value of each of
    ``typical_paths`` (captions); ``typical_split``: the split they come from."""
    body = [page_head("Drift report", CSS) + f"<h1>Drift report: {escape(batch_name)}</h1>",
            _verdict(res, batch_name)]
    body += _ood_line(res)
    body += _intro(res, qc_failed, n_files)
    body += ["<h2>Signals</h2>", table(["signal", "statistic", "p", f"significant (α={res['alpha']})"],
                                       _signal_rows(res), num_class=NUM_CLASS)]
    charts = _charts(Z_ref, Z_new, stats_ref, stats_new, p_ref, p_new)
    if charts:
        body += ["<h2>Distributions (pool grey, batch red)</h2>", grid(charts)]
    if typical_paths:
        body += _typical(typical_paths, typical_ids, typical_split, typical_scores)
    body.append("<p class='muted'>Embeds images: a DVC output, never committed to git.</p>" + PAGE_END)
    return "\n".join(body)
