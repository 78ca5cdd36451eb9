"""QC: every bad input ends quarantined with its own reason, the run finishes, and
``images in == passed + quarantined`` always holds. Real files written with Pillow."""
import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import imagefactory as F
from triage.errors import DataError
from triage.io import write_csv
from triage.prepare import build_manifest
from triage.qc import QUARANTINE_COLUMNS, inspect_all, inspect_image, run_qc

QC = dict(min_side=32, max_pixels=89_478_485, min_std=2.0, max_aspect=4.0,
          leakage_policy="drop_test", workers=1)


def qc(root, **overrides):
    manifest, _ = build_manifest(root, "cancer", 0.25, 0)
    report = run_qc(manifest, **{**QC, **overrides})
    # The invariant is checked on every run of this file.
    assert len(manifest) == len(report.clean) + len(report.quarantine)
    assert report.stats["n_images"] == len(manifest)
    assert set(report.clean["path"]).isdisjoint(report.quarantine["path"])
    assert set(report.clean["path"]) | set(report.quarantine["path"]) == set(manifest["path"])
    return manifest, report


def reason_of(report, path) -> str | None:
    q = report.quarantine.set_index("path")
    key = Path(path).as_posix() if not isinstance(path, str) else path
    return q.loc[key, "reason"] if key in q.index else None


def detail_of(report, path) -> str:
    return report.quarantine.set_index("path").loc[Path(path).as_posix(), "detail"]


def note_of(report, path):
    return report.clean.set_index("path").loc[Path(path).as_posix(), "qc_note"]


# --------------------------------------------------------------------------- bad-input matrix


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "raw"
    lay = F.make_layout(root, n_unlabeled=4, n_test={"cancer": 2, "normal": 2})
    u = root / "unlabeled"
    files = {
        "zero": F.write_zero_byte(u / "zero.png"),
        "truncated": F.write_truncated_jpeg(u / "truncated.jpg", seed=11),
        "text": F.write_text_as_image(u / "notes.png"),
        "rgba": F.write_rgba_png(u / "rgba.png", seed=12),
        "deep16": F.write_16bit_png(u / "deep16.png", seed=13),
        "palette": F.write_palette_png(u / "palette.png", seed=14),
        "tiny": F.write_tiny(u / "tiny.png", seed=15),
        "wide": F.write_png(u / "wide.png", size=(200, 40), seed=16),
        "blank": F.write_blank(u / "blank.png"),
        "png_as_jpg": F.write_png_named_jpg(u / "really_png.jpg", seed=17),
        "jpeg": F.write_jpeg(u / "fine.jpg", seed=18),
        "rgb": F.write_png(u / "colour.png", mode="RGB", seed=19),
    }
    bad_name = F.write_non_utf8_name(u, seed=20)
    manifest, report = qc(root)
    return {"root": root, "layout": lay, "files": files, "bad_name": bad_name,
            "manifest": manifest, "report": report}


@pytest.mark.parametrize("name,reason", [
    ("zero", "zero_byte"),
    ("truncated", "decode_error"),
    ("text", "not_an_image"),
    ("tiny", "too_small"),
    ("wide", "aspect_outlier"),
    ("blank", "blank"),
])
def test_bad_input_gets_its_own_reason(zoo, name, reason):
    assert reason_of(zoo["report"], zoo["files"][name]) == reason


def test_truncated_jpeg_passes_the_header_read_but_fails_the_decode(zoo):
    # prepare could read its header, so only QC's full decode catches it
    m = zoo["manifest"].set_index("path").loc[zoo["files"]["truncated"].as_posix()]
    assert pd.isna(m["read_error"]) and m["format"] == "JPEG"
    assert "truncated" in detail_of(zoo["report"], zoo["files"]["truncated"])


def test_detail_explains_the_threshold(zoo):
    r = zoo["report"]
    assert "1x1" in detail_of(r, zoo["files"]["tiny"]) and "qc.min_side=32" in detail_of(
        r, zoo["files"]["tiny"])
    assert detail_of(r, zoo["files"]["wide"]).startswith("5.0 > qc.max_aspect=4.0")
    assert "qc.min_std=2.0" in detail_of(r, zoo["files"]["blank"])


def test_non_utf8_file_name_has_its_own_reason(zoo):
    q = zoo["report"].quarantine
    row = q[q["path"].str.contains("scan_\\xff", regex=False)]
    assert len(row) == 1 and row["reason"].item() == "non_utf8_filename"


