"""Does the label audit find wrong labels? Flip labels of the demo's labelled set, audit.

    python benchmarks/label_audit.py [--demo-seeds 3] [--flip-seeds 10] [--flips 5]

For each demo seed the labelled set (100 images, 50/50) is generated and embedded once per
feature set (random-init ResNet18, embed.seed: ``embed.layers`` auto = layer1 + layer2
avg+max pooled, the pipeline's default, and ``final``, the network without its classifier,
the default before); for each flip seed ``--flips``
labels are flipped, the baseline's out-of-fold P(positive) is computed as the train stage
does (train.* defaults) and the audit runs (triage.audit, each ``filter_by`` below). Reported:
mean number of flipped labels among the 10 most suspicious rows of to_review.csv, the share
of trials with at least ``flips - 1`` of them there, the mean number of images flagged, and
how many images are flagged with the true (unflipped) labels — all false alarms.

Two demos: the default one (128 px, difficulty 1.0, 35 % benign masses: the committed
pipeline's data, the one tests/test_audit.py uses) and an easy one (96 px, difficulty 0.1,
no benign masses). Prints a markdown table (docs/active_learning.md quotes it).
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score

from triage.audit import audit_labels
from triage.checkout import require_own_checkout
from triage.demo import generate_demo
from triage.embed import Embedder
from triage.models import make_classifier, out_of_fold_proba

ROOT = Path(__file__).resolve().parents[1]
DEMOS = {"default": {"image_size": 128, "difficulty": 1.0, "benign_mass_rate": 0.35},
         "easy": {"image_size": 96, "difficulty": 0.1, "benign_mass_rate": 0.0}}
FILTERS = ("prune_by_noise_rate", "predicted_neq_given", "confident_learning")
LAYERS = ("auto", "final")  # embed.layers: the default, and the network's final features


def main() -> None:
    require_own_checkout(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-seeds", type=int, default=3)
    ap.add_argument("--flip-seeds", type=int, default=10)
    ap.add_argument("--flips", type=int, default=5)
    args = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    t, pos = params["train"], params["data"]["positive_class"]
    pipe = make_classifier(t["model"], t["C"], t["class_weight"], t["seed"], t["calibration"])
    rows = []
    for (name, demo), layers in itertools.product(DEMOS.items(), LAYERS):
        emb = Embedder("random", seed=params["embed"]["seed"], image_size=demo["image_size"],
                       batch_size=50, num_workers=0, device="cpu", layers=layers).fit()
        res = {f: {"hits": [], "flagged": [], "clean": []} for f in FILTERS}
        aucs = []
        for dseed in range(args.demo_seeds):
            with tempfile.TemporaryDirectory() as tmp:
                generate_demo(tmp, n_labeled=100, n_unlabeled=0, n_test=0, seed=dseed, **demo)
                paths = sorted((Path(tmp) / "labeled").rglob("*.png"))
                X = emb.transform([str(p) for p in paths])
            ids = np.array([p.stem for p in paths], dtype=object)
            y = np.array([p.parent.name for p in paths], dtype=object)
            p_clean = out_of_fold_proba(pipe, X, y, pos, t["cv_folds"], t["seed"])
            aucs.append(roc_auc_score(y == pos, p_clean))
            for f in FILTERS:
                res[f]["clean"].append(int(audit_labels(ids, y, p_clean, pos, f)["flagged"].sum()))
            for fseed in range(args.flip_seeds):
                flip = np.random.default_rng(fseed).choice(len(y), args.flips, replace=False)
                given = y.copy()
                given[flip] = np.where(y[flip] == pos, "normal", pos)
                p = out_of_fold_proba(pipe, X, given, pos, t["cv_folds"], t["seed"])
                for f in FILTERS:
                    a = audit_labels(ids, given, p, pos, f)
                    top = a[a["flagged"]].head(10)
                    res[f]["hits"].append(len(set(top["id"]) & set(ids[flip])))
                    res[f]["flagged"].append(int(a["flagged"].sum()))
        for f in FILTERS:
            h = np.array(res[f]["hits"])
            rows.append({"demo": f"{name} ({demo['image_size']} px, difficulty "
                                 f"{demo['difficulty']})",
                         "embed.layers": f"`{layers}`" + (
                             f" ({'+'.join(emb.layers_)})" if emb.layers_ else ""),
                         "OOF ROC-AUC": f"{np.mean(aucs):.2f}",
                         "filter_by": f"`{f}`", "flips in top 10": f"{h.mean():.2f}",
                         f">= {args.flips - 1} in top 10": f"{(h >= args.flips - 1).mean():.0%}",
                         "flagged": f"{np.mean(res[f]['flagged']):.1f}",
                         "flagged, true labels": "/".join(map(str, res[f]["clean"]))})
    df = pd.DataFrame(rows)
    print(f"{args.demo_seeds} demo seeds x {args.flip_seeds} flip seeds, {args.flips} labels "
          f"flipped of 100\n")
    print("| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns))
    for r in df.itertuples(index=False):
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
