"""Stage `demo`: write the synthetic demo images (folder layout) and the hidden pool truth.

With data.source != demo it writes an empty layout, so the DAG is the same for both sources.
"""
import os
import shutil
from pathlib import Path

import pandas as pd

from triage.io import run_stage, sha256_file, write_parquet
from triage.params import load_params

OUT = Path("data/demo/raw")
TRUTH = Path("data/demo/pool_truth.parquet")


def main() -> None:
    params = load_params()
    data = params["data"]
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    truth = pd.DataFrame({"id": pd.Series(dtype=str), "label": pd.Series(dtype=str)})
    if data["source"] == "demo":
        from triage.demo import generate_demo

        d = data["demo"]
        pool = generate_demo(OUT, n_labeled=d["n_labeled"], n_unlabeled=d["n_unlabeled"],
                             n_test=d["n_test"], prevalence=d["prevalence"],
                             image_size=d["image_size"], difficulty=d["difficulty"],
                             benign_mass_rate=d["benign_mass_rate"], seed=data["seed"],
                             workers=os.cpu_count() or 1)  # bytes do not depend on workers
        # Keyed by content hash (the image id) so it joins with any manifest.
        truth = pd.DataFrame({"id": [sha256_file(OUT / p) for p in pool["path"]],
                              "label": pool["label"].tolist()})
    else:
        (OUT / "NOT_USED").write_text("data.source is not demo; images are read from data.root\n")
    write_parquet(truth.sort_values("id").reset_index(drop=True), TRUTH)


if __name__ == "__main__":
    run_stage(main)
