"""``embed.engine: ray``: the embed stage's per-image work on Ray Data.

The images that need vectors become a dataset (``ray.data.from_items``, one row per image
carrying its index in the call), decoded and resized in CPU tasks (the local engine's
``ImageDataset``, uint8 out), then embedded by the same :class:`triage.embed.Embedder` in an
actor pool (``map_batches(EmbedActor, compute=ActorPoolStrategy(min_size=1, max_size=n),
batch_size=embed.batch_size)``: Ray 2.60's form of the deprecated ``concurrency=(1, n)``;
one GPU per actor on CUDA). The vectors come back to :func:`triage.store.write_embeddings`
through its ``compute`` callable, in input order (restored from the carried index), so the
Parquet schema, the fingerprint and the reuse of already-embedded ids stay the store's own.

Same bits as the local engine. An actor regroups the rows it gets by the local engine's
batch (index // batch_size) and runs each group through ``Embedder.iter_batches``, which
pads a short group to ``Embedder.run_size``. On the default path (canonical kernels,
resnet18: ``small_batches_``) an image's vector does not depend on its batch-mates or on the
batch shape from 2 up (triage.embed.MIN_BATCH; docs/reproducibility.md), and run_size is
never 1: the vectors are the local engine's, byte for byte (tests/test_ray_engine.py). On
the paths where that is not proven (fast/bf16 kernels, CUDA, other backbones) a group Ray
splits between two calls may run with other batch-mates: those vectors are already
machine-dependent (their fingerprint says so) and may differ in the last bits from a local
run's (a warning says it).

Ray itself (:func:`session`, :func:`init_kwargs`: RAY_ADDRESS) is triage/ray_tasks.py's,
shared with the prepare and qc stages' per-file work under the same switch.

Ray is imported only inside functions: the local engine never imports it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from .errors import PipelineError
from .io import log
from .ray_tasks import LOCAL_INIT, init_kwargs, session  # noqa: F401 - this module's API too

# CPUs a decode task asks for (light beside the network's; not the actors' 1, see compute_fn)
DECODE_CPUS = 0.5


def embedder_kwargs(embedder) -> dict:
    """Constructor arguments that rebuild ``embedder`` (fitted) in an actor; decoding is
    Ray's tasks', so the actor's embedder runs no DataLoader workers."""
    return {"weights": embedder.weights, "backbone": embedder.backbone, "seed": embedder.seed,
            "weights_sha256": embedder.weights_sha256, "image_size": embedder.image_size,
            "crop": embedder.crop, "batch_size": embedder.batch_size, "num_workers": 0,
            "device": embedder.device_, "precision": embedder.precision,
            "kernels": embedder.kernels, "layers": embedder.layers}


def decode(batch: dict, *, image_size: int, interpolation: str, crop_pct) -> dict:
    """Ray task: {"idx", "path"} → {"idx", "pixels"} (uint8 (n, H, W), the local engine's
    decode: triage.embed.ImageDataset)."""
    from .embed import ImageDataset

    paths = [str(p) for p in batch["path"]]
    dataset = ImageDataset(paths, image_size, interpolation, crop_pct)
    pixels = np.stack([dataset[i].numpy() for i in range(len(paths))]) if paths else \
        np.zeros((0, image_size, image_size), np.uint8)
    return {"idx": np.asarray(batch["idx"], np.int64), "pixels": pixels}


class EmbedActor:
    """Ray actor: one fitted Embedder; embeds decoded rows in the local engine's batches."""

    def __init__(self, kwargs: dict, expected_fingerprint: str):
        from .embed import Embedder

        class Decoded(Embedder):
            # iter_batches' kernels, normalisation and padding, on already-decoded pixels
            def _batches(self, pixels):
                import torch

                yield torch.from_numpy(np.ascontiguousarray(pixels))

        self.embedder = Decoded(**kwargs).fit()
        got = self.embedder.fingerprint_["fingerprint"]
        if got != expected_fingerprint:  # another torch, weights file, ... on this worker
            raise PipelineError(f"embed.engine: ray: a worker's embedding fingerprint is {got}, "
                                f"the driver's {expected_fingerprint}")

    def __call__(self, batch: dict) -> dict:
        idx, pixels = np.asarray(batch["idx"], np.int64), batch["pixels"]
        size = self.embedder.batch_size
        out = []
        group = idx // size
        cuts = np.flatnonzero(np.diff(group)) + 1 if len(idx) else np.zeros(0, int)
        for part in np.split(np.arange(len(idx)), cuts):
            if len(part):
                out.extend(self.embedder.iter_batches(pixels[part]))
        dim = self.embedder.feature_dim_
        vectors = np.concatenate(out) if out else np.zeros((0, dim), np.float32)
        return {"idx": idx, "vector": vectors.astype(np.float32, copy=False)}


def default_actors(device: str) -> int:
    """Actor pool's upper bound: the cluster's GPUs on CUDA; else its CPUs less one (Ray
    Data's decode tasks need one to run beside the actors), at least one."""
    import ray

    resources = ray.cluster_resources()
    if device == "cuda":
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1)) - 1)


def compute_fn(embedder, *, actors: int | None = None):
    """A ``compute(paths)`` for :func:`triage.store.write_embeddings`: yields the vectors of
    ``paths`` in input order, in batches, computed on Ray Data (Ray must be initialised:
    :func:`session`). ``actors``: the pool's upper bound (default :func:`default_actors`)."""
    if not getattr(embedder, "small_batches_", False):
        log.warning("embed.engine: ray: vectors of the %s path are not proven independent of "
                    "their batch-mates: they may differ from the local engine's in the last "
                    "bits", embedder.fingerprint_.get("kernels"))

    def compute(paths: list[str]) -> Iterator[np.ndarray]:
        if not paths:
            return
        import ray

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        n = actors or default_actors(embedder.device_)
        size = embedder.batch_size
        # absolute: a joined cluster's workers (RAY_ADDRESS) start in the head's working
        # directory, where the manifest's relative paths name other files or none
        dataset = ray.data.from_items([{"idx": i, "path": os.path.abspath(p)}
                                       for i, p in enumerate(paths)])
        # DECODE_CPUS differs from the actors' CPUs, so Ray does not fuse decoding into the
        # actors: it runs in tasks of its own, overlapping the network's work
        dataset = dataset.map_batches(
            decode, batch_size=size, batch_format="numpy", num_cpus=DECODE_CPUS,
            fn_kwargs={"image_size": embedder.image_size,
                       "interpolation": embedder.preprocess_.interpolation,
                       "crop_pct": embedder.crop_pct_})
        dataset = dataset.map_batches(
            EmbedActor, batch_size=size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n),  # `concurrency=(1, n)`
            num_cpus=0 if embedder.device_ == "cuda" else 1,
            num_gpus=1 if embedder.device_ == "cuda" else 0,
            fn_constructor_args=(embedder_kwargs(embedder),
                                 embedder.fingerprint_["fingerprint"]))
        # preserve_order keeps the rows in order; the carried index checks it (and restores
        # it, holding early rows until their turn, should a Ray version reorder them)
        pending: dict[int, np.ndarray] = {}
        expected = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i, vector in zip(batch["idx"].tolist(), batch["vector"]):
                pending[i] = vector
            ready = []
            while expected in pending:
                ready.append(pending.pop(expected))
                expected += 1
            if ready:
                yield np.stack(ready)
        if pending or expected != len(paths):
            raise PipelineError(f"embed.engine: ray returned {expected + len(pending)} vectors "
                                f"for {len(paths)} images")

    return compute
