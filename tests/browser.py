"""Headless Chromium for render tests (Debian package `chromium`; tests skip without it)."""
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="chromium not installed (Debian package `chromium`)")

# No name resolves (localhost excepted) and every http(s) request, IP literals included, goes to
# a proxy nobody listens on: a page that needs the network fails as it would offline.
NETWORK_OFF = ("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
               "--proxy-server=http://127.0.0.1:9")


def dump_dom(page: Path, profile: Path, *, offline: bool = False,
             budget_ms: int | None = None) -> str:
    """Render a local page headless (no network) and return the DOM after scripts ran.

    ``offline``: also cut the network for real (NETWORK_OFF); ``budget_ms``: virtual time the
    page's scripts (promises, timers) get before the dump."""
    extra = [*(NETWORK_OFF if offline else ()),
             *([f"--virtual-time-budget={budget_ms}"] if budget_ms is not None else [])]
    res = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", *extra,
         f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout
