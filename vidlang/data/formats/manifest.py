"""Generic CSV / JSONL manifests (the synthetic corpus writes both).

Columns (CSV header or JSONL keys): ``path`` (required; relative paths are resolved against
``video_root``, default the manifest's folder), ``key`` (default: the file stem),
``captions`` (a JSON list of strings; in CSV a JSON list string) or ``caption`` (one string),
``label`` (int, empty = none), ``label_name``, ``start``/``end`` (seconds, a window),
``split``. Other columns are kept in ``entry.meta``. Class names come from ``classes``
(a file, one name per line), else ``classes.txt`` next to the manifest, else the
``label``/``label_name`` pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vidlang.data.formats.base import (
    FORMATS,
    FormatError,
    parse_float,
    parse_int,
    read_class_names,
    read_csv,
    read_jsonl,
    resolve,
)
from vidlang.data.sample import FormatIndex, VideoEntry

_KNOWN = {"path", "key", "captions", "caption", "label", "label_name", "start", "end", "split"}


def _captions(row: dict, path: Path, line: int) -> list[str]:
    raw = row.get("captions")
    if raw not in (None, ""):
        caps = raw
        if isinstance(raw, str):
            try:
                caps = json.loads(raw)
            except json.JSONDecodeError:
                raise FormatError(path, f"column 'captions' is not a JSON list: {raw[:60]!r}", line=line) from None
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise FormatError(path, "column 'captions' must be a JSON list of strings", line=line)
        return caps
    cap = row.get("caption")
    return [cap] if cap not in (None, "") else []


def _entry(row: dict, path: Path, line: int, root: str | None) -> VideoEntry:
    rel = str(row["path"]).strip()
    if not rel:
        raise FormatError(path, "empty 'path'", line=line)
    label = row.get("label")
    label = None if label in (None, "") else parse_int(label, path, line, "label")
    window = None
    if row.get("start") not in (None, "") or row.get("end") not in (None, ""):
        start, end = parse_float(row.get("start"), path, line, "start"), parse_float(row.get("end"), path, line, "end")
        if not end > start:
            raise FormatError(path, f"window end {end} <= start {start}", line=line)
        window = (start, end)
    meta = {k: v for k, v in row.items() if k not in _KNOWN}
    if row.get("label_name") not in (None, ""):
        meta["label_name"] = row["label_name"]
    return VideoEntry(
        source=resolve(root, rel, path.parent),
        key=str(row.get("key") or Path(rel).stem),
        captions=_captions(row, path, line),
        window=window,
        label=label,
        meta=meta,
    )


def _classes(entries: list[VideoEntry], path: Path, classes: str | None) -> list[str] | None:
    if classes is not None:
        return read_class_names(classes)
    default = path.parent / "classes.txt"
    if default.is_file():
        return read_class_names(default)
    named = {e.label: e.meta.get("label_name") for e in entries if e.label is not None}
    if not named or any(v is None for v in named.values()):
        return None
    n = max(named) + 1
    return [str(named.get(i, f"class_{i}")) for i in range(n)]


@FORMATS.register("manifest")
def read_manifest(
    path: str, video_root: str | None = None, split: str | None = None, classes: str | None = None
) -> FormatIndex:
    """Read a CSV (``.csv``) or JSON-lines (``.jsonl``/``.json``) manifest; keep rows of ``split`` if given."""
    p = Path(path)
    rows: Any = read_jsonl(p, ("path",)) if p.suffix in (".jsonl", ".json") else read_csv(p, ("path",), "manifest")
    entries = [_entry(row, p, n, video_root) for n, row in rows if split is None or row.get("split") == split]
    names = _classes(entries, p, classes)
    if names is not None:
        for e in entries:
            if e.label is not None and not 0 <= e.label < len(names):
                raise FormatError(p, f"label {e.label} of {e.key} is outside the {len(names)} classes")
    return FormatIndex(entries, names, f"manifest {p}")
