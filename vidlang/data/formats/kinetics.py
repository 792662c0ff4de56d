"""Kinetics-400/600/700: the official CSV, or ``path label`` list files, with a class-name file.

* CSV ``label, youtube_id, time_start, time_end, split`` (``label`` is the class name; the
  test CSV of some releases has no label). Files are
  ``{video_root}/{youtube_id}_{start:06d}_{end:06d}.mp4``, or inside a class folder
  ``{video_root}/{label}/...`` with ``class_subdirs=True``. Class indices follow ``classes``
  (a file, one name per line) or the sorted names of the CSV.
* List file: lines ``relative/path.mp4 <int label>`` (label indexing ``classes``).
"""

from __future__ import annotations

from pathlib import Path

from vidlang.data.formats.base import (
    FORMATS,
    FormatError,
    existing_file,
    parse_float,
    parse_int,
    read_class_names,
    read_csv,
    resolve,
)
from vidlang.data.sample import FormatIndex, VideoEntry


def kinetics_filename(youtube_id: str, start: float, end: float, ext: str = "mp4") -> str:
    return f"{youtube_id}_{int(start):06d}_{int(end):06d}.{ext}"


def _from_csv(p: Path, root: Path, split: str | None, classes: list[str] | None, class_subdirs: bool) -> FormatIndex:
    rows = [
        (n, r) for n, r in read_csv(p, ("youtube_id", "time_start", "time_end"), "Kinetics CSV")
        if split is None or r.get("split", split) == split
    ]
    names = classes if classes is not None else sorted({r["label"] for _, r in rows if r.get("label")})
    lookup = {c: i for i, c in enumerate(names)}
    entries = []
    for n, r in rows:
        start = parse_float(r["time_start"], p, n, "time_start")
        end = parse_float(r["time_end"], p, n, "time_end")
        name = r.get("label") or None
        if name is not None and name not in lookup:
            raise FormatError(p, f"label {name!r} is not in the class-name list", line=n)
        fname = kinetics_filename(r["youtube_id"], start, end)
        path = root / name / fname if class_subdirs and name else root / fname
        entries.append(
            VideoEntry(str(path), Path(fname).stem, [], None, lookup.get(name) if name else None,
                       meta={"label_name": name})
        )
    return FormatIndex(entries, names, f"Kinetics CSV {p}")


def _from_list(p: Path, root: str | None, classes: list[str] | None) -> FormatIndex:
    if classes is None:
        raise FormatError(p, "a 'path label' list file needs a class-name file (classes=...)")
    entries = []
    for n, line in enumerate(existing_file(p, "Kinetics list file").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise FormatError(p, f"expected 'path label', got {line.strip()!r}", line=n)
        label = parse_int(parts[1], p, n, "label")
        if not 0 <= label < len(classes):
            raise FormatError(p, f"label {label} outside the {len(classes)} classes", line=n)
        entries.append(VideoEntry(resolve(root, parts[0], p.parent), Path(parts[0]).stem, [], None, label,
                                  meta={"label_name": classes[label]}))
    return FormatIndex(entries, classes, f"Kinetics list {p}")


@FORMATS.register("kinetics")
def read_kinetics(
    csv: str | None = None,
    list_file: str | None = None,
    video_root: str | None = None,
    classes: str | None = None,
    split: str | None = None,
    class_subdirs: bool = False,
) -> FormatIndex:
    """Give exactly one of ``csv`` (official annotations) or ``list_file`` (``path label`` lines)."""
    if (csv is None) == (list_file is None):
        raise ValueError("kinetics: give exactly one of csv=... or list_file=...")
    names = read_class_names(classes) if classes else None
    if csv is not None:
        p = Path(csv)
        return _from_csv(p, Path(video_root) if video_root else p.parent, split, names, class_subdirs)
    return _from_list(Path(list_file), video_root, names)
