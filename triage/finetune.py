"""End-to-end fine-tuning of ResNet18 on the images, with FixMatch-style consistency.

The frozen-embedding models (``train`` stage) cannot improve the features; this trains
the network itself at low resolution on greyscale images repeated to 3 channels:

- labelled loss: cross-entropy on a *weak* view (flip, small rotation/translation/zoom);
- consistency (``consistency: true``): on each unlabelled image, the model's prediction
  on a weak view becomes a pseudo-label when its confidence is >= ``threshold``, and the
  prediction on a *strong* view (weak + greyscale intensity ops + cutout) is trained
  towards it with weight ``lambda_u``; ``mu`` unlabelled images per labelled one;
- distribution alignment (ReMixMatch): the weak-view probabilities are multiplied by
  prior / running-mean-prediction before thresholding, so pseudo-labels follow the class
  prior instead of drifting to the majority class of an early model.

``consistency: false`` is the same code path with the unlabelled term off (labelled only).
Everything random comes from seeded generators, under ``torch.use_deterministic_algorithms``
and a fixed thread count, so the same machine gives byte-identical weights and scores.

Out-of-fold probabilities on the labelled set (K folds, the whole training repeated per
fold with the held-out images removed) set the operating threshold; the test split is
never read before the final model is fixed and is used for prediction only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import PipelineError
from .progress import progress
from .torch_utils import deterministic, load_images, resolve_device

PREPROCESS = ("grey(L) -> resize {s}x{s} bilinear -> [0,1] -> 3ch -> imagenet mean/std")


@dataclass(frozen=True)
class FinetuneConfig:
    weights: str = "random"
    weights_sha256: str | None = None
    seed: int = 0
    image_size: int = 64
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    consistency: bool = True
    lambda_u: float = 1.0
    mu: int = 3
    threshold: float = 0.95
    distribution_alignment: bool = True
    class_prior: float | None = None
    cv_folds: int = 3
    threads: int = 2
    device: str = "auto"

    @classmethod
    def from_params(cls, section: dict) -> FinetuneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names})


# --------------------------------------------------------------------------- FixMatch parts
def align_distribution(probs, prior, running_mean):
    """ReMixMatch distribution alignment: p * prior / E[p], renormalised per row."""
    p = probs * (prior / running_mean.clamp_min(1e-6)).unsqueeze(0)
    return p / p.sum(1, keepdim=True)


def pseudo_label(probs, threshold: float):
    """(labels, mask): argmax class and whether its probability reaches ``threshold``."""
    conf, labels = probs.max(1)
    return labels, (conf >= threshold).float()


def consistency_loss(logits_strong, labels, mask):
    """Masked cross-entropy, averaged over *all* unlabelled samples (FixMatch): a batch
    with no confident sample contributes 0, whatever the strong-view logits are."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits_strong, labels, reduction="none")
    return (ce * mask).mean()


def build_classifier(weights: str, *, seed: int, weights_sha256: str | None = None,
                     n_classes: int = 2):
    """ResNet18 from ``weights`` (random | imagenet | ssl | path) with a fresh linear head."""
    import torch

    from .backbone import build_backbone

    model, info = build_backbone(weights, seed=seed, weights_sha256=weights_sha256)
    torch.manual_seed(seed + 1)
    model.fc = torch.nn.Linear(512, n_classes)
    return model, info


class _Cycler:
    """Endless seeded permutations of range(n), served in fixed-size batches."""

    def __init__(self, n: int, g):
        self.n, self.g, self.buf = n, g, []

    def take(self, k: int) -> list[int]:
        import torch

        while len(self.buf) < k:
            self.buf.extend(torch.randperm(self.n, generator=self.g).tolist())
        out, self.buf = self.buf[:k], self.buf[k:]
        return out


