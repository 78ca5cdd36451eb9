"""Tools for this project's tests and benchmarks (as numpy.testing is numpy's): a temp git
repository holding the project's sources with small demo params, the environment and runner
the real `dvc repro` is called with, and a separable synthetic image. No stage imports it.

``tests/helpers.py`` and ``tests/imagefactory.py`` re-export these, bound to the checkout
under test; benchmarks import them from here (the installed package), not from tests/.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

# params of the small end-to-end pipeline (seconds per stage on 2 cores)
TINY = {
    "data.demo.n_labeled": 24, "data.demo.n_unlabeled": 80, "data.demo.n_test": 30,
    "data.demo.image_size": 64, "embed.image_size": 64, "embed.batch_size": 32,
    "cluster.k": 4, "cluster.pca_components": 8, "pseudo.min_support": 2,
    "evaluate.n_bootstrap": 200, "train.cv_folds": 3,
    "crossval.folds": 3, "crossval.repeats": 1,
}


def e2e_env(tmp: Path) -> dict:
    """The environment a real `dvc repro` runs in: no analytics, a private site cache, a git
    identity, no progress bars, DVCLive logging for real, this interpreter first on PATH."""
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", TQDM_DISABLE="1")
    env.pop("DVCLIVE_TEST", None)  # the stages must log for real
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def set_params(repo: Path, updates: dict) -> None:
    """Set dotted keys (``{"embed.image_size": 64}``) in ``repo``'s params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(tmp: Path, env: dict, source: Path) -> Path:
    """Copy the source files of the checkout ``source`` (what a clone has, minus results and
    tests) into a new git repo at ``tmp/repo`` with :data:`TINY` params, committed."""
    repo = tmp / "repo"
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], source, env).stdout.split("\n")
    for rel in filter(None, listed):
        if rel == "dvc.lock" or rel.startswith(("metrics/", "data/demo/", "tests/")):
            continue
        src = source / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    set_params(repo, TINY)
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "base"], repo, env)  # DVCLive needs a commit
    return repo


def blob_image(path, cancer: bool, seed: int, size: int = 48) -> Path:
    """Texture, plus a bright disc for 'cancer': separable even by random features."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.normal(90, 20, (size, size))
    if cancer:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        a[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] += 110
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)
    return path
