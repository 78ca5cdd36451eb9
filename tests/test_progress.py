"""Progress on stderr (triage/progress.py): the policy, and the long-work sites that use it.

Off a TTY (CI, `dvc repro > log 2>&1`) a bar is plain lines, each ending in "\\n", no "\\r",
at most one per interval plus the first and the final one; the env vars turn it off; the
text never holds a file name, id or path (health data); results do not change with it.
"""
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tqdm.std
import yaml
from imagefactory import write_png

from triage import progress as P

ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = ("TRIAGE_PROGRESS", "TRIAGE_PROGRESS_INTERVAL", "TQDM_DISABLE")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def fake_clock(monkeypatch) -> list[float]:
    """tqdm's clock, set by hand (``now[0] += s``): a long job in no time."""
    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    return now


def lines_of(text: str) -> list[str]:
    assert "\r" not in text
    assert text == "" or text.endswith("\n")
    return text.splitlines()


def progress_lines(stderr: str, desc: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{desc}:") and "%|" in line]


# --------------------------------------------------------------------------- the policy
@pytest.mark.parametrize("env, tty, shown", [
    ({}, False, "lines"),
    ({}, True, "tty"),
    ({"TRIAGE_PROGRESS": "1"}, False, "lines"),
    ({"TRIAGE_PROGRESS": "0"}, False, "off"),
    ({"TRIAGE_PROGRESS": "off"}, True, "off"),
    ({"TRIAGE_PROGRESS": "False"}, False, "off"),
    ({"TQDM_DISABLE": "1"}, False, "off"),
    ({"TQDM_DISABLE": "true"}, True, "off"),
    ({"TQDM_DISABLE": "0"}, False, "lines"),
])
def test_env_vars_and_tty_choose_the_display(monkeypatch, env, tty, shown):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = FakeTTY() if tty else io.StringIO()
    for _ in P.progress(range(50), total=50, desc="work", unit="img", file=out):
        pass
    text = out.getvalue()
    if shown == "off":
        assert text == ""
    elif shown == "tty":
        assert "\r" in text and "50/50" in text  # tqdm's in-place refresh
    else:
        lines = lines_of(text)
        assert lines[0].startswith("work:   0%|") and "50/50" in lines[-1]


def test_default_is_stderr_and_line_based_off_a_tty(capsys):
    with P.progress(total=3, desc="work", unit="img") as bar:
        bar.update(3)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = lines_of(captured.err)
    assert lines[-1].startswith("work: 100%|") and "3/3" in lines[-1]
    assert all(len(line) <= P.LINE_NCOLS for line in lines)  # fixed width, plain ASCII
    assert captured.err.isascii()


@pytest.mark.parametrize("interval, step_s, n, max_lines, min_lines", [
    # many fast updates: the first line and the final 100 % line, nothing between
    (None, 0.0001, 100_000, 3, 2),
    # a 200 s job at the default 30 s: ~one line per 30 s
    (None, 1.0, 200, 200 // 30 + 3, 200 // 30),
    ("10", 1.0, 200, 200 // 10 + 3, 200 // 10 - 2),
    ("junk", 1.0, 200, 200 // 30 + 3, 200 // 30),  # unreadable: the default
    ("0", 1.0, 20, 21, 21),  # every update
])
def test_lines_are_rate_limited_and_end_with_the_final_line(monkeypatch, interval, step_s, n,
                                                             max_lines, min_lines):
    if interval is not None:
        monkeypatch.setenv("TRIAGE_PROGRESS_INTERVAL", interval)
    now = fake_clock(monkeypatch)
    out = io.StringIO()
    for _ in P.progress(range(n), total=n, desc="embed", unit="img", file=out):
        now[0] += step_s  # one item's work
    lines = lines_of(out.getvalue())
    assert min_lines <= len(lines) <= max_lines, lines
    assert lines[-1].startswith("embed: 100%|") and f"{n}/{n}" in lines[-1]
    assert "img/s" in lines[-1] or "s/img" in lines[-1]


def test_batches_count_items_not_batches(monkeypatch):
    monkeypatch.setenv("TRIAGE_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    batches = [np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((2, 2))]
    got = list(P.progress_batches(iter(batches), total=10, desc="embed", unit="img", file=out))
    assert all(a is b for a, b in zip(got, batches)) and len(got) == 3
    assert [line.split("|")[2].split()[0] for line in lines_of(out.getvalue())] == \
        ["0/10", "4/10", "8/10", "10/10"]


def test_the_module_imports_only_tqdm_and_the_standard_library():
    code = ("import sys, triage.progress\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'numpy', 'pandas', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


# --------------------------------------------------------------------------- the use sites
SECRET = "PATIENT-7781"  # in every file name and id: must never reach the progress text


def _images(folder: Path, n: int) -> list[str]:
    return [str(write_png(folder / f"{SECRET}_{i}.png", size=(32, 32), seed=i)) for i in range(n)]


def site_qc_decode(tmp_path, workers):
    from triage.qc import inspect_all

    paths = _images(tmp_path / "img", 64 if workers > 1 else 6)
    return inspect_all(paths, max_pixels=10**8, workers=workers), "qc decode", len(paths)


CROSSVAL_PARAMS = {  # a fast chain: the confidence labeller, no clusters
    "pseudo": {"strategy": "confidence", "min_purity": 0.8, "min_support": 2,
               "confidence_threshold": 0.95, "C": 0.1, "balance_classes": False,
               "class_prior": None, "max_fraction": 0.5, "min_confidence": 0.5, "rounds": 2,
               "pca_components": 4, "n_neighbors": 8, "spreading_alpha": 0.2,
               "round_weight": 0.5, "seed": 0},
    "train": {"model": "logreg", "C": 0.1, "class_weight": "balanced", "calibration": "none",
              "pseudo_weighting": "confidence", "pseudo_weight_scale": 0.5, "cv_folds": 3,
              "seed": 0},
    "cluster": {"pca_components": 4, "k": 4, "seed": 0, "method": "kmeans", "k_min": 2,
                "k_max": 6, "min_cluster_size": 5},
}


def site_crossval(tmp_path):
    from triage.crossval import crossval_semisup

    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(1, 1, (10, 6)), rng.normal(-1, 1, (10, 6)), rng.normal(0, 1, (20, 6))]
    rows = pd.DataFrame({"id": [f"{SECRET}-{i}" for i in range(40)],
                         "split": ["labeled"] * 20 + ["unlabeled"] * 20,
                         "label": ["cancer"] * 10 + ["normal"] * 10 + [None] * 20})
    per_fold, _ = crossval_semisup(rows, X, CROSSVAL_PARAMS, "cancer", folds=2, repeats=2, seed=0)
    return per_fold, "crossval", 4  # fold fits: repeats x folds


def site_pretrain(tmp_path):
    import torch

    from triage.pretrain import PretrainConfig, pretrain_backbone

    x = torch.randint(0, 255, (4, 1, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    cfg = PretrainConfig(image_size=32, epochs=2, batch_size=4, threads=1, device="cpu")
    _, history, _ = pretrain_backbone(x, cfg, ids=[f"{SECRET}-{i}" for i in range(4)])
    return history, "pretrain", 2


def site_finetune(tmp_path):
    import torch

    from triage.finetune import FinetuneConfig, train_model

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (4, 1, 32, 32), dtype=torch.uint8, generator=g)
    cfg = FinetuneConfig(image_size=32, epochs=2, batch_size=4, mu=1, cv_folds=2, threads=1,
                         device="cpu", consistency=False)
    _, history, _ = train_model(x, [0, 1, 0, 1], x, cfg, ids_lab=[f"{SECRET}-{i}" for i in range(4)],
                                ids_pool=[f"{SECRET}-p{i}" for i in range(4)], fold_seed=0)
    return history, "finetune", 2


SITES = {
    "qc_decode_serial": lambda tmp: site_qc_decode(tmp, workers=1),
    "qc_decode_pool": lambda tmp: site_qc_decode(tmp, workers=2),
    "crossval": site_crossval,
    "pretrain": site_pretrain,
    "finetune": site_finetune,
}


@pytest.mark.parametrize("site", sorted(SITES))
def test_long_work_shows_progress_on_stderr_without_identifiers(site, tmp_path, capsys):
    _, desc, total = SITES[site](tmp_path)
    captured = capsys.readouterr()
    lines = progress_lines(captured.err, desc)
    assert lines, f"{site}: no progress on stderr:\n{captured.err}"
    assert "\r" not in captured.err
    assert lines[-1].startswith(f"{desc}: 100%|") and f"{total}/{total}" in lines[-1]
    assert len(lines) <= 3  # a fast job: first and final line (30 s interval)
    assert not progress_lines(captured.out, desc)
    for line in lines:
        assert SECRET not in line and str(tmp_path) not in line and ".png" not in line


@pytest.mark.parametrize("site", ["qc_decode_serial", "crossval"])
def test_progress_does_not_change_results(site, tmp_path, monkeypatch):
    shown, _, _ = SITES[site](tmp_path / "work")
    monkeypatch.setenv("TRIAGE_PROGRESS", "0")
    hidden, _, _ = SITES[site](tmp_path / "work")
    if isinstance(shown, pd.DataFrame):
        pd.testing.assert_frame_equal(shown, hidden)
    else:
        assert shown == hidden


def test_embed_stage_run_logs_progress_lines_in_images(tmp_path):
    """`python -m stages.embed` in a scratch workspace, stderr a pipe (like `dvc repro > log`)."""
    for rel in ("stages", "triage"):
        shutil.copytree(ROOT / rel, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["embed"].update(image_size=32, batch_size=4, num_workers=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    paths = _images(tmp_path / "data" / "raw", 10)
    clean = tmp_path / "data/qc/manifest_clean.parquet"
    clean.parent.mkdir(parents=True)
    pd.DataFrame({"id": [f"{SECRET}-{i}" for i in range(10)], "path": paths,
                  "split": ["labeled"] * 4 + ["unlabeled"] * 6,
                  "label": ["cancer", "normal"] * 2 + [None] * 6}).to_parquet(clean)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "DVCLIVE_TEST"}
    env.update(PYTHONPATH=str(tmp_path), TRIAGE_PROGRESS_INTERVAL="0")  # a line per batch
    res = subprocess.run([sys.executable, "-m", "stages.embed"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = progress_lines(res.stderr, "embed")
    assert [line.split("|")[2].split()[0] for line in lines] == \
        ["0/10", "4/10", "8/10", "10/10"], res.stderr
    assert "img/s" in lines[-1] or "s/img" in lines[-1]
    assert "\r" not in res.stderr and not progress_lines(res.stdout, "embed")
    assert SECRET not in res.stderr and str(tmp_path) not in res.stderr
    (tmp_path / "embed_stderr.txt").write_text(res.stderr)  # a sample, for a look by hand
