"""End to end: the real `dvc repro` in a temp git repo built from this project.

Slow-ish (a few full runs of a shrunken demo); covers what users and CI rely on:
metric keys, no-op second run, byte-identical `dvc repro -f`, a `train.*` change re-running
only downstream stages, and folder mode quarantining a corrupt image and a name DVC cannot hash.
"""
import json
import sys
from pathlib import Path

import imagefactory as F
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import TINY, clone_repo, e2e_env, make_repo, run, set_params
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Every stage of dvc.yaml, so "which stages ran" checks see all of them.
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
MODELS = ("baseline", "semi_supervised")
METRIC_NAMES = ("roc_auc pr_auc f1 accuracy sensitivity specificity ppv npv fn threshold "
                "brier ece").split()


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture(scope="module")
def demo_repo(tiny_pipeline, tmp_path_factory):
    # a copy of the session's reproduced TINY pipeline (conftest.tiny_pipeline): these tests
    # change it (forced run, a params change on a branch)
    tmp = tmp_path_factory.mktemp("e2e")
    repo = clone_repo(tiny_pipeline.repo, tmp / "repo")
    return repo, {**tiny_pipeline.env, "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache")}, tiny_pipeline


def test_full_run_produces_metric_contract(demo_repo):
    repo, env, first = demo_repo
    assert ran_stages(first.stdout) == STAGES
    metrics = json.loads((repo / "metrics/evaluate/metrics.json").read_text())
    for model in MODELS:
        for m in METRIC_NAMES:
            assert m in metrics[model], f"{model}.{m} missing"
        for m in ("roc_auc", "sensitivity", "specificity"):
            assert metrics[model][f"{m}_ci_low"] <= metrics[model][m] <= metrics[model][f"{m}_ci_high"]
        # the triage KPI: <model>.triage.s90|s95|s98.{sensitivity,set_aside,missed} (+CI), threshold
        triage = metrics[model]["triage"]
        assert set(triage) == {"s90", "s95", "s98"}, model
        for key, block in triage.items():
            assert set(block) == {"threshold"} | {f"{k}{s}" for k in ("sensitivity", "set_aside", "missed")
                                                  for s in ("", "_ci_low", "_ci_high")}, (model, key)
            for k in ("sensitivity", "set_aside", "missed"):
                assert block[f"{k}_ci_low"] <= block[k] <= block[f"{k}_ci_high"], (model, key, k)
            assert 0 <= block["missed"] <= metrics[model]["tp"] + metrics[model]["fn"]
        assert triage["s95"]["threshold"] == metrics[model]["threshold"]  # the operating point
        assert triage["s95"]["missed"] == metrics[model]["fn"]
        assert triage["s90"]["threshold"] >= triage["s95"]["threshold"] >= triage["s98"]["threshold"]
    for m in METRIC_NAMES:
        assert m in metrics["delta"]
    assert metrics["n_test"] == TINY["data.demo.n_test"]
    for stage in ("prepare", "qc", "embed", "cluster", "pseudo_label", "train", "evaluate"):
        assert (repo / f"metrics/{stage}/metrics.json").is_file()
    # Representation stages are off by default: markers only, no finetuned.* metrics.
    for stage in ("pretrain", "finetune"):
        assert json.loads((repo / f"metrics/{stage}/metrics.json").read_text()) == {"enabled": 0}
        assert (repo / f"data/{stage}/disabled.json").is_file()
    assert "finetuned" not in metrics
    for plot in ("roc", "precision_recall", "confusion", "calibration"):
        for model in MODELS:
            assert (repo / f"metrics/evaluate/plots/sklearn/{plot}/{model}.json").is_file()
    # Outputs are DVC's, not git's; metrics are git's (cache: false).
    ignored = run(["git", "status", "--porcelain", "--ignored"], repo, env).stdout
    assert "data/features/" in ignored or "data/features/embeddings.parquet" in ignored
    assert "metrics/evaluate" not in run(["git", "check-ignore", "-v", "metrics/evaluate/metrics.json"],
                                         repo, env, check=False).stdout
    pseudo = json.loads((repo / "metrics/pseudo_label/metrics.json").read_text())
    assert "accuracy" in pseudo.get("truth", {}) or pseudo["n_accepted"] == 0
    shown = run(["dvc", "metrics", "show", "--json"], repo, env).stdout
    assert "semi_supervised" in shown


def test_second_repro_runs_nothing_and_status_is_clean(demo_repo):
    repo, env, _ = demo_repo
    assert run(["dvc", "status", "-q"], repo, env, check=False).returncode == 0
    again = run(["dvc", "repro"], repo, env)
    assert ran_stages(again.stdout) == []


