"""Prediction API (FastAPI): ``POST /predict``, ``GET /health``, ``GET /model``.

Start it from the repository root (reads params.yaml and the model of inference.model)::

    python -m triage.api --port 8000          # or: uvicorn triage.api:app --port 8000

``POST /predict`` takes one image as multipart field ``file`` and answers the batch CLI's
fields (id, path = null, probability, decision, needs_review, qc_status, qc_detail).
Empty, oversized (inference.max_upload_mb) or undecodable uploads get a 4xx with a clear
message; the size limit is enforced while the body is received (declared Content-Length or
not, e.g. a chunked upload), so an oversized body is never read or spooled past the limit.
An image that decodes but fails QC (blank, too small...) is answered 200 with its qc_status
and no probability. Nothing logs file names or image bytes: the upload is written to a
private temporary folder under a fixed name and deleted after the request. uvicorn's
access log is written without query strings; ``GET /model`` shows the model path relative
to the working directory (else its file name only); there is no ``/docs`` or ``/redoc``
(their pages load scripts from a CDN).

Access (``triage.access``, docs/serving.md): every request but ``GET /health`` needs
``Authorization: Bearer <token>`` (``python -m triage.api token add``): none or unknown → 401
with ``WWW-Authenticate: Bearer``, revoked → 401, wrong role → 403 (``POST /predict`` needs
``predict``; ``GET /model`` and ``/openapi.json`` ``read`` or ``predict``). Per token at
most ``inference.rate_limit_per_minute`` requests in any minute (else 429 with
``Retry-After``); at most ``inference.max_concurrent`` predictions at once (else 503 with
``Retry-After``). Every request gets a ``X-Request-ID`` (uuid4) and one line in the audit
trail (``triage.audit_trail``); a request whose line cannot be written is answered 503.
The server refuses to start without an active token unless ``--no-auth`` (loopback only).

Decision support for triage only, not a diagnosis.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Request, UploadFile

from .access import Authenticator, require_active_tokens, token_main, tokens_path
from .audit_trail import AuditError, AuditTrail, file_sha256, user_and_host
from .errors import PipelineError
from .inference import Predictor, model_version, operating_metrics
from .params import load_params

log = logging.getLogger("triage.api")

OPERATING_KEYS = ("threshold", "sensitivity", "specificity", "ppv", "npv", "roc_auc", "pr_auc",
                  "f1", "accuracy", "brier", "ece")
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and headers around the file
UNREADABLE = ("not_an_image", "decode_error", "decompression_bomb", "too_large",
              "unsupported_mode", "zero_byte", "unreadable", "non_utf8_filename")


class BodyTooLarge(HTTPException):
    """Raised from the wrapped ASGI ``receive`` once a request body passes the limit."""

    def __init__(self, detail: str):
        super().__init__(413, detail)


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for a request body over ``max_body`` bytes.

    A declared Content-Length over the limit is refused before anything is read. Otherwise
    (no Content-Length: chunked transfer, or a wrong one) ``receive`` is wrapped and counts
    the bytes as they arrive: past the limit it raises :class:`BodyTooLarge` (an
    HTTPException, so FastAPI's body parsing re-raises it and it becomes the 413 response),
    so the multipart parser never sees, and never spools, more than the limit.
    """

    def __init__(self, app, max_body: int, detail: str):
        self.app, self.max_body, self.detail = app, int(max_body), detail

    async def _refuse(self, scope, receive, send) -> None:
        from fastapi.responses import JSONResponse

        await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_body:
            await self._refuse(scope, receive, send)
            return
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.detail)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)


# --------------------------------------------------------------------------- access control
OPEN_ROUTES = frozenset({("GET", "/health")})
ROUTE_ROLES = {("POST", "/predict"): ("predict",), ("GET", "/model"): ("read", "predict"),
               ("GET", "/openapi.json"): ("read", "predict")}
