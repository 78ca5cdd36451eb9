"""Representation levers on the shared datasets → a section of docs/results.md.

Four ways to get a test score from the same 100 labelled images (50/50) and the same
1,406-image unlabelled pool: the near-duplicate-safe splits of benchmarks/semisup_table.py,
drawn by semisup_data's own functions (its loaders minus the embedding: the same
de-duplication, cached pHash, ``near_groups``, ``_grouped_rows`` / ``_split`` with seed 0
and the same quotas; pHash groups within ``qc.near_dup_hamming`` wholly in one split, and
for pneumoniamnist a train/val image with a near-copy in the official test split dropped).

1. frozen random-init ResNet18 → logistic regression on the embeddings (labelled only);
2. ssl-frozen: SimCLR pretraining (triage.pretrain) on labelled + pool, then the same
   logistic regression on its embeddings;
3. fine-tuned end to end, labelled only (triage.finetune, consistency: false);
4. fine-tuned end to end + FixMatch consistency on the pool (consistency: true).

Test ROC-AUC with a stratified bootstrap 95 % CI, paired delta vs row 1, and wall-clock
and CPU time of each on this machine. Budgets are deliberately small (64 px, few epochs,
test subsampled) so the whole run takes 5-20 min on 2 shared CPU cores (the other jobs'
load sets where): results are indicative.
Every other setting comes from params.yaml (finetune.*, pretrain.*, train.*, qc.*).
Each model is fitted once on the labelled set, so no out-of-fold folds are drawn here
(``finetune.cv_folds`` is unused); the rows carry the split ``group`` that the finetune
stage's OOF folds read (``run_finetune`` → ``triage.splits.kfold(groups=)``).

    python benchmarks/finetune_table.py                       # → docs/results.md section
    python benchmarks/finetune_table.py --datasets pneumoniamnist --out /tmp/r.md
    python benchmarks/finetune_table.py --no-group-split --out /tmp/old.md   # the old split
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from bench_machine import cpu, lscpu_fields
from semisup_data import (
    CACHE,
    SHARED,
    _finish,
    _grouped_rows,
    _split,
    brain_mri_unique,
    leaked_test,
    near_groups,
    phashes,
    pneumonia_pngs,
)

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
LOADS: list[float] = []  # 1-minute load average when each row finished (shared machine)


# --------------------------------------------------------------------------- data (paths)
def brain_files():
    """brain_mri_4class de-duplicated as semisup_data.brain_mri: ids, paths, labels, no
    official test split (the given one leaks, so it is ignored)."""
    ids, paths, labels = brain_mri_unique(sorted((SHARED / "brain_mri_4class").rglob("*.jpg")))
    return ids, paths, labels, None


def pneumonia_files():
    """pneumoniamnist de-duplicated as semisup_data.pneumonia (the same PNGs under /tmp);
    the official test split as the test mask."""
    ids, paths, labels, is_test = pneumonia_pngs(CACHE / "pneumonia_png")
    return ids, paths, labels, np.array(is_test)


# name → (files, pHash cache name in semisup_data)
DATASETS = {"brain_mri_4class": (brain_files, "brain_mri"),
            "pneumoniamnist": (pneumonia_files, "pneumonia")}


def split_rows(name: str, hamming: int, group_split: bool = True) -> tuple[pd.DataFrame, dict]:
    """semisup_table.py's split with file paths, from semisup_data's own pieces (its
    loaders minus the embedding, which the split does not read): QC's pHash (cached),
    ``near_groups`` and ``_grouped_rows`` over ``_split`` with seed 0 and the same quotas;
    "drop" rows removed, the pool's labels blanked (``truth`` keeps them)."""
    files, key = DATASETS[name]
    ids, paths, labels, test_mask = files()
    labels = np.asarray(labels, dtype=object)
    ph, _ = phashes(key, list(ids), list(paths))
    group, stats = near_groups(np.asarray(ids), ph, labels, hamming)
    rows, info = _grouped_rows(
        np.asarray(ids), labels,
        lambda rng, g: _split(labels, rng, test_mask=test_mask, groups=g),
        group, stats, group_split, test_mask=test_mask)
    rows["path"] = paths
    rows = rows[rows["split"] != "drop"]
    return _finish(rows, np.empty((len(rows), 0)), {})[0], info