def test_forced_repro_gives_identical_lock(demo_repo):
    repo, env, _ = demo_repo
    before = (repo / "dvc.lock").read_text()
    forced = run(["dvc", "repro", "-f"], repo, env)
    assert ran_stages(forced.stdout) == STAGES
    assert (repo / "dvc.lock").read_text() == before


def test_train_param_change_reruns_only_downstream_and_review_shows_it(demo_repo):
    repo, env, _ = demo_repo
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    run(["git", "branch", "-f", "base"], repo, env)
    run(["git", "checkout", "-qb", "feature"], repo, env)
    set_params(repo, {"train.C": 0.5})
    assert run(["dvc", "status", "-q"], repo, env, check=False).returncode == 1
    out = run(["dvc", "repro"], repo, env)
    # The stages that read train.* (crossval, train, report) and those that read the new
    # models or their metrics (evaluate, select, drift, summary); nothing upstream of train.
    assert sorted(ran_stages(out.stdout)) == sorted(["crossval", "train", "evaluate", "report",
                                                     "select", "drift", "summary", "audit"])
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "C=0.5"], repo, env)

    report = run(["bash", "scripts/review.sh", "base"], repo, env).stdout
    lines = report.splitlines()
    assert lines[0].startswith("# Pipeline review: workspace vs `base`")
    # the first screen is the verdict table: base -> workspace with CIs and a verdict each
    assert lines[2] == "| | `base` | workspace | change | verdict |", lines[:4]
    table = [line for line in lines[4:] if line.startswith("| ")]
    assert table[0].startswith("| ROC-AUC, semi-supervised (test) |")
    base_auc = json.loads(run(["git", "show", "base:metrics/evaluate/metrics.json"], repo,
                              env).stdout)["semi_supervised"]["roc_auc"]
    assert f"{base_auc:.3f} [" in table[0]
    assert any(v in table[0] for v in ("unchanged", "no significant change", "better", "worse"))
    assert "Results are fresh" in report
    params = report[report.index("## Params changed"):report.index("## Curves")]
    assert "train.C" in params and "0.1" in params and "0.5" in params
    assert report.index("## Curves") < report.index("# Details")
    metrics = report[report.index("## All metrics"):]
    assert "metrics/evaluate/metrics.json" in metrics
    assert "baseline.roc_auc" in metrics or "semi_supervised.roc_auc" in metrics
    assert "qc/metrics.json" not in metrics  # QC did not re-run: nothing changed there
    assert "metrics/runtime" not in report  # wall-clock figures are not in the review
    assert (repo / "dvc_plots/roc.png").is_file() and "dvc_plots/roc.png" in report


def _img(path: Path, rng, size=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.normal(120, 30, (size, size))
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path)


