"""Render ROC and precision-recall curves of <base-rev> vs the workspace as PNGs.

Called by scripts/review.sh; prints the markdown that shows the images. The curves and
the operating points come from the evaluate stage's DVCLive files under metrics/evaluate/,
which are committed to git, so the base revision needs no DVC remote. One colour per
model, base dashed, workspace solid; the legend gives each curve's area and its operating
point (a ring on the curve).

Images are linked by path; ``REVIEW_IMAGE_BASE_URL`` links them under that URL instead
(where CI uploaded them, so they show in a PR comment) and ``REVIEW_IMAGES=inline``
embeds them as data URIs (a self-contained markdown file).

    python -m scripts.plot_diff <base-rev> <out-dir>     # from the repository root
"""
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from triage.checkout import require_own_checkout
from triage.plotting import line_chart
from triage.summary import read_metrics

MODELS = ("baseline", "semi_supervised")
PLOTS = {  # file stem: (title, x field, y field, x label, y label, diagonal)
    "roc": ("ROC, held-out test", "fpr", "tpr", "false positive rate", "sensitivity", True),
    "precision_recall": ("Precision-recall, held-out test", "recall", "precision", "recall",
                         "precision", False),
}
# file stem: (area metric, legend name of the area, operating point (x, y) from metrics)
SUMMARY = {
    "roc": ("roc_auc", "AUC", lambda m: (1 - m["specificity"], m["sensitivity"])),
    "precision_recall": ("pr_auc", "AP", lambda m: (m["sensitivity"], m["ppv"])),
}


def legend(stem: str, model: str, tag: str, metrics: dict | None):
    """(legend text, operating point or None) of one curve."""
    area, area_name, point = SUMMARY[stem]
    m = (metrics or {}).get(model) or {}
    try:
        x, y = point(m)
    except KeyError:
        return f"{model}, {tag}", None
    text = (f"{model}, {tag}: {area_name} {m[area]:.3f}; threshold {m['threshold']:.3g} gives "
            f"sensitivity {m['sensitivity']:.3f}" + (f", FPR {x:.3f}" if stem == "roc" else
                                                   f", precision {y:.3f}"))
    return text, (x, y)


def image_ref(title: str, path: Path) -> str:
    url = os.environ.get("REVIEW_IMAGE_BASE_URL")
    if os.environ.get("REVIEW_IMAGES") == "inline":
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{title}](data:image/png;base64,{data})"
    if url:
        return f"![{title}]({url.rstrip('/')}/{path.name})"
    return f"![{title}]({path.as_posix()})"


def load_curve(rev: str | None, path: str, xf: str, yf: str):
    """(xs, ys) from the workspace (rev None) or a git revision; None if absent."""
    if rev is None:
        p = Path(path)
        text = p.read_text() if p.is_file() else None
    else:
        res = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
        text = res.stdout if res.returncode == 0 else None
    if not text:
        return None
    rows = next(iter(json.loads(text).values()))  # DVCLive: {"roc": [{fpr, tpr, ...}, ...]}
    return [r[xf] for r in rows], [r[yf] for r in rows]


def main(base: str, out_dir: str) -> None:
    require_own_checkout(__file__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluate = {rev: read_metrics(rev).get("evaluate") for rev in (base, None)}
    for stem, (title, xf, yf, xl, yl, diag) in PLOTS.items():
        series, dashed, colour_of, points = {}, set(), {}, {}
        for i, model in enumerate(MODELS):
            path = f"metrics/evaluate/plots/sklearn/{stem}/{model}.json"
            for rev, tag in ((base, f"base {base}"), (None, "workspace")):
                curve = load_curve(rev, path, xf, yf)
                if curve is None:
                    continue
                name, point = legend(stem, model, tag, evaluate[rev])
                series[name], colour_of[name] = curve, i
                if point is not None:
                    points[name] = point
                if rev is not None:
                    dashed.add(name)
        if not series:
            print(f"- {title}: no curve files at `{base}` or in the workspace")
            continue
        img = line_chart(series, title=title, x_label=xl, y_label=yl, dashed=dashed,
                         diagonal=diag, colour_of=colour_of, points=points,
                         size=(640, 440))
        img.save(out / f"{stem}.png")
        print(image_ref(title, out / f"{stem}.png"))
    print(f"\n(dashed: base `{base}`; solid: workspace; a ring: the operating point)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/plot_diff.py <base-rev> <out-dir>")
    main(sys.argv[1], sys.argv[2])
