"""triage.canonical: the snapping grid, batch independence, canonical fits, kernel paths.

The cross-CPU proof is tests/test_reproducibility.py (whole pipeline under other BLAS,
oneDNN, MKL, NumPy kernels and thread counts); these pin the properties it relies on.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV

from triage.canonical import (
    SNAP_BITS,
    canonical_fit,
    canonical_reducer,
    logistic_regression,
    snap,
    snap_relative,
)
from triage.embed import CANONICAL_CPU, Embedder
from triage.errors import PipelineError
from triage.inference import embedder_kwargs


def _quantum(x):
    return np.ldexp(1.0, int(np.frexp(np.max(np.abs(x)))[1]) - SNAP_BITS)


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 0.5, 1.0, 3.0, 1e6])
def test_snap_rounds_to_the_array_grid(scale):
    x = np.random.default_rng(0).normal(size=1000) * scale
    s = snap(x)
    q = _quantum(x)
    assert np.all(np.abs(s - x) <= q / 2)                 # nearest grid point
    np.testing.assert_array_equal(np.rint(s / q) * q, s)  # on the grid
    np.testing.assert_array_equal(snap(s), s)             # idempotent


def test_snap_absorbs_noise_far_below_the_grid():
    """Kernel noise (~1e-13 relative) almost never moves a snapped value: expected flips
    ~ n * 2e-13 / 2**-16 ≈ 1e-3 here; raw values all differ."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=100_000)
    noisy = x * (1 + rng.choice([-1e-13, 1e-13], size=x.size))
    assert np.all(noisy != x)
    assert int((snap(noisy) != snap(x)).sum()) <= 1


def test_equal_values_snap_to_equal_bytes():
    x = np.array([0.1 + 0.2, 0.3, -0.0, 0.0, 1e-30])
    s = snap(x)
    assert s[0] == s[1]
    assert s[2:4].tobytes() == np.zeros(2).tobytes()  # -0.0 becomes 0.0


def test_non_finite_values_pass_through():
    s = snap([np.nan, np.inf, -np.inf, 2.5])
    assert np.isnan(s[0]) and s[1] == np.inf and s[2] == -np.inf and s[3] == 2.5
    assert snap(np.zeros(0)).shape == (0,)


def test_per_row_snap_does_not_depend_on_the_batch():
    """A sample's snapped projection must be the same alone or among others (inference
    embeds one image at a time, the stage thousands)."""
    X = np.random.default_rng(2).normal(size=(50, 8)) * np.logspace(-3, 3, 50)[:, None]
    batch = snap(X, axis=1)
    for i in (0, 17, 49):
        np.testing.assert_array_equal(snap(X[i:i + 1], axis=1)[0], batch[i])


def test_snap_relative_keeps_small_probabilities():
    p = np.array([1e-9, 1e-5, 0.5, 1 - 1e-9])
    s = snap_relative(p)
    assert np.all(s > 0) and np.all(np.abs(s - p) <= np.abs(p) * 2.0 ** -SNAP_BITS)


def _data(n=120, d=16, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    return X, y


def _on_grid(a):
    a = np.asarray(a, float)
    return np.array_equal(snap(a), a)


def test_canonical_fit_snaps_every_member():
    X, y = _data()
    cal = CalibratedClassifierCV(logistic_regression(1.0), method="sigmoid", cv=3,
                                 ensemble=False).fit(X.astype(float), y)
    canonical_fit(cal)
    for member in cal.calibrated_classifiers_:
        assert _on_grid(member.estimator.coef_)
        assert _on_grid([member.calibrators[0].a_]) and _on_grid([member.calibrators[0].b_])


def test_classifiers_fit_float32_embeddings_in_float64():
    """scikit-learn would solve a float32 problem in float32 (coefficients ±2e-7 across
    BLAS kernels, out-of-fold probabilities ±2.4e-3 after lbfgs): the model sees float64."""
    from triage.models import fit_weighted, make_classifier, positive_proba

    X, y = _data(d=64)
    labels = np.where(y == 1, "cancer", "normal")
    model = fit_weighted(make_classifier("logreg"), X, labels)
    assert model["clf"].coef_.dtype == np.float64 and _on_grid(model["clf"].coef_)
    same = fit_weighted(make_classifier("logreg"), X.astype(np.float64), labels)
    np.testing.assert_array_equal(model["clf"].coef_, same["clf"].coef_)
    p = positive_proba(model, X, "cancer")
    np.testing.assert_array_equal(p, snap_relative(p))


def test_canonical_reducer_is_float64_and_snapped():
    X, _ = _data()
    red = canonical_reducer(4, seed=0).fit(X)
    Z = red.transform(X)
    assert Z.dtype == np.float64 and red["pca"].components_.dtype == np.float64
    assert _on_grid(red["pca"].components_)
    np.testing.assert_array_equal(Z, snap(Z, axis=1))
    np.testing.assert_array_equal(red.fit_transform(X), Z)


# --------------------------------------------------------------------------- embedding paths
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kernels, precision, expected", [
    ("canonical", "fp32", CANONICAL_CPU),
    ("canonical", "auto", CANONICAL_CPU),      # canonical resolves auto to fp32 everywhere
    ("fast", "fp32", "cpu-onednn-fp32"),
    ("canonical", "bf16", "cpu-onednn-bf16"),  # no canonical bf16 path: said so
])
def test_fingerprint_records_the_numeric_path(kernels, precision, expected):
    fingerprint = Embedder("random", image_size=32, device="cpu", kernels=kernels,
                  precision=precision).fit().fingerprint_
    assert fingerprint["kernels"] == expected
    canonical = Embedder("random", image_size=32, device="cpu").fit().fingerprint_
    assert (fingerprint["fingerprint"] == canonical["fingerprint"]) == (expected == CANONICAL_CPU)


