"""prepare: scanning the folder layout into the manifest (real PNG/JPEG files in tmp_path)."""
import hashlib
import os
from pathlib import Path

import imagefactory as F
import pandas as pd
import pyarrow.parquet as pq
import pytest

from triage.errors import DataError
from triage.io import write_parquet
from triage.prepare import MANIFEST_SCHEMA, build_manifest


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _test_paths(df) -> set:
    return set(df.loc[df["split"] == "test", "path"])


# --------------------------------------------------------------------------- manifest shape


def test_columns_dtypes_and_parquet_schema(tmp_path):
    F.make_layout(tmp_path / "raw", n_unlabeled=3, n_test={"cancer": 2, "normal": 2})
    df, info = build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert list(df.columns) == MANIFEST_SCHEMA.names
    for col in ("width", "height", "bytes"):
        assert str(df[col].dtype) == "Int64"
    for col in ("id", "path", "split", "mode", "format"):
        assert df[col].map(lambda v: isinstance(v, str)).all(), col
    assert df["read_error"].isna().all()
    assert set(df["width"]) == {40} and set(df["height"]) == {40}
    assert set(df["mode"]) == {"L"} and set(df["format"]) == {"PNG"}
    # The stage writes it with the explicit schema: that must work and round-trip.
    out = tmp_path / "manifest.parquet"
    write_parquet(df, out, schema=MANIFEST_SCHEMA)
    assert pq.read_schema(out).names == MANIFEST_SCHEMA.names
    back = pd.read_parquet(out)
    assert back["id"].tolist() == df["id"].tolist()
    assert back["label"].isna().sum() == 3


def test_id_is_sha256_of_bytes_and_bytes_is_file_size(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=2, n_test={"cancer": 1, "normal": 1})
    df, _ = build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    files = [p for ps in lay["labeled"].values() for p in ps] + lay["unlabeled"] + \
        [p for ps in lay["test"].values() for p in ps]
    assert len(df) == len(files)
    by_path = df.set_index("path")
    for f in files:
        row = by_path.loc[Path(f).as_posix()]
        assert row["id"] == _sha(f)
        assert row["bytes"] == os.path.getsize(f)


def test_split_counts_labels_and_test_folder(tmp_path):
    F.make_layout(tmp_path / "raw", n_labeled={"cancer": 3, "normal": 5}, n_unlabeled=4,
                  n_test={"cancer": 2, "normal": 1})
    df, info = build_manifest(tmp_path / "raw", "cancer", 0.5, 0)
    assert info["test_source"] == "folder"
    assert info["classes"] == ["cancer", "normal"]
    assert info["negative_class"] == "normal"
    assert df["split"].value_counts().to_dict() == {"labeled": 8, "unlabeled": 4, "test": 3}
    lab = df[df["split"] == "labeled"]
    assert lab["label"].value_counts().to_dict() == {"normal": 5, "cancer": 3}
    assert df.loc[df["split"] == "unlabeled", "label"].isna().all()
    assert df.loc[df["split"] != "unlabeled", "label"].notna().all()
    test = df[df["split"] == "test"]
    # with a test folder, test_fraction is ignored and test rows come from test/ only
    assert all("/test/" in p for p in test["path"])
    assert test["label"].value_counts().to_dict() == {"cancer": 2, "normal": 1}
    # labelled class comes from the folder name
    for _, r in lab.iterrows():
        assert Path(r["path"]).parent.name == r["label"]


def test_rows_are_sorted_by_split_then_path(tmp_path):
    F.make_layout(tmp_path / "raw", n_unlabeled=3, n_test={"cancer": 2, "normal": 2})
    df, _ = build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    order = {"labeled": 0, "unlabeled": 1, "test": 2}
    keys = list(zip(df["split"].map(order), df["path"]))
    assert keys == sorted(keys)
    assert list(df.index) == list(range(len(df)))


