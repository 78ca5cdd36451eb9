"""ResNet18 feature extractor: weights resolution, preprocessing, batched embedding.

The embedding *fingerprint* (backbone, weights and their hash, preprocessing, size,
precision, library versions) is stored in the Parquet schema metadata so a model
trained on one embedding can refuse vectors made by another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import PipelineError, WeightsError
from .io import atomic_path, log, sha256_file

EMBED_DIM = 512
# Numeric paths (the fingerprint's ``kernels``). oneDNN picks its convolution kernels per
# CPU, and its FMA-less AVX/SSE4.1 kernels round differently from its AVX2 and AVX-512
# ones. CANONICAL_CPU caps it at AVX512_CORE: AVX-512 CPUs run its avx512_core kernels,
# AVX2 CPUs its avx2 kernels, and the two give the same bits for every ResNet18
# convolution (measured at 64-224 px, batch 4-64, 1-16 threads; asserted on every AVX-512
# machine by tests/test_canonical.py), whatever the MKL or OpenBLAS settings. Rejected:
# NNPACK (torch's choice with oneDNN off) sizes its channel blocks by the L1 cache, so a
# 32 KiB-L1 CPU sums in another order than a 48 KiB one; im2col + MKL SGEMM in MKL's
# reproducible mode is exact but 7.5x slower; a cap at AVX2 everywhere costs 1.6x on
# AVX-512 CPUs for the same bits. CUDA and bf16 are never bit-identical across devices:
# they get their own value, so a model refuses vectors made on another numeric path.
CANONICAL_CPU = "cpu-onednn-fma"
CANONICAL_ONEDNN_ISA = "AVX512_CORE"
FMA_ONEDNN_ISAS = ("AVX2", "AVX512_CORE")  # the kernel families CANONICAL_CPU admits
KERNELS = ("canonical", "fast")
# `weights: ssl` = the backbone written by the pretrain stage (triage/pretrain.py).
SSL_CHECKPOINT = Path("data/pretrain/backbone.pt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = "grey(L, alpha on black, 16-bit rescaled) -> resize {s}x{s} bilinear -> 3ch -> imagenet mean/std"
EMBEDDING_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("label", pa.string()),
    ("vector", pa.list_(pa.float32(), EMBED_DIM)),
])


# --------------------------------------------------------------------------- weights
def imagenet_weights_file():
    """(weights enum, expected cache path) for torchvision's ResNet18 ImageNet weights."""
    import torch
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    name = os.path.basename(weights.url)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / name


