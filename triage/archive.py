"""Large-archive mode (``data.source: archive``): a content-addressed manifest is the input.

In folder mode DVC hashes ``data.root`` file by file and prepare reads and hashes every
image again: fine for 10^4-10^5 files, hours and a huge state database for 10^7. Here the
images stay where they are (a shared filesystem, a mounted object store) and one file
lists them::

    <data.root>/manifest.parquet | manifest.csv     (one of the two; the only input DVC hashes)
        path      absolute, file:// URI, or relative to data.root (normalised; may leave it)
        sha256    64 hex digits of the file's bytes (the image id)
        size      bytes
        split     labeled | unlabeled | test (no test rows: seeded stratified split)
        label     class name; required for labeled/test, empty for unlabeled
        patient   optional; images of one patient stay on one side of every split
        mtime_ns  optional, ignored here (``build`` reuses hashes by path/size/mtime)
    <data.root>/annotations.csv                    optional, as in folder mode

prepare (:func:`build_archive_manifest`) trusts the given sha256 and size: it never opens an
image, it validates the table (errors name the row) and applies the folder mode's rules
(two classes, the positive one among them, test labels among the labelled classes, the
test split, annotations, the per-class minimum). The qc stage reads each new content's
bytes anyway for the full decode: it checks them against the sha256 and size there
(``hash_mismatch``, ``missing_file``; triage.qc_cache).

``python -m triage.archive build ROOT --out FILE`` writes such a manifest from a folder
layout (labeled/<class>/, unlabeled/, test/<class>/), hashing in parallel threads and
reusing the sha256 of every file whose path, size and mtime are those of the previous
manifest, so re-listing an archive costs one stat per file, not one read.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .io import atomic_path, path_text
from .prepare import MANIFEST_SCHEMA, _check_ragged, finish_manifest
from .qc_cache import ID_SOURCE, ID_SOURCE_KEY

__all__ = ["ID_SOURCE", "ID_SOURCE_KEY", "build", "build_archive_manifest", "find_manifest"]

MANIFEST_NAMES = ("manifest.parquet", "manifest.csv")
REQUIRED = ("path", "sha256", "size", "split", "label")
OPTIONAL = ("patient", "mtime_ns")
SPLITS = ("labeled", "unlabeled", "test")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# --------------------------------------------------------------------------- reading
def find_manifest(root: str | Path) -> Path:
    """The archive manifest under ``root`` (exactly one of MANIFEST_NAMES)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"archive folder not found: {root} (data.root; data.source: archive "
                        f"reads {root}/manifest.parquet or manifest.csv)")
    found = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
    if not found:
        raise DataError(f"no archive manifest in {root}: write {root}/manifest.parquet (or .csv) "
                        f"with columns {', '.join(REQUIRED)} (`python -m triage.archive build "
                        f"IMAGES --out {root}/manifest.parquet`)")
    if len(found) > 1:
        raise DataError(f"both {found[0].name} and {found[1].name} in {root}: keep one")
    return found[0]


