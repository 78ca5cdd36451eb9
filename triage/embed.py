"""ResNet18 feature extractor: kernels, precision, preprocessing, batched embedding (the
weights come from triage/backbone.py, the vector store is triage/store.py).

The embedding *fingerprint* (backbone, weights and their hash, preprocessing, size,
precision, library versions) is stored in the Parquet schema metadata so a model
trained on one embedding can refuse vectors made by another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np

from .backbone import IMAGENET_MEAN, IMAGENET_STD, build_backbone, fuse_batchnorm
from .errors import PipelineError
from .io import log
from .params import spec
from .store import EMBED_DIM
from .torch_utils import resolve_device

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
KERNELS = spec("embed.kernels").choices
PREPROCESS = "grey(L, alpha on black, 16-bit rescaled) -> resize {s}x{s} bilinear -> 3ch -> imagenet mean/std"


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

    record = {
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
    # the short hash names the embedding space (models refuse vectors from another one)
    record["fingerprint"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return record


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

        self.device_ = resolve_device(self.device, "embed.device")
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
        size = (self.batch_size, 3, self.image_size, self.image_size)
        with torch.inference_mode():
            # one channels-last input buffer, normalised in place: the same bits as
            # ((x - mean) / std).contiguous(channels_last), at half the memory traffic
            x = torch.empty(size, device=self.device_).contiguous(memory_format=torch.channels_last)
            for batch in loader:
                n = len(batch)
                if n < self.batch_size:
                    # Pad the last batch to full size: CPU kernels may pick another
                    # algorithm for other batch shapes (batch 1 differs in the last bits),
                    # and a vector must not depend on which images shared its batch, or
                    # incremental runs would not reproduce a fresh run byte for byte.
                    pad = batch[-1:].expand(self.batch_size - n, *batch.shape[1:])
                    batch = torch.cat([batch, pad])
                grey = batch.to(self.device_, non_blocking=True).unsqueeze(1).float().div_(255.0)
                torch.sub(grey.expand(-1, 3, -1, -1), mean, out=x).div_(std)
                with torch.autocast(self.device_, dtype=dtype, enabled=dtype is not None):
                    out = self.model_(x)
                yield out[:n].float().cpu().numpy()

    def transform(self, paths: list[str]) -> np.ndarray:
        chunks = list(self.iter_batches(paths))
        return np.concatenate(chunks) if chunks else np.zeros((0, EMBED_DIM), np.float32)
