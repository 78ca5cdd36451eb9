"""The ResNet18 backbone: its weights (seeded random, ImageNet, the pretrain stage's
SimCLR checkpoint, or a state-dict file), loaded safely and checked, and inference-time
BatchNorm folding.

Shared by embed (frozen features), pretrain and finetune (trained end to end): a change
here re-runs all three, a change to one of them re-runs only that one.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import PipelineError, WeightsError
from .io import sha256_file

# `weights: ssl` = the backbone written by the pretrain stage (triage/pretrain.py).
SSL_CHECKPOINT = Path("data/pretrain/backbone.pt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_weights_file():
    """(weights enum, expected cache path) for torchvision's ResNet18 ImageNet weights."""
    import torch
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    name = os.path.basename(weights.url)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / name


def load_imagenet_state_dict() -> tuple[dict, str]:
    """State dict via torchvision's own mechanism (torch hub cache, TORCH_HOME)."""
    weights, cached = imagenet_weights_file()
    try:
        # Uses the cached file when present; otherwise tries to download it.
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, hash mismatch, ...
        raise WeightsError(
            f"embed.weights=imagenet: cannot load {cached.name} ({type(exc).__name__}: {exc}).\n"
            f"  This machine may be offline. Either:\n"
            f"  1. download {weights.url} elsewhere and place it at {cached}\n"
            f"     (the torch hub cache; set TORCH_HOME to move it), or\n"
            f"  2. copy it into the repo, `dvc add` it, and set embed.weights: <that path>\n"
            f"     (optionally embed.weights_sha256: <sha256 of the file>)."
        ) from None
    return state, sha256_file(cached) if cached.is_file() else ""


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """Load a ResNet18 state dict from a file safely (``weights_only=True``), hash-checked."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"embed.weights: file not found: {path}")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise WeightsError(f"embed.weights: sha256 of {path} is {digest}, "
                           f"expected embed.weights_sha256={expected_sha256}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle with code, ...
        raise WeightsError(f"embed.weights: {path} is not a loadable weights-only checkpoint "
                           f"(truncated or unsafe?): {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
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


def check_weights_dependency(weights: str, key: str, weights_dir: str | Path = "data/weights"
                             ) -> None:
    """A weights *file* must live under data/weights/ (a declared stage dependency), so a
    change to it re-runs the stage; ``random``, ``imagenet`` and ``ssl`` need no file."""
    if weights in ("random", "imagenet", "ssl"):
        return
    if Path(weights_dir).resolve() not in Path(weights).resolve().parents:
        raise PipelineError(f"{key}: put the weights file under {weights_dir}/ (a dependency "
                            f"of this stage, tracked with `dvc add`); got {weights}")


def build_backbone(weights: str, *, seed: int = 0, weights_sha256: str | None = None,
                   ssl_checkpoint: str | Path = SSL_CHECKPOINT):
    """ResNet18 with ``fc`` replaced by identity → 512-d pooled features, in eval mode.

    ``weights``: ``random`` (seeded), ``imagenet``, ``ssl`` (the pretrain stage's
    checkpoint, ``ssl_checkpoint``) or a path to a state dict.
    Returns (model, weights_info) where weights_info says what was loaded.
    """
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(seed)  # makes `random` weights reproducible; harmless otherwise
    model = resnet18(weights=None)
    if weights == "random":
        info = {"weights": "random", "weights_seed": seed, "weights_sha256": ""}
    else:
        if weights == "imagenet":
            state, digest = load_imagenet_state_dict()
            info = {"weights": "imagenet:IMAGENET1K_V1", "weights_sha256": digest}
        elif weights == "ssl":
            path = resolve_ssl_checkpoint(ssl_checkpoint)
            state, digest = load_checkpoint(path, weights_sha256)
            info = {"weights": f"ssl:{path.as_posix()}", "weights_sha256": digest}
        else:
            state, digest = load_checkpoint(weights, weights_sha256)
            info = {"weights": Path(weights).as_posix(), "weights_sha256": digest}
        # The classifier head is irrelevant (removed) and may have another class count.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        check_shapes(model, state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"embed.weights: {weights} is not a ResNet18 state dict "
                f"(missing {len(missing)} keys e.g. {missing[:3]}, unexpected {len(unexpected)} "
                f"e.g. {unexpected[:3]})")
    model.fc = torch.nn.Identity()
    model.eval()
    return model, info


def check_shapes(model, state: dict) -> None:
    """Explain shape mismatches (a same-named key from another architecture)."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise WeightsError(f"embed.weights: tensor shapes differ from ResNet18 for {bad[:3]}")


def fuse_batchnorm(model):
    """Fold every eval-mode BatchNorm into the preceding conv (fewer passes over memory).

    Inference-only and exact up to float rounding; the fingerprint records it.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.conv1 = fuse_conv_bn_eval(model.conv1, model.bn1)
    model.bn1 = torch.nn.Identity()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
            block.bn1 = torch.nn.Identity()
            block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
            block.bn2 = torch.nn.Identity()
            if block.downsample is not None:
                block.downsample = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
    return model

