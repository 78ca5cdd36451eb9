"""Progress of long work (embedding, crossval folds, epochs, QC decode): the policy, once.

A bar on stderr only (never stdout, never an output file), so results stay byte-identical;
it touches no RNG and does not reorder work. On a TTY: tqdm's normal in-place refresh.
Otherwise (CI, ``dvc repro > log 2>&1``): one plain ASCII line per update, ending in "\\n"
with no "\\r", at most every ``TRIAGE_PROGRESS_INTERVAL`` seconds (default 30), plus the
first (0 %) and the final line. ``TRIAGE_PROGRESS=0`` or ``TQDM_DISABLE=1`` turns it off.

The text is counts, rates, elapsed time, ETA and a fixed stage description: never a file
name, id or path (health data: no identifiers in logs), so this API takes no postfix.
Imports only tqdm and the standard library (stages that read vectors never import torch).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sized

from tqdm import tqdm

DEFAULT_INTERVAL_S = 30.0
LINE_NCOLS = 80
OFF = {"0", "false", "no", "off"}


class _Bar(tqdm):
    # no monitor thread: nothing runs beside the work (decode pools and DataLoaders fork)
    monitor_interval = 0


class _LineBar(_Bar):
    # The last count's line comes from close(), with the whole run's mean rate: a refresh at
    # 100 % would print it twice.
    def refresh(self, *args, **kwargs):
        if self.total is None or self.n < self.total:
            super().refresh(*args, **kwargs)


class _Lines:
    """A log file for tqdm: each status it draws becomes one line (tqdm's "\\r", padding
    and closing "\\n" are dropped); a line identical to the previous one is not repeated."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, s: str) -> None:
        text = s.replace("\r", "").replace("\x1b[A", "").strip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def enabled() -> bool:
    if os.environ.get("TRIAGE_PROGRESS", "").strip().lower() in OFF:
        return False
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in OFF | {""}


def interval_s() -> float:
    """Seconds between two lines when stderr is not a TTY (``TRIAGE_PROGRESS_INTERVAL``)."""
    try:
        value = float(os.environ.get("TRIAGE_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def progress(iterable: Iterable | None = None, *, total: int, desc: str, unit: str,
             file=None) -> tqdm:
    """A tqdm bar on ``file`` (default: stderr) following the policy above: iterate it, or
    call ``update(n)``; use it as a context manager (or exhaust it) so the final line prints."""
    file = sys.stderr if file is None else file
    if not enabled():
        return _Bar(iterable, total=total, disable=True)
    if getattr(file, "isatty", lambda: False)():
        return _Bar(iterable, total=total, desc=desc, unit=unit, file=file, miniters=1,
                    disable=False)
    every = interval_s()
    return _LineBar(iterable, total=total, desc=desc, unit=unit, file=_Lines(file), ascii=True,
                    ncols=LINE_NCOLS, dynamic_ncols=False, mininterval=every, maxinterval=every,
                    miniters=1, position=0, disable=False)


def progress_batches(batches: Iterable[Sized], *, total: int, desc: str, unit: str,
                     file=None) -> Iterator:
    """Yield ``batches`` unchanged, counting ``len(batch)`` items each (images, not batches)."""
    with progress(total=total, desc=desc, unit=unit, file=file) as bar:
        for batch in batches:
            bar.update(len(batch))
            yield batch
