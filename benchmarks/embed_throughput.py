"""Embedding throughput: the pipeline's Embedder against the model-only limit and a naive loop, one run.

Three measurements on the same images, same CPU, same process:

- **model-only limit**: the pipeline's own model (an Embedder fitted with the pipeline
  side's settings: same weights, precision, ``embed.kernels`` mode and oneDNN ISA cap,
  fused BatchNorm, channels-last, batch size, image size, torch threads; padded last
  batch) run forward over input tensors decoded and normalised beforehand, already in
  memory: no read, no decode, no I/O, after a warm-up batch. No end-to-end embedder can
  beat it on this CPU; its vectors are checked to be the pipeline's, bit for bit.
- **pipeline**: ``Embedder`` + ``write_embeddings`` end to end (fit, read + decode + resize
  in DataLoader workers, forward, write Parquet).
- **naive**: what one writes first, also end to end: PIL per image in the main process,
  torchvision transforms, fp32, contiguous memory, ``torch.no_grad``, same batch size and
  the same (seeded random) ResNet18 weights.

With ``--rounds R`` each round runs the three in turn and each figure is the best of the
R rounds. Prints the CPU (model, AVX-512) and the precision and kernels the pipeline
picked first, then img/s of each, the end-to-end throughput as a share of the model-only
limit (``... of model-only limit 0.NN``) and, last, ``speedup X.XXx`` (pipeline vs naive).
Ratios measured side by side in one run are meaningful on a noisy shared machine;
absolute img/s are not.

    python benchmarks/embed_throughput.py                 # speed, last line "speedup X.XXx"
    python benchmarks/embed_throughput.py --rss 10000 50000   # peak RSS vs number of images
    python benchmarks/embed_throughput.py --compare-precision # bf16 vs fp32 vectors and AUC

Images: the first N of ../shared/datasets/brain_mri_4class when present (real JPEGs),
else synthetic demo PNGs written to a temp dir. Needs ``triage`` importable
(``pip install -e .``, or ``PYTHONPATH=<repo root>``).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from triage.checkout import require_own_checkout

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "datasets" / "brain_mri_4class" / "Training"


def pick_images(n: int, tmp: Path) -> tuple[list[str], str]:
    if SHARED.is_dir():
        paths = sorted(str(p) for p in SHARED.rglob("*.jpg"))[:n]
        if len(paths) == n:
            return paths, f"brain_mri_4class (first {n} JPEGs, 224 px)"
    from triage.demo import generate_demo

    generate_demo(tmp / "demo", n_labeled=4, n_unlabeled=n, n_test=4, image_size=256, seed=0)
    return sorted(str(p) for p in (tmp / "demo" / "unlabeled").glob("*.png"))[:n], \
        f"synthetic demo PNGs ({n}, 256 px)"


def naive_embed(paths: list[str], image_size: int, batch_size: int, seed: int, out: Path) -> None:
    """Reference loop: the obvious implementation, kept deliberately plain."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model.eval()
    tf = transforms.Compose([
        transforms.Grayscale(num_output_channels=3),
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    vectors = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([tf(Image.open(p)) for p in paths[i:i + batch_size]])
            vectors.append(model(batch).numpy())
    X = np.concatenate(vectors)
    pd.DataFrame({"id": [str(i) for i in range(len(X))], "vector": list(X)}).to_parquet(out)


def make_embedder(image_size: int, batch_size: int, seed: int, precision: str = "auto",
                  workers: int = -1, kernels: str = "canonical"):
    """The pipeline side's Embedder, fitted (the first fit in a process fixes oneDNN's ISA)."""
    from triage.embed import Embedder

    return Embedder("random", seed=seed, image_size=image_size, batch_size=batch_size,
                    num_workers=workers, precision=precision, kernels=kernels).fit()


def fast_embed(paths: list[str], image_size: int, batch_size: int, seed: int, out: Path,
               precision: str = "auto", workers: int = -1, kernels: str = "canonical") -> dict:
    from triage.store import write_embeddings

    emb = make_embedder(image_size, batch_size, seed, precision, workers, kernels)
    rows = pd.DataFrame({"id": [str(i) for i in range(len(paths))], "path": paths,
                         "split": "unlabeled", "label": None})
    write_embeddings(rows, out, fingerprint=emb.fingerprint_, compute=emb.iter_batches)
    return emb.fingerprint_


def model_inputs(emb, paths: list[str]) -> list:
    """The batches ``emb.iter_batches`` feeds its model, made in advance (untimed): decoded
    by the pipeline's own dataset, last batch padded, normalised, channels-last, on the
    embedder's device."""
    import torch
    from torch.utils.data import DataLoader

    from triage.backbone import IMAGENET_MEAN, IMAGENET_STD
    from triage.embed import ImageDataset

    loader = DataLoader(ImageDataset(paths, emb.image_size), batch_size=emb.batch_size,
                        shuffle=False, num_workers=os.cpu_count() or 1)
    mean = torch.tensor(IMAGENET_MEAN, device=emb.device_).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=emb.device_).view(1, 3, 1, 1)
    batches = []
    with torch.inference_mode():
        for batch in loader:
            if len(batch) < emb.batch_size:
                pad = batch[-1:].expand(emb.batch_size - len(batch), *batch.shape[1:])
                batch = torch.cat([batch, pad])
            x = batch.to(emb.device_).unsqueeze(1).float().div_(255.0)
            batches.append(((x.expand(-1, 3, -1, -1) - mean) / std).contiguous(
                memory_format=torch.channels_last))
    return batches


def model_only(emb, batches: list, n: int) -> tuple[float, np.ndarray]:
    """Seconds for the forward passes of ``emb``'s model over ``batches`` (as in
    ``Embedder.iter_batches``: inference mode, its autocast), and the first ``n`` vectors."""
    import torch

    dtype = torch.bfloat16 if emb.precision_ == "bf16" else None
    sync = torch.cuda.synchronize if emb.device_ == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(emb.device_, dtype=dtype,
                                                enabled=dtype is not None):
        emb.model_(batches[0])  # warm-up batch
        sync()
        start = time.perf_counter()
        outs = [emb.model_(x) for x in batches]
        sync()
        secs = time.perf_counter() - start
    return secs, torch.cat(outs)[:n].float().cpu().numpy()


def timed(fn, *args, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    res = fn(*args, **kw)
    return time.perf_counter() - start, res


def cpu_line() -> str:
    """CPU model and vector extensions, from /proc/cpuinfo (asks oneDNN nothing: its ISA is
    fixed at its first use, by the first Embedder)."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and name is None:
                name = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return (f"cpu: {name}; AVX-512 {'yes' if 'avx512f' in flags else 'no'}, "
            f"AVX2 {'yes' if 'avx2' in flags else 'no'}, native bf16 {'yes' if bf16 else 'no'}; "
            f"{os.cpu_count()} cores")


def speed(args) -> None:
    import torch

    from triage.store import read_embeddings

    workers = (os.cpu_count() or 1) if args.workers < 0 else args.workers
    print(cpu_line())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths, what = pick_images(args.n, tmp)
        n = len(paths)
        # Warm-up both end-to-end paths (first-call allocations, file cache) on one batch,
        # the pipeline first: it fixes oneDNN's kernels for the process (embed.kernels), so
        # the naive loop then runs the same convolution kernels
        fp = fast_embed(paths[:args.batch_size], args.image_size, args.batch_size, 0,
                        tmp / "w2.parquet", precision=args.precision, workers=workers,
                        kernels=args.kernels)
        naive_embed(paths[:args.batch_size], args.image_size, args.batch_size, 0, tmp / "w1.parquet")
        # the model-only side: an embedder with the pipeline's settings, inputs made now
        emb = make_embedder(args.image_size, args.batch_size, 0, args.precision, workers,
                            args.kernels)
        if emb.fingerprint_ != fp:
            raise SystemExit("model-only embedder differs from the pipeline's: "
                             f"{emb.fingerprint_} vs {fp}")
        batches = model_inputs(emb, paths)
        print(f"pipeline: precision {fp['precision']} (asked {args.precision}), kernels "
              f"{args.kernels} -> {fp['kernels']}, oneDNN ISA cap "
              f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'none (native)')}, fused BatchNorm, "
              f"channels-last, device {emb.device_}")
        print(f"images: {what}; image_size {args.image_size}, batch {args.batch_size}, "
              f"torch threads {torch.get_num_threads()}, decode workers {workers}, "
              f"rounds {args.rounds} (best of)")
        t_model = t_fast = t_naive = float("inf")
        shares = []  # per round: noise on a shared machine shows as their spread
        for _ in range(args.rounds):
            secs_model, X_model = model_only(emb, batches, n)
            t_model = min(t_model, secs_model)
            secs, _ = timed(fast_embed, paths, args.image_size, args.batch_size, 0,
                            tmp / "fast.parquet", precision=args.precision, workers=workers,
                            kernels=args.kernels)
            t_fast = min(t_fast, secs)
            shares.append(secs_model / secs)
            secs, _ = timed(naive_embed, paths, args.image_size, args.batch_size, 0,
                            tmp / "naive.parquet")
            t_naive = min(t_naive, secs)
        naive = np.stack(pd.read_parquet(tmp / "naive.parquet")["vector"].to_numpy())
        _, fast, _ = read_embeddings(tmp / "fast.parquet")
        cos = (naive * fast).sum(1) / (np.linalg.norm(naive, axis=1) * np.linalg.norm(fast, axis=1))
        same = np.array_equal(X_model, fast)
        limit, e2e = n / t_model, n / t_fast
        print(f"model-only: {limit:7.1f} img/s ({t_model:.1f} s) forward only, inputs in memory")
        print(f"pipeline  : {e2e:7.1f} img/s ({t_fast:.1f} s) end to end")
        print(f"naive     : {n / t_naive:7.1f} img/s ({t_naive:.1f} s) end to end")
        print(f"vectors: mean cosine(naive, pipeline) = {cos.mean():.5f} (min {cos.min():.5f}); "
              f"model-only = pipeline bit for bit: "
              f"{'yes' if same else f'NO (max |diff| {np.abs(X_model - fast).max():.3g})'}")
        print(f"machine load (1-min average): {load_before:.2f} before, "
              f"{os.getloadavg()[0]:.2f} after; share by round: "
              + " ".join(f"{share:.2f}" for share in shares))
        print(f"end-to-end {e2e:.1f} img/s vs model-only {limit:.1f} img/s: share "
              f"of model-only limit {t_model / t_fast:.2f}")
        print(f"speedup {t_naive / t_fast:.2f}x")


RSS_CHILD = """
import resource
import pandas as pd
from triage.embed import Embedder
from triage.store import write_embeddings
rows = pd.read_parquet({rows!r})
emb = Embedder("random", seed=0, image_size={size}, batch_size=64, num_workers=-1).fit()
write_embeddings(rows, {out!r}, fingerprint=emb.fingerprint_, compute=emb.iter_batches)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def rss(args) -> None:
    """Peak RSS of the embed step for several stock sizes (small images: memory, not speed)."""
    from PIL import Image

    size = 32
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rng = np.random.default_rng(0)
        biggest = max(args.rss)
        (tmp / "img").mkdir()
        paths = []
        for i in range(biggest):
            p = tmp / "img" / f"{i:06d}.png"
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(p)
            paths.append(str(p))
        for n in args.rss:
            rows = pd.DataFrame({"id": [f"{i:06d}" for i in range(n)], "path": paths[:n],
                                 "split": "unlabeled", "label": None})
            rows.to_parquet(tmp / "rows.parquet")
            code = RSS_CHILD.format(rows=str(tmp / "rows.parquet"), size=size,
                                    out=str(tmp / "out.parquet"))
            start = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True)
            kb = int(res.stdout.strip().splitlines()[-1])
            print(f"{n:>7} images: peak RSS {kb / 1024:7.1f} MiB "
                  f"({time.perf_counter() - start:.0f} s)")


def precision_compare(args) -> None:
    """bf16 vs fp32 on the demo's labelled + test images: vector cosine and test ROC-AUC."""
    from sklearn.metrics import roc_auc_score

    from triage.demo import generate_demo
    from triage.models import fit_weighted, make_classifier, positive_proba

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "demo"
        generate_demo(root, n_labeled=100, n_unlabeled=0, n_test=300, seed=0, workers=2)
        files = sorted(root.rglob("*.png"))
        paths = [str(p) for p in files]
        split = np.array([p.relative_to(root).parts[0] for p in files])
        label = np.array([p.parent.name for p in files])
        vec, secs = {}, {}
        for prec in ("fp32", "bf16"):
            from triage.embed import Embedder

            # kernels fast: bf16 needs oneDNN's native-bf16 kernels (not the AVX2 pin)
            emb = Embedder("random", seed=42, image_size=128, batch_size=64, precision=prec,
                           kernels="fast").fit()
            secs[prec], vec[prec] = timed(emb.transform, paths)
        a, b = vec["fp32"], vec["bf16"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        lab, test = split == "labeled", split == "test"
        y = (label[test] == "cancer").astype(int)
        auc = {}
        for prec, X in vec.items():
            model = fit_weighted(make_classifier("logreg", C=0.1), X[lab], label[lab])
            auc[prec] = roc_auc_score(y, positive_proba(model, X[test], "cancer"))
        print(f"bf16 native on this CPU: {__import__('torch').ops.mkldnn._is_mkldnn_bf16_supported()}")
        for prec in ("fp32", "bf16"):
            print(f"{prec}: {len(paths) / secs[prec]:6.1f} img/s, baseline test ROC-AUC {auc[prec]:.4f}")
        print(f"mean cosine(fp32, bf16) = {cos.mean():.5f} (min {cos.min():.5f}); "
              f"AUC difference bf16 - fp32 = {auc['bf16'] - auc['fp32']:+.4f}")


def main() -> None:
    require_own_checkout(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="images for the speed comparison")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--kernels", default="canonical", choices=["canonical", "fast"],
                    help="embed.kernels of the pipeline side (canonical: oneDNN pinned to AVX2)")
    ap.add_argument("--workers", type=int, default=-1,
                    help="decode workers of the pipeline side (embed.num_workers; -1: all cores)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of model-only, pipeline, naive; each figure is the best round "
                         "(the model-only inputs stay in memory: 0.6 MB per image at 224 px)")
    ap.add_argument("--rss", type=int, nargs="*", help="measure peak RSS at these stock sizes")
    ap.add_argument("--compare-precision", action="store_true",
                    help="bf16 vs fp32: vector cosine and downstream AUC on the demo")
    args = ap.parse_args()
    if args.compare_precision:
        precision_compare(args)
    elif args.rss:
        rss(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
