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
    if script.startswith("stages/"):
        seen.add("stages/__init__.py")  # `python -m stages.<x>` runs the package first
    return seen


STAGE_CMD = re.compile(r"python -m stages\.(\w+)(\s|$)")
STAGES = {name: st for name, st in DVC["stages"].items() if STAGE_CMD.match(st["cmd"])}


def script_of(stage: dict) -> str:
    return f"stages/{STAGE_CMD.match(stage['cmd']).group(1)}.py"


def test_every_stage_is_a_script():
    # `python -m` puts the working directory first on sys.path, so a stage imports the
    # `triage` beside it: in a `dvc exp run --temp` copy, a CI clone or a test repo, not
    # the checkout the package was pip-installed (editable) from.
    assert set(STAGES) == set(DVC["stages"]), "stage commands should be `python -m stages.<x>`"
    for stage in STAGES.values():
        assert (ROOT / script_of(stage)).is_file()


def test_a_stage_command_imports_the_triage_beside_it(tmp_path):
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "triage", tmp_path / "triage")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "probe.py").write_text("import triage\nprint(triage.__file__)\n")
    cmd = STAGE_CMD.sub("python -m stages.probe", DVC["stages"]["train"]["cmd"]).split()
    out = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert Path(out).resolve().is_relative_to(tmp_path.resolve()), out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_every_code_file_it_runs(name):
    stage = STAGES[name]
    script = script_of(stage)
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
    missing = closure(script) - deps
    assert not missing, f"stage {name}: add {sorted(missing)} to its deps in dvc.yaml"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_no_code_file_it_does_not_run(name):
    # In DVC a module is the re-run unit: an extra code dep re-runs the stage for changes
    # that cannot affect it (e.g. the embedder's code for a stage that only reads vectors).
    stage = STAGES[name]
    script = script_of(stage)
    code = {d for d in (d if isinstance(d, str) else next(iter(d)) for d in stage["deps"])
            if re.fullmatch(r"(stages|triage)/\w+\.py", d)}
    extra = code - closure(script)
    assert not extra, f"stage {name}: {sorted(extra)} are deps in dvc.yaml but never imported"


# drift is not one: it embeds a new batch of images with the training embedder.
VECTOR_STAGES = ["cluster", "pseudo_label", "crossval", "train", "evaluate", "report",
                 "select"]


def test_stages_that_read_vectors_do_not_depend_on_the_embedder():
    for name in VECTOR_STAGES:
        assert "triage/embed.py" not in closure(script_of(STAGES[name])), name


def test_closure_follows_relative_imports():
    # Guard the checker itself: the evaluate stage reaches triage/errors.py only through
    # another module, and triage/io.py imports it relatively.
    assert "triage/errors.py" in triage_imports(ROOT / "triage/io.py")
    assert "triage/io.py" in closure("stages/evaluate.py")


def test_stages_that_read_vectors_never_import_torch():
    # torch costs ~1 s and ~600 MB RSS at start-up; these stages only read the vector store
    # (and load skops models, whose type scan would otherwise import torch).
    import subprocess
    import sys

    scripts = [script_of(STAGES[name]) for name in VECTOR_STAGES]
    code = ("import runpy, sys\n"
            f"for s in {scripts!r}:\n"
            "    runpy.run_path(s, run_name='imported')\n"
            "from triage.models import skops_io\nskops_io()\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_each_dep_once(name):
    deps = [d if isinstance(d, str) else next(iter(d)) for d in STAGES[name]["deps"]]
    assert len(deps) == len(set(deps)), f"stage {name}: {sorted(d for d in deps if deps.count(d) > 1)}"
