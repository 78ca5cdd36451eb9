"""Benchmark datasets for the semi-supervised table, embedded once and cached under /tmp.

Each dataset becomes (rows: id, split, label; X: (n, 512) float32) with the pipeline's own
splits: ``labeled`` (100, 50/50), ``unlabeled`` (1,406, natural prevalence, labels hidden
from the methods and kept only as ``truth``), ``test``. Labels are "cancer" (positive)
/ "normal" so every dataset runs through the same code as the demo.

    python benchmarks/semisup_data.py            # embed (cached) and print the split sizes
"""
from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "datasets"
CACHE = Path("/tmp/triage_semisup_cache")
N_LAB, N_POOL, SPLIT_SEED = 100, 1406, 0


def brain_mri_unique(files: list[Path]) -> tuple[list[str], list[str], list[str]]:
    """Byte-identical brain MRI files merged (sha256, sorted); a group whose copies carry
    both binary labels is dropped. Returns ids, one path per id, labels (notumor =
    normal, any tumour = "cancer")."""
    recs: dict = {}
    for p in files:
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        recs.setdefault(h, []).append((str(p), "normal" if p.parent.name == "notumor" else "cancer"))
    ids, paths, labels = [], [], []
    for h in sorted(recs):
        labs = {lab for _, lab in recs[h]}
        if len(labs) > 1:
            continue
        ids.append(h)
        paths.append(sorted(recs[h])[0][0])
        labels.append(labs.pop())
    return ids, paths, labels


def pneumonia_n_files() -> int:
    d = np.load(SHARED / "pneumoniamnist" / "pneumoniamnist.npz")
    return sum(len(d[f"{part}_labels"]) for part in ("train", "val", "test"))


def pneumonia_pngs(out: Path) -> tuple[list[str], list[str], list[str], list[bool]]:
    """PneumoniaMNIST train+val+test de-duplicated by sha256 of the pixels, written once as
    PNGs under ``out`` (outside the repo). Returns ids, paths, labels (pneumonia =
    "cancer", the positive column), is_test (the official test split)."""
    from PIL import Image

    d = np.load(SHARED / "pneumoniamnist" / "pneumoniamnist.npz")
    out.mkdir(parents=True, exist_ok=True)
    seen, ids, paths, labels, is_test = set(), [], [], [], []
    for part in ("train", "val", "test"):
        for img, lab in zip(d[f"{part}_images"], d[f"{part}_labels"].ravel()):
            h = hashlib.sha256(img.tobytes()).hexdigest()
            if h in seen:
                continue
            seen.add(h)
            path = out / f"{h}.png"
            if not path.is_file():
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                path.write_bytes(buf.getvalue())
            ids.append(h)
            paths.append(str(path))
            labels.append("cancer" if lab == 1 else "normal")
            is_test.append(part == "test")
    return ids, paths, labels, is_test


def _embed(paths: list[str], image_size: int) -> np.ndarray:
    import torch

    from triage.embed import Embedder

    torch.set_num_threads(2)
    emb = Embedder("random", seed=42, image_size=image_size, batch_size=64, num_workers=0,
                   device="cpu", precision="fp32").fit()
    return emb.transform(paths)


