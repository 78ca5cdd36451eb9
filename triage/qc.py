"""Quality control: full decode, per-image checks, exact and near duplicates, test leakage.

Nothing is dropped silently: every manifest row ends either in the clean manifest or in
the quarantine table with a reason, and ``check_invariant`` enforces
``images in == passed + quarantined``.

Order of the checks (an image gets the reason of the first check it fails):

1. found by prepare: ``zero_byte``, ``unreadable``, ``non_utf8_filename``,
   ``not_an_image``, ``decompression_bomb``; DICOM files the deid stage rejected:
   ``dicom_compressed``, ``dicom_unreadable``, ``burned_in``, ``dicom_no_pixels``,
   ``multi_frame``;
2. full decode (in parallel): ``too_large`` (qc.max_pixels), ``decode_error``
   (truncated, corrupt), ``unsupported_mode`` (qc.convert_modes: false); before it, in
   archive mode, the bytes against the manifest: ``hash_mismatch``, ``missing_file``
   (triage.qc_cache, which also skips the decode of contents decoded in an earlier run);
3. geometry and content: the per-image rules of ``IMAGE_RULES``, shared with
   ``inference.qc_image``: ``too_small`` (qc.min_side), ``aspect_outlier``
   (qc.max_aspect), ``blank`` (qc.min_std); then ``size_outlier`` (qc.size_outlier_factor
   vs the median size; only with qc.size_outlier_policy: quarantine, else a note);
4. exact duplicates (sha256): ``label_conflict`` (every copy), ``leakage`` (test copy
   of a training/pool image, qc.leakage_policy), ``duplicate`` (the other copies);
5. near duplicates (64-bit DCT pHash, Hamming <= qc.near_dup_hamming): a test near-copy
   of a training/pool image is leakage like an exact copy (moved to labelled when the
   pipeline drew the test split, else ``near_leakage`` per qc.leakage_policy); the others
   are notes with qc.near_dup_policy: report, ``label_conflict`` / ``near_duplicate``
   with quarantine;
6. patients (the manifest's `patient` column): a test image of a patient who also has
   training/pool images still in is ``patient_leakage`` (qc.leakage_policy; moved to
   labelled when the pipeline drew the test split), :func:`_patient_leakage`.
Every clean row gets its split group (column `group`, :func:`split_groups`).

Usable oddities are kept with a note (``qc_note`` column of the clean manifest): mode
conversions, a format that does not match the extension, size outliers, near duplicates.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import ks_2samp

from .errors import DataError, PipelineError
from .images import exif_orientation, hamming_within, phash64, phash_hex, to_grey_array, upright
from .params import check
from .progress import progress

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


def inspect_image(path: str, max_pixels: int, convert_modes: bool = True) -> dict:
    """Fully decode one image and measure it. Never raises: failures are returned as data.

    Returns decode_error (``reason: detail`` or None), mean/std of the greyscale pixels
    (0-255), note, phash (16 hex digits), hist (HIST_BINS shares of the pixels, summing
    to 1) and mode (after decode); width, height and format from the header (archive mode:
    prepare read no header, these fill the manifest's).
    """
    out = {"decode_error": None, "mean": None, "std": None, "note": None, "phash": None,
           "hist": None, "mode": None, "width": None, "height": None, "format": None}
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                out["width"], out["height"], out["format"] = w, h, im.format
                if w * h > max_pixels:
                    out["decode_error"] = f"too_large: {w}x{h} > qc.max_pixels={max_pixels}"
                    return out
                im.load()  # full decode: catches truncated files that header reads miss
                frames = getattr(im, "n_frames", 1)
                if frames > 1:  # animated GIF, multi-page TIFF: the pipeline reads frame 1
                    notes.append(f"multi_frame: {frames} frames, only the first is used")
                mode = out["mode"] = im.mode
                orientation = exif_orientation(im)
                if orientation != 1:
                    notes.append(f"exif_orientation: {orientation}, shown and embedded upright")
                ext = Path(path).suffix.lower()
                if im.format in FORMAT_EXTENSIONS and ext not in FORMAT_EXTENSIONS[im.format]:
                    notes.append(f"format {im.format} named {ext or 'no extension'}")
                if mode not in NATIVE_MODES:
                    if not convert_modes:
                        out["decode_error"] = (f"unsupported_mode: mode {mode} "
                                               f"(qc.convert_modes=false accepts L and RGB)")
                        return out
                    notes.append(f"mode {mode} converted to L")
                arr = to_grey_array(upright(im))
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


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: a decode worker exits when the stage process dies, even by
    SIGKILL (`kill -9`, an OOM kill), instead of sleeping forever with ~130 MB each. Linux
    asks the kernel (PR_SET_PDEATHSIG); elsewhere the pool's own shutdown is all there is."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def resolve_workers(workers: int) -> int:
    return workers or os.cpu_count() or 1


def inspect_all(paths: list[str], max_pixels: int, workers: int = 0,
                convert_modes: bool = True, map_fn: Callable | None = None) -> list[dict]:
    """Decode in parallel (``workers=0`` → all cores), results in input order.

    ``map_fn(fn, items)`` (``embed.engine: ray``: triage.ray_tasks.map_ordered, Ray tasks;
    ``workers`` is then the cluster's business) runs the same :func:`inspect_image` of each
    path elsewhere, results in input order: the same results."""
    if map_fn is not None:
        fn = partial(inspect_image, max_pixels=max_pixels, convert_modes=convert_modes)
        return list(progress(map_fn(fn, paths), total=len(paths), desc="qc decode", unit="img"))
    workers = resolve_workers(workers)
    jobs = [(p, max_pixels, convert_modes) for p in paths]
    if workers == 1 or len(jobs) < 64:
        return [inspect_image(*j)
                for j in progress(jobs, total=len(jobs), desc="qc decode", unit="img")]
    with ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        it = pool.map(_inspect_star, jobs, chunksize=32)
        return list(progress(it, total=len(jobs), desc="qc decode", unit="img"))


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


# --------------------------------------------------------------------------- per-image rules
class Measured(NamedTuple):
    """What the per-image rules look at: the header size and the greyscale pixel std (0-255)."""

    width: int
    height: int
    std: float


class ImageRule(NamedTuple):
    """``fails(m, qc)`` and ``detail(m, qc)`` on the measurements and the ``qc.*`` params."""

    reason: str
    fails: Callable[[Measured, Mapping], bool]
    detail: Callable[[Measured, Mapping], str]


def aspect_ratio(m: Measured) -> float:
    # a 0-pixel side counts as 1: a broken header must not divide by zero
    return float(np.float64(max(m.width, m.height)) / max(min(m.width, m.height), 1))


def _rounded(x: float, digits: int) -> str:
    # numpy's rounding and str ("5.0", "0.0"): the texts quarantine.csv has always had
    return str(np.round(np.float64(x), digits))


# The one declaration of the per-image rules, for the qc stage (run_qc) and for new images
# at inference (inference.qc_image), so that training and serving cannot drift apart.
# Order is precedence: an image gets the reason of the first rule it fails.
IMAGE_RULES: tuple[ImageRule, ...] = (
    ImageRule("too_small",
              lambda m, qc: min(m.width, m.height) < qc["min_side"],
              lambda m, qc: f"{m.width}x{m.height} < qc.min_side={qc['min_side']}"),
    ImageRule("aspect_outlier",
              lambda m, qc: aspect_ratio(m) > qc["max_aspect"],
              lambda m, qc: f"{_rounded(aspect_ratio(m), 2)} > qc.max_aspect={qc['max_aspect']}"),
    ImageRule("blank",
              lambda m, qc: m.std < qc["min_std"],
              lambda m, qc: f"pixel std {_rounded(m.std, 3)} < qc.min_std={qc['min_std']}"),
)


def check_image(m: Measured, qc: Mapping) -> tuple[str, str] | None:
    """(reason, detail) of the first of IMAGE_RULES that ``m`` fails, or None if it passes."""
    for rule in IMAGE_RULES:
        if rule.fails(m, qc):
            return rule.reason, rule.detail(m, qc)
    return None


# --------------------------------------------------------------------------- run_qc
class _Verdicts:
    """Reason, detail and notes of every frame row.

    A reason, once set, is never overwritten and a flagged row gets no more notes: that is
    what makes the order of the steps in :func:`run_qc` the order of precedence.
    """

    def __init__(self, n: int):
        self.reason = pd.Series([None] * n, dtype=object)
        self.detail = pd.Series([None] * n, dtype=object)
        self.notes: list[list[str]] = [[] for _ in range(n)]

    @property
    def ok(self) -> pd.Series:
        return self.reason.isna()

    def flag(self, mask, why, what) -> None:
        mask = pd.Series(np.asarray(mask, dtype=bool), index=self.reason.index) & self.ok
        self.reason[mask] = why if isinstance(why, str) else why[mask]
        self.detail[mask] = what if isinstance(what, str) else what[mask]

    def note(self, mask, what) -> None:
        for i in np.flatnonzero(np.asarray(mask, dtype=bool) & self.ok.to_numpy()):
            self.notes[i].append(what if isinstance(what, str) else what[i])


def run_qc(manifest: pd.DataFrame, *, min_side: int, max_pixels: int, min_std: float,
           max_aspect: float, leakage_policy: str, workers: int, convert_modes: bool,
           size_outlier_factor: float, size_outlier_policy: str, near_dup_hamming: int,
           near_dup_policy: str, test_source: str = "folder",
           map_fn: Callable | None = None, decode_cache: Callable | None = None) -> QCReport:
    """Apply every check to the manifest; see module docstring for the order and guarantees.

    The keywords are the ``qc`` section of params.yaml, which holds their defaults, and
    ``test_source`` (prepare's manifest metadata): ``split`` when the pipeline drew the
    test set from the labelled images, so QC may move a test image back to the labelled
    side to keep its near-duplicate group together; ``folder`` (a given ``test/``, the safe
    assumption) applies ``qc.leakage_policy`` instead. ``decode_cache(rows, decode)``
    (triage.qc_cache.DecodeCache): per-image results of earlier runs by content, so only
    new contents are decoded (``decode(paths)`` = the decode below); the same report.
    ``map_fn``: where the full decode runs (:func:`inspect_all`; ``embed.engine: ray``), the
    same report either way."""
    params = dict(min_side=min_side, max_pixels=max_pixels, min_std=min_std, max_aspect=max_aspect,
                  leakage_policy=leakage_policy, convert_modes=convert_modes,
                  size_outlier_factor=size_outlier_factor, size_outlier_policy=size_outlier_policy,
                  near_dup_hamming=near_dup_hamming, near_dup_policy=near_dup_policy)
    _check_policies(params)
    df = manifest.reset_index(drop=True).copy()
    v = _Verdicts(len(df))
    # Cheap checks before expensive ones, and content checks before duplicate search: a
    # broken or blank image must not become the kept copy of a duplicate group.
    _flag_scan_errors(df, v)
    _decode(df, v, max_pixels, workers, convert_modes, map_fn, decode_cache)
    _apply_image_rules(df, v, params)
    size = _size_outliers(df, v, size_outlier_factor, size_outlier_policy)
    _flag_label_conflicts(df, v)
    exact = _exact_copies(df, v, leakage_policy)
    near = _near_duplicates(df, v, near_dup_hamming, near_dup_policy, leakage_policy,
                            test_source)
    patient = _patient_leakage(df, v, leakage_policy, test_source)
    df["group"] = split_groups(df, near["groups"])
    report = _assemble(df, v, size, exact, near, params)
    report.stats.update(patient)
    return report


def _check_policies(p: dict) -> None:
    # a library call (not a stage) may pass anything: the rules are params.yaml's (SCHEMA)
    for key in ("leakage_policy", "size_outlier_policy", "near_dup_policy"):
        check(f"qc.{key}", p[key])


def _flag_scan_errors(df: pd.DataFrame, v: _Verdicts) -> None:
    """Problems prepare found while scanning (empty, unreadable, non-UTF-8 name, not an image)."""
    v.flag(df["bytes"].fillna(-1).eq(0), "zero_byte", "file is empty")
    err = df["read_error"].fillna("")
    v.flag(err.ne(""), err.str.split(":").str[0], err)


def _decode(df: pd.DataFrame, v: _Verdicts, max_pixels: int, workers: int, convert_modes: bool,
            map_fn: Callable | None = None, decode_cache: Callable | None = None) -> None:
    """Full decode of what the scan let through: measurements into ``df``, failures into ``v``."""
    todo = v.ok

    def decode(paths: list[str]) -> list[dict]:
        return inspect_all(paths, max_pixels, workers, convert_modes, map_fn)

    results = (decode(df.loc[todo, "path"].tolist()) if decode_cache is None
               else decode_cache(df.loc[todo], decode))
    res = pd.DataFrame(results, index=df.index[todo],
                       columns=["decode_error", "mean", "std", "note", "phash", "hist", "mode",
                                "width", "height", "format"])
    _fill_header(df, res)
    df["mean"], df["std"] = np.nan, np.nan
    for col in ("phash", "hist", "decoded_mode"):
        df[col] = pd.Series([None] * len(df), dtype=object)
    if not len(res):
        return
    df.loc[res.index, ["mean", "std"]] = res[["mean", "std"]].astype(float).to_numpy()
    for col, src in (("phash", "phash"), ("hist", "hist"), ("decoded_mode", "mode")):
        df.loc[res.index, col] = res[src]
    _keep_decode_notes(res["note"], v)
    derr = res["decode_error"].reindex(df.index).fillna("")
    v.flag(derr.ne(""), derr.str.split(":").str[0], derr)


def _fill_header(df: pd.DataFrame, res: pd.DataFrame) -> None:
    # Archive mode: prepare opened no file, so width/height/mode/format come from the
    # decode (the same header fields prepare reads in folder mode, where none is missing
    # and nothing changes here).
    missing = res.index[df.loc[res.index, "width"].isna().to_numpy() & res["width"].notna().to_numpy()]
    if not len(missing):
        return
    for col in ("width", "height", "mode", "format"):
        df[col] = df[col].astype(object)
        df.loc[missing, col] = res.loc[missing, col]
    for col in ("width", "height"):
        df[col] = df[col].astype("Int64")


def _keep_decode_notes(decode_notes: pd.Series, v: _Verdicts) -> None:
    # inspect_image joins its notes (mode conversion, format vs extension) with "; ";
    # split back so that note_counts counts each kind on its own.
    for i, n in decode_notes.items():
        if isinstance(n, str) and n:
            v.notes[i].extend(n.split("; "))


def _apply_image_rules(df: pd.DataFrame, v: _Verdicts, qc: Mapping) -> None:
    # Per row with check_image, not vectorised: inference.qc_image must give the same
    # reason and the same detail text for the same image.
    for i in np.flatnonzero(v.ok.to_numpy()):
        failed = check_image(Measured(int(df.at[i, "width"]), int(df.at[i, "height"]), df.at[i, "std"]), qc)
        if failed:
            v.reason[i], v.detail[i] = failed


def _size_outliers(df: pd.DataFrame, v: _Verdicts, factor: float, policy: str) -> tuple:
    """(outlier mask, median width, median height); noted or quarantined per policy."""
    # The median of the images still in: robust to the outliers it is meant to find.
    ok = v.ok
    w, h = df["width"].astype(float), df["height"].astype(float)
    med_w = float(np.median(w[ok])) if ok.any() else float("nan")
    med_h = float(np.median(h[ok])) if ok.any() else float("nan")
    off = ok & ((w < factor * med_w) | (w > med_w / factor) | (h < factor * med_h) | (h > med_h / factor))
    size_txt = w.astype("Int64").astype(str) + "x" + h.astype("Int64").astype(str)
    what = (size_txt + f" vs median {med_w:g}x{med_h:g} "
            f"(outside x{factor:g}..x{1 / factor:g}, qc.size_outlier_factor={factor:g})")
    if policy == "quarantine":
        v.flag(off, "size_outlier", what)
    else:
        v.note(off, "size outlier: " + what)
    return off, med_w, med_h


def _flag_label_conflicts(df: pd.DataFrame, v: _Verdicts) -> None:
    # The same bytes under two labels: no copy can be trusted, so every copy goes.
    ok = v.ok
    known = df[ok & df["split"].isin(["labeled", "test"])]
    n_labels = known.groupby("id")["label"].nunique()
    conflict_ids = set(n_labels[n_labels > 1].index)
    v.flag(ok & df["id"].isin(conflict_ids), "label_conflict", "same image filed under several labels")


def _exact_copies(df: pd.DataFrame, v: _Verdicts, leakage_policy: str) -> dict:
    """Keep one copy per content; a test copy of a training/pool image is leakage.

    Returns groups (frame indices, kept copy first), n_leak and leak_groups.
    """
    ok = v.ok
    # Training data wins over pool, pool over test: dropping a copy must not cost a label,
    # and a test image seen in training is the copy that has to go.
    rank = df["split"].map(SPLIT_RANK)
    order = df[ok].assign(_rank=rank[ok]).sort_values(["_rank", "path"])
    first = order.drop_duplicates("id")
    first_path = df["id"].map(dict(zip(first["id"], first["path"]))).astype(object).fillna("")
    first_split = df["id"].map(dict(zip(first["id"], first["split"])))
    is_copy = ok & ~df.index.isin(first.index)
    leak = is_copy & df["split"].eq("test") & first_split.ne("test")
    groups = [list(g.index) for _, g in order.groupby("id", sort=False) if len(g) > 1]
    groups.sort(key=lambda g: df.at[g[0], "path"])
    n_leak = int(leak.sum())
    _apply_leakage_policy(v, leak, n_leak, first_path, leakage_policy)
    v.flag(is_copy & ~leak, "duplicate", "identical to " + first_path)
    return {"groups": groups, "n_leak": n_leak, "leak_groups": int(df.loc[leak, "id"].nunique())}


def _apply_leakage_policy(v: _Verdicts, leak: pd.Series, n_leak: int, first_path: pd.Series,
                          policy: str) -> None:
    if n_leak and policy == "fail":
        raise DataError(f"{n_leak} test images duplicate training/pool images "
                        f"(qc.leakage_policy=fail); see data/qc or set drop_test")
    if policy == "drop_test":
        v.flag(leak, "leakage", "test image identical to " + first_path)
    else:
        v.note(leak, "leakage kept (qc.leakage_policy=keep): identical to " + first_path)


def split_groups(df: pd.DataFrame, near_groups: list[list[int]]) -> pd.Series:
    """The split group of every row (``triage.splits``): near-duplicate groups and, when
    the manifest has a ``patient`` column, each patient's images, joined transitively;
    named by the smallest image id in it (an image alone keeps its own id)."""
    parent = list(range(len(df)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(members) -> None:
        members = list(members)
        for j in members[1:]:
            a, b = find(members[0]), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)

    for idx in near_groups:
        union(idx)
    if "patient" in df:
        for _, rows in df[df["patient"].notna()].groupby("patient", sort=True):
            union(rows.index)
    roots = pd.Series([find(i) for i in range(len(df))], index=df.index)
    first_id = df["id"].groupby(roots).min()
    return roots.map(first_id).astype(object)


def _near_duplicates(df: pd.DataFrame, v: _Verdicts, max_distance: int, policy: str,
                     leakage_policy: str, test_source: str = "folder") -> dict:
    """pHash groups among what is still in, each judged by :func:`_judge_near_group`.

    Returns groups (frame indices, kept image first), dist (pHash distance of each member
    to the kept image) and counts.
    """
    ok = v.ok
    rank = df["split"].map(SPLIT_RANK)
    # One candidate per content; exact copies kept by leakage_policy=keep join their
    # original's group afterwards instead of making a group of their own.
    cand = df[ok & df["phash"].notna()].assign(_rank=rank).sort_values(["_rank", "path"])
    cand = cand.drop_duplicates("id")
    groups, dist = [], {}
    counts = {"groups": 0, "images": 0, "leaked_test": 0, "leaked_test_dropped": 0,
              "moved_to_labeled": 0, "label_conflict_groups": 0}
    for pos in near_duplicate_groups(cand["phash"].tolist(), max_distance):
        g = cand.iloc[pos].sort_values(["_rank", "path"])
        idx = list(g.index)
        idx += [i for i in df.index[ok & df["id"].isin(g["id"])] if i not in idx]
        rep_hash = df.at[idx[0], "phash"]
        d = {i: hamming(rep_hash, df.at[i, "phash"]) for i in idx}
        groups.append(idx)
        dist.update(d)
        counts["groups"] += 1
        counts["images"] += len(idx) - 1
        _judge_near_group(df, v, idx, d, counts, max_distance, policy, leakage_policy,
                          test_source)
    return {"groups": groups, "dist": dist, "counts": counts}


def _judge_near_group(df: pd.DataFrame, v: _Verdicts, idx: list[int], dist: dict, counts: dict,
                      max_distance: int, policy: str, leakage_policy: str,
                      test_source: str = "folder") -> None:
    """Label conflict for the whole group, then each member vs the kept image ``idx[0]``.

    A test member with a training-side (labelled or pool) member is leakage whatever
    ``near_dup_policy`` says, handled like an exact copy: moved to the labelled side when
    the pipeline made the test split (its group then stays on one side), else
    ``qc.leakage_policy``. Other members: with near_dup_policy=report a note (a pHash match
    is a suspicion, not proof), with quarantine ``near_duplicate``.
    """
    quarantine = policy == "quarantine"
    rep = idx[0]
    labels = set(df.loc[idx][df.loc[idx, "split"].isin(["labeled", "test"])]["label"].dropna())
    conflict = len(labels) > 1
    if conflict:
        counts["label_conflict_groups"] += 1
        what = (f"near-duplicate group (pHash distance <= {max_distance}) filed under "
                f"labels {', '.join(sorted(labels))}")
        members = df.index.isin(idx)
        if quarantine:
            v.flag(members, "label_conflict", what)
            return
        v.note(members, what)
    rep_path = df.at[rep, "path"]
    has_train = bool(df.loc[idx, "split"].ne("test").any())
    for i in idx[1:]:
        if df.at[i, "id"] == df.at[rep, "id"]:
            continue  # exact copy kept by leakage_policy=keep: already noted
        how_near = f"(pHash distance {dist[i]} <= qc.near_dup_hamming={max_distance})"
        mask = df.index == i
        if df.at[i, "split"] == "test" and has_train and v.ok[i]:
            counts["leaked_test"] += 1
            what = f"test image near-identical to training/pool image {rep_path} {how_near}"
            if test_source == "split":
                df.at[i, "split"] = "labeled"
                counts["moved_to_labeled"] += 1
                v.note(mask, "moved from the test split to labeled (the pipeline's split keeps "
                             "a near-duplicate group on one side): " + what)
            elif leakage_policy == "fail":
                raise DataError("test images near-duplicate training/pool images "
                                "(qc.leakage_policy=fail); see the qc report or set drop_test")
            elif leakage_policy == "drop_test":
                counts["leaked_test_dropped"] += 1
                v.flag(mask, "near_leakage", what)
            else:
                v.note(mask, "possible leakage kept (qc.leakage_policy=keep): " + what)
        elif not conflict:
            what = f"near-duplicate of {rep_path} {how_near}"
            if quarantine:
                v.flag(mask, "near_duplicate", what)
            else:
                v.note(mask, what)


def _patient_leakage(df: pd.DataFrame, v: _Verdicts, leakage_policy: str,
                     test_source: str = "folder") -> dict:
    """A patient on both sides: a test image whose patient (``patient`` column, when the
    manifest has one) also has labelled or pool images still in after every other check.

    A model tested on a patient it trained on is scored on that patient's anatomy, so it is
    leakage like a copy: when the pipeline drew the test split (``split``) the image moves
    to the labelled side with a note (prepare's patient-level split makes this rare); with a
    given ``test/`` folder ``qc.leakage_policy`` applies: ``drop_test`` quarantines it
    (``patient_leakage``), ``keep`` notes it, ``fail`` stops. Returns the metrics."""
    counts = {"patient_leaked_test_images": 0, "patient_leaked_test_dropped": 0,
              "patient_leaked_patients": 0, "patient_moved_to_labeled": 0}
    if "patient" not in df:
        return counts
    known = v.ok & df["patient"].notna()
    train_side = set(df.loc[known & df["split"].ne("test"), "patient"])
    leak = known & df["split"].eq("test") & df["patient"].isin(train_side)
    n = int(leak.sum())
    counts["patient_leaked_test_images"] = n
    counts["patient_leaked_patients"] = int(df.loc[leak, "patient"].nunique())
    if not n:
        return counts
    what = "test image of a patient who also has training/pool images"
    if test_source == "split":
        df.loc[leak, "split"] = "labeled"
        counts["patient_moved_to_labeled"] = n
        v.note(leak, "moved from the test split to labeled (the pipeline's split keeps a "
                     "patient's images on one side): " + what)
    elif leakage_policy == "fail":
        raise DataError(f"{n} test images of {counts['patient_leaked_patients']} patients who also "
                        f"have training/pool images (qc.leakage_policy=fail); see the qc report "
                        f"or set drop_test")
    elif leakage_policy == "drop_test":
        counts["patient_leaked_test_dropped"] = n
        v.flag(leak, "patient_leakage", what)
    else:
        v.note(leak, "patient leakage kept (qc.leakage_policy=keep): " + what)
    return counts


def _assemble(df: pd.DataFrame, v: _Verdicts, size: tuple, exact: dict, near: dict,
              params: dict) -> QCReport:
    """Clean manifest, quarantine table and metrics from the verdicts."""
    df["qc_note"] = pd.Series(["; ".join(n) or None for n in v.notes], dtype=object)
    df["reason"], df["detail"] = v.reason, v.detail
    passed = v.ok
    clean = (df[passed].drop(columns=["read_error", "hist", "decoded_mode", "reason", "detail"])
             .reset_index(drop=True))
    quarantine = pd.DataFrame({"path": df.loc[~passed, "path"], "reason": v.reason[~passed],
                               "detail": v.detail[~passed]}).reset_index(drop=True)
    check_invariant(len(df), clean, quarantine)
    hist = split_histograms(df[passed])
    stats = summarise(df, clean, quarantine, len(exact["groups"]), exact["n_leak"], params["leakage_policy"])
    counts = near["counts"]
    stats.update({
        "leaked_test_groups": exact["leak_groups"],
        "near_duplicate_groups": counts["groups"],
        "near_duplicate_images": counts["images"],
        "near_leaked_test_images": counts["leaked_test"],
        "near_leaked_test_dropped": counts["leaked_test_dropped"],
        "near_moved_to_labeled": counts["moved_to_labeled"],
        "near_label_conflict_groups": counts["label_conflict_groups"],
    })
    stats.update(note_counts(df))
    stats.update(size_stats(df, *size))
    stats.update(intensity_stats(clean))
    return QCReport(clean, quarantine, stats, frame=df,
                    groups={"exact": exact["groups"], "near": near["groups"], "near_dist": near["dist"]},
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
    "moved from the test split": "moved_to_labeled",
    "patient leakage kept": "patient_leakage_kept",
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
