"""End-to-end embedding throughput: the pipeline's Embedder vs a naive loop, same images, one run.

Both sides do read + decode + resize + forward + write Parquet, with the same batch size
and the same (seeded random) ResNet18 weights. The naive reference is what one writes
first: PIL per image in the main process, torchvision transforms, fp32, contiguous
memory, ``torch.no_grad``. Ratios measured side by side in one run are meaningful on a
noisy shared machine; absolute img/s are not.

    python benchmarks/embed_throughput.py                 # speed, last line "speedup X.XXx"
    python benchmarks/embed_throughput.py --rss 10000 50000   # peak RSS vs number of images
    python benchmarks/embed_throughput.py --compare-precision # bf16 vs fp32 vectors and AUC

Images: the first N of ../shared/datasets/brain_mri_4class when present (real JPEGs),
else synthetic demo PNGs written to a temp dir.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

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


def fast_embed(paths: list[str], image_size: int, batch_size: int, seed: int, out: Path,
               precision: str = "auto", workers: int = -1, kernels: str = "canonical") -> dict:
    from triage.embed import Embedder, write_embeddings

    emb = Embedder("random", seed=seed, image_size=image_size, batch_size=batch_size,
                   num_workers=workers, precision=precision, kernels=kernels).fit()
    rows = pd.DataFrame({"id": [str(i) for i in range(len(paths))], "path": paths,
                         "split": "unlabeled", "label": None})
    write_embeddings(emb, rows, out)
    return emb.fingerprint_


def timed(fn, *args, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    res = fn(*args, **kw)
    return time.perf_counter() - start, res


def speed(args) -> None:
    import torch

    from triage.embed import read_embeddings

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths, what = pick_images(args.n, tmp)
        print(f"images: {what}; image_size {args.image_size}, batch {args.batch_size}, "
              f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")
        # Warm-up both paths (first-call allocations, file cache) on a few images.
        # the pipeline first: it fixes oneDNN's kernels for the process (embed.kernels), so
        # both sides then run the same convolution kernels
        fast_embed(paths[:args.batch_size], args.image_size, args.batch_size, 0, tmp / "w2.parquet",
                   precision=args.precision, kernels=args.kernels)
        naive_embed(paths[:args.batch_size], args.image_size, args.batch_size, 0, tmp / "w1.parquet")
        t_naive, _ = timed(naive_embed, paths, args.image_size, args.batch_size, 0,
                           tmp / "naive.parquet")
        t_fast, fp = timed(fast_embed, paths, args.image_size, args.batch_size, 0,
                           tmp / "fast.parquet", precision=args.precision, kernels=args.kernels)
        naive = np.stack(pd.read_parquet(tmp / "naive.parquet")["vector"].to_numpy())
        _, fast, _ = read_embeddings(tmp / "fast.parquet")
        cos = (naive * fast).sum(1) / (np.linalg.norm(naive, axis=1) * np.linalg.norm(fast, axis=1))
        n = len(paths)
        print(f"naive  : {n / t_naive:7.1f} img/s ({t_naive:.1f} s)")
        print(f"fast   : {n / t_fast:7.1f} img/s ({t_fast:.1f} s) precision={fp['precision']}")
        print(f"vectors: mean cosine(naive, fast) = {cos.mean():.5f} (min {cos.min():.5f})")
        print(f"speedup {t_naive / t_fast:.2f}x")


RSS_CHILD = """
import resource, sys
sys.path.insert(0, {root!r})
import pandas as pd
from triage.embed import Embedder, write_embeddings
rows = pd.read_parquet({rows!r})
emb = Embedder("random", seed=0, image_size={size}, batch_size=64, num_workers=-1).fit()
write_embeddings(emb, rows, {out!r})
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
            code = RSS_CHILD.format(root=str(ROOT), rows=str(tmp / "rows.parquet"), size=size,
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="images for the speed comparison")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--kernels", default="canonical", choices=["canonical", "fast"],
                    help="embed.kernels of the pipeline side (canonical: oneDNN pinned to AVX2)")
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
