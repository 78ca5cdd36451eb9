"""Large-archive mode (data.source: archive), the QC decode cache and the partitioned store.

Real files, real Parquet, a real `dvc repro` in a temp git repo; no mocks.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import QC, e2e_env, make_repo, run, set_params
from imagefactory import blob_image, make_layout, write_png

from triage import archive
from triage.errors import DataError
from triage.prepare import build_manifest
from triage.qc import run_qc
from triage.qc_cache import DecodeCache
from triage.store import (
    INDEX,
    load_reusable,
    read_embeddings,
    read_fingerprint,
    write_embeddings,
    write_partitioned,
)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- manifest validation
@pytest.fixture
def archive_dir(tmp_path):
    """6+6 labelled, 4 unlabelled PNGs in a store outside data.root; a valid CSV manifest."""
    lay = make_layout(tmp_path / "store", n_labeled={"cancer": 6, "normal": 6}, n_unlabeled=4)
    root = tmp_path / "data" / "archive"
    root.mkdir(parents=True)
    rows = []
    for cls, paths in lay["labeled"].items():
        rows += [(str(p), sha(p), p.stat().st_size, "labeled", cls) for p in paths]
    rows += [(str(p), sha(p), p.stat().st_size, "unlabeled", "") for p in lay["unlabeled"]]
    table = pd.DataFrame(rows, columns=["path", "sha256", "size", "split", "label"])
    table.to_csv(root / "manifest.csv", index=False)
    return root, table


def write_csv(root: Path, table: pd.DataFrame) -> None:
    table.to_csv(root / "manifest.csv", index=False)


def test_valid_manifest_gives_prepare_rows_without_reading_images(archive_dir):
    root, table = archive_dir
    df, info = archive.build_archive_manifest(root, "cancer", 0.25, 0)
    assert len(df) == 16 and info["classes"] == ["cancer", "normal"]
    assert info["test_source"] == "split" and (df["split"] == "test").sum() == 4  # 25 % of 12
    assert set(df["id"]) == set(table["sha256"])
    assert df["width"].isna().all() and df["read_error"].isna().all()
    assert list(df["bytes"]) == [table.set_index("path").loc[p, "size"] for p in df["path"]]
    # the same table as Parquet gives the same manifest
    (root / "manifest.csv").unlink()
    table.to_parquet(root / "manifest.parquet", index=False)
    df2, _ = archive.build_archive_manifest(root, "cancer", 0.25, 0)
    pd.testing.assert_frame_equal(df, df2)


def test_relative_paths_and_file_uris_resolve_against_data_root(archive_dir):
    root, table = archive_dir
    t = table.copy()
    t.loc[0, "path"] = os.path.relpath(t.loc[0, "path"], root)  # ../../store/...
    t.loc[1, "path"] = Path(t.loc[1, "path"]).as_uri()
    write_csv(root, t)
    df, _ = archive.build_archive_manifest(root, "cancer", 0.25, 0)
    assert set(df["path"]) == set(table["path"])


def _mutate(kind):
    def f(t):
        t = t.copy()
        if kind == "missing_column":
            return t.drop(columns=["size"])
        if kind == "unknown_column":
            return t.assign(patiant="p1")
        if kind == "bad_sha":
            t.loc[3, "sha256"] = "xyz" + t.loc[3, "sha256"][3:]
        elif kind == "short_sha":
            t.loc[3, "sha256"] = t.loc[3, "sha256"][:40]
        elif kind == "bad_size":
            t["size"] = t["size"].astype(str)
            t.loc[3, "size"] = "12.5"
        elif kind == "unknown_split":
            t.loc[3, "split"] = "validation"
        elif kind == "duplicate_path":
            t.loc[3, "path"] = t.loc[1, "path"]
        elif kind == "label_missing":
            t.loc[3, "label"] = ""
        elif kind == "unlabeled_with_label":
            t.loc[13, "label"] = "cancer"
        elif kind == "empty_path":
            t.loc[3, "path"] = ""
        elif kind == "s3_uri":
            t.loc[3, "path"] = "s3://bucket/x.png"
        elif kind == "three_classes":
            t.loc[3, "label"] = "benign"
        elif kind == "no_positive":
            t["label"] = t["label"].replace("cancer", "tumour")
        elif kind == "test_label_unknown":
            t.loc[13, "split"], t.loc[13, "label"] = "test", "benign"
        return t
    return f


@pytest.mark.parametrize("kind, expected", [
    ("missing_column", "missing column(s) ['size']"),
    ("unknown_column", "unknown column(s) ['patiant']"),
    ("bad_sha", "line 5: sha256 must be 64 hex digits"),
    ("short_sha", "line 5: sha256 must be 64 hex digits"),
    ("bad_size", "line 5: size must be a whole number"),
    ("unknown_split", "line 5: split must be one of"),
    ("duplicate_path", "line 5: the same path as"),
    ("label_missing", "line 5: empty label"),
    ("unlabeled_with_label", "line 15: an unlabeled image with a label"),
    ("empty_path", "line 5: empty path"),
    ("s3_uri", "line 5: 's3://' URIs are not read"),
    ("three_classes", "exactly 2 labels"),
    ("no_positive", "positive class 'cancer'"),
    ("test_label_unknown", "line 15: test label is not one of the labelled classes"),
])
def test_manifest_errors_name_the_row(archive_dir, kind, expected):
    root, table = archive_dir
    write_csv(root, _mutate(kind)(table))
    with pytest.raises(DataError) as err:
        archive.build_archive_manifest(root, "cancer", 0.25, 0)
    assert expected in str(err.value), str(err.value)


def test_parquet_errors_name_the_row(archive_dir):
    root, table = archive_dir
    (root / "manifest.csv").unlink()
    _mutate("bad_sha")(table).to_parquet(root / "manifest.parquet", index=False)
    with pytest.raises(DataError, match=r"manifest.parquet row 4: sha256"):
        archive.build_archive_manifest(root, "cancer", 0.25, 0)


def test_missing_or_ambiguous_manifest_and_patients_csv_are_clear(archive_dir):
    root, table = archive_dir
    table.to_parquet(root / "manifest.parquet", index=False)
    with pytest.raises(DataError, match="keep one"):
        archive.build_archive_manifest(root, "cancer", 0.25, 0)
    (root / "manifest.parquet").unlink()
    (root / "patients.csv").write_text("path,patient\n")
    with pytest.raises(DataError, match="manifest's `patient` column"):
        archive.build_archive_manifest(root, "cancer", 0.25, 0)
    (root / "patients.csv").unlink()
    (root / "manifest.csv").unlink()
    with pytest.raises(DataError, match="no archive manifest"):
        archive.build_archive_manifest(root, "cancer", 0.25, 0)


def test_given_test_split_and_patients_are_kept(archive_dir):
    root, table = archive_dir
    t = table.copy()
    t.loc[[0, 6], "split"] = "test"
    t["patient"] = ["p1"] * 3 + [""] * (len(t) - 3)
    write_csv(root, t)
    df, info = archive.build_archive_manifest(root, "cancer", 0.25, 0)
    assert info["test_source"] == "folder" and (df["split"] == "test").sum() == 2
    assert info["n_patients"] == 1


# --------------------------------------------------------------------------- qc: verification
def test_qc_quarantines_hash_mismatch_missing_and_non_image(archive_dir):
    root, table = archive_dir
    t = table.copy()
    changed, gone, text = Path(t.loc[12, "path"]), Path(t.loc[13, "path"]), Path(t.loc[14, "path"])
    changed.write_bytes(changed.read_bytes() + b"\0")       # changed after listing
    gone.unlink()                                            # deleted after listing
    text.write_bytes(b"not an image at all\n")               # listed with its real hash
    t.loc[14, "sha256"], t.loc[14, "size"] = sha(text), text.stat().st_size
    write_csv(root, t)
    df, info = archive.build_archive_manifest(root, "cancer", 0.25, 0)
    cache = DecodeCache.load(root / "cache.parquet", max_pixels=QC["max_pixels"],
                             convert_modes=QC["convert_modes"], verify=True)
    report = run_qc(df, **QC, decode_cache=cache, test_source=info["test_source"])
    reasons = dict(zip(report.quarantine["path"], report.quarantine["reason"]))
    assert reasons == {changed.as_posix(): "hash_mismatch", gone.as_posix(): "missing_file",
                       text.as_posix(): "decode_error"}
    assert len(report.clean) == 13 and report.clean["width"].notna().all()
    assert set(report.clean["width"]) == {40} and set(report.clean["format"]) == {"PNG"}
    assert cache.n_failed_verify == 2


# --------------------------------------------------------------------------- qc: decode cache
def _qc_outputs(report) -> tuple[bytes, bytes]:
    import io

    buf = io.BytesIO()
    pq.write_table(__import__("pyarrow").Table.from_pandas(report.clean, preserve_index=False), buf)
    return buf.getvalue(), report.quarantine.to_csv(index=False).encode()


def test_decode_cache_decodes_only_new_images_and_matches_a_cold_run(tmp_path):
    lay = make_layout(tmp_path / "raw", n_labeled={"cancer": 8, "normal": 8}, n_unlabeled=6,
                      n_test={"cancer": 2, "normal": 2})
    write_png(lay["root"] / "unlabeled" / "named.jpg", seed=77)  # note depends on extension
    cache_path = tmp_path / "cache.parquet"
    kw = dict(max_pixels=QC["max_pixels"], convert_modes=QC["convert_modes"])

    def qc(cache_file):
        df, info = build_manifest(lay["root"], "cancer", 0.25, 0)
        cache = DecodeCache.load(cache_file, **kw)
        report = run_qc(df, **QC, decode_cache=cache, test_source=info["test_source"])
        cache.save(cache_file)
        return report, cache

    first, c1 = qc(cache_path)
    assert (c1.n_decoded, c1.n_cached) == (27, 0)
    for i in range(3):
        write_png(lay["root"] / "unlabeled" / f"new_{i}.png", seed=900 + i)
    (lay["root"] / "unlabeled" / "u_000.png").unlink()
    warm, c2 = qc(cache_path)
    assert (c2.n_decoded, c2.n_cached) == (3, 26)
    cold, c3 = qc(tmp_path / "cold.parquet")
    assert c3.n_decoded == 29
    assert _qc_outputs(warm) == _qc_outputs(cold)
    assert cache_path.read_bytes() == (tmp_path / "cold.parquet").read_bytes()
    assert "format PNG named .jpg" in " ".join(warm.clean["qc_note"].dropna())
    # no cache at all: the same report as with one
    df, info = build_manifest(lay["root"], "cancer", 0.25, 0)
    assert _qc_outputs(run_qc(df, **QC, test_source=info["test_source"])) == _qc_outputs(cold)
    # other decode params: the cache is not used
    other = DecodeCache.load(cache_path, max_pixels=10**6, convert_modes=True)
    assert other.entries == {}


# --------------------------------------------------------------------------- partitioned store
FP = {"fingerprint": "f" * 16, "backbone": "resnet18"}


def _rows(n, start=0):
    ids = [hashlib.sha256(f"img{i}".encode()).hexdigest() for i in range(start, start + n)]
    split = [("labeled", "unlabeled", "test")[i % 3] for i in range(start, start + n)]
    label = [None if s == "unlabeled" else ("cancer" if i % 2 else "normal")
             for i, s in zip(range(start, start + n), split)]
    return pd.DataFrame({"id": ids, "path": ids, "split": split, "label": label})


class Computer:
    """A deterministic stand-in embedder: the vector is a function of the path; counts calls."""

    def __init__(self):
        self.n = 0

    def __call__(self, paths):
        self.n += len(paths)
        for start in range(0, len(paths), 7):
            chunk = paths[start:start + 7]
            yield np.array([np.frombuffer(hashlib.sha512(p.encode()).digest() * 8, np.uint8)[:512]
                            .astype(np.float32) / 255 for p in chunk], np.float32).reshape(-1, 512)


def _parts(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): p.stat().st_ino for p in path.rglob("part-*.parquet")}


def test_partitioned_store_round_trip_equals_the_one_file_store(tmp_path):
    rows = _rows(200)
    write_embeddings(rows, tmp_path / "one.parquet", fingerprint=FP, compute=Computer())
    n_new, n_reused = write_partitioned(rows, tmp_path / "dir.parquet", fingerprint=FP,
                                        compute=Computer())
    assert (n_new, n_reused) == (200, 0)
    a, b = read_embeddings(tmp_path / "one.parquet"), read_embeddings(tmp_path / "dir.parquet")
    pd.testing.assert_frame_equal(a[0], b[0])
    assert np.array_equal(a[1], b[1]) and a[2] == b[2] == FP
    assert read_fingerprint(tmp_path / "dir.parquet") == FP
    reuse = load_reusable(tmp_path / "dir.parquet", FP["fingerprint"])
    assert len(reuse) == 200 and np.array_equal(reuse[rows["id"][5]], a[1][5])
    part = next((tmp_path / "dir.parquet").rglob("part-*.parquet"))
    assert part.parent.name.startswith("prefix=") and part.parent.parent.name.startswith("split=")
    assert pq.read_schema(part).names == ["id", "split", "label", "vector"]
    assert pq.read_schema(part).metadata[b"embedding_fingerprint"]


def test_adding_images_rewrites_only_the_touched_partitions(tmp_path):
    store = tmp_path / "dir.parquet"
    rows = _rows(600)
    write_partitioned(rows, store, fingerprint=FP, compute=Computer())
    before = _parts(store)
    more = pd.concat([rows, _rows(4, start=600)], ignore_index=True)
    comp = Computer()
    n_new, n_reused = write_partitioned(more, store, fingerprint=FP, compute=comp)
    assert (n_new, n_reused, comp.n) == (4, 600, 4)
    after = _parts(store)
    assert set(before) <= set(after)                      # every old part kept, untouched
    assert all(after[p] == ino for p, ino in before.items())
    assert len(set(after) - set(before)) <= 4             # one new part per touched partition
    one = tmp_path / "one.parquet"
    write_embeddings(more, one, fingerprint=FP, compute=Computer())
    a, b = read_embeddings(one), read_embeddings(store)
    pd.testing.assert_frame_equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    # an image removed and a label changed: only their partitions' parts change, nothing computed
    changed = more.drop(index=[0]).reset_index(drop=True)
    changed.loc[0, "label"] = "cancer" if changed.loc[0, "label"] == "normal" else "normal"
    comp = Computer()
    write_partitioned(changed, store, fingerprint=FP, compute=comp)
    assert comp.n == 0
    final = _parts(store)
    assert len(set(after) - set(final)) <= 2
    a = read_embeddings(store)
    assert list(a[0]["id"]) == list(changed["id"]) and list(a[0]["label"].fillna("-")) == \
        list(changed["label"].fillna("-"))


def test_a_killed_write_leaves_a_valid_store_and_is_cleaned_up(tmp_path):
    store = tmp_path / "dir.parquet"
    rows = _rows(90)
    write_partitioned(rows, store, fingerprint=FP, compute=Computer())
    expected = read_embeddings(store)

    def dies(paths):
        yield from Computer()(paths[:1])
        raise KeyboardInterrupt  # killed mid-run, after some new parts were written

    with pytest.raises(KeyboardInterrupt):
        write_partitioned(pd.concat([rows, _rows(30, start=90)], ignore_index=True), store,
                          fingerprint=FP, compute=dies)
    got = read_embeddings(store)  # the previous index and its parts: the previous store
    pd.testing.assert_frame_equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    (store / "split=test" / "prefix=00").mkdir(parents=True, exist_ok=True)
    (store / "split=test" / "prefix=00" / ".part-x.parquet.123.tmp").write_bytes(b"partial")
    write_partitioned(rows, store, fingerprint=FP, compute=Computer())
    referenced = set(pq.read_table(store / INDEX).column("part").to_pylist())
    assert set(_parts(store)) == referenced
    assert not list(store.rglob("*.tmp"))


def test_another_fingerprint_rebuilds_every_partition(tmp_path):
    store = tmp_path / "dir.parquet"
    rows = _rows(30)
    write_partitioned(rows, store, fingerprint=FP, compute=Computer())
    comp = Computer()
    other = {**FP, "fingerprint": "g" * 16}
    write_partitioned(rows, store, fingerprint=other, compute=comp)
    assert comp.n == 30 and read_fingerprint(store) == other


# --------------------------------------------------------------------------- archive build
def test_build_hashes_once_then_stats_only(tmp_path):
    lay = make_layout(tmp_path / "store", n_labeled={"cancer": 3, "normal": 3}, n_unlabeled=3)
    (lay["root"] / "unlabeled" / ".hidden.png").write_bytes(b"x")
    out = tmp_path / "archive" / "manifest.parquet"
    out.parent.mkdir()
    res = subprocess.run([sys.executable, "-m", "triage.archive", "build", str(lay["root"]),
                          "--out", str(out), "--workers", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "9 files (9 hashed, 0 unchanged reused" in res.stdout
    assert "store" not in res.stdout.replace(str(out), "")  # no image path in the log
    table = pd.read_parquet(out)
    assert list(table.columns) == ["path", "sha256", "size", "split", "label", "mtime_ns"]
    assert all(table["sha256"] == [sha(p) for p in table["path"]])
    assert archive.build(lay["root"], out)["n_hashed"] == 0
    first = lay["unlabeled"][0]
    os.utime(first, ns=(1, 1))                        # touched: read again
    write_png(lay["root"] / "unlabeled" / "new.png", seed=5)
    stats = archive.build(lay["root"], out)
    assert (stats["n_hashed"], stats["n_reused"], stats["n_files"]) == (2, 8, 10)
    # relative paths (to the manifest's folder = data.root) resolve to the same files
    rel = archive.build(lay["root"], tmp_path / "archive" / "rel.csv", relative=True)
    assert rel["n_files"] == 10
    t = pd.read_csv(tmp_path / "archive" / "rel.csv")
    assert all(not Path(p).is_absolute() for p in t["path"])
    assert {archive.resolve_path(p, out.parent) for p in t["path"]} == \
        set(pd.read_parquet(out)["path"])


def test_build_refuses_loose_labelled_files(tmp_path):
    make_layout(tmp_path / "store", n_unlabeled=1)
    write_png(tmp_path / "store" / "labeled" / "loose.png")
    with pytest.raises(DataError, match="no class folder"):
        archive.build(tmp_path / "store", tmp_path / "m.parquet")


# --------------------------------------------------------------------------- real dvc repro
def _images(root: Path, start: int, n: int) -> None:
    for i in range(start, start + n):
        if i < 24:
            blob_image(root / "labeled" / ("cancer" if i % 2 else "normal") / f"{i:04d}.png",
                       i % 2 == 1, seed=i)
        else:
            blob_image(root / "unlabeled" / f"{i:04d}.png", i % 3 == 0, seed=i)


def test_dvc_repro_archive_mode_through_embed_is_incremental(tmp_path):
    env = e2e_env(tmp_path)
    repo = make_repo(tmp_path, env)
    store = tmp_path / "store"                     # outside the repo: DVC never hashes it
    _images(store, 0, 40)
    (repo / "data" / "archive").mkdir(parents=True)
    manifest = repo / "data" / "archive" / "manifest.parquet"
    archive.build(store, manifest)
    set_params(repo, {"data.source": "archive", "data.root": "data/archive",
                      "embed.store": "partitioned", "embed.num_workers": 0, "qc.workers": 1})
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "archive"], repo, env)
    out = run(["dvc", "repro", "embed"], repo, env).stdout
    assert "qc: 40 images decoded, 0 from the decode cache, 0 failed" in out
    assert "embed: 40 images (40 computed, 0 reused)" in out
    lock = (repo / "dvc.lock").read_text()
    assert "data/archive" in lock and str(store) not in lock  # the manifest is the input
    parts = _parts(repo / "data/features/embeddings.parquet")
    _images(store, 40, 2)                          # +2 images: the archive re-listed
    assert archive.build(store, manifest)["n_hashed"] == 2
    out = run(["dvc", "repro", "embed"], repo, env).stdout
    assert "Running stage 'prepare'" in out and "Running stage 'qc'" in out
    assert "qc: 2 images decoded, 40 from the decode cache" in out
    assert "embed: 42 images (2 computed, 40 reused)" in out
    after = _parts(repo / "data/features/embeddings.parquet")
    assert all(after.get(p) == ino for p, ino in parts.items())  # old parts untouched
    assert len(set(after) - set(parts)) <= 2
    rows, X, _ = read_embeddings(repo / "data/features/embeddings.parquet")
    clean = pd.read_parquet(repo / "data/qc/manifest_clean.parquet")
    assert list(rows["id"]) == list(clean["id"]) and X.shape[0] == 42
    assert run(["dvc", "status", "embed"], repo, env).stdout.strip().endswith("up to date.")
