"""QC: every bad input ends quarantined with its own reason, the run finishes, and
``images in == passed + quarantined`` always holds. Real files written with Pillow."""
import csv
import os
from pathlib import Path

import imagefactory as F
import numpy as np
import pandas as pd
import pytest
from helpers import QC
from imagefactory import copy_file, write_smooth, write_upscaled_copy
from PIL import Image

from triage.errors import DataError
from triage.io import write_csv
from triage.prepare import build_manifest
from triage.qc import QUARANTINE_COLUMNS, inspect_all, inspect_image, run_qc


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
    # seeds >= 1000: make_layout uses 1, 2, ... and the same seed would make a true
    # near-duplicate (pHash) of a layout image
    files = {
        "zero": F.write_zero_byte(u / "zero.png"),
        "truncated": F.write_truncated_jpeg(u / "truncated.jpg", seed=1011),
        "text": F.write_text_as_image(u / "notes.png"),
        "rgba": F.write_rgba_png(u / "rgba.png", seed=1012),
        "deep16": F.write_16bit_png(u / "deep16.png", seed=1013),
        "palette": F.write_palette_png(u / "palette.png", seed=1014),
        "tiny": F.write_tiny(u / "tiny.png", seed=1015),
        "wide": F.write_png(u / "wide.png", size=(200, 40), seed=1016),
        "blank": F.write_blank(u / "blank.png"),
        "png_as_jpg": F.write_png_named_jpg(u / "really_png.jpg", seed=1017),
        "jpeg": F.write_jpeg(u / "fine.jpg", seed=1018),
        "rgb": F.write_png(u / "colour.png", mode="RGB", seed=1019),
    }
    bad_name = F.write_non_utf8_name(u, seed=1020)
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


def test_dangling_symlink_is_quarantined_as_a_broken_link(tmp_path):
    """Runs as root too: a link to a file that is gone cannot be read by anyone."""
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1, n_test={"cancer": 1, "normal": 1})
    link = tmp_path / "raw" / "unlabeled" / "gone.png"
    os.symlink(tmp_path / "deleted.png", link)
    _, r = qc(lay["root"])
    assert reason_of(r, link) == "broken_link"
    assert "target does not exist" in detail_of(r, link)


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


@pytest.fixture
def small(tmp_path):
    return F.make_layout(tmp_path / "raw", n_labeled={"cancer": 4, "normal": 4}, n_unlabeled=4,
                         n_test={"cancer": 2, "normal": 2})


def test_duplicate_within_a_class_keeps_one(small):
    kept = small["labeled"]["cancer"][0]
    copy = copy_file(kept, small["root"] / "labeled" / "cancer" / "zz_copy.png")
    _, r = qc(small["root"])
    assert reason_of(r, copy) == "duplicate"
    assert reason_of(r, kept) is None
    assert detail_of(r, copy) == f"identical to {kept.as_posix()}"
    assert r.stats["exact_duplicate_groups"] == 1
    assert r.stats["reason/duplicate"] == 1


def test_duplicate_keeps_the_first_path_whatever_the_name(small):
    later = small["labeled"]["normal"][2]
    earlier = copy_file(later, small["root"] / "labeled" / "normal" / "aa_first.png")
    _, r = qc(small["root"])
    assert reason_of(r, earlier) is None
    assert reason_of(r, later) == "duplicate"
    assert earlier.as_posix() in detail_of(r, later)


def test_labeled_copy_wins_over_unlabeled_copy(small):
    lab = small["labeled"]["normal"][1]
    pool = copy_file(lab, small["root"] / "unlabeled" / "a_pool_copy.png")  # sorts first by name
    _, r = qc(small["root"])
    assert reason_of(r, lab) is None
    assert reason_of(r, pool) == "duplicate"
    assert detail_of(r, pool) == f"identical to {lab.as_posix()}"