def _optimiser(model, cfg: FinetuneConfig, total_steps: int):
    """SGD (Nesterov) with FixMatch's cosine decay: lr * cos(7 pi k / 16 K)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: math.cos(7 * math.pi * k / (16 * max(total_steps, 1))))
    return opt, sched


class _Consistency:
    """The unlabelled term of one step: weak-view predictions, aligned to the class prior
    over a window of recent batches, become pseudo-labels for the strong view."""

    def __init__(self, cfg: FinetuneConfig, prior):
        self.cfg, self.prior, self.window = cfg, prior, []

    def loss(self, logits_u, sums: dict):
        """Loss on the (weak, strong) logits; adds loss_u, mask_rate and pseudo-positive
        counts to ``sums``; returns (loss, number of masked-in images)."""
        import torch

        lw, ls = logits_u.chunk(2)
        with torch.no_grad():
            pw = lw.detach().softmax(1)
            if self.cfg.distribution_alignment:
                self.window = (self.window + [pw.mean(0)])[-32:]
                pw = align_distribution(pw, self.prior, torch.stack(self.window).mean(0))
            labels, mask = pseudo_label(pw, self.cfg.threshold)
        loss_u = consistency_loss(ls, labels, mask)
        sums["loss_u"] += float(loss_u.detach())
        sums["mask_rate"] += float(mask.mean())
        n_masked = int(mask.sum())
        if n_masked:
            sums["pseudo_positive_share"] += float((labels.float() * mask).sum())
        return loss_u, n_masked


def _epoch_row(epoch: int, sums: dict, steps: int, n_masked: int) -> dict:
    """Per-step means; the pseudo-positive share is over the masked-in images."""
    row = {"epoch": epoch + 1}
    for k, v in sums.items():
        if k == "pseudo_positive_share":
            row[k] = round(v / n_masked, 6) if n_masked else 0.0
        else:
            row[k] = round(v / steps, 6)
    return row


def train_model(x_lab, y_lab, x_pool, cfg: FinetuneConfig, *, ids_lab=None, ids_pool=None,
                device: str = "cpu", fold_seed: int = 0, log: Callable | None = None):
    """Train one classifier. ``x_*``: (N, 1, S, S) uint8; ``y_lab``: 0/1 ints.

    Returns (model in eval mode, per-epoch history, set of ids the training saw).
    """
    import torch
    import torch.nn.functional as F

    from .augment import strong_view, to_model_input, weak_view

    model, _ = build_classifier(cfg.weights, seed=cfg.seed, weights_sha256=cfg.weights_sha256)
    model = model.to(device).train()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + fold_seed)
    y_lab = torch.tensor(np.array(y_lab), dtype=torch.long)
    n_lab, n_pool = len(x_lab), (0 if x_pool is None else len(x_pool))
    use_u = cfg.consistency and n_pool > 0 and cfg.lambda_u > 0
    bs = min(cfg.batch_size, n_lab)
    steps = max(1, math.ceil(n_lab / bs))
    opt, sched = _optimiser(model, cfg, steps * cfg.epochs)
    prior_pos = cfg.class_prior if cfg.class_prior is not None else float(y_lab.float().mean())
    unlabelled = _Consistency(cfg, torch.tensor([1 - prior_pos, prior_pos], device=device))
    lab_cycle, pool_cycle = _Cycler(n_lab, g), _Cycler(max(n_pool, 1), g)
    seen: set = set()
    history = []
    desc = f"finetune fold {fold_seed}" if fold_seed else "finetune"
    for epoch in progress(range(cfg.epochs), total=cfg.epochs, desc=desc, unit="epoch"):
        sums = dict.fromkeys(("loss", "loss_x", "loss_u", "mask_rate", "pseudo_positive_share"), 0.0)
        n_masked_total = 0
        for _ in range(steps):
            li = lab_cycle.take(bs)
            if ids_lab is not None:
                seen.update(ids_lab[i] for i in li)
            inputs = weak_view(x_lab[li], g)
            if use_u:
                ui = pool_cycle.take(bs * cfg.mu)
                if ids_pool is not None:
                    seen.update(ids_pool[i] for i in ui)
                xu = x_pool[ui]
                inputs = torch.cat([inputs, weak_view(xu, g), strong_view(xu, g)])
            logits = model(to_model_input(inputs.to(device)))
            loss_x = F.cross_entropy(logits[:len(li)], y_lab[li].to(device))
            loss = loss_x
            if use_u:
                loss_u, n_masked = unlabelled.loss(logits[len(li):], sums)
                loss = loss_x + cfg.lambda_u * loss_u
                n_masked_total += n_masked
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["loss"] += float(loss.detach())
            sums["loss_x"] += float(loss_x.detach())
        history.append(_epoch_row(epoch, sums, steps, n_masked_total))
        if log:
            log(history[-1])
    return model.eval(), history, seen


def predict_proba(model, x, *, device: str = "cpu", batch_size: int = 256) -> np.ndarray:
    """P(positive) for (N, 1, S, S) uint8 images, no augmentation, eval mode."""
    import torch

    from .augment import to_model_input

    out = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].float().div(255.0).to(device)
            out.append(model(to_model_input(xb)).softmax(1)[:, 1].float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


# --------------------------------------------------------------------------- whole procedure
def training_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labelled rows, unlabelled pool rows): the only rows training may read."""
    lab = rows[rows["split"] == "labeled"].reset_index(drop=True)
    pool = rows[rows["split"] == "unlabeled"].reset_index(drop=True)
    return lab, pool


