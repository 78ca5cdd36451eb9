"""The CI workflow file: valid against GitHub's schema and wired to the project's scripts."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github/workflows/pipeline-review.yml"


def test_workflow_validates_against_github_schema():
    exe = Path(sys.executable).parent / "check-jsonschema"
    if not exe.exists() and not shutil.which("check-jsonschema"):
        pytest.skip("check-jsonschema not installed")
    res = subprocess.run([str(exe if exe.exists() else "check-jsonschema"), "--builtin-schema",
                          "vendor.github-workflows", str(WORKFLOW)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_workflow_reproduces_gates_and_reports():
    wf = yaml.safe_load(WORKFLOW.read_text())
    assert "pull_request" in wf[True]  # YAML 1.1 reads the key `on` as True
    steps = wf["jobs"]["reproduce"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    assert "pip install -r requirements.txt" in runs
    assert "dvc repro" in runs and "dvc status -q" in runs and "git diff --exit-code dvc.lock" in runs
    assert "scripts/review.sh" in runs  # one script, not a copy of its logic
    assert "dvc pull --run-cache" in runs
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)
    assert (ROOT / "scripts/review.sh").stat().st_mode & 0o111


def test_review_images_are_published_where_the_comment_links_them(tmp_path):
    # a PR comment cannot hold images: CI pushes them to a branch and review.sh links there
    wf = yaml.safe_load(WORKFLOW.read_text())
    steps = wf["jobs"]["reproduce"]["steps"]
    review = next(s for s in steps if "scripts/review.sh" in s.get("run", ""))
    publish = next(s for s in steps if "publish_review_images.sh" in s.get("run", ""))
    assert steps.index(publish) == steps.index(review) + 1
    url = review["env"]["REVIEW_IMAGE_BASE_URL"]
    assert "raw/review-plots/pr-{2}/{3}" in url and "pr-${{ github.event.pull_request.number }}/" \
        "${{ github.sha }}" in publish["run"]

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    git = lambda *a, cwd=tmp_path / "work": subprocess.run(  # noqa: E731
        ["git", *a], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout
    git("init", "-q", "--bare", str(tmp_path / "remote.git"), cwd=tmp_path)
    git("clone", "-q", str(tmp_path / "remote.git"), str(tmp_path / "work"), cwd=tmp_path)
    git("commit", "-q", "--allow-empty", "-m", "code")
    plots = tmp_path / "work" / "dvc_plots"
    plots.mkdir()
    (plots / "roc.png").write_bytes(b"first")
    script = str(ROOT / "scripts/publish_review_images.sh")
    for dest, data in (("pr-7/aaa", b"first"), ("pr-7/bbb", b"second")):
        (plots / "roc.png").write_bytes(data)
        subprocess.run(["bash", script, "dvc_plots", dest], cwd=tmp_path / "work", env=env,
                       check=True, capture_output=True)
    files = git("ls-tree", "-r", "--name-only", "review-plots", cwd=tmp_path / "remote.git")
    assert files.split() == ["pr-7/aaa/roc.png", "pr-7/bbb/roc.png"]  # earlier runs kept
    assert git("show", "review-plots:pr-7/bbb/roc.png", cwd=tmp_path / "remote.git") == "second"
    assert git("status", "--porcelain") == "?? dvc_plots/\n"  # the checkout is left alone
    assert "review-plots" not in git("branch")


def test_review_links_images_under_the_base_url_or_inline(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # scripts/ is not an installed package
    from scripts.plot_diff import image_ref

    png = tmp_path / "roc.png"
    png.write_bytes(b"\x89PNG")
    monkeypatch.delenv("REVIEW_IMAGES", raising=False)
    monkeypatch.setenv("REVIEW_IMAGE_BASE_URL", "https://h/o/r/raw/review-plots/pr-1/abc/")
    assert image_ref("ROC", png) == "![ROC](https://h/o/r/raw/review-plots/pr-1/abc/roc.png)"
    monkeypatch.setenv("REVIEW_IMAGES", "inline")
    assert image_ref("ROC", png) == "![ROC](data:image/png;base64,iVBORw==)"
    monkeypatch.delenv("REVIEW_IMAGES")
    monkeypatch.delenv("REVIEW_IMAGE_BASE_URL")
    assert image_ref("ROC", png) == f"![ROC]({png.as_posix()})"
