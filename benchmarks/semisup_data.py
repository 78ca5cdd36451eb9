"""Benchmark datasets for the semi-supervised table, embedded once and cached under /tmp.

Each dataset becomes (rows: id, split, label, truth, group, near_group; X: (n, 512)
float32) with splits made like the pipeline's: ``labeled`` (100, 50/50), ``unlabeled``
(1,406, natural prevalence, labels hidden from the methods and kept only as ``truth``),
``test``. Labels are "cancer" (positive) / "normal" so every dataset runs through the
same code as the demo.

Near-duplicate-safe, as the pipeline's QC (``triage.qc``): after the sha256 de-duplication
every image gets QC's 64-bit pHash (decoded once by ``triage.qc.inspect_all``, cached
beside the embeddings under a key of the hash rule), images within
``qc.near_dup_hamming`` bits are joined transitively (``triage.qc.near_duplicate_groups``,
``triage.qc.split_groups``) and the split is drawn by *group*: a group lands wholly in one
split, so no test image has a near-copy among the labelled or pool images. ``group`` is the
column ``triage.crossval`` / ``triage.splits`` read, so every fold keeps a group on one
side. ``group_split=False`` reproduces the old per-image split (every image its own group)
for the "what changed" comparison; ``near_group`` always holds the pHash group.

    python benchmarks/semisup_data.py            # embed (cached) and print the split sizes
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "datasets"
CACHE = Path("/tmp/triage_semisup_cache")
N_LAB, N_POOL, SPLIT_SEED = 100, 1406, 0
TRAIN_SIDE = ("labeled", "unlabeled")  # a test image with a near-copy here is leakage


@functools.cache
def qc_params() -> dict:
    from triage.params import load_params

    return load_params(ROOT / "params.yaml")["qc"]


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


@functools.cache
def embed_layers():
    """The pipeline's ``embed.layers`` (params.yaml): the features these tables are made of."""
    from triage.params import load_params

    return load_params(ROOT / "params.yaml")["embed"]["layers"]


def layers_tag() -> str:
    """Cache-file tag of :func:`embed_layers` (``final`` keeps the old cache names)."""
    layers = embed_layers()
    return "" if layers == "final" else "_" + (layers if isinstance(layers, str) else
                                              "-".join(layers))


def _embed(paths: list[str], image_size: int) -> np.ndarray:
    import torch

    from triage.embed import Embedder

    torch.set_num_threads(2)
    emb = Embedder("random", seed=42, image_size=image_size, batch_size=64, num_workers=0,
                   device="cpu", precision="fp32", layers=embed_layers()).fit()
    return emb.transform(paths)


def _split(labels: np.ndarray, rng: np.random.Generator, test_mask=None,
           groups=None) -> np.ndarray:
    """100 labelled (50/50), 1,406 unlabelled (natural prevalence), rest test, drawn by
    split group: a group (``groups``, one value per image) lands wholly in one split.

    The candidate images are shuffled exactly as the per-image split always did
    (``rng.permutation``) and each group takes the place of its first image (lowest index,
    so a group's place is as random as an image's, whatever its size): in that order a
    group whose images share one label joins the labelled set while that class's 50 are
    not exceeded, then groups fill the pool up to 1,406, the rest is test. So an image
    without near-copies mostly keeps its old split, and ``groups=None`` (every image alone)
    gives exactly the old split. With ``test_mask`` (an official test split) the test images stay
    test, a group holding any of them is test-side (its other images are dropped, never
    training), and unused candidates are dropped.
    """
    labels = np.asarray(labels, dtype=object)
    n = len(labels)
    is_test = np.zeros(n, bool) if test_mask is None else np.asarray(test_mask, bool)
    codes = np.arange(n) if groups is None else pd.factorize(np.asarray(groups, dtype=object))[0]
    members = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
    split = np.full(n, "test", dtype=object)
    test_side = np.isin(codes, codes[is_test])  # the group holds an official test image
    split[test_side & ~is_test] = "drop"
    perm = rng.permutation(np.flatnonzero(~is_test))  # the old shuffle, whatever the groups
    # A group's place is its first image's (smallest index), never its earliest member's:
    # that would put a big group early and skew the pool towards the classes with many
    # near-duplicates. An image alone keeps its place, so the old split changes only near groups.
    place = np.full(n, n, dtype=np.int64)
    place[perm] = np.arange(len(perm))
    rep = np.array([m[0] for m in members])
    cand = np.flatnonzero(~test_side[rep])
    order = cand[np.argsort(place[rep[cand]], kind="stable")]
    n_class = {"cancer": 0, "normal": 0}
    for g in order:
        m, labs = members[g], set(labels[members[g]])
        if len(labs) == 1 and (c := labs.pop()) in n_class and n_class[c] + len(m) <= N_LAB // 2:
            split[m] = "labeled"
            n_class[c] += len(m)
    n_pool = 0
    for g in (g for g in order if split[members[g][0]] == "test"):
        m = members[g]
        if n_pool + len(m) <= N_POOL:
            split[m] = "unlabeled"
            n_pool += len(m)
        elif test_mask is not None:  # official test split; unused candidates are dropped
            split[m] = "drop"
    return split


