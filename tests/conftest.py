"""Shared fixtures. Tests import the ``triage`` package from the repo root."""
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DVC / DVCLive isolation for every test process (see tests/test_pipeline.py for repos).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DVCLIVE_TEST", "true")
# Tests (and the stages and CLIs they start) never append to the user's real audit trail
# (triage/audit_trail.py); a test that needs one sets its own.
os.environ["TRIAGE_AUDIT_LOG"] = str(Path(tempfile.mkdtemp(prefix="triage-audit-")) / "audit.jsonl")

SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (2 CPUs) for every test module that needs it: a second ``ray.init`` in
    the same process would fail, so the modules share this one (tests/test_ray_*.py)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not present at {SHARED_DATASETS}")
    return SHARED_DATASETS


# The end-to-end modules run whole pipelines (tens of seconds per test): started first, so
# under pytest-xdist the short unit tests fill the other worker instead of trailing them.
SLOW_FIRST = ("test_reproducibility.py", "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)  # stable: order kept within


@dataclass(frozen=True)
class Reproduced:
    """A TINY demo pipeline after one `dvc repro` in a plain environment (no kernel knobs)."""

    repo: Path
    env: dict
    stdout: str   # of that first run
    lock: str     # its dvc.lock, read before anyone could touch the repo
    hashes: dict  # md5 of every stage output file (helpers.output_hashes)


@pytest.fixture(scope="session")
def tiny_pipeline(request, tmp_path_factory) -> Reproduced:
    """The one full `dvc repro` the end-to-end tests share. Never change ``repo``: take a
    copy with ``helpers.clone_repo`` (tests/test_pipeline.py, tests/test_reproducibility.py).

    Under pytest-xdist every worker is its own session: the first to get here builds it in
    the base temp folder all workers share, the others wait on a file lock and reuse it."""
    import fcntl
    import json
    import shutil

    from helpers import make_repo, output_hashes, plain_env, run

    shared = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker
        shared = shared.parent  # the workers' common base temp (this run's, never reused)
    tmp = shared / "tiny_pipeline"
    done, failed = shared / "tiny_pipeline.json", shared / "tiny_pipeline.failed"
    with open(shared / "tiny_pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.is_file():  # built and failed in another worker: fail the same, fast
            pytest.fail(f"the shared TINY pipeline failed to build:\n{failed.read_text()}")
        if not done.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            env = plain_env(tmp)
            try:
                repo = make_repo(tmp, env)  # the project's sources, TINY params, a fresh git repo
                first = run(["dvc", "repro"], repo, env)
            except Exception as exc:
                failed.write_text(str(exc)[-20000:])
                raise
            done.write_text(json.dumps({"stdout": first.stdout,
                                        "lock": (repo / "dvc.lock").read_text(),
                                        "hashes": output_hashes(repo)}))
    record = json.loads(done.read_text())
    return Reproduced(tmp / "repo", plain_env(tmp), record["stdout"], record["lock"],
                      record["hashes"])
