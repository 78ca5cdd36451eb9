"""Pipeline speed of the demo: this working tree against a base revision, side by side.

Both are fresh repos (no outputs, no DVC cache) built in a temp dir, run alternately in
the same venv so machine noise hits both. Measured per side:

- cold `dvc repro` (median of ``--rounds``; target <= 60 s on a 2-core machine),
- no-op `dvc repro` right after (target <= 2 s),
- for each stage, its start-up (the time to import what the stage imports, i.e. until its
  ``main()`` could start) and the peak RSS of a full run of the stage by hand; stages that
  only read vectors should start in < 1.5 s and stay < 400 MB.

    python benchmarks/repro_time.py                 # base = HEAD, 2 rounds
    python benchmarks/repro_time.py --base e4ac21c --rounds 3

Last line: ``repro time ratio X.XXx (limit 1.10x)`` (tree / base, medians).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "site-cache"),
               GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
               GIT_COMMITTER_EMAIL="b@b", TQDM_DISABLE="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _git(args: list[str], cwd: Path, env: dict) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True,
                          capture_output=True).stdout


def _finish(repo: Path, env: dict) -> Path:
    (repo / "dvc.lock").unlink(missing_ok=True)
    _git(["init", "-q"], repo, env)
    _git(["add", "-A"], repo, env)
    _git(["commit", "-qm", "bench"], repo, env)
    return repo


def tree_repo(dest: Path, env: dict) -> Path:
    """The working tree's tracked + untracked (not ignored) files."""
    listed = _git(["ls-files", "-co", "--exclude-standard"], ROOT, env).decode().splitlines()
    for rel in listed:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("metrics/", "data/demo/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return _finish(dest, env)


def rev_repo(rev: str, dest: Path, env: dict) -> Path:
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(_git(["archive", rev], ROOT, env))) as tar:
        tar.extractall(dest, filter="data")
    shutil.rmtree(dest / "metrics", ignore_errors=True)
    return _finish(dest, env)


def cold_repro(repo: Path, env: dict) -> float:
    for out in ("data", "reports", "metrics"):
        tracked = _git(["ls-files", out], repo, env).decode().split()
        for path in (repo / out).rglob("*") if (repo / out).is_dir() else ():
            if path.is_file() and path.relative_to(repo).as_posix() not in tracked:
                path.unlink()
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def noop_repro(repo: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


# Runs a command in a child and prints (wall seconds, the child's peak RSS in MB).
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
           "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
VECTOR_STAGES = ("cluster", "pseudo_label", "crossval", "train", "evaluate", "report", "select")


def stage_script(repo: Path, stage: str) -> Path:
    """The stage's script, whichever command form the revision uses."""
    import yaml

    cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    return repo / (cmd[1] if cmd[1] != "-m" else cmd[2].replace(".", "/") + ".py")


def stage_costs(repo: Path, env: dict) -> dict[str, tuple[float, float]]:
    """{stage: (start-up seconds, peak RSS MB of a full run)} after a repro."""
    import yaml

    out = {}
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        script = stage_script(repo, stage)
        # run_name other than __main__: the module's imports run, its main() does not
        starts = []
        for _ in range(3):
            t = time.perf_counter()
            # `-c` puts the working directory (the repo) first on sys.path
            subprocess.run([sys.executable, "-c",
                            f"import runpy; runpy.run_path({str(script)!r}, run_name='startup')"],
                           cwd=repo, env=env, check=True, capture_output=True)
            starts.append(time.perf_counter() - t)
        cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
        res = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, *cmd[1:]],
                             cwd=repo, env=env, check=True, capture_output=True, text=True)
        out[stage] = (sorted(starts)[1], float(res.stdout.split()[1]))
    return out


def cpu() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), "unknown CPU")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {isa}{' + bf16' if 'avx512_bf16' in flags else ''}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as tmp:
        tmp = Path(tmp)
        env = _env(tmp)
        repos = {"base": rev_repo(args.base, tmp / "base", env),
                 "tree": tree_repo(tmp / "tree", env)}
        times: dict[str, list[float]] = {"base": [], "tree": []}
        noop: dict[str, list[float]] = {"base": [], "tree": []}
        for r in range(args.rounds):
            for name in (("base", "tree") if r % 2 == 0 else ("tree", "base")):
                times[name].append(cold_repro(repos[name], env))
                noop[name].append(noop_repro(repos[name], env))
                print(f"round {r + 1} {name}: cold {times[name][-1]:.1f} s, "
                      f"no-op {noop[name][-1]:.2f} s", flush=True)
        costs = {name: stage_costs(repo, env) for name, repo in repos.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    med_noop = {k: sorted(v)[len(v) // 2] for k, v in noop.items()}
    print(f"CPU: {cpu()}")
    print("| stage | start-up base (s) | start-up tree (s) | peak RSS base (MB) | peak RSS tree (MB) |")
    print("|---|---|---|---|---|")
    for stage, (start, rss) in costs["tree"].items():
        b_start, b_rss = costs["base"].get(stage, (float("nan"), float("nan")))
        mark = " *" if stage in VECTOR_STAGES else ""
        print(f"| {stage}{mark} | {b_start:.2f} | {start:.2f} | {b_rss:.0f} | {rss:.0f} |")
    vec = [costs["tree"][s] for s in VECTOR_STAGES if s in costs["tree"]]
    print(f"* reads vectors only: start-up max {max(v[0] for v in vec):.2f} s (target < 1.5 s), "
          f"peak RSS max {max(v[1] for v in vec):.0f} MB (target < 400 MB)")
    print(f"no-op repro: base {med_noop['base']:.2f} s, tree {med_noop['tree']:.2f} s (target <= 2 s)")
    print(f"cold repro: base {args.base} median {med['base']:.1f} s; working tree median "
          f"{med['tree']:.1f} s (target <= 60 s)")
    print(f"repro time ratio {med['tree'] / med['base']:.2f}x (limit 1.10x)")


if __name__ == "__main__":
    main()