# The previous run of this script (docs/results.md at commit 22b2b46, 14.4 min): the same
# command on the old per-image split (``--no-group-split`` draws that split again).
PREVIOUS = {
    "args": {"epochs": 12, "pretrain_epochs": 3, "image_size": 64, "max_test": 500},
    "brain_mri_4class": {"frozen": (0.955, None), "ssl": (0.926, -0.029),
                         "ft": (0.947, -0.009), "ft_u": (0.963, 0.007)},
    "pneumoniamnist": {"frozen": (0.910, None), "ssl": (0.925, 0.016),
                       "ft": (0.933, 0.024), "ft_u": (0.911, 0.002)},
}


def subsample_test(rows: pd.DataFrame, max_test: int, seed: int) -> pd.DataFrame:
    test = rows.index[rows["split"] == "test"]
    if len(test) > max_test:  # seeded subsample of the test split (cost)
        drop = np.random.default_rng(seed).permutation(test)[max_test:]
        rows = rows.drop(index=drop)
    return rows.reset_index(drop=True)


def prepare(name: str, max_test: int, seed: int, hamming: int,
            group_split: bool = True) -> tuple[pd.DataFrame, dict]:
    """semisup_table.py's split of ``name`` (same functions, seed, quotas and groups) with
    file paths, the test split subsampled; and what changed against the old split."""
    rows, info = split_rows(name, hamming, group_split)
    rows = subsample_test(rows, max_test, seed)
    if group_split and leaked_test(rows["split"], rows["near_group"]).any():
        raise AssertionError(f"{name}: a test image has a training-side near-copy")
    info = {**info, "lab_groups": int(rows.loc[rows["split"] == "labeled", "near_group"].nunique())}
    if group_split:  # overlap with the old per-image split (same subsampling)
        old = subsample_test(split_rows(name, hamming, False)[0], max_test, seed)
        for part in ("labeled", "unlabeled", "test"):
            same = set(old.loc[old["split"] == part, "id"]) & set(rows.loc[rows["split"] == part, "id"])
            info[f"same_{part}"] = len(same)
        info["old_lab_groups"] = int(old.loc[old["split"] == "labeled", "near_group"].nunique())
        info["old_test_leaked_sub"] = int(leaked_test(old["split"], old["near_group"]).sum())
        info["old_n_test"] = int((old["split"] == "test").sum())
    return rows, info


# --------------------------------------------------------------------------- the four rows
def embed_logreg(rows, weights_path: str | None, image_size: int, params: dict):
    """Logistic regression (train.* params) on frozen embeddings of labelled → test."""
    import torch

    from triage.embed import Embedder

    torch.set_num_threads(2)
    lab, test = rows[rows["split"] == "labeled"], rows[rows["split"] == "test"]
    # the pipeline's embed.layers: auto taps layer1 + layer2 for the random-init row and keeps
    # the final features of the SimCLR weights (trained weights), as the embed stage would
    emb = Embedder(weights_path or "random", seed=params["embed"]["seed"],
                   image_size=image_size, batch_size=64, num_workers=0, device="cpu",
                   precision="fp32", layers=params["embed"]["layers"]).fit()
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
    rows, info = prepare(name, args.max_test, params["evaluate"]["seed"],
                         params["qc"]["near_dup_hamming"], args.group_split)
    data_s = time.perf_counter() - t0
    test = rows[rows["split"] == "test"]
    y = (test["truth"] == POS).astype(int).to_numpy()
    kw = dict(n_bootstrap=args.n_boot, level=0.95, seed=params["evaluate"]["seed"])
    size = args.image_size
    out, scores, mark = [], {}, {}

    def start():  # wall-clock and this process's CPU time (all threads) from here
        mark.update(wall=time.perf_counter(), cpu=time.process_time())

    def add(key, label, p, note=""):
        seconds, cpu_s = time.perf_counter() - mark["wall"], time.process_time() - mark["cpu"]
        m = evaluate_scores(y, p, 0.5, **kw)
        r = {"key": key, "method": label, "auc": m["roc_auc"], "lo": m["roc_auc_ci_low"],
             "hi": m["roc_auc_ci_high"], "seconds": seconds, "cpu_s": cpu_s, "note": note}
        if scores:
            d = paired_delta(y, scores["frozen"], p, 0.5, 0.5, **kw)
            r.update(d_auc=d["roc_auc"], d_lo=d["roc_auc_ci_low"], d_hi=d["roc_auc_ci_high"])
        scores[key] = p
        out.append(r)
        LOADS.append(os.getloadavg()[0])
        print(f"{name} {label}: AUC {r['auc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] "
              f"{seconds:.0f}s (CPU {cpu_s:.0f}s) {note}", flush=True)

    start()
    add("frozen", "frozen random-init + logreg", embed_logreg(rows, None, size, params))

    pcfg = replace(PretrainConfig.from_params(params["pretrain"]), image_size=size,
                   epochs=args.pretrain_epochs, threads=2, device="cpu")
    start()
    use = pretrain_rows(rows, pcfg.max_images, pcfg.seed)
    assert not set(use["id"]) & set(test["id"])
    with deterministic(pcfg.seed, pcfg.threads, "cpu"):
        state, phist, _ = pretrain_backbone(load_images(use["path"].tolist(), size), pcfg)
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = WORK / f"{name}_ssl_backbone.pt"
    import torch
    torch.save(state, ckpt)
    pre_s = time.perf_counter() - mark["wall"]  # the ssl row's time includes it
    add("ssl", "ssl-frozen (SimCLR) + logreg", embed_logreg(rows, str(ckpt), size, params),
        f"SimCLR {pcfg.epochs} epochs on {len(use)} images ({pre_s:.0f} s wall; NT-Xent "
        f"{phist[0]['loss']:.2f} → {phist[-1]['loss']:.2f})")

    fcfg = replace(FinetuneConfig.from_params(params["finetune"]), image_size=size,
                   epochs=args.epochs, threads=2, device="cpu", weights="random")
    start()
    p, hist = finetune_scores(rows, replace(fcfg, consistency=False))
    add("ft", "fine-tuned, labelled only", p,
        f"{fcfg.epochs} epochs; final loss {hist[-1]['loss_x']:.3f}")
    start()
    p, hist = finetune_scores(rows, replace(fcfg, consistency=True))
    add("ft_u", "fine-tuned + consistency", p,
        f"{fcfg.epochs} epochs, mu {fcfg.mu}; last-epoch mask rate {hist[-1]['mask_rate']:.2f}, "
        f"pseudo-label positive share {hist[-1]['pseudo_positive_share']:.2f}")
    counts = rows.groupby("split").size().to_dict()
    meta = {"n_lab": counts.get("labeled", 0), "n_pool": counts.get("unlabeled", 0),
            "n_test": len(test), "test_pos": float(y.mean()), "data_s": data_s, **info}
    return out, meta


