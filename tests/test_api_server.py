"""The API as deployed: `python -m triage.api` in a subprocess on 127.0.0.1 (a free port),
a real tiny model bundle (tests/helpers.py), real bearer tokens, talked to with httpx.

Covers every access status (401 no / unknown / revoked token, 403 wrong role, 429 with
Retry-After, 503 busy and 503 when the audit line cannot be written), the start-up refusals,
a bounded burst with exactly one audit line per request, rotation, the batch CLI's and the
purge's audit lines, no file name or token in the audit trail or the server's log, and a
bounded schemathesis fuzz run of the OpenAPI schema (no 5xx)."""
import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import train_tiny_model, write_params
from imagefactory import blob_image

from triage.access import add_token, revoke_token

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240  # seconds: torch import + embedder on a busy 2-core CI machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tokens: Path, audit: Path, **extra) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "TRIAGE_API_TOKENS_FILE": str(tokens),
           "TRIAGE_AUDIT_LOG": str(audit), **extra}
    env.pop("TRIAGE_LOGLEVEL", None)
    return env


class Server:
    """`python -m triage.api` in a subprocess; stdout + stderr captured to ``log``."""

    def __init__(self, tiny: dict, folder: Path, params: Path, tokens: Path, audit: Path,
                 *args: str):
        self.folder, self.tokens, self.audit = folder, tokens, audit
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "triage.api", "--port", str(self.port), "--params",
             str(params), "--model", str(tiny["model"]), *args],
            cwd=tiny["root"], env=_env(tokens, audit), stdout=self._log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not start:\n{self.log_text()}")
            time.sleep(0.2)

    def log_text(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")

    def lines(self) -> list[dict]:
        return [json.loads(x) for x in self.audit.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tiny = train_tiny_model(tmp_path_factory.mktemp("server_model"))
    tiny["png"] = blob_image(tiny["root"] / "upload" / "x.png", True, 5).read_bytes()
    return tiny


def _start(tiny, tmp_path_factory, name: str, **params) -> tuple[Server, dict]:
    folder = tmp_path_factory.mktemp(name)
    tokens, audit = folder / "config" / "api_tokens.json", folder / "state" / "audit.jsonl"
    toks = {tid: add_token(tokens, tid, role) for tid, role in (
        ("pred", "predict"), ("reader", "read"), ("gone", "predict"), ("fuzz", "predict"),
        ("rl", "read"), ("busy", "predict"))}
    revoke_token(tokens, "gone")
    p = write_params(folder / "params.yaml", tiny["model"],
                     **{f"inference.{k}": v for k, v in params.items()})
    return Server(tiny, folder, p, tokens, audit), toks


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """Generous limits: the statuses, the burst, the log grep and the fuzz run."""
    srv, toks = _start(tiny, tmp_path_factory, "server_a", rate_limit_per_minute=100_000,
                       max_concurrent=64)
    yield srv, toks
    srv.stop()


@pytest.fixture(scope="module")
def tight(tiny, tmp_path_factory):
    """Tight limits: 5 requests a minute, one prediction at a time, a 2 kB audit file."""
    srv, toks = _start(tiny, tmp_path_factory, "server_b", rate_limit_per_minute=5,
                       max_concurrent=1, audit_max_bytes=2048, audit_keep=2)
    yield srv, toks
    srv.stop()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _predict(srv, tiny, token, name="scan.png", **kw):
    return httpx.post(srv.url + "/predict", files={"file": (name, tiny["png"], "image/png")},
                      headers=_bearer(token) if token else {}, timeout=60, **kw)


# --------------------------------------------------------------------------- statuses
def test_each_access_status(server, tiny):
    srv, toks = server
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 200 and r.headers["x-request-id"]  # open
    r = httpx.get(srv.url + "/model")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = _predict(srv, tiny, None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(srv.url + "/model", headers={"Authorization": f"Basic {toks['pred']}"})
    assert r.status_code == 401
    r = httpx.get(srv.url + "/model", headers=_bearer("not-a-token-" + "x" * 30))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert "invalid token" in r.json()["detail"]
    r = _predict(srv, tiny, toks["gone"])
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    r = _predict(srv, tiny, toks["reader"])
    assert r.status_code == 403 and "needs predict" in r.json()["detail"]
    assert httpx.get(srv.url + "/model", headers=_bearer(toks["reader"])).status_code == 200
    assert httpx.get(srv.url + "/model", headers=_bearer(toks["pred"])).status_code == 200
    r = _predict(srv, tiny, toks["pred"])
    assert r.status_code == 200 and r.json()["qc_status"] == "ok"
    assert httpx.get(srv.url + "/openapi.json").status_code == 401
    assert httpx.get(srv.url + "/docs", headers=_bearer(toks["reader"])).status_code == 404
    by_id = {x["request_id"]: x for x in srv.lines() if x["event"] == "request"}
    line = by_id[r.headers["x-request-id"]]
    assert (line["token_id"], line["role"], line["auth"], line["status"], line["endpoint"]) == \
        ("pred", "predict", "ok", 200, "/predict")
    assert line["qc_status"] == "ok" and line["decision"] in ("cancer", "normal")
    assert line["model_sha256"] == hashlib.sha256(tiny["model"].read_bytes()).hexdigest()[:12]
    assert "probability" not in line and line["duration_ms"] >= 0
    statuses = sorted(x["status"] for x in by_id.values())
    assert statuses.count(401) >= 6 and 403 in statuses


def test_a_revoke_takes_effect_without_restart(server):
    srv, _ = server
    token = add_token(srv.tokens, "temp", "read")  # added while the server runs
    assert httpx.get(srv.url + "/model", headers=_bearer(token)).status_code == 200
    res = subprocess.run([sys.executable, "-m", "triage.api", "token", "revoke", "--id", "temp"],
                         env=_env(srv.tokens, srv.audit), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r = httpx.get(srv.url + "/model", headers=_bearer(token))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_rate_limit_answers_429_with_retry_after(tight):
    srv, toks = tight
    codes = [httpx.get(srv.url + "/model", headers=_bearer(toks["rl"])).status_code
             for _ in range(5)]
    assert codes == [200] * 5
    r = httpx.get(srv.url + "/model", headers=_bearer(toks["rl"]))
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert httpx.get(srv.url + "/model", headers=_bearer(toks["reader"])).status_code == 200  # per token
    assert httpx.get(srv.url + "/health").status_code == 200


def test_concurrent_predictions_beyond_the_bound_get_503(tight, tiny):
    """max_concurrent: 1 — a prediction still receiving its body holds the only slot."""
    srv, toks = tight
    part = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + tiny["png"][:100])  # the start of an upload
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as slow:
        slow.sendall((f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {toks['busy']}"
                      f"\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                      f"Content-Length: {len(part) + 10_000}\r\n\r\n").encode() + part)
        time.sleep(1.0)  # the server has admitted it and waits for the rest of the body
        r = _predict(srv, tiny, toks["busy"])
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy" in r.json()["detail"]
    time.sleep(0.5)
    r = _predict(srv, tiny, toks["busy"])
    assert r.status_code == 200, r.text


def test_audit_write_failure_fails_the_request_with_503(tight, tiny):
    srv, toks = tight
    saved = srv.audit.with_name("saved.jsonl")
    os.replace(srv.audit, saved)
    srv.audit.mkdir()  # the audit path is now a folder: no line can be written
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "audit trail unavailable" in r.json()["detail"]
        r = _predict(srv, tiny, toks["busy"])
        assert r.status_code == 503 and "probability" not in r.text
    finally:
        srv.audit.rmdir()
        os.replace(saved, srv.audit)
    assert httpx.get(srv.url + "/health").status_code == 200
    assert "cannot write the audit trail" in srv.log_text()


def test_audit_file_rotates(tight):
    srv, _ = tight
    for _ in range(40):
        assert httpx.get(srv.url + "/health").status_code == 200
    names = sorted(p.name for p in srv.audit.parent.iterdir() if p.name.startswith("audit.jsonl"))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.lock"]
    for p in (srv.audit, srv.audit.with_name("audit.jsonl.1"), srv.audit.with_name("audit.jsonl.2")):
        assert 0 < p.stat().st_size <= 2048
        assert all(json.loads(x)["event"] for x in p.read_text().splitlines())
        assert oct(p.stat().st_mode)[-3:] == "600"


# --------------------------------------------------------------------------- start-up
def _start_args(tmp_path, env, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "triage.api", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_start_up_refusals(tiny, tmp_path):
    tokens, audit = tmp_path / "none.json", tmp_path / "audit.jsonl"
    common = ["--params", str(tiny["params"]), "--model", str(tiny["model"])]
    res = _start_args(tmp_path, _env(tokens, audit), "--no-auth", "--host", "0.0.0.0", *common)
    assert res.returncode != 0 and "--no-auth is refused for --host 0.0.0.0" in res.stderr
    res = _start_args(tmp_path, _env(tokens, audit), *common)
    assert res.returncode != 0 and "refuses to start" in res.stderr
    add_token(tokens, "a", "read")
    revoke_token(tokens, "a")
    res = _start_args(tmp_path, _env(tokens, audit), *common)
    assert res.returncode != 0 and "no active token" in res.stderr
    res = _start_args(tmp_path, _env(ROOT / "api_tokens.json", audit), *common)
    assert res.returncode != 0 and "inside the repository" in res.stderr
    add_token(tokens, "b", "read")
    res = _start_args(tmp_path, _env(tokens, ROOT / "data" / "audit.jsonl"), *common)
    assert res.returncode != 0 and "inside the repository" in res.stderr
    assert not (ROOT / "api_tokens.json").exists() and not (ROOT / "data" / "audit.jsonl").exists()


def test_no_auth_on_loopback_starts_with_a_warning(tiny, tmp_path):
    srv = Server(tiny, tmp_path, tiny["params"], tmp_path / "none.json", tmp_path / "a.jsonl",
                 "--no-auth", "--host", "127.0.0.1")
    try:
        assert httpx.get(srv.url + "/model").status_code == 200
        assert "WARNING: --no-auth" in srv.log_text()
        lines = srv.lines()
        assert lines[0]["event"] == "start" and lines[0]["auth"] == "disabled"
        assert lines[-1]["auth"] == "disabled" and lines[-1]["token_id"] is None
    finally:
        srv.stop()


# --------------------------------------------------------------------------- load and privacy
def test_burst_has_exactly_one_audit_line_per_request(server, tiny):
    srv, toks = server
    n, width = 200, 20

    async def burst():
        sem = asyncio.Semaphore(width)
        limits = httpx.Limits(max_connections=width)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as client:
            async def one(i):
                async with sem:
                    if i % 4 == 3:
                        return await client.get("/model", headers=_bearer(toks["reader"]))
                    return await client.post("/predict", headers=_bearer(toks["pred"]), files={
                        "file": (f"b{i}.png", tiny["png"], "image/png")})
            return await asyncio.gather(*(one(i) for i in range(n)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * n
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == n
    lines = [x for x in srv.lines() if x["event"] == "request"]
    all_ids = [x["request_id"] for x in lines]
    assert len(all_ids) == len(set(all_ids))  # no duplicated line, ever
    mine = [x for x in lines if x["request_id"] in set(ids)]
    assert len(mine) == n  # none lost
    assert sum(x["endpoint"] == "/predict" for x in mine) == 150
    assert all(x["status"] == 200 for x in mine)


def test_no_file_name_token_or_image_id_in_audit_trail_or_server_log(server, tiny):
    srv, toks = server
    name = "Jane_Doe_1970-01-01_MRN12345.png"
    r = _predict(srv, tiny, toks["pred"], name=name, params={"patient": "Jane_Doe_q"})
    assert r.status_code == 200
    httpx.get(srv.url + "/model", headers=_bearer(toks["gone"]))  # a refused token too
    time.sleep(0.5)
    audit, log = srv.audit.read_text(), srv.log_text()
    assert r.headers["x-request-id"] in audit and "POST /predict" in log  # both did record it
    for secret in ("Jane_Doe", "MRN12345", r.json()["id"], *toks.values()):
        assert secret not in audit, secret
        assert secret not in log, secret


def test_schemathesis_fuzz_finds_no_server_error(server, tmp_path):
    """Every operation of /openapi.json, bounded (50 examples each, no shrinking), with a
    token: no response may be a 5xx."""
    pytest.importorskip("schemathesis")
    srv, toks = server
    schema = httpx.get(srv.url + "/openapi.json", headers=_bearer(toks["fuzz"]))
    assert schema.status_code == 200
    spec = schema.json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    (tmp_path / "openapi.json").write_text(schema.text)
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    res = subprocess.run(
        [exe, "run", str(tmp_path / "openapi.json"), "--url", srv.url,
         "-H", f"Authorization: Bearer {toks['fuzz']}", "--checks", "not_a_server_error",
         "--max-examples", "50", "--phases", "examples,coverage,fuzzing", "--workers", "1",
         "--seed", "0", "--no-shrink", "--generation-database", "none", "--request-timeout", "60",
         "--no-color"],
        cwd=tmp_path, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True, text=True,
        timeout=480)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    fuzzed = [x for x in srv.lines() if x.get("token_id") == "fuzz"]
    assert {x["endpoint"] for x in fuzzed} >= {"/predict", "/model"}, res.stdout[-3000:]
    assert len(fuzzed) >= 50 and srv.proc.poll() is None


# --------------------------------------------------------------------------- batch CLI and purge
def _script(name, args, cwd, env):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_batch_cli_appends_one_audit_line(tiny, tmp_path):
    folder = tmp_path / "Jane_Doe_batch"
    for i in range(3):
        blob_image(folder / f"Jane_Doe_{i}.png", i == 0, 50 + i)
    (folder / "notes.png").write_text("not an image")
    audit, out = tmp_path / "state" / "audit.jsonl", tmp_path / "pred.csv"
    env = _env(tmp_path / "t.json", audit)
    args = [str(folder), "--out", str(out), "--params", str(tiny["params"]),
            "--embeddings", str(tmp_path / "none.parquet")]
    res = _script("predict.py", args, tiny["root"], env)
    assert res.returncode == 0, res.stderr
    (line,) = [json.loads(x) for x in audit.read_text().splitlines()]
    assert line["event"] == "batch" and line["images"] == 4 and line["user"] and line["host"]
    assert line["qc_status"] == {"ok": 3, "not_an_image": 1}
    assert sum(line["decision"].values()) == 4 and line["decision"]["none"] == 1
    assert line["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert line["model_sha256"] == hashlib.sha256(tiny["model"].read_bytes()).hexdigest()[:12]
    assert "Jane" not in audit.read_text()
    # an audit trail that cannot be written: exit 1, a clear message, no output
    out.unlink()
    os.replace(audit, tmp_path / "kept.jsonl")
    audit.mkdir()
    res = _script("predict.py", args, tiny["root"], env)
    assert res.returncode == 1 and "cannot write the audit trail" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_purge_removes_expired_files_and_audits_it(tiny, tmp_path):
    preds, state = tmp_path / "predictions", tmp_path / "state"
    audit = state / "audit.jsonl"
    old = time.time() - 40 * 86400
    files = {}
    for rel in ("batch_old.csv", "sub/older.csv", "batch_new.csv", "keep_old.txt"):
        p = preds / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("id,path\nSECRET_CONTENT,x\n")
        files[rel] = p
    state.mkdir()
    for rel in ("audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"):
        (state / rel).write_text('{"event":"x"}\n')
    for p in (files["batch_old.csv"], files["sub/older.csv"], files["keep_old.txt"], audit,
              state / "audit.jsonl.2"):
        os.utime(p, (old, old))
    env = _env(tmp_path / "t.json", audit)
    args = ["--older-than", "30", "--predictions", str(preds), "--params", str(tiny["params"])]
    res = _script("purge.py", [*args, "--dry-run"], tmp_path, env)
    assert res.returncode == 0 and "would remove 2 prediction CSV(s)" in res.stdout
    assert files["batch_old.csv"].exists()
    res = _script("purge.py", args, tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert "removed 2 prediction CSV(s)" in res.stdout and "1 rotated audit file(s)" in res.stdout
    assert "batch_old.csv" in res.stdout and "older.csv" in res.stdout
    assert "audit.jsonl.2" in res.stdout and "SECRET_CONTENT" not in res.stdout
    assert not files["batch_old.csv"].exists() and not files["sub/older.csv"].exists()
    assert files["batch_new.csv"].exists() and files["keep_old.txt"].exists()
    assert audit.exists() and (state / "audit.jsonl.1").exists()  # live file never removed
    assert not (state / "audit.jsonl.2").exists()
    last = json.loads(audit.read_text().splitlines()[-1])
    assert (last["event"], last["removed_predictions"], last["removed_audit_files"]) == \
        ("purge", 2, 1)
    assert last["older_than_days"] == 30
    # default age from params inference.retention_days; an unwritable audit trail: nothing removed
    p = write_params(tmp_path / "params.yaml", tiny["model"], **{"inference.retention_days": 10})
    os.utime(files["batch_new.csv"], (old, old))
    os.replace(audit, tmp_path / "kept.jsonl")
    audit.mkdir()
    res = _script("purge.py", ["--predictions", str(preds), "--params", str(p)], tmp_path, env)
    assert res.returncode == 1 and "nothing was removed" in res.stderr
    assert files["batch_new.csv"].exists()
