"""benchmarks/embed_throughput.py keeps its contract: a share of the model-only limit, then
``speedup X.XXx`` last (tiny settings: it checks the output, not the speed)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_embed_benchmark_reports_model_only_limit_and_speedup_last():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # a fresh process: the canonical kernels cap oneDNN before its first use
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "embed_throughput.py"), "--n", "6",
         "--image-size", "32", "--batch-size", "4", "--rounds", "1", "--workers", "0"],
        capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup \d+\.\d\dx", lines[-1]), lines[-1]
    assert any(re.search(r"of model-only limit \d\.\d\d$", line) for line in lines), res.stdout
    assert lines[0].startswith("cpu: ") and "AVX-512 " in lines[0]
    assert any("precision fp32" in line and "kernels canonical" in line for line in lines)
    assert "model-only = pipeline bit for bit: yes" in res.stdout
