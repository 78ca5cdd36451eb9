"""Baseline vs every pseudo-labelling strategy on the demo and two shared datasets → docs/results.md.

For each dataset (see benchmarks/semisup_data.py for the splits: 100 labelled 50/50,
1,406 unlabelled, the rest test; random-init ResNet18 embeddings cached under /tmp):

- test ROC-AUC of the labelled-only baseline and of each semi-supervised model, with a
  stratified bootstrap 95 % CI, and the paired test delta with its CI (triage.metrics);
- the leak-free CV delta on the labelled set (triage.crossval: repeated stratified
  K-fold, whole chain refitted per fold) with its Nadeau-Bengio 95 % CI;
- pseudo-labels accepted and their precision per class against the pool's hidden truth;
- for the baseline and the default strategy, the share of test images set aside (predicted
  negative) at the threshold that reaches ``evaluate.target_sensitivity`` on out-of-fold
  scores of the labelled set (train's way: ``triage.models.out_of_fold_proba``, the
  semi-supervised model's pool pseudo-labelled again per fold; ``triage.metrics.triage_at_targets``).

The splits are near-duplicate-safe (semisup_data.py: pHash groups within
``qc.near_dup_hamming`` land wholly in one split) and every fold is group-aware: the rows'
``group`` column goes to ``crossval_semisup``, ``run_strategy(lab_groups=)`` and
``out_of_fold_proba(groups=)``. A "What changed" section compares the default strategy on
the old per-image split (``--no-group-split`` reproduces that whole table).

Every setting comes from params.yaml (only ``pseudo.strategy`` varies), so the table
describes what `dvc repro` does. The default strategy was chosen on the CV delta and the
pseudo-label precision, never on the test columns.

    python benchmarks/semisup_table.py                # all datasets → docs/results.md
    python benchmarks/semisup_table.py --datasets demo --out /tmp/r.md
    python benchmarks/semisup_table.py --no-group-split --out /tmp/old.md   # the old split
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_machine import cpu
from semisup_data import CACHE, DATASETS, embed_layers, leaked_test

from triage.checkout import require_own_checkout
from triage.crossval import crossval_semisup, fold_pseudo_labels, pool_outside
from triage.metrics import evaluate_scores, paired_delta, triage_at_targets, triage_key
from triage.models import fit_semi_supervised, fit_weighted, make_classifier, out_of_fold_proba, positive_proba
from triage.params import load_params
from triage.pseudo import STRATEGIES, pseudo_label_quality

ROOT = Path(__file__).resolve().parents[1]

POS = "cancer"


class Data:
    """One dataset's rows and vectors cut into the pieces every model reads."""

    def __init__(self, rows: pd.DataFrame, X: np.ndarray):
        self.rows, self.X = rows, X
        self.lab = (rows["split"] == "labeled").to_numpy()
        self.pool = (rows["split"] == "unlabeled").to_numpy()
        self.test = (rows["split"] == "test").to_numpy()
        self.X_lab, self.y_lab = X[self.lab], rows.loc[self.lab, "label"].to_numpy(dtype=object)
        self.ids_pool, self.X_pool = rows.loc[self.pool, "id"].to_numpy(dtype=object), X[self.pool]
        self.truth = rows.loc[self.pool, ["id", "truth"]].rename(columns={"truth": "label"})
        self.y_test = (rows.loc[self.test, "truth"] == POS).to_numpy(int)
        groups = rows["group"].to_numpy(dtype=object)  # split groups (triage.splits)
        self.g_lab, self.g_pool = groups[self.lab], groups[self.pool]


def pseudo_labels(d: Data, params: dict, strategy: str):
    """The strategy's pseudo-labels of the pool from every labelled image, made as the
    stage makes them (``triage.crossval.fold_pseudo_labels``: clusterer when needed,
    ``run_strategy`` with the labelled split groups, sample weights)."""
    params_s = {**params, "pseudo": {**params["pseudo"], "strategy": strategy}}
    return params_s, fold_pseudo_labels(params_s, POS, d.X_lab, d.y_lab, d.ids_pool, d.X_pool,
                                        d.g_lab)


