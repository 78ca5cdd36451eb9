"""Batch inference: a real model bundle (random-init ResNet18 at 32 px + logistic
regression, saved with skops) trained here on tiny real images (tests/helpers.py); the CLI
runs as a user runs it."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imagefactory as F
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import SIZE, train_tiny_model, write_params
from imagefactory import blob_image

from triage.inference import (
    PREDICTION_COLUMNS,
    FingerprintMismatch,
    Predictor,
    build_embedder,
    model_version,
    qc_image,
)
from triage.models import positive_proba

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _run_cli(args, cwd, env=None):
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts/predict.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True)


def test_batch_cli_writes_predictions_with_qc_status(tiny, tmp_path):
    new = tmp_path / "patient_doe_batch"
    good = [blob_image(new / f"scan_{i}.png", cancer=i < 3, seed=100 + i) for i in range(6)]
    F.write_truncated_jpeg(new / "sub" / "cut_transfer.jpg", seed=1)
    F.write_text_as_image(new / "notes.png")
    F.write_blank(new / "flat.png", size=(48, 48))
    out = tmp_path / "pred.csv"
    res = _run_cli([str(new), "--out", str(out), "--params", str(tiny["params"]),
                    "--embeddings", str(tmp_path / "none.parquet")], cwd=tiny["root"])
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(out)
    assert list(df.columns) == PREDICTION_COLUMNS
    assert len(df) == 9
    status = df.set_index(df["path"].map(lambda p: Path(p).name))["qc_status"]
    assert status["cut_transfer.jpg"] == "decode_error"
    assert status["notes.png"] == "not_an_image"
    assert status["flat.png"] == "blank"
    bad = df[df["qc_status"] != "ok"]
    assert bad["probability"].isna().all() and bad["decision"].isna().all()
    assert bad["needs_review"].all()
    ok = df[df["qc_status"] == "ok"].sort_values("path")
    assert len(ok) == 6 and ok["probability"].between(0, 1).all()
    # same numbers as the model applied directly to the same embedder's vectors
    # (the pipeline's probability: snapped to 16 significant bits, triage.canonical)
    p = positive_proba(tiny["bundle"]["model"],
                       tiny["embedder"].transform([str(g) for g in good]), "cancer")
    assert np.allclose(ok["probability"].to_numpy(), p, atol=1e-6)
    assert (ok["decision"] == np.where(p >= 0.5, "cancer", "normal")).all()
    margin = yaml.safe_load(tiny["params"].read_text())["inference"]["review_margin"]
    assert (ok["needs_review"] == (np.abs(p - 0.5) <= margin)).all()
    assert ok["id"].tolist() == [hashlib.sha256(g.read_bytes()).hexdigest() for g in good]
    # no file names or folder names in anything printed
    for name in ("patient_doe", "scan_", "cut_transfer", "notes.png", "flat.png"):
        assert name not in res.stdout + res.stderr


def test_cli_refuses_an_embedder_with_another_fingerprint(tiny, tmp_path):
    params = write_params(tmp_path / "params.yaml", tiny["model"], **{"embed.image_size": 48})
    blob_image(tmp_path / "new" / "a.png", True, 1)
    res = _run_cli([str(tmp_path / "new"), "--out", str(tmp_path / "p.csv"), "--params",
                    str(params), "--embeddings", str(tmp_path / "none.parquet")], cwd=tiny["root"])
    assert res.returncode == 1
    assert "embedding fingerprint mismatch" in res.stderr
    assert tiny["bundle"]["embedding_fingerprint"] in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "p.csv").exists()


def test_mismatch_names_the_differing_fields_from_the_stored_fingerprint(tiny):
    # a model trained on the same embedder under another torch version (an upgrade)
    stored = {k: v for k, v in tiny["embedder"].fingerprint_.items() if k != "fingerprint"}
    stored["torch"] = "2.0.0"
    stored["fingerprint"] = hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()[:16]
    embed = yaml.safe_load(tiny["params"].read_text())["embed"]
    with pytest.raises(FingerprintMismatch, match="torch: model '2.0.0' vs here"):
        build_embedder(stored["fingerprint"], embed, stored)
    # the stored fingerprint of the model rebuilds it even when params say otherwise
    real = dict(tiny["embedder"].fingerprint_)
    emb = build_embedder(real["fingerprint"], {**embed, "image_size": 64}, real)
    assert emb.image_size == SIZE


def test_qc_image_statuses(tmp_path):
    qc = yaml.safe_load((ROOT / "params.yaml").read_text())["qc"]
    assert qc_image(blob_image(tmp_path / "a.png", False, 0), qc)["qc_status"] == "ok"
    assert qc_image(F.write_zero_byte(tmp_path / "z.png"), qc)["qc_status"] == "zero_byte"
    assert qc_image(F.write_tiny(tmp_path / "t.png"), qc)["qc_status"] == "too_small"


def test_model_version_prefers_dvc_lock_only_when_it_matches(tiny, tmp_path):
    model = tiny["model"]
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    lock = tmp_path / "dvc.lock"
    rel = os.path.relpath(model, tmp_path)
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {"outs": [
        {"path": rel, "hash": "md5", "md5": md5}]}}}))
    assert model_version(model, lock) == {"version": md5, "source": "dvc.lock"}
    lock.write_text(lock.read_text().replace(md5, "0" * 32))  # stale lock
    assert model_version(model, lock) == {"version": md5, "source": "file md5"}
    assert model_version(model, tmp_path / "missing.lock")["source"] == "file md5"


def test_predictor_is_deterministic(tiny, tmp_path):
    params = yaml.safe_load(tiny["params"].read_text())
    imgs = [str(blob_image(tmp_path / f"{i}.png", i % 2 == 0, 50 + i)) for i in range(3)]
    pred = Predictor.from_files(tiny["model"], params, embeddings_path=None)
    a, b = pred.predict_paths(imgs), pred.predict_paths(imgs[::-1])
    assert a["probability"].tolist() == b["probability"].tolist()[::-1]  # batch order irrelevant
    json.dumps(a.to_dict(orient="records"))  # serialisable as the API returns it


def test_cli_refuses_to_run_another_checkouts_package(tmp_path):
    # run by path, a script finds the pip-installed (editable) triage first: in a second
    # checkout that would silently be the other checkout's code
    other = tmp_path / "other_checkout"
    (other / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "predict.py", other / "scripts" / "predict.py")
    res = subprocess.run([sys.executable, str(other / "scripts" / "predict.py"), str(tmp_path)],
                         cwd=other, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 1
    assert "belongs to the checkout" in res.stderr and str(other) in res.stderr
    assert "Traceback" not in res.stderr
    ok = subprocess.run([sys.executable, "-m", "scripts.predict", "--help"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "folder of new images" in ok.stdout


def test_batch_cli_non_utf8_file_name_is_a_row_not_a_lost_batch(tiny, tmp_path):
    new = tmp_path / "batch"
    good = [blob_image(new / f"scan_{i}.png", cancer=i < 1, seed=300 + i) for i in range(2)]
    F.write_non_utf8_name(new, stem=b"scan_\xff")
    out = tmp_path / "pred.csv"
    res = _run_cli([str(new), "--out", str(out), "--params", str(tiny["params"]),
                    "--embeddings", str(tmp_path / "none.parquet")], cwd=tiny["root"])
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    df = pd.read_csv(out)
    assert len(df) == 3
    bad = df[df["qc_status"] == "non_utf8_filename"]
    assert len(bad) == 1 and bad["probability"].isna().all() and bad["needs_review"].all()
    assert bad["path"].iloc[0].endswith("scan_\\xff.png")  # the undecodable byte, escaped
    ok = df[df["qc_status"] == "ok"]
    assert sorted(Path(p).name for p in ok["path"]) == [g.name for g in good]
    assert ok["probability"].between(0, 1).all()


def test_predictor_gives_non_utf8_names_a_safe_path(tiny, tmp_path):
    bpath = F.write_non_utf8_name(tmp_path, stem=b"x_\xfe")
    name = os.fsdecode(bpath)
    pred = Predictor(tiny["bundle"], tiny["embedder"], qc=yaml.safe_load(
        tiny["params"].read_text())["qc"], review_margin=0.05)
    df = pred.predict_paths([name])
    assert df["qc_status"].tolist() == ["non_utf8_filename"]
    df["path"].iloc[0].encode("utf-8")  # no lone surrogates
    assert df["path"].iloc[0].endswith("x_\\xfe.png")


def test_batch_cli_neutralises_a_formula_file_name(tiny, tmp_path):
    new = tmp_path / "batch"
    blob_image(new / '=HYPERLINK("http:__evil","open").png', cancer=True, seed=5)
    blob_image(new / "-2+3.png", cancer=False, seed=6)
    out = tmp_path / "pred.csv"
    res = _run_cli([".", "--out", str(out), "--params", str(tiny["params"]),
                    "--embeddings", str(tmp_path / "none.parquet")], cwd=new)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "\n=" not in text and ",=" not in text and "\n-" not in text
    df = pd.read_csv(out)
    assert sorted(df["path"]) == ["'-2+3.png", "'=HYPERLINK(\"http:__evil\",\"open\").png"]
    assert (df["qc_status"] == "ok").all()


def test_batch_cli_out_under_a_file_is_one_clear_line(tiny, tmp_path):
    blob_image(tmp_path / "new" / "a.png", True, 1)
    (tmp_path / "some_file").write_text("x")
    res = _run_cli([str(tmp_path / "new"), "--out", str(tmp_path / "some_file" / "x.csv"),
                    "--params", str(tiny["params"]), "--embeddings", str(tmp_path / "none.parquet")],
                   cwd=tiny["root"])
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR")]
    assert len(err) == 1 and f"cannot write {tmp_path / 'some_file' / 'x.csv'}" in err[0]