@pytest.mark.parametrize("name,note", [
    ("rgba", "mode RGBA converted to L"),
    ("deep16", "mode I;16 converted to L"),
    ("palette", "mode P converted to L"),
    ("png_as_jpg", "format PNG named .jpg"),
])
def test_unusual_but_valid_images_pass_with_a_note(zoo, name, note):
    assert reason_of(zoo["report"], zoo["files"][name]) is None
    assert note in note_of(zoo["report"], zoo["files"][name])


@pytest.mark.parametrize("name", ["jpeg", "rgb"])
def test_ordinary_images_pass_without_a_note(zoo, name):
    assert reason_of(zoo["report"], zoo["files"][name]) is None
    assert pd.isna(note_of(zoo["report"], zoo["files"][name]))


def test_all_layout_images_pass(zoo):
    lay = zoo["layout"]
    good = [p for ps in lay["labeled"].values() for p in ps] + lay["unlabeled"] + \
        [p for ps in lay["test"].values() for p in ps]
    clean = set(zoo["report"].clean["path"])
    assert {p.as_posix() for p in good} <= clean


def test_16bit_mean_is_stretched_to_0_255(zoo):
    path = zoo["files"]["deep16"]
    raw = np.asarray(Image.open(path), dtype=np.float64)
    assert raw.max() > 255  # the file really holds 16-bit values
    expected = ((raw - raw.min()) / (raw.max() - raw.min()) * 255).mean()
    got = zoo["report"].clean.set_index("path").loc[path.as_posix(), "mean"]
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0 < got < 255


def test_rgba_transparency_is_composited_on_black(zoo):
    path = zoo["files"]["rgba"]
    rgba = np.asarray(Image.open(path), dtype=np.float64)
    expected = (rgba[..., 0] * rgba[..., 3] / 255).mean()
    got = zoo["report"].clean.set_index("path").loc[path.as_posix(), "mean"]
    assert got == pytest.approx(expected, abs=1.0)
    assert got < rgba[..., 0].mean() - 5  # visibly darker than ignoring alpha


def test_stats_keys_and_values(zoo):
    r = zoo["report"]
    s = r.stats
    assert s["n_passed"] == len(r.clean) and s["n_quarantined"] == len(r.quarantine)
    assert s["valid_rate"] == pytest.approx(len(r.clean) / len(zoo["manifest"]))
    counts = r.quarantine["reason"].value_counts().to_dict()
    assert {k: v for k, v in s.items() if k.startswith("reason/")} == {
        f"reason/{k}": v for k, v in counts.items()}
    assert s["exact_duplicate_groups"] == 0 and s["leaked_test_images"] == 0
    assert s["n_noted"] == 4
    for split in ("labeled", "unlabeled", "test"):
        assert s[f"passed/{split}"] == int((r.clean["split"] == split).sum())
    assert s["passed/test"] == 4 and s["passed/labeled"] == 8


def test_quarantine_csv_columns(zoo, tmp_path):
    assert QUARANTINE_COLUMNS == ["path", "reason", "detail"]
    assert list(zoo["report"].quarantine.columns) == QUARANTINE_COLUMNS
    out = tmp_path / "quarantine.csv"
    write_csv(zoo["report"].quarantine, out)
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "reason", "detail"]
    assert len(rows) - 1 == len(zoo["report"].quarantine)
    assert all(r[1] and r[2] for r in rows[1:])  # every row has a reason and a detail


def test_clean_manifest_has_measurements_and_no_read_error(zoo):
    c = zoo["report"].clean
    assert "read_error" not in c.columns
    assert c["mean"].notna().all() and c["std"].notna().all()
    assert (c["std"] >= QC["min_std"]).all()


# --------------------------------------------------------------------------- separate cases


def test_image_over_max_pixels_is_too_large(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1, n_test={"cancer": 1, "normal": 1},
                        size=(30, 30))
    big = F.write_png(tmp_path / "raw" / "unlabeled" / "big.png", size=(50, 50), seed=99)
    _, r = qc(lay["root"], min_side=8, max_pixels=1000)
    assert reason_of(r, big) == "too_large"
    assert "50x50" in detail_of(r, big) and "1000" in detail_of(r, big)
    assert len(r.quarantine) == 1  # 30x30 = 900 pixels is under the limit


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: root can read chmod 000 files, so the "
                           "unreadable-permission case cannot be produced")
def test_unreadable_file_is_quarantined(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1, n_test={"cancer": 1, "normal": 1})
    locked = F.write_unreadable(tmp_path / "raw" / "unlabeled" / "locked.png", seed=77)
    try:
        _, r = qc(lay["root"])
        assert reason_of(r, locked) == "unreadable"
        assert "ermission" in detail_of(r, locked)
    finally:
        os.chmod(locked, 0o644)