# --------------------------------------------------------------------------- rendering
def sgn(x: float) -> str:
    return f"{x:+.3f}"


ZEN = {23: "Zen / Zen 2", 25: "Zen 3 / Zen 4", 26: "Zen 5"}  # AMD CPU family → generation


def machine() -> str:
    """CPU model (lscpu), AMD generation when known, cores, AVX-512, arch, Python."""
    model, avx512 = cpu()
    info = lscpu_fields()
    family = info.get("CPU family", "").strip()
    gen = (ZEN.get(int(family)) if family.isdigit() and "AMD" in info.get("Vendor ID", "")
           else None)
    return (f"{model}" + (f" ({gen}, CPU family {family})" if gen else "")
            + f", {os.cpu_count()} cores, {'AVX-512' if avx512 else 'no AVX-512'}; "
            f"{platform.machine()}, Python {platform.python_version()}, torch threads 2")


def what_changed(results: dict, metas: dict, args) -> list[str]:
    """Old (per-image split, PREVIOUS) → new test AUCs, and how the splits differ."""
    lines = ["### What changed vs the previous numbers", ""]
    same_args = PREVIOUS["args"] == {k: getattr(args, k) for k in PREVIOUS["args"]}
    if not same_args:
        return lines + ["The previous numbers of this section (commit 22b2b46, old per-image "
                        "split) were for `--epochs 12 --pretrain-epochs 3 --image-size 64 "
                        "--max-test 500`; this run's budgets differ, so they are not compared.",
                        ""]
    lines += [
        "The previous numbers of this section (this script's last run, commit 22b2b46, the "
        "same command) were on the **old per-image split** (`_split` without groups): the "
        "labelled / pool / test split was drawn image by image after the sha256 "
        "de-duplication, so a test image could have a near-copy among the labelled or pool "
        "images the models (and SimCLR) trained on. This run uses the near-duplicate-safe "
        "split of the tables above. Old → new mixes two effects: the leakage, and different "
        "images (the labelled set takes near-duplicate groups whole; the test sample "
        "changes where groups moved). One seed each; compare a shift with the CIs above.",
        ""]
    layers = load_params(ROOT / "params.yaml")["embed"]["layers"]
    if layers != "final":
        lines += [
            "A third change, in the frozen random-init row only: the previous run embedded with "
            "the network's final features (512-d); this one with the pipeline's default "
            f"`embed.layers: {layers}` (ResNet18 layer1 + layer2, average- and max-pooled, "
            "384-d; docs/pipeline.md), so that row's old → new mixes the split and the "
            "features (the SimCLR row keeps the final features: trained weights).", ""]
    for name, m in metas.items():
        if "same_labeled" not in m:
            continue
        by = {r["key"]: r for r in results[name]}
        prev = PREVIOUS.get(name, {})
        drop = m.get("dropped_near_test", 0)
        txt = (f"- **{name}**: the labelled set keeps {m['same_labeled']} of its {m['n_lab']} "
               f"images (distinct pHash groups {m['old_lab_groups']} → "
               f"{m['lab_groups']}), the pool {m['same_unlabeled']} of its {m['n_pool']}; the "
               f"{m['n_test']} test images share {m['same_test']} with the old ones; on the old "
               f"split {m['old_test_leaked_sub']} of its {m['old_n_test']} scored test images "
               f"({m['old_test_leaked']} of all its test images) had a near-copy among the "
               "labelled or pool images, now none"
               + (f"; {drop} train/val image{'s' if drop > 1 else ''} with a near-copy in the "
                  "official test split dropped" if drop else "") + ".")
        if (m["same_labeled"] == m["n_lab"] and m["same_test"] == m["n_test"] == m["old_n_test"]
                and not m["old_test_leaked_sub"] and {"ssl", "ft_u"} <= set(prev)):
            shift = ", ".join(f"{by[k]['method']} {sgn(by[k]['auc'] - prev[k][0])}"
                              for k in ("ssl", "ft_u"))
            txt += (" Labelled and test images are the old ones and no scored test image "
                    "leaked, so the labelled-only fine-tuned row cannot move (nor the frozen "
                    "row, but for its features, above); only "
                    f"the pool differs ({m['n_pool'] - m['same_unlabeled']} of its {m['n_pool']} "
                    "images), and the "
                    f"rows that read it shift ({shift}). That is the spread of these one-seed "
                    "runs under a small change of their unlabelled data (the pool's batches "
                    "are drawn by position, so one image in or out reshuffles them all), not "
                    "an effect of leakage; `--no-group-split` gives the old numbers back "
                    "exactly.")
        elif m["same_test"] < m["n_test"]:
            txt += (f" The seeded test subsample is drawn from a different test split, so "
                    f"{m['n_test'] - m['same_test']} of its images are new: old → new AUCs are "
                    "on different test images as well.")
        lines.append(txt)
    lines += ["", "| dataset | method | test AUC old → new | Δ vs frozen old → new |",
              "|---|---|---|---|"]
    for name, rows in results.items():
        prev = PREVIOUS.get(name, {})
        for r in rows:
            if r["key"] not in prev:
                continue
            auc, d = prev[r["key"]]
            delta = "—" if d is None else f"{sgn(d)} → {sgn(r['d_auc'])}"
            lines.append(f"| {name} | {r['method']} | {auc:.3f} → {r['auc']:.3f} "
                         f"({sgn(r['auc'] - auc)}) | {delta} |")
    return lines + [""]