def test_unlabeled_folder_is_optional(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=0, n_test={"cancer": 1, "normal": 1})
    (tmp_path / "raw" / "unlabeled").rmdir()
    df, _ = build_manifest(lay["root"], "cancer", 0.25, 0)
    assert (df["split"] == "unlabeled").sum() == 0 and len(df) == 10


# --------------------------------------------------------------------------- seeded split


def _split_layout(tmp_path, n_cancer=12, n_normal=20):
    return F.make_layout(tmp_path / "raw", n_labeled={"cancer": n_cancer, "normal": n_normal},
                         n_unlabeled=2)


def test_stratified_split_is_proportional_per_class(tmp_path):
    _split_layout(tmp_path)
    df, info = build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert info["test_source"] == "split"
    test = df[df["split"] == "test"]
    # 25% of 12 = 3, 25% of 20 = 5, per class, not 25% of the 32 overall by chance
    assert test["label"].value_counts().to_dict() == {"normal": 5, "cancer": 3}
    assert (df["split"] == "labeled").sum() == 32 - 8
    assert (df["split"] == "unlabeled").sum() == 2
    # moved images keep their label and come from labeled/
    assert all("/labeled/" in p for p in test["path"])
    assert (test["label"] == test["path"].map(lambda p: Path(p).parent.name)).all()


def test_split_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    _split_layout(tmp_path)
    a, _ = build_manifest(tmp_path / "raw", "cancer", 0.25, 7)
    b, _ = build_manifest(tmp_path / "raw", "cancer", 0.25, 7)
    c, _ = build_manifest(tmp_path / "raw", "cancer", 0.25, 8)
    pd.testing.assert_frame_equal(a, b)
    assert _test_paths(a) != _test_paths(c)
    assert len(_test_paths(a)) == len(_test_paths(c)) == 8


def test_split_fraction_rounds_per_class(tmp_path):
    # nearest count per class: 9 * 0.3 = 2.7 -> 3, 13 * 0.3 = 3.9 -> 4 (not truncated)
    _split_layout(tmp_path, n_cancer=9, n_normal=13)
    df, _ = build_manifest(tmp_path / "raw", "cancer", 0.3, 0)
    counts = df[df["split"] == "test"]["label"].value_counts().to_dict()
    assert counts == {"cancer": 3, "normal": 4}


def test_split_with_too_few_images_of_a_class(tmp_path):
    _split_layout(tmp_path, n_cancer=1, n_normal=8)
    with pytest.raises(DataError, match="class 'cancer' has 1 labelled"):
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)


# --------------------------------------------------------------------------- scanning


def test_recursive_subfolders_and_hidden_files(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=2, n_test={"cancer": 1, "normal": 1})
    root = lay["root"]
    deep = F.write_png(root / "labeled" / "cancer" / "site_a" / "2021" / "deep.png", seed=901)
    F.write_png(root / "unlabeled" / "batch2" / "u_deep.png", seed=902)
    hidden = [
        F.write_png(root / "labeled" / "cancer" / ".DS_Store", seed=903),
        F.write_png(root / "unlabeled" / ".cache" / "thumb.png", seed=904),
        F.write_png(root / "unlabeled" / ".hidden.png", seed=905),
        F.write_png(root / "test" / "normal" / ".ipynb_checkpoints" / "x.png", seed=906),
    ]
    df, info = build_manifest(root, "cancer", 0.25, 0)
    assert info["n_hidden_ignored"] == len(hidden)
    paths = set(df["path"])
    assert deep.as_posix() in paths
    assert (root / "unlabeled" / "batch2" / "u_deep.png").as_posix() in paths
    assert not any("/." in p for p in paths)
    assert df.loc[df["path"] == deep.as_posix(), "label"].item() == "cancer"
    assert len(df) == 8 + 2 + 2 + 2


