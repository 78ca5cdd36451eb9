"""Small I/O helpers shared by the stages: hashing, atomic writes, Parquet, logging."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import PipelineError

log = logging.getLogger("triage")



def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename over it only if the block succeeds.

    A crash or kill mid-write leaves the previous file (or none), never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def reset_dir(path: str | Path) -> Path:
    """Empty ``path`` (a stage's output folder) so no file of an earlier run survives."""
    import shutil

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_parquet(df: pd.DataFrame, path: str | Path, schema: pa.Schema | None = None,
                  metadata: dict[str, str] | None = None) -> None:
    """Write a DataFrame atomically; ``metadata`` goes into the Parquet schema metadata."""
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path, what: str = "table") -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path} (run the upstream stage: `dvc repro`)")
    return pq.read_table(path).to_pandas()


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("TRIAGE_LOGLEVEL", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_stage(main: Callable[[], None]) -> None:
    """Entry point wrapper: user errors print one clear line and exit 1, no traceback."""
    setup_logging()
    try:
        main()
    except PipelineError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(1)


def open_live(stage: str, root: str | Path = "metrics"):
    """DVCLive logger for a stage: metrics/<stage>/metrics.json, no dvc.yaml edits, no auto-exp."""
    from dvclive import Live

    return Live(str(Path(root) / stage), dvcyaml=False, save_dvc_exp=False, report=None)
