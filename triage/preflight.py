"""``python -m triage.preflight``: the checks that must pass before ``dvc repro``.

Two failures happen before any stage can explain them:

- a bad params.yaml key: DVC deletes a stage's outputs (its ``cache: false`` metrics too)
  before the stage refuses the key;
- a file name that is not UTF-8 under ``data.root`` (folder mode): DVC's state database
  cannot store it, so DVC would stop while hashing the folder with a codec error that names
  no file. The project's ``.dvcignore`` hides such names from DVC (one rule, matching them
  only) and ``prepare``, which walks the folder itself, quarantines each as
  ``non_utf8_filename``. DVC cannot see them, though, so one added on its own does not make
  ``prepare`` re-run: the preflight names each one and fails only when the rule is missing.

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
    is not UTF-8, relative to ``root`` as ``os.walk`` spells them (undecodable bytes as
    surrogates; ``io.path_text`` writes them escaped, ``scan_\\xff.png``)."""
    bad, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        for name in sorted(dirnames + filenames):
            if path_text(name) != name:
                bad.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(bad)


def dvc_sees(root: Path, names: list[str]) -> list[str]:
    """Those of ``names`` (relative to ``root``, as ``os.walk`` spells them) that DVC would
    try to hash: not matched by any ``.dvcignore`` of the repository around ``root``."""
    from dvc.fs import LocalFileSystem
    from dvc.ignore import DvcIgnoreFilter
    from dvc.repo import Repo

    try:
        repo_root = Repo.find_root(str(root))
    except Exception:  # not a DVC repository: nothing hashes the folder
        return []
    ignore = DvcIgnoreFilter(LocalFileSystem(), repo_root)
    seen = []
    for name in names:
        full = os.path.abspath(os.path.join(root, name))
        check = ignore.is_ignored_dir if os.path.isdir(full) else ignore.is_ignored_file
        if not check(full):
            seen.append(name)
    return seen


def _listed(root: str, names: list[str]) -> str:
    shown = "\n".join(f"  {root}/{path_text(n)}" for n in names[:20])
    return shown + (f"\n  ... and {len(names) - 20} more" if len(names) > 20 else "")


def preflight(params_path: str | Path = "params.yaml") -> str:
    """Raise PipelineError naming what would stop ``dvc repro`` unexplained; else a summary."""
    params = load_params(params_path)
    data = params["data"]
    if data["source"] != "folder" or not Path(data["root"]).is_dir():
        return f"{params_path}: valid"
    root = Path(data["root"])
    bad = non_utf8_names(root)
    if not bad:
        return f"{params_path}: valid; {root}: every name is UTF-8"
    rename = "Rename them (e.g. `convmv -f latin1 -t utf8 --notest`) to include them"
    unhidden = dvc_sees(root, bad)
    if unhidden:
        raise PipelineError(
            f"{len(unhidden)} name(s) under data.root are not UTF-8 and no .dvcignore rule hides "
            f"them: `dvc repro` would stop while hashing {root} without naming them. Restore the "
            f"project's .dvcignore rule for such names, or rename them:\n{_listed(root, unhidden)}")
    return (f"{params_path}: valid; {root}: {len(bad)} name(s) are not UTF-8. DVC skips them "
            f"(.dvcignore) and prepare quarantines each as non_utf8_filename; one added on its "
            f"own does not make prepare re-run. {rename}:\n{_listed(root, bad)}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        print(preflight(args[0] if args else "params.yaml"))
    except PipelineError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
