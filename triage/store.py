"""The embedding store: Parquet image vectors and the fingerprint of their maker.

Two layouts at the same path (``embed.store``), read alike by :func:`read_embeddings`:
``file`` (default): one Parquet file; ``partitioned``: a directory of the same Parquet
files split by split and sha256 prefix (see :func:`write_partitioned`), so that adding 1 %
of the images writes about 1 % of the bytes instead of the whole store.

Schema: id, split, label, vector (float32 x the backbone's feature dimension: 512 for the
default ResNet18, 2048 for a ResNet50, 384 for a DINOv2 ViT-S...); the schema metadata
holds the embedding fingerprint (``embedding_fingerprint``, JSON). Readers take the width
from the data (the vector column's fixed size), never from a constant. This module does
not import torch: the stages that only read vectors (cluster, pseudo_label, train,
evaluate, ...) start fast and, in DVC, do not re-run when the embedder's code
(triage/embed.py, triage/backbone.py) changes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import PipelineError
from .io import atomic_path, log

FINGERPRINT_KEY = b"embedding_fingerprint"

# What a fingerprint record without the fields below means. The default backbone (torchvision
# resnet18, ImageNet mean/std, bilinear, uncropped) was the only one before backbones became
# configurable, and its record is still written without these fields: its ``backbone`` and
# ``torchvision`` version already fix the architecture and its 512-d output and its
# ``preprocess`` text says the rest, and leaving them out keeps that embedding's fingerprint
# (and bytes), so the models trained on it keep serving. Every other backbone's record
# carries all of them (triage.embed.fingerprint).
IMPLIED_BY_DEFAULT_RECORD = {
    "source": "torchvision",
    "feature_dim": 512,
    "input_size": 224,
    "interpolation": "bilinear",
    "crop_pct": None,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# The width of the hand-made 512-d stores some tests build (the default backbone's); the
# pipeline itself reads the width of each store from its data or its fingerprint.
EMBED_DIM = IMPLIED_BY_DEFAULT_RECORD["feature_dim"]


def embedding_schema(dim: int) -> pa.Schema:
    """The store's schema for ``dim``-wide vectors."""
    return pa.schema([
        ("id", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("vector", pa.list_(pa.float32(), int(dim))),
    ])


EMBEDDING_SCHEMA = embedding_schema(EMBED_DIM)  # the default backbone's (tests build with it)


def describe(fingerprint: dict) -> dict:
    """The fingerprint with every field spelled out: a record of the default backbone
    (which leaves the fields of :data:`IMPLIED_BY_DEFAULT_RECORD` out) gets their values."""
    if not fingerprint or "source" in fingerprint:
        return dict(fingerprint)
    return {**IMPLIED_BY_DEFAULT_RECORD, **fingerprint}


def feature_dim(fingerprint: dict) -> int:
    """The vector width a fingerprint record says (its backbone's feature dimension)."""
    full = describe(fingerprint)
    if "feature_dim" not in full:
        raise PipelineError("embedding fingerprint without a feature dimension: re-run "
                            "`dvc repro embed`")
    return int(full["feature_dim"])


def vector_width(schema: pa.Schema, path: str | Path) -> int:
    """The fixed width of the ``vector`` column (the data's own feature dimension)."""
    try:
        field = schema.field("vector")
    except KeyError:
        raise PipelineError(f"{path}: no vector column (not an embedding store)") from None
    if not pa.types.is_fixed_size_list(field.type):
        raise PipelineError(f"{path}: the vector column is {field.type}, not a fixed-size list "
                            f"of float32 (re-run `dvc repro embed`)")
    return int(field.type.list_size)


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(rows without vectors, (n, feature dim) float32 matrix, fingerprint dict); a
    partitioned store (a directory) gives the same as the one file with the same rows."""
    path = Path(path)
    if path.is_dir():
        return read_partitioned(path)
    if not path.is_file():
        raise PipelineError(f"embeddings not found: {path} (run `dvc repro embed`)")
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    fingerprint = json.loads(meta.get(FINGERPRINT_KEY, b"{}"))
    dim = vector_width(table.schema, path)
    if fingerprint and feature_dim(fingerprint) != dim:
        raise PipelineError(f"{path}: vectors are {dim}-d but their fingerprint says "
                            f"{feature_dim(fingerprint)}-d (re-run `dvc repro embed`)")
    vec = table.column("vector").combine_chunks()
    X = vec.values.to_numpy().reshape(len(table), dim).astype(np.float32, copy=False)
    rows = table.drop(["vector"]).to_pandas()
    return rows, X, fingerprint


def read_fingerprint(path: str | Path) -> dict:
    """The fingerprint of a store without reading its vectors ({} when absent)."""
    path = Path(path)
    meta = pq.read_schema(path / INDEX if path.is_dir() else path).metadata or {}
    return json.loads(meta.get(FINGERPRINT_KEY, b"{}"))


def load_reusable(path: str | Path, fingerprint_hash: str) -> dict[str, np.ndarray]:
    """Vectors of a previous run keyed by image id, if made with the same fingerprint
    (``fingerprint_hash``: the ``fingerprint`` field of the fingerprint record).

    Anything unreadable (missing, truncated, other fingerprint) means "reuse nothing":
    the store is an optimisation, never a source of truth.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        rows, X, stored = read_embeddings(path)
    except Exception as exc:  # noqa: BLE001 - a corrupt cache must not stop the stage
        log.warning("embed: ignoring unreadable previous embeddings (%s)", type(exc).__name__)
        return {}
    if stored.get("fingerprint") != fingerprint_hash:
        log.info("embed: embedding fingerprint changed: recomputing every image")
        return {}
    return dict(zip(rows["id"], X))


def write_embeddings(rows: pd.DataFrame, path: str | Path, *, fingerprint: dict,
                     compute: Callable[[list[str]], Iterator[np.ndarray]],
                     reuse: dict[str, np.ndarray] | None = None,
                     rows_per_group: int = 1024) -> tuple[int, int]:
    """Stream the vectors of ``rows`` (id, path, split, label) into Parquet, atomically.

    Vectors found in ``reuse`` (by image id) are copied; the others come from
    ``compute(paths)``, which yields (batch, feature dim) arrays in input order (an
    Embedder's ``iter_batches``); the width is the fingerprint's (:func:`feature_dim`) and
    a vector of another width is an error. Row groups have a fixed size and are flushed as
    they fill, so memory does not grow with the stock and the bytes do not depend on which
    vectors were reused. Returns (n_computed, n_reused).
    """
    reuse = reuse or {}
    dim = feature_dim(fingerprint)
    schema = embedding_schema(dim).with_metadata(
        {FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True).encode()})
    todo = ~rows["id"].isin(reuse.keys()).to_numpy()
    computed = (v for batch in compute(rows.loc[todo, "path"].tolist()) for v in batch)
    n_new = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, len(rows), rows_per_group):
                part = rows.iloc[start:start + rows_per_group]
                block = np.empty((len(part), dim), np.float32)
                for i, (rid, new) in enumerate(zip(part["id"], todo[start:start + len(part)])):
                    vector = next(computed) if new else reuse[rid]
                    if np.shape(vector) != (dim,):
                        raise PipelineError(f"embed: a vector of shape {np.shape(vector)} where "
                                            f"the fingerprint says {dim}-d")
                    block[i] = vector
                    n_new += bool(new)
                flat = pa.array(block.reshape(-1), type=pa.float32())
                writer.write_table(pa.Table.from_arrays([
                    pa.array(part["id"], pa.string(), from_pandas=True),
                    pa.array(part["split"], pa.string(), from_pandas=True),
                    pa.array(part["label"], pa.string(), from_pandas=True),  # NaN → null
                    pa.FixedSizeListArray.from_arrays(flat, dim),
                ], schema=schema))
        if next(computed, None) is not None or n_new != int(todo.sum()):
            raise PipelineError("embed: computed vectors do not match the images to embed")
    return n_new, len(rows) - n_new