def _split(labels: np.ndarray, rng: np.random.Generator, test_mask=None) -> np.ndarray:
    """100 labelled (50/50), 1,406 unlabelled (natural prevalence), rest test."""
    n = len(labels)
    split = np.full(n, "test", dtype=object)
    cand = np.arange(n) if test_mask is None else np.flatnonzero(~test_mask)
    cand = rng.permutation(cand)
    pos = [i for i in cand if labels[i] == "cancer"][: N_LAB // 2]
    neg = [i for i in cand if labels[i] == "normal"][: N_LAB // 2]
    split[pos + neg] = "labeled"
    rest = [i for i in cand if split[i] == "test"]
    split[rest[:N_POOL]] = "unlabeled"
    if test_mask is not None:  # official test split; unused candidates are dropped
        split[rest[N_POOL:]] = "drop"
    return split


def brain_mri(image_size: int = 128):
    """brain_mri_4class: notumor = normal, glioma/meningioma/pituitary = cancer (tumour).

    Byte-identical files are merged (sha256) before splitting; a group whose copies carry
    both binary labels is dropped. The given Training/Testing split leaks (189 groups
    cross it), so it is ignored and the data re-split with a seed.
    """
    cache = CACHE / f"brain_mri_{image_size}.npz"
    root = SHARED / "brain_mri_4class"
    if not cache.is_file():
        files = sorted(p for p in root.rglob("*.jpg"))
        ids, paths, labels = brain_mri_unique(files)
        X = _embed(paths, image_size)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(cache, ids=np.array(ids), labels=np.array(labels), X=X,
                 n_files=len(files))
    d = np.load(cache)
    labels = d["labels"].astype(object)
    split = _split(labels, np.random.default_rng(SPLIT_SEED))
    rows = pd.DataFrame({"id": d["ids"].astype(str), "split": split, "label": labels})
    info = {"files": int(d["n_files"]), "unique": len(rows)}
    return _finish(rows, d["X"], info)


def pneumonia(image_size: int = 64):
    """pneumoniamnist (28x28, upsampled by the embedder's bilinear resize): pneumonia =
    "cancer" (positive), normal = normal. Labelled and pool from train+val (deduplicated by
    sha256 of the pixels); test = the official test split."""
    cache = CACHE / f"pneumonia_{image_size}.npz"
    if not cache.is_file():
        ids, paths, labels, is_test = pneumonia_pngs(CACHE / "pneumonia_png")
        X = _embed(paths, image_size)
        np.savez(cache, ids=np.array(ids), labels=np.array(labels), X=X,
                 is_test=np.array(is_test), n_files=pneumonia_n_files())
    d = np.load(cache)
    labels = d["labels"].astype(object)
    split = _split(labels, np.random.default_rng(SPLIT_SEED), test_mask=d["is_test"])
    keep = split != "drop"
    rows = pd.DataFrame({"id": d["ids"].astype(str), "split": split, "label": labels})[keep]
    info = {"files": int(d["n_files"]), "unique": int(len(d["ids"]))}
    return _finish(rows.reset_index(drop=True), d["X"][keep], info)


def demo(path: Path = ROOT / "data" / "features" / "embeddings.parquet",
         truth: Path = ROOT / "data" / "demo" / "pool_truth.parquet"):
    """The pipeline's own demo embeddings (run `dvc repro embed` first); pool truth from the
    demo's hidden-truth file."""
    from triage.store import read_embeddings

    rows, X, _ = read_embeddings(path)
    rows = rows[["id", "split", "label"]].copy()
    t = pd.read_parquet(truth).set_index("id")["label"]
    pool = rows["split"] == "unlabeled"
    rows.loc[pool, "label"] = rows.loc[pool, "id"].map(t).to_numpy()
    return _finish(rows, X, {"files": len(rows), "unique": len(rows)})


def _finish(rows: pd.DataFrame, X: np.ndarray, info: dict):
    """Move the pool's labels to ``truth`` and blank them (methods never see them)."""
    rows = rows.copy()
    rows["truth"] = rows["label"]
    rows.loc[rows["split"] == "unlabeled", "label"] = None
    return rows.reset_index(drop=True), np.asarray(X, np.float32), info


DATASETS = {"demo": demo, "brain_mri_4class": brain_mri, "pneumoniamnist": pneumonia}

if __name__ == "__main__":
    from triage.checkout import require_own_checkout

    require_own_checkout(__file__)
    import time

    for name in sys.argv[1:] or list(DATASETS):
        t0 = time.perf_counter()
        rows, X, info = DATASETS[name]()
        print(name, info, rows.groupby(["split", "truth"]).size().to_dict(),
              f"{time.perf_counter() - t0:.0f}s", flush=True)