def load_imagenet_state_dict() -> tuple[dict, str]:
    """State dict via torchvision's own mechanism (torch hub cache, TORCH_HOME)."""
    weights, cached = imagenet_weights_file()
    try:
        # Uses the cached file when present; otherwise tries to download it.
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, hash mismatch, ...
        raise WeightsError(
            f"embed.weights=imagenet: cannot load {cached.name} ({type(exc).__name__}: {exc}).\n"
            f"  This machine may be offline. Either:\n"
            f"  1. download {weights.url} elsewhere and place it at {cached}\n"
            f"     (the torch hub cache; set TORCH_HOME to move it), or\n"
            f"  2. copy it into the repo, `dvc add` it, and set embed.weights: <that path>\n"
            f"     (optionally embed.weights_sha256: <sha256 of the file>)."
        ) from None
    return state, sha256_file(cached) if cached.is_file() else ""


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """Load a ResNet18 state dict from a file safely (``weights_only=True``), hash-checked."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"embed.weights: file not found: {path}")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise WeightsError(f"embed.weights: sha256 of {path} is {digest}, "
                           f"expected embed.weights_sha256={expected_sha256}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle with code, ...
        raise WeightsError(f"embed.weights: {path} is not a loadable weights-only checkpoint "
                           f"(truncated or unsafe?): {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise WeightsError(f"embed.weights: {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, digest


def resolve_ssl_checkpoint(ssl_checkpoint: str | Path = SSL_CHECKPOINT) -> Path:
    """Path of the self-supervised backbone, with a clear error when it was not made."""
    path = Path(ssl_checkpoint)
    if not path.is_file():
        raise WeightsError(
            f"weights=ssl: the self-supervised checkpoint {path} does not exist. Run the "
            f"pretrain stage first: set pretrain.enabled: true and `dvc repro pretrain` "
            f"(or `dvc exp run -S pretrain.enabled=true`).")
    return path


def check_weights_dependency(weights: str, key: str, weights_dir: str | Path = "data/weights"
                             ) -> None:
    """A weights *file* must live under data/weights/ (a declared stage dependency), so a
    change to it re-runs the stage; ``random``, ``imagenet`` and ``ssl`` need no file."""
    if weights in ("random", "imagenet", "ssl"):
        return
    if Path(weights_dir).resolve() not in Path(weights).resolve().parents:
        raise PipelineError(f"{key}: put the weights file under {weights_dir}/ (a dependency "
                            f"of this stage, tracked with `dvc add`); got {weights}")


def build_backbone(weights: str, *, seed: int = 0, weights_sha256: str | None = None,
                   ssl_checkpoint: str | Path = SSL_CHECKPOINT):
    """ResNet18 with ``fc`` replaced by identity → 512-d pooled features, in eval mode.

    ``weights``: ``random`` (seeded), ``imagenet``, ``ssl`` (the pretrain stage's
    checkpoint, ``ssl_checkpoint``) or a path to a state dict.
    Returns (model, weights_info) where weights_info says what was loaded.
    """
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(seed)  # makes `random` weights reproducible; harmless otherwise
    model = resnet18(weights=None)
    if weights == "random":
        info = {"weights": "random", "weights_seed": seed, "weights_sha256": ""}
    else:
        if weights == "imagenet":
            state, digest = load_imagenet_state_dict()
            info = {"weights": "imagenet:IMAGENET1K_V1", "weights_sha256": digest}
        elif weights == "ssl":
            path = resolve_ssl_checkpoint(ssl_checkpoint)
            state, digest = load_checkpoint(path, weights_sha256)
            info = {"weights": f"ssl:{path.as_posix()}", "weights_sha256": digest}
        else:
            state, digest = load_checkpoint(weights, weights_sha256)
            info = {"weights": Path(weights).as_posix(), "weights_sha256": digest}
        # The classifier head is irrelevant (removed) and may have another class count.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        check_shapes(model, state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"embed.weights: {weights} is not a ResNet18 state dict "
                f"(missing {len(missing)} keys e.g. {missing[:3]}, unexpected {len(unexpected)} "
                f"e.g. {unexpected[:3]})")
    model.fc = torch.nn.Identity()
    model.eval()
    return model, info


def check_shapes(model, state: dict) -> None:
    """Explain shape mismatches (a same-named key from another architecture)."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise WeightsError(f"embed.weights: tensor shapes differ from ResNet18 for {bad[:3]}")


# --------------------------------------------------------------------------- data
class ImageDataset:
    """Map-style dataset: decode + greyscale + resize in DataLoader workers (uint8 out)."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        from .images import load_grey

        grey = load_grey(self.paths[i], self.image_size)
        return torch.from_numpy(np.asarray(grey, dtype=np.uint8).copy())


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("embed.device=cuda but no CUDA device is available (use auto or cpu)")
    return device


def bf16_is_fast(device: str) -> bool:
    """bf16 pays off on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX); elsewhere
    CPU autocast emulates it and is several times *slower* than fp32."""
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def fuse_batchnorm(model):
    """Fold every eval-mode BatchNorm into the preceding conv (fewer passes over memory).

    Inference-only and exact up to float rounding; the fingerprint records it.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.conv1 = fuse_conv_bn_eval(model.conv1, model.bn1)
    model.bn1 = torch.nn.Identity()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
            block.bn1 = torch.nn.Identity()
            block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
            block.bn2 = torch.nn.Identity()
            if block.downsample is not None:
                block.downsample = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
    return model


