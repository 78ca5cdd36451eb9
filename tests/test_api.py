"""The FastAPI service, through FastAPI's test client, on a real tiny model bundle."""
import hashlib
import io
import json
import logging
import warnings

import numpy as np
import pytest
import yaml
from PIL import Image

with warnings.catch_warnings():  # starlette: "httpx with the test client is deprecated (httpx2)"
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from helpers import train_tiny_model, write_params
from imagefactory import blob_image

from triage.api import create_app
from triage.inference import FingerprintMismatch
from triage.models import positive_proba


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tiny = train_tiny_model(tmp_path_factory.mktemp("api_model"))
    metrics = tiny["root"] / "metrics.json"
    metrics.write_text(json.dumps({"semi_supervised": {
        "threshold": 0.5, "sensitivity": 0.9, "sensitivity_ci_low": 0.8,
        "sensitivity_ci_high": 0.95, "specificity": 0.6, "roc_auc": 0.85}}))
    app = create_app(tiny["model"], tiny["params"], metrics_path=metrics,
                     lock_path=tiny["root"] / "dvc.lock", embeddings_path=None)
    return tiny, TestClient(app)


def _png(seed=0, cancer=True, tmp=None) -> bytes:
    path = blob_image(tmp / f"up_{seed}.png", cancer, seed)
    return path.read_bytes()


def test_health_and_model(served):
    tiny, client = served
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    m = client.get("/model").json()
    md5 = hashlib.md5(tiny["model"].read_bytes()).hexdigest()
    assert m["version"] == md5 and m["version_source"] == "file md5"
    assert m["threshold"] == 0.5 and m["positive_class"] == "cancer"
    assert m["embedding_fingerprint"] == tiny["bundle"]["embedding_fingerprint"]
    assert m["operating_point"]["sensitivity"] == 0.9
    assert m["operating_point_ci"]["sensitivity_ci_low"] == 0.8