def phash_rule_key() -> str:
    """Fingerprint of the pHash rule: the source of QC's decode and hash functions, their
    constants and Pillow/SciPy's versions (a change of any of them re-hashes)."""
    import PIL
    import scipy

    from triage import images, qc

    src = "".join(inspect.getsource(f) for f in (qc.inspect_image, images.upright,
                                                  images.to_grey_array, images.phash64))
    src += f"|{images.PHASH_SIZE}|{images.PHASH_LOW}|{PIL.__version__}|{scipy.__version__}"
    return hashlib.sha256(src.encode()).hexdigest()[:12]


def phashes(name: str, ids: list[str], paths: list[str]) -> tuple[np.ndarray, float]:
    """QC's pHash (16 hex digits) of each image, decoded once by ``triage.qc.inspect_all``
    and cached as ``<name>_phash_<rule key>.npz`` (the ids are checked on load). Returns
    the hashes and the seconds spent hashing (0 when cached)."""
    cache = CACHE / f"{name}_phash_{phash_rule_key()}.npz"
    if cache.is_file():
        d = np.load(cache)
        if d["ids"].astype(str).tolist() == list(ids):
            return d["phash"].astype(str), 0.0
    from triage.qc import inspect_all

    t0 = time.perf_counter()
    res = inspect_all(list(paths), qc_params()["max_pixels"], workers=2)
    bad = [(p, r["decode_error"]) for p, r in zip(paths, res) if r["phash"] is None]
    if bad:
        raise RuntimeError(f"{len(bad)} images did not decode, e.g. {bad[0]}")
    ph = np.array([r["phash"] for r in res])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=np.array(ids), phash=ph)
    return ph, time.perf_counter() - t0


def near_groups(ids, ph, labels, hamming: int) -> tuple[np.ndarray, dict]:
    """Split group of each image (``triage.qc.split_groups`` over the pHash groups within
    ``hamming`` bits; an image alone keeps its id) and the counts: near-duplicate groups,
    images in them, groups whose images carry both labels."""
    from triage.qc import near_duplicate_groups, split_groups

    near = near_duplicate_groups(list(ph), hamming)
    group = split_groups(pd.DataFrame({"id": np.asarray(ids, dtype=object)}), near)
    labels = np.asarray(labels, dtype=object)
    return group.to_numpy(dtype=object), {
        "near_dup_groups": len(near), "near_dup_images": int(sum(len(g) for g in near)),
        "label_conflict_groups": int(sum(len(set(labels[g])) > 1 for g in near))}


