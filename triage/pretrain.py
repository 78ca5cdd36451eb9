"""SimCLR self-supervised pretraining of ResNet18 on labelled + unlabelled images.

Two strong greyscale views of each image (``augment.simclr_view``) go through the
backbone and a 2-layer projection head; the NT-Xent loss pulls the two views of an image
together against the other 2N-2 views of the batch. Labels are never read and the test
split never enters (``pretrain_rows``). The result is a plain torchvision ResNet18 state
dict without ``fc`` (data/pretrain/backbone.pt), loaded by ``weights: ssl`` in the embed
and finetune stages through the same safe loader as any weights file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from .errors import PipelineError
from .progress import progress

OUT_DIR = Path("data/pretrain")
CHECKPOINT_FILE = "backbone.pt"
DISABLED_FILE = "disabled.json"
PRETRAIN_SPLITS = ("labeled", "unlabeled")


@dataclass(frozen=True)
class PretrainConfig:
    weights: str = "random"
    seed: int = 0
    image_size: int = 64
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    projection_dim: int = 128
    max_images: int = 0
    threads: int = 2
    device: str = "auto"

    @classmethod
    def from_params(cls, section: dict) -> PretrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names})


def pretrain_rows(rows: pd.DataFrame, max_images: int = 0, seed: int = 0) -> pd.DataFrame:
    """Labelled + unlabelled rows only (never test); a seeded subsample if max_images > 0."""
    keep = rows[rows["split"].isin(PRETRAIN_SPLITS)].sort_values("id").reset_index(drop=True)
    if max_images and len(keep) > max_images:
        keep = keep.sample(n=max_images, random_state=seed).sort_values("id")
    return keep.reset_index(drop=True)


def nt_xent(z1, z2, temperature: float):
    """NT-Xent (SimCLR) loss of two (N, d) batches of projections of the same N images."""
    import torch
    import torch.nn.functional as F

    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def pretrain_backbone(x, cfg: PretrainConfig, *, ids=None, device: str = "cpu",
                      log: Callable | None = None):
    """SimCLR on (N, 1, S, S) uint8 images. Returns (backbone state dict without fc,
    per-epoch history, set of ids seen)."""
    import torch

    from .augment import simclr_view, to_model_input
    from .backbone import build_backbone

    if len(x) < 2:
        raise PipelineError("pretrain: needs at least 2 images")
    backbone, _ = build_backbone(cfg.weights, seed=cfg.seed)
    head = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(inplace=True),
                               torch.nn.Linear(512, cfg.projection_dim))
    net = torch.nn.Sequential(backbone, head).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(x))
    steps = max(1, len(x) // bs)
    total = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(total, 1))))
    g = torch.Generator().manual_seed(cfg.seed)
    seen: set = set()
    history = []
    for epoch in progress(range(cfg.epochs), total=cfg.epochs, desc="pretrain", unit="epoch"):
        perm = torch.randperm(len(x), generator=g).tolist()
        total_loss = 0.0
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            if ids is not None:
                seen.update(ids[i] for i in idx)
            xb = x[idx]
            v1, v2 = simclr_view(xb, g), simclr_view(xb, g)
            z = net(to_model_input(torch.cat([v1, v2]).to(device)))
            loss = nt_xent(z[:len(idx)], z[len(idx):], cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach())
        row = {"epoch": epoch + 1, "loss": round(total_loss / steps, 6)}
        history.append(row)
        if log:
            log(row)
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()
             if not k.startswith("fc.")}
    return state, history, seen


def run_pretrain(rows: pd.DataFrame, cfg: PretrainConfig, *, loader: Callable | None = None,
                 log: Callable | None = None) -> dict:
    """Select the rows, load the images, pretrain deterministically."""
    from .torch_utils import deterministic, load_images, resolve_device

    loader = loader or load_images
    device = resolve_device(cfg.device, "pretrain.device")
    use = pretrain_rows(rows, cfg.max_images, cfg.seed)
    with deterministic(cfg.seed, cfg.threads, device):
        x = loader(use["path"].tolist(), cfg.image_size)
        state, history, seen = pretrain_backbone(x, cfg, ids=use["id"].tolist(),
                                                 device=device, log=log)
    test_ids = set(rows.loc[rows["split"] == "test", "id"])
    if seen & test_ids:  # cannot happen by construction; a guard against future edits
        raise PipelineError("pretrain: test images reached training")
    return {"state_dict": state, "history": history, "seen_ids": seen, "n_images": len(use),
            "device": device}
