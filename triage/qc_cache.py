"""Incremental QC: per-image decode results kept by content, so a re-run decodes new images only.

The full decode (triage.qc.inspect_image: pixels, greyscale stats, pHash, histogram, header)
is QC's dominant cost and depends only on the file's bytes, its extension (the
format-vs-extension note) and two params (``qc.max_pixels``, ``qc.convert_modes``). This
cache keeps the successful results of the last run keyed by (sha256, extension) in
``data/qc/image_cache.parquet`` (a ``persist: true`` output: DVC leaves it in place), so
a manifest with 1 % new images decodes 1 %; a change of those params, of Pillow or of numpy
empties it. Failures are never cached (their text may name the path), they are decoded
again. The file always holds exactly the current run's successful results, sorted, so its
bytes, like every other qc output, are those of a cold run on the same manifest.

``verify`` (archive mode, whose ids are the manifest's claims): before decoding a new
content its bytes are read and checked against the manifest's sha256 and size; a mismatch
is ``hash_mismatch``, a missing file ``missing_file``, an unreadable one ``unreadable``
(quarantine reasons, never a traceback). A content already in the cache was verified when
it was decoded and is trusted by its hash (the archive's files are immutable; re-list them
with ``python -m triage.archive build`` when they are not).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .io import atomic_path, log

# prepare's manifest metadata in archive mode (triage.archive): the ids are the manifest's
# claims, not hashes prepare computed, so qc checks the bytes it decodes against them
ID_SOURCE_KEY, ID_SOURCE = "id_source", "archive_manifest"
CACHE_VERSION = "1"
META_KEY = b"qc_decode_cache"
COLUMNS = ("mean", "std", "note", "phash", "hist", "mode", "width", "height", "format")
SCHEMA = pa.schema([
    ("id", pa.string()), ("ext", pa.string()),
    ("mean", pa.float64()), ("std", pa.float64()), ("note", pa.string()),
    ("phash", pa.string()), ("hist", pa.list_(pa.float64())), ("mode", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()), ("format", pa.string()),
])


def cache_key(max_pixels: int, convert_modes: bool) -> dict:
    """What the cached results depend on besides the bytes and the extension."""
    import PIL

    return {"version": CACHE_VERSION, "max_pixels": int(max_pixels),
            "convert_modes": bool(convert_modes), "pillow": PIL.__version__,
            "numpy": np.__version__}


def _ext(path: str) -> str:
    return Path(path).suffix.lower()


def verify_file(path: str, sha256: str, size: int) -> str | None:
    """None when the file's bytes have this size and sha256, else ``reason: detail``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing_file: no file at the manifest's path"
    except OSError as exc:
        return f"unreadable: {exc.strerror or type(exc).__name__}"
    if st.st_size != size:
        return f"hash_mismatch: {st.st_size} bytes, the manifest says {size}"
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        return f"unreadable: {exc.strerror or type(exc).__name__}"
    if h.hexdigest() != sha256:
        return (f"hash_mismatch: sha256 {h.hexdigest()[:12]}… of the bytes, the manifest says "
                f"{sha256[:12]}… (the file changed: re-list the archive)")
    return None


def _verify_chunk(jobs: list[tuple[str, str, int]]) -> list[str | None]:
    return [verify_file(*j) for j in jobs]


class DecodeCache:
    """Callable for :func:`triage.qc.run_qc` (``decode_cache=``): results for the rows,
    cached ones looked up, the others verified (``verify``) and decoded by ``decode``."""

    def __init__(self, key: dict, entries: dict[tuple[str, str], dict] | None = None,
                 verify: bool = False, workers: int = 0):
        self.key, self.entries, self.verify = key, entries or {}, verify
        self.workers = workers or os.cpu_count() or 1
        self.current: dict[tuple[str, str], dict] = {}
        self.n_cached = self.n_decoded = self.n_failed_verify = 0

    @classmethod
    def load(cls, path: str | Path, *, max_pixels: int, convert_modes: bool,
             verify: bool = False, workers: int = 0) -> DecodeCache:
        """The cache at ``path`` if made with the same key; unreadable or other key: empty
        (the cache is an optimisation, never a source of truth)."""
        key = cache_key(max_pixels, convert_modes)
        path = Path(path)
        entries: dict = {}
        if path.is_file():
            try:
                table = pq.read_table(path)
                stored = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
                if stored == key:
                    entries = _entries(table)
                else:
                    log.info("qc: decode cache made with other settings: decoding every image")
            except Exception as exc:  # noqa: BLE001 - a corrupt cache must not stop the stage
                log.warning("qc: ignoring an unreadable decode cache (%s)", type(exc).__name__)
        return cls(key, entries, verify=verify, workers=workers)

    def __call__(self, rows: pd.DataFrame, decode: Callable[[list[str]], list[dict]]) -> list[dict]:
        keys = [(i, _ext(p)) for i, p in zip(rows["id"], rows["path"])]
        out: list[dict | None] = [None] * len(rows)
        todo = []
        for pos, k in enumerate(keys):
            hit = self.entries.get(k)
            if hit is not None:
                out[pos] = {"decode_error": None, **hit}
            else:
                todo.append(pos)
        self.n_cached = len(rows) - len(todo)
        paths = rows["path"].tolist()
        if self.verify and todo:
            ids, sizes = rows["id"].tolist(), rows["bytes"].tolist()
            jobs = [(paths[p], ids[p], int(sizes[p])) for p in todo]
            chunks = [jobs[i:i + 256] for i in range(0, len(jobs), 256)]
            with ThreadPoolExecutor(max_workers=self.workers) as pool:  # I/O + hashlib: no GIL
                verdicts = [v for part in pool.map(_verify_chunk, chunks) for v in part]
            keep = []
            for pos, verdict in zip(todo, verdicts):
                if verdict is None:
                    keep.append(pos)
                else:
                    out[pos] = {"decode_error": verdict}
            self.n_failed_verify = len(todo) - len(keep)
            todo = keep
        for pos, res in zip(todo, decode([paths[p] for p in todo])):
            out[pos] = res
        self.n_decoded = len(todo)
        for k, res in zip(keys, out):
            if res.get("decode_error") is None:
                self.current[k] = {c: res.get(c) for c in COLUMNS}
        return out

    def save(self, path: str | Path) -> None:
        """Write this run's successful results (exactly the current contents, sorted)."""
        keys = sorted(self.current)
        vals = [self.current[k] for k in keys]
        cols = {"id": [k[0] for k in keys], "ext": [k[1] for k in keys]}
        for c in COLUMNS:
            cols[c] = [None if v[c] is None else (list(v[c]) if c == "hist" else v[c])
                       for v in vals]
        table = pa.Table.from_pydict(cols, schema=SCHEMA).replace_schema_metadata(
            {META_KEY: json.dumps(self.key, sort_keys=True).encode()})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)


def _entries(table: pa.Table) -> dict[tuple[str, str], dict]:
    d = table.to_pydict()
    out = {}
    for i, k in enumerate(zip(d["id"], d["ext"])):
        entry = {c: d[c][i] for c in COLUMNS}
        if entry["hist"] is not None:  # inspect_image's type: a tuple of floats
            entry["hist"] = tuple(entry["hist"])
        out[k] = entry
    return out
