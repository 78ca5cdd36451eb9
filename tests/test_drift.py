"""Drift: no drift on a same-distribution batch, drift on a contrast- or blur-shifted one
(real demo images, real random-init ResNet18 embeddings), deterministic, readable page."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from triage.demo import generate_demo
from triage.drift import compare, flat_metrics, image_stats, rbf_mmd_test, render_html
from triage.embed import Embedder
from triage.models import make_classifier

ROOT = Path(__file__).resolve().parents[1]
KW = dict(alpha=0.01, n_permutations=200, pca_components=8, seed=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo (pool 160, batch 60, same prevalence), its embeddings and a model."""
    root = tmp_path_factory.mktemp("drift_demo")
    generate_demo(root / "raw", n_labeled=40, n_unlabeled=120, n_test=60, prevalence=0.3,
                  test_prevalence=0.3, image_size=64, seed=3)
    ref = sorted((root / "raw/labeled").rglob("*.png")) + sorted((root / "raw/unlabeled").glob("*.png"))
    new = sorted((root / "raw/test").rglob("*.png"))
    shifted = {}
    for kind in ("contrast", "blur"):
        out = root / kind
        out.mkdir()
        shifted[kind] = []
        for p in new:
            im = Image.open(p).convert("L")
            if kind == "blur":
                im = im.filter(ImageFilter.GaussianBlur(1.5))
            else:
                a = np.asarray(im, float)
                im = Image.fromarray(np.clip(a.mean() + 0.6 * (a - a.mean()), 0, 255).astype(np.uint8))
            dst = out / f"{p.parent.name}_{p.name}"
            im.save(dst)
            shifted[kind].append(dst)
    emb = Embedder("random", seed=0, image_size=64, batch_size=32, num_workers=0, device="cpu").fit()
    X_ref = emb.transform([str(p) for p in ref])
    y_lab = np.array([p.parent.name for p in ref[:40]])
    model = make_classifier("logreg", 0.1).fit(X_ref[:40], y_lab)

    def side(paths):
        X = emb.transform([str(p) for p in paths])
        p = model.predict_proba(X)[:, list(model.classes_).index("cancer")]
        return X, image_stats(paths, 64), p

    return {"ref": side(ref), "same": side(new), "paths_new": new,
            **{k: side(v) for k, v in shifted.items()}}


def _compare(demo, batch):
    (Xr, Sr, pr), (Xb, Sb, pb) = demo["ref"], demo[batch]
    return compare(Xr, Xb, Sr, Sb, pr, pb, 0.5, **KW)


def test_same_distribution_batch_shows_no_drift(demo):
    res = _compare(demo, "same")
    assert res["drift"] == 0, flat_metrics(res)
    assert res["mmd"]["p_value"] >= 0.01 and res["image_stats_min_p_adjusted"] >= 0.01


@pytest.mark.parametrize("kind", ["contrast", "blur"])
def test_shifted_batch_is_flagged(demo, kind):
    res = _compare(demo, kind)
    assert res["drift"] == 1
    assert res["embedding_drift"] == 1 and res["image_stats_drift"] == 1
    stats = {s["name"]: s for s in res["image_stats"]}
    changed = "contrast" if kind == "contrast" else "sharpness"
    assert stats[changed]["p_adjusted"] < 0.01
    assert stats[changed]["batch_mean"] < stats[changed]["ref_mean"]


def test_drift_is_deterministic(demo):
    a, b = flat_metrics(_compare(demo, "blur")), flat_metrics(_compare(demo, "blur"))
    assert a == b


def test_mmd_permutation_test_on_gaussians():
    rng = np.random.default_rng(0)
    A = rng.normal(0, 1, (150, 5))
    same = rng.normal(0, 1, (100, 5))
    moved = rng.normal(0, 1, (100, 5)) + np.array([0.6, 0, 0, 0, 0])
    assert rbf_mmd_test(A, same, 200, 0)["p_value"] > 0.05
    assert rbf_mmd_test(A, moved, 200, 0)["p_value"] < 0.01


def test_prediction_shift_is_reported_apart_from_image_drift():
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (300, 20))
    S = rng.normal(100, 10, (300, 3))
    p_ref = rng.uniform(0, 1, 300)
    p_new = np.clip(rng.uniform(0, 1, 200) + 0.4, 0, 1)  # many more positives, same images
    res = compare(X, X[:200], S, S[:200], p_ref, p_new, 0.5, **KW)
    assert res["prediction_shift"] == 1 and res["drift"] == 0