ANY_ROLE = ("read", "predict")  # any other path (a 404...): a valid token of either role
KNOWN_PATHS = frozenset({"/health", "/predict", "/model", "/openapi.json"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LOOPBACK = ("127.0.0.1", "::1", "localhost")
OUTCOME_KEY = "triage.audit"  # scope entry the endpoint fills for the audit line


class RateLimiter:
    """At most ``per_minute`` requests per key (token id) in any 60 s window (a sliding log)."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute, self.clock = int(per_minute), clock
        self._seen: dict[str, deque] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> int:
        """0 if allowed now (and counted), else the whole seconds to wait (``Retry-After``)."""
        now = self.clock()
        with self._lock:
            seen = self._seen.setdefault(key, deque())
            while seen and seen[0] <= now - 60:
                seen.popleft()
            if len(seen) >= self.per_minute:
                return max(1, math.ceil(seen[0] + 60 - now))
            seen.append(now)
            return 0


def bearer_token(scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AccessMiddleware:
    """Pure ASGI middleware around the app (outside the body limit): request id, bearer
    token and role, per-token rate limit, bound on concurrent predictions, and one audit
    line per request written before the response starts (503 instead if it cannot be).

    Refusals happen before the body is read. The endpoint adds what the line needs (QC
    status, decision...) to ``scope["triage.audit"]``; the line holds the route (never the
    raw path or query), the token id, never the token.
    """

    def __init__(self, app, *, authenticator: Authenticator | None, audit: AuditTrail,
                 limiter: RateLimiter, max_concurrent: int, model_sha256: str,
                 audit_probability: bool = False):
        self.app, self.authenticator, self.audit, self.limiter = app, authenticator, audit, limiter
        self.max_concurrent, self.model_sha256 = int(max_concurrent), model_sha256
        self.audit_probability = bool(audit_probability)
        self.in_flight = 0  # changed on the event loop only

    async def _write(self, record: dict, outcome: dict, t0: float) -> bool:
        import anyio

        rec = {**record, **{k: outcome[k] for k in ("qc_status", "decision", "needs_review",
                                                     "ood") if k in outcome}}
        if self.audit_probability:
            rec["probability"] = outcome.get("probability")
        rec["duration_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        try:
            await anyio.to_thread.run_sync(self.audit.write, rec)
            return True
        except AuditError as exc:
            log.error("%s: request refused (503)", exc)
            return False

    async def _admit(self, key: tuple, record: dict, token: str | None):
        """None to go on, else (status, detail, headers) of the refusal."""
        if key in OPEN_ROUTES:
            record["auth"] = "open"
            return None
        if self.authenticator is None:
            record["auth"] = "disabled"
            return None
        if token is None:
            record["auth"] = "missing"
            return 401, "missing bearer token: send 'Authorization: Bearer <token>'", \
                {"WWW-Authenticate": "Bearer"}
        import anyio

        verdict = await anyio.to_thread.run_sync(self.authenticator.verify, token)
        record["auth"] = verdict.status
        if verdict.status == "unavailable":
            return 503, "the tokens file cannot be read (see the server log)", {"Retry-After": "30"}
        if verdict.status == "unknown":
            return 401, "invalid token", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        record["token_id"], record["role"] = verdict.token_id, verdict.role
        if verdict.status == "revoked":
            return 401, "token revoked", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        needed = ROUTE_ROLES.get(key, ANY_ROLE)
        if verdict.role not in needed:
            record["auth"] = "forbidden"
            return 403, (f"the token's role {verdict.role!r} may not call {key[0]} {key[1]} "
                         f"(needs {' or '.join(needed)})"), {}
        wait = self.limiter.acquire(verdict.token_id)
        if wait:
            return 429, (f"rate limit: more than {self.limiter.per_minute} requests in a minute "
                         f"for this token (inference.rate_limit_per_minute)"), \
                {"Retry-After": str(wait)}
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        t0 = time.perf_counter()
        rid = str(uuid.uuid4())
        method, path = scope.get("method", ""), scope.get("path", "")
        key = ("GET" if method == "HEAD" else method, path)
        record = {"event": "request", "request_id": rid, "token_id": None, "role": None,
                  "auth": None, "method": method if method in METHODS else "other",
                  "endpoint": path if path in KNOWN_PATHS else "other", "status": None,
                  "model_sha256": self.model_sha256, "qc_status": None, "decision": None}
        outcome = scope[OUTCOME_KEY] = {}
        state = {"started": False, "replaced": False}

        async def audited_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                record["status"] = message["status"]
                if not await self._write(record, outcome, t0):
                    state["replaced"] = True
                    await JSONResponse(
                        {"detail": "audit trail unavailable: the request was refused "
                                   "(see the server log)"}, 503,
                        headers={"X-Request-ID": rid, "Retry-After": "30"})(scope, receive, send)
                    return
                await send({**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", rid.encode())]})
            elif not state["replaced"]:
                await send(message)

        refusal = await self._admit(key, record, bearer_token(scope))
        counted = key == ("POST", "/predict") and refusal is None
        if counted and self.in_flight >= self.max_concurrent:
            refusal, counted = (503, f"busy: {self.max_concurrent} predictions in progress "
                                     f"(inference.max_concurrent); retry shortly",
                                {"Retry-After": "1"}), False
        if refusal is not None:
            status, detail, headers = refusal
            await JSONResponse({"detail": detail}, status, headers=headers)(
                scope, receive, audited_send)
            return
        if counted:
            self.in_flight += 1
        try:
            await self.app(scope, receive, audited_send)
        except Exception:
            if not state["started"]:
                record["status"] = 500
                await self._write(record, outcome, t0)
            raise
        finally:
            if counted:
                self.in_flight -= 1


def secure_openapi(app: FastAPI) -> None:
    """Declare the bearer scheme and the refusals in ``/openapi.json`` (clients, fuzzers)."""
    base = app.openapi

    def openapi() -> dict:
        schema = base()
        if "securitySchemes" not in schema.setdefault("components", {}):
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                  "scheme": "bearer"}}
            for (method, path), roles in ROUTE_ROLES.items():
                op = schema.get("paths", {}).get(path, {}).get(method.lower())
                if op is None:
                    continue
                op["security"] = [{"bearer": []}]
                op.setdefault("responses", {}).update({
                    "401": {"description": "no, unknown or revoked token"},
                    "403": {"description": f"the token's role is not {' or '.join(roles)}"},
                    "429": {"description": "rate limit (Retry-After)"}})
                if path == "/predict":
                    op["responses"]["503"] = {"description": "busy (Retry-After)"}
        return schema

    app.openapi = openapi


def shown_model_path(model_path: str | Path) -> str:
    """The model's path for ``GET /model`` without revealing the server's folders: relative
    to the working directory (the repository root) when inside it, else the file name."""
    path = Path(model_path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


class QueryStringFilter(logging.Filter):
    """Drops the query string from uvicorn's access log lines (``?patient_id=...`` is not
    logged): uvicorn logs ``'%s - "%s %s HTTP/%s" %d'`` with the path and query third."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def install_access_log_filter() -> None:
    """Add :class:`QueryStringFilter` to the ``uvicorn.access`` logger (once). Set on the
    logger, not a handler, so it survives uvicorn's own logging configuration."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryStringFilter) for f in logger.filters):
        logger.addFilter(QueryStringFilter())


def model_info(predictor: Predictor, model_path: Path, version: dict, metrics: dict,
               max_bytes: int) -> dict:
    """What ``GET /model`` answers: which model, its operating point and its intended use."""
    return {
        "name": str(predictor.bundle.get("name", model_path.stem)),
        "path": shown_model_path(model_path),
        "version": version["version"],
        "version_source": version["source"],
        "positive_class": predictor.positive,
        "classes": [str(c) for c in predictor.bundle.get("classes", [])],
        "threshold": predictor.threshold,
        "target_sensitivity": predictor.bundle.get("target_sensitivity"),
        "review_margin": predictor.review_margin,
        "embedding_fingerprint": predictor.bundle["embedding_fingerprint"],
        "embedding_backbone": getattr(predictor.embedder, "backbone", None),
        "embedding_dim": getattr(predictor.embedder, "feature_dim_", None),
        "max_upload_bytes": max_bytes,
        "operating_point": {k: metrics[k] for k in OPERATING_KEYS if k in metrics},
        "operating_point_ci": {k: metrics[k] for k in sorted(metrics)
                               if k.endswith(("_ci_low", "_ci_high"))},
        "intended_use": "decision support for triage, not a diagnosis",
    }


def predict_upload(predictor: Predictor, data: bytes, lock: threading.Lock, version: str) -> dict:
    """One uploaded image → the batch CLI's row, answered without path or file name."""
    with tempfile.TemporaryDirectory(prefix="triage-api-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        os.chmod(path, 0o600)
        with lock:
            row = predictor.predict_paths([str(path)], [None]).iloc[0].to_dict()
    if row["qc_status"] in UNREADABLE:
        raise HTTPException(415, f"not a readable image ({row['qc_status']}): send a PNG, "
                                 f"JPEG, TIFF or another format Pillow decodes")
    row["path"] = None
    row["needs_review"] = bool(row["needs_review"])
    ood = row.get("ood")  # far from the training images (needs_review); null: not checked
    row["ood"] = None if ood is None or ood != ood else bool(ood)
    row["model_version"] = version
    row["threshold"] = predictor.threshold
    for key in ("probability", "decision", "qc_detail"):
        if row[key] != row[key]:  # NaN from pandas → null
            row[key] = None
    return row


def create_app(model_path: str | Path | None = None, params_path: str | Path = "params.yaml", *,
               metrics_path: str | Path = "metrics/evaluate/metrics.json",
               lock_path: str | Path = "dvc.lock",
               embeddings_path: str | Path | None = "data/features/embeddings.parquet",
               tokens_file: str | Path | None = None, audit_log: str | Path | None = None,
               auth: bool = True):
    """Build the app; loads the model and its embedder once (refuses a fingerprint mismatch).

    ``tokens_file`` / ``audit_log`` default to ``$TRIAGE_API_TOKENS_FILE`` /
    ``$TRIAGE_AUDIT_LOG`` (then params, then the defaults outside the repository);
    ``auth=False`` is ``--no-auth``. Refuses (before loading the model) a tokens file without
    an active token, and a path inside the repository or an audit trail it cannot write.
    """
    params = load_params(params_path)
    inf = params["inference"]
    model_path = Path(model_path or inf["model"])
    authenticator = require_active_tokens(tokens_path(tokens_file)) if auth else None
    trail = AuditTrail.from_params(params, audit_log)
    trail.check()
    # One image per request: no DataLoader workers.
    predictor = Predictor.from_files(model_path, params, embeddings_path=embeddings_path,
                                     num_workers=0)
    max_mb = params["inference"]["max_upload_mb"]
    max_bytes = int(max_mb * 1024 * 1024)
    version = model_version(model_path, lock_path)
    info = model_info(predictor, model_path, version, operating_metrics(
        metrics_path, str(predictor.bundle.get("name", model_path.stem))), max_bytes)
    lock = threading.Lock()  # torch inference on CPU: one request at a time
    model_sha256 = file_sha256(model_path, 12)  # the model card's version of the file
    trail.write({"event": "start", "auth": "bearer" if auth else "disabled",
                 "model_sha256": model_sha256, **user_and_host(), "pid": os.getpid()})

    install_access_log_filter()
    # No /docs or /redoc: their Swagger UI / ReDoc pages load scripts from a CDN (blank
    # offline, and a third party sees who opens them). The schema stays at /openapi.json.
    app = FastAPI(title="triage", version=version["version"][:12],
                  description="Semi-supervised image triage (decision support, not diagnosis)",
                  docs_url=None, redoc_url=None)
    # Refuse an oversized body while it is received (declared length or not), before the
    # multipart parser spools it.
    app.add_middleware(BodyLimitMiddleware, max_body=max_bytes + MULTIPART_OVERHEAD,
                       detail=f"upload too large: more than {max_bytes} bytes "
                              f"(inference.max_upload_mb)")
    # Outside the body limit: refusals (401/403/429/503) come before any byte is read.
    app.add_middleware(AccessMiddleware, authenticator=authenticator, audit=trail,
                       limiter=RateLimiter(inf["rate_limit_per_minute"]),
                       max_concurrent=inf["max_concurrent"], model_sha256=model_sha256,
                       audit_probability=inf["audit_probability"])
    secure_openapi(app)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": info["name"], "version": version["version"]}

    @app.get("/model")
    def model() -> dict:
        return info

    @app.post("/predict")
    def predict(request: Request, file: UploadFile = File(..., description="one image file")) -> dict:
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload too large: more than {max_bytes} bytes "
                                     f"(inference.max_upload_mb={max_mb})")
        if not data:
            raise HTTPException(400, "empty upload: send one image file in the form field 'file'")
        row = predict_upload(predictor, data, lock, version["version"])
        outcome = request.scope.get(OUTCOME_KEY)
        if outcome is not None:  # for the audit line (AccessMiddleware)
            outcome.update({k: row[k] for k in ("qc_status", "decision", "needs_review",
                                                "probability", "ood") if k in row})
        log.info("predict: qc=%s needs_review=%s", row["qc_status"], row["needs_review"])
        return row

    return app


def __getattr__(name: str):
    """``uvicorn triage.api:app`` builds the default app lazily (importing stays cheap)."""
    if name == "app":
        global app
        app = create_app()  # noqa: PLW0603
        return app
    raise AttributeError(name)


def main(argv=None) -> None:
    import argparse

    import uvicorn

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["token"]:
        raise SystemExit(token_main(argv[1:]))
    ap = argparse.ArgumentParser(
        description="Serve the triage model over HTTP (token commands: "
                    "`python -m triage.api token add|list|revoke --help`)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="bind address (default: %(default)s; put a TLS reverse proxy in front)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default=None, help="model bundle (default: params inference.model)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-auth", action="store_true",
                    help="development only: no tokens needed (refused unless --host is loopback)")
    args = ap.parse_args(argv)
    if args.no_auth and args.host not in LOOPBACK:
        raise SystemExit(f"ERROR: --no-auth is refused for --host {args.host}: without tokens "
                         f"the API may listen only on loopback ({', '.join(LOOPBACK)})")
    logging.basicConfig(level=os.environ.get("TRIAGE_LOGLEVEL", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s")
    if args.no_auth:
        print(f"WARNING: --no-auth: authentication is OFF, any local process can call the API on "
              f"{args.host}:{args.port} (development only; requests are still audited)",
              file=sys.stderr, flush=True)
    try:
        application = create_app(args.model, args.params, auth=not args.no_auth)
    except PipelineError as exc:
        raise SystemExit(f"ERROR: {exc}") from None
    uvicorn.run(application, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
