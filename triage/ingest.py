"""Stage ``deid``: every DICOM file of the input layout, de-identified before any other
stage reads the layout (docs/privacy.md).

For each file with the DICOM preamble (any extension or none) under ``labeled/<class>/``,
``unlabeled/`` and ``test/<class>/`` of ``data.root``, :func:`triage.dicom.read_dicom`
(with the key of :func:`triage.deid.load_key`) gives a de-identified greyscale image, or a
reason not to use it. The image is written losslessly as PNG to
``data/deid/<split>/[<class>/]<image pseudonym>.png``; ``data/deid/index.parquet`` has one
row per DICOM file (path, split, label, patient pseudonym, reason, detail, notes), the
rejected ones with the stand-in path ``.../<image pseudonym>.dcm`` (never written) and
their reason, so prepare can make every file a manifest row without reading any DICOM.

No original file or folder name, header value or UID reaches an output: the image
pseudonym is keyed (``pseudonym(key, "image", <de-identified SOPInstanceUID or the file's
sha256>)``). The key is read only when the layout holds a DICOM file, and never written.
The optional re-identification table (``deid.reid_table``, a CSV outside the repository,
mode 0600) is the one place pseudonyms meet original paths and PatientIDs.

Torch-free; pydicom is imported only when there is a DICOM file to read.
"""
from __future__ import annotations

import csv
import os
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa

from .errors import ParamsError, PipelineError
from .io import path_text, reset_dir, sha256_file, write_parquet
from .prepare import dicom_in_layout, list_files

DEID_DIR = Path("data/deid")
INDEX_NAME = "index.parquet"
INDEX_SCHEMA = pa.schema([
    ("path", pa.string()),     # data/deid/<split>/[<class>/]<pseudonym>.png (.dcm: rejected, not written)
    ("split", pa.string()),    # labeled | unlabeled | test (the folder it came from)
    ("label", pa.string()),    # class folder name; null in unlabeled/
    ("patient", pa.string()),  # patient pseudonym (keyed)
    ("reason", pa.string()),   # why it is not used (dicom_compressed, burned_in, ...); null = used
    ("detail", pa.string()),   # what the reader found, without identifiers
    ("notes", pa.string()),    # "; "-joined notes (frame chosen, window, mask...)
])
REID_COLUMNS = ["image_pseudonym", "path", "patient", "original_path", "original_patient_id"]


def find_dicom(root: str | Path, links_outside_root: str = "follow") -> list[tuple[Path, str, str | None]]:
    """(file, split, label) of every DICOM file of the layout under ``root``, in a stable
    order. The layout's rules are prepare's (hidden files skipped, symlinked folders
    followed, :func:`triage.prepare.dicom_in_layout`); loose files beside the class folders
    are left to prepare, which refuses them."""
    root = Path(root)
    found = []
    for split in ("labeled", "unlabeled", "test"):
        top = root / split
        if not top.is_dir():
            continue
        if split == "unlabeled":
            folders = [(top, None)]
        else:
            folders = [(d, d.name) for d in sorted(top.iterdir())
                       if d.is_dir() and not d.name.startswith(".")]
        for folder, label in folders:
            files, _ = list_files(folder)
            found += [(f, split, label) for f in files if dicom_in_layout(f, root, links_outside_root)]
    return found


def repo_root(start: str | Path = ".") -> Path:
    """The repository holding ``start`` (the nearest folder with ``.dvc`` or ``.git``), else
    ``start`` itself."""
    here = Path(os.path.realpath(start))
    for folder in (here, *here.parents):
        if (folder / ".dvc").exists() or (folder / ".git").exists():
            return folder
    return here


def check_reid_table(value: str | None, repo: str | Path = ".") -> Path | None:
    """The re-identification table's path, refused inside the repository (it would be one
    `git add` or `dvc add` away from the outputs)."""
    if value is None:
        return None
    path = Path(os.path.realpath(os.path.expanduser(value)))
    top = repo_root(repo)
    if path == top or top in path.parents:
        raise ParamsError(f"params: 'deid.reid_table' must be a path outside the repository "
                          f"({top}), got {value!r}: it links pseudonyms to original paths and "
                          f"PatientIDs (e.g. /secure/triage/reid.csv, readable by the data "
                          f"controller only)")
    return path


