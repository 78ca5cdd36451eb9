"""The FastAPI service, through FastAPI's test client, on a real tiny model bundle; the
tokens file, the rate limiter and the audit trail as units (tests/test_api_server.py talks
to a real uvicorn server)."""
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

with warnings.catch_warnings():  # starlette: "httpx with the test client is deprecated (httpx2)"
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from helpers import train_tiny_model, write_params
from imagefactory import blob_image

from triage.access import add_token
from triage.api import create_app
from triage.inference import FingerprintMismatch
from triage.models import positive_proba


def _app(tiny, params, **kw):
    """create_app with the module's tokens file and audit trail (both in the temp folder)."""
    return create_app(tiny["model"], params, tokens_file=tiny["tokens"],
                      audit_log=tiny["audit"], **{"embeddings_path": None, **kw})


def _client(app, tiny) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {tiny['token']}"})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tiny = train_tiny_model(tmp_path_factory.mktemp("api_model"))
    tiny["tokens"] = tiny["root"] / "secrets" / "api_tokens.json"
    tiny["audit"] = tiny["root"] / "state" / "audit.jsonl"
    tiny["token"] = add_token(tiny["tokens"], "tester", "predict")
    metrics = tiny["root"] / "metrics.json"
    metrics.write_text(json.dumps({"semi_supervised": {
        "threshold": 0.5, "sensitivity": 0.9, "sensitivity_ci_low": 0.8,
        "sensitivity_ci_high": 0.95, "specificity": 0.6, "roc_auc": 0.85}}))
    app = _app(tiny, tiny["params"], metrics_path=metrics, lock_path=tiny["root"] / "dvc.lock")
    return tiny, _client(app, tiny)


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
    client = _client(_app(tiny, params), tiny)
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
    client = _client(_app(tiny, params), tiny)
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
        _app(tiny, params)
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


