"""Charades (multi-label action recognition): ``Charades_v1_train.csv`` / ``Charades_v1_test.csv``.

The CSV has a header ``id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length``;
vidlang needs ``id`` and ``actions``: ``;``-separated ``<class> <start s> <end s>`` triples, e.g.
``c092 11.90 21.20;c147 0.00 12.60`` (empty: no action). The classes file (``Charades_v1_classes.txt``) has
one ``c000 Holding some clothes`` per line; class ``k`` is its ``k``-th line and its name the description.

One entry per video (the whole video; mAP is computed per video): ``label`` is the tuple of the distinct classes
of its actions (order of first appearance; ``()`` for none), ``meta["actions"]`` the ``(class, start, end)``
triples and ``meta["length"]`` the ``length`` column (seconds) when present. Files are
``{video_root}/{id}.{ext}`` (``Charades_v1_480/46GP8.mp4``).
"""

from __future__ import annotations

import math
from pathlib import Path

from vidlang.data.formats.base import FORMATS, FormatError, existing_file, parse_float, read_csv, read_lines
from vidlang.data.sample import FormatIndex, Official, VideoEntry

SOURCE = "Charades v1 (Sigurdsson et al. 2016), 157 action classes"
OFFICIAL = {
    "train": Official("Charades train", 7985, None, SOURCE),
    "test": Official("Charades test", 1863, None, SOURCE),
}
NUM_CLASSES = 157


def read_charades_classes(path: str | Path) -> tuple[list[str], dict[str, int]]:
    """``(names, code -> index)`` of a ``c000 Holding some clothes`` file (codes unique, names non-empty)."""
    p = existing_file(path, "Charades classes file")
    names: list[str] = []
    codes: dict[str, int] = {}
    for n, line in read_lines(p, "Charades classes file"):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise FormatError(p, f"expected '<code> <name>', got {line!r}", line=n)
        code, name = parts
        if code in codes:
            raise FormatError(p, f"class code {code!r} repeats", line=n)
        codes[code] = len(names)
        names.append(name.strip())
    if not names:
        raise FormatError(p, "Charades classes file is empty")
    return names, codes


def parse_actions(text: str, codes: dict[str, int], path: Path, line: int) -> list[tuple[int, float, float]]:
    """``c092 11.90 21.20;c147 0.00 12.60`` -> ``[(class index, start, end), ...]``."""
    out = []
    for part in (t.strip() for t in text.split(";")):
        if not part:
            continue
        tokens = part.split()
        if len(tokens) != 3:
            raise FormatError(path, f"column 'actions': {part!r} is not '<class> <start> <end>'", line=line)
        code, start, end = tokens
        if code not in codes:
            raise FormatError(path, f"column 'actions': class {code!r} is not in the classes file", line=line)
        s, e = parse_float(start, path, line, "actions"), parse_float(end, path, line, "actions")
        if not (math.isfinite(s) and math.isfinite(e)) or e < s:
            raise FormatError(path, f"column 'actions': {part!r} has end before start", line=line)
        out.append((codes[code], s, e))
    return out


@FORMATS.register("charades")
def read_charades(
    csv: str, classes: str, video_root: str | None = None, ext: str = "mp4", split: str | None = None
) -> FormatIndex:
    """Charades videos of ``csv`` with multi-label targets (module docstring); ``split`` (train / test, default from
    the file name) names the official size."""
    p = Path(csv)
    names, codes = read_charades_classes(classes)
    root = Path(video_root) if video_root else p.parent
    entries = []
    seen: dict[str, int] = {}
    for n, row in read_csv(p, ("id", "actions"), "Charades CSV"):
        vid = row["id"]
        if not vid:
            raise FormatError(p, "empty 'id'", line=n)
        if vid in seen:
            raise FormatError(p, f"video {vid!r} repeats line {seen[vid]}", line=n)
        seen[vid] = n
        actions = parse_actions(row["actions"], codes, p, n)
        meta: dict = {"actions": actions, "label_name": [names[c] for c in dict.fromkeys(a[0] for a in actions)]}
        if row.get("length"):
            meta["length"] = parse_float(row["length"], p, n, "length")
        label = tuple(dict.fromkeys(a[0] for a in actions))
        entries.append(VideoEntry(str(root / f"{vid}.{ext}"), vid, [], None, label, meta=meta))
    if split is None:
        split = next((s for s in OFFICIAL if p.stem.lower().endswith(f"_{s}")), None)
    return FormatIndex(entries, names, f"Charades {split or ''} {p}".replace("  ", " "), OFFICIAL.get(split or ""))
