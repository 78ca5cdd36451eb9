"""Cold `dvc repro` of the demo: this working tree against a base revision, side by side.

Both are fresh repos (no outputs, no DVC cache) built in a temp dir, run alternately in
the same venv so machine noise hits both; the ratio of medians is what to read (the
limit for issue #12's canonical numerics: at most 1.10).

    python benchmarks/repro_time.py                 # base = HEAD, 2 rounds
    python benchmarks/repro_time.py --base 8459ad9 --rounds 3

Last line: ``repro time ratio X.XXx (limit 1.10x)``.
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
        for r in range(args.rounds):
            for name in (("base", "tree") if r % 2 == 0 else ("tree", "base")):
                times[name].append(cold_repro(repos[name], env))
                print(f"round {r + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"CPU: {cpu()}")
    print(f"base {args.base}: median {med['base']:.1f} s; working tree: median {med['tree']:.1f} s")
    print(f"repro time ratio {med['tree'] / med['base']:.2f}x (limit 1.10x)")


if __name__ == "__main__":
    main()
