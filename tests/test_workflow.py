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
