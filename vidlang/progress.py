"""Progress that suits where the output goes: live bars on a terminal, plain lines in a log file or CI.

A live bar redraws itself with carriage returns; written to a file it becomes thousands of updates on one
"line". Outside a terminal (stderr not a TTY) vidlang prints plain lines instead: :func:`progress` (the tqdm
bars of long commands) prints one line per ``every`` percent, and
:class:`vidlang.cli.progress_bar.LineProgressBar` (Lightning ``fit``/``validate``/``test``, the demo) one
line per epoch, per validation / test run and, in long epochs, per ``every`` percent at most every
``min_interval_s`` seconds. Lines go to stderr (stdout is flushed first, so a log that merges both keeps the
order). ``VIDLANG_PROGRESS=lines`` or ``bars`` overrides the detection.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

PROGRESS_ENV = "VIDLANG_PROGRESS"


def interactive(stream: Any = None) -> bool:
    """Whether live bars suit ``stream`` (default stderr): a TTY, unless ``VIDLANG_PROGRESS`` says otherwise."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("lines", "line", "plain"):
        return False
    if forced in ("bars", "bar", "tty"):
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def emit(line: str) -> None:
    """One progress line on stderr (after flushing stdout, so that merged logs keep their order)."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}" if minutes >= 60 else f"{minutes}:{sec:02d} min"


class LineProgress:
    """A tqdm-like counter that prints a line at every ``every`` percent of ``total`` (without a total: at most
    every ``min_interval_s`` seconds) and a summary when closed. Supports ``update``, ``write``, ``close``,
    iteration and ``with``."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, every: float = 10.0, min_interval_s: float = 30.0) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.every, self.min_interval_s = disable, every, min_interval_s
        self.n = 0
        self.start = self._last = time.monotonic()
        self._next_pct = every
        self._closed = False

    def _label(self) -> str:
        return f"{self.desc}: " if self.desc else ""

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        if self.total:
            pct = 100.0 * self.n / self.total
            if pct >= self._next_pct and self.n < self.total:
                took = _duration(now - self.start)
                emit(f"{self._label()}{self.n:g}/{self.total:g} {self.unit} ({pct:.0f}%, {took})")
                self._next_pct = (math.floor(pct / self.every) + 1) * self.every
                self._last = now
        elif now - self._last >= self.min_interval_s:
            emit(f"{self._label()}{self.n:g} {self.unit} ({_duration(now - self.start)})")
            self._last = now

    def write(self, text: str) -> None:
        emit(text)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:  # tqdm API; nothing to redraw
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable:
            took = time.monotonic() - self.start
            rate = f", {self.n / took:.1f} {self.unit}/s" if took > 0 and self.n else ""
            of = f"/{self.total:g}" if self.total is not None else ""
            emit(f"{self._label()}{self.n:g}{of} {self.unit} done in {_duration(took)}{rate}")

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, every: float = 10.0) -> Any:
    """A tqdm bar on a terminal, else a :class:`LineProgress` (same arguments as tqdm's)."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, every=every)