def read_table(path: str | Path) -> tuple[pd.DataFrame, callable]:
    """The manifest as text columns (size/mtime_ns too) and ``where(i)``: how an error names
    row ``i`` (``FILE line N`` for a CSV, counting the header; ``FILE row N`` for Parquet)."""
    path = Path(path)
    if path.suffix == ".csv":
        _check_ragged(path)
        try:
            tab = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: empty file (expected a header: "
                            f"{','.join(REQUIRED)})") from None

        def where(i: int) -> str:
            return f"{path} line {i + 2}"
    else:
        try:
            tab = pq.read_table(path).to_pandas()
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None

        def where(i: int) -> str:
            return f"{path} row {i + 1}"
    tab.columns = [str(c).strip().lower() for c in tab.columns]
    missing = [c for c in REQUIRED if c not in tab.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (required: {list(REQUIRED)}; "
                        f"optional: {list(OPTIONAL)})")
    unknown = [c for c in tab.columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise DataError(f"{path}: unknown column(s) {unknown} (known: {list(REQUIRED + OPTIONAL)})")
    for col in tab.columns:  # one representation whatever the file type: text, null = ""
        if pd.api.types.is_integer_dtype(tab[col]):
            tab[col] = tab[col].astype(str)
        else:
            tab[col] = tab[col].map(_text)
    return tab.reset_index(drop=True), where


def _text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _first(mask: pd.Series) -> int | None:
    hits = np.flatnonzero(np.asarray(mask, dtype=bool))
    return int(hits[0]) if len(hits) else None


def resolve_path(text: str, root: Path) -> str:
    """A manifest path as the pipeline reads it: a ``file://`` URI's local path, an absolute
    path as is, a relative one joined to ``root``; normalised (``..`` collapsed), POSIX.
    Other URI schemes raise ValueError (the caller names the row)."""
    scheme = _SCHEME.match(text)
    if scheme:
        if scheme.group(1).lower() != "file":
            raise ValueError(
                f"'{scheme.group(1)}://' URIs are not read by the pipeline: mount the store as a "
                f"filesystem (s3fs, gcsfuse, blobfuse...) and list its local paths")
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI with a host ('{parts.netloc}'): only local files")
        text = unquote(parts.path)
    p = Path(text)
    return Path(os.path.normpath(p if p.is_absolute() else root / p)).as_posix()


def validate_rows(tab: pd.DataFrame, where, root: Path, positive_class: str) -> tuple[pd.DataFrame, list[str]]:
    """Manifest rows (MANIFEST_SCHEMA columns) from the archive table, and the classes.

    Checks are vectorised (10^7 rows) and each error names the first offending row."""
    def fail(mask, what: str) -> None:
        i = _first(mask)
        if i is not None:
            raise DataError(f"{where(i)}: {what}")

    path, sha = tab["path"], tab["sha256"].str.strip().str.lower()
    split, label = tab["split"].str.strip(), tab["label"].str.strip()
    fail(path.eq(""), "empty path")
    fail(~sha.str.fullmatch(_SHA256.pattern), "sha256 must be 64 hex digits (the sha256 of the "
         "file's bytes)")
    size_text = tab["size"].str.strip()
    fail(~size_text.str.fullmatch(r"\d+"), "size must be a whole number of bytes >= 0")
    fail(~split.isin(SPLITS), f"split must be one of {list(SPLITS)}")
    fail(split.isin(["labeled", "test"]) & label.eq(""),
         "empty label: labeled and test images need their class name")
    fail(split.eq("unlabeled") & label.ne(""),
         "an unlabeled image with a label: make it labeled, or leave the label empty")
    resolved = []
    for i, text in enumerate(path):
        try:
            resolved.append(resolve_path(text, root))
        except ValueError as exc:
            raise DataError(f"{where(i)}: {exc}") from None
    resolved = pd.Series(resolved, dtype=object)
    dup = resolved.duplicated(keep=False)
    if dup.any():
        first = resolved[dup].iloc[0]
        rows = np.flatnonzero((resolved == first).to_numpy())
        raise DataError(f"{where(int(rows[1]))}: the same path as {where(int(rows[0]))} (each "
                        f"file once; copies with other paths are fine: QC keeps one)")
    classes = sorted(set(label[split.eq("labeled")]))
    if positive_class not in classes:
        raise DataError(f"positive class '{positive_class}' (data.positive_class) not among the "
                        f"labelled classes of the archive manifest: {classes}")
    if len(classes) != 2:
        raise DataError(f"triage is binary: the archive manifest's labelled images must have "
                        f"exactly 2 labels (positive '{positive_class}' and one other), found "
                        f"{classes}")
    fail(split.eq("test") & ~label.isin(classes),
         f"test label is not one of the labelled classes {classes}")
    patient = tab["patient"].str.strip() if "patient" in tab else pd.Series([""] * len(tab))
    df = pd.DataFrame({
        "id": sha, "path": resolved, "split": split, "label": label.where(label.ne(""), None),
        "width": None, "height": None, "mode": None,
        "bytes": size_text.astype("int64"), "format": None, "read_error": None,
        "patient": patient.where(patient.ne(""), None),
    }, columns=[f.name for f in MANIFEST_SCHEMA])
    for col in ("label", "patient", "width", "height", "mode", "format", "read_error"):
        df[col] = df[col].astype(object)
    return df, classes


def build_archive_manifest(root: str | Path, positive_class: str, test_fraction: float, seed: int,
                           annotations: str | Path | None = None, min_per_class: int = 1,
                           min_per_class_why: str = "") -> tuple[pd.DataFrame, dict]:
    """prepare's (manifest, info) for ``data.source: archive`` (see the module docstring).

    The same rules as :func:`triage.prepare.build_manifest` where they apply; no image is
    opened (width, height, mode and format stay null until qc's decode fills them)."""
    root = Path(root)
    source = find_manifest(root)
    if (root / "patients.csv").is_file():
        raise DataError(f"{root / 'patients.csv'}: in archive mode the patients are the "
                        f"manifest's `patient` column; move them there and remove the file")
    tab, where = read_table(source)
    if tab.empty:
        raise DataError(f"{source}: no rows")
    df, classes = validate_rows(tab, where, root, positive_class)
    test_source = "folder" if df["split"].eq("test").any() else "split"
    return finish_manifest(df, classes, positive_class, test_source, test_fraction, seed, root,
                           annotations, min_per_class, min_per_class_why)


# --------------------------------------------------------------------------- build (CLI)
def list_layout(root: Path) -> tuple[list[tuple[str, str, str | None]], int]:
    """(file path, split, label) of every file of the folder layout, sorted; hidden files
    (a name part starting with '.') are counted, not listed. Symlinked files are listed
    (stat follows them); symlinked folders are not descended."""
    out, hidden = [], 0
    for split in SPLITS:
        top = root / split
        if not top.is_dir():
            continue
        if split == "unlabeled":
            heads = [(top, None)]
        else:
            loose = sorted(p.name for p in top.iterdir()
                           if not p.is_dir() and not p.name.startswith("."))
            if loose:
                raise DataError(f"files directly in {top} have no class folder: {loose[:5]} "
                                f"(move them into {top}/<class>/)")
            heads = [(d, d.name) for d in sorted(top.iterdir())
                     if d.is_dir() and not d.name.startswith(".")]
        for head, label in heads:
            for dirpath, dirnames, filenames in os.walk(head):
                hidden += sum(d.startswith(".") for d in dirnames)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        hidden += 1
                        continue
                    out.append((os.path.join(dirpath, name), split, label))
    if not any(s == "labeled" for _, s, _ in out):
        raise DataError(f"no labelled images under {root}/labeled/<class>/")
    return out, hidden


def _hash_file(path: str) -> tuple[str | None, str | None]:
    """(sha256 hex, None) or (None, error kind) for one file."""
    import hashlib

    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest(), None
    except OSError as exc:
        return None, exc.strerror or type(exc).__name__


def _hash_chunk(paths: list[str]) -> list[tuple[str | None, str | None]]:
    return [_hash_file(p) for p in paths]


def read_previous(path: Path) -> dict[str, tuple[int, int, str]]:
    """path -> (size, mtime_ns, sha256) of a previous manifest written by :func:`build`;
    {} when there is none or it has no mtime_ns (nothing can be trusted unchanged)."""
    if not path.is_file():
        return {}
    try:
        tab, _ = read_table(path)
    except DataError:
        return {}
    if "mtime_ns" not in tab:
        return {}
    ok = tab["size"].str.fullmatch(r"\d+") & tab["mtime_ns"].str.fullmatch(r"-?\d+")
    tab = tab[ok]
    return dict(zip(tab["path"], zip(tab["size"].astype("int64"), tab["mtime_ns"].astype("int64"),
                                     tab["sha256"])))


def build(root: str | Path, out: str | Path, previous: str | Path | None = None,
          relative: bool = False, workers: int = 0, chunk: int = 256) -> dict:
    """Write the archive manifest of the folder layout under ``root`` to ``out`` (.parquet
    or .csv, by its suffix), sorted by path, atomically. Paths are absolute, or with
    ``relative`` relative to ``out``'s folder (which is then data.root).

    A file whose path, size and mtime (ns) equal a row of ``previous`` (default: ``out``
    itself) keeps that row's sha256 without being read; the others are hashed by
    ``workers`` threads (0 = all cores; hashlib and file reads release the GIL). Files that
    cannot be read are left out and written, with the reason, to ``<out>.unreadable.csv``.
    Returns counts and seconds (no paths)."""
    t0 = time.perf_counter()
    root, out = Path(root), Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise DataError(f"--out must end in .parquet or .csv, got {out.name}")
    files, hidden = list_layout(root)
    prev = read_previous(Path(previous) if previous else out)
    base = out.parent.resolve()
    rows, todo = [], []
    for name, split, label in files:
        real = os.path.abspath(name)
        written = os.path.relpath(real, base) if relative else real
        try:
            st = os.stat(name)
        except OSError as exc:
            rows.append([path_text(written), None, None, split, label, None,
                         exc.strerror or type(exc).__name__])
            continue
        known = prev.get(path_text(written))
        sha = known[2] if known and known[0] == st.st_size and known[1] == st.st_mtime_ns else None
        rows.append([path_text(written), sha, st.st_size, split, label, st.st_mtime_ns, None])
        if sha is None:
            todo.append((len(rows) - 1, name))
    t_list = time.perf_counter() - t0
    n_workers = workers or os.cpu_count() or 1
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for part, results in zip(chunks, pool.map(_hash_chunk, [[n for _, n in c] for c in chunks])):
            for (i, _), (sha, err) in zip(part, results):
                rows[i][1], rows[i][6] = sha, err
    t_hash = time.perf_counter() - t0 - t_list
    frame = pd.DataFrame(rows, columns=["path", "sha256", "size", "split", "label", "mtime_ns",
                                        "error"])
    bad = frame[frame["error"].notna()]
    good = frame[frame["error"].isna()].drop(columns="error").sort_values("path")
    good = good.reset_index(drop=True)
    good["size"], good["mtime_ns"] = good["size"].astype("int64"), good["mtime_ns"].astype("int64")
    _write(good, out)
    side = out.with_name(out.name + ".unreadable.csv")
    if len(bad):
        with atomic_path(side) as tmp:
            bad[["path", "error"]].to_csv(tmp, index=False)
    else:
        side.unlink(missing_ok=True)
    return {"n_files": len(good), "n_hashed": len(todo) - len(bad), "n_reused": len(good) - (len(todo) - len(bad)),
            "n_unreadable": len(bad), "n_hidden_ignored": hidden,
            "list_s": round(t_list, 3), "hash_s": round(t_hash, 3),
            "seconds": round(time.perf_counter() - t0, 3)}


ARCHIVE_SCHEMA = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("size", pa.int64()),
                            ("split", pa.string()), ("label", pa.string()),
                            ("mtime_ns", pa.int64())])


