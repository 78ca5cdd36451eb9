"""Render ROC and precision-recall curves of <base-rev> vs the workspace as PNGs.

Called by scripts/review.sh; prints the markdown that embeds the images. The curves come
from the DVCLive plot files under metrics/evaluate/, which are committed to git, so the
base revision needs no DVC remote.

    python -m scripts.plot_diff <base-rev> <out-dir>     # from the repository root
"""
import json
import subprocess
import sys
from pathlib import Path

from triage.checkout import require_own_checkout
from triage.plotting import line_chart

MODELS = ("baseline", "semi_supervised")
PLOTS = {  # file stem: (title, x field, y field, x label, y label, diagonal)
    "roc": ("ROC, held-out test", "fpr", "tpr", "false positive rate", "sensitivity", True),
    "precision_recall": ("Precision-recall, held-out test", "recall", "precision", "recall",
                         "precision", False),
}


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
    for stem, (title, xf, yf, xl, yl, diag) in PLOTS.items():
        series, dashed = {}, set()
        for model in MODELS:
            path = f"metrics/evaluate/plots/sklearn/{stem}/{model}.json"
            for rev, tag in ((base, base), (None, "workspace")):
                curve = load_curve(rev, path, xf, yf)
                if curve is not None:
                    name = f"{model} @ {tag}"
                    series[name] = curve
                    if rev is not None:
                        dashed.add(name)
        if not series:
            print(f"- {title}: no curve files at `{base}` or in the workspace")
            continue
        img = line_chart(series, title=title, x_label=xl, y_label=yl, dashed=dashed,
                         diagonal=diag)
        img.save(out / f"{stem}.png")
        print(f"![{title}]({out.as_posix()}/{stem}.png)")
    print(f"\n(dashed: `{base}`; solid: workspace)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/plot_diff.py <base-rev> <out-dir>")
    main(sys.argv[1], sys.argv[2])