def test_three_copies_make_one_group(small):
    src = small["unlabeled"][0]
    c1 = copy_file(src, small["root"] / "unlabeled" / "dup1.png")
    c2 = copy_file(src, small["root"] / "unlabeled" / "sub" / "dup2.png")
    _, r = qc(small["root"])
    assert [reason_of(r, p) for p in (src, c1, c2)].count(None) == 1
    assert r.stats["exact_duplicate_groups"] == 1 and r.stats["reason/duplicate"] == 2


def test_test_copy_of_labelled_image_is_dropped_as_leakage(small):
    lab = small["labeled"]["cancer"][1]
    leak = copy_file(lab, small["root"] / "test" / "cancer" / "leak.png")
    _, r = qc(small["root"], leakage_policy="drop_test")
    assert reason_of(r, leak) == "leakage"
    assert lab.as_posix() in detail_of(r, leak)
    assert reason_of(r, lab) is None
    assert r.stats["leaked_test_images"] == 1 and r.stats["leaked_test_dropped"] == 1
    assert r.stats["reason/leakage"] == 1


def test_test_copy_of_pool_image_is_leakage_too(small):
    pool = small["unlabeled"][2]
    leak = copy_file(pool, small["root"] / "test" / "normal" / "from_pool.png")
    _, r = qc(small["root"])
    assert reason_of(r, leak) == "leakage"
    assert reason_of(r, pool) is None


def test_leakage_policy_keep_lets_the_test_copy_pass(small):
    lab = small["labeled"]["cancer"][1]
    leak = copy_file(lab, small["root"] / "test" / "cancer" / "leak.png")
    _, r = qc(small["root"], leakage_policy="keep")
    assert reason_of(r, leak) is None and reason_of(r, lab) is None
    assert r.quarantine.empty
    assert r.stats["leaked_test_images"] == 1 and r.stats["leaked_test_dropped"] == 0


def test_leakage_policy_fail_raises(small):
    lab = small["labeled"]["normal"][0]
    copy_file(lab, small["root"] / "test" / "normal" / "leak.png")
    manifest, _ = build_manifest(small["root"], "cancer", 0.25, 0)
    with pytest.raises(DataError, match="leakage_policy=fail"):
        run_qc(manifest, **{**QC, "leakage_policy": "fail"})


def test_leakage_policy_fail_without_leaks_runs(small):
    _, r = qc(small["root"], leakage_policy="fail")
    assert r.quarantine.empty


def test_two_identical_test_images_are_a_duplicate_not_leakage(small):
    t = small["test"]["normal"][0]
    c = copy_file(t, small["root"] / "test" / "normal" / "zz.png")
    _, r = qc(small["root"])
    assert reason_of(r, c) == "duplicate" and reason_of(r, t) is None
    assert r.stats["leaked_test_images"] == 0


def test_same_image_under_two_labels_quarantines_every_copy(small):
    src = small["labeled"]["cancer"][3]
    other = copy_file(src, small["root"] / "labeled" / "normal" / "mislabelled.png")
    pool = copy_file(src, small["root"] / "unlabeled" / "also_here.png")
    test = copy_file(src, small["root"] / "test" / "cancer" / "and_here.png")
    _, r = qc(small["root"])
    for p in (src, other, pool, test):
        assert reason_of(r, p) == "label_conflict", p
    assert r.stats["reason/label_conflict"] == 4
    assert r.stats["exact_duplicate_groups"] == 0  # removed before duplicate grouping


def test_test_copy_with_another_label_is_a_conflict(small):
    src = small["labeled"]["normal"][3]
    t = copy_file(src, small["root"] / "test" / "cancer" / "flipped.png")
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
    copy_file(lay["labeled"]["cancer"][0], u / "dup.png")
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


# --------------------------------------------------------------------------- issue #3 additions


def test_empty_class_folder_is_a_clear_structural_error(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1)
    (lay["root"] / "labeled" / "normal_empty").mkdir()
    with pytest.raises(DataError, match="empty class folder"):
        build_manifest(lay["root"], "cancer", 0.25, 0)


