"""Representation levers on the shared datasets → a section of docs/results.md.

Four ways to get a test score from the same 100 labelled images (50/50) and the same
1,406-image unlabelled pool (splits of benchmarks/semisup_data.py, seed 0):

1. frozen random-init ResNet18 → logistic regression on the embeddings (labelled only);
2. ssl-frozen: SimCLR pretraining (triage.pretrain) on labelled + pool, then the same
   logistic regression on its embeddings;
3. fine-tuned end to end, labelled only (triage.finetune, consistency: false);
4. fine-tuned end to end + FixMatch consistency on the pool (consistency: true).

Test ROC-AUC with a stratified bootstrap 95 % CI, paired delta vs row 1, and wall-clock
of each on this machine. Budgets are deliberately small (64 px, few epochs, test
subsampled) so the whole run takes ~20 min on 2 CPU cores: results are indicative.
Every other setting comes from params.yaml (finetune.*, pretrain.*, train.*).

    python benchmarks/finetune_table.py                       # → docs/results.md section
    python benchmarks/finetune_table.py --datasets pneumoniamnist --out /tmp/r.md
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from semisup_data import SHARED, SPLIT_SEED, _split, brain_mri_unique, pneumonia_pngs

from triage.checkout import require_own_checkout
from triage.finetune import FinetuneConfig, predict_proba, train_model, training_rows
from triage.metrics import evaluate_scores, paired_delta
from triage.models import fit_weighted, make_classifier, positive_proba
from triage.params import load_params
from triage.pretrain import PretrainConfig, pretrain_backbone, pretrain_rows
from triage.torch_utils import deterministic, load_images

ROOT = Path(__file__).resolve().parents[1]

POS = "cancer"
WORK = Path("/tmp/triage_finetune_bench")
START, END = "<!-- finetune_table:start -->", "<!-- finetune_table:end -->"


# --------------------------------------------------------------------------- data (paths)
def brain_rows() -> pd.DataFrame:
    """Same de-duplication and split as semisup_data.brain_mri, with file paths."""
    files = sorted((SHARED / "brain_mri_4class").rglob("*.jpg"))
    ids, paths, labels = brain_mri_unique(files)
    labels = np.array(labels, dtype=object)
    split = _split(labels, np.random.default_rng(SPLIT_SEED))
    return pd.DataFrame({"id": ids, "path": paths, "split": split, "truth": labels})


def pneumonia_rows() -> pd.DataFrame:
    """Same de-duplication and split as semisup_data.pneumonia; PNGs written under /tmp."""
    ids, paths, labels, is_test = pneumonia_pngs(WORK / "pneumonia_png")
    labels = np.array(labels, dtype=object)
    split = _split(labels, np.random.default_rng(SPLIT_SEED), test_mask=np.array(is_test))
    rows = pd.DataFrame({"id": ids, "path": paths, "split": split, "truth": labels})
    return rows[rows["split"] != "drop"].reset_index(drop=True)


DATASETS = {"brain_mri_4class": brain_rows, "pneumoniamnist": pneumonia_rows}


def prepare(name: str, max_test: int, seed: int) -> pd.DataFrame:
    rows = DATASETS[name]()
    rows["label"] = rows["truth"].where(rows["split"] != "unlabeled", None)
    test = rows.index[rows["split"] == "test"]
    if len(test) > max_test:  # seeded subsample of the test split (cost)
        drop = np.random.default_rng(seed).permutation(test)[max_test:]
        rows = rows.drop(index=drop)
    return rows.reset_index(drop=True)


# --------------------------------------------------------------------------- the four rows
def embed_logreg(rows, weights_path: str | None, image_size: int, params: dict):
    """Logistic regression (train.* params) on frozen embeddings of labelled → test."""
    import torch

    from triage.embed import Embedder

    torch.set_num_threads(2)
    lab, test = rows[rows["split"] == "labeled"], rows[rows["split"] == "test"]
    emb = Embedder(weights_path or "random", seed=params["embed"]["seed"],
                   image_size=image_size, batch_size=64, num_workers=0, device="cpu",
                   precision="fp32").fit()
    X_lab = emb.transform(lab["path"].tolist())
    X_test = emb.transform(test["path"].tolist())
    t = params["train"]
    pipe = make_classifier(t["model"], t["C"], t["class_weight"], t["seed"], t["calibration"])
    model = fit_weighted(pipe, X_lab, lab["label"].to_numpy(dtype=object))
    return positive_proba(model, X_test, POS)


def finetune_scores(rows, cfg: FinetuneConfig):
    lab, pool = training_rows(rows)
    test = rows[rows["split"] == "test"]
    y = (lab["label"] == POS).astype(int).to_numpy()
    with deterministic(cfg.seed, cfg.threads, "cpu"):
        x_lab = load_images(lab["path"].tolist(), cfg.image_size)
        x_pool = load_images(pool["path"].tolist(), cfg.image_size) if cfg.consistency else None
        model, hist, seen = train_model(x_lab, y, x_pool, cfg, ids_lab=lab["id"].tolist(),
                                        ids_pool=pool["id"].tolist(), device="cpu")
        assert not seen & set(test["id"])
        p = predict_proba(model, load_images(test["path"].tolist(), cfg.image_size))
    return p, hist


def run_dataset(name: str, params: dict, args) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    rows = prepare(name, args.max_test, params["evaluate"]["seed"])
    data_s = time.perf_counter() - t0
    test = rows[rows["split"] == "test"]
    y = (test["truth"] == POS).astype(int).to_numpy()
    kw = dict(n_bootstrap=args.n_boot, level=0.95, seed=params["evaluate"]["seed"])
    size = args.image_size
    out, scores = [], {}

    def add(key, label, p, seconds, note=""):
        m = evaluate_scores(y, p, 0.5, **kw)
        r = {"key": key, "method": label, "auc": m["roc_auc"], "lo": m["roc_auc_ci_low"],
             "hi": m["roc_auc_ci_high"], "seconds": seconds, "note": note}
        if scores:
            d = paired_delta(y, scores["frozen"], p, 0.5, 0.5, **kw)
            r.update(d_auc=d["roc_auc"], d_lo=d["roc_auc_ci_low"], d_hi=d["roc_auc_ci_high"])
        scores[key] = p
        out.append(r)
        print(f"{name} {label}: AUC {r['auc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] "
              f"{seconds:.0f}s {note}", flush=True)

    s = time.perf_counter()
    add("frozen", "frozen random-init + logreg", embed_logreg(rows, None, size, params),
        time.perf_counter() - s)

    pcfg = replace(PretrainConfig.from_params(params["pretrain"]), image_size=size,
                   epochs=args.pretrain_epochs, threads=2, device="cpu")
    s = time.perf_counter()
    use = pretrain_rows(rows, pcfg.max_images, pcfg.seed)
    assert not set(use["id"]) & set(test["id"])
    with deterministic(pcfg.seed, pcfg.threads, "cpu"):
        state, phist, _ = pretrain_backbone(load_images(use["path"].tolist(), size), pcfg)
    ckpt = WORK / f"{name}_ssl_backbone.pt"
    import torch
    torch.save(state, ckpt)
    pre_s = time.perf_counter() - s
    s = time.perf_counter()
    add("ssl", "ssl-frozen (SimCLR) + logreg", embed_logreg(rows, str(ckpt), size, params),
        pre_s + time.perf_counter() - s,
        f"SimCLR {pcfg.epochs} epochs on {len(use)} images ({pre_s:.0f} s; NT-Xent "
        f"{phist[0]['loss']:.2f} → {phist[-1]['loss']:.2f})")

    fcfg = replace(FinetuneConfig.from_params(params["finetune"]), image_size=size,
                   epochs=args.epochs, threads=2, device="cpu", weights="random")
    s = time.perf_counter()
    p, hist = finetune_scores(rows, replace(fcfg, consistency=False))
    add("ft", "fine-tuned, labelled only", p, time.perf_counter() - s,
        f"{fcfg.epochs} epochs; final loss {hist[-1]['loss_x']:.3f}")
    s = time.perf_counter()
    p, hist = finetune_scores(rows, replace(fcfg, consistency=True))
    add("ft_u", "fine-tuned + consistency", p, time.perf_counter() - s,
        f"{fcfg.epochs} epochs, mu {fcfg.mu}; last-epoch mask rate {hist[-1]['mask_rate']:.2f}, "
        f"pseudo-label positive share {hist[-1]['pseudo_positive_share']:.2f}")
    counts = rows.groupby("split").size().to_dict()
    meta = {"n_lab": counts.get("labeled", 0), "n_pool": counts.get("unlabeled", 0),
            "n_test": len(test), "test_pos": float(y.mean()), "data_s": data_s}
    return out, meta


# --------------------------------------------------------------------------- rendering
def sgn(x: float) -> str:
    return f"{x:+.3f}"


def render(results: dict, metas: dict, params: dict, args, wall: float) -> str:
    f = params["finetune"]
    lines = [START, "", "## Representation levers: frozen vs ssl-frozen vs fine-tuned (issue #9)",
             "",
             "Generated by `python benchmarks/finetune_table.py` (do not edit by hand; re-running "
             "`benchmarks/semisup_table.py` rewrites this file, so re-run this script after it). "
             "Same splits as above (100 labelled 50/50, 1,406-image pool, seed 0); "
             f"**test subsampled to at most {args.max_test} images** (seeded). "
             f"**Small budgets**: {args.image_size} px, SimCLR {args.pretrain_epochs} epochs "
             f"(batch {params['pretrain']['batch_size']}, temperature "
             f"{params['pretrain']['temperature']}), fine-tuning {args.epochs} epochs (one epoch "
             f"= one pass over the 100 labels; batch {f['batch_size']}, SGD lr {f['lr']}, "
             f"consistency: threshold {f['threshold']}, mu {f['mu']}, lambda_u {f['lambda_u']}, "
             f"distribution alignment {f['distribution_alignment']}), all from random init "
             "(ImageNet weights cannot be downloaded here). The numbers are therefore "
             "**indicative**: one seed, budgets far below what these methods usually get "
             "(SimCLR usually needs hundreds of epochs: a 3-epoch ssl row tests the plumbing "
             "more than the method). The frozen rows embed at the same "
             f"{args.image_size} px (the strategy tables above embed MRI at 128 px).",
             "",
             "Columns: test ROC-AUC with a stratified bootstrap 95 % CI "
             f"({args.n_boot} resamples); paired bootstrap Δ vs the frozen random-init row on "
             "the same test images; wall-clock on this machine (training + embedding/prediction "
             "of the test images; the ssl row includes its pretraining).", ""]
    for name, rows in results.items():
        m = metas[name]
        lines += [f"### {name}", "",
                  f"{m['n_lab']} labelled, {m['n_pool']} unlabelled, {m['n_test']} test "
                  f"(positive share {m['test_pos']:.2f}).", "",
                  "| method | test AUC [95 % CI] | Δ vs frozen [CI] | wall-clock | notes |",
                  "|---|---|---|---|---|"]
        for r in rows:
            delta = (f"{sgn(r['d_auc'])} [{sgn(r['d_lo'])}, {sgn(r['d_hi'])}]"
                     if "d_auc" in r else "—")
            lines.append(f"| {r['method']} | {r['auc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | "
                         f"{delta} | {r['seconds'] / 60:.1f} min | {r['note']} |")
        lines.append("")
    lines += ["### Reading it plainly", ""]
    for name, rows in results.items():
        by = {r["key"]: r for r in rows}
        parts = []
        for key in ("ssl", "ft", "ft_u"):
            r = by[key]
            sig = ("significantly better" if r["d_lo"] > 0 else
                   "significantly worse" if r["d_hi"] < 0 else "no significant difference")
            parts.append(f"{r['method']}: {sgn(r['d_auc'])} ({sig})")
        u, lab = by["ft_u"], by["ft"]
        lines.append(f"- **{name}** vs frozen random-init ({by['frozen']['auc']:.3f}): "
                     + "; ".join(parts) + f". Consistency vs labelled-only fine-tuning: "
                     f"{u['auc']:.3f} vs {lab['auc']:.3f} ({sgn(u['auc'] - lab['auc'])}), at "
                     f"{u['seconds'] / max(lab['seconds'], 1e-9):.0f}x the cost.")
    lines += ["",
              "Where a row shows no significant gain, there is none at this budget; longer "
              "training (the stage's defaults: 20 epochs, 3-fold OOF) or a GPU may change "
              "that, and these runs cannot say by how much.", "",
              "Reproduce (≈ the wall-clock below; shared datasets under ../shared/datasets):", "",
              "```bash",
              f"python benchmarks/finetune_table.py --epochs {args.epochs} --pretrain-epochs "
              f"{args.pretrain_epochs} --image-size {args.image_size} --max-test {args.max_test}",
              "```", "",
              f"Wall-clock of this run: {wall / 60:.1f} min on a shared 2-core CPU machine "
              f"({platform.machine()}, Python {platform.python_version()}, torch threads 2); "
              "another engineer used the same cores, so timings are indicative.", "", END, ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else ""
    if START in text and END in text:
        text = text[:text.index(START)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    require_own_checkout(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--max-test", type=int, default=500)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    t0 = time.perf_counter()
    results, metas = {}, {}
    for name in args.datasets:
        results[name], metas[name] = run_dataset(name, params, args)
    write_section(Path(args.out), render(results, metas, params, args,
                                         time.perf_counter() - t0))
    print(f"wrote {args.out} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