def set_aside(d: Data, params: dict, pipe, p_test: np.ndarray, params_s: dict | None = None) -> dict:
    """Triage KPI at ``evaluate.target_sensitivity``: the threshold reaches it on
    out-of-fold scores of the labelled set (group-aware folds; with ``params_s`` the
    semi-supervised model, its pool pseudo-labelled again from each fold's training
    labels, as stages/train.py does), then sensitivity / set aside / missed on test."""
    t, target = params["train"], params["evaluate"]["target_sensitivity"]
    pseudo_for_fold = None
    if params_s is not None:
        def pseudo_for_fold(tr):
            held_out = np.setdiff1d(np.arange(len(d.y_lab)), tr)
            keep = pool_outside(d.g_pool, d.g_lab[held_out])
            fold = fold_pseudo_labels(params_s, POS, d.X_lab[tr], d.y_lab[tr], d.ids_pool[keep],
                                      d.X_pool[keep], d.g_lab[tr])
            return fold.X, fold.y, fold.weights
    oof = out_of_fold_proba(pipe, d.X_lab, d.y_lab, POS, t["cv_folds"], t["seed"],
                            pseudo_for_fold, groups=d.g_lab)
    kpi = triage_at_targets((d.y_lab == POS).astype(int), oof, d.y_test, p_test, [target],
                            params["evaluate"]["ci_level"])
    return kpi[triage_key(target)]


def run_dataset(name: str, params: dict, strategies, n_boot: int,
                group_split: bool = True) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    rows, X, info = DATASETS[name](group_split=group_split,
                                   hamming=params["qc"]["near_dup_hamming"])
    load_s = time.perf_counter() - t0
    d = Data(rows, X)
    t, p0 = params["train"], params["pseudo"]
    pipe = make_classifier(t["model"], t["C"], t["class_weight"], t["seed"], t["calibration"])
    kw = dict(n_bootstrap=n_boot, level=0.95, seed=params["evaluate"]["seed"])
    base = fit_weighted(pipe, d.X_lab, d.y_lab)
    p_base = positive_proba(base, X[d.test], POS)
    m_base = evaluate_scores(d.y_test, p_base, 0.5, **kw)
    meta = {**info, "load_s": load_s, "n_labeled": int(d.lab.sum()), "n_pool": int(d.pool.sum()),
            "lab_groups": int(rows.loc[d.lab, "near_group"].nunique()),
            "n_test": int(d.test.sum()), "pool_prevalence": float((d.truth["label"] == POS).mean()),
            "test_prevalence": float(d.y_test.mean())}
    out = [{"dataset": name, "method": "baseline (labelled only)", "test_auc": m_base["roc_auc"],
            "test_lo": m_base["roc_auc_ci_low"], "test_hi": m_base["roc_auc_ci_high"],
            "kpi": set_aside(d, params, pipe, p_base)}]
    for strategy in strategies:
        t1 = time.perf_counter()
        params_s, fold = pseudo_labels(d, params, strategy)
        ps = fold.rows
        semi = fit_semi_supervised(pipe, d.X_lab, d.y_lab, fold.X, fold.y, fold.weights)
        p_semi = positive_proba(semi, X[d.test], POS)
        m = evaluate_scores(d.y_test, p_semi, 0.5, **kw)
        dl = paired_delta(d.y_test, p_base, p_semi, 0.5, 0.5, **kw)
        q = pseudo_label_quality(ps, d.truth, ["cancer", "normal"])
        c = params["crossval"]
        # rows carry "group": crossval_semisup's folds keep each split group on one side
        _, cv = crossval_semisup(rows, X, params_s, POS, c["folds"], c["repeats"], c["seed"], 0.95)
        default = strategy == p0["strategy"]
        out.append({
            "dataset": name, "method": strategy + (" (default)" if default else ""),
            "test_auc": m["roc_auc"], "test_lo": m["roc_auc_ci_low"], "test_hi": m["roc_auc_ci_high"],
            "test_delta": dl["roc_auc"], "test_delta_lo": dl["roc_auc_ci_low"],
            "test_delta_hi": dl["roc_auc_ci_high"],
            "cv_base": cv["baseline"]["mean"], "cv_delta": cv["delta"]["mean"],
            "cv_lo": cv["delta"]["ci_low"], "cv_hi": cv["delta"]["ci_high"],
            "cv_p": cv["delta"]["p_value"],
            "n_accepted": len(ps), "n_pos": int((ps["label"] == POS).sum()),
            "prec_pos": q.get("precision/cancer", float("nan")),
            "prec_neg": q.get("precision/normal", float("nan")),
            "accuracy": q.get("accuracy", float("nan")),
            "kpi": set_aside(d, params, pipe, p_semi, params_s) if default else None,
            "seconds": time.perf_counter() - t1})
        print(f"{name:18s} {strategy:16s} test {m['roc_auc']:.3f} (base {m_base['roc_auc']:.3f}) "
              f"cv delta {cv['delta']['mean']:+.3f} [{cv['delta']['ci_low']:+.3f}, "
              f"{cv['delta']['ci_high']:+.3f}] n={len(ps)} acc={q.get('accuracy', float('nan')):.3f}",
              flush=True)
    return out, meta


