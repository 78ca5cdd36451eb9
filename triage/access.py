"""API tokens with roles: the tokens file, its command line and request authentication.

    python -m triage.api token add --id reader-ward3 --role read     # prints the token once
    python -m triage.api token list                                  # ids, roles, dates, revoked
    python -m triage.api token revoke --id reader-ward3

A token is ``secrets.token_urlsafe(32)`` (256 random bits), shown once and never stored.
The tokens file (``$TRIAGE_API_TOKENS_FILE``, default ``~/.config/triage/api_tokens.json``;
refused inside the repository) keeps per token: id, role (``predict`` or ``read``), creation
time (UTC), revocation time, a random salt and ``scrypt(token, salt)``, plus ``lookup``, the
first 8 hex digits of the token's sha256, so a request is checked against the one entry it
can match instead of running scrypt for every stored token (32 of the 256 bits' hash: no
help to guess a token). The file is written atomically (temp file + rename) with mode 0600
in a 0700 folder, under a lock so two ``token`` commands never lose each other's change.
The server re-reads it when it changes (mtime, size or inode), so a revoke takes effect on
the next request without a restart. Ids are never reused: the audit trail names tokens by id.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import PipelineError

log = logging.getLogger("triage.access")

TOKENS_ENV = "TRIAGE_API_TOKENS_FILE"
ROLES = ("predict", "read")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}  # ~16 MB, tens of ms: once per token (cached)
LOOKUP_HEX = 8
FORMAT_VERSION = 1
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class AccessError(PipelineError):
    """A tokens-file problem a user fixes (missing file, no active token, bad path...)."""


def utc_now(timespec: str = "seconds") -> str:
    """``2026-11-03T09:15:02Z``: UTC, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


# --------------------------------------------------------------------------- paths
def _git_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return None


def repository_roots() -> list[Path]:
    """The repositories a secret or a log must stay out of: this checkout (the one
    ``triage`` is imported from) and the git work tree of the working directory."""
    roots = []
    for start in (PACKAGE_ROOT, Path.cwd().resolve()):
        root = _git_root(start)
        if root is not None and root not in roots:
            roots.append(root)
    return roots


def refuse_inside_repository(path: str | Path, what: str, env_var: str, example: str) -> Path:
    """``path`` resolved (symlinks followed), or :class:`AccessError` if it lies inside a
    repository: a tokens file or an audit trail must never be committed by accident."""
    resolved = Path(path).expanduser().resolve()
    for root in repository_roots():
        if resolved == root or root in resolved.parents:
            raise AccessError(
                f"{what} {resolved} is inside the repository {root}: it must stay out of git "
                f"(and out of DVC). Set {env_var} to a path outside it, e.g. {example}")
    return resolved


