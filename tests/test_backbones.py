"""embed.backbone beyond ResNet18: torchvision classification models by name and timm models
as ``timm:<name>``; head removal, feature dimension read from the model, weights (files,
hub caches, offline errors), preprocessing from the model's own config, the fingerprint
and the store's width. Small images and random weights keep it to seconds on a CPU."""
import hashlib
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from triage.backbone import build_backbone, parse_backbone
from triage.embed import Embedder, start_onednn
from triage.errors import ParamsError, PipelineError, WeightsError
from triage.inference import FingerprintMismatch, Predictor, embedder_kwargs
from triage.store import read_embeddings, write_embeddings

# The legacy record (backbone, weights..., preprocess, ..., torchvision): what the default
# embedding's fingerprint holds, and has held since before backbones were configurable.
DEFAULT_KEYS = {"backbone", "weights", "weights_seed", "weights_sha256", "preprocess",
                "image_size", "precision", "kernels", "fused_batchnorm", "torch",
                "torchvision", "fingerprint"}
SPELLED_KEYS = {"source", "feature_dim", "input_size", "interpolation", "crop_pct", "mean",
                "std"}

# (backbone, image_size, feature dim its architecture has, interpolation, mean)
FAMILIES = [
    ("resnet50", 32, 2048, "bilinear", (0.485, 0.456, 0.406)),
    ("densenet121", 32, 1024, "bilinear", (0.485, 0.456, 0.406)),
    ("efficientnet_b0", 32, 1280, "bicubic", (0.485, 0.456, 0.406)),
    ("convnext_tiny", 32, 768, "bilinear", (0.485, 0.456, 0.406)),
    ("vit_b_16", 224, 768, "bilinear", (0.485, 0.456, 0.406)),
    ("timm:test_vit", 160, 64, "bicubic", (0.5, 0.5, 0.5)),
    ("timm:resnet10t", 32, 512, "bicubic", (0.485, 0.456, 0.406)),
]


