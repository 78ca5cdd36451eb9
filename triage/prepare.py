"""Scan the input folder layout into a manifest (one row per file found).

Layout (``data.source: folder``; the demo generator writes the same layout)::

    <root>/labeled/<class>/**     class names from folder names
    <root>/unlabeled/**
    <root>/test/<class>/**        optional; else a seeded stratified split of labeled
    <root>/patients.csv           optional; path,patient: one patient's images stay on one side

Every file found becomes a manifest row, even when it cannot be read: QC decides what
to quarantine, so ``files found == passed + quarantined`` can be checked downstream.
DICOM files (DICM preamble, any extension) are not read here: the ``deid`` stage
(:mod:`triage.ingest`) de-identified them into ``data/deid/``, and their rows come from its
index (pseudonymous path and patient; a rejected file keeps its reason as ``read_error``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from .errors import DataError
from .io import path_text, sha256_bytes

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),          # sha256 of the file bytes (null when unreadable)
    ("path", pa.string()),        # POSIX path relative to the working directory
    ("split", pa.string()),       # labeled | unlabeled | test
    ("label", pa.string()),       # class name, null when unknown
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("mode", pa.string()),
    ("bytes", pa.int64()),
    ("format", pa.string()),      # format from the file header (PNG, JPEG, ...)
    ("read_error", pa.string()),  # why the file could not be read or identified; null if fine
    ("patient", pa.string()),     # patient pseudonym (DICOM) or patients.csv; null = unknown (own group)
])


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


LINK_POLICIES = ("follow", "quarantine")


def list_files(folder: Path) -> tuple[list[Path], int]:
    """All files under ``folder`` (recursive, sorted); hidden files are counted, not listed.

    Symlinked folders are followed like symlinked files (a link back to one of its own
    ancestors is not descended again: the files are already listed). Broken links are
    listed too (they become ``broken_link`` rows), so every file found is one row.
    """
    files, hidden = [], 0
    ancestors = {str(folder): {os.path.realpath(folder)}}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        chain = ancestors.pop(dirpath)
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in chain:  # cycle (a link to an ancestor): its files are listed already
                continue
            ancestors[os.path.join(dirpath, d)] = chain | {real}
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_hidden(p.relative_to(folder)):
                hidden += 1
                continue
            files.append(p)
    return files, hidden


def _outside(path: Path, root: Path) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) != top


def describe_file(path: Path, root: Path | None = None, links_outside_root: str = "follow") -> dict:
    """Hash and header-read one file. Never raises: problems go to ``read_error``.

    ``root`` + ``links_outside_root="quarantine"``: a file whose real path (after every
    symlink, of the file or of a folder above it) leaves ``root`` is not read; its row
    says ``link_outside_root``.
    """
    # Parquet needs UTF-8: a non-UTF-8 name is shown escaped (and quarantined below)
    shown = path_text(path)
    name_ok = shown == path.as_posix()
    row = {"id": None, "path": shown, "width": None, "height": None, "mode": None,
           "bytes": None, "format": None, "read_error": None}
    if links_outside_root not in LINK_POLICIES:
        raise ValueError(f"data.links_outside_root must be one of {list(LINK_POLICIES)}, "
                         f"got {links_outside_root!r}")
    if not os.path.exists(path):  # lexists (os.walk listed it): a dangling symlink
        row["read_error"] = "broken_link: the link's target does not exist"
        return row
    if root is not None and links_outside_root == "quarantine" and _outside(path, root):
        row["read_error"] = ("link_outside_root: a symlink leads outside the data root "
                             "(data.links_outside_root: quarantine)")
        return row
    try:
        data = path.read_bytes()
    except OSError as exc:
        row["read_error"] = f"unreadable: {exc.strerror or type(exc).__name__}"
        return row
    row["id"] = sha256_bytes(data)
    row["bytes"] = len(data)
    if not name_ok:
        row["read_error"] = "non_utf8_filename"
        return row
    try:
        with Image.open(path) as im:  # header only; QC does the full decode
            row["width"], row["height"] = im.size
            row["mode"], row["format"] = im.mode, im.format
    except Image.DecompressionBombError:
        row["read_error"] = "decompression_bomb"
    except Exception as exc:  # noqa: BLE001 - any header failure is data, not a crash
        if is_dicom(data):  # the pipeline's deid stage de-identifies DICOM before prepare;
            # a DICOM reaching this point (inference, a library call) is not read
            row["read_error"] = ("dicom_not_supported: a DICOM file (DICM preamble) outside the "
                                 "pipeline's deid stage, which de-identifies DICOM in the input "
                                 "layout (docs/privacy.md): put it in the layout, or export it "
                                 "as PNG or TIFF")
        else:
            row["read_error"] = f"not_an_image: {type(exc).__name__}"
    return row


def scan_file(path: Path, root: Path | None = None, links_outside_root: str = "follow",
              skip_dicom: bool = False) -> dict | None:
    """The per-file work of the scan: None for a DICOM file of the layout the deid stage
    reads (``skip_dicom``), else :func:`describe_file`'s row (read, hash, header)."""
    if skip_dicom and dicom_in_layout(path, root, links_outside_root):
        return None
    return describe_file(path, root, links_outside_root)


