"""Which checkout a script runs: its own, never another one's installed package.

A script run by path (``python scripts/predict.py``, ``python benchmarks/x.py``) has its own
folder first on sys.path, not the repository root, so ``import triage`` finds the checkout
that ran ``pip install -e .``. With a second worktree or clone sharing that environment it
would silently run the other checkout's code: refuse, with the fix.
"""
from __future__ import annotations

from pathlib import Path

from .errors import PipelineError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def require_own_checkout(script: str | Path) -> None:
    """PipelineError unless ``script`` (a ``__file__`` one folder below a repo root) and the
    imported ``triage`` package belong to the same checkout."""
    root = Path(script).resolve().parents[1]
    if root != PACKAGE_ROOT:
        raise PipelineError(
            f"{Path(script).name} belongs to the checkout {root} but imports triage from "
            f"{PACKAGE_ROOT} (the one installed with `pip install -e`). Run it from its own "
            f"checkout: `cd {root} && python -m {Path(script).parent.name}.{Path(script).stem}`, "
            f"or `pip install -e {root}`.")
