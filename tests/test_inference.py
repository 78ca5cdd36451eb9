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


# --------------------------------------------------------------------------- small batches
@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """20 distinct images (blobs and smooth shapes, 48-128 px: squashed to the embed size)."""
    tmp = tmp_path_factory.mktemp("scans")
    paths = [str(blob_image(tmp / f"b{i:02d}.png", i % 3 == 0, seed=700 + i, size=48 + 8 * (i % 11)))
             for i in range(14)]
    paths += [str(F.write_smooth(tmp / f"s{i:02d}.png", seed=800 + i, size=96)) for i in range(6)]
    return paths


def _pipeline_vectors(paths, size):
    """What the embed stage writes: full batches of 64, the last one padded to 64."""
    from triage.embed import Embedder

    emb = Embedder("random", seed=42, image_size=size, batch_size=64, device="cpu").fit()
    emb.small_batches_ = False  # the old path, padding every batch to batch_size
    return emb.transform(paths)


@pytest.mark.parametrize("size", [32, 128])
def test_small_batches_give_the_pipelines_bytes(scans, size):
    """The canonical kernels make a vector independent of its batch size and batch-mates
    (triage.embed.MIN_BATCH): one image (run at batch 2), 2-13 images with other
    batch-mates in other orders (run at 2-16), on 2 threads and on 1, give exactly the
    bytes the pipeline wrote at batch 64."""
    import torch

    from triage.embed import Embedder

    ref = _pipeline_vectors(scans, size)
    emb = Embedder("random", seed=42, image_size=size, batch_size=64, device="cpu").fit()
    assert emb.small_batches_
    rng = np.random.default_rng(size)
    threads = torch.get_num_threads()
    try:
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            for i in (0, 7, 19):
                assert emb.transform([scans[i]]).tobytes() == ref[i].tobytes()
            for n in (2, 3, 5, 8, 13):
                idx = rng.permutation(len(scans))[:n]
                out = emb.transform([scans[j] for j in idx])
                assert out.tobytes() == ref[idx].tobytes(), (n_threads, n)
    finally:
        torch.set_num_threads(threads)


def test_a_batch_of_one_is_not_the_pipelines_bytes(scans):
    """Why MIN_BATCH is 2: a single-image batch sends ResNet18's small late convolutions to
    ATen's own kernel instead of oneDNN, which sums in another order. If this starts
    passing with equal bytes, torch changed its dispatch: re-measure before relying on it."""
    from triage.embed import Embedder

    ref = _pipeline_vectors(scans[:4], 128)
    one = Embedder("random", seed=42, image_size=128, batch_size=1, device="cpu").fit()
    assert one.run_size(1) == 1
    out = one.transform(scans[:4])
    assert not np.array_equal(out, ref)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)  # the same vectors, other last bits


def test_run_sizes_and_where_small_batches_are_not_used():
    from triage.embed import Embedder

    emb = Embedder("random", image_size=32, batch_size=64, device="cpu").fit()
    assert [emb.run_size(n) for n in (1, 2, 3, 5, 17, 63, 64)] == [2, 2, 4, 8, 32, 64, 64]
    assert Embedder("random", image_size=32, batch_size=48, device="cpu").fit().run_size(33) == 48
    # not proven batch-independent: every batch padded to batch_size, as before
    for kw in ({"kernels": "fast"}, {"precision": "bf16"}, {"backbone": "resnet34"}):
        other = Embedder("random", image_size=32, batch_size=64, device="cpu", **kw).fit()
        assert not other.small_batches_ and other.run_size(1) == 64, kw


def test_workers_only_for_long_calls_and_they_persist(scans):
    """At most one batch decodes in the main process (no worker start-up per request);
    longer calls go through DataLoader workers that stay up for the next call; the same
    bytes either way."""
    from triage.embed import Embedder

    emb = Embedder("random", seed=42, image_size=32, batch_size=4, num_workers=2,
                   device="cpu").fit()
    ref = _pipeline_vectors(scans, 32)
    assert emb.transform(scans[:4]).tobytes() == ref[:4].tobytes()
    assert emb._loader is None  # one batch: no workers started
    assert emb.transform(scans[:10]).tobytes() == ref[:10].tobytes()
    workers = [w.pid for w in emb._loader._iterator._workers]
    assert len(workers) == 2
    assert emb.transform(scans[5:]).tobytes() == ref[5:].tobytes()
    assert [w.pid for w in emb._loader._iterator._workers] == workers  # the same processes
