"""Large-archive mode, measured: manifest cost at 100k small files, and the cost of +1 % images.

1. **Hashing / manifest cost** for N small PNGs (default 100,000, ~1 KB each) in a temp
   folder layout: ``triage.archive build`` cold (every file read and hashed, threads) and
   warm (nothing changed: one stat per file), against what the folder mode pays for the same
   files: DVC's own hashing of the folder as a stage dependency (``dvc status`` on a stage
   with the folder as dep: cold = md5 of every file + a state-database row each; warm =
   the state database's stat check) and prepare's folder scan (read + sha256 + header of
   every file, ``triage.prepare.build_manifest``).
2. **+1 % images**: a temp git repo of this project (triage.testing.make_repo: the tiny test
   params, 64-px embedding) on M images (default 3,000), ``data.source: archive`` with
   ``embed.store: partitioned``, and the same images in folder mode: ``dvc repro`` of
   prepare, qc and embed one stage at a time (seconds each), then 1 % more images and the
   same again, then each stage forced with nothing new (its fixed cost: DVC, imports, the
   model build). The archive run includes re-listing the archive (``triage.archive build``).

All ratios come from one run on one machine; prints one JSON document (with the CPU).

    python benchmarks/archive_incremental.py                  # ~10-15 min on 2 cores
    python benchmarks/archive_incremental.py --files 20000 --images 1000   # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from triage import archive
from triage.testing import blob_image, e2e_env, make_repo, run, set_params

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores visible"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tiny_pngs(root: Path, n: int, seed: int = 0) -> None:
    """n distinct ~1 KB PNGs: labeled/{cancer,normal}/ 1 % each, the rest unlabeled/, in
    folders of 1,000 files."""
    rng = np.random.default_rng(seed)
    n_lab = max(10, n // 100)
    for i in range(n):
        if i < 2 * n_lab:
            folder = root / "labeled" / ("cancer" if i % 2 else "normal")
        else:
            folder = root / "unlabeled" / f"b{i // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (24, 24), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"{i:07d}.png", compress_level=1)


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return round(time.perf_counter() - t0, 2), out


def part1(work: Path, n: int, env: dict) -> dict:
    store = work / "files"
    t_gen, _ = timed(tiny_pngs, store, n)
    sizes = [f.stat().st_size for f in store.rglob("*.png")]
    out = {"n_files": n, "mean_file_bytes": round(float(np.mean(sizes))), "generate_s": t_gen}
    manifest = work / "m" / "manifest.parquet"
    manifest.parent.mkdir()
    out["archive_build_cold_s"], stats = timed(archive.build, store, manifest)
    assert stats["n_hashed"] == n, stats
    out["archive_build_warm_s"], stats = timed(archive.build, store, manifest)
    assert stats["n_reused"] == n and stats["n_hashed"] == 0, stats
    out["manifest_bytes"] = manifest.stat().st_size
    # the folder mode: prepare's scan (read + sha256 + header of each file)
    from triage.prepare import build_manifest
    out["folder_prepare_scan_s"], _ = timed(build_manifest, store, "cancer", 0.25, 0)
    # DVC hashing the folder as a stage dependency (what `dvc repro`/`dvc status` pay)
    repo = work / "dvcrepo"
    repo.mkdir()
    (repo / "data").mkdir()
    shutil.move(str(store), repo / "data" / "raw")
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo\n    deps:\n      - data/raw\n")
    t0 = time.perf_counter()
    run(["dvc", "status"], repo, env, check=False)
    out["dvc_dep_hash_cold_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    run(["dvc", "status"], repo, env, check=False)
    out["dvc_dep_hash_warm_s"] = round(time.perf_counter() - t0, 2)
    out["ratio_dvc_cold_over_archive_cold"] = round(out["dvc_dep_hash_cold_s"]
                                                    / out["archive_build_cold_s"], 2)
    out["ratio_dvc_warm_over_archive_warm"] = round(out["dvc_dep_hash_warm_s"]
                                                    / out["archive_build_warm_s"], 2)
    shutil.rmtree(repo)
    return out


def images(root: Path, n: int, start: int = 0) -> None:
    """100 labelled (50/50) blob images, the rest unlabelled (~30 % cancer-like)."""
    for i in range(start, start + n):
        if i < 100:
            cls = "cancer" if i % 2 else "normal"
            blob_image(root / "labeled" / cls / f"{i:06d}.png", i % 2 == 1, seed=i)
        else:
            blob_image(root / "unlabeled" / f"b{i // 1000:03d}" / f"{i:06d}.png", i % 10 < 3,
                       seed=i)


STAGES = ("prepare", "qc", "embed")


def repro_stages(repo: Path, env: dict, force: bool = False) -> dict:
    out = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        res = run(["dvc", "repro", *(["-f", "-s"] if force else []), stage], repo, env)
        out[stage] = round(time.perf_counter() - t0, 2)
        if stage in ("qc", "embed"):
            line = [x for x in res.stdout.splitlines() if x.startswith(f"{stage}: ") and
                    ("decoded" in x or "computed" in x)]
            out[f"{stage}_line"] = line[-1] if line else ""
    return out


def part2(work: Path, n: int, mode: str, env: dict) -> dict:
    repo = make_repo(work / mode, env, ROOT)
    n_add = max(1, n // 100)
    set_params(repo, {"embed.num_workers": 0, "qc.workers": 1})
    if mode == "archive":
        store = work / mode / "store"
        images(store, n)
        set_params(repo, {"data.source": "archive", "data.root": "data/archive",
                          "embed.store": "partitioned"})
        (repo / "data/archive").mkdir(parents=True)
        manifest = repo / "data/archive/manifest.parquet"
        relist = lambda: timed(archive.build, store, manifest)[0]  # noqa: E731
    else:
        store = repo / "data/raw"
        images(store, n)
        set_params(repo, {"data.source": "folder"})
        relist = lambda: 0.0  # noqa: E731
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "params"], repo, env)
    out = {"n_images": n, "n_added": n_add}
    # upstream stages first (demo, deid, pretrain marker): not part of the comparison
    t_list = relist()
    run(["dvc", "repro", "demo", "deid"], repo, env)
    full = repro_stages(repo, env)
    full["relist"] = t_list
    images(store, n_add, start=n)
    t_list = relist()
    inc = repro_stages(repo, env)
    inc["relist"] = t_list
    # the same stages forced with nothing new: each stage's fixed cost (DVC, imports, model
    # build, reading the caches); incremental minus this is what the 1 % itself cost
    fixed = repro_stages(repo, env, force=True)
    fixed["relist"] = relist()
    total = lambda d: sum(d[k] for k in (*STAGES, "relist"))  # noqa: E731
    out["full_s"], out["incremental_s"], out["fixed_rerun_s"] = full, inc, fixed
    out["fixed_total_s"] = round(total(fixed), 2)
    out["ratio_incremental_minus_fixed_over_full_minus_fixed"] = round(
        (total(inc) - total(fixed)) / max(total(full) - total(fixed), 1e-9), 3)
    out["full_total_s"], out["incremental_total_s"] = round(total(full), 2), round(total(inc), 2)
    out["ratio_incremental_over_full"] = round(total(inc) / total(full), 3)
    for stage in STAGES:
        out[f"ratio_{stage}"] = round(inc[stage] / full[stage], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000, help="part 1: small files")
    ap.add_argument("--images", type=int, default=3_000, help="part 2: images before +1 %%")
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--modes", default="archive,folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="archive_bench_"))
    env = e2e_env(work)
    result = {"cpu": cpu(), "python": platform.python_version(), "load_avg_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    try:
        if not args.skip_part1:
            result["manifest_cost"] = part1(work, args.files, env)
            print(json.dumps(result["manifest_cost"]), file=sys.stderr, flush=True)
        for mode in args.modes.split(","):
            result[f"plus_1pct_{mode}"] = part2(work, args.images, mode, env)
            print(json.dumps(result[f"plus_1pct_{mode}"]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