# map_fn(fn, items) -> fn(item) for each item, in order: where the per-file work runs
# (None: here, one file after the other; embed.engine: ray passes triage.ray_tasks.map_ordered)
MapFn = Callable[[Callable, list], object]


def scan_files(paths: list[Path], root: Path | None = None, links_outside_root: str = "follow",
               skip_dicom: bool = False, map_fn: MapFn | None = None) -> list[dict | None]:
    """:func:`scan_file` of every path, in input order, run by ``map_fn`` (same rows)."""
    fn = partial(scan_file, root=root, links_outside_root=links_outside_root,
                 skip_dicom=skip_dicom)
    return [fn(p) for p in paths] if map_fn is None else list(map_fn(fn, paths))


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then ``DICM`` (any extension)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def dicom_in_layout(path: Path, root: Path | None = None, links_outside_root: str = "follow") -> bool:
    """A file of the layout that the deid stage de-identifies (and prepare then does not
    read): a DICOM preamble, readable, and not a link ``links_outside_root`` keeps out
    (those stay prepare's ``broken_link`` / ``link_outside_root`` / ``unreadable`` rows).
    The one rule for both stages, so they always agree on which files are DICOM."""
    if not os.path.exists(path):
        return False
    if root is not None and links_outside_root == "quarantine" and _outside(path, root):
        return False
    try:
        with open(path, "rb") as fh:
            return is_dicom(fh.read(132))
    except OSError:
        return False


def _class_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"missing folder: {folder} (expected {folder}/<class>/ with images)")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {folder} (expected {folder}/<class>/)")
    return classes


def _refuse_loose(folder: Path, names: list[str]) -> None:
    # a file outside <class>/ has no label: refuse rather than drop it silently. DICOM file
    # names are counted, never shown (they often carry a patient's name or number).
    dicom = [n for n in names if dicom_in_layout(folder / n)]
    shown = [n for n in names if n not in dicom]
    what = (f"{shown[:5]}" if shown else "") + (
        f"{' and ' if shown else ''}{len(dicom)} DICOM file{'s' * (len(dicom) != 1)}" if dicom else "")
    raise DataError(f"files directly in {folder} have no class folder: {what} "
                    f"(move them into {folder}/<class>/)")


def _scan_classes(folder: Path, split: str, root: Path | None = None,
                  links_outside_root: str = "follow", skip_dicom: bool = False,
                  map_fn: MapFn | None = None) -> tuple[list[dict], int, list[tuple]]:
    """Rows of ``folder/<class>/**``, hidden files counted, and (split, label) of each
    DICOM file left to the deid index (``skip_dicom``)."""
    rows, hidden, dicom = [], 0, []
    classes = _class_dirs(folder)
    loose = sorted(p.name for p in folder.iterdir() if not p.is_dir())
    hidden += sum(name.startswith(".") for name in loose)
    loose = [name for name in loose if not name.startswith(".")]
    if loose:
        _refuse_loose(folder, loose)
    listed = []  # every class's files first, then one scan_files call: one batch of work
    for cls_dir in classes:
        files, h = list_files(cls_dir)
        hidden += h
        if not files:
            raise DataError(f"empty class folder: {cls_dir} (remove it or add images)")
        listed += [(f, cls_dir.name) for f in files]
    scanned = scan_files([f for f, _ in listed], root, links_outside_root, skip_dicom, map_fn)
    for (_, label), row in zip(listed, scanned):
        if row is None:
            dicom.append((split, label))
            continue
        rows.append({**row, "split": split, "label": label})
    return rows, hidden, dicom


