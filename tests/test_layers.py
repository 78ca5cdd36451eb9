"""embed.layers: which modules of the backbone give the embedding (final features, or tapped
stages average- and max-pooled), how `auto` resolves, the fingerprint, inference rebuilding
the same embedder, and the params rule. Small images and random weights: seconds on a CPU."""
import numpy as np
import pytest
import torch
from imagefactory import write_png

from triage.backbone import AUTO_RANDOM_LAYERS, build_backbone, fuse_batchnorm
from triage.embed import Embedder, start_onednn
from triage.errors import ParamsError
from triage.inference import embedder_kwargs
from triage.params import check

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def canonical_kernels():
    start_onednn(True)  # what an Embedder's fit does first; before any convolution here


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img")
    return [str(write_png(folder / f"im{i}.png", size=(70, 60), seed=i)) for i in range(4)]


def embedder(layers, weights="random", backbone="resnet18", **kw):
    return Embedder(weights, backbone=backbone, image_size=SIZE, batch_size=4, seed=3,
                    device="cpu", layers=layers, **kw).fit()


# (embed.layers, weights, backbone, modules tapped, feature dim)
CASES = [
    ("final", "random", "resnet18", (), 512),
    ("auto", "random", "resnet18", ("layer1", "layer2"), 2 * (64 + 128)),
    (["layer3"], "random", "resnet18", ("layer3",), 2 * 256),
    (["layer2", "layer4"], "random", "resnet18", ("layer2", "layer4"), 2 * (128 + 512)),
    ("auto", "random", "resnet50", ("layer1", "layer2"), 2 * (256 + 512)),
    ("auto", "random", "densenet121", (), 1024),  # not a ResNet: its final features
]


@pytest.mark.parametrize("layers,weights,backbone,tapped,dim", CASES,
                         ids=[f"{c[2]}-{c[0]}" for c in CASES])
def test_layers_resolve_to_the_tapped_modules_and_their_pooled_width(images, layers, weights,
                                                                     backbone, tapped, dim):
    emb = embedder(layers, weights, backbone)
    assert emb.layers_ == tapped and emb.feature_dim_ == dim
    assert emb.transform(images).shape == (len(images), dim)
    assert emb.fingerprint_.get("layers") == (list(tapped) if tapped else None)


def test_auto_keeps_the_final_features_of_pretrained_weights(images, tmp_path):
    # a weights file the test makes: any non-random weights are used as trained (final)
    path = tmp_path / "r18.pth"
    torch.save(build_backbone("random", seed=5)[0].state_dict(), path)
    emb = embedder("auto", weights=str(path))
    assert emb.layers_ == () and emb.feature_dim_ == 512
    assert "layers" not in emb.fingerprint_


def test_default_record_is_unchanged_by_final_and_auto_gets_its_own(images):
    final, auto = embedder("final"), embedder("auto")
    assert final.fingerprint_ == Embedder("random", image_size=SIZE, seed=3,
                                          device="cpu").fit().fingerprint_
    assert "layers" not in final.fingerprint_ and "source" not in final.fingerprint_
    assert auto.fingerprint_["fingerprint"] != final.fingerprint_["fingerprint"]
    assert auto.fingerprint_["feature_dim"] == 384 and auto.fingerprint_["layers"] == ["layer1",
                                                                                        "layer2"]
    # the vectors say which layers: the same spelling-independent record for auto and the list
    listed = embedder(list(AUTO_RANDOM_LAYERS))
    assert listed.fingerprint_ == auto.fingerprint_
    assert np.array_equal(listed.transform(images), auto.transform(images))


def test_tapped_vectors_are_the_pooled_stage_outputs_of_the_whole_network(images):
    """The cut network gives exactly what the full one computes at those stages."""
    emb = embedder("auto")
    model = fuse_batchnorm(build_backbone("random", seed=3)[0]).eval()
    grabbed = {}
    for name in AUTO_RANDOM_LAYERS:
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: grabbed.__setitem__(name, out))
    batch = next(iter(emb._batches(images)))
    mean = torch.tensor(emb.preprocess_.mean).view(1, 3, 1, 1)
    std = torch.tensor(emb.preprocess_.std).view(1, 3, 1, 1)
    x = ((batch.unsqueeze(1).float() / 255.0).expand(-1, 3, -1, -1) - mean) / std
    with torch.inference_mode():
        model(x)
    expected = torch.cat([torch.cat([grabbed[n].mean((2, 3)), grabbed[n].amax((2, 3))], 1)
                          for n in AUTO_RANDOM_LAYERS], 1).numpy()
    np.testing.assert_allclose(emb.transform(images), expected, rtol=1e-4, atol=1e-5)
    # the max half is not the mean half: a local finding is kept, not averaged away
    assert not np.allclose(expected[:, :64], expected[:, 64:128])


def test_unknown_module_names_the_key_and_the_modules():
    with pytest.raises(ParamsError, match=r"embed.layers.*no module 'layer9'.*layer4"):
        embedder(["layer1", "layer9"])


def test_inference_rebuilds_the_tapped_embedder_from_the_training_fingerprint(images):
    trained = embedder("auto")
    # params now say final: the stored record (the model's vectors) decides what is rebuilt
    params = {"weights": "random", "seed": 0, "image_size": 128, "precision": "fp32",
              "layers": "final"}
    kw = embedder_kwargs(params, trained.fingerprint_)
    assert kw["layers"] == ["layer1", "layer2"]
    rebuilt = Embedder(**{**kw, "device": "cpu"}).fit()
    assert rebuilt.fingerprint_ == trained.fingerprint_
    # a record without layers (every embedding made before embed.layers) is final features
    old = embedder_kwargs({**params, "layers": "auto"}, embedder("final").fingerprint_)
    assert old["layers"] == "final"


@pytest.mark.parametrize("value,message", [
    ("all", "must be one of"),
    ([], "non-empty list"),
    (["layer1", "layer1"], "twice"),
    ([1], r"embed.layers\[0\]"),
    (3, "must be auto, final or a non-empty list"),
])
def test_params_rule(value, message):
    with pytest.raises(ParamsError, match=message):
        check("embed.layers", value)


@pytest.mark.parametrize("value", ["auto", "final", ["layer2"], ["layer1", "layer2"]])
def test_params_rule_accepts(value):
    check("embed.layers", value)


def test_a_transformer_stage_pools_its_tokens_and_an_untraceable_model_is_refused(images):
    vit = Embedder("random", backbone="vit_b_16", image_size=224, batch_size=4, device="cpu",
                   layers=["encoder.layers.encoder_layer_0"]).fit()
    assert vit.feature_dim_ == 2 * 768  # (N, tokens, 768): mean and max over the tokens
    assert vit.transform(images[:2]).shape == (2, 1536)
    with pytest.raises(ParamsError, match=r"embed.layers.*cannot be cut.*embed.layers: final"):
        Embedder("random", backbone="timm:test_vit", image_size=160, device="cpu",
                 layers=["blocks.0"]).fit()
