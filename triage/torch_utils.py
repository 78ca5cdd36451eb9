"""Torch utilities shared by the stages that run a network: device choice, a seeded and
deterministic block, image tensors, byte-stable checkpoints.

Kept apart from the FixMatch code (triage/finetune.py) and the SimCLR code
(triage/pretrain.py), so each stage depends only on what it runs.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .errors import PipelineError


def resolve_device(device: str, key: str = "device") -> str:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error naming ``key``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{key}=cuda but no CUDA device is available (use auto or cpu)")
    return device


@contextlib.contextmanager
def deterministic(seed: int, threads: int, device: str = "cpu"):
    """Seeded, deterministic torch for the block; restores the global settings after."""
    import torch

    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    prev_cudnn = torch.backends.cudnn.benchmark
    torch.manual_seed(seed)
    # Some CUDA backward kernels (adaptive pooling) have no deterministic variant: warn
    # there instead of failing; on CPU everything used here is deterministic.
    torch.use_deterministic_algorithms(True, warn_only=device == "cuda")
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)
        torch.backends.cudnn.benchmark = prev_cudnn


def load_images(paths: list[str], size: int):
    """(N, 1, size, size) uint8 tensor, decoded as everywhere else (triage.images)."""
    import torch

    from .images import load_grey

    arr = np.zeros((len(paths), 1, size, size), np.uint8)
    for i, p in enumerate(paths):
        arr[i, 0] = np.asarray(load_grey(p, size), dtype=np.uint8)
    return torch.from_numpy(arr)


def save_checkpoint(obj, path: str | Path) -> None:
    """``torch.save`` atomically and byte-stable: torch names the zip records after the
    file, so saving straight to a temp file would put its random name in the bytes."""
    import io

    import torch

    from .io import atomic_path

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
