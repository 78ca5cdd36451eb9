"""Frozen-backbone feature extractor: kernels, precision, preprocessing, batched embedding
(the network, its weights and its preprocessing config come from triage/backbone.py, the
vector store is triage/store.py).

The embedding *fingerprint* (backbone and its library, weights and their hash,
preprocessing, size, feature dimension, precision, library versions) is stored in the
Parquet schema metadata so a model trained on one embedding can refuse vectors made by
another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np

from .backbone import (
    DEFAULT_BACKBONE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_PREFIX,
    build_backbone,
    fusable,
    fuse_batchnorm,
    pooled_layers,
    preprocessing,
    resize_plan,
    resolve_layers,
)
from .errors import ParamsError, PipelineError
from .io import log
from .params import spec
from .store import IMPLIED_BY_DEFAULT_RECORD
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
CROPS = spec("embed.crop").choices
# Batch shapes. The canonical kernels compute each image of a batch on its own: oneDNN's
# avx512_core and avx2 convolutions give an image the same bits in a batch of 2 or of 64,
# whatever its batch-mates and the thread count (measured for resnet18 at 32-224 px,
# batches 2-64, 1, 2, 7 and 16 threads; tests/test_inference.py asserts it). A batch of
# ONE is different: ATen then sends convolutions whose input holds at most 20,480 values
# (ResNet18's last blocks below ~200 px) to its own im2col + BLAS kernel instead of oneDNN
# (ConvParams::use_mkldnn: "input.size(0) > 1 || N*C*H*W > 20480"), which sums in another
# order (max |diff| ~1e-6). So a canonical resnet18 embedder runs a short batch at the
# next power of two, at least MIN_BATCH. Every other path pads to batch_size, as before:
# fast and bf16 kernels are oneDNN's per-CPU pick, CUDA's cuDNN's per-shape pick, and other
# backbones may take other routes (ATen sends 1x1 stride-1 convolutions to its own kernel
# below batch 16 on one thread; Linear layers go through a GEMM): none proven independent.
MIN_BATCH = 2


def preprocess_text(image_size: int, interpolation: str = "bilinear",
                    crop_pct: float | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> str:
    """What is done to an image, in words (the fingerprint's ``preprocess``); the default
    backbone's reads as it always has."""
    scale = resize_plan(image_size, crop_pct)
    steps = [f"resize {scale}x{scale} {interpolation}"]
    if crop_pct is not None:
        steps.append(f"center crop {image_size}x{image_size}")
    norm = ("imagenet mean/std" if (tuple(mean), tuple(std)) == (IMAGENET_MEAN, IMAGENET_STD)
            else f"mean {list(mean)} std {list(std)}")
    return " -> ".join(["grey(L, alpha on black, 16-bit rescaled)", *steps, "3ch", norm])


# --------------------------------------------------------------------------- data
def pil_resample(interpolation: str):
    from PIL import Image

    try:
        return Image.Resampling[interpolation.upper()]
    except KeyError:
        raise PipelineError(f"embed: the model's interpolation {interpolation!r} has no PIL "
                            f"equivalent") from None


class ImageDataset:
    """Map-style dataset: decode + greyscale + resize (+ the model's centre crop, with
    ``crop_pct``) in DataLoader workers (uint8 out). The whole image is squashed to a
    square, as everywhere in the project: nothing at its border is lost unless cropped."""

    def __init__(self, paths: list[str], image_size: int, interpolation: str = "bilinear",
                 crop_pct: float | None = None):
        self.paths, self.image_size = list(paths), image_size
        self.interpolation, self.crop_pct = interpolation, crop_pct

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        import torch

        from .images import load_grey

        # an index into ``paths``, or a path itself (the embedder's reusable loader samples
        # the paths of each call: its persistent workers hold no list of their own)
        grey = load_grey(i if isinstance(i, str) else self.paths[i])
        scale = resize_plan(self.image_size, self.crop_pct)
        if grey.size != (scale, scale):
            grey = grey.resize((scale, scale), pil_resample(self.interpolation))
        if scale != self.image_size:
            top = int(round((scale - self.image_size) / 2.0))
            grey = grey.crop((top, top, top + self.image_size, top + self.image_size))
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
                kernels: str = CANONICAL_CPU, *, backbone: str = DEFAULT_BACKBONE,
                feature_dim: int, preprocess, crop_pct: float | None = None,
                fused_batchnorm: bool = True, layers: tuple[str, ...] = ()) -> dict:
    """Everything that defines the vectors, and its short hash (``fingerprint``).

    ``feature_dim``: the width of the vectors; ``preprocess``: the model's
    :class:`triage.backbone.Preprocess`; ``crop_pct``: the centre crop applied (None:
    none). The default backbone's record leaves out the fields its other fields imply
    (triage.store.IMPLIED_BY_DEFAULT_RECORD), so it keeps the fingerprint it had before
    backbones were configurable.
    """
    import torch
    import torchvision

    interpolation, mean, std = preprocess.interpolation, preprocess.mean, preprocess.std
    record = {
        "backbone": backbone,
        **weights_info,
        "preprocess": preprocess_text(image_size, interpolation, crop_pct, mean, std),
        "image_size": image_size,
        "precision": precision,
        "kernels": kernels,
        "fused_batchnorm": fused_batchnorm,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    timm_backbone = backbone.startswith(TIMM_PREFIX)
    spelled = {
        "source": "timm" if timm_backbone else "torchvision",
        "feature_dim": int(feature_dim),
        "input_size": preprocess.input_size,
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "mean": list(mean),
        "std": list(std),
    }
    if layers:  # tapped stages, pooled (triage.backbone.pooled_layers); absent = final features
        record["layers"] = list(layers)
    if backbone != DEFAULT_BACKBONE or spelled != IMPLIED_BY_DEFAULT_RECORD or layers:
        record.update(spelled)
        if timm_backbone:
            import timm

            record["timm"] = timm.__version__
    # the short hash names the embedding space (models refuse vectors from another one)
    record["fingerprint"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return record


class _CallPaths:
    """Sampler of a persistent DataLoader: the paths of the current call. It is iterated in
    the main process at each new pass, so one loader (and its worker processes) serves
    every call of an embedder."""

    def __init__(self):
        self.paths: list[str] = []

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


class Embedder:
    """Batched frozen-backbone embedding (scikit-learn style ``transform`` over image paths).

    ``backbone``: a torchvision classification model or ``timm:<name>`` (embed.backbone);
    ``crop``: ``none`` (the whole image resized to ``image_size``) or ``model`` (the
    model's own centre crop); ``layers`` (embed.layers): ``final`` (the model without its
    classifier), ``auto`` or module names tapped and pooled (triage.backbone.pooled_layers).
    After ``fit``: ``layers_`` (the tapped modules; ``()`` = final), ``feature_dim_`` (read from the model by a
    forward pass), ``preprocess_`` (the model's config), ``fingerprint_`` and
    ``small_batches_`` (a short batch runs at :meth:`run_size`, not padded to
    ``batch_size``: only where that gives the same bits, see :data:`MIN_BATCH`).
    """

    def __init__(self, weights: str = "random", *, backbone: str = DEFAULT_BACKBONE,
                 seed: int = 0, weights_sha256: str | None = None, image_size: int = 224,
                 crop: str = "none", batch_size: int = 64, num_workers: int = 0,
                 device: str = "auto", precision: str = "fp32", kernels: str = "canonical",
                 layers="final"):
        self.weights, self.seed, self.weights_sha256 = weights, seed, weights_sha256
        self.layers = layers
        self.backbone, self.crop = backbone, crop
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers, self.device, self.precision = num_workers, device, precision
        self.kernels = kernels

    def fit(self, paths=None, y=None):
        import torch

        self.device_ = resolve_device(self.device, "embed.device")
        if self.kernels not in KERNELS:
            raise PipelineError(f"embed.kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.crop not in CROPS:
            raise PipelineError(f"embed.crop must be one of {CROPS}, got {self.crop!r}")
        if self.device_ == "cpu":
            # before anything asks oneDNN (even about bf16): its ISA is fixed at first use
            start_onednn(self.kernels == "canonical" and self.precision != "bf16")
        if self.device_ == "cpu" and self.kernels == "canonical" and self.precision == "auto":
            self.precision_ = "fp32"  # canonical is fp32: `auto` would be bf16 on some CPUs only
        else:
            self.precision_ = resolve_precision(self.precision, self.device_)
        self.kernels_ = resolve_kernels(self.kernels, self.device_, self.precision_)
        model, info = build_backbone(self.weights, seed=self.seed, backbone=self.backbone,
                                     weights_sha256=self.weights_sha256)
        self.preprocess_ = pre = preprocessing(self.backbone, model)
        check_image_size(self.backbone, self.image_size, pre)
        self.crop_pct_ = pre.crop_pct if self.crop == "model" else None
        fused = fusable(model)
        self.layers_ = resolve_layers(self.layers, self.weights, model)
        model = fuse_batchnorm(model)
        if self.layers_:
            model = pooled_layers(model, self.layers_, self.backbone)
        self.model_ = model.to(self.device_).to(memory_format=torch.channels_last)
        self.feature_dim_ = probe_feature_dim(self.model_, self.backbone, self.image_size,
                                              self.device_, pre)
        if self.kernels_ == CANONICAL_CPU and self.backbone != DEFAULT_BACKBONE:
            log.warning("embed: embed.kernels: canonical is measured bit-identical across "
                        "AVX2/AVX-512 CPUs for %s only; %s runs through the same capped "
                        "oneDNN, unmeasured", DEFAULT_BACKBONE, self.backbone)
        # short batches may run at a smaller shape only where that is proven to give the same
        # bits (see MIN_BATCH); elsewhere a vector could depend on its batch-mates
        self.small_batches_ = (self.kernels_ == CANONICAL_CPU and self.backbone == DEFAULT_BACKBONE)
        self._loader = None
        self.fingerprint_ = fingerprint(info, self.image_size, self.precision_, self.kernels_,
                                        backbone=self.backbone, feature_dim=self.feature_dim_,
                                        preprocess=pre, crop_pct=self.crop_pct_,
                                        fused_batchnorm=fused, layers=self.layers_)
        return self

    def run_size(self, n: int) -> int:
        """The batch shape ``n`` (<= batch_size) images are run at: batch_size, or with
        ``small_batches_`` the next power of two, at least :data:`MIN_BATCH` (the same bits:
        an image's vector does not depend on the batch it ran in)."""
        if not getattr(self, "small_batches_", False):
            return self.batch_size
        return min(self.batch_size, max(MIN_BATCH, 1 << (max(n, 1) - 1).bit_length()))

    def _batches(self, paths: list[str]):
        """uint8 (n, H, W) batches of ``paths`` in order. A call of at most one batch decodes
        in this process (workers would only add their start-up: there is nothing to overlap
        with); a longer one through DataLoader workers that persist between calls."""
        from torch.utils.data import DataLoader

        workers = (os.cpu_count() or 1) if self.num_workers < 0 else self.num_workers
        if workers == 0 or len(paths) <= self.batch_size:
            dataset = ImageDataset(paths, self.image_size, self.preprocess_.interpolation,
                                   self.crop_pct_)
            yield from DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                                  num_workers=0, pin_memory=self.device_ == "cuda")
            return
        if getattr(self, "_loader", None) is None:
            self._sampler = _CallPaths()
            # the workers' copy of the dataset holds no paths: the sampler hands them out
            self._loader = DataLoader(ImageDataset([], self.image_size,
                                                   self.preprocess_.interpolation,
                                                   self.crop_pct_),
                                      batch_size=self.batch_size,
                                      sampler=self._sampler, num_workers=workers,
                                      persistent_workers=True,
                                      pin_memory=self.device_ == "cuda")
        self._sampler.paths = [str(p) for p in paths]
        yield from self._loader

    def iter_batches(self, paths: list[str]) -> Iterator[np.ndarray]:
        """Yield float32 (batch, feature_dim_) arrays in input order."""
        import torch

        # the model's own mean/std, per channel of the replicated greyscale image
        mean = torch.tensor(self.preprocess_.mean, device=self.device_).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess_.std, device=self.device_).view(1, 3, 1, 1)
        dtype = torch.bfloat16 if self.precision_ == "bf16" else None
        buffer = None
        with torch.inference_mode():
            for batch in self._batches(paths):
                n = len(batch)
                size = self.run_size(n)
                if n < size:
                    # Pad a short batch (the repeated last image) to its run size: kernels
                    # may pick another algorithm for other batch shapes (batch 1 differs in
                    # the last bits; MIN_BATCH), and a vector must not depend on which images
                    # shared its batch, or a served image, or an incremental run, would not
                    # reproduce the pipeline's vectors byte for byte.
                    pad = batch[-1:].expand(size - n, *batch.shape[1:])
                    batch = torch.cat([batch, pad])
                if buffer is None or len(buffer) < size:
                    # one channels-last input buffer, normalised in place: the same bits as
                    # ((x - mean) / std).contiguous(channels_last), at half the memory traffic
                    buffer = torch.empty((size, 3, self.image_size, self.image_size),
                                         device=self.device_).contiguous(
                                             memory_format=torch.channels_last)
                x = buffer[:size]  # leading rows of an NHWC tensor: still channels-last
                grey = batch.to(self.device_, non_blocking=True).unsqueeze(1).float().div_(255.0)
                torch.sub(grey.expand(-1, 3, -1, -1), mean, out=x).div_(std)
                with torch.autocast(self.device_, dtype=dtype, enabled=dtype is not None):
                    out = self.model_(x)
                yield out[:n].float().cpu().numpy()

    def warm_up(self) -> None:
        """One forward pass at the shape a single image runs at, so that the first request
        of a server does not pay oneDNN's kernel generation for it."""
        import torch

        size = self.run_size(1)
        x = torch.zeros((size, 3, self.image_size, self.image_size), device=self.device_)
        with torch.inference_mode():
            self.model_(x.contiguous(memory_format=torch.channels_last))

    def transform(self, paths: list[str]) -> np.ndarray:
        chunks = list(self.iter_batches(paths))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.feature_dim_), np.float32)


