"""embed.engine: ray gives the local engine's vectors, order, fingerprint and store bytes."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from imagefactory import write_png

from triage.errors import ParamsError
from triage.params import load_params, validate
from triage.store import load_reusable, read_embeddings, read_fingerprint, write_embeddings

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
N, SIZE, BATCH = 300, 32, 16  # 300 = 18 full batches of 16 + a short one of 12


@pytest.fixture(scope="module")
def embedder():
    from triage.embed import Embedder

    return Embedder("random", seed=0, image_size=SIZE, batch_size=BATCH, num_workers=0,
                    device="cpu").fit()


def _rows(folder: Path, n: int, start: int = 0) -> pd.DataFrame:
    records = []
    for i in range(start, start + n):
        side = 36 + (i * 7) % 40  # other sizes: the resize is part of the work
        path = write_png(folder / f"img{i:04d}.png", size=(side, side + i % 5), seed=i)
        records.append({"id": f"img{i:04d}", "path": str(path),
                        "split": ("train", "pool", "test")[i % 3],
                        "label": None if i % 3 == 1 else ("normal", "abnormal")[i % 2]})
    return pd.DataFrame(records)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return _rows(tmp_path_factory.mktemp("images"), N)


def _counting(compute, seen: list):
    def wrapped(paths):
        seen.extend(paths)
        return compute(paths)
    return wrapped


def test_ray_vectors_and_store_bytes_equal_the_local_engine(ray_cluster, embedder, rows,
                                                            tmp_path):
    from triage.ray_engine import compute_fn

    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    fp = embedder.fingerprint_
    assert write_embeddings(rows, local, fingerprint=fp, compute=embedder.iter_batches,
                            rows_per_group=128) == (N, 0)
    assert write_embeddings(rows, remote, fingerprint=fp, compute=compute_fn(embedder, actors=2),
                            rows_per_group=128) == (N, 0)
    r_local, x_local, f_local = read_embeddings(local)
    r_ray, x_ray, f_ray = read_embeddings(remote)
    assert list(r_ray["id"]) == list(rows["id"]) == list(r_local["id"])  # same order
    assert x_ray.tobytes() == x_local.tobytes()  # the same bits, vector for vector
    assert f_ray == f_local == fp and read_fingerprint(remote) == fp
    assert "engine" not in fp
    assert remote.read_bytes() == local.read_bytes()  # the same file, metadata included


def test_ray_batches_are_the_local_engines_batches(ray_cluster, embedder, rows):
    """Straight from the compute callable: every image once, in input order."""
    from triage.ray_engine import compute_fn

    paths = rows["path"].tolist()[:BATCH * 3 + 5]
    got = np.concatenate(list(compute_fn(embedder, actors=1)(paths)))
    assert got.tobytes() == embedder.transform(paths).tobytes()
    assert list(compute_fn(embedder, actors=1)([])) == []


def test_ray_reuse_computes_only_the_new_images(ray_cluster, embedder, rows, tmp_path):
    from triage.ray_engine import compute_fn

    store, fresh = tmp_path / "emb.parquet", tmp_path / "fresh.parquet"
    fp = embedder.fingerprint_
    write_embeddings(rows, store, fingerprint=fp, compute=compute_fn(embedder))
    new = _rows(tmp_path / "new", 10, start=N)
    # the new images among the old ones, not only at the end
    grown = pd.concat([rows.iloc[:100], new.iloc[:5], rows.iloc[100:], new.iloc[5:]],
                      ignore_index=True)
    seen: list = []
    n_new, n_reused = write_embeddings(
        grown, store, fingerprint=fp, compute=_counting(compute_fn(embedder), seen),
        reuse=load_reusable(store, fp["fingerprint"]))
    assert (n_new, n_reused) == (10, N)
    assert seen == new["path"].tolist()
    write_embeddings(grown, fresh, fingerprint=fp, compute=embedder.iter_batches)
    assert store.read_bytes() == fresh.read_bytes()  # incremental = a full local run


def test_init_choice_follows_ray_address():
    from triage.ray_engine import LOCAL_INIT, init_kwargs

    assert init_kwargs({"RAY_ADDRESS": "ray://head:10001"}, cores=8) == {
        "address": "ray://head:10001"}
    assert init_kwargs({"RAY_ADDRESS": "auto"}) == {"address": "auto"}
    local = init_kwargs({}, cores=3)
    assert local == {"num_cpus": 3, **LOCAL_INIT}
    assert local["include_dashboard"] is False and local["log_to_driver"] is False
    assert init_kwargs({"RAY_ADDRESS": "  "}, cores=2)["num_cpus"] == 2  # blank = unset


def test_session_starts_and_stops_a_local_ray_only_when_none_runs(monkeypatch):
    from triage import ray_engine

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown",)))
    with ray_engine.session({}, cores=2):
        assert calls == [("init", {"num_cpus": 2, **ray_engine.LOCAL_INIT})]
    assert calls[-1] == ("shutdown",)
    calls.clear()
    with ray_engine.session({"RAY_ADDRESS": "10.0.0.1:6379"}):
        pass
    assert calls == [("init", {"address": "10.0.0.1:6379"}), ("shutdown",)]
    calls.clear()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # someone else's Ray: left alone
    with ray_engine.session({}):
        pass
    assert calls == []


def test_engine_param_is_validated():
    params = load_params(ROOT / "params.yaml")
    assert params["embed"]["engine"] == "local"  # the committed pipeline's default
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for good in ("local", "ray"):
        tree = copy.deepcopy(raw)
        tree["embed"]["engine"] = good
        assert validate(tree)["embed"]["engine"] == good
    for bad in ("spark", 1, None):
        tree = copy.deepcopy(raw)
        tree["embed"]["engine"] = bad
        with pytest.raises(ParamsError, match="embed.engine"):
            validate(tree)


def test_local_engine_never_imports_ray():
    code = ("import sys, stages.embed, triage.ray_engine; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