# The ONEDNN_MAX_CPU_ISA this process's oneDNN was started with by an Embedder (it is read
# once, at oneDNN's first primitive; a process that ran oneDNN before triage's first
# embedder keeps what it had: stages, the CLI and the API embed in a fresh process).
_onednn_started_with: str | None = None


def resolve_kernels(kernels: str, device: str, precision: str) -> str:
    """The numeric path this embedder uses (recorded in the fingerprint)."""
    if device == "cuda":
        return f"cuda-{precision}"
    if kernels != "canonical" or precision != "fp32":
        return f"cpu-onednn-{precision}"
    return CANONICAL_CPU


def start_onednn(canonical: bool, check: bool = True) -> None:
    """Cap oneDNN's kernels for canonical embeddings, before its first use in the process,
    then check them against :data:`CANONICAL_KNOWN_ANSWER`."""
    global _onednn_started_with
    if _onednn_started_with is None:
        if canonical:
            import torch

            if not torch.cpu._is_avx2_supported():
                raise PipelineError(
                    "embed.kernels: canonical needs an x86-64 CPU with AVX2 (the kernels that "
                    "define the canonical bits); this CPU has none. Use embed.kernels: fast "
                    "(vectors then depend on the CPU and the fingerprint says so).")
            # TRIAGE_ONEDNN_ISA=AVX2 runs the other admitted family on an AVX-512 CPU: how
            # the tests check, on one machine, that an AVX2 CPU gets the same bits
            isa = os.environ.get("TRIAGE_ONEDNN_ISA", CANONICAL_ONEDNN_ISA).upper()
            if isa not in FMA_ONEDNN_ISAS:
                raise PipelineError(f"TRIAGE_ONEDNN_ISA={isa}: canonical embeddings admit "
                                    f"only {FMA_ONEDNN_ISAS}")
            inherited = os.environ.get("ONEDNN_MAX_CPU_ISA")
            if inherited and inherited.upper() not in FMA_ONEDNN_ISAS:
                log.warning("embed: ONEDNN_MAX_CPU_ISA=%s ignored: canonical embeddings cap "
                            "oneDNN at %s (embed.kernels: fast honours it)", inherited, isa)
            os.environ["ONEDNN_MAX_CPU_ISA"] = isa
            if check:
                check_canonical_kernels()
        _onednn_started_with = os.environ.get("ONEDNN_MAX_CPU_ISA", "native").upper()
    elif canonical and _onednn_started_with not in FMA_ONEDNN_ISAS:
        raise PipelineError(
            f"embed.kernels: canonical: oneDNN already runs with ONEDNN_MAX_CPU_ISA="
            f"{_onednn_started_with} in this process (it is fixed at its first use); embed "
            f"in a new process")


# Known answer of the canonical kernels (sha256 prefix of kernel_self_test()'s output) per
# torch build: a process whose oneDNN was started before the cap, or a CPU whose kernels
# sum in another order, fails it loudly instead of writing other bits under the same
# fingerprint. Re-measure when torch's pin changes (`python -c "import triage.embed as e;
# e.start_onednn(True, check=False); print(e.kernel_self_test())"` in a fresh process).
CANONICAL_KNOWN_ANSWER = {"2.14.1+cu130": "10d28d40bbb83dda"}


def kernel_self_test() -> str:
    """sha256 prefix of a seeded ResNet18 (fused, channels-last) on a seeded 4x3x64x64
    batch: every convolution kind the embedder runs, through the kernels oneDNN uses now."""
    import torch
    from torchvision.models import resnet18

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model = fuse_batchnorm(model.eval()).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(x.contiguous(memory_format=torch.channels_last))
    return hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16]


