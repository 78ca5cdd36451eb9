"""Fine-tuning (FixMatch-style) and SimCLR pretraining: augmentations, the consistency
loss, distribution alignment, determinism, test-split isolation, ssl weights, the
disabled/enabled stages and finetuned.* in evaluate. Tiny images (32 px), 1-2 epochs."""
import inspect
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from triage import augment
from triage.backbone import build_backbone
from triage.embed import Embedder
from triage.errors import PipelineError, WeightsError
from triage.finetune import (
    FinetuneConfig,
    align_distribution,
    consistency_loss,
    load_finetuned,
    pseudo_label,
    run_finetune,
)
from triage.finetune_results import finetuned_scores, read_finetune_predictions
from triage.pretrain import PretrainConfig, nt_xent, pretrain_rows, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY_FT = FinetuneConfig(image_size=32, epochs=2, batch_size=8, mu=2, cv_folds=2,
                         threshold=0.6, lr=0.01, threads=1, device="cpu")
TINY_PRE = PretrainConfig(image_size=32, epochs=1, batch_size=8, threads=1, device="cpu")


def _write_dataset(root: Path, n_lab=12, n_pool=16, n_test=8, size=32, seed=0) -> pd.DataFrame:
    """PNG files: 'cancer' images carry a bright blob; labels hidden for the pool."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("labeled", n_lab), ("unlabeled", n_pool), ("test", n_test)):
        for i in range(n):
            pos = i % 2 == 1
            arr = rng.normal(90, 20, (size, size))
            if pos:
                cy, cx = rng.integers(8, size - 8, 2)
                arr[cy - 4:cy + 4, cx - 4:cx + 4] += 110
            path = root / "img" / split / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
            label = ("cancer" if pos else "normal") if split != "unlabeled" else None
            rows.append({"id": f"{split}-{i}", "path": str(path), "split": split,
                         "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("ft"))


# --------------------------------------------------------------------------- augmentations
@pytest.mark.parametrize("view", [augment.weak_view, augment.strong_view, augment.simclr_view])
def test_views_keep_shape_and_range_and_are_seeded(view):
    x = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    a = view(x, torch.Generator().manual_seed(1))
    b = view(x, torch.Generator().manual_seed(1))
    c = view(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, x.float() / 255)  # it does change the image


@pytest.mark.parametrize("op", augment.INTENSITY_OPS)
def test_each_intensity_op_keeps_one_channel_uint8(op):
    img = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    for mag in (0.0, 0.3, 1.0):
        out = augment._apply_intensity(img, op, mag)
        assert out.shape == img.shape and out.dtype == torch.uint8


def test_no_colour_operation():
    colour = ("hue", "saturation", "colorjitter", "color_jitter", "rgb_to", "grayscale")
    assert not any(c in op for op in augment.INTENSITY_OPS for c in colour)
    src = inspect.getsource(augment).lower()
    for word in ("adjust_hue", "adjust_saturation", "colorjitter", "color_jitter"):
        assert word not in src


def test_model_input_repeats_grey_to_three_identical_channels_before_normalising():
    x = torch.rand(2, 1, 8, 8)
    y = augment.to_model_input(x)
    assert y.shape == (2, 3, 8, 8)
    back = y * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor(
        [0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(back[:, 0], back[:, 1], atol=1e-6)
    assert torch.allclose(back[:, 0], x[:, 0], atol=1e-6)


# --------------------------------------------------------------------------- FixMatch parts
def test_pseudo_label_masks_low_confidence():
    probs = torch.tensor([[0.97, 0.03], [0.6, 0.4], [0.02, 0.98], [0.5, 0.5]])
    labels, mask = pseudo_label(probs, 0.95)
    assert labels[[0, 2]].tolist() == [0, 1]
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_consistency_loss_ignores_masked_samples():
    torch.manual_seed(0)
    logits = torch.randn(4, 2)
    labels = torch.tensor([0, 1, 1, 0])
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = consistency_loss(logits, labels, mask)
    changed = logits.clone()
    changed[[1, 3]] = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])  # masked-out rows
    assert torch.allclose(loss, consistency_loss(changed, labels, mask))
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(loss, (ce[0] + ce[2]) / 4)  # FixMatch: mean over all samples
    assert float(consistency_loss(logits, labels, torch.zeros(4))) == 0.0


def test_distribution_alignment_counteracts_drift_to_one_class():
    # A model that drifted to "normal": on a balanced pool it gives P(cancer) in 0.02-0.6.
    p1 = torch.linspace(0.02, 0.6, 200)
    probs = torch.stack([1 - p1, p1], 1)
    prior = torch.tensor([0.5, 0.5])
    aligned = align_distribution(probs, prior, probs.mean(0))
    share_before = float((probs.argmax(1) == 1).float().mean())
    share_after = float((aligned.argmax(1) == 1).float().mean())
    assert share_before < 0.2 and 0.35 <= share_after <= 0.65
    assert torch.allclose(aligned.sum(1), torch.ones(200))
    assert torch.equal(aligned.argsort(0)[:, 1], probs.argsort(0)[:, 1])  # order kept
    # Already matching the prior: unchanged.
    assert torch.allclose(align_distribution(probs, probs.mean(0), probs.mean(0)), probs)
    # A low prior pushes pseudo-labels towards the negative class.
    low = align_distribution(probs, torch.tensor([0.9, 0.1]), probs.mean(0))
    assert float((low.argmax(1) == 1).float().mean()) < share_after


def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    matched = nt_xent(z, z + 0.01 * torch.randn(8, 16), 0.2)
    shuffled = nt_xent(z, z[torch.randperm(8)], 0.2)
    assert float(matched) < float(shuffled)


# --------------------------------------------------------------------------- whole procedure
def test_finetune_is_deterministic_and_seed_sensitive(dataset):
    a = run_finetune(dataset, TINY_FT, "cancer", 0.95)
    b = run_finetune(dataset, TINY_FT, "cancer", 0.95)
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    pa, pb = a["predictions"], b["predictions"]
    np.testing.assert_array_equal(pa["proba"].to_numpy(), pb["proba"].to_numpy())
    assert a["threshold"] == b["threshold"]
    c = run_finetune(dataset, replace(TINY_FT, seed=1), "cancer", 0.95)
    assert not np.array_equal(pa["proba"].to_numpy(), c["predictions"]["proba"].to_numpy())
    # Global torch state is restored afterwards.
    assert not torch.are_deterministic_algorithms_enabled()


def test_finetune_outputs_oof_for_every_label_and_test_scores(dataset):
    r = run_finetune(dataset, TINY_FT, "cancer", 0.95)
    preds = r["predictions"]
    oof, test = preds[preds["kind"] == "oof"], preds[preds["kind"] == "test"]
    assert sorted(oof["id"]) == sorted(dataset.loc[dataset["split"] == "labeled", "id"])
    assert sorted(test["id"]) == sorted(dataset.loc[dataset["split"] == "test", "id"])
    assert preds["proba"].between(0, 1).all()
    assert len(r["history"]) == TINY_FT.epochs
    assert {"loss", "loss_x", "loss_u", "mask_rate", "pseudo_positive_share"} <= set(r["history"][0])


def test_test_split_never_reaches_training(dataset):
    test_ids = set(dataset.loc[dataset["split"] == "test", "id"])
    lab_ids = set(dataset.loc[dataset["split"] == "labeled", "id"])
    pool_ids = set(dataset.loc[dataset["split"] == "unlabeled", "id"])
    with_u = run_finetune(dataset, TINY_FT, "cancer", 0.95)
    assert not with_u["seen_ids"] & test_ids
    assert lab_ids <= with_u["seen_ids"] and with_u["seen_ids"] & pool_ids
    without = run_finetune(dataset, replace(TINY_FT, consistency=False), "cancer", 0.95)
    assert without["seen_ids"] == lab_ids  # labelled only: not even the pool
    pre = run_pretrain(dataset, replace(TINY_PRE, batch_size=7))  # 28 = 4 full batches
    assert not pre["seen_ids"] & test_ids
    assert pre["seen_ids"] == lab_ids | pool_ids
    assert set(pretrain_rows(dataset)["split"]) == {"labeled", "unlabeled"}


def test_finetune_refuses_too_few_labels(dataset):
    few = dataset[(dataset["split"] != "labeled") | dataset["id"].isin(["labeled-0", "labeled-1"])]
    with pytest.raises(PipelineError, match="cv_folds"):
        run_finetune(few, TINY_FT, "cancer", 0.95)


# --------------------------------------------------------------------------- ssl weights
def test_ssl_checkpoint_roundtrips_into_build_backbone_and_embed(dataset, tmp_path, monkeypatch):
    pre = run_pretrain(dataset, TINY_PRE)
    state = pre["state_dict"]
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)
    monkeypatch.chdir(tmp_path)
    Path("data/pretrain").mkdir(parents=True)
    torch.save(state, "data/pretrain/backbone.pt")
    model, info = build_backbone("ssl", seed=0)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert info["weights"] == "ssl:data/pretrain/backbone.pt" and len(info["weights_sha256"]) == 64
    emb = Embedder("ssl", image_size=32, batch_size=4).fit()
    vec = emb.transform(dataset["path"].tolist()[:3])
    assert vec.shape == (3, 512) and np.isfinite(vec).all()
    assert emb.fingerprint_["weights"].startswith("ssl:")
    rand = Embedder("random", image_size=32, batch_size=4).fit()
    assert emb.fingerprint_["fingerprint"] != rand.fingerprint_["fingerprint"]
    # The fine-tuner starts from it too.
    cfg = replace(TINY_FT, weights="ssl", epochs=1)
    from triage.finetune import build_classifier
    clf, _ = build_classifier(cfg.weights, seed=0)
    assert torch.equal(clf.conv1.weight, state["conv1.weight"]) and clf.fc.out_features == 2


def test_saved_checkpoints_are_byte_stable_whatever_the_file_name(tmp_path):
    from triage.torch_utils import save_checkpoint

    state = {"w": torch.arange(6.0).view(2, 3), "threshold": 0.5}
    save_checkpoint(state, tmp_path / "a.pt")
    save_checkpoint(state, tmp_path / "other_name.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other_name.pt").read_bytes()
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"])


def test_missing_ssl_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"data/pretrain/backbone.pt.*pretrain"):
        build_backbone("ssl")
    with pytest.raises(WeightsError, match="dvc repro pretrain"):
        Embedder("ssl").fit()
    with pytest.raises(WeightsError, match="not found"):  # other paths: message unchanged
        build_backbone(str(tmp_path / "nope.pth"))


# --------------------------------------------------------------------------- stages
def _stage_env() -> dict:
    env = dict(os.environ)
    env.pop("DVCLIVE_TEST", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def _workspace(tmp: Path, updates: dict) -> Path:
    for rel in ("stages", "triage"):
        shutil.copytree(ROOT / rel, tmp / rel, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in updates.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp


def _run(stage: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=cwd, env=_stage_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res


def test_disabled_stages_write_markers_fast_and_deterministically(tmp_path):
    ws = _workspace(tmp_path, {})  # the shipped params: both disabled
    for stage in ("pretrain", "finetune"):
        _run(stage, ws)
        marker = ws / f"data/{stage}/disabled.json"
        first = marker.read_bytes()
        assert json.loads(first)["enabled"] is False
        assert json.loads((ws / f"metrics/{stage}/metrics.json").read_text()) == {"enabled": 0}
        assert sorted(p.name for p in (ws / f"data/{stage}").iterdir()) == ["disabled.json"]
        _run(stage, ws)
        assert marker.read_bytes() == first
    assert read_finetune_predictions(ws / "data/finetune") is None


def test_enabled_finetune_stage_writes_model_and_predictions(tmp_path, dataset):
    ws = _workspace(tmp_path, {"finetune.enabled": True, "finetune.image_size": 32,
                               "finetune.epochs": 1, "finetune.batch_size": 8,
                               "finetune.mu": 1, "finetune.cv_folds": 2,
                               "finetune.threads": 1, "finetune.device": "cpu"})
    (ws / "data/qc").mkdir(parents=True)
    dataset.to_parquet(ws / "data/qc/manifest_clean.parquet")
    _run("finetune", ws)
    out = ws / "data/finetune"
    model, bundle = load_finetuned(out / "model.pt")
    assert bundle["preprocess"]["image_size"] == 32 and bundle["classes"] == ["normal", "cancer"]
    assert 0.0 <= bundle["threshold"] <= 1.0
    preds = read_finetune_predictions(out)
    assert set(preds["kind"]) == {"oof", "test"}
    metrics = json.loads((ws / "metrics/finetune/metrics.json").read_text())
    assert metrics["enabled"] == 1 and "oof_roc_auc" in metrics
    assert (ws / "metrics/finetune/plots/custom/losses.json").is_file()
    # The saved model reproduces the stage's test probabilities.
    from triage.finetune import predict_proba
    from triage.torch_utils import load_images
    test = dataset[dataset["split"] == "test"]
    p = predict_proba(model, load_images(test["path"].tolist(), 32))
    np.testing.assert_allclose(p, preds.set_index("id").loc[test["id"], "proba"], atol=1e-6)


def test_finetuned_scores_threshold_from_oof_and_aligned_to_test_ids():
    preds = pd.DataFrame({
        "id": ["a", "b", "c", "d", "t1", "t2"],
        "label": ["cancer", "cancer", "normal", "normal", "cancer", "normal"],
        "proba": [0.9, 0.4, 0.3, 0.1, 0.7, 0.2],
        "kind": ["oof"] * 4 + ["test"] * 2})
    p, thr = finetuned_scores(preds, ["t2", "t1"], "cancer", 0.95)
    assert p.tolist() == [0.2, 0.7]
    assert thr == 0.4  # lowest positive OOF score: reaches 100 % >= 95 % sensitivity
    with pytest.raises(PipelineError, match="test images"):
        finetuned_scores(preds, ["t1", "zz"], "cancer", 0.95)


def _evaluate_workspace(tmp: Path) -> Path:
    """Embeddings + both skops models, as the train stage leaves them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from triage.models import fit_weighted, make_classifier, save_model
    from triage.store import EMBEDDING_SCHEMA

    ws = _workspace(tmp, {"evaluate.n_bootstrap": 50})
    rng = np.random.default_rng(0)
    ids = [f"l{i}" for i in range(20)] + [f"t{i}" for i in range(20)]
    split = ["labeled"] * 20 + ["test"] * 20
    label = ["cancer" if i % 2 else "normal" for i in range(40)]
    X = rng.normal(size=(40, 512)).astype(np.float32)
    X[1::2, 0] += 2.0
    fingerprint = {"fingerprint": "abc"}
    schema = EMBEDDING_SCHEMA.with_metadata({b"embedding_fingerprint": json.dumps(fingerprint).encode()})
    (ws / "data/features").mkdir(parents=True)
    pq.write_table(pa.Table.from_arrays([
        pa.array(ids), pa.array(split), pa.array(label),
        pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 512)], schema=schema),
        ws / "data/features/embeddings.parquet")
    model = fit_weighted(make_classifier("logreg", 0.1, "balanced", 0), X[:20],
                         np.array(label[:20], dtype=object))
    for name in ("baseline", "semi_supervised"):
        save_model({"model": model, "name": name, "threshold": 0.5,
                    "embedding_fingerprint": "abc"}, ws / f"data/models/{name}.skops")
    # train's out-of-fold scores: evaluate sets the triage KPI thresholds on them
    pd.DataFrame({"id": ids[:20] * 2, "model": ["baseline"] * 20 + ["semi_supervised"] * 20,
                  "label": label[:20] * 2, "proba": np.tile(rng.random(20), 2)}
                 ).to_parquet(ws / "data/models/oof_predictions.parquet")
    return ws