@pytest.mark.parametrize("writer,mode", [
    (F.write_rgba_png, "RGBA"), (F.write_16bit_png, "I;16"), (F.write_palette_png, "P"),
])
def test_convert_modes_false_rejects_unusual_modes(tmp_path, writer, mode):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1, n_test={"cancer": 1, "normal": 1})
    odd = writer(lay["root"] / "unlabeled" / "odd.png", seed=5000)
    rgb = F.write_png(lay["root"] / "unlabeled" / "rgb.png", mode="RGB", seed=5001)
    _, r = qc(lay["root"], convert_modes=False)
    assert reason_of(r, odd) == "unsupported_mode"
    assert f"mode {mode}" in detail_of(r, odd) and "qc.convert_modes=false" in detail_of(r, odd)
    assert reason_of(r, rgb) is None
    _, r = qc(lay["root"], convert_modes=True)
    assert reason_of(r, odd) is None and f"mode {mode} converted to L" in note_of(r, odd)


def test_unsupported_mode_does_not_hide_a_truncated_file(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=1, n_test={"cancer": 1, "normal": 1})
    t = F.write_truncated_jpeg(lay["root"] / "unlabeled" / "t.jpg", seed=5002)
    _, r = qc(lay["root"], convert_modes=False)
    assert reason_of(r, t) == "decode_error"


def test_size_outliers_vs_the_median_are_noted_or_quarantined(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_unlabeled=6, n_test={"cancer": 1, "normal": 1},
                        size=(64, 64))
    big = F.write_png(lay["root"] / "unlabeled" / "big.png", size=(300, 300), seed=5003)
    small = F.write_png(lay["root"] / "unlabeled" / "small.png", size=(40, 40), seed=5004)
    near = F.write_png(lay["root"] / "unlabeled" / "near.png", size=(200, 200), seed=5005)
    _, r = qc(lay["root"])  # policy note (default): kept, explained
    assert r.quarantine.empty
    assert "size outlier: 300x300 vs median 64x64" in note_of(r, big)
    assert "qc.size_outlier_factor=0.25" in note_of(r, big)
    assert pd.isna(note_of(r, small)) and pd.isna(note_of(r, near))  # 40 > 16, 200 < 256
    assert r.stats["size/outliers"] == 1 and r.stats["notes/size_outlier"] == 1
    assert r.stats["size/distinct"] == 4
    _, r = qc(lay["root"], size_outlier_policy="quarantine", size_outlier_factor=0.5)
    assert reason_of(r, big) == reason_of(r, near) == "size_outlier"
    assert reason_of(r, small) is None  # 40 >= 0.5 x 64
    assert r.stats["reason/size_outlier"] == 2


# Near duplicates: smooth images (a 6x6 random grid, bicubic) and 2x upscaled PNG copies:
# a different file, pixel size and byte content, the same picture (pHash distance <= 2).


@pytest.fixture
def near(tmp_path):
    lay = F.make_layout(tmp_path / "raw", n_labeled={"cancer": 3, "normal": 3}, n_unlabeled=3,
                        n_test={"cancer": 2, "normal": 2})
    root = lay["root"]
    lab = write_smooth(root / "labeled" / "cancer" / "s_lab.png", seed=7001)
    return {"lay": lay, "root": root, "lab": lab}


def test_phash_is_close_for_a_resized_copy_and_far_for_another_image(near, tmp_path):
    from triage.images import phash64, to_grey_array
    copy = write_upscaled_copy(near["lab"], tmp_path / "up.png")
    other = write_smooth(tmp_path / "other.png", seed=7002)

    def h(p):
        with Image.open(p) as im:
            return phash64(to_grey_array(im))
    assert bin(h(near["lab"]) ^ h(copy)).count("1") <= 2
    assert bin(h(near["lab"]) ^ h(other)).count("1") > 10


