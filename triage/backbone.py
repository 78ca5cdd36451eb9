"""The frozen backbone: which network (any torchvision classification model, or a timm
model as ``timm:<name>``; ResNet18 by default), its weights (seeded random, the model's
own pretrained weights, the pretrain stage's SimCLR checkpoint, or a weights file) loaded
safely and checked, its head removed, its preprocessing read from its own config, and
inference-time BatchNorm folding.

Shared by embed (frozen features), pretrain and finetune (trained end to end, ResNet18):
a change here re-runs all three, a change to one of them re-runs only that one. torch,
torchvision and timm are imported inside the functions: timm only for a ``timm:``
backbone.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ParamsError, PipelineError, WeightsError
from .io import log, sha256_file

# `weights: ssl` = the backbone written by the pretrain stage (triage/pretrain.py).
SSL_CHECKPOINT = Path("data/pretrain/backbone.pt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "resnet18"
TIMM_PREFIX = "timm:"
TIMM_PIN = "timm==1.0.31"  # requirements.txt
# `imagenet` and `pretrained` both mean the model's own default pretrained weights: the
# torchvision weights enum's DEFAULT (through the torch hub cache) or timm's default tag
# (through the Hugging Face hub cache). `imagenet` is the historical name.
PRETRAINED = ("imagenet", "pretrained")
WEIGHT_KEYWORDS = ("random", *PRETRAINED, "ssl")
WEIGHTS_DIR = Path("data/weights")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold


@dataclass(frozen=True)
class Preprocess:
    """A model's own preprocessing config (torchvision weights transforms / timm data config).

    ``input_size``: the side the model was trained at; ``crop_pct``: its centre crop
    (crop side / resize side), applied only with ``embed.crop: model``.
    """

    input_size: int
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fixed_size: bool = False  # the network runs at input_size only (ViTs)
    min_size: int = 1         # the smallest side it runs at (its weights' meta)


# --------------------------------------------------------------------------- names
def timm_module():
    """timm, imported on first use (only a ``timm:`` backbone needs it)."""
    try:
        import timm
    except ImportError:
        raise ParamsError(f"params: 'embed.backbone' timm:... needs timm: pip install "
                          f"{TIMM_PIN} (requirements.txt)") from None
    return timm


def torchvision_names() -> list[str]:
    """torchvision's classification models (not detection, segmentation, video...)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def parse_backbone(name: str, key: str = "embed.backbone") -> tuple[str, str]:
    """(source, architecture) of ``embed.backbone``: ("torchvision", "resnet50") or
    ("timm", "vit_small_patch14_dinov2.lvd142m"); an unknown name is a ParamsError that
    says how to list the valid ones."""
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        timm = timm_module()
        if not arch or not timm.is_model(arch):
            base = arch.split(".")[0]
            close = difflib.get_close_matches(base, timm.list_models(), n=3)
            raise ParamsError(
                f"params: '{key}' {name!r} is not a timm {timm.__version__} model"
                f"{f' (close: {close})' if close else ''}; list them with python -c \"import "
                f"timm; print(timm.list_models('*{base[:6] or 'vit'}*', pretrained=True))\" and "
                f"write timm:<name>[.<tag>]")
        return "timm", arch
    names = torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ParamsError(
            f"params: '{key}' {name!r} is not a torchvision classification model"
            f"{f' (close: {close})' if close else ''}; list them with python -c \"import "
            f"torchvision; print(torchvision.models.list_models(module=torchvision.models))\", "
            f"or use a timm model as timm:<name>")
    return "torchvision", name


# --------------------------------------------------------------------------- heads
def torchvision_head(model) -> str:
    """Name of a torchvision classifier's final layer: the last ``nn.Linear`` the model
    registers, with one output per class. One rule for every family: ``fc`` (ResNet,
    RegNet, ShuffleNet, GoogLeNet, Inception), ``classifier`` (DenseNet),
    ``classifier.1`` (EfficientNet, MobileNetV2, MNASNet), ``classifier.2`` (ConvNeXt,
    after its LayerNorm), ``classifier.3`` / ``classifier.6`` (MobileNetV3, VGG,
    AlexNet), ``heads.head`` (ViT), ``head`` (Swin), ``classifier.5`` (MaxViT). SqueezeNet
    (a convolution as classifier) has none and is refused."""
    import torch

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[-1][1].out_features != 1000:
        raise ParamsError(f"params: 'embed.backbone' {type(model).__name__}: no linear "
                          f"classifier to remove (not supported; use another model)")
    return linears[-1][0]


