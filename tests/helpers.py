"""Helpers shared by test modules (test modules never import each other).

- e2e: a temp git repo holding this project's sources with TINY demo params, and the
  environment and runner the real `dvc repro` is called with;
- inference: a real tiny model bundle (random-init ResNet18 + logistic regression) and the
  params file pointing at it;
- qc: the qc.* params the QC unit tests use.

The reproduced TINY pipeline itself is a session fixture (conftest.py: ``tiny_pipeline``):
one `dvc repro` shared by the end-to-end tests, which work on copies of it.
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from imagefactory import blob_image

from triage.embed import Embedder
from triage.models import make_classifier, save_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # inference fixtures embed at this side


TINY = {
    "data.demo.n_labeled": 24, "data.demo.n_unlabeled": 80, "data.demo.n_test": 30,
    "data.demo.image_size": 64, "embed.image_size": 64, "embed.batch_size": 32,
    "cluster.k": 4, "cluster.pca_components": 8, "pseudo.min_support": 2,
    "evaluate.n_bootstrap": 200, "train.cv_folds": 3,
    "crossval.folds": 3, "crossval.repeats": 1,
}


def e2e_env(tmp: Path) -> dict:
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
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(tmp: Path, env: dict) -> Path:
    """Copy the project's source files (what a clone has, minus results) into a new git repo."""
    repo = tmp / "repo"
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], ROOT, env).stdout.split("\n")
    for rel in filter(None, listed):
        if rel == "dvc.lock" or rel.startswith(("metrics/", "data/demo/", "tests/")):
            continue
        src = ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    set_params(repo, TINY)
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "base"], repo, env)  # DVCLive needs a commit
    return repo


def write_params(path: Path, model: Path, **overrides) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["embed"].update(weights="random", seed=0, image_size=SIZE, batch_size=8,
                           num_workers=0, device="cpu", precision="fp32", weights_sha256=None)
    params["inference"]["model"] = str(model)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def train_tiny_model(root: Path, n: int = 16) -> dict:
    """Real images → real embedder → logreg → skops bundle. Returns paths and objects."""
    root = Path(root)
    paths, y = [], []
    for i in range(n):
        cancer = i % 2 == 0
        paths.append(blob_image(root / "train" / f"{i:03d}.png", cancer, seed=i))
        y.append("cancer" if cancer else "normal")
    # the repository's embed.layers, as write_params leaves it: the served embedder is the
    # one the model was trained with
    layers = yaml.safe_load((ROOT / "params.yaml").read_text())["embed"]["layers"]
    emb = Embedder("random", seed=0, image_size=SIZE, batch_size=8, num_workers=0,
                   device="cpu", layers=layers).fit()
    X = emb.transform([str(p) for p in paths])
    model = make_classifier("logreg", 1.0).fit(X, np.array(y))
    bundle = {"model": model, "name": "semi_supervised", "positive_class": "cancer",
              "classes": [str(c) for c in model.classes_], "threshold": 0.5,
              "target_sensitivity": 0.95,
              "embedding_fingerprint": emb.fingerprint_["fingerprint"]}
    model_path = root / "data/models/semi_supervised.skops"
    save_model(bundle, model_path)
    params = write_params(root / "params.yaml", model_path)
    return {"root": root, "model": model_path, "params": params, "embedder": emb,
            "bundle": bundle, "X": X, "y": np.array(y)}


# params.yaml's qc section (the one declaration of the defaults), one decode process
QC = {**yaml.safe_load((ROOT / "params.yaml").read_text())["qc"], "workers": 1}


KNOB_VARS = ("OPENBLAS_CORETYPE", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
             "ATEN_CPU_CAPABILITY", "TRIAGE_ONEDNN_ISA",
             "NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES", "OMP_NUM_THREADS",
             "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


OUTPUT_DIRS = ("data", "metrics", "reports")


EXCLUDED = ("metrics/runtime/",)


def plain_env(tmp: Path) -> dict:
    env = e2e_env(tmp)
    for var in KNOB_VARS:
        env.pop(var, None)
    return env


def output_hashes(repo: Path) -> dict[str, str]:
    """md5 of every file under the output folders (the stage outputs), by repo-relative path."""
    out = {}
    for top in OUTPUT_DIRS:
        for path in sorted((repo / top).rglob("*")):
            rel = path.relative_to(repo).as_posix()
            if path.is_file() and not rel.startswith(EXCLUDED):
                out[rel] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


def clone_repo(src: Path, dest: Path) -> Path:
    """A copy of a reproduced repo (git, DVC cache, outputs), to change without touching
    ``src``; DVC re-hashes the copied files on first use (their inodes differ)."""
    shutil.copytree(src, dest, symlinks=True)
    return dest
