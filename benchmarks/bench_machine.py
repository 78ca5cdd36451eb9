"""The CPU a benchmark ran on, for the record beside its figures (lscpu's fields)."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def lscpu_fields() -> dict[str, str]:
    """lscpu's ``Field: value`` lines as a dict (empty where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    return {k.strip(): v.strip() for k, v in
            (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def cpu() -> tuple[str, bool]:
    """CPU model (lscpu's Model name) and whether it has AVX-512 (the avx512f flag)."""
    fields = lscpu_fields()
    model = fields.get("Model name") or platform.processor() or platform.machine()
    flags = fields.get("Flags", "")
    if not flags and Path("/proc/cpuinfo").is_file():
        flags = Path("/proc/cpuinfo").read_text()
    return model, " avx512f" in f" {flags}"