def test_report_page_is_self_contained(demo, tmp_path):
    res = _compare(demo, "contrast")
    html = render_html(res, batch_name="contrast <batch>", Z_ref=res["Z_ref"], Z_new=res["Z_new"],
                       stats_ref=demo["ref"][1], stats_new=demo["contrast"][1],
                       typical_paths=demo["paths_new"][:2])
    assert "Drift detected" in html and "contrast &lt;batch&gt;" in html
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert html == render_html(res, batch_name="contrast <batch>", Z_ref=res["Z_ref"],
                               Z_new=res["Z_new"], stats_ref=demo["ref"][1],
                               stats_new=demo["contrast"][1], typical_paths=demo["paths_new"][:2])


def test_embedding_family_holds_its_level_on_a_flat_spectrum_null():
    """Same distribution on both sides (isotropic 64-d Gaussian): the scaler+PCA must be fitted
    on the pooled sample, else the reference over-fits its own principal axes, the groups are
    not exchangeable and MMD / per-component KS reject almost always."""
    rejections, mmd_rej, ks_rej = 0, 0, 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        Xr, Xn = rng.normal(size=(200, 64)), rng.normal(size=(100, 64))
        S_r, S_n = rng.normal(size=(200, 3)), rng.normal(size=(100, 3))
        res = compare(Xr, Xn, S_r, S_n, rng.random(200), rng.random(100), 0.5, alpha=0.05,
                      n_permutations=49, pca_components=10, seed=seed)
        rejections += res["embedding_drift"]
        mmd_rej += res["mmd"]["p_value"] < 0.05
        ks_rej += res["pca_ks_min_p_adjusted"] < 0.05
    assert rejections <= 3, (rejections, mmd_rej, ks_rej)
    assert mmd_rej <= 4 and ks_rej <= 4, (mmd_rej, ks_rej)


def test_embedding_family_is_bonferroni_corrected_at_alpha_over_2():
    """MMD and the min-KS p are each compared to alpha/2, not alpha."""
    rng = np.random.default_rng(0)
    Xr, Xn = rng.normal(size=(150, 5)), rng.normal(size=(100, 5))
    Xn[:, 0] += 0.45
    S = rng.normal(size=(250, 3))
    kw = dict(n_permutations=399, pca_components=5, seed=0)
    res = compare(Xr, Xn, S[:150], S[150:], rng.random(150), rng.random(100), 0.5, alpha=0.05, **kw)
    assert res["embedding_alpha"] == pytest.approx(0.025)
    p_mmd, p_ks = res["mmd"]["p_value"], res["pca_ks_min_p_adjusted"]
    assert res["embedding_drift"] == int(p_mmd < 0.025 or p_ks < 0.025)
    # an alpha between min(p) and 2·min(p): significant at alpha, not at alpha/2 → no drift
    a = 1.5 * min(p_mmd, p_ks)
    assert 1 / 400 < a / 2 < min(p_mmd, p_ks) < a, (p_mmd, p_ks)
    res2 = compare(Xr, Xn, S[:150], S[150:], rng.random(150), rng.random(100), 0.5, alpha=a, **kw)
    assert res2["mmd"]["p_value"] == p_mmd and res2["pca_ks_min_p_adjusted"] == p_ks
    assert res2["embedding_drift"] == 0, (p_mmd, p_ks, a)
    html = render_html(res, batch_name="b")
    assert "α/2" in html
    with pytest.raises(Exception, match="alpha/2"):
        compare(Xr, Xn, S[:150], S[150:], rng.random(150), rng.random(100), 0.5, alpha=0.05,
                n_permutations=30, pca_components=5, seed=0)


