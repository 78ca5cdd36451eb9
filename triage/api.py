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

Decision support for triage only, not a diagnosis.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, UploadFile

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
    row["model_version"] = version
    row["threshold"] = predictor.threshold
    for key in ("probability", "decision", "qc_detail"):
        if row[key] != row[key]:  # NaN from pandas → null
            row[key] = None
    return row


def create_app(model_path: str | Path | None = None, params_path: str | Path = "params.yaml", *,
               metrics_path: str | Path = "metrics/evaluate/metrics.json",
               lock_path: str | Path = "dvc.lock",
               embeddings_path: str | Path | None = "data/features/embeddings.parquet"):
    """Build the app; loads the model and its embedder once (refuses a fingerprint mismatch)."""
    params = load_params(params_path)
    model_path = Path(model_path or params["inference"]["model"])
    # One image per request: no DataLoader workers.
    predictor = Predictor.from_files(model_path, params, embeddings_path=embeddings_path,
                                     num_workers=0)
    max_mb = params["inference"]["max_upload_mb"]
    max_bytes = int(max_mb * 1024 * 1024)
    version = model_version(model_path, lock_path)
    info = model_info(predictor, model_path, version, operating_metrics(
        metrics_path, str(predictor.bundle.get("name", model_path.stem))), max_bytes)
    lock = threading.Lock()  # torch inference on CPU: one request at a time

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

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": info["name"], "version": version["version"]}

    @app.get("/model")
    def model() -> dict:
        return info

    @app.post("/predict")
    def predict(file: UploadFile = File(..., description="one image file")) -> dict:
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload too large: more than {max_bytes} bytes "
                                     f"(inference.max_upload_mb={max_mb})")
        if not data:
            raise HTTPException(400, "empty upload: send one image file in the form field 'file'")
        row = predict_upload(predictor, data, lock, version["version"])
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

    ap = argparse.ArgumentParser(description="Serve the triage model over HTTP")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default=None, help="model bundle (default: params inference.model)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("TRIAGE_LOGLEVEL", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        application = create_app(args.model, args.params)
    except PipelineError as exc:
        raise SystemExit(f"ERROR: {exc}") from None
    uvicorn.run(application, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
