"""Out-of-distribution check: a real demo (64 px, 20 labelled + 300 pool + 100 held-out
test images), embedded with the pipeline's canonical embedder; the bundle's reference is
its training vectors (labelled + pool) and their leave-one-out threshold
(triage.models.ood_reference). Other modalities (text-like pages and checkerboards made
here; brain MRI from the shared datasets when present) must be flagged, held-out images
of the training distribution must mostly not be: in the Predictor, the batch CLI's CSV,
the API's answer and the drift page."""
import hashlib
import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import write_params
from PIL import Image, ImageDraw

from triage.embed import Embedder
from triage.inference import PREDICTION_COLUMNS, Predictor
from triage.models import (
    knn_distance,
    load_model,
    make_classifier,
    ood_flags,
    ood_reference,
    save_model,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
MRI = ROOT.parent / "shared" / "datasets" / "brain_mri_4class" / "Testing"


def other_modality(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Images of another kind than any scan: text-like pages (rows of dark glyph blocks on
    paper) and checkerboard grids (screenshots, charts), 96-160 px."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed * 1000 + i)
        size = int(rng.integers(96, 160))
        if i % 2 == 0:
            im = Image.new("L", (size, size), int(rng.integers(200, 256)))
            draw = ImageDraw.Draw(im)
            for y in range(6, size - 10, 12):
                x = 4
                while x < size - 10:
                    w = int(rng.integers(3, 9))
                    draw.rectangle([x, y, x + w, y + 7], fill=int(rng.integers(0, 60)))
                    x += w + int(rng.integers(2, 6))
        else:
            step = int(rng.integers(6, 20))
            a = ((np.arange(size)[:, None] // step + np.arange(size)[None] // step) % 2) * 180
            im = Image.fromarray((a + int(rng.integers(20, 60))).astype(np.uint8))
        path = folder / f"other_{seed}_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from triage.demo import generate_demo

    root = tmp_path_factory.mktemp("ood")
    generate_demo(root / "demo", n_labeled=20, n_unlabeled=300, n_test=100, image_size=SIZE,
                  seed=3)
    labeled = sorted((root / "demo" / "labeled").glob("*/*.png"))
    pool = sorted((root / "demo" / "unlabeled").glob("*.png"))
    test = sorted(str(p) for p in (root / "demo" / "test").glob("*/*.png"))
    layers = yaml.safe_load((ROOT / "params.yaml").read_text())["embed"]["layers"]
    emb = Embedder("random", seed=42, image_size=SIZE, batch_size=64, device="cpu",
                   layers=layers).fit()  # the default features, as the pipeline's
    X_lab, X_pool = emb.transform([str(p) for p in labeled]), emb.transform([str(p) for p in pool])
    y = np.array([p.parent.name for p in labeled])
    model = make_classifier("logreg", 0.1).fit(X_lab, y)
    bundle = {"model": model, "name": "semi_supervised", "positive_class": "cancer",
              "classes": [str(c) for c in model.classes_], "threshold": 0.5,
              "target_sensitivity": 0.95, "embedding_fingerprint": emb.fingerprint_["fingerprint"],
              "ood": ood_reference(np.r_[X_lab, X_pool], 5, 0.99)}
    model_path = root / "data/models/semi_supervised.skops"
    save_model(bundle, model_path)
    params = write_params(root / "params.yaml", model_path, **{
        "embed.seed": 42, "embed.image_size": SIZE, "embed.batch_size": 64})
    predictor = Predictor.from_files(model_path, yaml.safe_load(params.read_text()),
                                     embeddings_path=None)
    return {"root": root, "emb": emb, "bundle": load_model(model_path), "model": model_path,
            "params": params, "predictor": predictor, "labeled": labeled, "pool": pool,
            "test": test, "X_train": np.r_[X_lab, X_pool], "X_test": emb.transform(test)}


def test_held_out_images_of_the_training_distribution_are_rarely_flagged(world):
    df = world["predictor"].predict_paths(world["test"])
    assert (df["qc_status"] == "ok").all() and df["ood"].map(type).eq(bool).all()
    assert df["ood"].mean() <= 0.05, df["ood"].mean()
    # the flag and the bundle's rule agree, from the CLI's path or straight from vectors
    np.testing.assert_array_equal(df["ood"].to_numpy(bool),
                                  ood_flags(world["bundle"]["ood"], world["X_test"]))


def test_another_modality_is_flagged_and_needs_review(world, tmp_path):
    df = world["predictor"].predict_paths(other_modality(tmp_path, 30))
    assert (df["qc_status"] == "ok").all()
    assert df["ood"].mean() >= 0.95, df["ood"].mean()
    assert df.loc[df["ood"].astype(bool), "needs_review"].all()  # whatever the probability


def test_brain_mri_is_flagged(world):
    if not MRI.is_dir():
        pytest.skip(f"shared brain MRI images not present at {MRI}")
    scans = sorted(str(p) for p in MRI.rglob("*.jpg"))[::40]  # ~33 of the 4 classes
    df = world["predictor"].predict_paths(scans)
    ok = df[df["qc_status"] == "ok"]
    assert len(ok) >= 20
    assert ok["ood"].mean() >= 0.95, ok["ood"].mean()
    assert ok.loc[ok["ood"].astype(bool), "needs_review"].all()


def test_threshold_is_the_leave_one_out_quantile_of_the_training_vectors(world):
    ood, X = world["bundle"]["ood"], world["X_train"].astype(np.float64)
    assert ood["k"] == 5 and ood["quantile"] == 0.99 and len(ood["reference"]) == len(X)
    assert ood["reference"].dtype == np.float32
    assert ood["reference"].tobytes() == world["X_train"].tobytes()  # the vectors, as embedded
    # independently: every pairwise distance, each vector's own left out
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)
    np.fill_diagonal(D, np.inf)
    loo = np.sort(D, axis=1)[:, :5].mean(1)
    assert ood["threshold"] == pytest.approx(np.quantile(loo, 0.99), rel=2 ** -15)
    assert np.mean(loo > ood["threshold"]) <= 0.01 + 1 / len(X)


def test_distances_do_not_depend_on_the_batch(world):
    """A served image's flag is the one it would get in any batch (snapped per value)."""
    ref, X = world["bundle"]["ood"]["reference"], world["X_test"][:20]
    together = knn_distance(X, ref, 5)
    alone = np.concatenate([knn_distance(X[i:i + 1], ref, 5) for i in range(len(X))])
    assert together.tobytes() == alone.tobytes()
    order = np.random.default_rng(0).permutation(len(X))
    assert knn_distance(X[order], ref, 5).tobytes() == together[order].tobytes()


def test_a_bundle_without_a_reference_leaves_ood_empty(world):
    bundle = {k: v for k, v in world["bundle"].items() if k != "ood"}
    qc = yaml.safe_load(world["params"].read_text())["qc"]
    df = Predictor(bundle, world["emb"], qc=qc, review_margin=0.1).predict_paths(world["test"][:3])
    assert df["ood"].isna().all() and list(df.columns) == PREDICTION_COLUMNS


def test_batch_cli_csv_has_the_ood_column(world, tmp_path):
    new = tmp_path / "batch"
    new.mkdir()
    for p in world["test"][:4]:
        (new / Path(p).name).write_bytes(Path(p).read_bytes())
    other_modality(new, 2, seed=7)
    out = tmp_path / "pred.csv"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "scripts/predict.py"), str(new), "--out",
                          str(out), "--params", str(world["params"]), "--embeddings",
                          str(tmp_path / "none.parquet")], cwd=world["root"], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(out)
    assert list(df.columns) == PREDICTION_COLUMNS and PREDICTION_COLUMNS[-1] == "ood"
    other = df["path"].str.contains("other_")
    assert df.loc[other, "ood"].all() and df.loc[other, "needs_review"].all()
    assert df["ood"].dtype == bool


def test_api_answers_ood(world, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from triage.api import create_app

    wanted = {"auth": False, "audit_log": tmp_path / "state" / "audit.jsonl",
              "embeddings_path": None, "lock_path": tmp_path / "dvc.lock"}
    accepted = inspect.signature(create_app).parameters
    app = create_app(world["model"], world["params"],
                     **{k: v for k, v in wanted.items() if k in accepted})
    client = TestClient(app)
    far = Path(other_modality(tmp_path, 1, seed=9)[0]).read_bytes()
    r = client.post("/predict", files={"file": ("x.png", far, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ood"] is True and body["needs_review"] is True
    flags = ood_flags(world["bundle"]["ood"], world["X_test"])
    typical = world["test"][int(np.flatnonzero(~flags)[0])]
    body = client.post("/predict", files={"file": ("t.png", Path(typical).read_bytes(),
                                                    "image/png")}).json()
    assert body["ood"] is False


def test_drift_page_counts_ood_batch_images(world, tmp_path):
    from triage.store import write_embeddings

    repo = tmp_path / "repo"
    train = [*world["labeled"], *world["pool"]]
    ids = [hashlib.sha256(p.read_bytes()).hexdigest() for p in train]
    rows = pd.DataFrame({"id": ids, "path": [str(p) for p in train],
                         "split": ["labeled"] * len(world["labeled"]) + ["unlabeled"] * len(world["pool"]),
                         "label": [p.parent.name for p in world["labeled"]] + [None] * len(world["pool"])})
    write_embeddings(rows, repo / "data/features/embeddings.parquet",
                     fingerprint=world["emb"].fingerprint_,
                     compute=lambda paths: iter([world["X_train"]]))
    (repo / "data/qc").mkdir(parents=True)
    rows.to_parquet(repo / "data/qc/manifest_clean.parquet")
    batch = repo / "data/raw/batches/b1"
    batch.mkdir(parents=True)
    for p in world["test"][:12]:
        (batch / Path(p).name).write_bytes(Path(p).read_bytes())
    other_modality(batch, 8, seed=11)
    write_params(repo / "params.yaml", world["model"], **{
        "embed.seed": 42, "embed.image_size": SIZE, "embed.batch_size": 64,
        "drift.batch": "data/raw/batches/b1"})
    res = subprocess.run([sys.executable, str(ROOT / "stages/drift.py"), "--metrics", "m.json",
                          "--report", "drift.html"], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    metrics = yaml.safe_load((repo / "m.json").read_text())
    n = metrics["ood_count"]
    assert 8 <= n <= 9 and metrics["ood_share"] == pytest.approx(n / 20, abs=1e-6)
    html = (repo / "drift.html").read_text()
    assert f"Out of distribution: {n} batch images of 20 ({n / 20:.1%})" in html
