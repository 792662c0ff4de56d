"""HowToCaption: timestamped captions, one (window, caption) per item.

* pickle ``{video_id: {'start': [s, ...], 'end': [s, ...], 'text': [[caption, ...], ...]}}``
  (aligned lists, starts not sorted). The unfiltered release stores ``(caption, score)``
  tuples instead of strings; scores are kept in ``entry.meta['scores']``.
  Loaded with a restricted unpickler: only builtin containers, strings and numbers are
  allowed, any other class is refused (a pickle can run code; these never need to).
* parquet ``video_id, description: list<struct<start, end, text: list<string>>>``.
* CSV ``video_id, video_path`` mapping ids to files (relative to ``video_root``).

Each window becomes one entry whose ``captions`` are the window's alternatives:
the dataset picks a random one when training and the first at evaluation
(``eval_captions="first"``). Videos missing from the CSV are skipped and counted in the
index description (``missing_videos``).
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

from vidlang.data.formats.base import FORMATS, FormatError, existing_file, read_csv, resolve
from vidlang.data.sample import FormatIndex, VideoEntry

_SAFE_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool", "complex"}


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only builtin containers/str/numbers allowed")


def safe_load_pickle(path: str | Path, what: str = "HowToCaption pickle") -> Any:
    """Unpickle a file that may only contain builtin containers, strings and numbers."""
    p = existing_file(path, what)
    try:
        with open(p, "rb") as f:
            return _BuiltinsOnly(io.BufferedReader(f)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise FormatError(p, f"cannot load pickle: {e}") from None


def _texts(items: Any, where: str, path: Path) -> tuple[list[str], list[float] | None]:
    """A window's captions; ``(caption, score)`` tuples (unfiltered variant) are split apart."""
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, (list, tuple)) or not items:
        raise FormatError(path, f"{where}: 'text' must be a non-empty list of captions")
    caps, scores = [], []
    for it in items:
        text = it if isinstance(it, str) else it[0] if isinstance(it, (list, tuple)) and it else None
        if isinstance(text, str) and not text.strip():
            raise FormatError(path, f"{where}: blank caption")
        if isinstance(it, str):
            caps.append(it)
        elif isinstance(it, (list, tuple)) and len(it) == 2 and isinstance(it[0], str):
            caps.append(it[0])
            scores.append(float(it[1]))
        else:
            raise FormatError(path, f"{where}: caption must be a string or (caption, score), got {it!r:.60}")
    return caps, (scores if scores else None)


def _windows_from_pickle(data: Any, path: Path) -> dict[str, list[tuple[float, float, Any]]]:
    if not isinstance(data, dict):
        raise FormatError(path, f"expected a dict video_id -> annotations, got {type(data).__name__}")
    out: dict[str, list[tuple[float, float, Any]]] = {}
    for vid, ann in data.items():
        if not isinstance(ann, dict) or not {"start", "end", "text"} <= set(ann):
            raise FormatError(path, f"video {vid!r}: expected keys 'start', 'end', 'text'")
        s, e, t = ann["start"], ann["end"], ann["text"]
        if not (len(s) == len(e) == len(t)):
            raise FormatError(path, f"video {vid!r}: start/end/text lengths differ ({len(s)}, {len(e)}, {len(t)})")
        out[str(vid)] = list(zip(s, e, t, strict=True))
    return out


def _windows_from_parquet(path: Path) -> dict[str, list[tuple[float, float, Any]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(existing_file(path, "HowToCaption parquet"))
    missing = {"video_id", "description"} - set(table.column_names)
    if missing:
        raise FormatError(path, f"missing column(s) {sorted(missing)}; columns are {table.column_names}")
    out: dict[str, list[tuple[float, float, Any]]] = {}
    columns = zip(table["video_id"].to_pylist(), table["description"].to_pylist(), strict=True)
    for row, (vid, desc) in enumerate(columns):
        if not isinstance(desc, list) or any(not isinstance(d, dict) or "text" not in d for d in desc):
            raise FormatError(path, f"row {row} (video {vid!r}): description must be a list of {{start, end, text}}")
        out[str(vid)] = [(d.get("start"), d.get("end"), d["text"]) for d in desc]
    return out


def _video_paths(video_csv: str, video_root: str | None) -> dict[str, str]:
    p = Path(video_csv)
    paths = {}
    for _, row in read_csv(p, ("video_id", "video_path"), "HowToCaption video CSV"):
        paths[row["video_id"]] = resolve(video_root, row["video_path"], p.parent)
    return paths


@FORMATS.register("howtocaption")
def read_howtocaption(annotations: str, video_csv: str, video_root: str | None = None) -> FormatIndex:
    """Index (video, window, captions) items from a ``.pkl``/``.pickle`` or ``.parquet`` annotation file."""
    p = Path(annotations)
    windows = _windows_from_parquet(p) if p.suffix == ".parquet" else _windows_from_pickle(safe_load_pickle(p), p)
    paths = _video_paths(video_csv, video_root)
    entries, missing = [], 0
    for vid, items in windows.items():
        if vid not in paths:
            missing += 1
            continue
        for i, (start, end, text) in enumerate(sorted(items, key=lambda x: (_num(x[0], vid, p), _num(x[1], vid, p)))):
            start, end = _num(start, vid, p), _num(end, vid, p)
            if not end > start:
                raise FormatError(p, f"video {vid!r}: window [{start}, {end}] has end <= start")
            caps, scores = _texts(text, f"video {vid!r} window {i}", p)
            meta = {"video_id": vid} if scores is None else {"video_id": vid, "scores": scores}
            entries.append(
                VideoEntry(paths[vid], f"{vid}_{i:04d}", caps, (start, end), eval_captions="first", meta=meta)
            )
    desc = f"HowToCaption {p}: {len(entries)} windows, missing_videos={missing}"
    return FormatIndex(entries, None, desc)


def _num(value: Any, vid: str, path: Path) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise FormatError(path, f"video {vid!r}: window bound {value!r} is not a number") from None
    if not math.isfinite(f):
        raise FormatError(path, f"video {vid!r}: window bound {value!r} is not finite")
    return f