def test_hamming_within_matches_brute_force():
    from triage.images import hamming_within
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    # flip a few bits of some hashes to make close pairs
    flips = base[:10] ^ np.array([1 << int(b) for b in rng.integers(0, 64, 10)], dtype=np.uint64)
    h = np.concatenate([base, flips])
    i, j, d = hamming_within(h, 3, block=7)
    expected = {(a, b, bin(int(h[a]) ^ int(h[b])).count("1")) for a in range(len(h))
                for b in range(a + 1, len(h)) if bin(int(h[a]) ^ int(h[b])).count("1") <= 3}
    assert set(zip(i.tolist(), j.tolist(), d.tolist())) == expected
    assert len(expected) >= 10


def test_near_duplicate_is_reported_and_kept_by_default(near):
    pool = write_upscaled_copy(near["lab"], near["root"] / "unlabeled" / "pool_copy.png")
    _, r = qc(near["root"])
    assert reason_of(r, pool) is None and reason_of(r, near["lab"]) is None
    assert f"near-duplicate of {near['lab'].as_posix()}" in note_of(r, pool)
    assert "qc.near_dup_hamming=2" in note_of(r, pool)
    assert r.stats["near_duplicate_groups"] == 1 and r.stats["near_duplicate_images"] == 1
    assert r.stats["notes/near_duplicate"] == 1 and r.stats["exact_duplicate_groups"] == 0
    assert len(r.groups["near"]) == 1 and len(r.groups["near"][0]) == 2
    assert r.clean["phash"].str.fullmatch(r"[0-9a-f]{16}").all()


def test_near_duplicate_policy_quarantine_keeps_the_training_copy(near):
    pool = write_upscaled_copy(near["lab"], near["root"] / "unlabeled" / "a_pool_copy.png")
    _, r = qc(near["root"], near_dup_policy="quarantine")
    assert reason_of(r, pool) == "near_duplicate" and reason_of(r, near["lab"]) is None
    assert near["lab"].as_posix() in detail_of(r, pool)


def test_near_dup_threshold_zero_only_links_identical_hashes(near):
    write_upscaled_copy(near["lab"], near["root"] / "unlabeled" / "pool_copy.png")
    other = write_smooth(near["root"] / "unlabeled" / "other.png", seed=7003)
    _, r = qc(near["root"], near_dup_hamming=64, near_dup_policy="report")
    assert r.stats["near_duplicate_images"] >= 2  # 64 bits: everything is "near"
    _, r = qc(near["root"], near_dup_hamming=0)
    assert r.stats["near_duplicate_groups"] <= 1
    assert pd.isna(note_of(r, other))


@pytest.mark.parametrize("policy,expect", [("drop_test", "near_leakage"), ("keep", None)])
def test_near_leakage_follows_the_leakage_policy_when_quarantining(near, policy, expect):
    t = write_upscaled_copy(near["lab"], near["root"] / "test" / "cancer" / "t_copy.png")
    _, r = qc(near["root"], near_dup_policy="quarantine", leakage_policy=policy)
    assert reason_of(r, t) == expect
    assert r.stats["near_leaked_test_images"] == 1
    if expect is None:
        assert "possible leakage" in note_of(r, t)
    else:
        assert "training/pool image" in detail_of(r, t)


def test_near_leakage_fail_raises_when_quarantining(near):
    write_upscaled_copy(near["lab"], near["root"] / "test" / "cancer" / "t_copy.png")
    manifest, _ = build_manifest(near["root"], "cancer", 0.25, 0)
    with pytest.raises(DataError, match="near-duplicate"):
        run_qc(manifest, **{**QC, "leakage_policy": "fail", "near_dup_policy": "quarantine"})


