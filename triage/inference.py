"""Inference on new images: QC, embedding with the model's exact fingerprint, prediction,
out-of-distribution check (the bundle's reference of training vectors, triage.models).

Used by the batch CLI (``scripts/predict.py``), the API (``triage.api``) and the drift
stage. The embedder is rebuilt from the fingerprint stored with the training embeddings
(when it is the model's) or from ``params.yaml`` ``embed.*``; if the rebuilt embedder's
fingerprint is not the one the model was trained on, :func:`build_embedder` refuses with
the differing fields named. Nothing here logs file names or pixel data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .embed import CANONICAL_CPU, Embedder
from .errors import PipelineError
from .io import log, path_text
from .prepare import describe_file, list_files
from .qc import Measured, check_image, inspect_image  # the qc stage's own rules: no train/serve skew
from .store import describe, read_fingerprint

PREDICTION_COLUMNS = ["id", "path", "probability", "decision", "needs_review", "qc_status",
                      "qc_detail", "ood"]
FINGERPRINT_FIELDS = ("backbone", "source", "weights", "weights_seed", "weights_sha256",
                      "image_size", "feature_dim", "input_size", "interpolation", "crop_pct",
                      "mean", "std", "precision", "kernels", "preprocess", "fused_batchnorm",
                      "torch", "torchvision", "timm")


class FingerprintMismatch(PipelineError):
    """The embedding the model was trained on cannot be rebuilt here."""


# --------------------------------------------------------------------------- model metadata
def md5_file(path: str | Path) -> str:
    h = hashlib.md5()  # noqa: S324 - the DVC content hash, not security
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_version(model_path: str | Path, lock_path: str | Path = "dvc.lock") -> dict:
    """Model version = its DVC hash: md5 of the model in dvc.lock (stage train outs),
    else the md5 of the file itself (``source`` says which). The lock hash is used
    only when it matches the file, so a stale lock never names the wrong model."""
    model_path = Path(model_path)
    digest = md5_file(model_path)
    lock_path = Path(lock_path)
    if lock_path.is_file():
        try:
            lock = yaml.safe_load(lock_path.read_text()) or {}
            root = lock_path.resolve().parent
            for stage in (lock.get("stages") or {}).values():
                for out in stage.get("outs") or []:
                    if (root / out.get("path", "")).resolve() == model_path.resolve():
                        if out.get("md5") == digest:
                            return {"version": digest, "source": "dvc.lock"}
        except (yaml.YAMLError, AttributeError, TypeError):
            pass
    return {"version": digest, "source": "file md5"}


def operating_metrics(metrics_path: str | Path, name: str) -> dict:
    """The evaluate metrics of model ``name`` (``semi_supervised`` ...), {} if unavailable."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return {}
    try:
        return dict(json.loads(metrics_path.read_text()).get(name, {}))
    except (json.JSONDecodeError, AttributeError):
        return {}


# --------------------------------------------------------------------------- embedder
def stored_fingerprint(embeddings_path: str | Path | None) -> dict:
    """The full fingerprint dict of the training embeddings (Parquet schema metadata)."""
    if embeddings_path is None or not Path(embeddings_path).exists():  # a file or a directory store
        return {}
    try:
        return read_fingerprint(embeddings_path)
    except json.JSONDecodeError:
        return {}


