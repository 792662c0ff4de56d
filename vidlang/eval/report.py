"""Evaluation reports on disk: ``{stage}_metrics.json`` (the last evaluation) and ``{stage}_metrics_history.jsonl``
(one line per evaluation), written by the tasks' rank 0 (:meth:`vidlang.tasks.base.VideoTask.publish_report`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vidlang.io import append_line, atomic_write_text


def write_metrics(out_dir: str | Path, stage: str, report: Mapping[str, Any],
                  history: Mapping[str, Any] | None = None) -> Path:
    """Write ``report`` to ``out_dir/{stage}_metrics.json`` (atomically) and append ``history`` (default: the report
    itself) as a line of ``{stage}_metrics_history.jsonl``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stage}_metrics.json"
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    append_line(out / f"{stage}_metrics_history.jsonl", json.dumps(report if history is None else history))
    return path
