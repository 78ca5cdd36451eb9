"""Shared fixtures. Tests import the ``triage`` package from the repo root."""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DVC / DVCLive isolation for every test process (see tests/test_pipeline.py for repos).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DVCLIVE_TEST", "true")

SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not present at {SHARED_DATASETS}")
    return SHARED_DATASETS


@dataclass(frozen=True)
class Reproduced:
    """A TINY demo pipeline after one `dvc repro` in a plain environment (no kernel knobs)."""

    repo: Path
    env: dict
    stdout: str   # of that first run
    lock: str     # its dvc.lock, read before anyone could touch the repo
    hashes: dict  # md5 of every stage output file (helpers.output_hashes)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Reproduced:
    """The one full `dvc repro` the end-to-end tests share. Never change ``repo``: take a
    copy with ``helpers.clone_repo`` (tests/test_pipeline.py, tests/test_reproducibility.py)."""
    from helpers import make_repo, output_hashes, plain_env, run

    tmp = tmp_path_factory.mktemp("tiny_pipeline")
    env = plain_env(tmp)
    repo = make_repo(tmp, env)  # the project's sources, TINY params, a fresh git repo
    first = run(["dvc", "repro"], repo, env)
    return Reproduced(repo, env, first.stdout, (repo / "dvc.lock").read_text(), output_hashes(repo))
