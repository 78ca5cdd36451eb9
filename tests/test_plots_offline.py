"""`dvc plots show/diff` pages draw offline: templates/plots.html inlines Vega, Vega-Lite and
vega-embed (scripts/plots_template.py, docs/plots.md) and .dvc/config makes it DVC's default.

The end-to-end tests run the real DVC on a copy of the session's reproduced TINY pipeline and
render its page in headless Chromium with the network cut (browser.NETWORK_OFF).
"""
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from browser import dump_dom, needs_chromium
from dvc_render.base import Renderer
from helpers import clone_repo, run

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "templates/plots.html"
# a tag loading a script, stylesheet, frame or image from the network (or protocol-relative)
NETWORK_SRC = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""",
                         re.IGNORECASE)
# every plot of dvc.yaml, by the div id DVC gives it (12 today: 11 Vega, one image)
PLOTS = {Renderer.remove_special_chars(p if isinstance(p, str) else next(iter(p)))
         for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]}
# committed benchmark curves (benchmarks/active_learning.py, not a stage): not in the TINY repo
BENCHMARK = "metrics/active_learning/plots/custom"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class Plots(HTMLParser):
    """Each plot div of a dumped DVC page (a <div id=...> child of <body>): its attributes, its
    <img> sources and how many shapes Vega drew inside data-mark groups (<g class="... role-mark">,
    not axes, legends or titles)."""

    def __init__(self, dom: str):
        super().__init__()
        self.plots: dict[str, dict] = {}
        self._stack: list[tuple[str, bool]] = []  # (tag, inside a role-mark group)
        self._plot = None
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        in_mark = bool(self._stack and self._stack[-1][1])
        if tag == "div" and "id" in attrs and [t for t, _ in self._stack] == ["html", "body"]:
            self._plot = self.plots[attrs["id"]] = {"attrs": attrs, "shapes": 0, "images": []}
        elif self._plot is not None:
            if in_mark and tag != "g":
                self._plot["shapes"] += 1
            if tag == "img":
                self._plot["images"].append(attrs.get("src", ""))
        if tag not in VOID:
            classes = (attrs.get("class") or "").split()
            self._stack.append((tag, in_mark or (tag == "g" and "role-mark" in classes)))

    def handle_endtag(self, tag):
        while self._stack:  # pop to the matching start tag (the dump is well formed)
            if self._stack.pop()[0] == tag:
                break
        if len(self._stack) == 2 and tag == "div":
            self._plot = None


def undrawn(plots: dict) -> dict[str, str]:
    """Plot id → why it is not drawn, for every Vega plot lacking marks."""
    bad = {}
    for pid, p in plots.items():
        if p["images"]:
            continue
        a = p["attrs"]
        if "vega-embed" not in (a.get("class") or "").split():
            bad[pid] = "vegaEmbed never ran"
        elif a.get("data-error"):
            bad[pid] = a["data-error"]
        elif not int(a.get("data-marks") or 0) or not p["shapes"]:
            bad[pid] = f"no marks (scenegraph {a.get('data-marks')}, svg shapes {p['shapes']})"
    return bad


def test_committed_template_is_the_generated_one_and_needs_no_network(tmp_path):
    out = tmp_path / "plots.html"
    res = subprocess.run([sys.executable, "-m", "scripts.plots_template", str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert TEMPLATE.read_bytes() == out.read_bytes(), \
        "templates/plots.html is stale or hand-edited: run `python -m scripts.plots_template`"
    page = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # {scripts}: DVC's CDN tags
    assert "window.vegaEmbed=" in page
    assert not NETWORK_SRC.findall(page)


def test_dvc_config_makes_it_the_default_template():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:  # DVC joins a relative html_template to .dvc/
        configured = repo.config["plots"]["html_template"]
        assert (Path(repo.dvc_dir) / configured).resolve() == TEMPLATE


@pytest.fixture(scope="module")
def plots_repo(tiny_pipeline, tmp_path_factory):
    # `dvc plots` writes DVC's state under .dvc/tmp: a copy, never the shared repo
    repo = clone_repo(tiny_pipeline.repo, tmp_path_factory.mktemp("plots") / "repo")
    shutil.copytree(ROOT / BENCHMARK, repo / BENCHMARK, dirs_exist_ok=True)  # so the page has all of dvc.yaml's plots
    return repo, tiny_pipeline.env


def render(repo: Path, env: dict, args: list[str], tmp: Path) -> tuple[str, dict]:
    run(["dvc", "plots", *args, "--out", str(tmp / "out")], repo, env)
    page = tmp / "out/index.html"
    dom = dump_dom(page, tmp / "profile", offline=True, budget_ms=10000)
    return page.read_text(encoding="utf-8"), Plots(dom).plots


@needs_chromium
@pytest.mark.parametrize("args", [["show"], ["diff", "HEAD"]], ids=["show", "diff"])
def test_dvc_plots_page_draws_every_plot_offline(plots_repo, args, tmp_path):
    repo, env = plots_repo
    html, plots = render(repo, env, args, tmp_path)  # bare: the template comes from .dvc/config
    assert not NETWORK_SRC.findall(html)
    assert set(plots) == set(re.findall(r'<div\s+id\s*=\s*"([^"]+)"', html)) == PLOTS
    assert undrawn(plots) == {}
    images = [src for p in plots.values() for src in p["images"]]
    assert images and all((tmp_path / "out" / src).read_bytes()[:4] == b"\x89PNG" for src in images)


@needs_chromium
def test_dvc_default_template_draws_nothing_offline(plots_repo, tmp_path):
    # the check above is real: DVC's own page (CDN scripts) draws no plot with the network cut
    from dvc_render.html import PAGE_HTML

    repo, env = plots_repo
    default = tmp_path / "dvc_default.html"
    default.write_text(PAGE_HTML, encoding="utf-8")
    html, plots = render(repo, env, ["show", "--html-template", str(default)], tmp_path)
    assert "cdn.jsdelivr.net" in html
    vega = {pid for pid, p in plots.items() if not p["images"]}
    assert set(plots) == PLOTS and vega
    assert undrawn(plots) == dict.fromkeys(vega, "vegaEmbed never ran")