def default_tokens_path() -> Path:
    """``$TRIAGE_API_TOKENS_FILE``, else ``$XDG_CONFIG_HOME/triage/api_tokens.json``
    (``~/.config/...``)."""
    env = os.environ.get(TOKENS_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "triage" / "api_tokens.json"


def tokens_path(path: str | Path | None = None) -> Path:
    """The tokens file to use (``path``, else :func:`default_tokens_path`), outside the repo."""
    return refuse_inside_repository(path or default_tokens_path(), "the tokens file", TOKENS_ENV,
                                    "~/.config/triage/api_tokens.json")


# --------------------------------------------------------------------------- hashing
def derive(token: str, salt: bytes, kdf: dict | None = None) -> bytes:
    p = {**SCRYPT, **(kdf or {})}
    return hashlib.scrypt(token.encode("utf-8"), salt=salt, n=int(p["n"]), r=int(p["r"]),
                          p=int(p["p"]), dklen=int(p["dklen"]), maxmem=64 * 1024 * 1024)


def lookup_of(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:LOOKUP_HEX]


# --------------------------------------------------------------------------- the file
@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock (``<file>.lock`` beside it) around a read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_entries(path: Path) -> list[dict]:
    """The entries of a tokens file ([] if it does not exist); AccessError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise AccessError(f"cannot read the tokens file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
        entries = data["tokens"]
        if not isinstance(entries, list):
            raise TypeError
        for e in entries:
            if not {"id", "role", "salt", "hash", "lookup", "created"} <= set(e):
                raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AccessError(f"the tokens file {path} is not a triage tokens file (JSON with a "
                          f"'tokens' list); recreate it with `python -m triage.api token add`") \
            from exc
    return entries


def _write_entries(path: Path, entries: list[dict]) -> None:
    """Atomic replace: a temp file (mode 0600 from mkstemp) in the same folder, renamed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": FORMAT_VERSION, "tokens": entries}, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_id(token_id: str) -> str:
    if not ID_PATTERN.match(token_id or ""):
        raise AccessError(f"token id {token_id!r} must be 1-64 characters of letters, digits and "
                          f"_ . @ - (starting with a letter or digit); it is written in the "
                          f"audit trail, so no patient or personal data in it")
    return token_id


def add_token(path: Path, token_id: str, role: str) -> str:
    """Create a token, store its salted hash, return the token (shown once)."""
    check_id(token_id)
    if role not in ROLES:
        raise AccessError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    token = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    entry = {"id": token_id, "role": role, "created": utc_now(), "revoked": None,
             "kdf": {"name": "scrypt", **SCRYPT}, "salt": salt.hex(),
             "hash": derive(token, salt).hex(), "lookup": lookup_of(token)}
    with _locked(path):
        entries = read_entries(path)
        if any(e["id"] == token_id for e in entries):
            raise AccessError(f"token id {token_id!r} exists already (ids are never reused, so "
                              f"the audit trail stays unambiguous): choose another id")
        _write_entries(path, [*entries, entry])
    return token


def revoke_token(path: Path, token_id: str) -> bool:
    """Mark a token revoked (kept in the file so its id stays taken). False if it was already."""
    with _locked(path):
        entries = read_entries(path)
        match = [e for e in entries if e["id"] == token_id]
        if not match:
            raise AccessError(f"no token with id {token_id!r} in {path}")
        if match[0].get("revoked"):
            return False
        match[0]["revoked"] = utc_now()
        _write_entries(path, entries)
    return True


def active_entries(entries: list[dict]) -> list[dict]:
    return [e for e in entries if not e.get("revoked")]


# --------------------------------------------------------------------------- verification
@dataclass(frozen=True)
class Verdict:
    """``status``: ok | unknown | revoked | unavailable (the tokens file cannot be read)."""

    status: str
    token_id: str | None = None
    role: str | None = None


class Authenticator:
    """Checks bearer tokens against the tokens file, re-read when it changes.

    A token that verified once is remembered in memory (keyed by its sha256, for this
    process only, cleared on every reload) so scrypt runs once per token, not per request.
    The derived hash is compared with :func:`hmac.compare_digest`.
    """

    CACHE_SIZE = 1024

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._entries: list[dict] = []
        self._error: str | None = None
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self.refresh()

    def _read_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)

    def refresh(self) -> None:
        """Re-read the file if its mtime, size or inode changed since the last read."""
        stamp = self._read_stamp()
        if stamp == self._stamp and self._stamp is not None:
            return
        with self._lock:
            if stamp == self._stamp and self._stamp is not None:
                return
            try:
                entries = read_entries(self.path)
                self._error = None
            except AccessError as exc:
                entries, self._error = [], str(exc)
                log.error("tokens file unreadable, refusing authenticated requests: %s", exc)
            if stamp is not None and stat.S_IMODE(stamp[3]) & 0o077:
                log.warning("the tokens file %s is readable by other users: chmod 600 it",
                            self.path)
            self._entries, self._stamp = entries, stamp
            self._cache.clear()
            if self._stamp is not None or entries:
                log.info("tokens file read: %d active token(s)", len(active_entries(entries)))

    def active_count(self) -> int:
        self.refresh()
        return len(active_entries(self._entries))

    def verify(self, token: str) -> Verdict:
        self.refresh()
        if self._error:
            return Verdict("unavailable")
        if not token or len(token) > 256:
            return Verdict("unknown")
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        with self._lock:
            entries = self._entries
            index = self._cache.get(key)
        if index is None:
            lookup = key.hex()[:LOOKUP_HEX]
            for i, e in enumerate(entries):
                if not hmac.compare_digest(str(e["lookup"]), lookup):
                    continue
                try:
                    digest = derive(token, bytes.fromhex(e["salt"]), e.get("kdf"))
                except (ValueError, TypeError, UnicodeEncodeError):
                    continue
                if hmac.compare_digest(digest.hex(), str(e["hash"])):
                    index = i
                    break
            if index is None:
                return Verdict("unknown")
            with self._lock:
                if entries is self._entries:  # not reloaded meanwhile
                    self._cache[key] = index
                    while len(self._cache) > self.CACHE_SIZE:
                        self._cache.popitem(last=False)
        e = entries[index]
        if e.get("revoked"):
            return Verdict("revoked", e["id"], e["role"])
        return Verdict("ok", e["id"], e["role"])


def require_active_tokens(path: Path) -> Authenticator:
    """The server's authenticator, or AccessError if the file holds no active token."""
    auth = Authenticator(path)
    if auth._error:
        raise AccessError(auth._error)
    if auth.active_count() == 0:
        what = "does not exist" if auth._stamp is None else "holds no active token"
        raise AccessError(
            f"the tokens file {path} {what}: the API refuses to start without one. Create a "
            f"token with `python -m triage.api token add --id NAME --role predict` (or set "
            f"{TOKENS_ENV}); `--no-auth` is for development on 127.0.0.1 only")
    return auth


# --------------------------------------------------------------------------- command line
def token_main(argv: list[str]) -> int:
    """``python -m triage.api token add|list|revoke``."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m triage.api token",
                                 description="Manage the API's bearer tokens")
    ap.add_argument("--file", default=None,
                    help=f"tokens file (default: ${TOKENS_ENV}, else ~/.config/triage/api_tokens.json)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="create a token and print it once")
    a.add_argument("--id", required=True, help="a name for the token (in the audit trail)")
    a.add_argument("--role", required=True, choices=ROLES,
                   help="predict: POST /predict and GET /model; read: GET /model only")
    sub.add_parser("list", help="ids, roles, dates, revoked (never tokens or hashes)")
    r = sub.add_parser("revoke", help="revoke a token (the running server sees it at once)")
    r.add_argument("--id", required=True)
    args = ap.parse_args(argv)
    try:
        path = tokens_path(args.file)
        if args.cmd == "add":
            token = add_token(path, args.id, args.role)
            print(token)
            print(f"token {args.id!r} (role {args.role}) added to {path}. It is shown only this "
                  f"once: store it in the client's secret store now.", file=sys.stderr)
        elif args.cmd == "list":
            entries = read_entries(path)
            if not entries:
                print(f"no tokens in {path}", file=sys.stderr)
            else:
                print(f"{'id':<24} {'role':<8} {'created (UTC)':<21} revoked (UTC)")
                for e in entries:
                    print(f"{e['id']:<24} {e['role']:<8} {e['created']:<21} "
                          f"{e.get('revoked') or '-'}")
        else:
            done = revoke_token(path, args.id)
            print(f"token {args.id!r} {'revoked' if done else 'was already revoked'}",
                  file=sys.stderr)
    except AccessError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ERROR: cannot write the tokens file: {exc}", file=sys.stderr)
        return 1
    return 0