def old_split_default(name: str, params: dict, n_boot: int) -> dict:
    """Baseline and default strategy on the old per-image split (every image its own
    group, as before): test ROC-AUC on all its test images, and on those without a
    near-copy among its labelled/pool images (what the leakage was worth)."""
    rows, X, _ = DATASETS[name](group_split=False, hamming=params["qc"]["near_dup_hamming"])
    d = Data(rows, X)
    t = params["train"]
    pipe = make_classifier(t["model"], t["C"], t["class_weight"], t["seed"], t["calibration"])
    kw = dict(n_bootstrap=n_boot, level=0.95, seed=params["evaluate"]["seed"])
    p_base = positive_proba(fit_weighted(pipe, d.X_lab, d.y_lab), X[d.test], POS)
    fold = pseudo_labels(d, params, params["pseudo"]["strategy"])[1]
    semi = fit_semi_supervised(pipe, d.X_lab, d.y_lab, fold.X, fold.y, fold.weights)
    p_semi = positive_proba(semi, X[d.test], POS)
    clean = ~leaked_test(rows["split"], rows["near_group"])[d.test]
    res = {"n_test": int(d.test.sum()), "n_clean": int(clean.sum()),
           "lab_groups": int(rows.loc[d.lab, "near_group"].nunique())}
    for key, sel in (("all", slice(None)), ("clean", clean)):
        y = d.y_test[sel]
        res[f"base_{key}"] = evaluate_scores(y, p_base[sel], 0.5, **kw)["roc_auc"]
        res[f"semi_{key}"] = evaluate_scores(y, p_semi[sel], 0.5, **kw)["roc_auc"]
        res[f"delta_{key}"] = paired_delta(y, p_base[sel], p_semi[sel], 0.5, 0.5, **kw)
    return res


def f3(x):
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def sgn(x):
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:+.3f}"


def verdict(r: dict) -> str:
    if "cv_lo" not in r:
        return ""
    test_sig = r["test_delta_lo"] > 0
    cv_sig = r["cv_lo"] > 0
    if r["test_delta_hi"] < 0 or r["cv_hi"] < 0:
        return "**worse**"
    if test_sig and cv_sig:
        return "gain (test and CV)"
    if test_sig:
        return "gain on test; CV n.s."
    if cv_sig:
        return "gain in CV; test n.s."
    return "no significant difference"


def pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f} %"


def kpi_cell(k: dict | None) -> str:
    """Set-aside share [Wilson CI] and the sensitivity it got on test."""
    if not k:
        return "—"
    return (f"{pct(k['set_aside'])} [{100 * k['set_aside_ci_low']:.1f}, "
            f"{100 * k['set_aside_ci_high']:.1f}] (sens. {f3(k['sensitivity'])}, "
            f"missed {k['missed']})")


