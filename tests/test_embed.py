"""Embedding stage: weights handling, preprocessing, determinism, feature store format."""
import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18, resnet34

from triage.backbone import build_backbone, imagenet_weights_file, load_checkpoint
from triage.embed import Embedder
from triage.errors import WeightsError
from triage.store import EMBED_DIM, load_reusable, read_embeddings, write_embeddings


def store_with(embedder, rows, path, **kwargs):
    """Write the store of ``rows`` with ``embedder``'s vectors, as the embed stage does."""
    return write_embeddings(rows, path, fingerprint=embedder.fingerprint_,
                            compute=embedder.iter_batches, **kwargs)


def _write_images(folder, n=6, size=40, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = (rng.random((size, size + 8)) * 255).astype(np.uint8)
        p = folder / f"im{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def images(tmp_path):
    return _write_images(tmp_path)


def test_random_weights_are_seeded():
    a, _ = build_backbone("random", seed=3)
    b, _ = build_backbone("random", seed=3)
    c, _ = build_backbone("random", seed=4)
    wa, wb, wc = (m.conv1.weight.detach() for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_embeddings_shape_and_determinism(images):
    e1 = Embedder("random", seed=1, image_size=64, batch_size=4).fit()
    v1 = e1.transform(images)
    v2 = Embedder("random", seed=1, image_size=64, batch_size=3).fit().transform(images)
    assert v1.shape == (len(images), EMBED_DIM) and v1.dtype == np.float32
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)  # batch size does not matter
    assert np.isfinite(v1).all()
    assert not np.allclose(v1[0], v1[1])  # different images, different vectors


def test_dataloader_workers_give_same_vectors(images):
    a = Embedder("random", seed=1, image_size=64, batch_size=4, num_workers=0).fit().transform(images)
    b = Embedder("random", seed=1, image_size=64, batch_size=4, num_workers=2).fit().transform(images)
    np.testing.assert_array_equal(a, b)


def test_greyscale_rgb_and_rgba_inputs_are_equivalent(tmp_path):
    rng = np.random.default_rng(0)
    grey = (rng.random((48, 48)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    rgba = np.dstack([grey] * 3 + [np.full_like(grey, 255)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    v = Embedder("random", seed=0, image_size=48).fit().transform(
        [str(tmp_path / n) for n in ("g.png", "rgb.png", "rgba.png")])
    np.testing.assert_allclose(v[0], v[1], atol=1e-5)
    np.testing.assert_allclose(v[0], v[2], atol=1e-5)


def test_checkpoint_path_loads_and_changes_vectors(tmp_path, images):
    torch.manual_seed(123)
    src = resnet18(weights=None)
    ckpt = tmp_path / "w.pth"
    torch.save(src.state_dict(), ckpt)
    model, info = build_backbone(str(ckpt), seed=0)
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert info["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # Vectors are those of the checkpoint's network without its fc layer.
    src.fc = torch.nn.Identity()
    src.eval()
    emb = Embedder(str(ckpt), image_size=40).fit()
    assert emb.fingerprint_["weights_sha256"] == info["weights_sha256"]
    x = emb.transform(images[:2])
    rnd = Embedder("random", seed=0, image_size=40).fit().transform(images[:2])
    assert not np.allclose(x, rnd)


def test_checkpoint_wrapped_in_state_dict_key_and_module_prefix(tmp_path):
    src = resnet18(weights=None)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    model, _ = build_backbone(str(tmp_path / "w.pth"))
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_checkpoint_hash_mismatch(tmp_path):
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="sha256"):
        load_checkpoint(tmp_path / "w.pth", expected_sha256="0" * 64)
    good = hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    state, digest = load_checkpoint(tmp_path / "w.pth", expected_sha256=good.upper())
    assert digest == good and "conv1.weight" in state


def test_truncated_checkpoint(tmp_path):
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or unsafe"):
        build_backbone(str(tmp_path / "cut.pth"))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights-only"):
        build_backbone(str(tmp_path / "evil.pth"))


def test_other_architecture_is_refused(tmp_path):
    torch.save(resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="resnet18"):
        build_backbone(str(tmp_path / "r34.pth"))
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a resnet18"):
        build_backbone(str(tmp_path / "other.pth"))


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_backbone(str(tmp_path / "nope.pth"))


def test_imagenet_offline_error_names_file_and_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Force "offline" whatever the machine: the download goes to a closed local port.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    _, cached = imagenet_weights_file()
    assert cached.name == "resnet18-f37072fd.pth"
    assert str(cached).startswith(str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        build_backbone("imagenet")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(cached) in msg  # what and where
    assert "dvc add" in msg and "embed.weights" in msg  # the alternative fix
    assert not cached.exists()


def test_imagenet_uses_torch_hub_cache(tmp_path, monkeypatch):
    """The real torchvision mechanism picks up a file placed in the hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _, cached = imagenet_weights_file()
    cached.parent.mkdir(parents=True)
    torch.manual_seed(7)
    src = resnet18(weights=None)
    torch.save(src.state_dict(), cached)
    model, info = build_backbone("imagenet")
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert info["weights"] == "imagenet:IMAGENET1K_V1"
    assert info["weights_sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_feature_store_parquet_roundtrip(tmp_path, images):
    emb = Embedder("random", seed=0, image_size=40, batch_size=4).fit()
    rows = pd.DataFrame({"id": [f"id{i}" for i in range(len(images))], "path": images,
                         "split": ["labeled", "unlabeled", "test"] * 2,
                         "label": ["cancer", None, "normal"] * 2})
    out = tmp_path / "emb" / "embeddings.parquet"
    n_new, n_reused = store_with(emb, rows, out, rows_per_group=4)
    assert (n_new, n_reused) == (len(images), 0)
    meta = pq.ParquetFile(out)
    assert meta.metadata.num_row_groups == 2  # written as it goes, not all at once
    got_rows, X, fingerprint = read_embeddings(out)
    assert list(got_rows.columns) == ["id", "split", "label"]
    assert got_rows["label"].isna().tolist() == [False, True, False] * 2
    np.testing.assert_allclose(X, emb.transform(images), atol=1e-6)
    schema = pq.read_schema(out)
    assert str(schema.field("vector").type) == "fixed_size_list<element: float>[512]"
    assert fingerprint == json.loads(schema.metadata[b"embedding_fingerprint"])
    for key in ("backbone", "weights", "preprocess", "image_size", "precision", "torch",
                "torchvision", "fingerprint"):
        assert key in fingerprint
    # The fingerprint changes with anything that changes the vectors.
    other = Embedder("random", seed=0, image_size=48).fit().fingerprint_
    assert other["fingerprint"] != fingerprint["fingerprint"]
    # Identical inputs → identical bytes (DVC hashes must be stable).
    out2 = tmp_path / "again.parquet"
    again = Embedder("random", seed=0, image_size=40, batch_size=4).fit()
    write_embeddings(rows, out2, fingerprint=again.fingerprint_, compute=again.iter_batches,
                     rows_per_group=4)
    assert out.read_bytes() == out2.read_bytes()


def test_bf16_close_to_fp32(images):
    a = Embedder("random", seed=0, image_size=64, precision="fp32").fit().transform(images)
    b = Embedder("random", seed=0, image_size=64, precision="bf16").fit().transform(images)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.mean() > 0.99


def _rows(paths):
    import hashlib as h
    return pd.DataFrame({"id": [h.sha256(open(p, "rb").read()).hexdigest() for p in paths],
                         "path": paths, "split": "unlabeled", "label": None})


def test_incremental_reuses_vectors_and_matches_fresh_bytes(tmp_path):
    paths = _write_images(tmp_path, n=11, seed=5)
    emb = Embedder("random", seed=0, image_size=40, batch_size=4).fit()
    fingerprint = emb.fingerprint_["fingerprint"]
    store = tmp_path / "store.parquet"
    # First run on 7 images, then 4 more arrive (inserted in the middle of the order).
    first = _rows(paths[:3] + paths[7:])
    assert store_with(emb, first, store, rows_per_group=5) == (7, 0)
    reuse = load_reusable(store, fingerprint)
    assert set(reuse) == set(first["id"])
    everything = _rows(paths)
    assert store_with(emb, everything, store, reuse=reuse, rows_per_group=5) == (4, 7)
    fresh = tmp_path / "fresh.parquet"
    store_with(emb, everything, fresh, rows_per_group=5)
    assert store.read_bytes() == fresh.read_bytes()


def test_fingerprint_change_or_corrupt_store_recomputes(tmp_path):
    paths = _write_images(tmp_path, n=3)
    store = tmp_path / "store.parquet"
    emb = Embedder("random", seed=0, image_size=40).fit()
    store_with(emb, _rows(paths), store)
    other = Embedder("random", seed=1, image_size=40).fit()  # other weights → other fingerprint
    assert load_reusable(store, other.fingerprint_["fingerprint"]) == {}
    assert len(load_reusable(store, emb.fingerprint_["fingerprint"])) == 3
    store.write_bytes(store.read_bytes()[:100])  # truncated
    assert load_reusable(store, emb.fingerprint_["fingerprint"]) == {}
    assert load_reusable(tmp_path / "absent.parquet", "x") == {}


KILL_SCRIPT = """
import time
import pandas as pd
from triage.embed import Embedder
from triage.store import write_embeddings
rows = pd.read_parquet({rows!r})
emb = Embedder("random", seed=0, image_size=64, batch_size=2).fit()
orig = emb.iter_batches
def slow(paths):
    for i, b in enumerate(orig(paths)):
        if i == 3:
            print("WRITING", flush=True)
            time.sleep(60)
        yield b
emb.iter_batches = slow
write_embeddings(rows, {out!r}, fingerprint=emb.fingerprint_, compute=emb.iter_batches,
                 rows_per_group=2)
"""


def test_kill_mid_write_never_leaves_a_partial_file(tmp_path, repo_root):
    import os
    import signal
    import subprocess
    import sys

    paths = _write_images(tmp_path, n=12, size=64)
    rows = _rows(paths)
    rows.to_parquet(tmp_path / "rows.parquet")
    out = tmp_path / "feat" / "embeddings.parquet"
    # A previous good result exists (e.g. from the last run) for the first 5 images.
    emb = Embedder("random", seed=0, image_size=64, batch_size=2).fit()
    store_with(emb, rows.iloc[:5], out)
    before = out.read_bytes()
    script = KILL_SCRIPT.format(root=str(repo_root), rows=str(tmp_path / "rows.parquet"),
                                out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    assert list(out.parent.glob(".embeddings.parquet.*.tmp"))  # mid-write, in a temp file
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == before  # the previous file is untouched, never half-written
    # Rerun: correct output, stale temp file cleaned up.
    reuse = load_reusable(out, emb.fingerprint_["fingerprint"])
    assert store_with(emb, rows, out, reuse=reuse) == (7, 5)
    got_rows, X, _ = read_embeddings(out)
    assert got_rows["id"].tolist() == rows["id"].tolist()
    np.testing.assert_array_equal(X, emb.transform(paths))
    assert not list(out.parent.glob(".embeddings.parquet.*.tmp"))


def test_fast_path_matches_plain_torchvision_forward(images):
    """Fused BN + channels-last + our preprocessing = the textbook model on the same input."""
    emb = Embedder("random", seed=11, image_size=40, batch_size=4).fit()
    got = emb.transform(images)
    torch.manual_seed(11)
    ref = resnet18(weights=None)
    ref.fc = torch.nn.Identity()
    ref.eval()
    x = []
    for p in images:
        grey = np.asarray(Image.open(p).convert("L").resize((40, 40), Image.Resampling.BILINEAR),
                          dtype=np.float32) / 255.0
        t = torch.from_numpy(grey)[None].expand(3, -1, -1)
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        x.append((t - mean) / std)
    with torch.no_grad():
        want = ref(torch.stack(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