def stratified_test_split(labels: pd.Series, test_fraction: float, seed: int,
                          groups: pd.Series | None = None, blocked=()) -> np.ndarray:
    """Boolean mask of rows moved to test: the same fraction of each class, seeded.

    ``groups`` (the rows' patients; null = an image of its own): every image of a patient
    lands on the same side, and a patient in ``blocked`` (one with pool images) stays out
    of test. Without any patient the split is the one it always was (same seed, same rows).
    """
    if groups is not None and pd.Series(groups).notna().any():
        return _grouped_test_split(labels, test_fraction, seed, pd.Series(groups), set(blocked))
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in sorted(labels.unique()):
        idx = np.flatnonzero(labels.to_numpy() == cls)
        n_test = int(round(len(idx) * test_fraction))
        if n_test < 1 or n_test >= len(idx):
            raise DataError(
                f"class '{cls}' has {len(idx)} labelled images: too few to split "
                f"test_fraction={test_fraction} (add data/raw/test/<class>/ or more images)")
        mask[rng.choice(idx, size=n_test, replace=False)] = True
    return mask


def _grouped_test_split(labels: pd.Series, test_fraction: float, seed: int, groups: pd.Series,
                        blocked: set) -> np.ndarray:
    """Group-aware version of :func:`stratified_test_split`: per class (sorted), the
    patients whose most frequent label it is (ties: the first class) are drawn in a seeded
    order and moved whole to test while that brings the class's test count nearer its
    target (round(n x test_fraction)); images without a patient are groups of one."""
    y = labels.to_numpy()
    g = np.array([p if isinstance(p, str) else f"\0{i}" for i, p in enumerate(groups)], dtype=object)
    classes = sorted(labels.unique())
    members: dict[str, np.ndarray] = {k: np.flatnonzero(g == k) for k in sorted(set(g))}
    primary = {}
    for k, idx in members.items():
        counts = pd.Series(y[idx]).value_counts()
        primary[k] = min(c for c in counts.index if counts[c] == counts.max())
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for cls in classes:
        n_cls = int((y == cls).sum())
        target = int(round(n_cls * test_fraction))
        cand = [k for k in members if primary[k] == cls and k not in blocked]
        taken = int((mask & (y == cls)).sum())
        for pos in rng.permutation(len(cand)):
            if taken >= target:
                break
            idx = members[cand[pos]]
            size = int((y[idx] == cls).sum())
            if taken + size - target > target - taken:
                continue  # overshooting by more than stopping short: try a smaller patient
            mask[idx] = True
            taken += size
    for cls in classes:
        n_test, n_cls = int((mask & (y == cls)).sum()), int((y == cls).sum())
        if n_test < 1 or n_test >= n_cls:
            raise DataError(
                f"class '{cls}' has {n_cls} labelled images: the patient-level split "
                f"(test_fraction={test_fraction}, each patient's images on one side, a patient "
                f"with pool images never in test) leaves {n_test} of them for test; add "
                f"data/raw/test/<class>/ or more patients")
    return mask


# pseudo_label's Platt calibration: StratifiedKFold(5) over the labelled points
# (triage.pseudo.calibrated_pool_proba); every fold count is clamped to the class size.
PSEUDO_CALIBRATION_FOLDS = 5
# CalibratedClassifierCV(cv=3) inside train.model: svm, or any model with calibration: sigmoid
CALIBRATION_CV = 3


