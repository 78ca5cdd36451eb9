"""Quality control: full decode, per-image checks, exact and near duplicates, test leakage.

Nothing is dropped silently: every manifest row ends either in the clean manifest or in
the quarantine table with a reason, and ``check_invariant`` enforces
``images in == passed + quarantined``.

Order of the checks (an image gets the reason of the first check it fails):

1. found by prepare: ``zero_byte``, ``unreadable``, ``non_utf8_filename``,
   ``not_an_image``, ``decompression_bomb``;
2. full decode (in parallel): ``too_large`` (qc.max_pixels), ``decode_error``
   (truncated, corrupt), ``unsupported_mode`` (qc.convert_modes: false);
3. geometry and content: ``too_small`` (qc.min_side), ``aspect_outlier``
   (qc.max_aspect), ``blank`` (qc.min_std), ``size_outlier`` (qc.size_outlier_factor
   vs the median size; only with qc.size_outlier_policy: quarantine, else a note);
4. exact duplicates (sha256): ``label_conflict`` (every copy), ``leakage`` (test copy
   of a training/pool image, qc.leakage_policy), ``duplicate`` (the other copies);
5. near duplicates (64-bit DCT pHash, Hamming <= qc.near_dup_hamming): with
   qc.near_dup_policy: report they are notes and metrics only; with quarantine
   ``label_conflict``, ``near_leakage`` (per qc.leakage_policy) and ``near_duplicate``.

Usable oddities are kept with a note (``qc_note`` column of the clean manifest): mode
conversions, a format that does not match the extension, size outliers, near duplicates.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import ks_2samp
from tqdm import tqdm

from .errors import DataError, PipelineError
from .images import hamming_within, phash64, phash_hex, to_grey_array

QUARANTINE_COLUMNS = ["path", "reason", "detail"]
# Formats whose usual extensions we know; a mismatch is noted, the image stays usable.
FORMAT_EXTENSIONS = {
    "PNG": {".png"}, "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"}, "BMP": {".bmp"},
    "TIFF": {".tif", ".tiff"}, "GIF": {".gif"}, "WEBP": {".webp"},
}
NATIVE_MODES = ("L", "RGB")   # read as is (RGB -> L is the ordinary greyscale conversion)
HIST_BINS = 32                # per-image intensity histogram (0-255) for the report
SPLITS = ("labeled", "unlabeled", "test")
SPLIT_RANK = {"labeled": 0, "unlabeled": 1, "test": 2}  # which copy of a duplicate is kept

# Defaults of the checks added after the first QC (the stage passes every qc.* param).
DEFAULTS = dict(convert_modes=True, size_outlier_factor=0.25, size_outlier_policy="note",
                near_dup_hamming=2, near_dup_policy="report")


def inspect_image(path: str, max_pixels: int, convert_modes: bool = True) -> dict:
    """Fully decode one image and measure it. Never raises: failures are returned as data.

    Returns decode_error (``reason: detail`` or None), mean/std of the greyscale pixels
    (0-255), note, phash (16 hex digits), hist (HIST_BINS shares of the pixels, summing
    to 1) and mode (after decode).
    """
    out = {"decode_error": None, "mean": None, "std": None, "note": None, "phash": None,
           "hist": None, "mode": None}
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    out["decode_error"] = f"too_large: {w}x{h} > qc.max_pixels={max_pixels}"
                    return out
                im.load()  # full decode: catches truncated files that header reads miss
                mode = out["mode"] = im.mode
                ext = Path(path).suffix.lower()
                if im.format in FORMAT_EXTENSIONS and ext not in FORMAT_EXTENSIONS[im.format]:
                    notes.append(f"format {im.format} named {ext or 'no extension'}")
                if mode not in NATIVE_MODES:
                    if not convert_modes:
                        out["decode_error"] = (f"unsupported_mode: mode {mode} "
                                               f"(qc.convert_modes=false accepts L and RGB)")
                        return out
                    notes.append(f"mode {mode} converted to L")
                arr = to_grey_array(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        out["decode_error"] = f"too_large: {exc}"
        return out
    except Exception as exc:  # noqa: BLE001 - a bad file is data, not a crash
        out["decode_error"] = f"decode_error: {type(exc).__name__}: {exc}"
        return out
    out["mean"], out["std"] = float(arr.mean()), float(arr.std())
    out["note"] = "; ".join(notes) or None
    out["phash"] = phash_hex(phash64(arr))
    counts, _ = np.histogram(arr, bins=HIST_BINS, range=(0.0, 255.0))
    out["hist"] = tuple(round(float(c) / arr.size, 6) for c in counts)
    return out


def _inspect_star(args):
    return inspect_image(*args)


def resolve_workers(workers: int) -> int:
    return workers or os.cpu_count() or 1


def inspect_all(paths: list[str], max_pixels: int, workers: int = 0,
                convert_modes: bool = True) -> list[dict]:
    """Decode in parallel (``workers=0`` → all cores), results in input order."""
    workers = resolve_workers(workers)
    jobs = [(p, max_pixels, convert_modes) for p in paths]
    if workers == 1 or len(jobs) < 64:
        return [inspect_image(*j) for j in tqdm(jobs, desc="qc decode", disable=None)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        it = pool.map(_inspect_star, jobs, chunksize=32)
        return list(tqdm(it, total=len(jobs), desc="qc decode", disable=None))


class QCReport:
    """Result of :func:`run_qc`.

    clean: the clean manifest (manifest columns + mean, std, qc_note, phash);
    quarantine: path, reason, detail; stats: flat metrics (``a/b`` keys nest in DVCLive);
    frame: every input row with reason/detail/qc_note and measurements (for the report);
    groups: ``exact`` and ``near`` duplicate groups as lists of frame indices, kept
    image first; ``near_dist`` the pHash distance of each near-group member to the first;
    hist: per split, the mean per-image intensity histogram (HIST_BINS bins over 0-255).
    """

    def __init__(self, clean: pd.DataFrame, quarantine: pd.DataFrame, stats: dict,
                 frame: pd.DataFrame | None = None, groups: dict | None = None,
                 hist: dict | None = None, params: dict | None = None):
        self.clean, self.quarantine, self.stats = clean, quarantine, stats
        self.frame, self.groups, self.hist = frame, groups or {}, hist or {}
        self.params = params or {}


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_groups(phashes: list[str], max_distance: int) -> list[list[int]]:
    """Groups (positions into ``phashes``) of hashes linked by Hamming <= max_distance.

    Transitive (union-find over the linked pairs); only groups of 2+ are returned,
    each sorted, the list sorted by first member.
    """
    if len(phashes) < 2:
        return []
    h = np.array([int(p, 16) for p in phashes], dtype=np.uint64)
    i, j, _ = hamming_within(h, max_distance)
    uf = _UnionFind(len(h))
    for a, b in zip(i.tolist(), j.tolist()):
        uf.union(a, b)
    members: dict[int, list[int]] = {}
    for a in sorted(set(i.tolist()) | set(j.tolist())):
        members.setdefault(uf.find(a), []).append(a)
    return sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda m: m[0])


def hamming(a: str, b: str) -> int:
    return int(int(a, 16) ^ int(b, 16)).bit_count()


def run_qc(manifest: pd.DataFrame, *, min_side: int, max_pixels: int, min_std: float,
           max_aspect: float, leakage_policy: str, workers: int = 0,
           convert_modes: bool = DEFAULTS["convert_modes"],
           size_outlier_factor: float = DEFAULTS["size_outlier_factor"],
           size_outlier_policy: str = DEFAULTS["size_outlier_policy"],
           near_dup_hamming: int = DEFAULTS["near_dup_hamming"],
           near_dup_policy: str = DEFAULTS["near_dup_policy"]) -> QCReport:
    """Apply every check to the manifest; see module docstring for the order and guarantees."""
    if leakage_policy not in ("drop_test", "keep", "fail"):
        raise PipelineError(f"qc.leakage_policy must be drop_test, keep or fail, got {leakage_policy!r}")
    if size_outlier_policy not in ("note", "quarantine"):
        raise PipelineError(f"qc.size_outlier_policy must be note or quarantine, got {size_outlier_policy!r}")
    if near_dup_policy not in ("report", "quarantine"):
        raise PipelineError(f"qc.near_dup_policy must be report or quarantine, got {near_dup_policy!r}")
    df = manifest.reset_index(drop=True).copy()
    reason = pd.Series([None] * len(df), dtype=object)
    detail = pd.Series([None] * len(df), dtype=object)
    notes: list[list[str]] = [[] for _ in range(len(df))]

    def flag(mask, why, what):
        mask = pd.Series(np.asarray(mask, dtype=bool), index=df.index) & reason.isna()
        if isinstance(why, str):
            reason[mask] = why
        else:
            reason[mask] = why[mask]
        detail[mask] = what if isinstance(what, str) else what[mask]

    def note(mask, what):
        for i in np.flatnonzero(np.asarray(mask, dtype=bool) & reason.isna().to_numpy()):
            notes[i].append(what if isinstance(what, str) else what[i])

    # 1. Problems found while scanning (unreadable, non-UTF-8 name, not an image...).
    flag(df["bytes"].fillna(-1).eq(0), "zero_byte", "file is empty")
    err = df["read_error"].fillna("")
    flag(err.ne(""), err.str.split(":").str[0], err)

    # 2. Full decode of the rest.
    todo = reason.isna()
    results = inspect_all(df.loc[todo, "path"].tolist(), max_pixels, workers, convert_modes)
    res = pd.DataFrame(results, index=df.index[todo],
                       columns=["decode_error", "mean", "std", "note", "phash", "hist", "mode"])
    df["mean"], df["std"] = np.nan, np.nan
    df["phash"] = pd.Series([None] * len(df), dtype=object)
    df["hist"] = pd.Series([None] * len(df), dtype=object)
    df["decoded_mode"] = pd.Series([None] * len(df), dtype=object)
    if len(res):
        df.loc[res.index, ["mean", "std"]] = res[["mean", "std"]].astype(float).to_numpy()
        for col, src in (("phash", "phash"), ("hist", "hist"), ("decoded_mode", "mode")):
            df.loc[res.index, col] = res[src]
        for i, n in res["note"].items():
            if isinstance(n, str) and n:
                notes[i].extend(n.split("; "))
        derr = res["decode_error"].reindex(df.index).fillna("")
        flag(derr.ne(""), derr.str.split(":").str[0], derr)

    # 3. Geometry and content checks.
    w, h = df["width"].astype(float), df["height"].astype(float)
    size_txt = w.astype("Int64").astype(str) + "x" + h.astype("Int64").astype(str)
    flag(np.minimum(w, h) < min_side, "too_small", size_txt + f" < qc.min_side={min_side}")
    aspect = np.maximum(w, h) / np.minimum(w, h).clip(lower=1)
    flag(aspect > max_aspect, "aspect_outlier", aspect.round(2).astype(str) + f" > qc.max_aspect={max_aspect}")
    flag(df["std"] < min_std, "blank", "pixel std " + df["std"].round(3).astype(str) + f" < qc.min_std={min_std}")
    # Size vs the majority: the median of the images still in (robust to the outliers).
    ok = reason.isna()
    med_w = float(np.median(w[ok])) if ok.any() else float("nan")
    med_h = float(np.median(h[ok])) if ok.any() else float("nan")
    f = size_outlier_factor
    off = ok & ((w < f * med_w) | (w > med_w / f) | (h < f * med_h) | (h > med_h / f))
    size_detail = (size_txt + f" vs median {med_w:g}x{med_h:g} "
                   f"(outside x{f:g}..x{1 / f:g}, qc.size_outlier_factor={f:g})")
    if size_outlier_policy == "quarantine":
        flag(off, "size_outlier", size_detail)
    else:
        note(off, "size outlier: " + size_detail)

    # 4. Exact duplicates (same bytes). Conflicting labels quarantine every copy.
    ok = reason.isna()
    known = df[ok & df["split"].isin(["labeled", "test"])]
    conflict_ids = known.groupby("id")["label"].nunique()
    conflict_ids = set(conflict_ids[conflict_ids > 1].index)
    flag(ok & df["id"].isin(conflict_ids), "label_conflict", "same image filed under several labels")

    ok = reason.isna()
    # Which split owns a duplicated image: training data wins over pool, pool over test.
    rank = df["split"].map(SPLIT_RANK)
    order = df[ok].assign(_rank=rank[ok]).sort_values(["_rank", "path"])
    first = order.drop_duplicates("id")
    first_path = df["id"].map(dict(zip(first["id"], first["path"]))).astype(object)
    first_split = df["id"].map(dict(zip(first["id"], first["split"])))
    is_copy = ok & ~df.index.isin(first.index)
    leak = is_copy & df["split"].eq("test") & first_split.ne("test")
    exact_groups = [list(g.index) for _, g in order.groupby("id", sort=False) if len(g) > 1]
    exact_groups.sort(key=lambda g: df.at[g[0], "path"])
    n_leak = int(leak.sum())
    leak_groups = int(df.loc[leak, "id"].nunique())
    if n_leak and leakage_policy == "fail":
        raise DataError(f"{n_leak} test images duplicate training/pool images "
                        f"(qc.leakage_policy=fail); see data/qc or set drop_test")
    if leakage_policy == "drop_test":
        flag(leak, "leakage", "test image identical to " + first_path.fillna(""))
    else:
        note(leak, "leakage kept (qc.leakage_policy=keep): identical to " + first_path.fillna(""))
    flag(is_copy & ~leak, "duplicate", "identical to " + first_path.fillna(""))

    # 5. Near duplicates among what is still in (one image per content: exact copies
    #    kept by leakage_policy=keep ride along with their original).
    ok = reason.isna()
    cand = df[ok & df["phash"].notna()].assign(_rank=rank).sort_values(["_rank", "path"])
    cand = cand.drop_duplicates("id")
    near_groups, near_dist = [], {}
    near = {"groups": 0, "images": 0, "leaked_test": 0, "label_conflict_groups": 0}
    for pos in near_duplicate_groups(cand["phash"].tolist(), near_dup_hamming):
        g = cand.iloc[pos]
        g = g.sort_values(["_rank", "path"])
        idx = list(g.index)
        # exact copies left in (leakage kept) belong to the group too
        extra = [i for i in df.index[ok & df["id"].isin(g["id"])] if i not in idx]
        idx += extra
        rep = idx[0]
        rep_path, rep_hash = df.at[rep, "path"], df.at[rep, "phash"]
        dists = {i: hamming(rep_hash, df.at[i, "phash"]) for i in idx}
        near_groups.append(idx)
        near_dist.update(dists)
        near["groups"] += 1
        near["images"] += len(idx) - 1
        labels = set(df.loc[idx][df.loc[idx, "split"].isin(["labeled", "test"])]["label"].dropna())
        if len(labels) > 1:
            near["label_conflict_groups"] += 1
            what = (f"near-duplicate group (pHash distance <= {near_dup_hamming}) filed under "
                    f"labels {', '.join(sorted(labels))}")
            members = df.index.isin(idx)
            if near_dup_policy == "quarantine":
                flag(members, "label_conflict", what)
            else:
                note(members, what)
            continue
        has_train = bool(df.loc[idx, "split"].ne("test").any())
        for i in idx[1:]:
            if df.at[i, "id"] == df.at[rep, "id"]:
                continue  # exact copy kept by leakage_policy=keep: already noted
            d = dists[i]
            is_leak = df.at[i, "split"] == "test" and has_train
            near["leaked_test"] += int(is_leak)
            mask = df.index == i
            if is_leak:
                what = (f"test image near-identical to training/pool image {rep_path} "
                        f"(pHash distance {d} <= qc.near_dup_hamming={near_dup_hamming})")
                if near_dup_policy == "quarantine" and leakage_policy == "fail":
                    raise DataError("test images near-duplicate training/pool images "
                                    "(qc.near_dup_policy=quarantine, qc.leakage_policy=fail); "
                                    "see the qc report or set drop_test")
                if near_dup_policy == "quarantine" and leakage_policy == "drop_test":
                    flag(mask, "near_leakage", what)
                else:
                    note(mask, "possible leakage: " + what)
            else:
                what = (f"near-duplicate of {rep_path} "
                        f"(pHash distance {d} <= qc.near_dup_hamming={near_dup_hamming})")
                if near_dup_policy == "quarantine":
                    flag(mask, "near_duplicate", what)
                else:
                    note(mask, what)

    df["qc_note"] = pd.Series(["; ".join(n) or None for n in notes], dtype=object)
    df["reason"], df["detail"] = reason, detail
    passed = reason.isna()
    clean = (df[passed].drop(columns=["read_error", "hist", "decoded_mode", "reason", "detail"])
             .reset_index(drop=True))
    quarantine = pd.DataFrame({"path": df.loc[~passed, "path"], "reason": reason[~passed],
                               "detail": detail[~passed]}).reset_index(drop=True)
    check_invariant(len(df), clean, quarantine)
    hist = split_histograms(df[passed])
    stats = summarise(df, clean, quarantine, len(exact_groups), n_leak, leakage_policy)
    stats.update({
        "leaked_test_groups": leak_groups,
        "near_duplicate_groups": near["groups"],
        "near_duplicate_images": near["images"],
        "near_leaked_test_images": near["leaked_test"],
        "near_label_conflict_groups": near["label_conflict_groups"],
    })
    stats.update(note_counts(df))
    stats.update(size_stats(df, off, med_w, med_h))
    stats.update(intensity_stats(clean))
    params = dict(min_side=min_side, max_pixels=max_pixels, min_std=min_std, max_aspect=max_aspect,
                  leakage_policy=leakage_policy, convert_modes=convert_modes,
                  size_outlier_factor=size_outlier_factor, size_outlier_policy=size_outlier_policy,
                  near_dup_hamming=near_dup_hamming, near_dup_policy=near_dup_policy)
    return QCReport(clean, quarantine, stats, frame=df,
                    groups={"exact": exact_groups, "near": near_groups, "near_dist": near_dist},
                    hist=hist, params=params)


def check_invariant(n_in: int, clean: pd.DataFrame, quarantine: pd.DataFrame) -> None:
    if n_in != len(clean) + len(quarantine):
        raise PipelineError(f"QC lost images: {n_in} in, {len(clean)} passed + "
                            f"{len(quarantine)} quarantined")


def summarise(df, clean, quarantine, dup_groups, n_leak, policy) -> dict:
    stats = {
        "n_images": int(len(df)),
        "n_passed": int(len(clean)),
        "n_quarantined": int(len(quarantine)),
        "valid_rate": float(len(clean) / len(df)) if len(df) else 0.0,
        "exact_duplicate_groups": dup_groups,
        "leaked_test_images": n_leak,
        "leaked_test_dropped": n_leak if policy == "drop_test" else 0,
        "n_noted": int(clean["qc_note"].notna().sum()),
    }
    for why, n in quarantine["reason"].value_counts().sort_index().items():
        stats[f"reason/{why}"] = int(n)
    for split in SPLITS:
        stats[f"passed/{split}"] = int((clean["split"] == split).sum())
    stats.update(shift_stats(clean))
    return stats


NOTE_KINDS = {  # note text prefix -> metrics key under notes/
    "mode ": "mode_converted", "format ": "format_mismatch", "size outlier": "size_outlier",
    "near-duplicate of": "near_duplicate", "possible leakage": "near_leakage",
    "near-duplicate group": "near_label_conflict", "leakage kept": "leakage_kept",
}


def note_counts(df: pd.DataFrame) -> dict:
    """How many passed images carry each kind of note, and the decoded modes seen."""
    out = {f"notes/{k}": 0 for k in sorted(set(NOTE_KINDS.values()))}
    passed = df[df["reason"].isna()]
    for text in passed["qc_note"].dropna():
        kinds = {kind for part in text.split("; ") for pre, kind in NOTE_KINDS.items()
                 if part.startswith(pre)}
        for kind in kinds:
            out[f"notes/{kind}"] += 1
    for mode, n in df["decoded_mode"].dropna().value_counts().sort_index().items():
        out[f"input_modes/{mode}"] = int(n)
    return out


def size_stats(df, outliers, med_w, med_h) -> dict:
    dec = df[df["phash"].notna()]
    if dec.empty:
        return {"size/distinct": 0, "size/outliers": 0}
    w, h = dec["width"].astype(int), dec["height"].astype(int)
    return {
        "size/distinct": int(len(set(zip(w, h)))),
        "size/min_side": int(np.minimum(w, h).min()),
        "size/max_side": int(np.maximum(w, h).max()),
        "size/median_width": float(med_w) if med_w == med_w else 0.0,
        "size/median_height": float(med_h) if med_h == med_h else 0.0,
        "size/outliers": int(np.asarray(outliers, dtype=bool).sum()),
    }


def intensity_stats(clean: pd.DataFrame) -> dict:
    """Mean of the per-image means and stds, per split and per class (0-255 scale)."""
    out = {}
    for split in SPLITS:
        part = clean[clean["split"] == split]
        if part.empty:
            continue
        groups = [("all", part)] + [(str(c), g) for c, g in part.groupby("label", sort=True)]
        for name, g in groups:
            out[f"intensity/{split}/{name}/n"] = int(len(g))
            out[f"intensity/{split}/{name}/mean"] = round(float(g["mean"].mean()), 4)
            out[f"intensity/{split}/{name}/std"] = round(float(g["std"].mean()), 4)
    return out


def split_histograms(passed: pd.DataFrame) -> dict:
    """Per split: the average of the per-image intensity histograms (each image weighs 1)."""
    out = {}
    for split in SPLITS:
        hs = passed.loc[passed["split"] == split, "hist"].dropna()
        if len(hs):
            out[split] = np.mean(np.array(hs.tolist(), dtype=np.float64), axis=0)
    return out


def shift_stats(clean: pd.DataFrame) -> dict:
    """KS statistic of per-image mean and std between splits (a cheap drift signal)."""
    out = {}
    groups = {s: clean[clean["split"] == s] for s in SPLITS}
    for a, b in (("labeled", "unlabeled"), ("labeled", "test"), ("unlabeled", "test")):
        if len(groups[a]) < 2 or len(groups[b]) < 2:
            continue
        for col in ("mean", "std"):
            res = ks_2samp(groups[a][col], groups[b][col])
            out[f"shift/{a}_vs_{b}/ks_{col}"] = round(float(res.statistic), 6)
            out[f"shift/{a}_vs_{b}/p_{col}"] = round(float(res.pvalue), 6)
    return out