def test_dangling_symlink_is_quarantined_as_unreadable(tmp_path):
    """Runs as root too: a link to a file that is gone cannot be read by anyone."""
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1, n_test={"cancer": 1, "normal": 1})
    link = tmp_path / "raw" / "unlabeled" / "gone.png"
    os.symlink(tmp_path / "deleted.png", link)
    _, r = qc(lay["root"])
    assert reason_of(r, link) == "unreadable"
    assert "No such file" in detail_of(r, link)


@pytest.mark.filterwarnings("error")  # e.g. pandas' future-incompatible fillna on all-NaN
def test_empty_manifest_after_everything_is_quarantined_still_finishes(tmp_path):
    root = tmp_path / "raw"
    F.write_blank(root / "labeled" / "cancer" / "a.png")
    F.write_blank(root / "labeled" / "normal" / "b.png", value=3)
    F.write_tiny(root / "test" / "cancer" / "c.png")
    F.write_zero_byte(root / "test" / "normal" / "d.png")
    _, r = qc(root)
    assert r.clean.empty and r.stats["valid_rate"] == 0.0
    assert sorted(r.quarantine["reason"]) == ["blank", "blank", "too_small", "zero_byte"]


# --------------------------------------------------------------------------- duplicates/leakage


def _copy(src, dst) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture
def small(tmp_path):
    return F.make_layout(tmp_path / "raw", n_labeled={"cancer": 4, "normal": 4}, n_unlabeled=4,
                         n_test={"cancer": 2, "normal": 2})


def test_duplicate_within_a_class_keeps_one(small):
    kept = small["labeled"]["cancer"][0]
    copy = _copy(kept, small["root"] / "labeled" / "cancer" / "zz_copy.png")
    _, r = qc(small["root"])
    assert reason_of(r, copy) == "duplicate"
    assert reason_of(r, kept) is None
    assert detail_of(r, copy) == f"identical to {kept.as_posix()}"
    assert r.stats["exact_duplicate_groups"] == 1
    assert r.stats["reason/duplicate"] == 1


def test_duplicate_keeps_the_first_path_whatever_the_name(small):
    later = small["labeled"]["normal"][2]
    earlier = _copy(later, small["root"] / "labeled" / "normal" / "aa_first.png")
    _, r = qc(small["root"])
    assert reason_of(r, earlier) is None
    assert reason_of(r, later) == "duplicate"
    assert earlier.as_posix() in detail_of(r, later)


def test_labeled_copy_wins_over_unlabeled_copy(small):
    lab = small["labeled"]["normal"][1]
    pool = _copy(lab, small["root"] / "unlabeled" / "a_pool_copy.png")  # sorts first by name
    _, r = qc(small["root"])
    assert reason_of(r, lab) is None
    assert reason_of(r, pool) == "duplicate"
    assert detail_of(r, pool) == f"identical to {lab.as_posix()}"


def test_three_copies_make_one_group(small):
    src = small["unlabeled"][0]
    c1 = _copy(src, small["root"] / "unlabeled" / "dup1.png")
    c2 = _copy(src, small["root"] / "unlabeled" / "sub" / "dup2.png")
    _, r = qc(small["root"])
    assert [reason_of(r, p) for p in (src, c1, c2)].count(None) == 1
    assert r.stats["exact_duplicate_groups"] == 1 and r.stats["reason/duplicate"] == 2


def test_test_copy_of_labelled_image_is_dropped_as_leakage(small):
    lab = small["labeled"]["cancer"][1]
    leak = _copy(lab, small["root"] / "test" / "cancer" / "leak.png")
    _, r = qc(small["root"], leakage_policy="drop_test")
    assert reason_of(r, leak) == "leakage"
    assert lab.as_posix() in detail_of(r, leak)
    assert reason_of(r, lab) is None
    assert r.stats["leaked_test_images"] == 1 and r.stats["leaked_test_dropped"] == 1
    assert r.stats["reason/leakage"] == 1


def test_test_copy_of_pool_image_is_leakage_too(small):
    pool = small["unlabeled"][2]
    leak = _copy(pool, small["root"] / "test" / "normal" / "from_pool.png")
    _, r = qc(small["root"])
    assert reason_of(r, leak) == "leakage"
    assert reason_of(r, pool) is None


def test_leakage_policy_keep_lets_the_test_copy_pass(small):
    lab = small["labeled"]["cancer"][1]
    leak = _copy(lab, small["root"] / "test" / "cancer" / "leak.png")
    _, r = qc(small["root"], leakage_policy="keep")
    assert reason_of(r, leak) is None and reason_of(r, lab) is None
    assert r.quarantine.empty
    assert r.stats["leaked_test_images"] == 1 and r.stats["leaked_test_dropped"] == 0