def check_canonical_kernels() -> None:
    """Refuse to embed canonically when oneDNN's kernels here do not give the known bits."""
    import torch

    expected = CANONICAL_KNOWN_ANSWER.get(torch.__version__)
    if expected is None:
        log.warning("embed: no known answer of the canonical kernels for torch %s: their bits "
                    "are not checked (the pinned torch is in requirements.txt)", torch.__version__)
        return
    got = kernel_self_test()
    if got != expected:
        raise PipelineError(
            f"embed.kernels: canonical: oneDNN's kernels in this process do not give the "
            f"canonical bits (self-test {got}, expected {expected}). Either oneDNN was started "
            f"before the embedder could cap it (torch ran a convolution earlier in this "
            f"process: embed in a fresh process) or this CPU's kernels differ (report it, with "
            f"the CPU model). embed.kernels: fast embeds anyway, with CPU-dependent vectors.")


def fingerprint(weights_info: dict, image_size: int, precision: str,
                kernels: str = CANONICAL_CPU) -> dict:
    import torch
    import torchvision

    fp = {
        "backbone": "resnet18",
        **weights_info,
        "preprocess": PREPROCESS.format(s=image_size),
        "image_size": image_size,
        "precision": precision,
        "kernels": kernels,
        "fused_batchnorm": True,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    fp["fingerprint"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


class Embedder:
    """Batched ResNet18 embedding (scikit-learn style ``transform`` over image paths)."""

    def __init__(self, weights: str = "random", *, seed: int = 0, weights_sha256: str | None = None,
                 image_size: int = 224, batch_size: int = 64, num_workers: int = 0,
                 device: str = "auto", precision: str = "fp32", kernels: str = "canonical"):
        self.weights, self.seed, self.weights_sha256 = weights, seed, weights_sha256
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers, self.device, self.precision = num_workers, device, precision
        self.kernels = kernels

    def fit(self, paths=None, y=None):
        import torch

        self.device_ = resolve_device(self.device)
        if self.kernels not in KERNELS:
            raise PipelineError(f"embed.kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.device_ == "cpu":
            # before anything asks oneDNN (even about bf16): its ISA is fixed at first use
            start_onednn(self.kernels == "canonical" and self.precision != "bf16")
        if self.device_ == "cpu" and self.kernels == "canonical" and self.precision == "auto":
            self.precision_ = "fp32"  # canonical is fp32: `auto` would be bf16 on some CPUs only
        else:
            self.precision_ = resolve_precision(self.precision, self.device_)
        self.kernels_ = resolve_kernels(self.kernels, self.device_, self.precision_)
        model, info = build_backbone(self.weights, seed=self.seed,
                                     weights_sha256=self.weights_sha256)
        self.model_ = fuse_batchnorm(model).to(self.device_).to(memory_format=torch.channels_last)
        self.fingerprint_ = fingerprint(info, self.image_size, self.precision_, self.kernels_)
        return self

    def iter_batches(self, paths: list[str]) -> Iterator[np.ndarray]:
        """Yield float32 (batch, 512) arrays in input order."""
        import torch
        from torch.utils.data import DataLoader

        workers = (os.cpu_count() or 1) if self.num_workers < 0 else self.num_workers
        loader = DataLoader(ImageDataset(paths, self.image_size), batch_size=self.batch_size,
                            shuffle=False, num_workers=workers,
                            persistent_workers=False, pin_memory=self.device_ == "cuda")
        mean = torch.tensor(IMAGENET_MEAN, device=self.device_).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device_).view(1, 3, 1, 1)
        dtype = torch.bfloat16 if self.precision_ == "bf16" else None
        with torch.inference_mode():
            for batch in loader:
                n = len(batch)
                if n < self.batch_size:
                    # Pad the last batch to full size: CPU kernels may pick another
                    # algorithm for other batch shapes (batch 1 differs in the last bits),
                    # and a vector must not depend on which images shared its batch, or
                    # incremental runs would not reproduce a fresh run byte for byte.
                    pad = batch[-1:].expand(self.batch_size - n, *batch.shape[1:])
                    batch = torch.cat([batch, pad])
                x = batch.to(self.device_, non_blocking=True).unsqueeze(1).float().div_(255.0)
                x = ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous(
                    memory_format=torch.channels_last)
                with torch.autocast(self.device_, dtype=dtype, enabled=dtype is not None):
                    out = self.model_(x)
                yield out[:n].float().cpu().numpy()

    def transform(self, paths: list[str]) -> np.ndarray:
        chunks = list(self.iter_batches(paths))
        return np.concatenate(chunks) if chunks else np.zeros((0, EMBED_DIM), np.float32)


def load_reusable(path: str | Path, fingerprint: str) -> dict[str, np.ndarray]:
    """Vectors of a previous run keyed by image id, if made with the same fingerprint.

    Anything unreadable (missing, truncated, other fingerprint) means "reuse nothing":
    the store is an optimisation, never a source of truth.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        rows, X, fp = read_embeddings(path)
    except Exception as exc:  # noqa: BLE001 - a corrupt cache must not stop the stage
        log.warning("embed: ignoring unreadable previous embeddings (%s)", type(exc).__name__)
        return {}
    if fp.get("fingerprint") != fingerprint:
        log.info("embed: embedding fingerprint changed: recomputing every image")
        return {}
    return dict(zip(rows["id"], X))


def write_embeddings(embedder: Embedder, rows: pd.DataFrame, path: str | Path,
                     reuse: dict[str, np.ndarray] | None = None,
                     rows_per_group: int = 1024) -> tuple[int, int]:
    """Stream embeddings of ``rows`` (id, path, split, label) into Parquet, atomically.

    Vectors found in ``reuse`` (by image id) are copied, the others computed. Row groups
    have a fixed size and are flushed as they fill, so memory does not grow with the
    stock and the bytes do not depend on which vectors were reused. Returns
    (n_computed, n_reused).
    """
    reuse = reuse or {}
    meta = {b"embedding_fingerprint": json.dumps(embedder.fingerprint_, sort_keys=True).encode()}
    schema = EMBEDDING_SCHEMA.with_metadata(meta)
    todo = ~rows["id"].isin(reuse.keys()).to_numpy()
    computed = (v for batch in embedder.iter_batches(rows.loc[todo, "path"].tolist())
                for v in batch)
    n_new = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, len(rows), rows_per_group):
                part = rows.iloc[start:start + rows_per_group]
                block = np.empty((len(part), EMBED_DIM), np.float32)
                for i, (rid, new) in enumerate(zip(part["id"], todo[start:start + len(part)])):
                    if new:
                        block[i] = next(computed)
                        n_new += 1
                    else:
                        block[i] = reuse[rid]
                flat = pa.array(block.reshape(-1), type=pa.float32())
                writer.write_table(pa.Table.from_arrays([
                    pa.array(part["id"], pa.string(), from_pandas=True),
                    pa.array(part["split"], pa.string(), from_pandas=True),
                    pa.array(part["label"], pa.string(), from_pandas=True),  # NaN → null
                    pa.FixedSizeListArray.from_arrays(flat, EMBED_DIM),
                ], schema=schema))
        if next(computed, None) is not None or n_new != int(todo.sum()):
            raise PipelineError("embed: computed vectors do not match the images to embed")
    return n_new, len(rows) - n_new


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(rows without vectors, (n, 512) float32 matrix, fingerprint dict)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"embeddings not found: {path} (run `dvc repro embed`)")
    table = pq.read_table(path)
    vec = table.column("vector").combine_chunks()
    X = vec.values.to_numpy().reshape(len(table), EMBED_DIM).astype(np.float32, copy=False)
    rows = table.drop(["vector"]).to_pandas()
    meta = table.schema.metadata or {}
    fp = json.loads(meta.get(b"embedding_fingerprint", b"{}"))
    return rows, X, fp
