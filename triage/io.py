"""Small I/O helpers shared by the stages: hashing, atomic writes, Parquet, logging."""

from __future__ import annotations

import contextlib
import errno
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

from .errors import ParamsError, PipelineError

log = logging.getLogger("triage")

# Filesystem errors that mean "this output cannot be written here" (a user's situation, not
# a bug): run_stage turns them into one line. Anything else (EINVAL, a network error, a
# TypeError...) still raises with its traceback, so programming errors are never hidden.
FILESYSTEM_ERRNOS = {errno.EACCES: "permission denied (check the folder's permissions, or "
                                   "write somewhere else)",
                     errno.EPERM: "operation not permitted (check the folder's permissions, "
                                  "or write somewhere else)",
                     errno.EROFS: "read-only file system (write somewhere else)",
                     errno.ENOSPC: "no space left on device (free some space)",
                     errno.EDQUOT: "disk quota exceeded (free some space)",
                     errno.EEXIST: "a file is in the way where a folder is needed (it is a file, "
                                   "not a folder: choose another path)",
                     errno.ENOTDIR: "a file is in the way where a folder is needed (it is a "
                                    "file, not a folder: choose another path)",
                     errno.EISDIR: "it is a folder (give a file name)"}


class OutputError(PipelineError):
    """An output could not be written (permissions, read-only or full disk, a file in the way)."""


def is_filesystem_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FILESYSTEM_ERRNOS


def filesystem_message(exc: OSError, path: str | Path | None = None, verb: str = "write") -> str:
    """``cannot write PATH: permission denied (what to do)`` for a filesystem OSError."""
    where = path if path is not None else (exc.filename or "a file")
    return f"cannot {verb} {where}: {FILESYSTEM_ERRNOS[exc.errno]}"


def path_text(path: str | os.PathLike) -> str:
    """A path as UTF-8 text for outputs (Parquet, CSV, pages). A file name that is not UTF-8
    reaches Python with lone surrogates; its undecodable bytes are escaped (``scan_\\xff.png``),
    one spelling for prepare's quarantine rows, the batch CLI and the preflight."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (not from the disk)
        return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


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
    A filesystem error (permission denied, read-only or full disk, a file where a folder
    should be: see ``FILESYSTEM_ERRNOS``) becomes an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp_path, path)
    except OSError as exc:
        if not is_filesystem_error(exc):
            raise
        raise OutputError(filesystem_message(exc, path)) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            with contextlib.suppress(OSError):
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


def read_metadata(path: str | Path) -> dict[str, str]:
    """The Parquet schema metadata a writer put in with ``write_parquet(metadata=...)``."""
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"pandas")}


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _needs_neutralising(value) -> bool:
    return isinstance(value, str) and (value.startswith(FORMULA_PREFIXES) or "\r" in value)


def _neutralise(value):
    if not _needs_neutralising(value):
        return value
    # The csv module quotes a cell holding "\n" but not a lone "\r" (our line end is "\n"),
    # and readers split rows at it: written escaped, as the non-UTF-8 bytes of a name are.
    value = value.replace("\r", "\\r")
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def neutralise_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells cannot run as spreadsheet formulas.

    A text cell starting with ``= + - @``, a tab or a carriage return gets a leading
    single quote (OWASP "CSV injection"): Excel, LibreOffice and Google Sheets show it as
    text instead of evaluating e.g. ``=HYPERLINK(...)`` from a file name. A carriage return
    inside a cell is written as the two characters ``\\r`` (unquoted, it would end the row).
    Only text (object or string dtype) cells change: numbers such as -0.5 stay numbers.
    """
    out = df.copy()
    for col in out.columns:
        s = out[col]
        if pd.api.types.is_object_dtype(s.dtype) or pd.api.types.is_string_dtype(s.dtype):
            if s.map(_needs_neutralising).any():
                out[col] = s.map(_neutralise, na_action="ignore").astype(s.dtype)
    return out


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write a CSV for people (and spreadsheets) atomically, formulas neutralised."""
    with atomic_path(path) as tmp:
        neutralise_formulas(df).to_csv(tmp, index=False, lineterminator="\n")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("TRIAGE_LOGLEVEL", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_stage(main: Callable[[], None]) -> None:
    """Entry point wrapper: user errors print one clear line and exit 1, no traceback.

    User errors are :class:`PipelineError` (outputs written through :func:`atomic_path`
    raise its :class:`OutputError`) and the filesystem errors of ``FILESYSTEM_ERRNOS``
    raised elsewhere (permission denied, read-only or full disk, a file in the way...),
    which name their path. Every other exception keeps its traceback: it is a bug.
    """
    setup_logging()
    try:
        main()
    except ParamsError as exc:
        # DVC deleted this stage's outputs before it ran, its `cache: false` metrics too
        print(f"ERROR: {exc}\n  (`git checkout metrics/` restores the committed metrics DVC "
              f"removed; `python -m triage.preflight` checks params.yaml before `dvc repro`)",
              file=sys.stderr)
        sys.exit(1)
    except PipelineError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:
        if not is_filesystem_error(exc):
            raise
        print(f"ERROR: {filesystem_message(exc, verb='access')}", file=sys.stderr)
        sys.exit(1)


def open_live(stage: str, root: str | Path = "metrics"):
    """DVCLive logger for a stage: metrics/<stage>/metrics.json, no dvc.yaml edits, no auto-exp."""
    from dvclive import Live

    return Live(str(Path(root) / stage), dvcyaml=False, save_dvc_exp=False, report=None)
