"""Kinetics-400/600/700: the official CSV, or ``path label`` list files, with a class-name file.

* CSV ``label, youtube_id, time_start, time_end, split`` (``label`` is the class name; the
  test CSV of some releases has no label). Files are
  ``{video_root}/{youtube_id}_{start:06d}_{end:06d}.mp4``, or inside a class folder
  ``{video_root}/{label}/...`` with ``class_subdirs=True``. Class indices follow ``classes``
  (a file, one name per line) or the sorted names of the CSV.
* List file: lines ``relative/path.mp4 <int label> [<int label> ...]`` (labels index ``classes``),
  as MMAction2 writes them. The labels are the trailing integer tokens, the path is the rest (spaces
  allowed); ``delimiter`` marks the path's end explicitly instead (see
  :func:`~vidlang.data.formats.base.parse_path_labels` for the rule and the one ambiguous case).
  Several labels on a line make the list multi-label (``multi_label=None``, the default, decides
  from the file): every entry's label is then a tuple of class indices (repeats count once).
  ``multi_label=True`` forces tuples (a multi-label split whose lines happen to carry one label
  each), ``False`` refuses a line with several labels. A line that does not parse is refused
  with ``file:line``.
"""

from __future__ import annotations

from pathlib import Path

from vidlang.data.formats.base import (
    FORMATS,
    FormatError,
    parse_float,
    parse_path_labels,
    read_class_names,
    read_csv,
    read_lines,
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


def _from_list(
    p: Path, root: str | None, classes: list[str] | None, delimiter: str | None, multi_label: bool | None
) -> FormatIndex:
    if classes is None:
        raise FormatError(p, "a 'path label' list file needs a class-name file (classes=...)")
    rows = []
    for n, line in read_lines(p, "Kinetics list file"):
        rel, labels = parse_path_labels(line, p, n, delimiter)
        for label in labels:
            if not 0 <= label < len(classes):
                raise FormatError(p, f"label {label} outside the {len(classes)} classes", line=n)
        if len(labels) > 1 and multi_label is False:
            raise FormatError(p, f"{len(labels)} labels on one line but multi_label=False: {line!r}", line=n)
        rows.append((rel, tuple(dict.fromkeys(labels))))
    multi = multi_label if multi_label is not None else any(len(labels) > 1 for _, labels in rows)
    entries = []
    for rel, labels in rows:
        label: int | tuple[int, ...] = labels if multi else labels[0]
        name = [classes[c] for c in labels] if multi else classes[labels[0]]
        entries.append(VideoEntry(resolve(root, rel, p.parent), Path(rel).stem, [], None, label,
                                  meta={"label_name": name}))
    kind = "multi-label list" if multi else "list"
    return FormatIndex(entries, classes, f"Kinetics {kind} {p}")


@FORMATS.register("kinetics")
def read_kinetics(
    csv: str | None = None,
    list_file: str | None = None,
    video_root: str | None = None,
    classes: str | None = None,
    split: str | None = None,
    class_subdirs: bool = False,
    delimiter: str | None = None,
    multi_label: bool | None = None,
) -> FormatIndex:
    """Give exactly one of ``csv`` (official annotations) or ``list_file`` (``path label [label ...]`` lines;
    ``delimiter`` and ``multi_label`` apply to it, see the module docstring)."""
    if (csv is None) == (list_file is None):
        raise ValueError("kinetics: give exactly one of csv=... or list_file=...")
    names = read_class_names(classes) if classes else None
    if csv is not None:
        p = Path(csv)
        return _from_csv(p, Path(video_root) if video_root else p.parent, split, names, class_subdirs)
    return _from_list(Path(list_file), video_root, names, delimiter, multi_label)