def test_unknown_kernels_value_is_a_clear_error():
    with pytest.raises(PipelineError, match="embed.kernels must be one of"):
        Embedder("random", image_size=32, device="cpu", kernels="turbo").fit()


def test_inference_re_embeds_cpu_vectors_on_the_cpu():
    """A model trained on canonical CPU vectors is served with canonical CPU vectors even
    where params say device: auto and a GPU exists (a GPU gives other last bits)."""
    params = {"weights": "random", "seed": 0, "image_size": 32, "precision": "fp32",
              "device": "auto", "kernels": "fast"}
    kw = embedder_kwargs(params, {"weights": "random", "weights_seed": 0, "image_size": 32,
                                  "precision": "fp32", "kernels": CANONICAL_CPU})
    assert kw["device"] == "cpu" and kw["kernels"] == "canonical"


EMBED_SCRIPT = r'''
import hashlib, sys
import numpy as np
from PIL import Image
from triage.embed import Embedder
tmp, kernels, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
paths = []
for i in range(6):
    a = (np.random.default_rng(i).random((size, size)) * 255).astype(np.uint8)
    paths.append(f"{tmp}/{i}.png"); Image.fromarray(a).save(paths[-1])
e = Embedder("random", seed=0, image_size=size, batch_size=4, num_workers=0, device="cpu",
             kernels=kernels).fit()
print(hashlib.sha256(e.transform(paths).tobytes()).hexdigest())
'''


def _embed_hash(tmp_path, kernels, size=48, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")}
    full.update(env, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", EMBED_SCRIPT, str(tmp_path), kernels, str(size)],
                         env=full,
                         capture_output=True, text=True, check=True)
    return res.stdout.strip()


def test_canonical_embedding_ignores_the_onednn_isa_and_threads(tmp_path):
    """Canonical vectors are the same under oneDNN's FMA-less AVX kernels and one thread;
    the fast path's are not, so the knob is real here (each embedder in a fresh process:
    oneDNN fixes its ISA at its first use)."""
    if not torch_avx2():
        pytest.skip("needs an AVX2 CPU")
    knob = {"ONEDNN_MAX_CPU_ISA": "AVX", "OMP_NUM_THREADS": "1"}
    assert _embed_hash(tmp_path, "canonical", **knob) == _embed_hash(tmp_path, "canonical")
    assert _embed_hash(tmp_path, "fast", **knob) != _embed_hash(tmp_path, "fast")


@pytest.mark.parametrize("size", [48, 224])
def test_onednn_avx2_and_avx512_kernels_give_the_same_bits(tmp_path, size):
    """What the canonical path rests on: capped at AVX512_CORE, an AVX-512 CPU runs
    oneDNN's avx512_core kernels and an AVX2 CPU its avx2 kernels; both must give the same
    vectors. Checked wherever the CPU has both (here: oneDNN limited to AVX2 by the fast
    path, which honours ONEDNN_MAX_CPU_ISA)."""
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("needs an AVX-512 CPU to run both kernel families")
    assert (_embed_hash(tmp_path, "fast", size, ONEDNN_MAX_CPU_ISA="AVX2")
            == _embed_hash(tmp_path, "canonical", size))


def test_canonical_embedding_refuses_a_process_whose_onednn_is_not_pinned():
    script = ("from triage.embed import Embedder\n"
              "Embedder('random', image_size=32, device='cpu', kernels='fast').fit()\n"
              "Embedder('random', image_size=32, device='cpu').fit()\n")
    env = {**{k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"},
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "embed in a new process" in res.stderr


def torch_avx2() -> bool:
    import torch

    return bool(torch.cpu._is_avx2_supported())


def test_canonical_embedding_refuses_kernels_that_miss_the_known_answer():
    """oneDNN started (by a convolution) before the embedder could cap it, under an
    FMA-less cap: the self-test catches it instead of writing other bits under the
    canonical fingerprint."""
    if not torch_avx2():
        pytest.skip("needs an AVX2 CPU")
    script = ("import torch, torch.nn.functional as F\n"
              "x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)\n"
              "F.conv2d(x, torch.randn(16, 16, 3, 3))\n"
              "from triage.embed import Embedder\n"
              "Embedder('random', image_size=32, device='cpu').fit()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONEDNN_MAX_CPU_ISA": "AVX"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "do not give the canonical bits" in res.stderr


def test_known_answer_matches_this_torch():
    """The table entry for the pinned torch must be what a fresh process computes (else
    every canonical embedding would be refused after a torch upgrade)."""
    import torch

    from triage.embed import CANONICAL_KNOWN_ANSWER

    script = ("import triage.embed as e\n"
              "e.start_onednn(True, check=False)\n"
              "print(e.kernel_self_test())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert CANONICAL_KNOWN_ANSWER.get(torch.__version__) == res.stdout.strip()