def docs_block(doc: Path, marker: str) -> list[str]:
    """The command lines of the ```bash block after ``marker`` in a doc (comments dropped)."""
    text = doc.read_text()
    block = text[text.index(marker):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_folder_mode_versioned_as_documented_quarantines_bad_files(tmp_path):
    env = e2e_env(tmp_path)
    repo = make_repo(tmp_path, env)
    rng = np.random.default_rng(0)
    raw = repo / "data/raw"
    for cls in ("cancer", "normal"):
        for i in range(12):
            _img(raw / "labeled" / cls / f"{i}.png", rng)
        for i in range(3):
            _img(raw / "test" / cls / f"t{i}.png", rng)
    for i in range(30):
        _img(raw / "unlabeled" / "batch1" / f"{i}.png", rng)  # recursive
    good = raw / "labeled/cancer/0.png"
    buf = (raw / "labeled/cancer/11.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(buf.with_suffix(".jpg"))
    data = buf.with_suffix(".jpg").read_bytes()
    (raw / "unlabeled/broken.jpg").write_bytes(data[: len(data) // 2])  # truncated transfer
    F.write_non_utf8_name(raw / "unlabeled", stem=b"scan_\xff")  # DVC cannot hash this name
    for i in range(2):  # a labelled image re-encoded larger into test: near-duplicate leakage
        src = F.write_smooth(raw / "labeled" / "cancer" / f"smooth{i}.png", seed=9100 + i)
        F.write_upscaled_copy(src, raw / "test" / "cancer" / f"copy{i}.png")
    assert good.exists()
    (repo / "data/weights/resnet18-f37072fd.pth").write_bytes(b"stand-in weights")
    set_params(repo, {"data.source": "folder", "cluster.k": 3})
    # docs/pipeline.md's versioning commands, as written, against a local remote
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], repo, env)
    for line in docs_block(ROOT / "docs/pipeline.md", "tests/test_pipeline.py runs this block"):
        run(["bash", "-c", line], repo, env)
    untracked = run(["git", "status", "--porcelain", "--untracked-files=all"], repo, env).stdout
    assert "data/raw" not in untracked and "data/weights" not in untracked, untracked
    tracked = run(["git", "ls-files", "data"], repo, env).stdout.split()
    assert {"data/raw/labeled.dvc", "data/raw/unlabeled.dvc", "data/raw/test.dvc",
            "data/weights/resnet18-f37072fd.pth.dvc"} <= set(tracked)
    assert not [t for t in tracked if t.endswith((".png", ".jpg", ".pth"))]  # no image in git
    assert any((tmp_path / "remote").rglob("*")), "dvc push stored nothing"
    out = run(["dvc", "repro"], repo, env)
    assert ran_stages(out.stdout) == STAGES
    assert run(["dvc", "status", "-q"], repo, env, check=False).returncode == 0
    quarantine = (repo / "data/qc/quarantine.csv").read_text()
    assert "data/raw/unlabeled/broken.jpg,decode_error" in quarantine
    assert "data/raw/unlabeled/scan_\\xff.png,non_utf8_filename" in quarantine
    for i in range(2):
        assert f"data/raw/test/cancer/copy{i}.png,near_leakage" in quarantine
    qc = json.loads((repo / "metrics/qc/metrics.json").read_text())
    assert qc["n_images"] == qc["n_passed"] + qc["n_quarantined"] == 26 + 8 + 30 + 3
    assert qc["near_leaked_test_images"] == qc["near_leaked_test_dropped"] == 2
    clean = pd.read_parquet(repo / "data/qc/manifest_clean.parquet")
    test_groups = set(clean.loc[clean["split"] == "test", "group"])
    assert test_groups.isdisjoint(clean.loc[clean["split"] != "test", "group"])
    n_test = json.loads((repo / "metrics/evaluate/metrics.json").read_text())["n_test"]
    assert n_test == 6  # the near-copies are not scored
    assert qc["reason"]["decode_error"] == 1 and qc["reason"]["non_utf8_filename"] == 1


def test_missing_data_folder_is_a_clear_error(tmp_path):
    env = e2e_env(tmp_path)
    repo = make_repo(tmp_path, env)
    set_params(repo, {"data.source": "folder"})
    res = run([sys.executable, "-m", "stages.prepare"], repo, env, check=False)
    assert res.returncode == 1
    assert "ERROR:" in res.stderr and "data/raw/labeled" in res.stderr
    assert "Traceback" not in res.stderr
    set_params(repo, {"data.source": "somewhere"})
    res = run([sys.executable, "-m", "stages.prepare"], repo, env, check=False)
    assert "data.source" in res.stderr and "Traceback" not in res.stderr


def test_readme_experiment_recipe_queues_filters_and_keeps_the_ci_columns(tiny_pipeline, tmp_path):
    # the README's experiments block as written: a queued run never touches the workspace,
    # its log is readable, and the exp show filter keeps the CI columns it names
    repo = clone_repo(tiny_pipeline.repo, tmp_path / "repo")
    env = {**tiny_pipeline.env, "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache")}
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    lines = docs_block(ROOT / "README.md", "tests/test_pipeline.py runs this block")
    show = next(line for line in lines if line.startswith("dvc exp show"))
    C = lambda: yaml.safe_load((repo / "params.yaml").read_text())["train"]["C"]  # noqa: E731
    before = C()
    for line in lines:
        if line is show or line.startswith("dvc exp apply"):
            continue
        out = run(["bash", "-c", line], repo, env)
        if line.startswith("dvc queue logs"):
            assert "Running stage 'train'" in out.stdout + out.stderr
        assert C() == before  # queued: the workspace keeps its params
    status = run(["dvc", "queue", "status"], repo, env).stdout
    assert "Success" in status and "Failed" not in status, status
    table = json.loads(run(["bash", "-c", show + " --json"], repo, env).stdout)
    exp = [e for row in table for e in (row.get("experiments") or [])
           for e in e["revs"] if e.get("name") == "high-c"]
    assert exp, "the queued experiment is not in dvc exp show"
    csv = run(["bash", "-c", show + " --csv"], repo, env).stdout.splitlines()
    columns = csv[0].split(",")
    assert {"train.C", "test_auc_semi", "test_sens_semi", "test_fn_semi", "cv_delta_auc",
            "cv_delta_auc_ci_low", "cv_delta_auc_ci_high"} <= set(columns), columns
    assert not [c for c in columns if ":" in c], columns  # no path-prefixed (clashing) key
    assert any(row.split(",")[columns.index("train.C")] == "1.0" for row in csv[1:])
    apply = next(line for line in lines if line.startswith("dvc exp apply"))
    run(["bash", "-c", apply], repo, env)
    assert C() == 1.0
