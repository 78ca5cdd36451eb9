"""``python -m triage.preflight``: the checks that must pass before ``dvc repro``.

Two failures happen before any stage can explain them:

- a bad params.yaml key: DVC deletes a stage's outputs (its ``cache: false`` metrics too)
  before the stage refuses the key;
- a file name that is not UTF-8 under ``data.root`` (folder mode): DVC stops while hashing
  the folder, before ``prepare`` runs, with a codec error that names no file. (Run by hand,
  ``prepare`` quarantines such a file as ``non_utf8_filename``; under DVC it never gets
  there.) The preflight names each one, so it can be renamed.

``.ci/run``, the workflow and ``scripts/review.sh`` run it first. Prints counts and escaped
names only under the data root (the names are what must be renamed).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import PipelineError
from .io import path_text
from .params import load_params


def non_utf8_names(root: Path) -> list[str]:
    """Paths under ``root`` (files or folders, symlinked folders followed once) whose name
    is not UTF-8, spelt with the undecodable bytes escaped (``scan_\\xff.png``)."""
    bad, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        for name in sorted(dirnames + filenames):
            if path_text(name) != name:
                bad.append(path_text(os.path.relpath(os.path.join(dirpath, name), root)))
    return sorted(bad)


def preflight(params_path: str | Path = "params.yaml") -> str:
    """Raise PipelineError naming what would stop ``dvc repro`` unexplained; else a summary."""
    params = load_params(params_path)
    data = params["data"]
    if data["source"] != "folder" or not Path(data["root"]).is_dir():
        return f"{params_path}: valid"
    bad = non_utf8_names(Path(data["root"]))
    if bad:
        listed = "\n".join(f"  {data['root']}/{b}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise PipelineError(
            f"{len(bad)} name(s) under data.root are not UTF-8: DVC cannot hash the folder and "
            f"`dvc repro` would stop before prepare without naming them. Rename them (e.g. "
            f"`convmv -f latin1 -t utf8 --notest`) or move them out of {data['root']}:\n"
            f"{listed}{more}")
    return f"{params_path}: valid; {data['root']}: every name is UTF-8"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        print(preflight(args[0] if args else "params.yaml"))
    except PipelineError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