def run_finetune(rows: pd.DataFrame, cfg: FinetuneConfig, positive: str,
                 target_sensitivity: float, *, loader: Callable = load_images,
                 log: Callable | None = None) -> dict:
    """K-fold out-of-fold probabilities on the labelled set, the final model on labelled +
    pool, then test probabilities. ``rows``: id, path, split, label.

    Returns a dict: model (eval), threshold, predictions (id, split, label, proba, kind),
    history (final model, per epoch), seen_ids (every id any training step read),
    device.
    """
    from .metrics import threshold_for_sensitivity
    from .splits import kfold

    device = resolve_device(cfg.device, "finetune.device")
    lab, pool = training_rows(rows)
    y = (lab["label"] == positive).astype(int).to_numpy()
    if len(lab) < 2 * cfg.cv_folds or y.min() == y.max() or min(y.sum(), len(y) - y.sum()) < cfg.cv_folds:
        raise PipelineError(f"finetune: the labelled set ({len(lab)} images, {int(y.sum())} "
                            f"{positive}) is too small for finetune.cv_folds={cfg.cv_folds}")
    pool_for_training = pool if cfg.consistency else pool.iloc[:0]
    with deterministic(cfg.seed, cfg.threads, device):
        x_lab = loader(lab["path"].tolist(), cfg.image_size)
        x_pool = loader(pool_for_training["path"].tolist(), cfg.image_size)
        ids_lab, ids_pool = lab["id"].tolist(), pool_for_training["id"].tolist()
        oof = np.full(len(lab), np.nan)
        seen: set = set()
        # each split group (near-duplicates, one patient: QC's `group`) on one side
        groups = lab["group"].to_numpy(dtype=object) if "group" in lab else None
        for fold, (tr, te) in enumerate(kfold(y, cfg.cv_folds, cfg.seed, groups)[0]):
            model, _, s = train_model(x_lab[tr], y[tr], x_pool, cfg,
                                      ids_lab=[ids_lab[i] for i in tr], ids_pool=ids_pool,
                                      device=device, fold_seed=fold + 1)
            seen |= s
            oof[te] = predict_proba(model, x_lab[te], device=device)
        threshold = threshold_for_sensitivity(y, oof, target_sensitivity)
        model, history, s = train_model(x_lab, y, x_pool, cfg, ids_lab=ids_lab,
                                        ids_pool=ids_pool, device=device, fold_seed=0, log=log)
        seen |= s
        test = rows[rows["split"] == "test"].reset_index(drop=True)
        leaked = seen & set(test["id"])
        if leaked:  # cannot happen by construction; a guard against future edits
            raise PipelineError(f"finetune: {len(leaked)} test images reached training")
        p_test = predict_proba(model, loader(test["path"].tolist(), cfg.image_size),
                               device=device) if len(test) else np.zeros(0)
    preds = pd.concat([
        pd.DataFrame({"id": lab["id"], "split": "labeled", "label": lab["label"],
                      "proba": oof, "kind": "oof"}),
        pd.DataFrame({"id": test["id"], "split": "test", "label": test["label"],
                      "proba": p_test, "kind": "test"}),
    ], ignore_index=True)
    return {"model": model.cpu(), "threshold": float(threshold), "predictions": preds,
            "history": history, "seen_ids": seen, "device": device,
            "n_labeled": len(lab), "n_pool": len(pool_for_training), "n_test": len(test)}


def model_bundle(result: dict, cfg: FinetuneConfig, positive: str, negative: str,
                 target_sensitivity: float) -> dict:
    """What data/finetune/model.pt holds: loadable with ``torch.load(weights_only=True)``."""
    state = {k: v.detach().cpu().clone() for k, v in result["model"].state_dict().items()}
    return {"state_dict": state, "threshold": result["threshold"],
            "target_sensitivity": float(target_sensitivity),
            "classes": [negative, positive], "positive_class": positive,
            "preprocess": {"image_size": cfg.image_size,
                           "description": PREPROCESS.format(s=cfg.image_size),
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "config": json.dumps(asdict(cfg), sort_keys=True)}


def load_finetuned(path: str | Path):
    """(model in eval mode, bundle) from a model.pt written by the finetune stage."""
    import torch
    from torchvision.models import resnet18

    bundle = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = resnet18(weights=None)
    model.fc = torch.nn.Linear(512, len(bundle["classes"]))
    model.load_state_dict(bundle["state_dict"])
    return model.eval(), bundle