@pytest.fixture(scope="module", autouse=True)
def canonical_kernels():
    start_onednn(True)  # what an Embedder's fit does first; before any convolution here


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = folder / f"im{i}.png"
        Image.fromarray((rng.random((40, 52)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


def embedder(backbone, size, weights="random", **kw):
    return Embedder(weights, backbone=backbone, image_size=size, batch_size=4, **kw).fit()


@pytest.mark.parametrize("backbone,size,dim,interpolation,mean", FAMILIES,
                         ids=[f[0] for f in FAMILIES])
def test_feature_dimension_and_preprocessing_come_from_the_model(images, backbone, size, dim,
                                                                 interpolation, mean):
    emb = embedder(backbone, size)
    vectors = emb.transform(images)
    assert emb.feature_dim_ == dim and vectors.shape == (3, dim)
    assert vectors.dtype == np.float32 and np.isfinite(vectors).all()
    fp = emb.fingerprint_
    assert SPELLED_KEYS <= set(fp) and fp["feature_dim"] == dim
    assert fp["source"] == ("timm" if backbone.startswith("timm:") else "torchvision")
    assert fp["interpolation"] == interpolation == emb.preprocess_.interpolation
    assert fp["mean"] == list(mean) and fp["crop_pct"] is None
    assert ("timm" in fp) == backbone.startswith("timm:")


def test_default_backbone_keeps_its_record_and_others_differ(images):
    default = embedder("resnet18", 32).fingerprint_
    assert set(default) == DEFAULT_KEYS
    assert default["preprocess"] == ("grey(L, alpha on black, 16-bit rescaled) -> resize 32x32 "
                                     "bilinear -> 3ch -> imagenet mean/std")
    variants = [embedder("resnet34", 32), embedder("resnet18", 48),
                embedder("resnet18", 32, crop="model"), embedder("timm:resnet10t", 32)]
    hashes = {default["fingerprint"], *(e.fingerprint_["fingerprint"] for e in variants)}
    assert len(hashes) == 5  # backbone, size, crop, library: each its own embedding
    cropped = variants[2].fingerprint_
    assert cropped["crop_pct"] == 0.875 and "resize 36x36 bilinear -> center crop 32x32" in \
        cropped["preprocess"]


def test_model_crop_and_mean_std_are_applied(images):
    """crop: model = resize to size / crop_pct, centre crop; the model's mean/std (timm
    test_resnet: 0.5 / 0.5, not ImageNet's); vectors equal a hand-made pipeline's."""
    emb = embedder("timm:test_resnet", 32, crop="model")
    assert emb.preprocess_.mean == (0.5, 0.5, 0.5) and emb.preprocess_.crop_pct == 0.95
    got = emb.transform(images)
    x = []
    for p in images:
        grey = Image.open(p).convert("L").resize((33, 33), Image.Resampling.BILINEAR)
        grey = grey.crop((0, 0, 32, 32))  # round((33 - 32) / 2) = 0
        t = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None].expand(3, -1, -1)
        x.append((t - 0.5) / 0.5)
    with torch.inference_mode():
        want = emb.model_(torch.stack(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone,suffix", [("resnet50", ".pth"), ("timm:test_vit", ".safetensors"),
                                             ("timm:test_resnet", ".pth")])
def test_weights_file_gives_the_in_memory_models_vectors(tmp_path, images, backbone, suffix):
    size = 160 if "vit" in backbone else 32
    src, _ = build_backbone("random", seed=123, backbone=backbone)
    state = src.state_dict()
    if backbone == "timm:test_resnet":  # a full checkpoint, classifier included
        import timm

        torch.manual_seed(5)
        full = timm.create_model("test_resnet")
        state = full.state_dict()
        assert "fc.weight" in state
        src = full
        src.reset_classifier(0)
        src.eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    loaded = embedder(backbone, size, weights=str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.fingerprint_["weights_sha256"] == digest
    reference = embedder(backbone, size)  # seed 0: other weights ...
    other = reference.transform(images)
    reference.model_ = src.to(memory_format=torch.channels_last)  # ... then the file's model
    want = reference.transform(images)
    got = loaded.transform(images)
    assert not np.allclose(got, other)
    # resnet50 is BatchNorm-folded when loaded (exact up to rounding); timm models are not
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(WeightsError, match="sha256"):
        embedder(backbone, size, weights=str(path), weights_sha256="0" * 64)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    src, _ = build_backbone("random", backbone="timm:test_vit")
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(WeightsError, match="not a timm:test_resnet state dict"):
        build_backbone(str(tmp_path / "vit.pth"), backbone="timm:test_resnet")
    with pytest.raises(WeightsError, match="not a densenet121 state dict"):
        build_backbone(str(tmp_path / "vit.pth"), backbone="densenet121")


def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a closed port: downloads fail
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


@pytest.mark.parametrize("backbone,file,where,local", [
    ("resnet50", "resnet50-11ad3fa6.pth", "torch/hub/checkpoints/resnet50-11ad3fa6.pth",
     "data/weights/resnet50-11ad3fa6.pth"),
    ("timm:test_vit", "model.safetensors", "hf/hub/models--timm--test_vit.r160_in1k",
     "data/weights/test_vit.r160_in1k.safetensors"),
])
def test_offline_error_names_the_exact_file_and_where(monkeypatch, tmp_path, backbone, file,
                                                      where, local):
    offline(monkeypatch, tmp_path)
    with pytest.raises(WeightsError) as err:
        build_backbone("pretrained", backbone=backbone)
    msg = str(err.value)
    assert "\n" not in msg  # one line
    assert file in msg and str(tmp_path / where) in msg and local in msg
    assert "dvc add" in msg and "embed.weights" in msg


def test_timm_pretrained_weights_load_from_the_hf_cache_offline(monkeypatch, tmp_path, images):
    offline(monkeypatch, tmp_path)
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(9)
    src = timm.create_model("test_vit")
    repo = tmp_path / "hf" / "hub" / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file(src.state_dict(), str(snap / "model.safetensors"))
    model, info = build_backbone("pretrained", backbone="timm:test_vit")
    assert info["weights"] == "pretrained:timm/test_vit.r160_in1k"
    assert info["weights_sha256"] == hashlib.sha256(
        (snap / "model.safetensors").read_bytes()).hexdigest()
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"],
                       src.state_dict()["blocks.0.attn.qkv.weight"])


def test_torchvision_default_weights_come_from_the_hub_cache(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    cached.parent.mkdir(parents=True)
    src, _ = build_backbone("random", seed=4, backbone="mobilenet_v3_small")
    torch.save(src.state_dict(), cached)
    model, info = build_backbone("imagenet", backbone="mobilenet_v3_small")
    assert info["weights"] == "imagenet:IMAGENET1K_V1"
    assert torch.equal(model.features[0][0].weight, src.features[0][0].weight)


@pytest.mark.parametrize("name,hint", [
    ("resnet5", "list_models(module=torchvision.models)"),
    ("fasterrcnn_resnet50_fpn", "not a torchvision classification model"),
    ("timm:no_such_net", "timm.list_models("),
])
def test_unknown_backbone_says_how_to_list_valid_names(name, hint):
    with pytest.raises(ParamsError) as err:
        parse_backbone(name)
    assert hint in str(err.value) and "embed.backbone" in str(err.value)
    if name == "resnet5":
        assert "resnet50" in str(err.value)  # the close names


@pytest.mark.parametrize("backbone,size,message", [
    ("vit_b_16", 64, "set embed.image_size: 224"),
    ("timm:vit_tiny_patch16_224", 64, "embed.image_size: 224"),  # fixed (timm:test_vit is not)
    ("squeezenet1_0", 64, "no linear classifier"),
])
def test_sizes_and_heads_a_model_cannot_take_are_params_errors(backbone, size, message):
    with pytest.raises(ParamsError, match=message):
        embedder(backbone, size)


def test_store_width_is_the_backbones(tmp_path, images):
    emb = embedder("timm:test_vit", 160)
    rows = pd.DataFrame({"id": ["a", "b", "c"], "path": images, "split": "unlabeled",
                         "label": None})
    out = tmp_path / "e.parquet"
    write_embeddings(rows, out, fingerprint=emb.fingerprint_, compute=emb.iter_batches)
    _, X, fp = read_embeddings(out)
    assert X.shape == (3, 64) and fp == emb.fingerprint_
    np.testing.assert_array_equal(X, emb.transform(images))

    def wrong(paths):
        yield np.zeros((len(paths), 512), np.float32)

    with pytest.raises(PipelineError, match="64-d"):
        write_embeddings(rows, tmp_path / "x.parquet", fingerprint=emb.fingerprint_,
                         compute=wrong)


def test_inference_rebuilds_the_backbone_and_checks_the_width():
    stored = {"backbone": "timm:test_vit", "source": "timm", "weights": "pretrained:timm/x",
              "weights_sha256": "ab", "image_size": 160, "crop_pct": 0.95, "feature_dim": 64,
              "precision": "fp32", "kernels": "cpu-onednn-fma"}
    params = {"weights": "random", "seed": 0, "backbone": "resnet18", "image_size": 128,
              "crop": "none", "precision": "fp32", "weights_sha256": None}
    kw = embedder_kwargs(params, stored)
    assert (kw["backbone"], kw["weights"], kw["crop"], kw["image_size"]) == \
        ("timm:test_vit", "pretrained", "model", 160)
    assert kw["weights_sha256"] is None  # the hub's file, not a pinned local one
    bundle = {"model": SimpleNamespace(n_features_in_=512), "threshold": 0.5,
              "positive_class": "cancer", "classes": ["cancer", "normal"]}
    with pytest.raises(FingerprintMismatch, match="512-d vectors.*64-d"):
        Predictor(bundle, SimpleNamespace(feature_dim_=64, backbone="timm:test_vit"), qc={},
                  review_margin=0.1)


def test_timm_and_torch_are_imported_only_where_needed(repo_root):
    code = ("import sys\n"
            "import triage.store, triage.params\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
            "from triage.embed import Embedder\n"
            "Embedder('random', image_size=32).fit()\n"
            "print(json.dumps(sorted(m for m in ('timm', 'torch') if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=repo_root,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["torch"]