# --------------------------------------------------------------------------- partitioned layout
INDEX = "_index.parquet"  # the commit record: rows in store order -> their part file
PREFIX_DIGITS = 2         # 256 partitions per split: ~40k rows each at 10M images
MAX_PARTS = 8             # parts per partition before it is compacted into one
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("label", pa.string()),
                          ("part", pa.string())])


def _key(ids, splits, labels) -> list[str]:
    # one string per (id, split, label): a label change (an annotation) is another row
    return [f"{i}\0{s}\0{lbl if isinstance(lbl, str) else ''}\0{int(isinstance(lbl, str))}"
            for i, s, lbl in zip(ids, splits, labels)]


def partition_of(image_id: str, split: str) -> str:
    """The partition folder of an image: ``split=<split>/prefix=<first hex digits of id>``."""
    return f"split={split}/prefix={image_id[:PREFIX_DIGITS]}"


def _read_index(path: Path, fingerprint_hash: str | None = None) -> pd.DataFrame | None:
    """The store's index (None when absent, unreadable or, given ``fingerprint_hash``,
    made with another fingerprint: then no part can be kept)."""
    try:
        table = pq.read_table(path / INDEX)
    except (OSError, pa.ArrowInvalid):
        return None
    stored = json.loads((table.schema.metadata or {}).get(FINGERPRINT_KEY, b"{}"))
    if fingerprint_hash is not None and stored.get("fingerprint") != fingerprint_hash:
        return None
    return table.to_pandas()


