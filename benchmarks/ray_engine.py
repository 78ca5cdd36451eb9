"""embed.engine: local vs ray (1 and 2 CPU actors), side by side in one run.

    python benchmarks/ray_engine.py [--n 768] [--image-size 128] [--batch-size 64]
    python benchmarks/ray_engine.py --prepare-qc [--root DIR] [--n 3000]

The first ``--n`` images of the demo's clean manifest (data/qc/manifest_clean.parquet, the
pipeline's own images) go through the embed stage's compute path three ways: the local
engine (Embedder.iter_batches, embed.num_workers: -1 = all cores), and Ray Data
(triage.ray_engine.compute_fn) with an actor pool of at most 1 and of at most 2 CPU actors,
on a local Ray started with ``num_cpus`` = the machine's cores. Reported: throughput (img/s,
Ray's start-up excluded and timed on its own; the actors' model build included), scaling
efficiency (2 actors vs 1: speed-up / 2), peak RSS of the driver alone and of the driver
plus every process under it (DataLoader workers; Ray's GCS, raylet and workers: a sum of
RSS, so shared pages count more than once: an upper bound), and whether each run's vectors
are byte-identical to the local engine's. Nothing is written to the repository.

``--prepare-qc``: the same engines for the prepare and qc stages' per-file work, on ``--n``
image files under ``--root`` (default: the shared brain-MRI set, /work/shared/datasets; read
in place, never copied): prepare's read + sha256 + header (triage.prepare.scan_file; local =
the stage's loop, one file after the other) and qc's full decode (triage.qc.inspect_image;
local = inspect_all's process pool, qc.workers: 0 = all cores), each against Ray tasks
(triage.ray_tasks.map_ordered, batches of MAP_BATCH, a local Ray on all cores). The files
are read once before the timings (warm page cache for every row); ray.init is timed on its
own, and so is the start of Ray's worker processes (a first map of a few hundred numbers).
"same results": every file's result equal to the local engine's.
"""
from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class PeakRSS:
    """Samples the RSS of this process and of all its descendants every 50 ms."""

    def __init__(self):
        self.me = psutil.Process()
        self.driver = self.total = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            try:
                driver = self.me.memory_info().rss
                total = driver
                for child in self.me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.driver, self.total = max(self.driver, driver), max(self.total, total)
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(compute, paths):
    with PeakRSS() as rss:
        start = time.perf_counter()
        vectors = np.concatenate(list(compute(paths)))
        seconds = time.perf_counter() - start
    return vectors, seconds, rss


SHARED_IMAGES = ROOT.parent / "shared" / "datasets" / "brain_mri_4class"


def timed_list(fn):
    with PeakRSS() as rss:
        start = time.perf_counter()
        out = list(fn())
        seconds = time.perf_counter() - start
    return out, seconds, rss