def check_image_size(backbone: str, image_size: int, pre) -> None:
    """embed.image_size is the side fed to the network: convolutional models take any size
    from their smallest up (their native ``input_size`` is what pretrained weights saw),
    fixed-size ones (ViTs) only their own."""
    if pre.fixed_size and image_size != pre.input_size:
        raise ParamsError(f"params: 'embed.image_size' {backbone} runs at {pre.input_size} px "
                          f"only, got {image_size}: set embed.image_size: {pre.input_size}")
    if image_size < pre.min_size:
        raise ParamsError(f"params: 'embed.image_size' {backbone} needs at least "
                          f"{pre.min_size} px, got {image_size} (its native size is "
                          f"{pre.input_size})")


def probe_feature_dim(model, backbone: str, image_size: int, device: str, pre) -> int:
    """The feature dimension, read from the model: one forward pass of a blank image."""
    import torch

    x = torch.zeros(1, 3, image_size, image_size, device=device)
    try:
        with torch.inference_mode():
            out = model(x.contiguous(memory_format=torch.channels_last))
    except Exception as exc:  # noqa: BLE001 - a size the architecture cannot take
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ParamsError(f"params: 'embed.image_size' {backbone} does not run at {image_size} "
                          f"px ({type(exc).__name__}: {first}); its native size is "
                          f"{pre.input_size}: try embed.image_size: {pre.input_size}") from None
    if out.ndim != 2 or out.shape[0] != 1:
        raise PipelineError(f"embed: {backbone} without its classifier gives "
                            f"{tuple(out.shape)}, not one feature vector per image")
    return int(out.shape[1])
