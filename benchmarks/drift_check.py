"""Does the drift stage see drift where there is some, and none where there is none?

Runs `python -m stages.drift` (ad hoc mode: nothing DVC tracks is written) on the held-out test
split and on shifted copies of it, plus images from another dataset when
../shared/datasets is present, and prints the markdown table kept in docs/serving.md.
Needs the pipeline's outputs first (`dvc repro`).

    python benchmarks/drift_check.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
OTHER = ROOT.parent / "shared" / "datasets" / "brain_mri_4class" / "Testing"


def blur(im: Image.Image) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(1.5))


def low_contrast(im: Image.Image) -> Image.Image:
    a = np.asarray(im.convert("L"), dtype=np.float32)
    return Image.fromarray(np.clip(a.mean() + 0.6 * (a - a.mean()), 0, 255).astype(np.uint8))


def write_batch(paths: list[str], out: Path, transform) -> Path:
    out.mkdir(parents=True)
    for i, p in enumerate(paths):
        transform(Image.open(ROOT / p)).save(out / f"{i:05d}.png")
    return out


def run_drift(batch: Path | None, tmp: Path, name: str) -> dict:
    metrics = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "stages.drift", "--report", str(tmp / f"{name}.html"),
           "--metrics", str(metrics)]
    if batch is not None:
        cmd += ["--batch", str(batch)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(metrics.read_text())


def fmt_p(p: float) -> str:
    return "< 1e-6" if p == 0 else f"{p:.2g}"  # metrics are rounded to 6 decimals


def row(label: str, m: dict) -> str:
    """One table row from the flat metrics (``a/b`` keys) that --metrics writes."""
    stats = ("mean_intensity", "contrast", "sharpness")
    worst = min(stats, key=lambda k: m[f"image_stats/{k}/p_adjusted"])
    return (f"| {label} | {'**yes**' if m['drift'] else 'no'} | {fmt_p(m['embedding/mmd_p_value'])} "
            f"| {fmt_p(m['embedding/pca_ks_min_p_adjusted'])} "
            f"| {fmt_p(m[f'image_stats/{worst}/p_adjusted'])} ({worst}) "
            f"| {m['positive_rate/batch']:.2f} vs {m['positive_rate/reference']:.2f} "
            f"(p {'= ' if m['positive_rate/p_value'] else ''}{fmt_p(m['positive_rate/p_value'])}"
            f"{', shifted' if m['prediction_shift'] else ''}) |")


def main() -> None:
    clean = pd.read_parquet(ROOT / "data/qc/manifest_clean.parquet")
    test = sorted(clean.loc[clean["split"] == "test", "path"].unique())
    if not test:
        sys.exit("no test split in data/qc/manifest_clean.parquet: run `dvc repro` first")
    lines = ["| batch vs the training pool | drift | MMD p | PCA KS min p (Bonf.) "
             "| image stats min p (Bonf.) | predicted-positive rate, batch vs pool |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lines.append(row(f"held-out test split ({len(test)} images, default)",
                         run_drift(None, tmp, "test")))
        for label, fn in (("same test images, Gaussian blur σ = 1.5 px", blur),
                          ("same test images, contrast ×0.6", low_contrast)):
            key = fn.__name__
            lines.append(row(label, run_drift(write_batch(test, tmp / key, fn), tmp, key)))
        if OTHER.is_dir():
            other = sorted(str(p) for p in OTHER.rglob("*.jpg"))[::4][:300]
            lines.append(row(f"{len(other)} brain MRI images (another dataset)",
                             run_drift(write_batch(other, tmp / "other", lambda im: im.convert("L")),
                                       tmp, "other")))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
