"""Generic CSV / JSONL manifests (the synthetic corpus writes both).

Columns (CSV header or JSONL keys): ``path`` (required; relative paths are resolved against
``video_root``, default the manifest's folder), ``key`` (default: the file stem),
``captions`` (a JSON list of strings; in CSV a JSON list string) or ``caption`` (one string),
``label`` (int, empty = none; or a JSON list of ints for multi-label data), ``label_name``,
``start``/``end`` (seconds, a window), ``split``. Other columns are kept in ``entry.meta``.
Class names come from ``classes`` (a file, one name per line), else ``classes.txt`` next to the
manifest, else the ``label``/``label_name`` pairs.

Every row needs a caption or a label: a ``captions`` list that is empty (``[]``) or holds a blank
caption is a bad row, and so is a row with neither a caption nor a label (an empty caption field
means "no caption": fine for a labelled recognition row). Bad rows raise :class:`FormatError`
``file:line: reason`` and the file is refused.

Multi-label: if any row's ``label`` is a list (``[0, 3]``, in CSV the JSON string ``"[0, 3]"``),
the data is multi-label and every entry's label becomes a tuple of class indices (an int ``2``
becomes ``(2,)``, a repeat counts once, ``[]`` or an empty field = no positive class).
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


def _captions(row: dict, path: Path, line: int) -> list[str] | None:
    """The row's captions, or None if it gives none (a recognition row); an empty list or a blank caption raises."""
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
        if not caps:
            raise FormatError(path, "empty caption list in column 'captions'", line=line)
        if any(not c.strip() for c in caps):
            raise FormatError(path, "blank caption in column 'captions'", line=line)
        return caps
    cap = row.get("caption")
    if cap is None or (isinstance(cap, str) and not cap.strip()):
        return None
    if not isinstance(cap, str):
        raise FormatError(path, f"column 'caption' must be a string, got {type(cap).__name__}", line=line)
    return [cap]


def _label(value: Any, path: Path, line: int) -> int | tuple[int, ...] | None:
    """``None``/``""`` -> None; an int (or its string) -> int; a list (or its JSON string) -> tuple of ints."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise FormatError(path, f"column 'label': {value[:60]!r} is not a JSON list", line=line) from None
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise FormatError(path, f"column 'label': a label list must hold integers, got {value!r:.60}", line=line)
        return tuple(dict.fromkeys(value))  # a repeat counts once; order kept
    if isinstance(value, bool):
        raise FormatError(path, f"column 'label': {value!r} is not an integer", line=line)
    return parse_int(value, path, line, "label")


def _entry(row: dict, path: Path, line: int, root: str | None) -> VideoEntry:
    rel = str(row["path"]).strip()
    if not rel:
        raise FormatError(path, "empty 'path'", line=line)
    label = _label(row.get("label"), path, line)
    captions = _captions(row, path, line)
    if captions is None and label is None:
        raise FormatError(path, "no caption and no label (a row needs a caption, a label, or both)", line=line)
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
        captions=captions or [],
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
    named = {e.label: e.meta.get("label_name") for e in entries if isinstance(e.label, int)}
    if not named or any(v is None for v in named.values()) or any(isinstance(e.label, tuple) for e in entries):
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
    kept = [(_entry(row, p, n, video_root), n) for n, row in rows if split is None or row.get("split") == split]
    entries = [e for e, _ in kept]
    if any(isinstance(e.label, tuple) for e in entries):  # multi-label data: every label a tuple
        for e in entries:
            e.label = (e.label,) if isinstance(e.label, int) else (e.label or ())
    names = _classes(entries, p, classes)
    for e, line in kept:
        if names is None or e.label is None:
            continue
        bad = [c for c in (e.label if isinstance(e.label, tuple) else (e.label,)) if not 0 <= c < len(names)]
        if bad:
            raise FormatError(p, f"label {bad[0]} of {e.key} is outside the {len(names)} classes", line=line)
        if isinstance(e.label, tuple) and "label_name" not in e.meta:
            e.meta["label_name"] = [names[c] for c in e.label]
    return FormatIndex(entries, names, f"manifest {p}")
