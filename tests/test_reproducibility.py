"""Kernel perturbation (issue #12): same code + params + data must give the same bytes on any CPU.

The committed dvc.lock has to reproduce on the AVX2 laptop of one engineer and on the AVX-512
server of another, whatever thread count each one has. We cannot borrow those machines in a
test, but every numerical library the pipeline uses lets an environment variable pick which
of its CPU kernels (SSE, AVX without FMA, AVX2, AVX-512) and how many threads it runs, so one
machine can pretend to be several:

* OpenBLAS (NumPy's and SciPy's BLAS/LAPACK: PCA, logistic regression, ...): OPENBLAS_CORETYPE
* oneDNN (PyTorch's CPU convolutions, the embedding): ONEDNN_MAX_CPU_ISA
* MKL (PyTorch's sgemm; not on the embedding's path): MKL_ENABLE_INSTRUCTIONS
* PyTorch's own vectorised kernels (AVX2 vs AVX-512 builds of each op): ATEN_CPU_CAPABILITY
* NumPy's own SIMD dispatch (exp, log, argsort, ...): NPY_DISABLE_CPU_FEATURES
* thread pools: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS

``KNOBS`` below is the one table of those settings. Two tests use it:

* ``test_knob_changes_raw_bits``: each knob really changes the bits of a plain,
  un-canonicalised computation of its library (so the pipeline test is not vacuous: if a
  knob did nothing, "identical outputs under it" would prove nothing).
* ``test_pipeline_bytes_do_not_depend_on_kernels``: the whole pipeline (TINY demo params, as in
  tests/test_pipeline.py) gives a byte-identical dvc.lock and identical output files under
  the knobs as under the plain environment.

A knob whose CPU feature is missing (``/proc/cpuinfo`` flags, vendor) is skipped with the reason,
and so is one that only selects what this machine runs anyway (OpenBLAS's own choice of
kernels, the core count as thread count): it would perturb nothing.
"""
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import clone_repo, output_hashes, plain_env, run

# Every variable a knob may set: removed from the "plain" environment, so a developer's own
# OPENBLAS_CORETYPE (say) cannot turn the baseline into a perturbed run.

# Stage outputs compared file by file; metrics/runtime holds wall-clock timings (not a stage
# output: they vary run to run by design).
EMBEDDINGS = "data/features/embeddings.parquet"


