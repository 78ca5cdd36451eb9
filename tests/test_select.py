"""Active learning: ranking (uncertainty × diversity), to_label.csv, and the annotations
merge of the prepare stage (real image files in tmp_path)."""
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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from triage.errors import DataError
from triage.models import make_classifier, save_model
from triage.prepare import build_manifest
from triage.select import (
    TO_LABEL_COLUMNS,
    cluster_round_robin,
    kcenter_greedy,
    select_batch,
    to_label_table,
    uncertainty,
)
from triage.store import EMBED_DIM, EMBEDDING_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- ranking
def test_uncertainty_margin_and_entropy():
    p = np.array([0.0, 0.5, 1.0, 0.25])
    assert np.allclose(uncertainty(p, "margin"), [0, 1, 0, 0.5], atol=1e-9)
    e = uncertainty(p, "entropy")
    assert e[1] == pytest.approx(1.0) and e[0] < 1e-9 and e[2] < 1e-9 and 0.5 < e[3] < 1.0


def test_kcenter_picks_one_point_per_separated_group():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
    Z = np.concatenate([c + rng.normal(0, 0.1, (25, 2)) for c in centres])
    idx, _ = kcenter_greedy(Z, 4)
    assert sorted(set(i // 25 for i in idx)) == [0, 1, 2, 3]
    # already-labelled points count as covered: the picks avoid group 0
    idx, _ = kcenter_greedy(Z, 3, Z_fixed=Z[:5])
    assert 0 not in {i // 25 for i in idx}


def _near_duplicate_pool(n_distinct=15, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (n_distinct, 64))
    X = np.concatenate([base, base + rng.normal(0, 1e-3, base.shape)])  # every point twice
    p = np.full(len(X), 0.5) + rng.normal(0, 1e-4, len(X))  # all equally uncertain
    return X, p, rng.normal(0, 1, (6, 64))


def _min_pair_distance(X):
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    return D[np.triu_indices(len(X), 1)].min()


def test_diverse_batch_has_no_near_identical_pair_but_top_uncertainty_does():
    X, p, X_lab = _near_duplicate_pool()
    kw = dict(batch_size=10, candidates=0, pca_components=8)
    div = select_batch(X, p, X_lab, diversity="kcenter", **kw)
    assert len(div) == 10 and div["index"].is_unique
    assert _min_pair_distance(X[div["index"]]) > 0.5
    top = select_batch(X, p, X_lab, diversity="none", **kw)
    assert _min_pair_distance(X[top["index"]]) < 0.01  # the failure mode diversity prevents


def test_uncertain_images_are_preferred_among_equally_spread_ones():
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (40, 16))
    unsure = np.sort(rng.choice(40, 10, replace=False))  # not simply the lowest indices
    p = np.full(40, 0.99)
    p[unsure] = 0.5
    X_lab = rng.normal(0, 1, (6, 16))
    # no candidate filter (candidates=0, or >= pool size): the k-center score itself must
    # prefer the uncertain images, with and without labelled images
    for lab in (X_lab, X[:0]):
        for candidates in (0, 40):
            sel = select_batch(X, p, lab, batch_size=5, candidates=candidates, pca_components=8)
            assert set(sel["index"]) <= set(unsure), (len(lab), candidates)
            assert (sel["uncertainty"] > 0.9).all()
            assert (sel["distance"].iloc[1:] > 0).all()  # real distances drive the picks


def test_kcenter_cold_start_spreads_over_separated_groups():
    """No labelled images: after the first pick the distances are real (not ~1 placeholders
    capped by np.minimum), so a far group is reached even if a bit less uncertain."""
    rng = np.random.default_rng(0)
    A = rng.normal(0, 1, (50, 8))  # within-group distances ~4
    B = rng.normal(0, 1, (50, 8)) + 30
    Z = np.r_[A, B]
    w = np.r_[np.full(50, 0.9), np.full(50, 0.85)]
    idx, d = kcenter_greedy(Z, 4, weights=w)
    assert {int(i) // 50 for i in idx} == {0, 1}, idx
    assert np.isnan(d[0]) and (d[1:] > 1.5).all(), d
    # the same through select_batch (PCA space, uncertainty weights) with nothing labelled
    p = np.r_[np.full(50, 0.45), np.full(50, 0.40)]  # group A slightly more uncertain
    sel = select_batch(Z, p, Z[:0], batch_size=4, candidates=0, pca_components=8)
    assert {int(i) // 50 for i in sel["index"]} == {0, 1}, sel


def test_cluster_round_robin_covers_every_cluster_first():
    u = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    clusters = np.array([0, 0, 0, 1, 1, 2])
    out = cluster_round_robin(u, clusters, 4)
    assert list(out[:3]) == [0, 3, 5] and out[3] == 1


def test_selection_is_deterministic_and_table_has_contract_columns():
    X, p, X_lab = _near_duplicate_pool(seed=3)
    a = select_batch(X, p, X_lab, batch_size=8, candidates=20, pca_components=8)
    b = select_batch(X, p, X_lab, batch_size=8, candidates=20, pca_components=8)
    pd.testing.assert_frame_equal(a, b)
    rows = pd.DataFrame({"id": [f"{i:064x}" for i in range(len(X))],
                         "path": [f"data/raw/unlabeled/{i}.png" for i in range(len(X))]})
    table = to_label_table(a, rows, uncertainty(p), "margin", "kcenter")
    assert list(table.columns) == TO_LABEL_COLUMNS == ["id", "path", "score", "why"]
    assert len(table) == 8 and table["why"].str.contains("uncertain").all()
    # annotators stay blind to the model: no probability or predicted class in the reason
    assert not table["why"].str.contains("P\\(|cancer|normal", regex=True).any()


# --------------------------------------------------------------------------- stage
def _write_embeddings(path, rows, X, fingerprint="fp0"):
    meta = {b"embedding_fingerprint": json.dumps({"fingerprint": fingerprint}).encode()}
    table = pa.Table.from_arrays([
        pa.array(rows["id"], pa.string()), pa.array(rows["split"], pa.string()),
        pa.array(rows["label"], pa.string(), from_pandas=True),
        pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1).astype(np.float32)), EMBED_DIM),
    ], schema=EMBEDDING_SCHEMA.with_metadata(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_select_stage_writes_to_label_csv_and_metrics(tmp_path):
    rng = np.random.default_rng(0)
    n_lab, n_pool = 20, 120
    y = np.array(["cancer", "normal"] * (n_lab // 2))
    X = rng.normal(0, 1, (n_lab + n_pool, EMBED_DIM)).astype(np.float32)
    X[:n_lab][y == "cancer", :8] += 2.0
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n_lab + n_pool)]
    rows = pd.DataFrame({"id": ids, "split": ["labeled"] * n_lab + ["unlabeled"] * n_pool,
                         "label": list(y) + [None] * n_pool})
    _write_embeddings(tmp_path / "data/features/embeddings.parquet", rows, X)
    model = make_classifier("logreg", 0.1).fit(X[:n_lab], y)
    save_model({"model": model, "name": "semi_supervised", "positive_class": "cancer",
                "classes": ["cancer", "normal"], "threshold": 0.5, "embedding_fingerprint": "fp0"},
               tmp_path / "data/models/semi_supervised.skops")
    clean = rows.assign(path=[f"data/raw/x/{i}.png" for i in range(len(rows))])
    (tmp_path / "data/qc").mkdir(parents=True)
    clean.to_parquet(tmp_path / "data/qc/manifest_clean.parquet")
    (tmp_path / "data/cluster").mkdir(parents=True)
    rows[["id", "split"]].assign(cluster=np.arange(len(rows)) % 4).to_parquet(
        tmp_path / "data/cluster/assignments.parquet")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "DVCLIVE_TEST"}  # log for real
    res = subprocess.run([sys.executable, str(ROOT / "stages/select_for_labeling.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = pd.read_csv(tmp_path / "data/annotation/to_label.csv")
    assert list(out.columns) == ["id", "path", "score", "why"]
    assert len(out) == 20 and out["id"].is_unique
    assert set(out["id"]) <= set(ids[n_lab:])  # only unlabelled images
    metrics = json.loads((tmp_path / "metrics/select/metrics.json").read_text())
    assert metrics["n_selected"] == 20 and metrics["n_pool"] == n_pool
    assert metrics["uncertainty"]["selected_mean"] > metrics["uncertainty"]["pool_mean"]


# --------------------------------------------------------------------------- annotations
@pytest.fixture
def layout(tmp_path):
    return F.make_layout(tmp_path / "raw", n_unlabeled=5, n_test={"cancer": 1, "normal": 1})


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_csv(path, text):
    Path(path).write_text(text)
    return path


def test_annotations_by_path_and_id_move_images_into_labeled(layout, tmp_path):
    root = layout["root"]
    u = layout["unlabeled"]
    ann = _write_csv(root / "annotations.csv",
                     f"path,id,label\n{Path(u[0]).as_posix()},,cancer\n"
                     f"unlabeled/{Path(u[1]).name},,normal\n,{_sha(u[2])},cancer\n"
                     f",{_sha(u[2])},cancer\n")  # the same annotation twice is fine
    base, _ = build_manifest(root, "cancer", 0.25, 0)
    df, info = build_manifest(root, "cancer", 0.25, 0, annotations=ann)
    assert info["n_annotated"] == 3
    lab = df[df["split"] == "labeled"].set_index("path")["label"]
    assert lab[Path(u[0]).as_posix()] == "cancer"
    assert lab[Path(u[1]).as_posix()] == "normal"
    assert lab[Path(u[2]).as_posix()] == "cancer"
    assert (df["split"] == "unlabeled").sum() == 2
    # the test split is untouched by annotations
    assert set(df.loc[df["split"] == "test", "path"]) == set(base.loc[base["split"] == "test", "path"])
    # no annotations file = the plain manifest
    same, info = build_manifest(root, "cancer", 0.25, 0, annotations=tmp_path / "missing.csv")
    pd.testing.assert_frame_equal(same, base)
    assert info["n_annotated"] == 0


@pytest.mark.parametrize("row, message", [
    ("unlabeled/nope.png,,cancer", "line 2: unknown image path 'unlabeled/nope.png'"),
    (",{bad_id},cancer", "line 2: unknown image id"),
    ("{u0},,benign", "line 2: label 'benign' is not one of the classes"),
])
def test_annotation_unknown_image_or_label_is_a_clear_error(layout, row, message):
    root = layout["root"]
    row = row.format(bad_id="ab" * 32, u0=Path(layout["unlabeled"][0]).as_posix())
    ann = _write_csv(root / "annotations.csv", f"path,id,label\n{row}\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        build_manifest(root, "cancer", 0.25, 0, annotations=ann)


def test_conflicting_annotations_name_both_lines(layout):
    root = layout["root"]
    u0 = layout["unlabeled"][0]
    ann = _write_csv(root / "annotations.csv",
                     f"path,id,label\n{Path(u0).as_posix()},,cancer\nunlabeled/x.png,,normal\n"
                     .replace("unlabeled/x.png,,normal", f",{_sha(u0)},normal"))
    with pytest.raises(DataError, match="line 3: .*annotated 'normal' but line 2 annotates the same "
                                        "image 'cancer'"):
        build_manifest(root, "cancer", 0.25, 0, annotations=ann)


def test_annotation_contradicting_a_folder_label_is_refused(layout):
    root = layout["root"]
    labelled_cancer = layout["labeled"]["cancer"][0]
    ann = _write_csv(root / "annotations.csv", f"id,label\n{_sha(labelled_cancer)},normal\n")
    with pytest.raises(DataError, match="already filed under 'cancer'"):
        build_manifest(root, "cancer", 0.25, 0, annotations=ann)
    ann.write_text(f"id,label\n{_sha(labelled_cancer)},cancer\n")  # agreeing: a no-op
    _, info = build_manifest(root, "cancer", 0.25, 0, annotations=ann)
    assert info["n_annotated"] == 0 and info["n_annotations_already_labeled"] == 1


def test_annotations_file_without_the_right_columns_is_refused(layout):
    root = layout["root"]
    ann = _write_csv(root / "annotations.csv", "file,class\na.png,cancer\n")
    with pytest.raises(DataError, match="columns must be `path` or `id`"):
        build_manifest(root, "cancer", 0.25, 0, annotations=ann)


@pytest.mark.parametrize("n,d,block", [(703, 32, 64), (5, 3, 64), (130, 10, 7), (2, 1, 1)])
def test_nearest_other_distance_in_blocks_is_the_broadcast_bit_for_bit(n, d, block):
    # blocks bound the memory of batch_stats (a 700-row broadcast was ~130 MB) and must not
    # change the diversity metric's bits (a DVC output)
    from triage.select import nearest_other_distance

    Z = np.random.default_rng(n).normal(size=(n, d))
    D = np.sqrt(((Z[:, None] - Z[None]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    np.testing.assert_array_equal(nearest_other_distance(Z, block=block), D.min(1))


def test_ragged_annotation_row_is_named_with_its_field_count(layout):  # issue #14
    root = layout["root"]
    u = layout["unlabeled"]
    ann = _write_csv(root / "annotations.csv",
                     f"path,id,label\n{Path(u[0]).as_posix()},,cancer,1\n"
                     f"{Path(u[1]).as_posix()},,normal\n")
    with pytest.raises(DataError, match=r"line 2: 4 fields, the header has 3"):
        build_manifest(root, "cancer", 0.25, 0, annotations=ann)