def _min_for_folds(folds: int, need_in_train: int) -> int:
    """Smallest class size m >= 2 whose stratified K-fold (K clamped to m, as every
    K-fold of the pipeline is) leaves at least ``need_in_train`` of the class in each
    training part: m - ceil(m / K) >= need."""
    m = 2
    while m - -(-m // max(2, min(folds, m))) < need_in_train:
        m += 1
    return m


def min_labeled_per_class(params: dict) -> tuple[int, str]:
    """The fewest labelled images of each class the default chain (pseudo_label, train,
    crossval) can run on with these params, and why (the params named).

    Every fit inside a K-fold needs each class in its training part (logistic regression
    on one class fails); a calibrated model (``train.model: svm`` or ``train.calibration:
    sigmoid``) needs ``CALIBRATION_CV`` per class there; crossval nests all of it inside its
    own ``crossval.folds`` training parts.
    """
    t, cv = params["train"], params["crossval"]
    calibrated = t["model"] == "svm" or t["calibration"] == "sigmoid"
    need = CALIBRATION_CV if calibrated else 1
    inner = max(_min_for_folds(t["cv_folds"], need), _min_for_folds(PSEUDO_CALIBRATION_FOLDS, 1),
                need)
    total = _min_for_folds(cv["folds"], inner)
    why = (f"crossval.folds={cv['folds']} refits the chain on each fold's training part, which "
           f"needs {inner} per class: train.cv_folds={t['cv_folds']} out-of-fold scores"
           + (f" of a calibrated model (train.model={t['model']}, train.calibration="
              f"{t['calibration']}: {CALIBRATION_CV}-fold Platt scaling)" if calibrated else "")
           + f" and pseudo_label's {PSEUDO_CALIBRATION_FOLDS}-fold calibration")
    return total, why


def check_labeled_counts(df: pd.DataFrame, classes: list[str], minimum: int, why: str = "") -> None:
    """DataError naming the per-class counts when a class has fewer than ``minimum``
    readable labelled images (rows prepare could not read will be quarantined)."""
    lab = df[(df["split"] == "labeled") & df["read_error"].isna()]
    counts = {c: int((lab["label"] == c).sum()) for c in classes}
    short = [c for c, n in counts.items() if n < minimum]
    if short:
        raise DataError(
            f"too few labelled images: {counts} after the test split and annotations; each "
            f"class needs at least {minimum}" + (f" ({why})" if why else "")
            + f". Add labelled images of {short} (data.root/labeled/<class>/ or annotations.csv)")


def build_manifest(root: str | Path, positive_class: str, test_fraction: float, seed: int,
                   annotations: str | Path | None = None, links_outside_root: str = "follow",
                   min_per_class: int = 1, min_per_class_why: str = "",
                   deid_index: str | Path | None = None,
                   patients: str | Path | None = None,
                   map_fn: MapFn | None = None) -> tuple[pd.DataFrame, dict]:
    """Scan ``root`` and return (manifest, info). Structural problems raise DataError.

    ``links_outside_root`` (``data.links_outside_root``): ``follow`` reads a file reached
    through a symlink (of the file or a folder) that leaves ``root``; ``quarantine`` makes
    it a ``link_outside_root`` row without reading it. ``min_per_class``: fewer readable
    labelled images of a class (after the test split and annotations) raise DataError
    (see :func:`min_labeled_per_class`).

    ``annotations``: optional labels file (see :func:`merge_annotations`), applied after
    the test split so new labels only ever enlarge the training set.

    ``deid_index`` (the deid stage's ``data/deid/index.parquet``): DICOM files of the
    layout are not read; the index's rows (de-identified PNGs, rejected files with their
    reason) stand in for them, and their counts per split and class must match the layout.
    Without it a DICOM file is a ``dicom_not_supported`` row. ``patients``: optional
    ``path,patient`` CSV for the other images (:func:`read_patients`).

    ``map_fn``: where the per-file work (:func:`scan_file`: read, sha256, header) runs
    (:func:`scan_files`; ``embed.engine: ray``: Ray tasks); the rows and so the manifest are
    the same.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (set data.root or data.source: demo)")
    skip = deid_index is not None
    rows, hidden, dicom = _scan_classes(root / "labeled", "labeled", root, links_outside_root, skip,
                                        map_fn)
    classes = sorted({r["label"] for r in rows} | {label for _, label in dicom})
    if positive_class not in classes:
        raise DataError(f"positive class '{positive_class}' (data.positive_class) not among the "
                        f"class folders of {root / 'labeled'}: {classes}")
    if len(classes) != 2:
        raise DataError(f"triage is binary: {root / 'labeled'} must hold exactly 2 class folders "
                        f"(positive '{positive_class}' and one other), found {classes}")

    unlabeled = root / "unlabeled"
    if unlabeled.is_dir():
        files, h = list_files(unlabeled)
        hidden += h
        for row in scan_files(files, root, links_outside_root, skip, map_fn):
            if row is None:
                dicom.append(("unlabeled", None))
                continue
            rows.append({**row, "split": "unlabeled", "label": None})

    test_dir = root / "test"
    if test_dir.is_dir():
        test_rows, h, test_dicom = _scan_classes(test_dir, "test", root, links_outside_root, skip,
                                                 map_fn)
        hidden += h
        dicom += test_dicom
        extra = sorted(({r["label"] for r in test_rows} | {label for _, label in test_dicom})
                       - set(classes))
        if extra:
            raise DataError(f"test classes {extra} in {test_dir} are not labelled classes {classes}")
        rows += test_rows
        test_source = "folder"
    else:
        test_source = "split"
    n_deid = 0
    if skip:
        deid_rows = deid_manifest_rows(deid_index, dicom, map_fn)
        n_deid = len(deid_rows)
        rows += deid_rows
    df = pd.DataFrame(rows, columns=[f.name for f in MANIFEST_SCHEMA])
    df["patient"] = df["patient"].astype(object)
    if patients is not None and Path(patients).is_file():
        df = apply_patients(df, patients, root, dicom_rows=range(len(df) - n_deid, len(df)))
    if df.empty:
        raise DataError(f"no images found under {root}")
    return finish_manifest(df, classes, positive_class, test_source, test_fraction, seed, root,
                           annotations, min_per_class, min_per_class_why,
                           n_hidden=hidden, n_dicom=n_deid)


def finish_manifest(df: pd.DataFrame, classes: list[str], positive_class: str, test_source: str,
                    test_fraction: float, seed: int, root: Path,
                    annotations: str | Path | None, min_per_class: int, min_per_class_why: str,
                    *, n_hidden: int = 0, n_dicom: int = 0) -> tuple[pd.DataFrame, dict]:
    """The rules every source shares once its rows are known (folder scan or archive
    manifest): the seeded test split (``test_source == "split"``; patients kept together,
    never beside a pool patient), the annotations, the per-class minimum, the row order
    and the info dict."""
    if test_source == "split":
        labeled = df["split"] == "labeled"
        pool_patients = df.loc[df["split"] == "unlabeled", "patient"].dropna()
        mask = stratified_test_split(df.loc[labeled, "label"], test_fraction, seed,
                                     groups=df.loc[labeled, "patient"],
                                     blocked=set(pool_patients))
        df.loc[df.index[labeled][mask], "split"] = "test"
    n_annotated = n_already = n_ann_test_patient = 0
    if annotations is not None and Path(annotations).is_file():
        before = df["split"].copy()
        df, n_annotated, n_already = merge_annotations(df, annotations, classes, root)
        n_ann_test_patient = annotated_with_test_patient(df, before)
    check_labeled_counts(df, classes, min_per_class, min_per_class_why)
    order = {s: i for i, s in enumerate(("labeled", "unlabeled", "test"))}
    df = df.sort_values(["split", "path"], key=lambda c: c.map(order) if c.name == "split" else c)
    df = df.reset_index(drop=True)
    for col in ("width", "height", "bytes"):
        df[col] = df[col].astype("Int64")
    info = {"classes": classes, "test_source": test_source, "n_hidden_ignored": n_hidden,
            "negative_class": next(c for c in classes if c != positive_class),
            "n_annotated": n_annotated, "n_annotations_already_labeled": n_already,
            "n_annotated_test_patient": n_ann_test_patient, "n_dicom": n_dicom,
            "n_patients": int(df["patient"].nunique())}
    return df, info


# --------------------------------------------------------------------------- DICOM (deid index)
def deid_manifest_rows(index: str | Path, dicom: list[tuple],
                       map_fn: MapFn | None = None) -> list[dict]:
    """Manifest rows for the DICOM files of the layout, from the deid stage's index.

    A de-identified image is described like any file (its id is the sha256 of the PNG
    bytes); a rejected one becomes a row with its pseudonymous stand-in path and
    ``read_error`` = ``reason: detail``, which QC quarantines. ``dicom`` holds the
    (split, label) of every DICOM file prepare found: the index must have the same counts,
    else it was made from another data.root (a DataError says to run the deid stage).
    """
    path = Path(index)
    if not path.is_file():
        if dicom:
            raise DataError(f"{len(dicom)} DICOM files in the layout but no {path}: the deid "
                            f"stage de-identifies them first (`dvc repro` runs it)")
        return []
    import pyarrow.parquet as pq

    idx = pq.read_table(path).to_pandas()
    found = pd.Series([f"{s}/{lbl}" for s, lbl in dicom], dtype=object).value_counts()
    listed = (idx["split"] + "/" + idx["label"].fillna("None")).value_counts() if len(idx) else found[:0]
    if not found.sort_index().equals(listed.sort_index()):
        raise DataError(f"{path} lists {len(idx)} DICOM files, the layout has {len(dicom)} (or "
                        f"they are in other folders): it was made from other data; run the deid "
                        f"stage again (`dvc repro`)")
    records = list(idx.itertuples(index=False))
    # the de-identified PNGs' per-file work in one call (a rejected file has none to read)
    described = iter(scan_files([Path(r.path) for r in records if not isinstance(r.reason, str)],
                                map_fn=map_fn))
    rows = []
    for r in records:
        label = r.label if isinstance(r.label, str) else None
        patient = r.patient if isinstance(r.patient, str) else None
        if isinstance(r.reason, str):
            detail = r.detail if isinstance(r.detail, str) and r.detail else ""
            rows.append({"id": None, "path": r.path, "width": None, "height": None, "mode": None,
                         "bytes": None, "format": None, "split": r.split, "label": label,
                         "patient": patient,
                         "read_error": f"{r.reason}: {detail}" if detail else r.reason})
        else:
            rows.append({**next(described), "split": r.split, "label": label,
                         "patient": patient})
    return rows


# --------------------------------------------------------------------------- patients.csv
def read_patients(path: str | Path) -> pd.DataFrame:
    """Read ``patients.csv`` (columns ``path``, ``patient``) as stripped strings; errors
    name the file and line."""
    path = Path(path)
    _check_ragged(path)
    try:
        tab = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True,
                          index_col=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (expected a header: path,patient)") from None
    tab.columns = [str(c).strip().lower() for c in tab.columns]
    if set(tab.columns) != {"path", "patient"}:
        raise DataError(f"{path}: columns must be `path` and `patient`, found {list(tab.columns)}")
    for col in ("path", "patient"):
        tab[col] = tab[col].astype(str).str.strip()
    return tab[["path", "patient"]]


def apply_patients(df: pd.DataFrame, path: str | Path, root: str | Path,
                   dicom_rows=()) -> pd.DataFrame:
    """Fill the ``patient`` of the images ``patients.csv`` lists (path as in the manifest
    or relative to the data root). Errors name the CSV line: a blank path or patient, an
    unknown path, a DICOM file (its patient comes from its own header, pseudonymised: a
    raw DICOM path is never echoed) or its de-identified image (``dicom_rows``, the
    manifest index of the rows from the deid index), the same image given two patients.
    Images not listed keep a null patient (one patient each).
    """
    dicom_rows = set(dicom_rows)
    path, root = Path(path), Path(root)
    tab = read_patients(path)
    df = df.copy()
    position = {p: i for i, p in zip(df.index, df["path"])}
    root_prefix = root.as_posix().rstrip("/") + "/"
    given: dict[int, tuple[str, int]] = {}
    for k, row in enumerate(tab.itertuples(index=False)):
        where = f"{path} line {k + 2}"
        if _blank(row.path) or _blank(row.patient):
            raise DataError(f"{where}: empty path or patient")
        p = row.path.replace("\\", "/").removeprefix("./")
        i = position.get(p, position.get(root_prefix + p))
        target = Path(p) if Path(p).is_absolute() or p.startswith(root_prefix) else root / p
        if i in dicom_rows or (i is None and dicom_in_layout(target)):
            raise DataError(f"{where}: names a DICOM file: its patient comes from its own "
                            f"header (pseudonymised by the deid stage); remove the line")
        if i is None:
            raise DataError(f"{where}: unknown image path '{row.path}' (not found under {root})")
        if i in given and given[i][0] != row.patient:
            raise DataError(f"{where}: image '{row.path}' given patient '{row.patient}' but line "
                            f"{given[i][1]} gives it '{given[i][0]}'")
        given.setdefault(i, (row.patient, k + 2))
    for i, (patient, _) in given.items():
        df.at[i, "patient"] = patient
    return df


def annotated_with_test_patient(df: pd.DataFrame, split_before: pd.Series) -> int:
    """Pool images that annotations moved to labelled whose patient has test images. They
    keep their new label; QC's ``patient_leakage`` check (qc.leakage_policy) then keeps the
    patient off the test side. Counted for the prepare metrics."""
    moved = split_before.eq("unlabeled") & df["split"].eq("labeled") & df["patient"].notna()
    test_patients = set(df.loc[df["split"] == "test", "patient"].dropna())
    return int((moved & df["patient"].isin(test_patients)).sum())


# --------------------------------------------------------------------------- annotations
def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


def _check_ragged(path: Path) -> None:
    """DataError naming the first CSV line whose field count differs from the header's
    (pandas would shift an extra field into the index, or name another line)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(enumerate(csv.reader(fh), start=1))
    except UnicodeDecodeError:
        return  # read_csv names it
    n_fields = len(rows[0][1]) if rows else 0
    for line_no, fields in rows[1:]:
        if fields and len(fields) != n_fields:
            raise DataError(f"{path} line {line_no}: {len(fields)} fields, the header has "
                            f"{n_fields} (a stray comma or a missing field?)")


def read_annotations(path: str | Path) -> pd.DataFrame:
    """Read an annotations CSV (columns ``path`` and/or ``id``, and ``label``) as strings."""
    path = Path(path)
    _check_ragged(path)
    try:
        ann = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True,
                          index_col=False)  # a row with an extra field is not an index
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (expected a header: path,label or id,label)") from None
    ann.columns = [str(c).strip().lower() for c in ann.columns]
    if "label" not in ann.columns or not ({"path", "id"} & set(ann.columns)):
        raise DataError(f"{path}: columns must be `path` or `id` (or both) and `label`, "
                        f"found {list(ann.columns)}")
    for col in ("path", "id", "label"):
        if col not in ann.columns:
            ann[col] = ""
        ann[col] = ann[col].astype(str).str.strip()
    return ann[["path", "id", "label"]]


