"""Shared fixtures. Tests import the ``triage`` package from the repo root."""
import os
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
