"""QC decode throughput on brain_mri_4class (~7k images): one process vs all cores, in one run.

    python benchmarks/qc_throughput.py [--dataset PATH] [--limit N] [--workers N]

Times triage.qc.inspect_all (full decode + greyscale + stats + pHash + histogram: the
per-image work of the qc stage) over the same files with workers=1, then with
workers=N (default: all cores), after one untimed read of every file so both runs find
the files in the page cache. Prints img/s for both; the last line is ``speedup X.XXx``.
Skips (exit 0, with a message) when the shared dataset is absent.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from triage.checkout import require_own_checkout
from triage.qc import inspect_all, resolve_workers

ROOT = Path(__file__).resolve().parents[1]

DEFAULT = ROOT.parent / "shared" / "datasets" / "brain_mri_4class"
EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def main() -> None:
    require_own_checkout(__file__)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=DEFAULT)
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    ap.add_argument("--workers", type=int, default=0, help="parallel run: 0 = all cores")
    ap.add_argument("--max-pixels", type=int, default=89_478_485)
    args = ap.parse_args()
    if not args.dataset.is_dir():
        print(f"skipped: dataset not found at {args.dataset} (needs ../shared/datasets)")
        return
    paths = sorted(str(p) for p in args.dataset.rglob("*")
                   if p.is_file() and p.suffix.lower() in EXT)
    if args.limit:
        paths = paths[: args.limit]
    n_bytes = sum(len(Path(p).read_bytes()) for p in paths)  # warm the page cache, untimed
    workers = resolve_workers(args.workers)
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(f"qc throughput: {len(paths)} images ({n_bytes / 1e6:.1f} MB) from {args.dataset.name}, "
          f"{os.cpu_count()} CPU cores")
    rates = {}
    results = {}
    for label, w in (("serial", 1), ("parallel", workers)):
        t0 = time.perf_counter()
        results[label] = inspect_all(paths, args.max_pixels, workers=w)
        dt = time.perf_counter() - t0
        rates[label] = len(paths) / dt
        print(f"{label:8s} workers={w:<3d} {dt:8.2f} s  {rates[label]:8.1f} img/s")
    if results["serial"] != results["parallel"]:
        raise SystemExit("parallel results differ from serial results")
    print(f"speedup {rates['parallel'] / rates['serial']:.2f}x")


if __name__ == "__main__":
    main()