def prepare_qc(root: Path, n: int) -> None:
    from functools import partial

    from triage.prepare import scan_file
    from triage.qc import inspect_all, inspect_image
    from triage.ray_tasks import MAP_BATCH, map_ordered, session

    if not root.is_dir():
        print(f"skipped: no images at {root} (--root)")
        return
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"))
    step = max(1, len(files) // n)  # spread over the classes, not the first folder's
    paths = files[::step][:n]
    for p in paths:  # warm page cache: every row reads from memory, none from the disk
        p.read_bytes()
    scan = partial(scan_file, root=root)
    decode = partial(inspect_image, max_pixels=89478485, convert_modes=True)
    strs = [str(p) for p in paths]
    cores = os.cpu_count() or 1
    rows = {}
    ref_scan, s, rss = timed_list(lambda: (scan(p) for p in paths))
    rows["prepare read + sha256 + header", "local (1 process)"] = (s, rss, True)
    ref_dec, s, rss = timed_list(lambda: inspect_all(strs, 89478485, workers=0))
    rows["qc full decode", f"local ({cores} decode processes)"] = (s, rss, True)
    start = time.perf_counter()
    with session({}, cores=cores):  # a local Ray even when RAY_ADDRESS is set
        ray_start = time.perf_counter() - start
        start = time.perf_counter()  # Ray starts its worker processes on the first tasks
        list(map_ordered(abs, range(2 * cores * MAP_BATCH)))
        workers_start = time.perf_counter() - start
        out, s, rss = timed_list(lambda: map_ordered(scan, paths))
        rows["prepare read + sha256 + header", f"ray ({cores} CPUs)"] = (s, rss, out == ref_scan)
        out, s, rss = timed_list(lambda: map_ordered(decode, strs))
        rows["qc full decode", f"ray ({cores} CPUs)"] = (s, rss, out == ref_dec)
    mb = sum(p.stat().st_size for p in paths) / 2**20
    print(f"{cpu_name()}, {cores} cores; {len(paths)} files ({mb:.0f} MB) of {root.name}; "
          f"Ray tasks of {MAP_BATCH} files; ray.init {ray_start:.1f} s and the workers' start "
          f"{workers_start:.1f} s (not in the times)\n")
    print("| work | engine | s | files/s | vs local | peak RSS driver MB | peak RSS all MB "
          "| same results |")
    print("|---|---|---|---|---|---|---|---|")
    local = {}
    for (work, engine), (seconds, rss, same) in sorted(rows.items(), key=lambda kv: (
            kv[0][0] != "prepare read + sha256 + header", not kv[0][1].startswith("local"))):
        local.setdefault(work, seconds)
        print(f"| {work} | {engine} | {seconds:.2f} | {len(paths) / seconds:.0f} | "
              f"{local[work] / seconds:.2f}x | {rss.driver / 2**20:.0f} | "
              f"{rss.total / 2**20:.0f} | {'yes' if same else 'NO'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None,
                    help="images (default: 768 demo images; --prepare-qc: 3000 files)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--prepare-qc", action="store_true",
                    help="prepare's read + hash and qc's decode instead of embed")
    ap.add_argument("--root", type=Path, default=SHARED_IMAGES,
                    help="--prepare-qc: a folder of images (read in place)")
    args = ap.parse_args()
    os.chdir(ROOT)  # the manifest's paths are relative to the repository
    if args.prepare_qc:
        prepare_qc(args.root, args.n or 3000)
        return
    args.n = args.n or 768

    from triage.embed import Embedder
    from triage.ray_engine import compute_fn, session

    rows = pd.read_parquet("data/qc/manifest_clean.parquet").iloc[:args.n]
    paths = rows["path"].tolist()
    cores = os.cpu_count() or 1
    embedder = Embedder("random", seed=42, image_size=args.image_size,
                        batch_size=args.batch_size, num_workers=-1, device="cpu").fit()
    results = {}
    ref, seconds, rss = timed(embedder.iter_batches, paths)
    results["local"] = (seconds, rss, True)
    start = time.perf_counter()
    with session({}, cores=cores):  # a local Ray even when RAY_ADDRESS is set
        ray_start = time.perf_counter() - start
        for actors in (1, 2):
            vectors, seconds, rss = timed(compute_fn(embedder, actors=actors), paths)
            results[f"ray, {actors} CPU actor{'s' if actors > 1 else ''}"] = (
                seconds, rss, vectors.tobytes() == ref.tobytes())

    print(f"{cpu_name()}, {cores} cores; {len(paths)} demo images, {args.image_size} px, "
          f"batch {args.batch_size}, resnet18 random, canonical fp32; ray.init "
          f"{ray_start:.1f} s (not in the times)\n")
    local_s = results["local"][0]
    one_s = results["ray, 1 CPU actor"][0]
    print("| engine | s | img/s | vs local | peak RSS driver MB | peak RSS all MB | same bytes |")
    print("|---|---|---|---|---|---|---|")
    for name, (seconds, rss, same) in results.items():
        print(f"| {name} | {seconds:.1f} | {len(paths) / seconds:.1f} | "
              f"{local_s / seconds:.2f}x | {rss.driver / 2**20:.0f} | {rss.total / 2**20:.0f} | "
              f"{'yes' if same else 'NO'} |")
    speedup = one_s / results["ray, 2 CPU actors"][0]
    print(f"\nscaling 1 -> 2 actors: {speedup:.2f}x, efficiency {speedup / 2:.0%}")


if __name__ == "__main__":
    main()