def test_evaluate_adds_finetuned_only_when_enabled(tmp_path):
    ws = _evaluate_workspace(tmp_path)
    disabled = ws / "data/finetune/disabled.json"
    disabled.parent.mkdir(parents=True)
    disabled.write_text('{"enabled": false}\n')
    _run("evaluate", ws)
    metrics_path = ws / "metrics/evaluate/metrics.json"
    off = json.loads(metrics_path.read_text())
    assert "finetuned" not in off and {"baseline", "semi_supervised", "delta"} <= set(off)
    assert not list((ws / "metrics/evaluate/plots/sklearn/roc").glob("finetuned*"))

    shutil.rmtree(disabled.parent)
    disabled.parent.mkdir()
    rng = np.random.default_rng(1)
    lab = [f"l{i}" for i in range(20)]
    test = [f"t{i}" for i in range(20)]
    y = ["cancer" if i % 2 else "normal" for i in range(20)]
    pd.DataFrame({"id": lab + test, "split": ["labeled"] * 20 + ["test"] * 20,
                  "label": y + y, "proba": np.where(np.array(y + y) == "cancer", 0.5, 0.0)
                  + 0.5 * rng.random(40), "kind": ["oof"] * 20 + ["test"] * 20}
                 ).to_parquet(disabled.parent / "predictions.parquet")
    _run("evaluate", ws)
    on = json.loads(metrics_path.read_text())
    names = ("roc_auc pr_auc f1 accuracy sensitivity specificity ppv npv fn threshold "
             "brier ece").split()
    for m in names:
        assert m in on["finetuned"], m
    for m in ("roc_auc", "sensitivity", "specificity", "brier", "ece"):
        assert f"{m}_ci_low" in on["finetuned"] and f"{m}_ci_high" in on["finetuned"]
    assert set(on["finetuned"]) == set(on["baseline"])
    assert on["baseline"] == off["baseline"] and on["delta"] == off["delta"]
    for plot in ("roc", "precision_recall", "confusion", "calibration"):
        assert (ws / f"metrics/evaluate/plots/sklearn/{plot}/finetuned.json").is_file()
    preds = pd.read_parquet(ws / "data/evaluate/test_predictions.parquet")
    assert set(preds["model"]) == {"baseline", "semi_supervised", "finetuned"}