def write_reid_table(rows: list[dict], path: Path) -> None:
    """Write the table atomically with mode 0600 (its folder, when created, 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=REID_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _original_patient_id(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
        return str(ds.get("PatientID", "") or "")
    except Exception:  # noqa: BLE001 - an unreadable header has no PatientID to record
        return ""


def _save_png(pixels, path: Path) -> None:
    import numpy as np
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise PipelineError(f"triage.dicom.read_dicom gave a {arr.dtype} array of shape "
                            f"{arr.shape}, expected 2-D uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")  # lossless, no text chunks


def deidentify_layout(root: str | Path, deid: dict, out_dir: str | Path = DEID_DIR,
                      links_outside_root: str = "follow", environ=None) -> tuple[pd.DataFrame, dict]:
    """De-identify every DICOM file of the layout under ``root`` into ``out_dir`` (emptied
    first); returns (index, stats). ``deid``: the params section (window, multi_frame,
    burned_in, mask_border_px, dates, reid_table). The key is loaded only when a DICOM
    file is found (without one: load_key's PipelineError, before anything is read)."""
    reid_path = check_reid_table(deid["reid_table"])
    out_dir = reset_dir(out_dir)
    files = find_dicom(root, links_outside_root)
    rows, reid = [], []
    if files:
        from .deid import load_key, pseudonym
        from .dicom import read_dicom

        key = load_key(environ)
        window = tuple(deid["window"]) if deid["window"] is not None else None
        used: set[Path] = set()
        for path, split, label in files:
            img = read_dicom(path, key, window=window, multi_frame=deid["multi_frame"],
                             burned_in=deid["burned_in"], mask_border=deid["mask_border_px"],
                             dates=deid["dates"])
            sha = sha256_file(path)
            uid = str(img.header.get("SOPInstanceUID", "") or "") if img.header is not None else ""
            folder = out_dir / split / label if label else out_dir / split
            name, n = pseudonym(key, "image", uid or sha), 0
            while folder / name in used:  # another file with that SOPInstanceUID (a copy)
                n += 1
                name = pseudonym(key, "image", uid or sha, sha, str(n))
            used.add(folder / name)
            reason = img.reason if img.reason or img.pixels is not None else "dicom_no_pixels"
            out = folder / f"{name}{'.dcm' if reason else '.png'}"
            if not reason:
                _save_png(img.pixels, out)
            rows.append({"path": out.as_posix(), "split": split, "label": label,
                         "patient": img.patient or None, "reason": reason or None,
                         "detail": img.detail or None, "notes": "; ".join(img.notes) or None})
            if reid_path is not None:
                reid.append({"image_pseudonym": name, "path": out.as_posix(),
                             "patient": img.patient or "", "original_path": path_text(path),
                             "original_patient_id": _original_patient_id(path)})
    index = pd.DataFrame(rows, columns=INDEX_SCHEMA.names)
    index = index.sort_values("path", kind="stable").reset_index(drop=True)
    write_parquet(index, Path(out_dir) / INDEX_NAME, schema=INDEX_SCHEMA)
    if reid_path is not None and files:
        write_reid_table(sorted(reid, key=lambda r: r["path"]), reid_path)
    return index, index_stats(index)


def write_empty_index(out_dir: str | Path = DEID_DIR) -> pd.DataFrame:
    """Demo mode: no input layout to read, an empty index."""
    out_dir = reset_dir(out_dir)
    index = pd.DataFrame(columns=INDEX_SCHEMA.names)
    write_parquet(index, out_dir / INDEX_NAME, schema=INDEX_SCHEMA)
    return index


def index_stats(index: pd.DataFrame) -> dict:
    """Counts for metrics/deid (no path, no pseudonym)."""
    used = index["reason"].isna()
    stats = {"n_dicom": int(len(index)), "n_deidentified": int(used.sum()),
             "n_rejected": int((~used).sum()), "n_patients": int(index["patient"].nunique()),
             "n_noted": int(index["notes"].notna().sum())}
    for split in ("labeled", "unlabeled", "test"):
        stats[f"n/{split}"] = int((index["split"] == split).sum())
    for why, n in sorted(Counter(index.loc[~used, "reason"]).items()):
        stats[f"reason/{why}"] = int(n)
    return stats