# --------------------------------------------------------------------------- access and audit
def test_token_commands_print_the_token_once_and_store_only_a_salted_hash(tmp_path, capsys):
    import stat as st

    from triage.access import token_main

    path = tmp_path / "cfg" / "tokens.json"
    assert token_main(["--file", str(path), "add", "--id", "ward3", "--role", "read"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert len(token) >= 43 and "shown only this once" in out.err
    assert token_main(["--file", str(path), "add", "--id", "lab", "--role", "predict"]) == 0
    other = capsys.readouterr().out.strip()
    text = path.read_text()
    assert token not in text and other not in text
    assert st.S_IMODE(path.stat().st_mode) == 0o600
    entries = json.loads(text)["tokens"]
    assert [e["id"] for e in entries] == ["ward3", "lab"] and entries[0]["salt"] != entries[1]["salt"]
    assert entries[0]["kdf"]["name"] == "scrypt" and entries[0]["created"].endswith("Z")
    assert not list(path.parent.glob("*.tmp"))  # written atomically, no temp left
    # ids are never reused; roles are checked
    assert token_main(["--file", str(path), "add", "--id", "ward3", "--role", "read"]) == 1
    assert "exists already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        token_main(["--file", str(path), "add", "--id", "x", "--role", "admin"])
    capsys.readouterr()
    assert token_main(["--file", str(path), "revoke", "--id", "ward3"]) == 0
    capsys.readouterr()
    assert token_main(["--file", str(path), "list"]) == 0
    listed = capsys.readouterr().out
    assert "ward3" in listed and "lab" in listed and "predict" in listed
    for secret in (token, other, entries[0]["hash"], entries[0]["salt"], entries[1]["hash"]):
        assert secret not in listed
    ward3 = next(line for line in listed.splitlines() if line.startswith("ward3"))
    assert ward3.split()[-1].endswith("Z")  # its revocation time


def test_token_add_through_the_api_command(tmp_path, monkeypatch, capsys):
    from triage.api import main

    path = tmp_path / "t.json"
    monkeypatch.setenv("TRIAGE_API_TOKENS_FILE", str(path))
    with pytest.raises(SystemExit) as done:
        main(["token", "add", "--id", "svc", "--role", "predict"])
    assert done.value.code == 0 and path.is_file()
    assert capsys.readouterr().out.strip() not in path.read_text()


def test_tokens_file_and_audit_trail_inside_the_repository_are_refused(tmp_path, monkeypatch):
    from triage.access import AccessError, tokens_path
    from triage.audit_trail import audit_path

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(AccessError, match="inside the repository"):
        tokens_path(root / "api_tokens.json")
    monkeypatch.setenv("TRIAGE_API_TOKENS_FILE", str(root / "data" / "t.json"))
    with pytest.raises(AccessError, match="TRIAGE_API_TOKENS_FILE"):
        tokens_path()
    monkeypatch.setenv("TRIAGE_AUDIT_LOG", str(root / "audit.jsonl"))
    with pytest.raises(AccessError, match="TRIAGE_AUDIT_LOG"):
        audit_path({"inference": {"audit_log": ""}})
    # the environment variable overrides the param; outside the repo is fine
    monkeypatch.setenv("TRIAGE_AUDIT_LOG", str(tmp_path / "a.jsonl"))
    assert audit_path({"inference": {"audit_log": "/elsewhere/x"}}) == (tmp_path / "a.jsonl").resolve()
    monkeypatch.delenv("TRIAGE_AUDIT_LOG")
    assert audit_path({"inference": {"audit_log": str(tmp_path / "p.jsonl")}}).name == "p.jsonl"
    # a git work tree holding the working directory counts as the repository too
    (tmp_path / "other" / ".git").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "other")
    with pytest.raises(AccessError):
        tokens_path(tmp_path / "other" / "sub" / "t.json")


def test_authenticator_rereads_the_file_when_it_changes(tmp_path):
    from triage.access import Authenticator, add_token, revoke_token

    path = tmp_path / "t.json"
    a = add_token(path, "a", "predict")
    auth = Authenticator(path)
    assert auth.verify(a).status == "ok" and auth.verify(a).role == "predict"
    assert auth.verify(a[:-1] + ("x" if a[-1] != "x" else "y")).status == "unknown"
    assert auth.verify("").status == "unknown"
    b = add_token(path, "b", "read")  # a new token is seen without a new Authenticator
    assert auth.verify(b).token_id == "b"
    revoke_token(path, "a")
    v = auth.verify(a)
    assert (v.status, v.token_id) == ("revoked", "a")
    assert auth.active_count() == 1


def test_app_refuses_to_start_without_an_active_token(served, tmp_path):
    from triage.access import AccessError, add_token, revoke_token

    tiny, _ = served
    path = tmp_path / "t.json"
    with pytest.raises(AccessError, match="does not exist"):
        create_app(tiny["model"], tiny["params"], tokens_file=path, audit_log=tiny["audit"],
                   embeddings_path=None)
    add_token(path, "only", "read")
    revoke_token(path, "only")
    with pytest.raises(AccessError, match="no active token"):
        create_app(tiny["model"], tiny["params"], tokens_file=path, audit_log=tiny["audit"],
                   embeddings_path=None)


def test_rate_limiter_allows_n_per_sliding_minute():
    from triage.api import RateLimiter

    now = [1000.0]
    rl = RateLimiter(3, clock=lambda: now[0])
    assert [rl.acquire("t") for _ in range(3)] == [0, 0, 0]
    assert rl.acquire("t") == 60 and rl.acquire("other") == 0
    now[0] += 59.5
    assert rl.acquire("t") == 1
    now[0] += 0.5  # the three requests left the window
    assert [rl.acquire("t") for _ in range(4)][-2:] == [0, 60]


def test_statuses_and_audit_line_through_the_test_client(served, tmp_path):
    from triage.access import add_token

    tiny, client = served
    anon = TestClient(client.app)
    assert anon.get("/health").status_code == 200
    r = anon.get("/model")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    reader = TestClient(client.app, headers={
        "Authorization": f"Bearer {add_token(tiny['tokens'], f'reader-{tmp_path.name}', 'read')}"})
    assert reader.get("/model").status_code == 200
    data = _png(21, True, tmp_path)
    assert reader.post("/predict", files={"file": ("Jane.png", data, "image/png")}).status_code == 403
    r = client.post("/predict", files={"file": ("Jane_Doe.png", data, "image/png")})
    assert r.status_code == 200
    lines = tiny["audit"].read_text().splitlines()
    line = json.loads(lines[-1])
    assert line["request_id"] == r.headers["x-request-id"]
    assert (line["token_id"], line["role"], line["endpoint"], line["status"]) == \
        ("tester", "predict", "/predict", 200)
    assert line["qc_status"] == "ok" and line["decision"] == r.json()["decision"]
    assert "probability" not in line  # inference.audit_probability: false
    assert line["model_sha256"] == hashlib.sha256(tiny["model"].read_bytes()).hexdigest()[:12]
    text = "\n".join(lines)
    assert "Jane" not in text and r.json()["id"] not in text and tiny["token"] not in text


def test_audit_trail_rotates_and_keeps_n_files(tmp_path):
    from triage.audit_trail import AuditTrail, rotated_files

    trail = AuditTrail(tmp_path / "audit.jsonl", max_bytes=1024, keep=3)
    for i in range(100):
        trail.write({"event": "x", "i": i, "pad": "p" * 40})
    files = rotated_files(trail.path)
    assert [f.name for f in files] == ["audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    kept = []
    for f in [*reversed(files), trail.path]:
        assert f.stat().st_size <= 1024
        kept += [json.loads(x)["i"] for x in f.read_text().splitlines()]
    assert kept == list(range(100 - len(kept), 100))  # in order, the newest kept, none torn


def test_audit_trail_concurrent_writers_lose_no_line(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from triage.audit_trail import AuditTrail, rotated_files

    path = tmp_path / "audit.jsonl"
    trails = [AuditTrail(path, max_bytes=20_000, keep=50) for _ in range(2)]  # 2 instances: flock

    def write(i):
        trails[i % 2].write({"event": "x", "i": i, "pad": "q" * 100})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(800)))
    seen = [json.loads(x)["i"] for f in [*rotated_files(path), path]
            for x in f.read_text().splitlines()]
    assert sorted(seen) == list(range(800))


def test_audit_write_failure_is_an_error(tmp_path):
    from triage.audit_trail import AuditError, AuditTrail

    (tmp_path / "audit.jsonl").mkdir()
    trail = AuditTrail(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match="cannot write the audit trail"):
        trail.check()
    with pytest.raises(AuditError):
        trail.write({"event": "x"})


def test_audit_probability_only_when_the_param_says_so(served, tmp_path):
    tiny, _ = served
    params = write_params(tmp_path / "params.yaml", tiny["model"],
                          **{"inference.audit_probability": True})
    audit = tmp_path / "audit.jsonl"
    client = _client(create_app(tiny["model"], params, tokens_file=tiny["tokens"],
                                audit_log=audit, embeddings_path=None), tiny)
    r = client.post("/predict", files={"file": ("a.png", _png(4, True, tmp_path), "image/png")})
    assert r.status_code == 200
    line = json.loads(audit.read_text().splitlines()[-1])
    assert line["probability"] == r.json()["probability"]