def embedder_kwargs(embed_params: dict, stored: dict | None = None) -> dict:
    """Embedder arguments: what defines the vectors comes from ``stored`` (the training
    fingerprint) when given, else from params; runtime knobs always from params."""
    kw = dict(weights=embed_params["weights"], seed=embed_params["seed"],
              backbone=embed_params.get("backbone", "resnet18"),
              weights_sha256=embed_params.get("weights_sha256") or None,
              image_size=embed_params["image_size"], crop=embed_params.get("crop", "none"),
              precision=embed_params["precision"],
              batch_size=embed_params.get("batch_size", 64), device=embed_params.get("device", "auto"),
              num_workers=embed_params.get("num_workers", 0),
              kernels=embed_params.get("kernels", "canonical"),
              layers=embed_params.get("layers", "final"))
    if stored:
        w = str(stored.get("weights", ""))
        # "imagenet:IMAGENET1K_V1", "pretrained:timm/<id>", "ssl:<path>": the keyword
        keyword = w.split(":", 1)[0] if w.startswith(("imagenet:", "pretrained:", "ssl:")) else ""
        kw["weights"] = keyword or w or kw["weights"]
        if w == "random":
            kw["seed"] = int(stored.get("weights_seed", kw["seed"]))
        elif stored.get("weights_sha256") and keyword not in ("imagenet", "pretrained"):
            kw["weights_sha256"] = stored["weights_sha256"]  # the same weights file, checked
        full = describe(stored)
        kw["backbone"] = str(full.get("backbone", kw["backbone"]))
        # a record without layers was made from the model's final features
        kw["layers"] = list(full["layers"]) if full.get("layers") else "final"
        kw["crop"] = "none" if full.get("crop_pct") is None else "model"
        kw["image_size"] = int(stored.get("image_size", kw["image_size"]))
        kw["precision"] = str(stored.get("precision", kw["precision"]))
        # The numeric path defines the bits: vectors made on the CPU are re-made on the CPU
        # (a GPU here would give other last bits, and another fingerprint).
        kernels = str(stored.get("kernels", ""))
        if kernels.startswith("cpu-"):
            kw["device"] = "cpu"
            kw["kernels"] = "canonical" if kernels == CANONICAL_CPU else "fast"
    return kw


def build_embedder(expected: str, embed_params: dict, stored: dict | None = None,
                   **overrides) -> Embedder:
    """Fit an Embedder whose fingerprint is ``expected`` (the model's), or refuse.

    ``stored`` is used only if it is the expected fingerprint (a stale embeddings file
    is ignored and params decide).
    """
    use = stored if stored and stored.get("fingerprint") == expected else None
    kw = {**embedder_kwargs(embed_params, use), **overrides}
    emb = Embedder(**kw).fit()
    got = emb.fingerprint_["fingerprint"]
    if got != expected:
        diff = ""
        if stored and stored.get("fingerprint") == expected:
            want, have = describe(stored), describe(emb.fingerprint_)
            fields = [f"{k}: model {want.get(k)!r} vs here {have.get(k)!r}"
                      for k in FINGERPRINT_FIELDS if want.get(k) != have.get(k)]
            diff = " (" + "; ".join(fields) + ")" if fields else ""
        raise FingerprintMismatch(
            f"embedding fingerprint mismatch: the model was trained on embedding {expected}, "
            f"this embedder gives {got}{diff}. Predictions would be meaningless: use the "
            f"embed.* params (backbone, weights, seed, image_size, crop, precision) and library "
            f"versions the model was trained with, or retrain (`dvc repro`).")
    return emb


# --------------------------------------------------------------------------- QC
def qc_image(path: str | Path, qc: dict) -> dict:
    """QC of one new image with the qc stage's per-image checks (no duplicate checks).

    The same scan, decode and ``triage.qc.IMAGE_RULES`` as the qc stage, so an image gets
    the reason and detail text it would get in data/qc/quarantine.csv. Returns id (sha256
    or None), qc_status ('ok' or the quarantine reason), qc_detail, mean and std (0-255
    greyscale), width and height.
    """
    info = describe_file(Path(path))
    out = {"id": info["id"], "qc_status": "ok", "qc_detail": None, "mean": np.nan,
           "std": np.nan, "width": info["width"], "height": info["height"]}

    def fail(reason, detail):
        out["qc_status"], out["qc_detail"] = reason, detail
        return out

    if info["bytes"] == 0:
        return fail("zero_byte", "file is empty")
    if info["read_error"]:
        return fail(info["read_error"].split(":")[0], info["read_error"])
    res = inspect_image(str(path), qc["max_pixels"], qc.get("convert_modes", True))
    if res["decode_error"]:
        return fail(res["decode_error"].split(":")[0], res["decode_error"])

    out["mean"], out["std"] = res["mean"], res["std"]
    failed = check_image(Measured(int(info["width"]), int(info["height"]), res["std"]), qc)
    return fail(*failed) if failed else out