def _write(df: pd.DataFrame, out: Path) -> None:
    with atomic_path(out) as tmp:
        if out.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            pq.write_table(pa.Table.from_pandas(df, schema=ARCHIVE_SCHEMA, preserve_index=False),
                           tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triage.archive",
                                     description="Archive manifests (data.source: archive).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the manifest of a folder layout "
                                     "(labeled/<class>/, unlabeled/, test/<class>/)")
    b.add_argument("root", help="the folder layout to list")
    b.add_argument("--out", required=True, help="manifest file (.parquet or .csv), e.g. "
                                                "data/archive/manifest.parquet")
    b.add_argument("--previous", help="reuse the sha256 of unchanged files from this manifest "
                                      "(default: --out, when it exists)")
    b.add_argument("--relative", action="store_true",
                   help="paths relative to --out's folder (data.root) instead of absolute")
    b.add_argument("--workers", type=int, default=0, help="hashing threads (0 = all cores)")
    args = parser.parse_args(argv)
    try:
        stats = build(args.root, args.out, args.previous, args.relative, args.workers)
    except DataError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(f"archive: {stats['n_files']} files ({stats['n_hashed']} hashed, {stats['n_reused']} "
          f"unchanged reused, {stats['n_unreadable']} unreadable left out"
          + (f" → {args.out}.unreadable.csv" if stats["n_unreadable"] else "")
          + f", {stats['n_hidden_ignored']} hidden ignored) in {stats['seconds']:.2f} s → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
