"""The embedding store: one Parquet file of image vectors and the fingerprint of their maker.

Schema: id, split, label, vector (float32 x EMBED_DIM); the schema metadata holds the
embedding fingerprint (``embedding_fingerprint``, JSON). This module does not import
torch: the stages that only read vectors (cluster, pseudo_label, train, evaluate, ...)
start fast and, in DVC, do not re-run when the embedder's code (triage/embed.py) changes.
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

EMBED_DIM = 512
FINGERPRINT_KEY = b"embedding_fingerprint"
EMBEDDING_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("label", pa.string()),
    ("vector", pa.list_(pa.float32(), EMBED_DIM)),
])


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(rows without vectors, (n, EMBED_DIM) float32 matrix, fingerprint dict)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"embeddings not found: {path} (run `dvc repro embed`)")
    table = pq.read_table(path)
    vec = table.column("vector").combine_chunks()
    X = vec.values.to_numpy().reshape(len(table), EMBED_DIM).astype(np.float32, copy=False)
    rows = table.drop(["vector"]).to_pandas()
    meta = table.schema.metadata or {}
    return rows, X, json.loads(meta.get(FINGERPRINT_KEY, b"{}"))


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
    ``compute(paths)``, which yields (batch, EMBED_DIM) arrays in input order (an
    Embedder's ``iter_batches``). Row groups have a fixed size and are flushed as they
    fill, so memory does not grow with the stock and the bytes do not depend on which
    vectors were reused. Returns (n_computed, n_reused).
    """
    reuse = reuse or {}
    schema = EMBEDDING_SCHEMA.with_metadata(
        {FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True).encode()})
    todo = ~rows["id"].isin(reuse.keys()).to_numpy()
    computed = (v for batch in compute(rows.loc[todo, "path"].tolist()) for v in batch)
    n_new = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, len(rows), rows_per_group):
                part = rows.iloc[start:start + rows_per_group]
                block = np.empty((len(part), EMBED_DIM), np.float32)
                for i, (rid, new) in enumerate(zip(part["id"], todo[start:start + len(part)])):
                    if new:
                        block[i] = next(computed)
                        n_new += 1
                    else:
                        block[i] = reuse[rid]
                flat = pa.array(block.reshape(-1), type=pa.float32())
                writer.write_table(pa.Table.from_arrays([
                    pa.array(part["id"], pa.string(), from_pandas=True),
                    pa.array(part["split"], pa.string(), from_pandas=True),
                    pa.array(part["label"], pa.string(), from_pandas=True),  # NaN → null
                    pa.FixedSizeListArray.from_arrays(flat, EMBED_DIM),
                ], schema=schema))
        if next(computed, None) is not None or n_new != int(todo.sum()):
            raise PipelineError("embed: computed vectors do not match the images to embed")
    return n_new, len(rows) - n_new
