"""Single-image latency of ``POST /predict``: the small-batch path against the old padding
to ``embed.batch_size``, side by side in one run, over a real HTTP server on loopback.

What it builds, in a temp folder (nothing in the checkout is read or written): a demo
(``triage.demo``, 128 px: 40 labelled, ``--pool`` unlabelled and ``--requests`` held-out
test images), the pipeline's default embedder (random ResNet18 seed 42, 128 px, batch 64,
``embed.kernels: canonical``), a logistic regression on the labelled vectors and the OOD
reference on labelled + pool (``triage.models.ood_reference``), saved as a skops bundle
with a params file pointing at it. Then ``triage.api.create_app`` on that bundle, served
by uvicorn on 127.0.0.1 in this process, with a Bearer token from a temp tokens file when
the API has authentication (``--no-auth`` otherwise), and an audit trail in the temp
folder.

Each test image is sent once per path, as one multipart upload; the paths alternate in
``--rounds`` rounds (order flipped each round), so both see the same machine load. The
**old** path is the same server with its embedder's ``small_batches_`` off: every image
padded to a batch of 64, as before. Latency is the client's wall time per request (HTTP,
QC, embedding, prediction, OOD check). Also checked: the served embedder's vector of each
image, alone, is byte-identical to the pipeline's (the image embedded in a batch of 64 at
the stage's padding), and the probabilities the API answers are those of the pipeline's
vectors.

Prints the CPU (lscpu Model name, AVX-512 or not), the load average, then p50 / p95 /
mean of each path and the p50 ratio. On a shared machine compare the two paths of one
run, not absolute seconds across runs.

    python benchmarks/api_latency.py                  # 50 requests per path
    python benchmarks/api_latency.py --requests 100 --pool 1406
"""
from __future__ import annotations

import argparse
import inspect
import os
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import yaml
from bench_machine import cpu

from triage.checkout import require_own_checkout

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 128


