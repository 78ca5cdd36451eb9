"""The embedding store: one Parquet file of image vectors and the fingerprint of their maker.

Schema: id, split, label, vector (float32 x the backbone's feature dimension: 512 for the
default ResNet18, 2048 for a ResNet50, 384 for a DINOv2 ViT-S...); the schema metadata
holds the embedding fingerprint (``embedding_fingerprint``, JSON). Readers take the width
from the data (the vector column's fixed size), never from a constant. This module does
not import torch: the stages that only read vectors (cluster, pseudo_label, train,
evaluate, ...) start fast and, in DVC, do not re-run when the embedder's code
(triage/embed.py, triage/backbone.py) changes.
"""
from __future__ import annotations

import json
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
    """(rows without vectors, (n, feature dim) float32 matrix, fingerprint dict)."""
    path = Path(path)
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
    meta = pq.read_schema(Path(path)).metadata or {}
    return json.loads(meta.get(FINGERPRINT_KEY, b"{}"))


def load_reusable(path: str | Path, fingerprint_hash: str) -> dict[str, np.ndarray]:
    """Vectors of a previous run keyed by image id, if made with the same fingerprint
    (``fingerprint_hash``: the ``fingerprint`` field of the fingerprint record).

    Anything unreadable (missing, truncated, other fingerprint) means "reuse nothing":
    the store is an optimisation, never a source of truth.
    """
    path = Path(path)
    if not path.is_file():
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
