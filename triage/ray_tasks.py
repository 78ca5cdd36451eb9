"""Ray for the stages' ``embed.engine: ray``: the session and an ordered, bounded task map.

:func:`session` starts Ray for a block (``RAY_ADDRESS`` set: join that cluster; unset: a
local Ray on this machine's cores, :func:`init_kwargs`). :func:`map_ordered` maps a picklable
function over items in Ray tasks of ``MAP_BATCH`` items, results in input order, a bounded
number of tasks in flight: the prepare stage's per-file read + sha256 + header
(triage.prepare.scan_file) and the qc stage's full decode (triage.qc.inspect_image) run
through it. The function is the local engine's own and everything after it is the same code,
so the manifest, the clean manifest and the quarantine are the local engine's bytes
(tests/test_ray_prepare_qc.py). The embed stage's Ray Data path is triage/ray_engine.py.

A module of its own (not triage/ray_engine.py, which imports the embedder): a stage's dvc.yaml
deps are every module it imports (tests/test_dvc_yaml.py), and prepare and qc must not re-run
when the embedder's code changes.

Ray is imported only here, inside functions: the local engine never imports it.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from .errors import PipelineError

# what a local Ray is started with when RAY_ADDRESS is unset (besides num_cpus)
LOCAL_INIT = {"include_dashboard": False, "log_to_driver": False}


def init_kwargs(environ=None, cores: int | None = None) -> dict:
    """``ray.init`` arguments: RAY_ADDRESS set → join that cluster; unset → a local Ray on
    ``cores`` CPUs (this machine's), without dashboard or worker logs on the driver."""
    environ = os.environ if environ is None else environ
    address = environ.get("RAY_ADDRESS", "").strip()
    if address:
        return {"address": address}
    return {"num_cpus": int(cores or os.cpu_count() or 1), **LOCAL_INIT}


@contextmanager
def session(environ=None, cores: int | None = None):
    """Ray for the length of a block: started (:func:`init_kwargs`) and shut down at the end,
    unless the process already runs one (a test's, a notebook's), which is left as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(**init_kwargs(environ, cores))
    try:
        yield
    finally:
        ray.shutdown()


# items per map_ordered task: a few hundred, so a task's own cost (a few ms to schedule, ship
# and return) is small beside its work (hash or decode a few hundred files), and 1M files make
# ~4k tasks, not 1M object refs
MAP_BATCH = 256
# a task whose worker died (OOM kill, lost node, segfault) is run again by Ray this many times;
# the function's exceptions are not retried: the per-file functions return a file's problems
# as data, so an exception there is a bug, raised as the local engine would raise it
MAP_RETRIES = 3


def _apply(fn: Callable, items: list, cwd: str) -> list:
    """Ray task of :func:`map_ordered`: ``fn`` over one batch, in the driver's working
    directory ``cwd``. The items are paths relative to it (the manifests'); a worker of a
    joined cluster (RAY_ADDRESS) starts in the head's working directory, where they would
    name other files or none."""
    here = os.getcwd()
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise PipelineError(f"ray: the driver's working directory {cwd} is not on this worker "
                            f"({exc.strerror}): the workers must see the repository and the "
                            f"images at the driver's paths") from None
    try:
        return [fn(item) for item in items]
    finally:  # a worker runs one task at a time; the next one finds its own directory
        os.chdir(here)


def map_ordered(fn: Callable, items: Iterable, *, batch_size: int = MAP_BATCH,
                in_flight: int | None = None, max_retries: int = MAP_RETRIES,
                num_cpus: float = 1) -> Iterator:
    """Yield ``fn(item)`` for every item, in input order, computed in Ray tasks.

    The items go out in batches of ``batch_size`` (one task each, ``num_cpus`` CPUs, retried
    ``max_retries`` times if its worker dies); at most ``in_flight`` tasks are submitted and
    not yet consumed (default: twice the cluster's CPUs, so the cluster stays busy while the
    caller works on a batch), so the driver holds a bounded number of object refs and
    results whatever the item count. Results are gathered in submission order (waiting on
    the oldest task first): the output does not depend on which worker finished first.
    ``fn`` must be picklable (a module-level function or a functools.partial of one: the
    workers import its module); it runs in the driver's working directory (:func:`_apply`).
    Runs inside :func:`session` (started here unless Ray already runs; a stage opens one
    around all its calls so Ray starts once). Item values are never put in an error message
    (they are file paths: health data).
    """
    items = list(items)
    if batch_size < 1:
        raise ValueError(f"map_ordered: batch_size must be >= 1, got {batch_size}")
    if not items:
        return
    import ray

    with session():
        if in_flight is None:
            in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(_apply).options(num_cpus=num_cpus, max_retries=max_retries)
        fn_ref = ray.put(fn)  # shipped once, not with every task
        cwd = os.getcwd()
        starts = iter(range(0, len(items), batch_size))
        pending: deque = deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append((start, task.remote(fn_ref, items[start:start + batch_size], cwd)))

        try:
            for _ in range(max(1, in_flight)):
                submit()
            while pending:
                start, ref = pending.popleft()
                results = _gather(ray, ref, start, len(items), batch_size, max_retries)
                submit()  # before the caller's turn: the cluster works while it does
                yield from results
        finally:  # the caller stopped early or a task failed: drop the rest of the work
            for _, ref in pending:
                ray.cancel(ref)


def _gather(ray, ref, start: int, n: int, batch_size: int, max_retries: int) -> list:
    end = min(start + batch_size, n)
    try:
        results = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        # the function raised: the error the local engine would raise (Ray's remote
        # traceback chained to it)
        raise exc.cause from exc
    except ray.exceptions.RayError as exc:  # the worker died past its retries, object lost...
        raise PipelineError(
            f"ray: the task of items {start}-{end - 1} (of {n}) failed after {max_retries} "
            f"retries: {type(exc).__name__} (a worker killed: memory? see `ray status`, the "
            f"raylet logs under /tmp/ray/session_latest/logs)") from exc
    if len(results) != end - start:
        raise PipelineError(f"ray: the task of items {start}-{end - 1} returned "
                            f"{len(results)} results for {end - start} items")
    return results
