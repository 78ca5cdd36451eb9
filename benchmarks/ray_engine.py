"""embed.engine: local vs ray (1 and 2 CPU actors), side by side in one run.

    python benchmarks/ray_engine.py [--n 768] [--image-size 128] [--batch-size 64]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=768)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    os.chdir(ROOT)  # the manifest's paths are relative to the repository

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