def read_partitioned(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """:func:`read_embeddings` of a directory store: the index's rows, in its order, each
    with the vector of its (id, split, label) from its part file."""
    path = Path(path)
    if not (path / INDEX).is_file():
        raise PipelineError(f"{path}: a directory without {INDEX} (not an embedding store, or "
                            f"one whose first write was killed: run `dvc repro embed`)")
    index_table = pq.read_table(path / INDEX)
    fingerprint = json.loads((index_table.schema.metadata or {}).get(FINGERPRINT_KEY, b"{}"))
    index = index_table.to_pandas()
    dim = feature_dim(fingerprint) if fingerprint else None
    keys, blocks = [], []
    for part in sorted(set(index["part"])):
        table = pq.read_table(path / part)
        width = vector_width(table.schema, path / part)
        if dim is not None and width != dim:
            raise PipelineError(f"{path / part}: vectors are {width}-d but the store's "
                                f"fingerprint says {dim}-d (re-run `dvc repro embed`)")
        dim = width
        cols = table.select(["id", "split", "label"]).to_pydict()
        keys += _key(cols["id"], cols["split"], cols["label"])
        vec = table.column("vector").combine_chunks()
        blocks.append(vec.values.to_numpy().reshape(len(table), width))
    position = {k: i for i, k in enumerate(keys)}
    want = _key(index["id"], index["split"], index["label"])
    missing = [k for k in want if k not in position]
    if missing:
        raise PipelineError(f"{path}: {len(missing)} rows of {INDEX} are in no part file "
                            f"(a damaged store: run `dvc repro embed`)")
    all_vectors = (np.concatenate(blocks) if blocks
                   else np.empty((0, dim or 0), np.float32)).astype(np.float32, copy=False)
    X = all_vectors[[position[k] for k in want]] if want else all_vectors[:0]
    return index.drop(columns=["part"]), X, fingerprint


def _part_vectors(path: Path, parts, ids: set[str]) -> dict[str, np.ndarray]:
    """Vectors of the images ``ids`` found in the part files ``parts`` of a store (by id:
    a vector depends on the bytes, not on the row's split or label)."""
    out = {}
    for part in sorted(parts):
        try:
            table = pq.read_table(path / part)
            part_ids = table.column("id").to_pylist()
            width = vector_width(table.schema, path / part)
            X = table.column("vector").combine_chunks().values.to_numpy().reshape(len(table), width)
        except Exception as exc:  # noqa: BLE001 - a damaged part: its rows are recomputed
            log.warning("embed: ignoring an unreadable part of the store (%s)", type(exc).__name__)
            continue
        for i, v in zip(part_ids, X):
            if i in ids:
                out[i] = v
    return out


def write_partitioned(rows: pd.DataFrame, path: str | Path, *, fingerprint: dict,
                      compute: Callable[[list[str]], Iterator[np.ndarray]],
                      reuse: dict[str, np.ndarray] | None = None,
                      rows_per_group: int = 1024) -> tuple[int, int]:
    """The directory store of ``rows`` (id, path, split, label), rewriting only what changed.

    Layout: ``<path>/split=<split>/prefix=<id[:2]>/part-<hash>.parquet`` files (the one-file
    store's schema and fingerprint metadata; rows sorted by id) and ``<path>/_index.parquet``
    (id, split, label, part: ``rows`` in their order). A part is immutable and named by its
    content; a run keeps every part of the previous index whose rows are all still wanted
    (same fingerprint) and writes, per partition with rows not in a kept part, one new part
    with them: vectors from a dropped part (a row whose label changed, a removed image's
    part-mates), from ``reuse`` (a one-file store being converted) or ``compute`` (new
    images, in partition order; canonical kernels make a vector independent of its
    batch-mates). A partition with more than MAX_PARTS parts is compacted into one.

    Writes are atomic: parts first (temp file + rename), then the index (the commit), then
    the parts no index names are deleted; a run killed at any point leaves the previous
    index and its parts, a valid store. Returns (n_computed, n_reused)."""
    path = Path(path)
    reuse = reuse or {}
    dim = feature_dim(fingerprint)
    fp_hash = fingerprint.get("fingerprint", "")
    meta = {FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True).encode()}
    schema = embedding_schema(dim).with_metadata(meta)
    if path.is_file():  # the one-file layout before: its vectors came in as ``reuse``
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    old = _read_index(path, fp_hash)
    keys = _key(rows["id"], rows["split"], rows["label"])
    wanted: dict[str, tuple[str, str, object, str]] = {}  # key -> (id, split, label, path)
    for k, rid, split, label, p in zip(keys, rows["id"], rows["split"], rows["label"], rows["path"]):
        wanted.setdefault(k, (rid, split, label if isinstance(label, str) else None, p))
    by_partition: dict[str, list[str]] = defaultdict(list)
    for k, (rid, split, _, _) in wanted.items():
        by_partition[partition_of(rid, split)].append(k)
    # which parts of the previous index stay: all their rows still wanted
    part_of: dict[str, str] = {}
    old_parts: dict[str, set[str]] = defaultdict(set)
    if old is not None:
        for k, part in zip(_key(old["id"], old["split"], old["label"]), old["part"]):
            old_parts[part].add(k)
    kept = {part for part, ks in old_parts.items()
            if all(k in wanted for k in ks) and (path / part).is_file()}
    kept_in: dict[str, list[str]] = defaultdict(list)
    for part in sorted(kept):
        kept_in[part.rsplit("/", 1)[0]].append(part)
        for k in old_parts[part]:
            part_of[k] = part
    plan: dict[str, list[str]] = {}  # partition -> keys of its new part
    for partition, ks in by_partition.items():
        todo = [k for k in ks if k not in part_of]
        if todo and len(kept_in[partition]) + 1 > MAX_PARTS:  # compact the partition
            for part in kept_in.pop(partition):
                kept.discard(part)
            todo = list(ks)
        if todo:
            plan[partition] = sorted(todo)
    # vectors of planned rows that exist: in dropped/compacted parts of the old store, or reuse
    need = {wanted[k][0] for ks in plan.values() for k in ks}
    salvage = _part_vectors(path, [p for p in old_parts if p not in kept and (path / p).is_file()],
                            need)
    for i in need - salvage.keys():
        if i in reuse:
            salvage[i] = reuse[i]
    compute_keys = [k for partition in sorted(plan) for k in plan[partition]
                    if wanted[k][0] not in salvage]
    computed = (v for batch in compute([wanted[k][3] for k in compute_keys]) for v in batch)
    n_new = 0
    for partition in sorted(plan):
        ks = plan[partition]
        block = np.empty((len(ks), dim), np.float32)
        for i, k in enumerate(ks):
            if wanted[k][0] in salvage:
                vector = salvage[wanted[k][0]]
            else:
                vector = next(computed, None)
                if vector is None:
                    raise PipelineError("embed: computed vectors do not match the images to embed")
                n_new += 1
            if np.shape(vector) != (dim,):
                raise PipelineError(f"embed: a vector of shape {np.shape(vector)} where "
                                    f"the fingerprint says {dim}-d")
            block[i] = vector
        name = hashlib.sha256(("\n".join([fp_hash, *ks])).encode()).hexdigest()[:16]
        part = f"{partition}/part-{name}.parquet"
        ids, splits, labels = zip(*[wanted[k][:3] for k in ks])
        with atomic_path(path / part) as tmp:
            with pq.ParquetWriter(tmp, schema) as writer:
                for start in range(0, len(ks), rows_per_group):
                    end = start + rows_per_group
                    flat = pa.array(block[start:end].reshape(-1), type=pa.float32())
                    writer.write_table(pa.Table.from_arrays([
                        pa.array(ids[start:end], pa.string()),
                        pa.array(splits[start:end], pa.string()),
                        pa.array(labels[start:end], pa.string()),
                        pa.FixedSizeListArray.from_arrays(flat, dim),
                    ], schema=schema))
        for k in ks:
            part_of[k] = part
    if next(computed, None) is not None or n_new != len(compute_keys):
        raise PipelineError("embed: computed vectors do not match the images to embed")
    index = pa.Table.from_arrays([
        pa.array(rows["id"], pa.string(), from_pandas=True),
        pa.array(rows["split"], pa.string(), from_pandas=True),
        pa.array(rows["label"], pa.string(), from_pandas=True),
        pa.array([part_of[k] for k in keys], pa.string()),
    ], schema=INDEX_SCHEMA.with_metadata({**meta, b"store_layout": b"partitioned/1"}))
    with atomic_path(path / INDEX) as tmp:
        pq.write_table(index, tmp)
    _remove_unreferenced(path, set(part_of.values()))
    return n_new, len(rows) - n_new


def _remove_unreferenced(path: Path, referenced: set[str]) -> None:
    """After the commit: part files (and temp files of a killed run) no index row names."""
    for f in sorted(path.glob("split=*/prefix=*/*")):
        rel = f.relative_to(path).as_posix()
        if rel not in referenced:
            f.unlink(missing_ok=True)
    for d in sorted(path.glob("split=*/prefix=*")) + sorted(path.glob("split=*")):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def remove_store(path: str | Path) -> None:
    """Delete a store of either layout (switching ``embed.store``)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