def _write_embeddings(path, rows, X, fingerprint: dict):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from triage.store import embedding_schema

    meta = {b"embedding_fingerprint": json.dumps(fingerprint).encode()}
    dim = X.shape[1]  # the embedder's width (embed.layers decides it)
    table = pa.Table.from_arrays([
        pa.array(rows["id"], pa.string()), pa.array(rows["split"], pa.string()),
        pa.array(rows["label"], pa.string(), from_pandas=True),
        pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1).astype(np.float32)), dim),
    ], schema=embedding_schema(dim).with_metadata(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_drift_stage_never_prints_logs_or_reports_the_batch_folder_path(tmp_path):
    """Folder names can carry patient identifiers: the folder batch is named by a neutral
    label (file count + content digest) in stdout, the DVCLive param, metrics and the page."""
    import hashlib
    import os
    import subprocess
    import sys

    import pandas as pd
    from helpers import train_tiny_model, write_params
    from imagefactory import blob_image

    tiny = train_tiny_model(tmp_path / "model")
    repo = tmp_path / "repo"
    pool = [blob_image(repo / f"data/raw/pool/{i:03d}.png", i % 2 == 0, seed=100 + i) for i in range(24)]
    ids = [hashlib.sha256(p.read_bytes()).hexdigest() for p in pool]
    rows = pd.DataFrame({"id": ids, "split": ["labeled"] * 8 + ["unlabeled"] * 16,
                         "label": ["cancer", "normal"] * 4 + [None] * 16})
    _write_embeddings(repo / "data/features/embeddings.parquet", rows,
                      tiny["embedder"].transform([str(p) for p in pool]), tiny["embedder"].fingerprint_)
    (repo / "data/qc").mkdir(parents=True)
    rows.assign(path=[str(p) for p in pool]).to_parquet(repo / "data/qc/manifest_clean.parquet")
    secret = "Jane_Doe_MRN0012345"
    batch = repo / "data/raw/batches" / secret
    for i in range(8):
        blob_image(batch / f"{secret}_{i}.png", i % 2 == 0, seed=200 + i)
    write_params(repo / "params.yaml", tiny["model"], **{"drift.batch": f"data/raw/batches/{secret}"})
    env = {k: v for k, v in os.environ.items() if k != "DVCLIVE_TEST"}  # log for real
    res = subprocess.run([sys.executable, str(ROOT / "stages/drift.py")], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "folder batch (8 files, content " in res.stdout
    written = [p for p in (repo / "metrics").rglob("*") if p.is_file()] + [repo / "reports/drift.html"]
    assert any("folder batch (8 files" in p.read_text(errors="replace") for p in written
               if p.suffix in (".yaml", ".json"))  # the DVCLive param
    for text in [res.stdout, res.stderr] + [p.read_text(errors="replace") for p in written]:
        assert "Jane_Doe" not in text and "MRN0012345" not in text and "batches/" not in text
    html = (repo / "reports/drift.html").read_text()
    assert "<title>Drift report</title>" in html and "folder batch (8 files" in html
    # a missing batch folder is a clear error that does not echo the path either
    write_params(repo / "params.yaml", tiny["model"], **{"drift.batch": f"data/raw/batches/{secret}_x"})
    res = subprocess.run([sys.executable, str(ROOT / "stages/drift.py"), "--metrics", "m.json"],
                         cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "drift.batch" in res.stderr, res.stderr
    assert "Jane_Doe" not in res.stdout + res.stderr


def test_prevalence_matched_reference_has_the_batch_rate_and_is_seeded():
    from triage.drift import prevalence_matched

    pred = np.r_[np.ones(60, bool), np.zeros(140, bool)]  # pool predicted 30 % positive
    idx = prevalence_matched(pred, 0.6, 100, np.random.default_rng(0))
    assert len(idx) == 100 and len(set(idx)) == 100 and np.all(np.diff(idx) > 0)
    assert pred[idx].mean() == pytest.approx(0.6, abs=0.01)
    # limited by the 60 predicted positives: 60 / 0.75 = 80 items at most
    assert len(prevalence_matched(pred, 0.75, 400, np.random.default_rng(0))) == 80
    assert pred[prevalence_matched(pred, 0.0, 50, np.random.default_rng(0))].sum() == 0
    np.testing.assert_array_equal(idx, prevalence_matched(pred, 0.6, 100, np.random.default_rng(0)))


def test_a_change_of_prevalence_alone_is_not_image_drift_once_matched():
    """Same class-conditional images, 25 % vs 60 % positives: the unmatched embedding test
    sees the mix change; against a reference resampled to the batch's predicted rate it
    does not, while the predicted-positive-rate test still reports the shift."""
    from triage.drift import prevalence_matched

    rng = np.random.default_rng(0)
    mu = np.r_[np.full(3, 2.0), np.zeros(13)]

    def draw(n_pos, n_neg):
        X = np.r_[rng.normal(0, 1, (n_pos, 16)) + mu, rng.normal(0, 1, (n_neg, 16)) - mu]
        return X, X[:, :3].mean(1)  # score: a good classifier's margin

    X_ref, s_ref = draw(250, 750)
    X_new, s_new = draw(180, 120)
    p_ref, p_new = 1 / (1 + np.exp(-3 * s_ref)), 1 / (1 + np.exp(-3 * s_new))
    st_ref, st_new = np.zeros((len(X_ref), 3)), np.zeros((len(X_new), 3))
    st_ref[:] = rng.normal(size=st_ref.shape)
    st_new[:] = rng.normal(size=st_new.shape)
    kw = dict(alpha=0.01, n_permutations=200, pca_components=8, seed=0)
    sub = np.random.default_rng(1).choice(len(X_ref), 300, replace=False)
    raw = compare(X_ref[sub], X_new, st_ref[sub], st_new, p_ref, p_new, 0.5, **kw)
    assert raw["embedding_drift"] == 1  # the mix alone moves the embedding distribution
    idx = prevalence_matched(p_ref >= 0.5, float(np.mean(p_new >= 0.5)), 300,
                             np.random.default_rng(1))
    matched = compare(X_ref[idx], X_new, st_ref[idx], st_new, p_ref, p_new, 0.5, **kw)
    assert matched["embedding_drift"] == 0 and matched["drift"] == 0
    assert matched["prediction_shift"] == 1


def test_unlike_the_pool_thumbnails_are_captioned_with_id_split_and_score_never_a_path(demo):
    res = _compare(demo, "contrast")
    paths = demo["paths_new"][:2]
    ids = ["4c69e1970f330e6d27a2a59501c7", "a54525d04ddc8f06ab56a9b916e8"]
    html = render_html(res, batch_name="b", typical_paths=paths, typical_ids=ids,
                       typical_split="test", typical_scores=[0.01234, 0.0101])
    grid = html[html.index("Batch images most unlike the pool"):]
    assert "<code title='image id (sha256 of the file)'>4c69e197</code><br>test<br>witness 0.0123" in grid
    assert "a54525d0" in grid and "witness 0.0101" in grid
    assert 'alt="image 4c69e197"' in grid
    assert "4c69e1970f33" not in html  # a short prefix, not the whole id
    for p in paths:
        assert str(p) not in html and p.name not in html and p.parent.name + "/" not in html


def _same(n_batch: int, n_ref: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    return compare(rng.normal(size=(n_ref, 8)), rng.normal(size=(n_batch, 8)),
                   rng.normal(100, 10, (n_ref, 3)), rng.normal(100, 10, (n_batch, 3)),
                   rng.uniform(size=n_ref), rng.uniform(size=n_batch), 0.5, **KW)


def test_a_no_drift_verdict_on_a_small_batch_carries_a_low_power_warning():
    from triage.drift import MEDIUM_EFFECT_KS, power_note

    small = _same(40)
    assert small["drift"] == 0
    html = render_html(small, batch_name="b")
    assert "Low power: “no drift detected” is not evidence of no drift at this sample size" in html
    pw = power_note(small)
    assert pw["low_power"] and pw["detectable"] > MEDIUM_EFFECT_KS
    assert f"at least {pw['detectable']:.2f}" in html and f"at least {pw['min_batch']} images" in html
    # the warning sits with the verdict, before the details
    assert html.index("No drift detected") < html.index("Low power") < html.index("<h2>Signals")
    # a batch large enough to see a medium shift: no warning, the rule still stated
    large = _same(300)
    assert large["drift"] == 0 and not power_note(large)["low_power"]
    html = render_html(large, batch_name="b")
    assert "Low power" not in html and "Resolution at this sample size" in html
    # the suggested batch size is where the warning stops
    n = pw["min_batch"]
    assert power_note({**small, "n_batch": n})["low_power"] is False
    assert power_note({**small, "n_batch": n - 1})["low_power"] is True


def test_a_detected_drift_needs_no_low_power_warning(demo):
    res = _compare(demo, "contrast")  # 60 images: small, but the drift was found
    assert res["drift"] == 1
    assert "Low power" not in render_html(res, batch_name="b")


def test_ks_detectable_distance_is_the_ks_critical_value():
    from scipy.stats import kstwobign

    from triage.drift import MEDIUM_EFFECT_KS, ks_detectable_distance

    for alpha in (0.05, 0.01, 0.01 / 3):
        n = m = 5000  # asymptotic regime: c(α)√((n+m)/(nm)) vs the Kolmogorov distribution
        d = ks_detectable_distance(n, m, alpha)
        assert d * np.sqrt(n * m / (n + m)) == pytest.approx(kstwobign.isf(alpha), rel=2e-3)
    # a medium effect (Cohen's d = 0.5 between two normals) as a KS distance
    from scipy.stats import norm
    assert MEDIUM_EFFECT_KS == pytest.approx(2 * norm.cdf(0.25) - 1)