def _cpu() -> tuple[set[str], str]:
    """(flags, vendor_id) of the running CPU, from /proc/cpuinfo (empty when unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), ""
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    return set(flags.group(1).split()) if flags else set(), vendor.group(1) if vendor else ""


CPU_FLAGS, CPU_VENDOR = _cpu()


def _numpy_avx512_targets() -> str:
    """NumPy's AVX-512 dispatch targets, the value that makes it dispatch like an AVX2-only CPU.

    NumPy only warns (ImportWarning, hidden by default) on names it does not dispatch and then
    ignores them, and the names changed in NumPy 2.4 (AVX512F / AVX512_SKX / ... became
    X86_V4 / AVX512_ICL / AVX512_SPR), so the value is read from NumPy, not hard-coded.
    """
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__
    return " ".join(t for t in __cpu_dispatch__ if t.startswith("AVX512") or t == "X86_V4")


def _threads(n: int) -> dict:
    return {"OMP_NUM_THREADS": str(n), "OPENBLAS_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


@dataclass(frozen=True)
class Knob:
    env: dict
    needs: tuple = ()          # /proc/cpuinfo flags the setting needs (else: skipped)
    probes: tuple = ()         # raw computations (PROBE) whose bits the knob must change
    vendor: str = ""           # CPU vendor the library honours the knob on ("" = any)
    why: str = ""              # what it emulates
    default_if: tuple = field(default=())  # OpenBLAS cores whose kernels this knob selects


OPENBLAS = ("gemm64", "pca")
ONEDNN = ("resnet_onednn",)
MKL = ("torch_sgemm",)

KNOBS = {
    "openblas-sandybridge": Knob({"OPENBLAS_CORETYPE": "Sandybridge"}, ("avx",), OPENBLAS,
                                 why="AVX without FMA BLAS kernels"),
    "openblas-prescott": Knob({"OPENBLAS_CORETYPE": "Prescott"}, (), OPENBLAS,
                              why="SSE3 BLAS kernels (oldest x86-64)"),
    "openblas-skylakex": Knob({"OPENBLAS_CORETYPE": "SkylakeX"}, ("avx512f",), OPENBLAS,
                              why="AVX-512 BLAS kernels (Intel AVX-512 server)",
                              default_if=("SkylakeX", "Cooperlake", "SapphireRapids")),
    "openblas-haswell": Knob({"OPENBLAS_CORETYPE": "Haswell"}, ("avx2",), OPENBLAS,
                             why="AVX2+FMA BLAS kernels (AVX2 laptop)",
                             default_if=("Haswell", "Zen")),
    "onednn-avx": Knob({"ONEDNN_MAX_CPU_ISA": "AVX"}, ("avx",), ONEDNN,
                       why="oneDNN AVX convolutions (no FMA)"),
    # The avx2 kernel family on an AVX-512 CPU, inside the canonical path (which otherwise
    # runs avx512_core here): the embedding an AVX2-only CPU computes. Its raw bits equal
    # the avx512_core kernels' (that equality is the canonical path's premise, asserted by
    # tests/test_canonical.py), so there is no raw probe to change.
    "onednn-avx2-kernels": Knob({"TRIAGE_ONEDNN_ISA": "AVX2"}, ("avx512f",), (),
                                why="oneDNN's AVX2 kernels, as on an AVX2-only CPU"),
    "onednn-sse41": Knob({"ONEDNN_MAX_CPU_ISA": "SSE41"}, ("sse4_1",), ONEDNN,
                         why="oneDNN SSE4.1 convolutions"),
    "mkl-avx": Knob({"MKL_ENABLE_INSTRUCTIONS": "AVX"}, ("avx",), MKL, vendor="GenuineIntel",
                    why="MKL AVX code path"),
    "mkl-sse4_2": Knob({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, ("sse4_2",), MKL,
                       vendor="GenuineIntel", why="MKL SSE4.2 code path"),
    "aten-avx2": Knob({"ATEN_CPU_CAPABILITY": "avx2"}, ("avx512f",), ("torch_softmax",),
                      why="PyTorch's AVX2 kernels, as on an AVX2-only CPU"),
    "numpy-no-avx512": Knob({"NPY_DISABLE_CPU_FEATURES": _numpy_avx512_targets()}, ("avx512f",),
                            ("exp64", "argsort_ties"),
                            why="NumPy SIMD dispatch of an AVX2-only CPU"),
    # One thread: OpenBLAS splits long dots and GEMMs across threads; torch its reductions.
    "threads-1": Knob(_threads(1), (), ("gemm64", "dot1e6", "torch_sum"), why="1 thread"),
    # OpenBLAS and torch cap their pools at the core count, scikit-learn's OpenMP loops do
    # not: 16 threads on a 2-core box still changes KMeans' chunked reductions.
    "threads-16": Knob(_threads(16), (), ("kmeans_omp",), why="16 threads (oversubscribed)"),
}


def knob_unsupported(name: str) -> str | None:
    """Why this CPU cannot run the knob (None when it can)."""
    knob = KNOBS[name]
    missing = [f for f in knob.needs if f not in CPU_FLAGS]
    if missing:
        return f"{name}: the CPU lacks {', '.join(missing)}"
    if knob.vendor and CPU_VENDOR != knob.vendor:
        return (f"{name}: MKL ignores MKL_ENABLE_INSTRUCTIONS on a {CPU_VENDOR or 'unknown'} CPU "
                f"(it honours it on {knob.vendor} only)")
    if "NPY_DISABLE_CPU_FEATURES" in knob.env and not knob.env["NPY_DISABLE_CPU_FEATURES"]:
        return f"{name}: this NumPy dispatches no AVX-512 target"
    return None


def knob_is_default(name: str, openblas_core: str | None) -> str | None:
    """Why the knob selects what this machine runs anyway (None when it perturbs something)."""
    knob = KNOBS[name]
    if knob.default_if and openblas_core in knob.default_if:
        return f"{name}: OpenBLAS already runs these kernels by default here ({openblas_core})"
    if knob.env.get("OMP_NUM_THREADS") == str(len(os.sched_getaffinity(0))):
        return f"{name}: that is this machine's core count, the default thread count"
    return None


# --------------------------------------------------------------------------------------------
# Test 2: the knobs are real.

# Raw computations, each on fixed seeded data, each printing the sha256 of its result bytes.
# Deliberately *not* canonicalised: the fast default path of each library.
PROBE = r'''
import hashlib, json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np

def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

def rng():
    return np.random.default_rng(0)

def gemm64():                     # OpenBLAS dgemm, odd sizes
    r = rng()
    return sha(r.standard_normal((301, 257)) @ r.standard_normal((257, 199)))

def pca():                        # OpenBLAS/LAPACK through scikit-learn, as the cluster stage
    from sklearn.decomposition import PCA
    return sha(PCA(n_components=8, svd_solver="full").fit(rng().standard_normal((300, 64))).components_)

def dot1e6():                     # OpenBLAS ddot, split across threads when long
    r = rng()
    return sha(np.dot(r.standard_normal(10**6), r.standard_normal(10**6)))

def exp64():                      # NumPy's own SIMD exp (AVX-512 vs AVX2 implementations)
    return sha(np.exp(rng().uniform(-3, 3, 100003)))

def argsort_ties():               # NumPy's SIMD quicksort: order among equal keys
    return sha(np.argsort(rng().integers(0, 50, 20000)))

def kmeans_omp():                 # scikit-learn OpenMP reductions (chunked per thread)
    from sklearn.cluster import KMeans
    km = KMeans(8, n_init=1, random_state=0, max_iter=50).fit(rng().standard_normal((20000, 32)))
    return sha(km.cluster_centers_)

def resnet_onednn():              # oneDNN + channels_last: the fast, non-canonical torch path
    import torch, torchvision
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None)
    m.fc = torch.nn.Identity()
    m = m.eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=True):
        return sha(m(x.contiguous(memory_format=torch.channels_last)).numpy())

def torch_sgemm():                # torch float32 matmul (MKL sgemm)
    import torch
    r = rng()
    a = torch.from_numpy(r.standard_normal((301, 257)).astype(np.float32))
    b = torch.from_numpy(r.standard_normal((257, 199)).astype(np.float32))
    return sha((a @ b).numpy())

def torch_softmax():              # a PyTorch-native vectorised op (ATen's AVX2/AVX-512 builds)
    import torch
    return sha(torch.from_numpy(rng().standard_normal(10**6).astype(np.float32)).softmax(0).numpy())

def torch_sum():                  # torch float32 reduction, split across intra-op threads
    import torch
    return sha(torch.from_numpy(rng().standard_normal(10**6).astype(np.float32)).sum().numpy())

def openblas_core():              # the OpenBLAS kernel family NumPy runs by default here
    from threadpoolctl import threadpool_info
    return next((i.get("architecture") for i in threadpool_info()
                 if i.get("internal_api") == "openblas" and "numpy" in i["filepath"]), None)

print(json.dumps({k: globals()[k]() for k in sys.argv[1:]}))
'''

ALL_PROBES = sorted({p for k in KNOBS.values() for p in k.probes} | {"openblas_core"})


def probe(env: dict, keys) -> dict:
    res = run([sys.executable, "-c", PROBE, *keys], Path(env["DVC_SITE_CACHE_DIR"]).parent, env)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def raw_baseline(tmp_path_factory):
    env = plain_env(tmp_path_factory.mktemp("raw"))
    return env, probe(env, ALL_PROBES)


RAW_KNOBS = [name for name, knob in KNOBS.items() if knob.probes]


@pytest.mark.parametrize("name", RAW_KNOBS, ids=RAW_KNOBS)
def test_knob_changes_raw_bits(raw_baseline, name):
    """Under each knob, the raw (un-canonicalised) computations of its library change bits.

    Found by trying, on an AMD EPYC (Zen 5, AVX-512, 2 cores), NumPy 2.4 / OpenBLAS 0.3.31,
    torch 2.14 (oneDNN 3.12, MKL 2024.2), OPENBLAS_CORETYPE unset (OpenBLAS then picks SkylakeX
    here, so that knob is the default and skipped; this box's shell exports
    OPENBLAS_CORETYPE=Haswell, which ``plain_env`` removes):
    OPENBLAS_CORETYPE Sandybridge / Prescott / Haswell change a float64 GEMM and PCA;
    ONEDNN_MAX_CPU_ISA=AVX / SSE41 change a channels_last oneDNN ResNet18 (=AVX2 does not);
    NPY_DISABLE_CPU_FEATURES of the AVX-512 targets changes np.exp (float64) and the order
    argsort gives equal keys; 1 thread changes a float64 GEMM, a 10^6 dot and a torch sum;
    16 threads changes KMeans (scikit-learn's OpenMP) while OpenBLAS and torch stay at the
    core count. MKL_ENABLE_INSTRUCTIONS changed nothing there: MKL does not dispatch by ISA
    on AMD, so the MKL knobs are Intel-only. ATEN_CPU_CAPABILITY=avx2 changes a softmax
    (PyTorch's AVX2 build of the op). The canonical embedding (oneDNN pinned to its AVX2
    kernels by triage.embed) is unchanged under every knob.
    """
    reason = knob_unsupported(name)
    if reason:
        pytest.skip(reason)
    knob = KNOBS[name]
    env, base = raw_baseline
    reason = knob_is_default(name, base["openblas_core"])
    if reason:
        pytest.skip(reason)
    got = probe({**env, **knob.env}, knob.probes)
    same = [p for p in knob.probes if got[p] == base[p]]
    assert not same, (f"{name} ({knob.env}) did not change the bits of {same}: the knob is not "
                      f"acting, so the pipeline test under it would prove nothing")


# --------------------------------------------------------------------------------------------
# Test 1: the pipeline's bytes do not depend on them.

# Knobs acting on different libraries share a run (one `dvc repro -f` is ~1 min here);
# a CPU lacking a feature drops that knob from its run. TRIAGE_REPRO_KNOBS=single runs one
# `dvc repro -f` per knob instead, to bisect a failure.
COMBOS = {
    "avx-nofma+1thread": ("openblas-sandybridge", "onednn-avx", "mkl-avx", "threads-1"),
    "sse+16threads": ("openblas-prescott", "onednn-sse41", "mkl-sse4_2", "threads-16"),
    "openblas-avx512": ("openblas-skylakex",),
    # an AVX2-only CPU (AMD Zen 1, Intel Haswell) as far as each library can be told
    "avx2-machine": ("openblas-haswell", "numpy-no-avx512", "aten-avx2", "onednn-avx2-kernels"),
}
if os.environ.get("TRIAGE_REPRO_KNOBS") == "single":
    COMBOS = {name: (name,) for name in KNOBS}


def lock_stage_diff(before: str, after: str) -> tuple[list[str], list[str]]:
    """(stages whose outs differ, stages whose deps/params only differ) between two dvc.lock."""
    a = (yaml.safe_load(before) or {}).get("stages", {})
    b = (yaml.safe_load(after) or {}).get("stages", {})
    changed = sorted(s for s in a.keys() | b.keys() if a.get(s) != b.get(s))
    outs = [s for s in changed if (a.get(s) or {}).get("outs") != (b.get(s) or {}).get("outs")]
    return outs, [s for s in changed if s not in outs]


@pytest.fixture(scope="module")
def pipeline_baseline(tiny_pipeline, tmp_path_factory):
    # a copy of the session's plain run (conftest.tiny_pipeline): its lock and output hashes
    # were taken right after that run
    tmp = tmp_path_factory.mktemp("kernels")
    repo = clone_repo(tiny_pipeline.repo, tmp / "repo")
    env = {**tiny_pipeline.env, "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache")}
    core = probe(env, ["openblas_core"])["openblas_core"]
    return repo, env, core, tiny_pipeline.lock, tiny_pipeline.hashes


@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
def test_pipeline_bytes_do_not_depend_on_kernels(pipeline_baseline, combo):
    """`dvc repro -f` under other CPU kernels / thread counts gives the baseline's bytes.

    The embedding store is `persist: true` (vectors of unchanged images are reused), so a bare
    `dvc repro -f` would copy the baseline's vectors and never run ResNet18 under the knob:
    it is deleted first, and the runtime record must show nothing was reused.

    Each combination only mixes knobs of different libraries, so a failure names the
    suspects; TRIAGE_REPRO_KNOBS=single runs one knob per `dvc repro -f` to bisect. Checked
    by hand on the full demo (1,806 images, not TINY), AMD EPYC AVX-512: the committed
    lock reproduced under Sandybridge + oneDNN AVX + MKL AVX + 1 thread, under Prescott +
    oneDNN SSE41 + MKL SSE4_2 + 16 threads, and under Haswell + NumPy without AVX-512 +
    ATen avx2, each with the embedding store deleted.
    """
    repo, env, core, lock, hashes = pipeline_baseline
    names = COMBOS[combo]
    why = {n: knob_unsupported(n) or knob_is_default(n, core) for n in names}
    dropped = [r for r in why.values() if r]
    active = [n for n in names if not why[n]]
    if not active:
        pytest.skip("; ".join(dropped))
    knob_env = {k: v for n in active for k, v in KNOBS[n].env.items()}

    (repo / EMBEDDINGS).unlink(missing_ok=True)
    run(["dvc", "repro", "-f"], repo, {**env, **knob_env})

    runtime = repo / "metrics/runtime/embed.json"
    if runtime.is_file():
        reused = json.loads(runtime.read_text()).get("embed", {}).get("n_reused", 0)
        assert reused == 0, f"embed reused {reused} vectors: the knobs never reached ResNet18"
    got_lock, got = (repo / "dvc.lock").read_text(), output_hashes(repo)
    differing = sorted(p for p in hashes.keys() & got.keys() if hashes[p] != got[p])
    missing, extra = sorted(hashes.keys() - got.keys()), sorted(got.keys() - hashes.keys())
    identical = got_lock == lock and not (differing or missing or extra)
    where = f"under {combo} = {active} {knob_env}" + (f" (dropped: {dropped})" if dropped else "")
    outs, downstream = lock_stage_diff(lock, got_lock)
    assert identical, (
        f"outputs differ from the plain run {where}:\n"
        f"  dvc.lock: outs differ in stages {outs}; only deps differ in {downstream}\n"
        f"  files differing: {differing}\n"
        f"  files only in baseline: {missing}\n  files only here: {extra}")