def test_unreadable_content_is_a_row_not_a_crash(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1, n_test={"cancer": 1, "normal": 1})
    F.write_text_as_image(lay["root"] / "unlabeled" / "notes.png")
    F.write_zero_byte(lay["root"] / "unlabeled" / "empty.png")
    df, _ = build_manifest(lay["root"], "cancer", 0.25, 0)
    row = df.set_index("path").loc[(lay["root"] / "unlabeled" / "notes.png").as_posix()]
    assert row["read_error"].startswith("not_an_image")
    assert pd.isna(row["width"]) and pd.isna(row["format"])
    assert row["id"] == _sha(lay["root"] / "unlabeled" / "notes.png")
    empty = df.set_index("path").loc[(lay["root"] / "unlabeled" / "empty.png").as_posix()]
    assert empty["bytes"] == 0 and empty["id"] == hashlib.sha256(b"").hexdigest()


def test_non_utf8_name_gives_a_utf8_path_and_a_read_error(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1, n_test={"cancer": 1, "normal": 1})
    bpath = F.write_non_utf8_name(lay["root"] / "unlabeled")
    df, _ = build_manifest(lay["root"], "cancer", 0.25, 0)
    bad = df[df["read_error"].notna()]
    assert len(bad) == 1
    assert bad["read_error"].item() == "non_utf8_filename"
    assert bad["path"].item().encode("utf-8")  # valid UTF-8, so Parquet can store it
    assert "\\xff" in bad["path"].item()
    with open(bpath, "rb") as fh:
        assert bad["id"].item() == hashlib.sha256(fh.read()).hexdigest()
    write_parquet(df, tmp_path / "m.parquet", schema=MANIFEST_SCHEMA)


# --------------------------------------------------------------------------- structural errors


def test_missing_root(tmp_path):
    with pytest.raises(DataError) as exc:
        build_manifest(tmp_path / "nowhere", "cancer", 0.25, 0)
    assert str(tmp_path / "nowhere") in str(exc.value)


def test_missing_labeled_folder(tmp_path):
    (tmp_path / "raw" / "unlabeled").mkdir(parents=True)
    F.write_png(tmp_path / "raw" / "unlabeled" / "a.png")
    with pytest.raises(DataError) as exc:
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert str(tmp_path / "raw" / "labeled") in str(exc.value)


def test_labeled_without_class_folders(tmp_path):
    F.write_png(tmp_path / "raw" / "labeled" / "loose.png")
    with pytest.raises(DataError, match="no class folders") as exc:
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert str(tmp_path / "raw" / "labeled") in str(exc.value)


def test_loose_file_outside_a_class_folder_is_not_dropped_silently(tmp_path):
    F.make_layout(tmp_path / "raw", n_test={"cancer": 1, "normal": 1})
    F.write_png(tmp_path / "raw" / "labeled" / "which_class.png", seed=50)
    with pytest.raises(DataError, match="which_class.png") as exc:
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert str(tmp_path / "raw" / "labeled") in str(exc.value)


def test_loose_file_in_test_folder(tmp_path):
    F.make_layout(tmp_path / "raw", n_test={"cancer": 1, "normal": 1})
    F.write_png(tmp_path / "raw" / "test" / "stray.png", seed=51)
    with pytest.raises(DataError, match="stray.png"):
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)