def what_changed(metas: dict, old: dict, results: list[dict], params: dict) -> list[str]:
    h = params["qc"]["near_dup_hamming"]
    lines = [
        "## What changed: near-duplicate-safe splits",
        "",
        "The splits used to be drawn image by image after the sha256 de-duplication, so a "
        "test image could have a *near*-copy (re-encoded, re-contrasted, resized) among the "
        "labelled or pool images: the model was partly scored on its training data. Now, as "
        "in the pipeline's QC, every de-duplicated image gets its 64-bit pHash "
        f"(`triage.images.phash64`), images within `qc.near_dup_hamming` = {h} bits are joined "
        "transitively (`triage.qc.near_duplicate_groups`, `triage.qc.split_groups`) and the "
        "labelled / pool / test split is drawn by group (same seed and quotas; a group lands "
        "wholly in one split; for pneumoniamnist a train/val image with a near-copy in the "
        "official test split is dropped). Every fold is group-aware as well: CV folds "
        "(`crossval_semisup` reads the rows' `group`), the labellers' calibration folds "
        "(`run_strategy(lab_groups=)`) and the out-of-fold thresholds "
        "(`out_of_fold_proba(groups=)`). The demo keeps the pipeline's own split, whose QC "
        "already does this.",
        "",
        "Old and new splits differ where groups are (an image without near-copies keeps its "
        "place in the same seeded shuffle), so old → new mixes two effects: the leakage, "
        "and the labelled set itself, which now takes near-duplicate groups whole: 100 "
        "labels of fewer distinct images (column *distinct labelled groups*), which can move "
        "the labelled-only baseline on its own. The column *old split, leaked test images "
        "left out* scores the old models on the old test images that had no training-side "
        "near-copy, which isolates what the leakage was worth.",
        "",
        "| dataset | near-dup groups (images) | label-conflict groups | old split: test images "
        "with a training-side near-copy (in labelled) | distinct labelled groups old → new | "
        "baseline test AUC old → new | "
        f"{params['pseudo']['strategy']} (default) test AUC old → new | default Δ old → new | "
        "old split, leaked test images left out: baseline / default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, meta in metas.items():
        o = old.get(name)
        r = {x["method"]: x for x in results if x["dataset"] == name}
        base = r["baseline (labelled only)"]
        semi = next((x for k, x in r.items() if k.endswith("(default)")), None)
        leak = (f"{meta['old_test_leaked']} of {o['n_test'] if o else meta['n_test']} "
                f"({meta['old_test_leaked_lab']})")
        if o is None or semi is None:
            lines.append(f"| {name} | {meta['near_dup_groups']} ({meta['near_dup_images']}) | "
                         f"{meta['label_conflict_groups']} | {leak} | — | — | — | — | — |")
            continue
        clean = (f"{f3(o['base_clean'])} / {f3(o['semi_clean'])} (n={o['n_clean']})"
                 if o["n_clean"] < o["n_test"] else "= all (nothing leaked)")
        lines.append(
            f"| {name} | {meta['near_dup_groups']} ({meta['near_dup_images']}) | "
            f"{meta['label_conflict_groups']} | {leak} | {o['lab_groups']} → {meta['lab_groups']} | "
            f"{f3(o['base_all'])} → "
            f"{f3(base['test_auc'])} | {f3(o['semi_all'])} → {f3(semi['test_auc'])} | "
            f"{sgn(o['delta_all']['roc_auc'])} → {sgn(semi['test_delta'])} | {clean} |")
    drops = {n: m["dropped_near_test"] for n, m in metas.items() if m.get("dropped_near_test")}
    if drops:
        lines += ["", "Dropped because a near-copy is in the official test split: " + ", ".join(
            f"{n} {k} image{'s' if k > 1 else ''}" for n, k in drops.items()) + "."]
    return lines + [""]


def matches_evaluate(results: list[dict], params: dict,
                     path: Path = ROOT / "metrics" / "evaluate" / "metrics.json") -> str:
    """Whether the demo's set-aside figures are the pipeline's own (evaluate's triage KPI
    for baseline / semi_supervised), as a sentence; "" when there is nothing to compare."""
    key = triage_key(params["evaluate"]["target_sensitivity"])
    demo = {r["method"]: r.get("kpi") for r in results if r["dataset"] == "demo"}
    pairs = {"baseline": demo.get("baseline (labelled only)"),
             "semi_supervised": next((v for k, v in demo.items() if k.endswith("(default)")), None)}
    if not path.is_file() or not all(pairs.values()):
        return ""
    m = json.loads(path.read_text())
    try:
        same = all(abs(m[name]["triage"][key][f] - k[f]) < 5e-6
                   for name, k in pairs.items() for f in ("set_aside", "sensitivity", "missed"))
    except (KeyError, TypeError):
        return ""
    return (f" On the demo these figures {'equal' if same else '**differ from**'} "
            f"`metrics/evaluate/metrics.json` (`baseline|semi_supervised.triage.{key}.*`, what "
            f"`dvc repro` computes{'' if same else '; stale metrics or a different chain'}).")


def plain_summary(results: list[dict], metas: dict, params: dict) -> str:
    """Generated "reading it plainly": per dataset the default strategy against the
    baseline on test and in CV, the strategies significantly better or worse, the
    set-aside share at the target sensitivity."""
    target = params["evaluate"]["target_sensitivity"]
    lines = []
    for name in metas:
        r = [x for x in results if x["dataset"] == name]
        base = r[0]
        semi = next((x for x in r if x["method"].endswith("(default)")), None)
        strat = [x for x in r[1:] if "cv_lo" in x]
        gains = [x["method"].replace(" (default)", "") for x in strat if x["test_delta_lo"] > 0]
        worse = [x["method"].replace(" (default)", "") for x in strat
                 if x["test_delta_hi"] < 0 or x["cv_hi"] < 0]
        cv_sig = [x["method"].replace(" (default)", "") for x in strat
                  if x["cv_lo"] > 0 or x["cv_hi"] < 0]
        txt = f"- **{name}**: "
        if semi is not None:
            txt += (f"the default `{params['pseudo']['strategy']}` goes from "
                    f"{f3(base['test_auc'])} to {f3(semi['test_auc'])} test ROC-AUC (paired Δ "
                    f"{sgn(semi['test_delta'])} [{sgn(semi['test_delta_lo'])}, "
                    f"{sgn(semi['test_delta_hi'])}]: {verdict(semi).strip('*')}); CV Δ "
                    f"{sgn(semi['cv_delta'])} [{sgn(semi['cv_lo'])}, {sgn(semi['cv_hi'])}]. ")
        txt += ("Significant test gain: " + (", ".join(f"`{g}`" for g in gains) or "none")
                + "; significantly worse (test or CV): "
                + (", ".join(f"`{w}`" for w in worse) or "none")
                + "; CV Δ significant for: " + (", ".join(f"`{c}`" for c in cv_sig) or "none")
                + ".")
        if semi is not None and base.get("kpi") and semi.get("kpi"):
            b, k = base["kpi"], semi["kpi"]
            txt += (f" At the out-of-fold threshold for sensitivity {target:.2f}, the baseline "
                    f"sets aside {pct(b['set_aside'])} of the test images (test sensitivity "
                    f"{f3(b['sensitivity'])}), the default {pct(k['set_aside'])} "
                    f"({f3(k['sensitivity'])}).")
        lines.append(txt)
    return "\n".join(lines)


def render(results: list[dict], metas: dict, params: dict, wall: float, old: dict,
           group_split: bool = True, n_boot: int = 1000) -> str:
    p, t, c = params["pseudo"], params["train"], params["crossval"]
    target = params["evaluate"]["target_sensitivity"]
    model, avx512 = cpu()
    embed_s = sum(m.get("embed_s", 0.0) for m in metas.values())
    lines = [
        "# Semi-supervised results: baseline vs each pseudo-labelling strategy",
        "",
        f"Run: {wall / 60:.1f} min wall time on {model} ({'AVX-512' if avx512 else 'no AVX-512'}, "
        f"{os.cpu_count()} cores shared with other jobs, so timings are indicative; "
        f"{platform.machine()}, Python {platform.python_version()}); "
        + (f"{embed_s / 60:.1f} min of it embedding the shared datasets (cache was empty). "
           if embed_s else "embeddings cached. ")
        + ("Splits near-duplicate-safe (pHash groups, see *What changed*)." if group_split else
           "**`--no-group-split`: the old per-image split and per-image folds.**"),
        "",
        "Generated by `python benchmarks/semisup_table.py` (do not edit by hand). Features are "
        "**random-init ResNet18** embeddings (`embed.weights: random`, seed 42, "
        f"`embed.layers: {embed_layers()}`: layer1 + layer2 avg+max pooled, 384-d, for random "
        "weights; docs/pipeline.md), as in the demo "
        "pipeline (no pretrained weights); what matters here is the *difference* that the "
        "unlabelled pool makes. All settings are the repository's `params.yaml` "
        f"(`train.model={t['model']}`, `train.C={t['C']}`, `train.pseudo_weight_scale="
        f"{t['pseudo_weight_scale']}`, `pseudo.round_weight={p['round_weight']}`, "
        f"`pseudo.max_fraction={p['max_fraction']}`, "
        f"`pseudo.rounds={p['rounds']}`, `pseudo.pca_components={p['pca_components']}`, "
        f"`pseudo.C={p['C']}`, `pseudo.class_prior={p['class_prior']}` (estimated), "
        f"`qc.near_dup_hamming={params['qc']['near_dup_hamming']}`, "
        f"`train.cv_folds={t['cv_folds']}`, `evaluate.target_sensitivity={target}`); only "
        "`pseudo.strategy` varies.",
        "",
        "Columns:",
        "- **test AUC [95 % CI]**: held-out test ROC-AUC, stratified bootstrap CI "
        f"(`triage.metrics`, {n_boot:,} resamples).",
        "- **test Δ [CI]**: paired bootstrap difference semi-supervised − baseline on the same test images.",
        f"- **CV Δ [CI]**: leak-free repeated stratified K-fold on the 100 labelled images "
        f"({c['folds']} folds × {c['repeats']} repeats, group-aware: a near-duplicate group "
        "stays on one side, and pool near-copies of held-out images are left out; in each fold "
        "the held-out labels *and images* are removed, and the clusterer, pseudo-labeller and "
        "both classifiers are refitted); mean per-fold ΔROC-AUC with the Nadeau-Bengio "
        "corrected 95 % t-interval. Each held-out fold has only ~20 images, so this interval "
        "is wide.",
        "- **accepted (cancer)**: pseudo-labels accepted on the 1,406-image pool (how many say cancer).",
        "- **precision cancer / normal**: share of accepted pseudo-labels of that class that are "
        "right (the pool's truth is hidden from every method and used only here).",
        f"- **set aside at {target:.2f} [CI] (test sensitivity, missed)**: the triage KPI "
        f"(`<model>.triage.{triage_key(target)}.*` of evaluate) for the baseline and the "
        f"default strategy: threshold reaching sensitivity {target:.2f} on out-of-fold scores "
        f"of the labelled set ({t['cv_folds']} group-aware folds; the semi-supervised model's "
        "pool pseudo-labelled again from each fold's training labels, as `train` does), then on "
        "test the share of images predicted negative (Wilson CI), the sensitivity reached and "
        "the positives among the set-aside images. With 50 labelled positives the threshold "
        "is the 3rd-lowest out-of-fold positive score, so the test sensitivity can miss the "
        "target." + matches_evaluate(results, params),
        "",
        "**How the default was chosen.** On the demo, by the CV Δ and the pseudo-label precision "
        "(the test columns were not used): `self_training` with the per-class quotas had the "
        "best CV Δ of the strategies (PCA 32 inside the labeller beat 16/64/128; "
        "max_fraction 0.5 beat 0.3/0.8; C 0.03 ≈ 0.01 > 0.1), and the highest pool precision "
        "of the quota strategies; `consensus` is more precise but accepts half as many and "
        "gained less in CV.",
        "",
    ]
    if group_split:
        lines += what_changed(metas, old, results, params)
    for name, meta in metas.items():
        dup = (f"{meta['near_dup_groups']} near-duplicate groups ({meta['near_dup_images']} "
               f"images, pHash ≤ {meta['hamming']} bits) kept within one split"
               if group_split else "split image by image (old)")
        lines += [f"## {name}", "",
                  f"{meta['n_labeled']} labelled (50/50), {meta['n_pool']} unlabelled "
                  f"(true cancer share {meta['pool_prevalence']:.2f}, hidden), "
                  f"{meta['n_test']} test (cancer share {meta['test_prevalence']:.2f}); "
                  f"{meta['files']} files, {meta['unique']} unique after sha256 de-duplication; "
                  f"{dup}. " + DESCRIPTIONS.get(name, ""), "",
                  "| method | test AUC [95 % CI] | test Δ [CI] | CV Δ [CI] (CV baseline) | "
                  "accepted (cancer) | precision cancer / normal | "
                  f"set aside at {target:.2f} [CI] (test sens., missed) | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in results if r["dataset"] == name):
            if "cv_delta" not in r:
                lines.append(f"| {r['method']} | {f3(r['test_auc'])} [{f3(r['test_lo'])}, "
                             f"{f3(r['test_hi'])}] | — | — | — | — | {kpi_cell(r.get('kpi'))} | |")
                continue
            lines.append(
                f"| {r['method']} | {f3(r['test_auc'])} [{f3(r['test_lo'])}, {f3(r['test_hi'])}] | "
                f"{sgn(r['test_delta'])} [{sgn(r['test_delta_lo'])}, {sgn(r['test_delta_hi'])}] | "
                f"{sgn(r['cv_delta'])} [{sgn(r['cv_lo'])}, {sgn(r['cv_hi'])}] ({f3(r['cv_base'])}) | "
                f"{r['n_accepted']} ({r['n_pos']}) | {f3(r['prec_pos'])} / {f3(r['prec_neg'])} | "
                f"{kpi_cell(r.get('kpi'))} | {verdict(r)} |")
        lines.append("")
    load = ", ".join(f"{n} {m['load_s']:.0f} s" for n, m in metas.items())
    lines += [
        "## Reading it plainly",
        "",
        SUMMARY_PLACEHOLDER,
        "",
        "## Reproduce",
        "",
        "```bash",
        "dvc repro embed                       # the demo embeddings (data/features/embeddings.parquet)",
        "python benchmarks/semisup_table.py    # embeds + pHashes the shared datasets once (/tmp cache), writes it",
        "python benchmarks/semisup_table.py --no-group-split --out /tmp/old.md   # the old per-image split",
        "```",
        "",
        f"Loading each dataset (embedding and pHash when not cached, split): {load}.",
        "",
    ]
    return "\n".join(lines)


DESCRIPTIONS = {
    "demo": "Synthetic mammography-like demo (`dvc repro` default data); the pipeline's own "
            "split and QC's split groups (`triage.splits.groups_for`).",
    "brain_mri_4class": "Binary: notumor = normal, glioma/meningioma/pituitary = cancer "
                        "(tumour); the given Training/Testing split leaks (189 byte-identical "
                        "groups cross it), so it is ignored and the de-duplicated images are "
                        "re-split with seed 0. 128 px.",
    "pneumoniamnist": "Pneumonia = positive (\"cancer\" column), normal = normal; 28×28 "
                      "upsampled to 64 px by the embedder; labelled and pool drawn from "
                      "train+val (de-duplicated), test = the official test split.",
}
SUMMARY_PLACEHOLDER = "<!-- summary -->"
# benchmarks/finetune_table.py writes its section between these markers of the same file;
# rewriting the file keeps that section as it was
FINETUNE_START, FINETUNE_END = "<!-- finetune_table:start -->", "<!-- finetune_table:end -->"


def kept_sections(path: Path) -> str:
    text = path.read_text() if path.is_file() else ""
    if FINETUNE_START not in text or FINETUNE_END not in text:
        return ""
    block = text[text.index(FINETUNE_START):text.index(FINETUNE_END) + len(FINETUNE_END)]
    return ("\n_The section below is written by `benchmarks/finetune_table.py` and kept as it "
            "was by this script (not re-run here): its numbers, and the split it states, are "
            "from that script's last run._\n\n" + block + "\n")


def main() -> None:
    require_own_checkout(__file__)
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--summary", default=None, help="markdown file whose text replaces the "
                                                    "generated summary")
    ap.add_argument("--no-group-split", dest="group_split", action="store_false",
                    help="the old per-image split and per-image folds (reproduces the old table)")
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    t0 = time.perf_counter()
    results, metas, old = [], {}, {}
    for name in args.datasets:
        r, meta = run_dataset(name, params, args.strategies, args.n_bootstrap, args.group_split)
        results += r
        metas[name] = meta
        if args.group_split:
            old[name] = old_split_default(name, params, args.n_bootstrap)
            print(f"{name:18s} old split: {json.dumps({k: v for k, v in old[name].items() if 'delta' not in k})}",
                  flush=True)
    text = render(results, metas, params, time.perf_counter() - t0, old, args.group_split,
                  args.n_bootstrap)
    summary = (Path(args.summary).read_text().strip() if args.summary
               else plain_summary(results, metas, params))
    text = text.replace(SUMMARY_PLACEHOLDER, summary)
    out = Path(args.out)
    text += kept_sections(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    CACHE.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(results).to_csv(CACHE / ("results.csv" if args.group_split else "results_old.csv"),
                                 index=False)
    (CACHE / "results_meta.json").write_text(json.dumps({"metas": metas, "old": old}, default=str,
                                                        indent=1))
    print(f"wrote {args.out} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
