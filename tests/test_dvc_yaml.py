"""dvc.yaml declares every code file a stage runs, so a code change re-runs the stage.

A missing dep is silent: `dvc status` says "up to date" while the committed results come
from older code. Imports are followed statically (AST) through the `triage` package.
"""
import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def triage_imports(path: Path) -> set[str]:
    """`triage/x.py` paths imported by a file (``from triage.x``, ``from .x``, ``import triage.x``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_package = path.parent.name == "triage"
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and in_package:
                names = [mod] if mod else [a.name for a in node.names]
            elif mod == "triage":
                names = [a.name for a in node.names]
            elif mod.startswith("triage."):
                names = [mod.split(".", 1)[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("triage.")]
        for name in names:
            file = ROOT / "triage" / f"{name.split('.')[0]}.py"
            if file.is_file():
                found.add(f"triage/{file.name}")
    return found


def closure(script: str) -> set[str]:
    todo, seen = [script], set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        todo.extend(triage_imports(ROOT / rel) - seen)
    # importing any triage module runs the package's __init__ (it sets MKL's reproducible
    # mode, which the embedding's bits depend on)
    if any(rel.startswith("triage/") for rel in seen):
        seen.add("triage/__init__.py")
    return seen


STAGES = {name: st for name, st in DVC["stages"].items()
          if re.match(r"python stages/\w+\.py", st["cmd"])}


def test_every_stage_is_a_script():
    assert set(STAGES) == set(DVC["stages"]), "stage commands should be `python stages/<x>.py`"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_every_code_file_it_runs(name):
    stage = STAGES[name]
    script = stage["cmd"].split()[1]
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
    missing = closure(script) - deps
    assert not missing, f"stage {name}: add {sorted(missing)} to its deps in dvc.yaml"


def test_closure_follows_relative_imports():
    # Guard the checker itself: the evaluate stage reaches triage/errors.py only through
    # another module, and triage/io.py imports it relatively.
    assert "triage/errors.py" in triage_imports(ROOT / "triage/io.py")
    assert "triage/io.py" in closure("stages/evaluate.py")