def test_predict_returns_the_batch_fields(served, tmp_path):
    tiny, client = served
    data = _png(7, True, tmp_path)
    r = client.post("/predict", files={"file": ("scan.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    for key in ("id", "path", "probability", "decision", "needs_review", "qc_status", "qc_detail"):
        assert key in body
    assert body["id"] == hashlib.sha256(data).hexdigest() and body["qc_status"] == "ok"
    x = tiny["embedder"].transform([str(tmp_path / "up_7.png")])
    # the pipeline's probability: the model's, snapped to 16 significant bits (triage.canonical)
    p = positive_proba(tiny["bundle"]["model"], x, "cancer")[0]
    assert body["probability"] == pytest.approx(p, abs=1e-6)
    assert body["decision"] == ("cancer" if p >= 0.5 else "normal")
    assert body["model_version"] == client.get("/model").json()["version"]


def test_decodable_image_failing_qc_is_answered_with_its_status(served):
    _, client = served
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(buf, format="PNG")
    r = client.post("/predict", files={"file": ("flat.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200
    assert r.json()["qc_status"] == "blank" and r.json()["probability"] is None
    assert r.json()["needs_review"] is True


@pytest.mark.parametrize("payload, status, message", [
    (b"", 400, "empty upload"),
    (b"%PDF-1.4 definitely not an image", 415, "not a readable image"),
    (None, 415, "not a readable image (decode_error)"),  # truncated PNG
])
def test_bad_uploads_get_a_clear_4xx(served, tmp_path, payload, status, message):
    _, client = served
    if payload is None:
        payload = _png(3, False, tmp_path)[:200]
    r = client.post("/predict", files={"file": ("x.png", payload, "image/png")})
    assert r.status_code == status
    assert message in r.json()["detail"]


def test_missing_file_field_is_a_4xx(served):
    _, client = served
    assert client.post("/predict").status_code == 422


def test_too_large_upload_is_refused(served, tmp_path):
    tiny, _ = served
    params = write_params(tmp_path / "params.yaml", tiny["model"], **{"inference.max_upload_mb": 0.001})
    client = TestClient(create_app(tiny["model"], params, embeddings_path=None))
    big = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert len(buf.getvalue()) > 1049
    r = client.post("/predict", files={"file": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    # a body far over the limit is refused from its declared length, before parsing
    r = client.post("/predict", files={"file": ("huge.bin", b"\0" * (200 * 1024), "image/png")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]


def _multipart(payload: bytes, boundary: str = "B") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()


def test_chunked_upload_without_content_length_is_refused_while_received(served, tmp_path,
                                                                           monkeypatch):
    """No Content-Length (chunked generator body): the limit is enforced while receiving,
    so the multipart parser never spools the oversized file, and normal uploads still work."""
    import starlette.datastructures as sd

    tiny, _ = served
    params = write_params(tmp_path / "params.yaml", tiny["model"], **{"inference.max_upload_mb": 0.001})
    client = TestClient(create_app(tiny["model"], params, embeddings_path=None))
    spooled = []
    write = sd.UploadFile.write

    async def spy(self, data):
        spooled.append(len(data))
        await write(self, data)

    monkeypatch.setattr(sd.UploadFile, "write", spy)
    body = _multipart(b"\0" * (5 << 20))

    def gen():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    r = client.post("/predict", content=gen(), headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert sum(spooled) <= 1049 + 64 * 1024, sum(spooled)  # not the 5 MB body
    # a normal (declared-length) upload and a small chunked upload still work
    _, big_client = served
    png = _png(5, True, tmp_path)
    r = big_client.post("/predict", files={"file": ("scan.png", png, "image/png")})
    assert r.status_code == 200 and r.json()["qc_status"] == "ok"
    small = _multipart(png)
    r = big_client.post("/predict", content=(small[i:i + 100] for i in range(0, len(small), 100)),
                        headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == hashlib.sha256(png).hexdigest()


def test_body_limit_stops_reading_a_streamed_body_at_the_limit():
    """At the ASGI level: a body sent in many small chunks without Content-Length is cut
    off as soon as the limit is passed (the rest is never received), with a 413."""
    import asyncio

    from triage.api import BodyLimitMiddleware

    reached = []

    async def inner(scope, receive, send):  # an app that reads the whole body
        while True:
            m = await receive()
            reached.append(len(m.get("body", b"")))
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def run(n_chunks, headers=()):
        pulled, sent = [0], []

        async def receive():
            pulled[0] += 1
            return {"type": "http.request", "body": b"x" * 1000, "more_body": pulled[0] < n_chunks}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": list(headers)}
        asyncio.run(BodyLimitMiddleware(inner, 10_000, "upload too large")(scope, receive, send))
        return pulled[0], sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    pulled, status, text = run(1000)  # 1 MB streamed, limit 10 kB
    assert status == 413 and b"too large" in text and pulled == 11
    assert sum(reached) <= 10_000
    reached.clear()
    assert run(10)[1] == 200 and sum(reached) == 10_000  # exactly at the limit: accepted
    # a declared length over the limit is refused before reading anything
    pulled, status, _ = run(1000, [(b"content-length", b"1000000")])
    assert status == 413 and pulled == 0


def test_no_file_name_or_bytes_in_logs(served, tmp_path, caplog):
    _, client = served
    caplog.set_level(logging.DEBUG)
    data = _png(11, True, tmp_path)
    r = client.post("/predict", files={"file": ("Jane_Doe_1970-01-01.png", data, "image/png")})
    assert r.status_code == 200
    text = caplog.text
    assert "Jane_Doe" not in text and hashlib.sha256(data).hexdigest() not in text
    assert "predict:" in text  # it does log, counts only


def test_app_refuses_a_fingerprint_mismatch(served, tmp_path):
    tiny, _ = served
    params = write_params(tmp_path / "params.yaml", tiny["model"], **{"embed.seed": 1})
    with pytest.raises(FingerprintMismatch):
        create_app(tiny["model"], params, embeddings_path=None)
    assert yaml.safe_load(params.read_text())["embed"]["seed"] == 1


def test_model_does_not_reveal_absolute_server_paths(served, tmp_path, monkeypatch):
    tiny, client = served
    m = client.get("/model").json()
    # the model lies outside the working directory: only its file name is shown
    assert m["path"] == tiny["model"].name
    assert str(tiny["root"]) not in json.dumps(m)
    from triage.api import shown_model_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "models").mkdir(parents=True)
    inside = tmp_path / "data" / "models" / "m.skops"
    assert shown_model_path(inside) == "data/models/m.skops"
    assert shown_model_path("data/models/m.skops") == "data/models/m.skops"
    assert shown_model_path("/elsewhere/secret/m.skops") == "m.skops"


def test_no_docs_pages_that_need_a_cdn(served):
    _, client = served
    for url in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(url).status_code == 404, url


def _access_record(path_with_query):
    # exactly what uvicorn's HTTP protocols log on "uvicorn.access"
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                             '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5000", "GET", path_with_query, "1.1", 200), None)


def test_access_log_drops_query_strings(served):
    import uvicorn

    # uvicorn configures its loggers when its Config is made (after create_app in main())
    uvicorn.Config(served[1].app, log_level="info")
    logger = logging.getLogger("uvicorn.access")
    rec = _access_record("/model?patient_id=Jane_Doe_1970")
    assert all(f.filter(rec) for f in logger.filters) and logger.filters
    msg = rec.getMessage()
    assert "Jane_Doe" not in msg and "patient_id" not in msg and "?" not in msg
    assert '"GET /model HTTP/1.1" 200' in msg
    rec = _access_record("/health")
    assert all(f.filter(rec) for f in logger.filters)
    assert '"GET /health HTTP/1.1" 200' in rec.getMessage()
