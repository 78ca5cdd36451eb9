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
import shutil
from pathlib import Path

import numpy as np
import yaml
from imagefactory import blob_image

from triage.embed import Embedder
from triage.models import make_classifier, save_model
from triage.testing import TINY, e2e_env, run, set_params  # noqa: F401 - re-exported
from triage.testing import make_repo as _make_repo

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # inference fixtures embed at this side


def make_repo(tmp: Path, env: dict) -> Path:
    """This checkout's sources in a new git repo with TINY params (triage.testing.make_repo)."""
    return _make_repo(tmp, env, ROOT)


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
