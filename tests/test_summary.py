"""The decision numbers (metrics/summary.json) and the verdict rule of the review."""
import json
from pathlib import Path

import pytest

from triage.summary import HEADLINE, SOURCES, summarise, verdict, verdict_table, warnings

ROOT = Path(__file__).resolve().parents[1]
AUC = next(h for h in HEADLINE if h.key == "test_auc_semi")
FN = next(h for h in HEADLINE if h.key == "test_fn_semi")
N = next(h for h in HEADLINE if h.key == "pseudo_n")


def _committed():
    return {stage: json.loads((ROOT / path).read_text()) for stage, path in SOURCES.items()}


def test_every_headline_and_its_ci_comes_from_the_committed_metrics():
    metrics = _committed()
    summary = summarise(metrics, 0.95)
    assert summary["test_auc_semi"] == metrics["evaluate"]["semi_supervised"]["roc_auc"]
    assert summary["test_auc_semi_ci_low"] == metrics["evaluate"]["semi_supervised"]["roc_auc_ci_low"]
    assert summary["cv_delta_auc"] == metrics["crossval"]["delta"]["roc_auc_mean"]
    assert summary["cv_delta_auc_ci_high"] == metrics["crossval"]["delta"]["roc_auc_ci_high"]
    assert summary["pseudo_n"] == metrics["pseudo_label"]["n_accepted"]
    assert summary["target_sens"] == 0.95
    assert {h.key for h in HEADLINE} <= set(summary)


def test_summary_keys_clash_with_no_other_metrics_file():
    # a clash makes dvc exp show prefix the column with its path, breaking --keep filters
    def leaves(tree, prefix=""):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]

    others = set()
    for path in sorted((ROOT / "metrics").rglob("metrics.json")):
        others |= set(leaves(json.loads(path.read_text())))
    summary = json.loads((ROOT / "metrics/summary.json").read_text())
    assert not set(summary) & others


def test_pseudo_precision_is_left_out_without_a_hidden_truth():
    metrics = _committed()
    del metrics["pseudo_label"]["truth"]
    assert "pseudo_precision" not in summarise(metrics)


@pytest.mark.parametrize("base,head,headline,expected", [
    ({"test_auc_semi": .80, "test_auc_semi_ci_low": .75, "test_auc_semi_ci_high": .85},
     {"test_auc_semi": .90, "test_auc_semi_ci_low": .86, "test_auc_semi_ci_high": .94},
     AUC, "**better**"),
    ({"test_auc_semi": .80, "test_auc_semi_ci_low": .75, "test_auc_semi_ci_high": .85},
     {"test_auc_semi": .70, "test_auc_semi_ci_low": .65, "test_auc_semi_ci_high": .74},
     AUC, "**worse**"),
    ({"test_auc_semi": .80, "test_auc_semi_ci_low": .75, "test_auc_semi_ci_high": .85},
     {"test_auc_semi": .83, "test_auc_semi_ci_low": .78, "test_auc_semi_ci_high": .88},
     AUC, "no significant change"),           # CIs overlap
    ({"test_auc_semi": .80}, {"test_auc_semi": .80}, AUC, "unchanged"),
    ({"test_fn_semi": 13}, {"test_fn_semi": 9}, FN, "better (no CI)"),  # fewer missed
    ({"test_fn_semi": 9}, {"test_fn_semi": 13}, FN, "worse (no CI)"),
    ({"pseudo_n": 700}, {"pseudo_n": 650}, N, "changed"),                # a count
    ({}, {"test_auc_semi": .8}, AUC, "new"),
    ({"test_auc_semi": .8}, {}, AUC, "n/a"),
])
def test_verdict_is_better_or_worse_only_when_the_cis_do_not_overlap(base, head, headline, expected):
    assert verdict(base, head, headline) == expected


def test_verdict_table_rows_are_base_then_workspace_with_cis():
    base = {"test_auc_semi": .8, "test_auc_semi_ci_low": .75, "test_auc_semi_ci_high": .85}
    head = {"test_auc_semi": .9, "test_auc_semi_ci_low": .86, "test_auc_semi_ci_high": .94}
    lines = verdict_table("main", base, head).splitlines()
    assert lines[0] == "| | `main` | workspace | change | verdict |"
    assert lines[2] == ("| ROC-AUC, semi-supervised (test) | 0.800 [0.750, 0.850] | "
                        "0.900 [0.860, 0.940] | +0.100 | **better** |")
    assert len(lines) == 2 + len(HEADLINE)


def test_warnings_flag_a_missed_sensitivity_target_and_an_unproven_gain():
    notes = warnings({"test_sens_semi": .907, "target_sens": .95, "test_fn_semi": 14,
                      "cv_delta_auc_ci_low": -.01})
    assert notes[0] == "Test sensitivity 0.907 is below the 0.95 target (14 positives missed)."
    assert "includes 0" in notes[1]
    assert warnings({"test_sens_semi": .96, "target_sens": .95, "cv_delta_auc_ci_low": .01}) == []
    assert "(1 positive missed)" in warnings({"test_sens_semi": .9, "target_sens": .95,
                                              "test_fn_semi": 1})[0]