@pytest.mark.parametrize("leakage_policy,near_dup_policy,reason,note", [
    # a near-copy of a training image in a given test/ is leakage like an exact copy,
    # whatever near_dup_policy says (report used to keep it in test with a note)
    ("drop_test", "report", "near_leakage", None),
    ("drop_test", "quarantine", "near_leakage", None),
    ("keep", "report", None, "possible leakage kept"),
])
def test_near_leakage_follows_the_leakage_policy(near, leakage_policy, near_dup_policy, reason,
                                                  note):
    t = write_upscaled_copy(near["lab"], near["root"] / "test" / "cancer" / "t_copy.png")
    _, r = qc(near["root"], leakage_policy=leakage_policy, near_dup_policy=near_dup_policy)
    assert reason_of(r, t) == reason
    assert note is None or note in note_of(r, t)
    assert r.stats["near_leaked_test_images"] == 1 and r.stats["leaked_test_images"] == 0
    assert r.stats["near_leaked_test_dropped"] == int(reason == "near_leakage")
    assert t.as_posix() not in set(r.clean.loc[r.clean["split"] == "test", "path"]) or \
        leakage_policy == "keep"


def test_near_leakage_with_leakage_policy_fail_stops(near):
    write_upscaled_copy(near["lab"], near["root"] / "test" / "cancer" / "t_copy.png")
    with pytest.raises(DataError, match="near-duplicate"):
        qc(near["root"], leakage_policy="fail")


def test_a_test_split_the_pipeline_drew_keeps_a_near_duplicate_group_on_one_side(near):
    # test_source=split: the test image is moved to the labelled side (not dropped), so
    # its group stays whole and the image still trains
    t = write_upscaled_copy(near["lab"], near["root"] / "test" / "cancer" / "t_copy.png")
    manifest, _ = build_manifest(near["root"], "cancer", 0.25, 0)
    r = run_qc(manifest, **QC, test_source="split")
    assert reason_of(r, t) is None
    row = r.clean.set_index("path").loc[t.as_posix()]
    assert row["split"] == "labeled" and row["label"] == "cancer"
    assert "moved from the test split to labeled" in row["qc_note"]
    assert r.stats["near_moved_to_labeled"] == 1 and r.stats["notes/moved_to_labeled"] == 1
    lab = r.clean.set_index("path").loc[near["lab"].as_posix()]
    assert row["group"] == lab["group"]  # one split group: folds keep them together


def test_split_groups_join_near_duplicates_and_patients_transitively():
    from triage.qc import split_groups

    df = pd.DataFrame({"id": ["e", "b", "d", "a", "c"],
                       "patient": ["p1", None, "p1", None, None]})
    groups = split_groups(df, [[0, 1]])  # e~b near-duplicates; e and d one patient
    assert groups.tolist() == ["b", "b", "b", "a", "c"]
    assert split_groups(df.drop(columns="patient"), []).tolist() == df["id"].tolist()


def test_near_duplicate_under_another_label_is_a_conflict(near):
    other = write_upscaled_copy(near["lab"], near["root"] / "labeled" / "normal" / "flip.png")
    _, r = qc(near["root"])
    assert "filed under labels cancer, normal" in note_of(r, other)
    assert r.stats["near_label_conflict_groups"] == 1
    _, r = qc(near["root"], near_dup_policy="quarantine")
    assert reason_of(r, other) == reason_of(r, near["lab"]) == "label_conflict"


def test_leakage_kept_is_noted_and_exact_copies_join_the_near_group(near):
    t = copy_file(near["lab"], near["root"] / "test" / "cancer" / "exact.png")
    up = write_upscaled_copy(near["lab"], near["root"] / "unlabeled" / "up.png")
    _, r = qc(near["root"], leakage_policy="keep")
    assert "leakage kept" in note_of(r, t)
    group = r.groups["near"][0]
    paths = set(r.frame.loc[group, "path"])
    assert {near["lab"].as_posix(), t.as_posix(), up.as_posix()} == paths
    assert r.stats["notes/leakage_kept"] == 1


