"""The decision numbers of a run: ``metrics/summary.json`` and the reviewer's verdict table.

A reviewer decides on a handful of numbers: the test ROC-AUC of both models with their
CIs, the sensitivity and the missed positives at the operating point, crossval's
semi-supervised - baseline delta with its CI, and how many pseudo-labels were accepted
and how many were right. They are spread over 150 keys of three metrics files, and
``dvc metrics show`` / ``dvc exp show`` print thousands of columns; ``HEADLINE`` picks
them once, under short keys that no other metrics file uses (so ``dvc exp show`` never
prefixes them with a path and a ``--keep`` filter on them is stable).

- ``python -m stages.summary`` writes ``metrics/summary.json`` (a DVC metric, in git);
- ``python -m triage.summary`` prints the workspace's numbers as a narrow table;
- ``python -m triage.summary BASE`` prints the verdict table of BASE -> workspace that
  ``scripts/review.sh`` puts first.

Standard library and PyYAML (params.yaml) only: no stage above it is imported.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCES = {  # stage -> its DVCLive summary
    "evaluate": "metrics/evaluate/metrics.json",
    "crossval": "metrics/crossval/metrics.json",
    "pseudo_label": "metrics/pseudo_label/metrics.json",
}
OUT = Path("metrics/summary.json")


@dataclass(frozen=True)
class Headline:
    key: str          # key in metrics/summary.json
    stage: str        # SOURCES entry it is read from
    source: str       # dotted key there; its CI is <source minus _mean>_ci_low/_ci_high
    label: str        # what the verdict table calls it
    higher_is_better: bool | None  # None: a count, no better or worse
    digits: int = 3


HEADLINE = (
    Headline("test_auc_semi", "evaluate", "semi_supervised.roc_auc",
             "ROC-AUC, semi-supervised (test)", True),
    Headline("test_auc_base", "evaluate", "baseline.roc_auc", "ROC-AUC, baseline (test)", True),
    Headline("test_sens_semi", "evaluate", "semi_supervised.sensitivity",
             "Sensitivity at the operating point (test)", True),
    Headline("test_spec_semi", "evaluate", "semi_supervised.specificity",
             "Specificity at the operating point (test)", True),
    Headline("test_fn_semi", "evaluate", "semi_supervised.fn",
             "Missed positives at the operating point (test)", False, 0),
    Headline("test_setaside95_semi", "evaluate", "semi_supervised.triage.s95.set_aside",
             "Share a reader could set aside at the 0.95 target (test)", True),
    Headline("cv_delta_auc", "crossval", "delta.roc_auc_mean",
             "Delta ROC-AUC, semi-supervised - baseline (crossval)", True),
    Headline("pseudo_n", "pseudo_label", "n_accepted", "Pseudo-labels accepted", None, 0),
    Headline("pseudo_precision", "pseudo_label", "truth.accuracy",
             "Pseudo-labels right (demo: hidden truth)", True),
)
CI_SUFFIXES = ("_ci_low", "_ci_high")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def summarise(metrics: dict[str, dict], target_sensitivity: float | None = None) -> dict:
    """``metrics/summary.json`` from the stages' metrics (``{stage: dict}``): each
    headline value and its CI bounds when the source has them; absent sources are skipped
    (``pseudo_precision`` needs the demo's hidden truth)."""
    out: dict = {}
    for h in HEADLINE:
        tree = metrics.get(h.stage) or {}
        value = _get(tree, h.source)
        if value is None:
            continue
        out[h.key] = value
        stem = h.source.removesuffix("_mean")
        for suffix in CI_SUFFIXES:
            bound = _get(tree, stem + suffix)
            if bound is not None:
                out[h.key + suffix] = bound
    if target_sensitivity is not None:
        out["target_sens"] = target_sensitivity
    return out


def read_metrics(rev: str | None = None) -> dict[str, dict]:
    """The SOURCES files of the workspace (``rev`` None) or of a git revision."""
    found = {}
    for stage, path in SOURCES.items():
        if rev is None:
            text = Path(path).read_text() if Path(path).is_file() else None
        else:
            res = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
            text = res.stdout if res.returncode == 0 else None
        if text:
            found[stage] = json.loads(text)
    return found


def _fmt(summary: dict, h: Headline) -> str:
    value = summary.get(h.key)
    if value is None:
        return "n/a"
    text = f"{value:.{h.digits}f}"
    low, high = (summary.get(h.key + s) for s in CI_SUFFIXES)
    if low is not None and high is not None:
        text += f" [{low:.{h.digits}f}, {high:.{h.digits}f}]"
    return text


def verdict(base: dict, head: dict, h: Headline) -> str:
    """better / worse only when the two CIs do not overlap: a conservative rule, since
    the base's test predictions (DVC outputs) are not in git for a paired test."""
    old, new = base.get(h.key), head.get(h.key)
    if old is None or new is None:
        return "new" if old is None and new is not None else "n/a"
    if old == new:
        return "unchanged"
    if h.higher_is_better is None:
        return "changed"
    bounds = [tuple(s.get(h.key + x) for x in CI_SUFFIXES) for s in (base, head)]
    if any(b is None for pair in bounds for b in pair):
        up = (new > old) == h.higher_is_better
        return "better (no CI)" if up else "worse (no CI)"
    (old_low, old_high), (new_low, new_high) = bounds
    if new_low > old_high:
        return "**better**" if h.higher_is_better else "**worse**"
    if new_high < old_low:
        return "**worse**" if h.higher_is_better else "**better**"
    return "no significant change"


def verdict_table(base_rev: str, base: dict, head: dict) -> str:
    rows = [f"| | `{base_rev}` | workspace | change | verdict |", "|---|---|---|---|---|"]
    for h in HEADLINE:
        old, new = base.get(h.key), head.get(h.key)
        change = f"{new - old:+.{h.digits}f}" if old is not None and new is not None else ""
        rows.append(f"| {h.label} | {_fmt(base, h)} | {_fmt(head, h)} | {change} | "
                    f"{verdict(base, head, h)} |")
    return "\n".join(rows)


def warnings(summary: dict) -> list[str]:
    """Plain lines a reviewer must not miss (e.g. the sensitivity target missed)."""
    notes = []
    sens, target = summary.get("test_sens_semi"), summary.get("target_sens")
    if sens is not None and target is not None and sens < target:
        fn = summary.get("test_fn_semi")
        missed = (f" ({fn:.0f} positive{'' if fn == 1 else 's'} missed)"
                  if fn is not None else "")
        notes.append(f"Test sensitivity {sens:.3f} is below the {target:.2f} target{missed}.")
    low = summary.get("cv_delta_auc_ci_low")
    if low is not None and low <= 0:
        notes.append("Crossval does not show that semi-supervision helps: the delta's CI "
                     "includes 0.")
    return notes


def table(summary: dict) -> str:
    width = max(len(h.label) for h in HEADLINE)
    return "\n".join(f"{h.label:<{width}}  {_fmt(summary, h)}" for h in HEADLINE)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    head = summarise(read_metrics(), _target())
    if not args:
        print(table(head))
        return
    base = summarise(read_metrics(args[0]), _target(args[0]))
    print(verdict_table(args[0], base, head))
    for note in warnings(head):
        print(f"\n> **{note}**")


def _target(rev: str | None = None) -> float | None:
    import yaml  # the stage's only non-stdlib need; PyYAML is a DVC dependency

    if rev is None:
        text = Path("params.yaml").read_text() if Path("params.yaml").is_file() else None
    else:
        res = subprocess.run(["git", "show", f"{rev}:params.yaml"], capture_output=True, text=True)
        text = res.stdout if res.returncode == 0 else None
    return _get(yaml.safe_load(text) or {}, "evaluate.target_sensitivity") if text else None


if __name__ == "__main__":
    main()