def build_model(tmp: Path, pool: int, n_requests: int) -> dict:
    """Demo → embeddings → logreg + OOD reference → bundle + params (the pipeline's embed.*)."""
    from triage.demo import generate_demo
    from triage.embed import Embedder
    from triage.models import make_classifier, ood_reference, save_model

    generate_demo(tmp / "demo", n_labeled=40, n_unlabeled=pool, n_test=n_requests,
                  image_size=IMAGE_SIZE, seed=1)
    labeled = sorted((tmp / "demo" / "labeled").glob("*/*.png"))
    unlabeled = sorted((tmp / "demo" / "unlabeled").glob("*.png"))
    requests = sorted((tmp / "demo" / "test").glob("*/*.png"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    e = params["embed"]
    emb = Embedder(e["weights"], seed=e["seed"], image_size=e["image_size"],
                   batch_size=e["batch_size"], device="cpu", kernels=e["kernels"],
                   precision=e["precision"], layers=e["layers"]).fit()
    emb.small_batches_ = False  # the embed stage's bytes as they always were: batches of 64
    X_lab = emb.transform([str(p) for p in labeled])
    X_pool = emb.transform([str(p) for p in unlabeled])
    X_req = emb.transform([str(p) for p in requests])
    y = np.array([p.parent.name for p in labeled])
    model = make_classifier("logreg", params["train"]["C"]).fit(X_lab, y)
    inf = params["inference"]
    bundle = {"model": model, "name": "semi_supervised", "positive_class": "cancer",
              "classes": [str(c) for c in model.classes_], "threshold": 0.5,
              "target_sensitivity": 0.95, "embedding_fingerprint": emb.fingerprint_["fingerprint"],
              "ood": ood_reference(np.r_[X_lab, X_pool], inf.get("ood_k", 5),
                                   inf.get("ood_quantile", 0.99))}
    model_path = tmp / "model" / "semi_supervised.skops"
    save_model(bundle, model_path)
    params["inference"]["model"] = str(model_path)
    params["embed"]["device"] = "cpu"
    if "rate_limit_per_minute" in inf:  # the benchmark sends far more than a client may
        params["inference"]["rate_limit_per_minute"] = 100_000
    params_path = tmp / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    return {"model": model_path, "params": params_path, "requests": requests, "X_req": X_req,
            "bundle": bundle, "fingerprint": emb.fingerprint_["fingerprint"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, built: dict):
    """create_app on the bundle (auth with a temp token where the API has it), uvicorn on
    loopback in a thread. Returns (base url, headers, the app's Predictor, server)."""
    import uvicorn

    import triage.api as api

    captured = {}
    original = api.Predictor.from_files

    def capture(*args, **kw):  # the app's Predictor, to switch its embedder's path
        captured["predictor"] = original(*args, **kw)
        return captured["predictor"]

    accepted = inspect.signature(api.create_app).parameters
    kw = {"metrics_path": tmp / "metrics.json", "lock_path": tmp / "dvc.lock",
          "embeddings_path": None}
    headers, auth = {}, "none in this API"
    if "audit_log" in accepted:
        kw["audit_log"] = tmp / "state" / "audit.jsonl"
    if "tokens_file" in accepted:
        from triage.access import add_token

        tokens = tmp / "secrets" / "api_tokens.json"
        headers["Authorization"] = f"Bearer {add_token(tokens, 'bench', 'predict')}"
        kw["tokens_file"], auth = tokens, "Bearer token (temp tokens file)"
    api.Predictor.from_files = capture
    try:
        app = api.create_app(built["model"], built["params"], **kw)
    finally:
        api.Predictor.from_files = original
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", headers, captured["predictor"], server, auth


def main(argv=None) -> None:
    require_own_checkout(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50, help="single-image requests per path")
    ap.add_argument("--pool", type=int, default=400, help="unlabelled demo images (OOD reference)")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the two paths")
    args = ap.parse_args(argv)
    import httpx

    model, avx512 = cpu()
    print(f"cpu: {model}; AVX-512 {'yes' if avx512 else 'no'}; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="api-latency-") as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(d)
        built = build_model(tmp, args.pool, args.requests)
        url, headers, predictor, server, auth = start_server(tmp, built)
        emb = predictor.embedder
        print(f"model: logreg on 40 labelled demo images, OOD reference of {40 + args.pool} "
              f"training vectors; embedding {built['fingerprint']} ({emb.kernels_}, "
              f"{emb.image_size} px, batch_size {emb.batch_size}); auth: {auth}")
        images = [p.read_bytes() for p in built["requests"]]
        times = {"new": [], "old": []}
        answers = {}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            def send(i):
                start = time.perf_counter()
                r = client.post("/predict", files={"file": ("scan.png", images[i], "image/png")})
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                return elapsed, r.json()

            for mode in ("new", "old"):  # warm-up: first-request allocations of each shape
                emb.small_batches_ = mode == "new"
                send(0)
            chunks = np.array_split(np.arange(len(images)), args.rounds)
            for r, chunk in enumerate(chunks):
                for mode in (("new", "old") if r % 2 == 0 else ("old", "new")):
                    emb.small_batches_ = mode == "new"
                    for i in chunk:
                        elapsed, body = send(int(i))
                        times[mode].append(elapsed)
                        answers.setdefault(mode, {})[int(i)] = body
        server.should_exit = True
        load_end = os.getloadavg()[0]
        # the bytes: each image alone through the served embedder (run at batch 2)
        emb.small_batches_ = True
        alone = np.concatenate([emb.transform([str(p)]) for p in built["requests"]])
        same = int(sum(a.tobytes() == b.tobytes() for a, b in zip(alone, built["X_req"])))
        from triage.models import positive_proba

        expected = positive_proba(built["bundle"]["model"], built["X_req"], "cancer")
        got = {m: np.array([answers[m][i]["probability"] for i in range(len(images))])
               for m in answers}
        agree = all(np.allclose(got[m], np.round(expected, 6), rtol=0, atol=1e-12) for m in got)
        n_ood = sum(bool(answers["new"][i].get("ood")) for i in range(len(images)))
    print(f"vectors: {same}/{len(images)} byte-identical to the pipeline's (one image at "
          f"batch {emb.run_size(1)} vs in a batch of {emb.batch_size}); API probabilities = the "
          f"pipeline vectors' {'for both paths' if agree else 'NOT for every request'}; "
          f"{n_ood}/{len(images)} held-out images answered ood")
    print(f"load average {load_end:.1f} at end")
    for mode, label in (("old", f"old (padded to batch {emb.batch_size})"),
                        ("new", f"new (batch {emb.run_size(1)})")):
        t = np.array(times[mode])
        print(f"{label:28s} n={len(t)}  p50 {np.percentile(t, 50):.3f} s  "
              f"p95 {np.percentile(t, 95):.3f} s  mean {t.mean():.3f} s")
    ratio = np.percentile(times["old"], 50) / np.percentile(times["new"], 50)
    print(f"p50 speedup {ratio:.2f}x")
    if same != len(images) or not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