def test_leakage_policy_fail_raises(small):
    lab = small["labeled"]["normal"][0]
    _copy(lab, small["root"] / "test" / "normal" / "leak.png")
    manifest, _ = build_manifest(small["root"], "cancer", 0.25, 0)
    with pytest.raises(DataError, match="leakage_policy=fail"):
        run_qc(manifest, **{**QC, "leakage_policy": "fail"})


def test_leakage_policy_fail_without_leaks_runs(small):
    _, r = qc(small["root"], leakage_policy="fail")
    assert r.quarantine.empty


def test_two_identical_test_images_are_a_duplicate_not_leakage(small):
    t = small["test"]["normal"][0]
    c = _copy(t, small["root"] / "test" / "normal" / "zz.png")
    _, r = qc(small["root"])
    assert reason_of(r, c) == "duplicate" and reason_of(r, t) is None
    assert r.stats["leaked_test_images"] == 0


def test_same_image_under_two_labels_quarantines_every_copy(small):
    src = small["labeled"]["cancer"][3]
    other = _copy(src, small["root"] / "labeled" / "normal" / "mislabelled.png")
    pool = _copy(src, small["root"] / "unlabeled" / "also_here.png")
    test = _copy(src, small["root"] / "test" / "cancer" / "and_here.png")
    _, r = qc(small["root"])
    for p in (src, other, pool, test):
        assert reason_of(r, p) == "label_conflict", p
    assert r.stats["reason/label_conflict"] == 4
    assert r.stats["exact_duplicate_groups"] == 0  # removed before duplicate grouping


def test_test_copy_with_another_label_is_a_conflict(small):
    src = small["labeled"]["normal"][3]
    t = _copy(src, small["root"] / "test" / "cancer" / "flipped.png")
    _, r = qc(small["root"])
    assert reason_of(r, src) == "label_conflict" and reason_of(r, t) == "label_conflict"


def test_broken_copies_are_not_counted_as_duplicates(small):
    a = F.write_zero_byte(small["root"] / "unlabeled" / "e1.png")
    b = F.write_zero_byte(small["root"] / "unlabeled" / "e2.png")
    _, r = qc(small["root"])
    assert reason_of(r, a) == reason_of(r, b) == "zero_byte"
    assert r.stats["exact_duplicate_groups"] == 0


# --------------------------------------------------------------------------- parallel decode


def test_parallel_and_serial_give_identical_results(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_labeled={"cancer": 30, "normal": 30},
                        n_unlabeled=10, n_test={"cancer": 3, "normal": 3}, size=(36, 36))
    u = lay["root"] / "unlabeled"
    F.write_truncated_jpeg(u / "trunc.jpg", seed=5)
    F.write_blank(u / "blank.png")
    F.write_16bit_png(u / "deep.png", seed=6)
    F.write_rgba_png(u / "rgba.png", seed=7)
    _copy(lay["labeled"]["cancer"][0], u / "dup.png")
    manifest, serial = qc(lay["root"], workers=1)
    n_decoded = len(manifest) - int(manifest["read_error"].notna().sum())
    assert n_decoded >= 64  # enough work for the process-pool path
    _, parallel = qc(lay["root"], workers=2)
    pd.testing.assert_frame_equal(serial.clean, parallel.clean)
    pd.testing.assert_frame_equal(serial.quarantine, parallel.quarantine)
    assert serial.stats == parallel.stats
    assert set(serial.quarantine["reason"]) == {"decode_error", "blank", "duplicate"}


def test_inspect_all_pool_matches_inspect_image(tmp_path):
    paths = [str(F.write_png(tmp_path / f"im{i:03d}.png", size=(33, 33), seed=i))
             for i in range(64)]
    paths.append(str(F.write_truncated_jpeg(tmp_path / "bad.jpg")))
    expected = [inspect_image(p, 10_000) for p in paths]
    assert inspect_all(paths, 10_000, workers=2) == expected
    assert expected[-1]["decode_error"].startswith("decode_error")
    assert all(e["decode_error"] is None for e in expected[:-1])


def test_inspect_image_measures_independently_computed_stats(tmp_path):
    p = F.write_png(tmp_path / "a.png", size=(40, 48), seed=3)
    arr = np.asarray(Image.open(p), dtype=np.float64)
    res = inspect_image(str(p), 10_000)
    assert res["decode_error"] is None and res["note"] is None
    assert res["mean"] == pytest.approx(arr.mean()) and res["std"] == pytest.approx(arr.std())
