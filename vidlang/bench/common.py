"""Helpers shared by the benchmarks: the machine's load, interleaved (round-robin) timing, peak memory, and the
``--json`` file every benchmark can write its results to.

On a shared machine absolute times drift with the other load; the benchmarks therefore time the things they
compare in turn (round-robin), so that each ratio is measured under the same load, and print the load average
next to every table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def load_average() -> str:
    """``"load 1.23 / 1.10 / 0.98 (2 cores)"``: the 1/5/15-minute load averages and the core count."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # not available on this platform
        return f"load n/a ({os.cpu_count()} cores)"
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f} ({os.cpu_count()} cores)"


def interleaved_times(
    runners: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each runner: ``warmup`` untimed rounds, then ``rounds`` rounds that call every runner
    once in turn (round-robin, so each sees the same machine load)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory (MB) of this process (or of its finished children) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``: also write the benchmark's results there (:func:`write_json`)."""
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results to this JSON file (with the arguments, load and time)")


def write_json(path: Path | None, benchmark: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` (nothing when ``None``) next to what produced them: the benchmark's name and
    arguments, the UTC time, the load averages and the core count; written whole or not at all."""
    if path is None:
        return
    from vidlang.io import atomic_write_text

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    arguments = {k: v for k, v in vars(args).items() if k != "json" and not callable(v)}
    payload = {"benchmark": benchmark, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "load_average": load, "cores": os.cpu_count(), "args": arguments, **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