def test_hidden_file_beside_the_class_folders_is_counted(tmp_path):
    F.make_layout(tmp_path / "raw", n_test={"cancer": 1, "normal": 1})
    (tmp_path / "raw" / "labeled" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    df, info = build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert info["n_hidden_ignored"] == 1 and len(df) == 8 + 4 + 2


def test_empty_class_folder(tmp_path):
    F.make_layout(tmp_path / "raw", n_labeled={"cancer": 3, "normal": 3})
    empty = tmp_path / "raw" / "labeled" / "normal"
    for p in empty.iterdir():
        p.unlink()
    F.write_png(empty / ".DS_Store")  # only a hidden file: still empty
    with pytest.raises(DataError, match="empty class folder") as exc:
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert str(empty) in str(exc.value)


def test_empty_test_class_folder(tmp_path):
    F.make_layout(tmp_path / "raw", n_test={"cancer": 1, "normal": 1})
    (tmp_path / "raw" / "test" / "other").mkdir()
    with pytest.raises(DataError) as exc:
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert str(tmp_path / "raw" / "test" / "other") in str(exc.value)


def test_wrong_positive_class(tmp_path):
    F.make_layout(tmp_path / "raw")
    with pytest.raises(DataError) as exc:
        build_manifest(tmp_path / "raw", "malignant", 0.25, 0)
    msg = str(exc.value)
    assert "'malignant'" in msg and str(tmp_path / "raw" / "labeled") in msg
    assert "cancer" in msg and "normal" in msg


def test_three_classes(tmp_path):
    F.make_layout(tmp_path / "raw", n_labeled={"cancer": 2, "normal": 2, "benign": 2})
    with pytest.raises(DataError, match="exactly 2") as exc:
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert str(tmp_path / "raw" / "labeled") in str(exc.value)
    assert "benign" in str(exc.value)


def test_one_class(tmp_path):
    F.make_layout(tmp_path / "raw", n_labeled={"cancer": 4})
    with pytest.raises(DataError, match="exactly 2"):
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)


def test_test_class_not_among_labelled_classes(tmp_path):
    F.make_layout(tmp_path / "raw", n_test={"cancer": 1, "normal": 1, "benign": 1})
    with pytest.raises(DataError, match="benign") as exc:
        build_manifest(tmp_path / "raw", "cancer", 0.25, 0)
    assert str(tmp_path / "raw" / "test") in str(exc.value)


# --------------------------------------------------------------------------- symlinks (issue #14)


def _outside_dir(tmp_path):
    ext = tmp_path / "elsewhere"
    for i in range(3):
        F.write_png(ext / f"x_{i}.png", seed=950 + i)
    return ext


def test_symlinked_folder_inside_the_layout_is_followed(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=2, n_test={"cancer": 1, "normal": 1})
    os.symlink(_outside_dir(tmp_path), lay["root"] / "unlabeled" / "more")
    df, _ = build_manifest(lay["root"], "cancer", 0.25, 0)  # library default: follow
    more = df[df["path"].str.contains("/unlabeled/more/")]
    assert len(more) == 3 and more["read_error"].isna().all()
    assert (more["split"] == "unlabeled").all()
    assert len(df) == 8 + 2 + 2 + 3


def test_link_outside_root_is_quarantined_for_files_and_folders_alike(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=2, n_test={"cancer": 1, "normal": 1})
    ext = _outside_dir(tmp_path)
    os.symlink(ext, lay["root"] / "unlabeled" / "more")
    os.symlink(ext / "x_0.png", lay["root"] / "unlabeled" / "one.png")
    inside = lay["unlabeled"][0]
    os.symlink(inside.resolve(), lay["root"] / "unlabeled" / "inside_link.png")
    df, _ = build_manifest(lay["root"], "cancer", 0.25, 0, links_outside_root="quarantine")
    out = df[df["read_error"].fillna("").str.startswith("link_outside_root")]
    assert sorted(p.rsplit("/", 1)[1] for p in out["path"]) == ["one.png", "x_0.png", "x_1.png",
                                                               "x_2.png"]
    assert out["id"].isna().all()  # not read
    link_in = df.set_index("path").loc[(lay["root"] / "unlabeled" / "inside_link.png").as_posix()]
    assert pd.isna(link_in["read_error"])  # a link that stays inside the root is a plain file
    assert len(df) == 8 + 2 + 2 + 3 + 1 + 1