def replace_module(model, name: str, new) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# --------------------------------------------------------------------------- weights files
def imagenet_weights_file(backbone: str = DEFAULT_BACKBONE):
    """(weights enum, expected cache path) of a torchvision model's default pretrained
    weights (ResNet18: IMAGENET1K_V1, resnet18-f37072fd.pth)."""
    import torch
    from torchvision.models import get_model_weights

    weights = get_model_weights(backbone).DEFAULT
    name = os.path.basename(weights.url)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / name


def load_imagenet_state_dict(backbone: str = DEFAULT_BACKBONE, keyword: str = "imagenet"
                             ) -> tuple[dict, str, str]:
    """State dict via torchvision's own mechanism (torch hub cache, TORCH_HOME):
    (state, sha256 of the cached file, name of the weights enum member)."""
    weights, cached = imagenet_weights_file(backbone)
    try:
        # Uses the cached file when present; otherwise tries to download it.
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, hash mismatch, ...
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise WeightsError(
            f"embed.weights={keyword}: cannot load {cached.name} for {backbone} "
            f"({type(exc).__name__}{': ' + reason if reason else ''}; offline?): download "
            f"{weights.url} elsewhere and place it at {cached} (the torch hub cache; "
            f"TORCH_HOME moves it), or copy it to {WEIGHTS_DIR / cached.name}, `dvc add` it "
            f"and set embed.weights: {WEIGHTS_DIR / cached.name} (optionally "
            f"embed.weights_sha256: <its sha256>)") from None
    return state, sha256_file(cached) if cached.is_file() else "", weights.name


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """A state dict from a file, hash-checked and loaded safely: ``.safetensors`` with
    safetensors, anything else with ``torch.load(weights_only=True)``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"embed.weights: file not found: {path}")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise WeightsError(f"embed.weights: sha256 of {path} is {digest}, "
                           f"expected embed.weights_sha256={expected_sha256}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle with code, ...
        raise WeightsError(f"embed.weights: {path} is not a loadable weights-only checkpoint "
                           f"(truncated or unsafe?): {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise WeightsError(f"embed.weights: {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, digest


def resolve_ssl_checkpoint(ssl_checkpoint: str | Path = SSL_CHECKPOINT) -> Path:
    """Path of the self-supervised backbone, with a clear error when it was not made."""
    path = Path(ssl_checkpoint)
    if not path.is_file():
        raise WeightsError(
            f"weights=ssl: the self-supervised checkpoint {path} does not exist. Run the "
            f"pretrain stage first: set pretrain.enabled: true and `dvc repro pretrain` "
            f"(or `dvc exp run -S pretrain.enabled=true`).")
    return path


def check_weights_dependency(weights: str, key: str, weights_dir: str | Path = WEIGHTS_DIR
                             ) -> None:
    """A weights *file* must live under data/weights/ (a declared stage dependency), so a
    change to it re-runs the stage; ``random``, ``imagenet``/``pretrained`` and ``ssl``
    need no file."""
    if weights in WEIGHT_KEYWORDS:
        return
    if Path(weights_dir).resolve() not in Path(weights).resolve().parents:
        raise PipelineError(f"{key}: put the weights file under {weights_dir}/ (a dependency "
                            f"of this stage, tracked with `dvc add`); got {weights}")


def file_weights_info(weights: str, path: Path, digest: str) -> dict:
    label = f"ssl:{path.as_posix()}" if weights == "ssl" else Path(weights).as_posix()
    return {"weights": label, "weights_sha256": digest}


# --------------------------------------------------------------------------- build
def build_backbone(weights: str, *, seed: int = 0, weights_sha256: str | None = None,
                   ssl_checkpoint: str | Path = SSL_CHECKPOINT,
                   backbone: str = DEFAULT_BACKBONE):
    """``backbone`` with its classifier replaced by identity → pooled features, in eval mode.

    ``weights``: ``random`` (seeded), ``imagenet``/``pretrained`` (the model's default
    pretrained weights), ``ssl`` (the pretrain stage's ResNet18 checkpoint,
    ``ssl_checkpoint``) or a path to a weights file (.pth / .safetensors).
    Returns (model, weights_info) where weights_info says what was loaded.
    """
    source, arch = parse_backbone(backbone)
    if weights == "ssl" and backbone != DEFAULT_BACKBONE:
        raise ParamsError(f"params: 'embed.weights' ssl is the pretrain stage's "
                          f"{DEFAULT_BACKBONE}; it does not fit embed.backbone {backbone}")
    build = build_timm if source == "timm" else build_torchvision
    model, info = build(arch, weights, seed=seed, weights_sha256=weights_sha256,
                        ssl_checkpoint=ssl_checkpoint, backbone=backbone)
    model.eval()
    return model, info


def build_torchvision(arch: str, weights: str, *, seed: int, weights_sha256: str | None,
                      ssl_checkpoint: str | Path, backbone: str):
    import torch
    from torchvision.models import get_model

    torch.manual_seed(seed)  # makes `random` weights reproducible; harmless otherwise
    model = get_model(arch, weights=None)
    head = torchvision_head(model)
    if weights == "random":
        info = {"weights": "random", "weights_seed": seed, "weights_sha256": ""}
    else:
        if weights in PRETRAINED:
            state, digest, member = load_imagenet_state_dict(arch, weights)
            info = {"weights": f"imagenet:{member}", "weights_sha256": digest}
        else:
            path = resolve_ssl_checkpoint(ssl_checkpoint) if weights == "ssl" else Path(weights)
            state, digest = load_checkpoint(path, weights_sha256)
            info = file_weights_info(weights, path, digest)
        # The classifier head is irrelevant (removed) and may have another class count.
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        check_shapes(model, state, backbone)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(head + ".")]
        if missing or unexpected:
            raise WeightsError(
                f"embed.weights: {weights} is not a {backbone} state dict "
                f"(missing {len(missing)} keys e.g. {missing[:3]}, unexpected {len(unexpected)} "
                f"e.g. {unexpected[:3]})")
    replace_module(model, head, torch.nn.Identity())
    return model, info


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def timm_hub_file(arch: str, keyword: str = "pretrained") -> tuple[Path, str]:
    """(cached weights file, hub id) of a timm model's default pretrained weights, from
    the Hugging Face hub cache, downloaded there first unless HF_HUB_OFFLINE is set."""
    import huggingface_hub

    cfg = timm_module().models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not hub_id:
        raise WeightsError(f"embed.weights={keyword}: timm:{arch} has no pretrained weights "
                           f"on the Hugging Face hub; use a weights file under {WEIGHTS_DIR}/")
    repo, _, revision = hub_id.partition("@")
    cache = hf_cache_dir()
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
    for name in names:
        found = huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=cache,
                                                       revision=revision or None)
        if isinstance(found, str):
            return Path(found), hub_id
    reason = "HF_HUB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        log.info("embed: downloading %s of %s into %s", names[0], repo, cache)
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # not one warning per retry: the error below says it
        try:
            return Path(huggingface_hub.hf_hub_download(repo, names[0], cache_dir=cache,
                                                        revision=revision or None)), hub_id
        except Exception as exc:  # noqa: BLE001 - offline, proxy, no such file...
            reason = type(exc).__name__
        finally:
            hub_log.setLevel(level)
    local = WEIGHTS_DIR / f"{repo.split('/')[-1]}{Path(names[0]).suffix}"
    folder = cache / f"models--{repo.replace('/', '--')}"
    raise WeightsError(
        f"embed.weights={keyword}: cannot load {names[0]} of {repo} for timm:{arch} "
        f"({reason}; offline?): it belongs in the Hugging Face cache at "
        f"{folder}/snapshots/<revision>/{names[0]} (run `hf download {repo} {names[0]}` where "
        f"there is internet and copy {folder} here; HF_HOME or HF_HUB_CACHE move the cache), or "
        f"download https://huggingface.co/{repo}/resolve/main/{names[0]}, put it at {local}, "
        f"`dvc add` it and set embed.weights: {local}")


def build_timm(arch: str, weights: str, *, seed: int, weights_sha256: str | None,
               ssl_checkpoint: str | Path, backbone: str):
    """A timm model without its classifier (``num_classes=0``: pooled, pre-logits
    features), its weights loaded by timm's own code (``pretrained_cfg_overlay``: the
    model's checkpoint filter, input-conv adaptation)."""
    import torch

    timm = timm_module()
    torch.manual_seed(seed)
    if weights == "random":
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        return model, {"weights": "random", "weights_seed": seed, "weights_sha256": ""}
    if weights in PRETRAINED:
        path, hub_id = timm_hub_file(arch, weights)
        try:
            model = timm.create_model(arch, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": str(path)})
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign cached file
            raise WeightsError(f"embed.weights={weights}: the cached {path} does not load "
                               f"into timm:{arch} ({type(exc).__name__}: {exc}); delete it "
                               f"and retry") from None
        return model, {"weights": f"pretrained:{hub_id}", "weights_sha256": sha256_file(path)}
    path = Path(weights)
    state, digest = load_checkpoint(path, weights_sha256)
    classifiers = timm.models.get_pretrained_cfg(arch).classifier or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    head = next((state[f"{c}.weight"] for c in classifiers if f"{c}.weight" in state), None)
    # Strict loading: a checkpoint with its head loads into a model with a head of that
    # size (removed after), one without into a headless model; any other missing or
    # unexpected key is an error, not a silently random layer.
    n_classes = int(head.shape[0]) if head is not None and head.ndim >= 1 else 0
    try:
        model = timm.create_model(arch, pretrained=True, num_classes=n_classes,
                                  pretrained_cfg_overlay={"state_dict": state,
                                                          "num_classes": n_classes})
    except Exception as exc:  # noqa: BLE001 - missing / unexpected keys, shapes, ...
        text = " ".join(str(exc).split())[:300]
        raise WeightsError(f"embed.weights: {weights} is not a {backbone} state dict "
                           f"({type(exc).__name__}: {text})") from None
    model.reset_classifier(0)
    return model, file_weights_info(weights, path, digest)


def check_shapes(model, state: dict, backbone: str = DEFAULT_BACKBONE) -> None:
    """Explain shape mismatches (a same-named key from another architecture)."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise WeightsError(f"embed.weights: tensor shapes differ from {backbone} for {bad[:3]}")


# --------------------------------------------------------------------------- preprocessing
def preprocessing(backbone: str, model) -> Preprocess:
    """The model's own preprocessing: torchvision's weights transforms (the DEFAULT
    weights', whatever weights are loaded) or timm's ``resolve_model_data_config``."""
    source, arch = parse_backbone(backbone)
    if source == "timm":
        cfg = timm_module().data.resolve_model_data_config(model)
        _, height, width = cfg["input_size"]
        fixed = bool(model.pretrained_cfg.get("fixed_input_size", False)) and not getattr(
            model, "dynamic_img_size", False)
        smallest = model.pretrained_cfg.get("min_input_size") or (3, 1, 1)
        return Preprocess(int(height), str(cfg["interpolation"]), float(cfg["crop_pct"]),
                          tuple(float(v) for v in cfg["mean"]),
                          tuple(float(v) for v in cfg["std"]), fixed, int(smallest[1]))
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    min_size = weights.meta.get("min_size", (1, 1))
    fixed = getattr(model, "image_size", None)  # torchvision's ViT: the one size it runs at
    return Preprocess(int(fixed or crop), t.interpolation.value, crop / resize,
                      tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std),
                      fixed is not None, int(min_size[0]))


def resize_plan(image_size: int, crop_pct: float | None) -> int:
    """The side images are resized to before a centre crop to ``image_size``
    (``crop_pct`` None: no crop, resized straight to ``image_size``)."""
    if crop_pct is None:
        return image_size
    return int(math.floor(image_size / crop_pct + 1e-6))


# --------------------------------------------------------------------------- BatchNorm
def fusable(model) -> bool:
    """Whether :func:`fuse_batchnorm` knows this architecture (torchvision ResNets)."""
    from torchvision.models import ResNet

    return isinstance(model, ResNet)


def fuse_batchnorm(model):
    """Fold every eval-mode BatchNorm of a torchvision ResNet into the preceding conv
    (fewer passes over memory); other architectures are returned unchanged.

    Inference-only and exact up to float rounding; the fingerprint records it.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not fusable(model):
        return model
    model.conv1 = fuse_conv_bn_eval(model.conv1, model.bn1)
    model.bn1 = torch.nn.Identity()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            for i in (1, 2, 3):  # BasicBlock: conv1-2; Bottleneck: conv1-3
                if hasattr(block, f"bn{i}"):
                    conv = fuse_conv_bn_eval(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
                    setattr(block, f"conv{i}", conv)
                    setattr(block, f"bn{i}", torch.nn.Identity())
            if block.downsample is not None:
                block.downsample = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
    return model


# --------------------------------------------------------------------------- layers
# `embed.layers: auto` with random weights on a torchvision ResNet: the first two stages,
# average- and max-pooled. A random network's deep stages blur a small local finding (a
# mass) into noise, and average pooling dilutes it further; measured on 100 labels 50/50
# (logreg, test ROC-AUC; docs/pipeline.md "Which layers"): demo 0.76 (final) → 0.97,
# brain MRI 0.95 → 0.97, PneumoniaMNIST 0.955 → 0.956. Pretrained weights keep their own
# final features (what they were trained to give).
AUTO_RANDOM_LAYERS = ("layer1", "layer2")
LAYER_CHOICES = ("auto", "final")


def resolve_layers(layers, weights: str, model) -> tuple[str, ...]:
    """The modules tapped for the embedding (``()`` = the model's final features, its
    classifier removed): ``embed.layers`` ``final``, ``auto`` (:data:`AUTO_RANDOM_LAYERS`
    for random weights on a torchvision ResNet, else final) or a list of module names."""
    from torchvision.models import ResNet

    if layers == "final":
        return ()
    if layers == "auto":
        return AUTO_RANDOM_LAYERS if weights == "random" and isinstance(model, ResNet) else ()
    return tuple(str(name) for name in layers)


def pooled_layers(model, names: tuple[str, ...], backbone: str = DEFAULT_BACKBONE):
    """``model`` cut after the last of ``names`` (torchvision's FX feature extraction: the
    later stages are not computed); each tapped output average- and max-pooled over its
    positions (a feature map's pixels, a transformer's tokens), concatenated in order:
    ``[avg(names[0]), max(names[0]), avg(names[1]), ...]``."""
    import torch
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    try:
        nodes = get_graph_node_names(model)[1]
    except Exception as exc:  # noqa: BLE001 - a model torch.fx cannot trace
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ParamsError(f"params: 'embed.layers' {backbone} cannot be cut at named modules "
                          f"(torch.fx: {type(exc).__name__}: {first}); use embed.layers: "
                          f"final") from None
    # a module's name taps its last operation (torchvision's rule for return_nodes)
    unknown = [n for n in names if n not in nodes and not any(m.startswith(n + ".") for m in nodes)]
    if unknown:
        stages = list(dict.fromkeys(m.split(".")[0] for m in nodes if m != "x"))
        raise ParamsError(f"params: 'embed.layers' {backbone} has no module {unknown[0]!r}; "
                          f"its top-level modules: {stages} (or auto / final)")
    extractor = create_feature_extractor(model, return_nodes={n: n for n in names})

    class PooledLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.extractor = extractor

        def forward(self, x):
            pooled = []
            for out in self.extractor(x).values():
                if out.ndim == 4:  # (N, C, H, W): the same pooling ops as a ResNet's own head
                    pooled += [torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1),
                               torch.nn.functional.adaptive_max_pool2d(out, 1).flatten(1)]
                elif out.ndim == 3:  # (N, tokens, C)
                    pooled += [out.mean(1), out.amax(1)]
                else:
                    raise PipelineError(f"embed.layers: a tapped output of {backbone} has "
                                        f"shape {tuple(out.shape)}, not a feature map or tokens")
            return torch.cat(pooled, 1)

    return PooledLayers().eval()