def render(results: dict, metas: dict, params: dict, args, wall: float,
           loads: list[float], cpu_total: float) -> str:
    f = params["finetune"]
    h = params["qc"]["near_dup_hamming"]
    split = ("Same near-duplicate-safe splits as above, drawn by the same functions "
             "(`benchmarks/semisup_data.py`: seed 0, 100 labelled 50/50, 1,406-image pool, "
             f"pHash groups within `qc.near_dup_hamming` = {h} bits wholly in one split, for "
             "pneumoniamnist a train/val image with a near-copy in the official test split "
             "dropped; see *What changed: near-duplicate-safe splits* above)"
             if args.group_split else
             "**`--no-group-split`: the old per-image split** (seed 0, 100 labelled 50/50, "
             "1,406-image pool; a test image may have a near-copy in training)")
    lines = [START, "", "## Representation levers: frozen vs ssl-frozen vs fine-tuned (issue #9)",
             "",
             "Generated by `python benchmarks/finetune_table.py` (do not edit by hand; re-running "
             "`benchmarks/semisup_table.py` rewrites this file, so re-run this script after it). "
             f"{split}; "
             f"**test subsampled to at most {args.max_test} images** (seeded). "
             f"**Small budgets**: {args.image_size} px, SimCLR {args.pretrain_epochs} epochs "
             f"(batch {params['pretrain']['batch_size']}, temperature "
             f"{params['pretrain']['temperature']}), fine-tuning {args.epochs} epochs (one epoch "
             f"= one pass over the 100 labels; batch {f['batch_size']}, SGD lr {f['lr']}, "
             f"consistency: threshold {f['threshold']}, mu {f['mu']}, lambda_u {f['lambda_u']}, "
             f"distribution alignment {f['distribution_alignment']}), all from random init "
             "(ImageNet weights cannot be downloaded here). The numbers are therefore "
             "**indicative**: one seed, budgets far below what these methods usually get "
             "(SimCLR usually needs hundreds of epochs: a "
             f"{args.pretrain_epochs}-epoch ssl row tests the plumbing "
             "more than the method). The frozen rows embed at the same "
             f"{args.image_size} px (the strategy tables above embed MRI at 128 px).",
             "",
             "Frozen rows use the pipeline's `embed.layers` "
             f"(`{params['embed']['layers']}`: ResNet18 layer1 + layer2 avg+max pooled for the "
             "random-init row, the final features for the SimCLR weights).",
             "",
             "Each model is fitted once on the 100 labels and scores the test images: no "
             "out-of-fold folds are drawn here (`finetune.cv_folds` is unused). The finetune "
             "stage's own out-of-fold folds (`run_finetune`) are group-aware "
             "(`triage.splits.kfold` with the rows' split `group`), and the rows here carry "
             "that column; SimCLR pretraining reads labelled + pool only (`pretrain_rows`)"
             + (", which hold no near-copy of a test image." if args.group_split else "."),
             "",
             "Columns: test ROC-AUC with a stratified bootstrap 95 % CI "
             f"({args.n_boot} resamples); paired bootstrap Δ vs the frozen random-init row on "
             "the same test images; wall-clock and CPU time of this process, all threads "
             "(training + embedding/prediction of the test images; the ssl row includes its "
             "pretraining), on a shared, loaded machine (see the end of this section): the "
             "wall-clock is inflated by the other jobs' load, which varied during the run, so "
             "compare costs by CPU time (less affected, though not immune to the contention).",
             ""]
    for name, rows in results.items():
        m = metas[name]
        safe = (f"; {m['near_dup_groups']} near-duplicate groups kept within one split, no "
                "test image with a near-copy among the labelled or pool images"
                if args.group_split else "")
        lines += [f"### {name}", "",
                  f"{m['n_lab']} labelled (from {m['lab_groups']} distinct pHash groups), "
                  f"{m['n_pool']} unlabelled, {m['n_test']} test (positive share "
                  f"{m['test_pos']:.2f}){safe}.", "",
                  "| method | test AUC [95 % CI] | Δ vs frozen [CI] | wall-clock | CPU time | "
                  "notes |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            delta = (f"{sgn(r['d_auc'])} [{sgn(r['d_lo'])}, {sgn(r['d_hi'])}]"
                     if "d_auc" in r else "—")
            lines.append(f"| {r['method']} | {r['auc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | "
                         f"{delta} | {r['seconds'] / 60:.1f} min | {r['cpu_s'] / 60:.1f} min | "
                         f"{r['note']} |")
        lines.append("")
    if args.group_split:
        lines += what_changed(results, metas, args)
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
                     f"{u['cpu_s'] / max(lab['cpu_s'], 1e-9):.1f}x the CPU time.")
    cmd = (f"python benchmarks/finetune_table.py --epochs {args.epochs} --pretrain-epochs "
           f"{args.pretrain_epochs} --image-size {args.image_size} --max-test {args.max_test}")
    lines += ["",
              "Where a row shows no significant gain, there is none at this budget; longer "
              "training (the stage's defaults: 20 epochs, 3-fold OOF) or a GPU may change "
              "that, and these runs cannot say by how much.", "",
              "Reproduce (≈ the wall-clock below; shared datasets under ../shared/datasets):", "",
              "```bash", cmd,
              f"{cmd} --no-group-split --out /tmp/old.md   # the old per-image split",
              "```", "",
              f"Wall-clock of this run: {wall / 60:.1f} min (CPU time {cpu_total / 60:.1f} min) "
              f"on {machine()}. The machine was "
              "shared with other jobs and loaded (1-minute load average "
              f"{min(loads):.1f}–{max(loads):.1f} when each row finished, this run itself "
              f"accounting for about 2 on {os.cpu_count()} cores), so every wall-clock figure "
              "is inflated and indicative only.", "", END, ""]
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
    ap.add_argument("--no-group-split", dest="group_split", action="store_false",
                    help="the old per-image split (reproduces the previous numbers' split)")
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    t0, c0 = time.perf_counter(), time.process_time()
    results, metas = {}, {}
    for name in args.datasets:
        results[name], metas[name] = run_dataset(name, params, args)
    write_section(Path(args.out), render(results, metas, params, args,
                                         time.perf_counter() - t0, LOADS,
                                         time.process_time() - c0))
    print(f"wrote {args.out} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
