"""The fine-tuning and SimCLR paths on a given device: they run, how fast, how repeatable.

Generates a small synthetic demo (offline), then on ``--device`` (cpu | cuda):
SimCLR pretraining for a few epochs, and fine-tuning with consistency (K-fold OOF + final
model + test prediction) twice with the same seed, reporting wall-clock, test ROC-AUC and
whether the two runs gave the same probabilities (on CUDA a few backward kernels have no
deterministic variant, so small differences are possible there; on CPU they must match).

    python benchmarks/finetune_device_check.py --device cuda
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from triage.checkout import require_own_checkout

ROOT = Path(__file__).resolve().parents[1]


def demo_rows(root: Path, n_lab: int, n_pool: int, n_test: int) -> pd.DataFrame:
    from triage.demo import generate_demo

    generate_demo(root, n_labeled=n_lab, n_unlabeled=n_pool, n_test=n_test, image_size=64,
                  seed=0)
    rows = []
    for p in sorted(root.rglob("*.png")):
        split = p.relative_to(root).parts[0]
        label = p.parent.name if split in ("labeled", "test") else None
        rows.append({"id": f"{split}/{p.name}", "path": str(p), "split":
                     "unlabeled" if split == "unlabeled" else split, "label": label})
    return pd.DataFrame(rows)


def main() -> None:
    require_own_checkout(__file__)
    from sklearn.metrics import roc_auc_score

    from triage.finetune import FinetuneConfig, run_finetune
    from triage.pretrain import PretrainConfig, run_pretrain

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--n-pool", type=int, default=600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = demo_rows(Path(d) / "demo", 100, args.n_pool, 200)
        t0 = time.perf_counter()
        pre = run_pretrain(rows, PretrainConfig(epochs=args.pretrain_epochs, device=args.device,
                                                threads=2))
        loss = [round(h["loss"], 3) for h in pre["history"]] if pre["history"] and \
            "loss" in pre["history"][0] else pre["history"]
        print(f"pretrain: {pre['n_images']} images, {args.pretrain_epochs} epochs on "
              f"{pre['device']}: {time.perf_counter() - t0:.1f} s; loss {loss}")
        cfg = replace(FinetuneConfig(), epochs=args.epochs, device=args.device, threads=2)
        runs = []
        for i in range(2):
            t0 = time.perf_counter()
            res = run_finetune(rows, cfg, "cancer", 0.95)
            secs = time.perf_counter() - t0
            test = res["predictions"][res["predictions"]["kind"] == "test"]
            auc = roc_auc_score((test["label"] == "cancer").astype(int), test["proba"])
            runs.append(test["proba"].to_numpy())
            print(f"finetune run {i + 1}: {res['n_labeled']} labelled + {res['n_pool']} pool, "
                  f"{args.epochs} epochs x {cfg.cv_folds + 1} trainings on {res['device']}: "
                  f"{secs:.1f} s; test ROC-AUC {auc:.3f}; threshold {res['threshold']:.3f}")
        diff = float(np.max(np.abs(runs[0] - runs[1])))
        print(f"repeatability: max |p1 - p2| = {diff:.2e} "
              f"({'identical' if diff == 0 else 'differs'})")


if __name__ == "__main__":
    main()
