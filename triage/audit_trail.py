"""The audit trail: one JSON line per API request, batch run and purge (not the label audit,
which is ``triage.audit``).

The file is ``$TRIAGE_AUDIT_LOG``, else params ``inference.audit_log``, else
``~/.local/state/triage/audit.jsonl`` (``$XDG_STATE_HOME``); a path inside the repository is
refused. Lines hold times (UTC), ids, roles, statuses, counts and hashes, never a token, a
file name, image bytes, an image id or text a client sent. Writing is safe across threads and
processes (a thread lock and ``flock`` on ``<file>.lock``): one ``os.write`` per line on an
``O_APPEND`` descriptor, fsync'd, so lines never interleave; a failed write is undone
(truncated back) and raises :class:`AuditError`: callers fail the request or the run, an
audit line is never silently skipped. Past ``inference.audit_max_bytes`` the file is rotated
to ``audit.jsonl.1`` (older ones shift to ``.2`` ... ``.N``, N = ``inference.audit_keep``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import json
import os
import socket
import stat
import threading
from pathlib import Path

from .access import refuse_inside_repository, utc_now
from .errors import PipelineError

AUDIT_ENV = "TRIAGE_AUDIT_LOG"


class AuditError(PipelineError):
    """The audit line could not be written (the request or run must fail)."""


def default_audit_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).expanduser() / "triage" / "audit.jsonl"


def audit_path(params: dict | None = None, path: str | Path | None = None) -> Path:
    """``path``, else ``$TRIAGE_AUDIT_LOG``, else params ``inference.audit_log`` (when not
    empty), else :func:`default_audit_path`; refused inside the repository."""
    chosen = path or os.environ.get(AUDIT_ENV) or \
        ((params or {}).get("inference", {}).get("audit_log") or None) or default_audit_path()
    return refuse_inside_repository(chosen, "the audit trail", AUDIT_ENV,
                                    "~/.local/state/triage/audit.jsonl")


def file_sha256(path: str | Path, n: int | None = None) -> str:
    """sha256 of a file's bytes (hex), its first ``n`` digits when given: with n=12 the
    model card's version of a model file (``triage.report.file_version``, ``sha256sum``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n] if n else h.hexdigest()


def user_and_host() -> dict:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname()}


def rotated_files(path: str | Path) -> list[Path]:
    """``<path>.1`` ... ``<path>.N`` that exist, by number."""
    path = Path(path)
    found = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit() and p.is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


class AuditTrail:
    """Append-only JSON lines with size-based rotation."""

    def __init__(self, path: str | Path, max_bytes: int = 10 * 1024 * 1024, keep: int = 5):
        self.path = Path(path)
        self.max_bytes, self.keep = int(max_bytes), int(keep)
        self._lock = threading.Lock()

    @classmethod
    def from_params(cls, params: dict, path: str | Path | None = None) -> AuditTrail:
        inf = params["inference"]
        return cls(audit_path(params, path), inf["audit_max_bytes"], inf["audit_keep"])

    def _fail(self, exc: OSError) -> AuditError:
        why = exc.strerror or type(exc).__name__
        return AuditError(f"cannot write the audit trail {self.path}: {why} (fix the path or its "
                          f"permissions, or set {AUDIT_ENV})")

    @contextlib.contextmanager
    def _exclusive(self):
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def check(self) -> None:
        """AuditError unless a line could be appended now (before work that must be audited)."""
        try:
            with self._exclusive():
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as exc:
            raise self._fail(exc) from exc

    def _rotate(self) -> None:
        last = self.path.with_name(f"{self.path.name}.{self.keep}")
        last.unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def write(self, record: dict) -> None:
        """Append one line (``time`` first, UTC with milliseconds); AuditError on failure."""
        line = (json.dumps({"time": utc_now("milliseconds"), **record}, ensure_ascii=True,
                           separators=(",", ":"), default=str) + "\n").encode("ascii")
        try:
            with self._exclusive():
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    st = None
                if st is not None and not stat.S_ISREG(st.st_mode):  # never rotate a folder away
                    raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                                  "not a regular file", str(self.path))
                if st is not None and st.st_size and st.st_size + len(line) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    start = os.fstat(fd).st_size
                    try:
                        view = memoryview(line)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fsync(fd)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, start)  # no half line left behind
                        raise
                finally:
                    os.close(fd)
        except OSError as exc:
            raise self._fail(exc) from exc