# --------------------------------------------------------------------------- predictor
class Predictor:
    """Model bundle + matching embedder + QC and review rules → prediction rows."""

    def __init__(self, bundle: dict, embedder: Embedder, *, qc: dict, review_margin: float):
        self.bundle, self.embedder, self.qc = bundle, embedder, qc
        self.review_margin = float(review_margin)
        self.threshold = float(bundle["threshold"])
        self.positive = str(bundle["positive_class"])
        # the out-of-distribution reference fitted by the train stage (None: an older bundle)
        self.ood = bundle.get("ood") or None
        classes = [str(c) for c in bundle.get("classes", [])]
        others = [c for c in classes if c != self.positive]
        self.negative = others[0] if others else f"not_{self.positive}"
        # the model's input width is the backbone's feature dimension it was trained on
        width = getattr(bundle.get("model"), "n_features_in_", None)
        dim = getattr(embedder, "feature_dim_", None)
        if width is not None and dim is not None and int(width) != int(dim):
            raise FingerprintMismatch(
                f"the model takes {width}-d vectors, the embedder "
                f"({getattr(embedder, 'backbone', '?')}) gives {dim}-d: use the embed.backbone "
                f"the model was trained with, or retrain (`dvc repro`)")

    @classmethod
    def from_files(cls, model_path: str | Path, params: dict,
                   embeddings_path: str | Path | None = "data/features/embeddings.parquet",
                   **embed_overrides) -> Predictor:
        from .models import load_model

        bundle = load_model(model_path)
        emb = build_embedder(bundle["embedding_fingerprint"], params["embed"],
                             stored_fingerprint(embeddings_path), **embed_overrides)
        if not bundle.get("ood"):
            log.warning("predict: the model bundle has no out-of-distribution reference (trained "
                        "before it existed): ood is left empty; retrain (`dvc repro train`)")
        emb.warm_up()  # a server's first image does not pay oneDNN's kernel generation
        return cls(bundle, emb, qc=params["qc"], review_margin=params["inference"]["review_margin"])

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        from .models import positive_proba

        return positive_proba(self.bundle["model"], X, self.positive)

    def ood_flags(self, X: np.ndarray) -> np.ndarray | None:
        """Out of distribution per row of ``X``: the mean distance to its ``k`` nearest
        training vectors above the bundle's threshold (triage.models.knn_distance); None
        when the bundle has no reference."""
        from .models import ood_flags

        return ood_flags(self.ood, X)

    def predict_paths(self, paths: list[str], shown_paths: list[str] | None = None) -> pd.DataFrame:
        """QC → embed (QC-passed only) → probability, decision, needs_review per image."""
        frame, _ = self.predict_paths_with_vectors(paths, shown_paths)
        return frame

    def predict_paths_with_vectors(self, paths: list[str], shown_paths: list[str] | None = None
                                   ) -> tuple[pd.DataFrame, np.ndarray]:
        """``predict_paths`` and the embeddings it scored: one row of the vectors per
        QC-passed image (``qc_status == "ok"``), in the order of the frame."""
        shown = [(None if p is None else path_text(p)) for p in
                 (shown_paths if shown_paths is not None else [str(p) for p in paths])]
        qc = [qc_image(p, self.qc) for p in paths]
        ok = np.array([q["qc_status"] == "ok" for q in qc], dtype=bool)
        X = self.embedder.transform([str(p) for p, good in zip(paths, ok) if good])
        proba = np.full(len(paths), np.nan)
        ood: list = [None] * len(paths)  # None: not embedded (QC failed) or no reference
        if ok.any():
            proba[ok] = self.probabilities(X)
            flags = self.ood_flags(X)
            if flags is not None:
                for i, flag in zip(np.flatnonzero(ok), flags):
                    ood[i] = bool(flag)
        rows = []
        for i, q in enumerate(qc):
            p = proba[i]
            scored = q["qc_status"] == "ok"
            rows.append({
                "id": q["id"], "path": shown[i],
                "probability": round(float(p), 6) if scored else None,
                "decision": (self.positive if p >= self.threshold else self.negative) if scored else None,
                # far from every training image: its probability means nothing, a human looks
                "needs_review": bool((not scored) or ood[i] is True
                                     or abs(p - self.threshold) <= self.review_margin),
                "qc_status": q["qc_status"], "qc_detail": q["qc_detail"], "ood": ood[i],
            })
        df = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
        log.info("predict: %d images, %d passed QC, %d out of distribution, %d need review",
                 len(df), int(ok.sum()), sum(o is True for o in ood), int(df["needs_review"].sum()))
        return df, X


def image_files(folder: str | Path) -> list[Path]:
    """Every (non-hidden) file under ``folder``, sorted; QC decides which are images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"input folder not found: {folder}")
    files, _ = list_files(folder)
    return files
