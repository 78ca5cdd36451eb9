"""Quality control: full decode, per-image checks, exact duplicates and test leakage.

Nothing is dropped silently: every manifest row ends either in the clean manifest or in
the quarantine table with a reason, and ``check_invariant`` enforces
``images in == passed + quarantined``.
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
from .images import to_grey_array

QUARANTINE_COLUMNS = ["path", "reason", "detail"]
# Formats whose usual extensions we know; a mismatch is noted, the image stays usable.
FORMAT_EXTENSIONS = {
    "PNG": {".png"}, "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"}, "BMP": {".bmp"},
    "TIFF": {".tif", ".tiff"}, "GIF": {".gif"}, "WEBP": {".webp"},
}


def inspect_image(path: str, max_pixels: int) -> dict:
    """Fully decode one image and measure it. Never raises: failures are returned as data."""
    out = {"decode_error": None, "mean": None, "std": None, "note": None}
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
                mode = im.mode
                ext = Path(path).suffix.lower()
                if im.format in FORMAT_EXTENSIONS and ext not in FORMAT_EXTENSIONS[im.format]:
                    notes.append(f"format {im.format} named {ext or 'no extension'}")
                if mode not in ("L", "RGB"):
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
    return out


def _inspect_star(args):
    return inspect_image(*args)


def inspect_all(paths: list[str], max_pixels: int, workers: int = 0) -> list[dict]:
    """Decode in parallel (``workers=0`` → all cores), results in input order."""
    workers = workers or os.cpu_count() or 1
    jobs = [(p, max_pixels) for p in paths]
    if workers == 1 or len(jobs) < 64:
        return [inspect_image(*j) for j in tqdm(jobs, desc="qc decode", disable=None)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        it = pool.map(_inspect_star, jobs, chunksize=32)
        return list(tqdm(it, total=len(jobs), desc="qc decode", disable=None))


class QCReport:
    """Result of :func:`run_qc`: clean manifest, quarantine table and summary numbers."""

    def __init__(self, clean: pd.DataFrame, quarantine: pd.DataFrame, stats: dict):
        self.clean, self.quarantine, self.stats = clean, quarantine, stats


def run_qc(manifest: pd.DataFrame, *, min_side: int, max_pixels: int, min_std: float,
           max_aspect: float, leakage_policy: str, workers: int = 0) -> QCReport:
    """Apply every check to the manifest; see module docstring for the guarantees."""
    df = manifest.reset_index(drop=True).copy()
    reason = pd.Series([None] * len(df), dtype=object)
    detail = pd.Series([None] * len(df), dtype=object)

    def flag(mask, why, what):
        mask = mask & reason.isna()
        reason[mask] = why
        detail[mask] = what if isinstance(what, str) else what[mask]

    # 1. Problems found while scanning (unreadable, non-UTF-8 name, not an image...).
    zero = df["bytes"].fillna(-1).eq(0).to_numpy()
    flag(pd.Series(zero), "zero_byte", "file is empty")
    err = df["read_error"].fillna("")
    flag(err.ne(""), err.str.split(":").str[0], err)

    # 2. Full decode of the rest.
    todo = reason.isna()
    results = inspect_all(df.loc[todo, "path"].tolist(), max_pixels, workers)
    res = pd.DataFrame(results, index=df.index[todo])
    df["mean"], df["std"], df["qc_note"] = np.nan, np.nan, None
    if len(res):
        df.loc[res.index, ["mean", "std"]] = res[["mean", "std"]].astype(float).to_numpy()
        df.loc[res.index, "qc_note"] = res["note"]
        derr = res["decode_error"].reindex(df.index).fillna("")
        flag(derr.ne(""), derr.str.split(":").str[0], derr)

    # 3. Geometry and content checks.
    w, h = df["width"].astype(float), df["height"].astype(float)
    flag(np.minimum(w, h) < min_side, "too_small",
         w.astype("Int64").astype(str) + "x" + h.astype("Int64").astype(str) + f" < qc.min_side={min_side}")
    aspect = np.maximum(w, h) / np.minimum(w, h).clip(lower=1)
    flag(aspect > max_aspect, "aspect_outlier", aspect.round(2).astype(str) + f" > qc.max_aspect={max_aspect}")
    flag(df["std"] < min_std, "blank", "pixel std " + df["std"].round(3).astype(str) + f" < qc.min_std={min_std}")

    # 4. Exact duplicates (same bytes). Conflicting labels quarantine every copy.
    ok = reason.isna()
    known = df[ok & df["split"].isin(["labeled", "test"])]
    conflict_ids = known.groupby("id")["label"].nunique()
    conflict_ids = set(conflict_ids[conflict_ids > 1].index)
    flag(ok & df["id"].isin(conflict_ids), "label_conflict", "same image filed under several labels")

    ok = reason.isna()
    # Which split owns a duplicated image: training data wins over pool, pool over test.
    rank = df["split"].map({"labeled": 0, "unlabeled": 1, "test": 2})
    order = df[ok].assign(_rank=rank[ok]).sort_values(["_rank", "path"])
    first = order.drop_duplicates("id")
    first_path = df["id"].map(dict(zip(first["id"], first["path"]))).astype(object)
    first_split = df["id"].map(dict(zip(first["id"], first["split"])))
    is_copy = ok & ~df.index.isin(first.index)
    leak = is_copy & df["split"].eq("test") & first_split.ne("test")
    dup_groups = int(order.groupby("id").size().gt(1).sum())
    n_leak = int(leak.sum())
    if n_leak and leakage_policy == "fail":
        raise DataError(f"{n_leak} test images duplicate training/pool images "
                        f"(qc.leakage_policy=fail); see data/qc or set drop_test")
    if leakage_policy == "drop_test":
        flag(leak, "leakage", "test image identical to " + first_path.fillna(""))
    flag(is_copy & ~leak, "duplicate", "identical to " + first_path.fillna(""))

    passed = reason.isna()
    clean = df[passed].drop(columns=["read_error"]).reset_index(drop=True)
    quarantine = pd.DataFrame({"path": df.loc[~passed, "path"], "reason": reason[~passed],
                               "detail": detail[~passed]}).reset_index(drop=True)
    check_invariant(len(df), clean, quarantine)
    stats = summarise(df, clean, quarantine, dup_groups, n_leak, leakage_policy)
    return QCReport(clean, quarantine, stats)


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
    for split in ("labeled", "unlabeled", "test"):
        stats[f"passed/{split}"] = int((clean["split"] == split).sum())
    stats.update(shift_stats(clean))
    return stats


def shift_stats(clean: pd.DataFrame) -> dict:
    """KS statistic of per-image mean and std between splits (a cheap drift signal)."""
    out = {}
    groups = {s: clean[clean["split"] == s] for s in ("labeled", "unlabeled", "test")}
    for a, b in (("labeled", "unlabeled"), ("labeled", "test"), ("unlabeled", "test")):
        if len(groups[a]) < 2 or len(groups[b]) < 2:
            continue
        for col in ("mean", "std"):
            res = ks_2samp(groups[a][col], groups[b][col])
            out[f"shift/{a}_vs_{b}/ks_{col}"] = round(float(res.statistic), 6)
    return out