def test_metrics_have_intensity_per_split_and_class_and_shift(zoo):
    s = zoo["report"].stats
    c = zoo["report"].clean
    for split in ("labeled", "test"):
        for cls in ("cancer", "normal"):
            part = c[(c["split"] == split) & (c["label"] == cls)]
            assert s[f"intensity/{split}/{cls}/n"] == len(part)
            assert s[f"intensity/{split}/{cls}/mean"] == pytest.approx(part["mean"].mean(), abs=1e-3)
            assert s[f"intensity/{split}/{cls}/std"] == pytest.approx(part["std"].mean(), abs=1e-3)
    assert s["intensity/unlabeled/all/n"] == s["passed/unlabeled"]
    for key in ("shift/labeled_vs_unlabeled/ks_mean", "shift/labeled_vs_test/p_std"):
        assert 0.0 <= s[key] <= 1.0
    assert s["input_modes/RGBA"] == 1 and s["input_modes/P"] == 1 and s["input_modes/I;16"] == 1
    assert s["notes/mode_converted"] == 3 and s["notes/format_mismatch"] == 1
    assert set(zoo["report"].hist) == {"labeled", "unlabeled", "test"}
    for h in zoo["report"].hist.values():
        assert len(h) == 32 and sum(h) == pytest.approx(1.0, abs=1e-4)


def test_bad_params_are_refused(small):
    manifest, _ = build_manifest(small["root"], "cancer", 0.25, 0)
    from triage.errors import PipelineError
    for bad in ({"near_dup_policy": "drop"}, {"size_outlier_policy": "x"}, {"leakage_policy": "x"}):
        with pytest.raises(PipelineError, match="qc."):
            run_qc(manifest, **{**QC, **bad})


def test_multi_frame_images_get_a_note_not_silence(tmp_path):
    # an animated GIF / multi-page TIFF: the pipeline reads its first frame; say so
    frames = [Image.fromarray(np.full((48, 48), v, np.uint8)) for v in (40, 120, 200)]
    gif, tif = tmp_path / "anim.gif", tmp_path / "pages.tif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    frames[0].save(tif, save_all=True, append_images=frames[1:])
    for path in (gif, tif):
        res = inspect_image(str(path), 10**8)
        assert res["decode_error"] is None
        assert "multi_frame: 3 frames, only the first is used" in res["note"], path
    single = tmp_path / "one.png"
    frames[0].save(single)
    assert inspect_image(str(single), 10**8)["note"] is None


KILL_QC = """
import sys, time
from triage.qc import inspect_all
paths = sys.argv[1:]
print("START", flush=True)
inspect_all(paths * 200, 10**8, workers=2)
"""


def test_qc_decode_workers_die_with_a_killed_stage(tmp_path):
    # `kill -9` of the qc stage must not leave its decode pool sleeping forever
    import signal
    import subprocess
    import sys
    import time

    import psutil

    paths = [str(F.write_png(tmp_path / f"{i}.png", size=(256, 256), seed=i)) for i in range(8)]
    proc = subprocess.Popen([sys.executable, "-c", KILL_QC, *paths], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "START"
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 30
    while len(parent.children()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = parent.children()
    assert len(workers) >= 2, "the decode pool never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} decode workers outlived the killed stage"


def test_exif_orientation_is_applied_in_qc_and_the_pixels_everyone_reads(tmp_path):
    # a phone capture stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)
    from triage.images import load_grey

    stored = np.random.default_rng(3).integers(0, 255, (60, 40), dtype=np.uint8)  # 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = tmp_path / "capture.png"
    Image.fromarray(stored).save(sideways, exif=exif)
    upright = np.rot90(stored, k=-1)  # what the viewer shows: 60 wide, 40 tall
    np.testing.assert_array_equal(np.asarray(load_grey(str(sideways))), upright)
    res = inspect_image(str(sideways), 10**8)
    assert "exif_orientation: 6, shown and embedded upright" in res["note"]
    plain = tmp_path / "upright.png"
    Image.fromarray(np.ascontiguousarray(upright)).save(plain)
    assert inspect_image(str(plain), 10**8)["phash"] == res["phash"]  # the same picture
