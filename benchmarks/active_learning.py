"""Active learning vs random labelling, simulated on data whose truth is known.

    python benchmarks/active_learning.py [--datasets demo brain] [--seeds 5] [--rounds 8]

Protocol per dataset and seed: start from ``--start`` labelled images (stratified, seeded)
out of a pool; each round fit the labelled-only classifier (the pipeline's logistic
regression on ResNet18 embeddings, train.* defaults), score the held-out test ROC-AUC,
then "ask the radiologist" for ``--batch`` more labels chosen by each strategy:

* ``random``: uniform from the unlabelled pool;
* ``margin``: most uncertain (select.diversity: none);
* ``margin+kcenter``: the `select` stage default (uncertainty-weighted k-center greedy).

Data (embedded once, cached under /tmp/triage_al_cache, never in the repo):

* ``demo``: the synthetic demo at the default params (generated under /tmp), random-init
  ResNet18 at 128 px as in the default pipeline; pool = labelled + unlabelled images with
  their hidden truth, test = the demo's held-out test split;
* ``brain``: ../shared/datasets/brain_mri_4class, binary notumor vs tumour, deduplicated by
  sha256, a seeded subset re-split into pool/test (the given split leaks), embedded at
  128 px with random-init weights (this machine is offline: no ImageNet weights).

Writes docs/active_learning.md (table) and DVCLive plots under metrics/active_learning/.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd

from triage.checkout import require_own_checkout
from triage.embed import Embedder
from triage.models import make_classifier
from triage.params import load_params
from triage.select import select_batch

ROOT = Path(__file__).resolve().parents[1]

CACHE = Path("/tmp/triage_al_cache")
BRAIN = ROOT.parent / "shared" / "datasets" / "brain_mri_4class"
STRATEGIES = ("random", "margin", "margin+kcenter")


def embed_paths(paths, image_size: int, key: str) -> np.ndarray:
    CACHE.mkdir(parents=True, exist_ok=True)
    layers = load_params(ROOT / "params.yaml")["embed"]["layers"]  # the pipeline's features
    digest = hashlib.sha256(("\n".join(map(str, paths)) + f"|{image_size}|{layers}").encode()
                            ).hexdigest()[:12]
    cached = CACHE / f"{key}_{digest}.npy"
    if cached.is_file():
        return np.load(cached)
    emb = Embedder("random", seed=42, image_size=image_size, batch_size=64, num_workers=2,
                   device="auto", layers=layers).fit()
    X = emb.transform([str(p) for p in paths])
    np.save(cached, X)
    return X


def load_demo() -> dict:
    from triage.demo import generate_demo

    out = CACHE / "demo_raw"
    truth_csv = CACHE / "demo_pool_truth.csv"
    if not truth_csv.is_file():
        # the default demo (params.yaml data.demo): 100 + 1406 pool images, 300 test
        generate_demo(out, seed=0, workers=2).to_csv(truth_csv, index=False)
    truth = dict(pd.read_csv(truth_csv).itertuples(index=False))  # unlabeled/<name> -> label
    pool = sorted((out / "labeled").rglob("*.png")) + sorted((out / "unlabeled").glob("*.png"))
    y_pool = np.array([truth[p.relative_to(out).as_posix()] if p.parent.name == "unlabeled"
                       else p.parent.name for p in pool])
    test = sorted((out / "test").rglob("*.png"))
    y_test = np.array([p.parent.name for p in test])
    return {"X_pool": embed_paths(pool, 128, "demo_pool"), "y_pool": y_pool,
            "X_test": embed_paths(test, 128, "demo_test"), "y_test": y_test, "positive": "cancer",
            "desc": f"synthetic demo, pool {len(pool)}, test {len(test)}, ResNet18 random init, 128 px"}


def load_brain(n_pool: int, n_test: int, seed: int = 0) -> dict:
    files = sorted(BRAIN.glob("*/*/*.jpg"))
    if not files:
        raise SystemExit(f"brain_mri_4class not found under {BRAIN}")
    seen, uniq = set(), []
    for f in files:
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        if h not in seen:
            seen.add(h)
            uniq.append(f)
    y = np.array(["notumor" if f.parent.name == "notumor" else "tumour" for f in uniq])
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(len(uniq), size=n_pool + n_test, replace=False))
    order = rng.permutation(take)
    pool_idx, test_idx = np.sort(order[:n_pool]), np.sort(order[n_pool:])
    pool = [uniq[i] for i in pool_idx]
    test = [uniq[i] for i in test_idx]
    return {"X_pool": embed_paths(pool, 128, "brain_pool"), "y_pool": y[pool_idx],
            "X_test": embed_paths(test, 128, "brain_test"), "y_test": y[test_idx],
            "positive": "tumour", "n_unique": len(uniq),
            "desc": (f"brain_mri_4class, {len(files)} files → {len(uniq)} unique (sha256); seeded "
                     f"subset pool {n_pool}, test {n_test}; tumour vs notumor; ResNet18 random init, 128 px")}


def auc(model, X, y, positive) -> float:
    from sklearn.metrics import roc_auc_score

    p = model.predict_proba(X)[:, list(model.classes_).index(positive)]
    return float(roc_auc_score((y == positive).astype(int), p))


def simulate(data: dict, strategy: str, seed: int, start: int, batch: int, rounds: int) -> list:
    X, y, pos = data["X_pool"], data["y_pool"], data["positive"]
    rng = np.random.default_rng(seed)
    labelled = []
    for cls in np.unique(y):  # stratified start, at least 2 per class
        idx = np.flatnonzero(y == cls)
        k = max(2, round(start * len(idx) / len(y)))
        labelled += list(rng.choice(idx, size=k, replace=False))
    labelled = list(labelled[:max(start, 4)])
    curve = []
    for r in range(rounds + 1):
        model = make_classifier("logreg", 0.1, "balanced", 42).fit(X[labelled], y[labelled])
        curve.append((len(labelled), auc(model, data["X_test"], data["y_test"], pos)))
        if r == rounds:
            break
        unl = np.setdiff1d(np.arange(len(X)), labelled)
        if strategy == "random":
            new = rng.choice(unl, size=batch, replace=False)
        else:
            p = model.predict_proba(X[unl])[:, list(model.classes_).index(pos)]
            sel = select_batch(X[unl], p, X[labelled], batch_size=batch,
                               diversity="kcenter" if strategy == "margin+kcenter" else "none",
                               candidates=300, pca_components=32)
            new = unl[sel["index"].to_numpy()]
        labelled += [int(i) for i in new]
    return curve


def run(data: dict, seeds: int, start: int, batch: int, rounds: int) -> pd.DataFrame:
    rows = []
    for strategy in STRATEGIES:
        for seed in range(seeds):
            for n, a in simulate(data, strategy, seed, start, batch, rounds):
                rows.append({"strategy": strategy, "seed": seed, "n_labels": n, "roc_auc": a})
    return pd.DataFrame(rows)


def table_md(df: pd.DataFrame) -> str:
    g = df.groupby(["n_labels", "strategy"])["roc_auc"].agg(["mean", "std"]).reset_index()
    lines = ["| labels | " + " | ".join(STRATEGIES) + " |", "|---:|" + "---:|" * len(STRATEGIES)]
    for n, part in g.groupby("n_labels"):
        cells = []
        for s in STRATEGIES:
            r = part[part["strategy"] == s]
            cells.append(f"{r['mean'].iloc[0]:.3f} ± {r['std'].iloc[0]:.3f}" if len(r) else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(df: pd.DataFrame) -> str:
    """Final ROC-AUC per strategy, and the labels each active strategy needed to reach the
    ROC-AUC random selection has at the end (mean curves)."""
    mean = df.groupby(["n_labels", "strategy"])["roc_auc"].mean().unstack()
    goal = float(mean["random"].iloc[-1])
    parts = []
    for s in STRATEGIES[1:]:
        hit = mean.index[mean[s] >= goal - 1e-9]
        reach = (f"reaches it with {int(hit[0])} labels" if len(hit)
                 else "does not reach it within the budget")
        parts.append(f"`{s}` ends at {mean[s].iloc[-1]:.3f} and {reach}")
    return (f"Random selection ends at {goal:.3f} with {int(mean.index[-1])} labels; "
            + "; ".join(parts) + ".")


def main() -> None:
    require_own_checkout(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["demo", "brain"], choices=["demo", "brain"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--start", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--brain-pool", type=int, default=1200)
    ap.add_argument("--brain-test", type=int, default=400)
    ap.add_argument("--doc", default=str(ROOT / "docs/active_learning.md"))
    args = ap.parse_args()
    from dvclive import Live

    sections, t0 = [], time.perf_counter()
    with Live(str(ROOT / "metrics/active_learning"), dvcyaml=False, save_dvc_exp=False,
              report=None) as live:
        for name in args.datasets:
            t = time.perf_counter()
            data = load_demo() if name == "demo" else load_brain(args.brain_pool, args.brain_test)
            t_embed = time.perf_counter() - t
            df = run(data, args.seeds, args.start, args.batch, args.rounds)
            mean = df.groupby(["n_labels", "strategy"])["roc_auc"].mean().unstack().reset_index()
            live.log_plot(name, mean.round(4), x="n_labels", y=list(STRATEGIES), template="linear",
                          title=f"Test ROC-AUC vs labels ({name})")
            last = mean.iloc[-1]
            for s in STRATEGIES:
                live.log_metric(f"{name}/final_roc_auc/{s}", round(float(last[s]), 4), plot=False)
            sections.append(f"### {name}\n\n{data['desc']}. Mean ± sd over {args.seeds} seeds "
                            f"(test ROC-AUC).\n\n{table_md(df)}\n\n{summary(df)}\n\n"
                            f"Wall-clock: embedding {t_embed:.0f} s (≈0 when the vectors are cached under "
                            f"{CACHE}), "
                            f"simulation {time.perf_counter() - t - t_embed:.0f} s.\n")
            print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)
    generated = DOC_HEAD.format(seeds=args.seeds, rounds=args.rounds, start=args.start,
                                batch=args.batch, total=time.perf_counter() - t0) \
        + "\n".join(sections) + DOC_TAIL
    write_between_markers(Path(args.doc), generated)
    print(f"wrote {args.doc}")


START, END = "<!-- active_learning:start -->", "<!-- active_learning:end -->"


def write_between_markers(doc: Path, generated: str) -> None:
    """Replace only the generated part of the doc (its hand-written labelling loop stays)."""
    text = doc.read_text() if doc.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        doc.write_text(f"{head}{START}\n{generated.strip()}\n{END}{rest.split(END, 1)[1]}")
    else:
        doc.write_text(f"{text}{START}\n{generated.strip()}\n{END}\n")


DOC_HEAD = """Generated by `python benchmarks/active_learning.py` (numbers below are from its last run;
{total:.0f} s wall-clock in total on a 2-core CPU machine **shared with other engineers**,
so timings are indicative only).