def leaked_test(split: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Test images with a near-copy (same split group) among the labelled or pool images."""
    split, groups = np.asarray(split, dtype=object), np.asarray(groups, dtype=object)
    train_groups = set(groups[np.isin(split, TRAIN_SIDE)])
    return (split == "test") & np.isin(groups, list(train_groups))


def _grouped_rows(ids, labels, split_of, group, stats, group_split: bool, test_mask=None):
    """Rows of the group split (or, with ``group_split=False``, the old per-image split)
    and the what-changed counts: test images the old split had with a near-copy on the
    training side, and (always 0, checked) the same for the split used."""
    rng = np.random.default_rng
    old = split_of(rng(SPLIT_SEED), None)
    new = split_of(rng(SPLIT_SEED), group) if group_split else old
    leaked_old, leaked_new = leaked_test(old, group), leaked_test(new, group)
    if group_split and leaked_new.any():
        raise AssertionError(f"{int(leaked_new.sum())} test images have a training-side near-copy")
    lab_groups = list(set(group[old == "labeled"]))
    stats = {**stats, "old_test_leaked": int(leaked_old.sum()),
             "old_test_leaked_lab": int((leaked_old & np.isin(group, lab_groups)).sum()),
             "test_leaked": int(leaked_new.sum()), "group_split": group_split,
             # train/val images kept out of training: a near-copy is in the official test
             "dropped_near_test": 0 if test_mask is None or not group_split else int(
                 (~test_mask & np.isin(group, list(set(group[test_mask])))).sum())}
    rows = pd.DataFrame({"id": np.asarray(ids).astype(str), "split": new, "label": labels,
                         "near_group": group,
                         "group": group if group_split else np.asarray(ids).astype(str)})
    return rows, stats


def brain_mri(image_size: int = 128, group_split: bool = True, hamming: int | None = None):
    """brain_mri_4class: notumor = normal, glioma/meningioma/pituitary = cancer (tumour).

    Byte-identical files are merged (sha256) before splitting; a group whose copies carry
    both binary labels is dropped. The given Training/Testing split leaks (189 groups
    cross it), so it is ignored and the data re-split with a seed, by near-duplicate group.
    """
    cache = CACHE / f"brain_mri_{image_size}{layers_tag()}.npz"
    root = SHARED / "brain_mri_4class"
    t0, embed_s, paths = time.perf_counter(), 0.0, None
    if not cache.is_file():
        files = sorted(p for p in root.rglob("*.jpg"))
        ids, paths, labels = brain_mri_unique(files)
        X = _embed(paths, image_size)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(cache, ids=np.array(ids), labels=np.array(labels), X=X,
                 n_files=len(files), paths=np.array(paths))
        embed_s = time.perf_counter() - t0
    d = np.load(cache)
    if paths is None:
        paths = (d["paths"].tolist() if "paths" in d
                 else brain_mri_unique(sorted(root.rglob("*.jpg")))[1])
    ids, labels = d["ids"].astype(str), d["labels"].astype(object)
    ph, phash_s = phashes("brain_mri", ids.tolist(), paths)
    h = qc_params()["near_dup_hamming"] if hamming is None else hamming
    group, stats = near_groups(ids, ph, labels, h)
    rows, stats = _grouped_rows(ids, labels, lambda rng, g: _split(labels, rng, groups=g),
                                group, stats, group_split)
    info = {"files": int(d["n_files"]), "unique": len(rows), "hamming": h, **stats,
            "embed_s": embed_s, "phash_s": phash_s}
    return _finish(rows, d["X"], info)


def pneumonia(image_size: int = 64, group_split: bool = True, hamming: int | None = None):
    """pneumoniamnist (28x28, upsampled by the embedder's bilinear resize): pneumonia =
    "cancer" (positive), normal = normal. Labelled and pool from train+val (deduplicated by
    sha256 of the pixels); test = the official test split, and a train/val image with a
    near-copy in it is dropped (never training)."""
    cache = CACHE / f"pneumonia_{image_size}{layers_tag()}.npz"
    t0, embed_s = time.perf_counter(), 0.0
    ids, paths, labels, is_test = pneumonia_pngs(CACHE / "pneumonia_png")
    if not cache.is_file():
        X = _embed(paths, image_size)
        np.savez(cache, ids=np.array(ids), labels=np.array(labels), X=X,
                 is_test=np.array(is_test), n_files=pneumonia_n_files())
        embed_s = time.perf_counter() - t0
    d = np.load(cache)
    ids, labels = d["ids"].astype(str), d["labels"].astype(object)
    is_test = d["is_test"].astype(bool)
    ph, phash_s = phashes("pneumonia", ids.tolist(), paths)
    h = qc_params()["near_dup_hamming"] if hamming is None else hamming
    group, stats = near_groups(ids, ph, labels, h)
    rows, stats = _grouped_rows(
        ids, labels, lambda rng, g: _split(labels, rng, test_mask=is_test, groups=g),
        group, stats, group_split, test_mask=is_test)
    keep = (rows["split"] != "drop").to_numpy()
    info = {"files": int(d["n_files"]), "unique": int(len(ids)), "hamming": h, **stats,
            "embed_s": embed_s, "phash_s": phash_s}
    return _finish(rows[keep].reset_index(drop=True), d["X"][keep], info)


def demo(path: Path = ROOT / "data" / "features" / "embeddings.parquet",
         truth: Path = ROOT / "data" / "demo" / "pool_truth.parquet",
         manifest: Path = ROOT / "data" / "qc" / "manifest_clean.parquet",
         group_split: bool = True, hamming: int | None = None):
    """The pipeline's own demo embeddings (run `dvc repro embed` first) and split (its QC
    already keeps near-duplicate groups on one side); the split groups are QC's
    (``triage.splits.groups_for`` on the clean manifest), pool truth from the demo's
    hidden-truth file."""
    from triage.splits import groups_for
    from triage.store import read_embeddings

    rows, X, _ = read_embeddings(path)
    rows = rows[["id", "split", "label"]].copy()
    t = pd.read_parquet(truth).set_index("id")["label"]
    pool = rows["split"] == "unlabeled"
    rows.loc[pool, "label"] = rows.loc[pool, "id"].map(t).to_numpy()
    group = groups_for(rows["id"], manifest)
    sizes = pd.Series(group).value_counts()
    multi = sizes[sizes > 1]
    labels = rows["label"].to_numpy(dtype=object)
    stats = {"near_dup_groups": len(multi), "near_dup_images": int(multi.sum()),
             "label_conflict_groups": int(sum(len(set(labels[group == g])) > 1
                                              for g in multi.index)),
             "old_test_leaked": int(leaked_test(rows["split"], group).sum()),
             "old_test_leaked_lab": 0, "test_leaked": int(leaked_test(rows["split"], group).sum()),
             "group_split": group_split, "dropped_near_test": 0,
             "hamming": qc_params()["near_dup_hamming"] if hamming is None else hamming,
             "embed_s": 0.0, "phash_s": 0.0}
    rows["near_group"] = group
    rows["group"] = group if group_split else rows["id"].to_numpy(dtype=object)
    return _finish(rows, X, {"files": len(rows), "unique": len(rows), **stats})


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

    for name in sys.argv[1:] or list(DATASETS):
        t0 = time.perf_counter()
        rows, X, info = DATASETS[name]()
        print(name, info, rows.groupby(["split", "truth"]).size().to_dict(),
              f"{time.perf_counter() - t0:.0f}s", flush=True)