def test_broken_link_and_link_cycle_are_rows_not_losses_or_hangs(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=2, n_test={"cancer": 1, "normal": 1})
    os.symlink(tmp_path / "gone.png", lay["root"] / "unlabeled" / "dangling.png")
    os.symlink("..", lay["root"] / "unlabeled" / "loop")  # unlabeled/loop -> unlabeled's parent
    sub = lay["root"] / "unlabeled" / "sub"
    sub.mkdir()
    os.symlink(sub, sub / "self")
    df, _ = build_manifest(lay["root"], "cancer", 0.25, 0)
    row = df.set_index("path").loc[(lay["root"] / "unlabeled" / "dangling.png").as_posix()]
    assert row["read_error"].startswith("broken_link")
    # unlabeled/loop -> raw/ is not an ancestor of itself: followed once (labelled + test
    # files seen again under the pool; QC quarantines those copies as duplicates); sub/self
    # points at its own folder and is not descended.
    assert not df["path"].str.contains("/self/").any()
    assert df["path"].str.contains("/unlabeled/loop/labeled/").any()
    assert not df["path"].str.contains("/loop/unlabeled/loop/").any()


# --------------------------------------------------------------------------- labelled minimum (issue #14)


def _default_params():
    from triage.params import load_params

    return load_params(Path(__file__).resolve().parents[1] / "params.yaml")


def test_tiny_labelled_set_stops_in_prepare_with_the_minimum_named(tmp_path):
    from triage.prepare import min_labeled_per_class

    minimum, why = min_labeled_per_class(_default_params())
    assert minimum == 3 and "crossval.folds" in why
    lay = F.make_layout(tmp_path / "raw", n_labeled={"cancer": 2, "normal": 1}, n_unlabeled=2,
                        n_test={"cancer": 1, "normal": 1})
    with pytest.raises(DataError, match=r"\{'cancer': 2, 'normal': 1\}.*at least 3"):
        build_manifest(lay["root"], "cancer", 0.25, 0, min_per_class=minimum,
                       min_per_class_why=why)
    F.write_png(lay["root"] / "labeled" / "normal" / "n2.png", seed=991)
    F.write_png(lay["root"] / "labeled" / "normal" / "n3.png", seed=992)
    F.write_png(lay["root"] / "labeled" / "cancer" / "c3.png", seed=993)
    df, _ = build_manifest(lay["root"], "cancer", 0.25, 0, min_per_class=minimum)
    assert (df["split"] == "labeled").sum() == 6


@pytest.mark.parametrize("model,calibration,cv_folds,cv", [
    ("logreg", "none", 5, 5), ("svm", "none", 5, 5), ("logreg", "sigmoid", 2, 2),
    ("logreg", "none", 2, 2)])
def test_min_labeled_per_class_is_what_the_chain_needs(model, calibration, cv_folds, cv):
    """At the minimum the nested folds (crossval → train OOF + pseudo calibration) all fit;
    one fewer makes one of them fail."""
    import numpy as np

    from triage.crossval import fold_splits
    from triage.models import make_classifier, out_of_fold_proba
    from triage.prepare import min_labeled_per_class
    from triage.pseudo import calibrated_pool_proba

    params = _default_params()
    params["train"].update(model=model, calibration=calibration, cv_folds=cv_folds)
    params["crossval"]["folds"] = cv
    m, _ = min_labeled_per_class(params)

    def chain(n):
        rng = np.random.default_rng(0)
        y = np.array(["cancer"] * n + ["normal"] * n)
        X = rng.normal(size=(2 * n, 4)) + (y == "cancer")[:, None]
        for tr, _ in fold_splits(y, cv, 1, 0)[0]:
            pipe = make_classifier(model, 1.0, "balanced", 0, calibration)
            out_of_fold_proba(pipe, X[tr], y[tr], "cancer", cv_folds, 0)
            calibrated_pool_proba(X[tr], (y[tr] == "cancer").astype(int), X[:3], 1.0, 0)

    chain(m)
    with pytest.raises(Exception):  # noqa: B017 - sklearn ValueError or PipelineError
        chain(m - 1)


def test_a_dicom_file_is_named_as_dicom_not_as_a_broken_image(tmp_path):
    from triage.prepare import describe_file

    dicom = tmp_path / "scan.dcm"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 64)
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(b"\0" * 200)
    assert describe_file(dicom)["read_error"].startswith("dicom_not_supported: a DICOM file")
    assert describe_file(noise)["read_error"].startswith("not_an_image:")