**Protocol.** Start from {start} labelled images (stratified, seeded), then {rounds} rounds;
each round fits the labelled-only classifier (StandardScaler + logistic regression, C = 0.1,
balanced — the pipeline's `train` defaults) on the ResNet18 embeddings, scores ROC-AUC on
a held-out test set, and adds {batch} labels chosen by each strategy (truth revealed =
the radiologist's answer). {seeds} seeds per strategy (different starting sets).

* `random` — uniform from the unlabelled pool (the baseline to beat);
* `margin` — the most uncertain images (`select.diversity: none`);
* `margin+kcenter` — the `select` stage default: uncertainty-weighted k-center greedy among
  the 300 most uncertain (`select.candidates`), so a batch is not redundant.

The DVCLive plot is `metrics/active_learning/plots/custom/<dataset>.json`
(`dvc plots show` → `active_learning_demo`, `active_learning_brain`).

"""

DOC_TAIL = """
## Reading the results

Interpretation of the run above (the script is seeded: a re-run on the same machine and
library versions reproduces the tables). The first, uncached run took 112 s here
(generating the demo and embedding it: 57 s; hashing 7,019 brain MRI files and embedding
1,600 of them: 25 s); later runs reuse the vectors.

* **Brain MRI:** active selection helps. `margin+kcenter` reaches the ROC-AUC that random
  selection has after 180 labels (0.952) with about 120 labels — a third fewer
  annotations — and its curve has a smaller spread across seeds. Uncertainty alone
  (`margin`) helps too, less.
* **Demo:** no gain. `margin+kcenter` tracks random within one standard deviation
  (0.815 vs 0.821 at 180 labels) and pure uncertainty sampling is *worse* than random:
  with random-init features and few labels the model's uncertainty is poorly estimated
  and concentrates batches on one region; the diversity term removes most of that loss.
  Default kept at `kcenter` for that reason.

* The curves are for the *labelled-only* classifier: the semi-supervised pipeline adds
  pseudo-labels on top, and each new annotation also feeds the pseudo-labeller.
* Embeddings come from a randomly initialised ResNet18 (the machine is offline); with
  ImageNet weights on real images the absolute ROC-AUC is higher and the gaps between
  strategies may differ. Re-run the script after changing the setup.
* Uncertainty sampling is biased towards the decision boundary; the k-center term keeps it
  from spending a batch on near-identical images (see `tests/test_select.py`).
* In practice: run `dvc repro` → send `data/annotation/to_label.csv` to the radiologists →
  put their answers in `data/raw/annotations.csv` (`id,label` or `path,label`) → `dvc repro`
  retrains (see [The labelling loop](#the-labelling-loop-select-stage) above).
"""

if __name__ == "__main__":
    main()