def merge_annotations(df: pd.DataFrame, path: str | Path, classes: list[str],
                      root: str | Path) -> tuple[pd.DataFrame, int, int]:
    """Move annotated unlabelled images into the labelled split with their new label.

    Each row names an image by ``id`` (sha256 of the bytes, as in to_label.csv) or by
    ``path`` (as written in the manifest / to_label.csv, or relative to the data root);
    all files with that content are labelled. Errors name the CSV line: an unknown id or
    path, a label that is not a class, the same image annotated twice with different
    labels, or an annotation that contradicts the image's folder label. Annotating an
    already-labelled (or test) image with its own label is a no-op (counted).
    Returns (manifest, images moved to labelled, annotations of already-labelled images).
    """
    path, root = Path(path), Path(root)
    ann = read_annotations(path)
    by_path = {p: i for p, i in zip(df["path"], df["id"]) if isinstance(i, str)}
    root_prefix = root.as_posix().rstrip("/") + "/"
    ids_known = set(by_path.values())
    wanted: dict[str, tuple[str, int]] = {}   # image id -> (label, CSV line)
    for k, row in enumerate(ann.itertuples(index=False)):
        line = k + 2  # header is line 1
        where = f"{path} line {line}"
        if _blank(row.label):
            raise DataError(f"{where}: empty label")
        if row.label not in classes:
            raise DataError(f"{where}: label '{row.label}' is not one of the classes {classes}")
        image_id = None
        if not _blank(row.path):
            p = row.path.replace("\\", "/").removeprefix("./")
            image_id = by_path.get(p) or by_path.get(root_prefix + p)
            if image_id is None:
                raise DataError(f"{where}: unknown image path '{row.path}' (not found under {root})")
        if not _blank(row.id):
            rid = row.id.lower()
            if rid not in ids_known:
                raise DataError(f"{where}: unknown image id '{row.id}' (no image with this "
                                f"sha256 under {root})")
            if image_id is not None and image_id != rid:
                raise DataError(f"{where}: path '{row.path}' and id '{row.id}' name different images")
            image_id = rid
        if image_id is None:
            raise DataError(f"{where}: neither path nor id given")
        if image_id in wanted and wanted[image_id][0] != row.label:
            prev_label, prev_line = wanted[image_id]
            raise DataError(f"{where}: image {image_id[:12]}… annotated '{row.label}' but line "
                            f"{prev_line} annotates the same image '{prev_label}'")
        wanted.setdefault(image_id, (row.label, line))
    df = df.copy()
    moved = already = 0
    for image_id, (label, line) in wanted.items():
        rows = df["id"] == image_id
        known = df.loc[rows & df["split"].isin(["labeled", "test"]), "label"].dropna().unique()
        if len(known) and any(lbl != label for lbl in known):
            raise DataError(f"{path} line {line}: image {image_id[:12]}… annotated '{label}' "
                            f"but it is already filed under '{known[0]}'")
        pool = rows & (df["split"] == "unlabeled")
        if pool.any():
            df.loc[pool, "split"] = "labeled"
            df.loc[pool, "label"] = label
            moved += int(pool.sum())
        else:
            already += 1
    return df, moved, already
