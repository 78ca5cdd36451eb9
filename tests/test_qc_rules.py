"""One per-image QC rule set (``triage.qc.IMAGE_RULES``) for the qc stage and for
inference: the same image gets the same reason and the same detail text from ``run_qc``
(data/qc/quarantine.csv) and from ``inference.qc_image`` (predictions). Real files."""
from pathlib import Path

import imagefactory as F
import numpy as np
import pytest
from helpers import QC
from PIL import Image

from triage.inference import qc_image
from triage.prepare import build_manifest
from triage.qc import IMAGE_RULES, Measured, check_image, run_qc


def texture(w, h, seed):
    return Image.fromarray(F.texture((w, h), seed), "L")


def constant(w, h, value=128):
    return Image.fromarray(np.full((h, w), value, dtype=np.uint8), "L")


def checkerboard(w, h):
    # pixel values 0/1: std exactly 0.5, a "blank" with a non-zero std
    return Image.fromarray((np.indices((h, w)).sum(axis=0) % 2).astype(np.uint8), "L")


# name: (image, expected reason, expected detail). The texts are the qc stage's
# (numpy rounding, "10.0" / "0.0"), which qc_image used to print otherwise ("10.00", "0.000").
CASES = {
    "tiny": (lambda: texture(10, 10, 2001), "too_small", "10x10 < qc.min_side=32"),
    "wide": (lambda: texture(400, 40, 2002), "aspect_outlier", "10.0 > qc.max_aspect=4.0"),
    "blank": (lambda: constant(64, 64), "blank", "pixel std 0.0 < qc.min_std=2.0"),
    "odd_aspect": (lambda: texture(301, 67, 2003), "aspect_outlier", "4.49 > qc.max_aspect=4.0"),
    "tall": (lambda: texture(33, 700, 2004), "aspect_outlier", "21.21 > qc.max_aspect=4.0"),
    "low_std": (lambda: checkerboard(64, 64), "blank", "pixel std 0.5 < qc.min_std=2.0"),
    # precedence when several rules fail: too_small, then aspect_outlier, then blank
    "tiny_blank": (lambda: constant(10, 10), "too_small", "10x10 < qc.min_side=32"),
    "wide_blank": (lambda: constant(400, 40), "aspect_outlier", "10.0 > qc.max_aspect=4.0"),
    "tiny_wide": (lambda: texture(100, 10, 2005), "too_small", "100x10 < qc.min_side=32"),
    "fine": (lambda: texture(64, 48, 2006), None, None),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules") / "raw"
    F.make_layout(root, n_unlabeled=2, n_test={"cancer": 2, "normal": 2})
    pool = root / "unlabeled"
    paths = {}
    for name, (make, _, _) in CASES.items():
        paths[name] = pool / f"{name}.png"
        make().save(paths[name], format="PNG")
    # failures before the rules (scan, decode) must agree as well
    paths["zero"] = F.write_zero_byte(pool / "zero.png")
    paths["truncated"] = F.write_truncated_jpeg(pool / "truncated.jpg", seed=2007)
    paths["text"] = F.write_text_as_image(pool / "notes.png")
    manifest, _ = build_manifest(root, "cancer", 0.25, 0)
    report = run_qc(manifest, **QC)
    stage = {p: (r, d) for p, r, d in report.quarantine.itertuples(index=False)}
    return {"paths": paths, "manifest": manifest, "stage": stage}


def stage_verdict(folder, path: Path):
    return folder["stage"].get(path.as_posix(), (None, None))


def serve_verdict(path: Path):
    out = qc_image(path, QC)
    return (None, None) if out["qc_status"] == "ok" else (out["qc_status"], out["qc_detail"])


@pytest.mark.parametrize("name", list(CASES))
def test_stage_and_inference_give_the_same_reason_and_detail(folder, name):
    _, reason, detail = CASES[name]
    path = folder["paths"][name]
    assert stage_verdict(folder, path) == (reason, detail)
    assert serve_verdict(path) == (reason, detail)


def test_every_image_of_the_folder_gets_the_same_verdict_in_both(folder):
    paths = [Path(p) for p in folder["manifest"]["path"]]
    assert len(paths) > len(CASES)
    for path in paths:
        assert serve_verdict(path) == stage_verdict(folder, path), path


def test_rules_are_declared_once_in_precedence_order():
    assert [r.reason for r in IMAGE_RULES] == ["too_small", "aspect_outlier", "blank"]
    # a measurement failing all three gets the first
    assert check_image(Measured(5, 100, 0.0), QC) == ("too_small", "5x100 < qc.min_side=32")
    assert check_image(Measured(500, 100, 0.0), QC) == ("aspect_outlier", "5.0 > qc.max_aspect=4.0")
    assert check_image(Measured(100, 100, 1.9996), QC) == ("blank", "pixel std 2.0 < qc.min_std=2.0")
    assert check_image(Measured(100, 100, 2.0), QC) is None


@pytest.mark.parametrize("w,h,ok", [(32, 32, True), (31, 200, False), (128, 32, True), (129, 32, False)])
def test_thresholds_are_strict(w, h, ok):
    assert (check_image(Measured(w, h, 50.0), QC) is None) is ok


def test_the_rules_read_the_params_they_are_given():
    strict = {**QC, "min_side": 200, "max_aspect": 1.5, "min_std": 60.0}
    assert check_image(Measured(150, 300, 50.0), strict) == ("too_small", "150x300 < qc.min_side=200")
    assert check_image(Measured(400, 200, 50.0), strict) == ("aspect_outlier", "2.0 > qc.max_aspect=1.5")
    assert check_image(Measured(300, 300, 50.0), strict) == ("blank", "pixel std 50.0 < qc.min_std=60.0")
