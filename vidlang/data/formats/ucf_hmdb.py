"""UCF101, HMDB51 and Something-Something-v2 official split files.

* UCF101 (``split_dir`` = ``ucfTrainTestlist``): ``classInd.txt`` (``1 ApplyEyeMakeup``,
  1-based), ``trainlist0{fold}.txt`` (``ApplyEyeMakeup/v_..avi 1``), ``testlist0{fold}.txt``
  (path only; the class is the folder). Videos at ``{video_root}/{path}``.
* HMDB51 (``split_dir`` holds ``<class>_test_split{fold}.txt``): lines ``<video>.avi <flag>``,
  flag 1 = train, 2 = test, 0 = unused. Videos at ``{video_root}/{class}/{video}``.
  Classes are the sorted class names.
* SSv2: ``labels`` JSON ``{"Template name": "index"}`` and a list JSON
  ``[{"id", "template", ...}]`` (``template`` has ``[something]`` brackets, removed to look up
  the class); videos at ``{video_root}/{id}.webm``. The test list has no templates -> no label.
"""

from __future__ import annotations

import re
from pathlib import Path

from vidlang.data.formats.base import FORMATS, FormatError, parse_int, read_class_names, read_json, read_lines
from vidlang.data.sample import FormatIndex, VideoEntry


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    return list(read_lines(path, what))


@FORMATS.register("ucf101")
def read_ucf101(split_dir: str, video_root: str, fold: int = 1, split: str = "train") -> FormatIndex:
    """UCF101 fold ``fold`` (1..3), ``split`` train or test."""
    if fold not in (1, 2, 3) or split not in ("train", "test"):
        raise ValueError(f"ucf101: fold must be 1..3 and split train|test, got fold={fold}, split={split!r}")
    d = Path(split_dir)
    classes = read_class_names(d / "classInd.txt")
    lookup = {c: i for i, c in enumerate(classes)}
    lst = d / f"{split}list0{fold}.txt"
    entries = []
    for n, line in _lines(lst, f"UCF101 {split} list"):
        parts = line.split()
        rel = parts[0]
        cls = rel.split("/")[0]
        if "/" not in rel or cls not in lookup:
            raise FormatError(lst, f"{rel!r}: expected Class/v_....avi with a class from classInd.txt", line=n)
        label = lookup[cls]
        if len(parts) > 1 and parse_int(parts[1], lst, n, "label") - 1 != label:
            raise FormatError(lst, f"label {parts[1]} disagrees with class folder {cls!r}", line=n)
        entries.append(VideoEntry(str(Path(video_root) / rel), Path(rel).stem, [], None, label,
                                  meta={"label_name": cls}))
    return FormatIndex(entries, classes, f"UCF101 fold {fold} {split}")


@FORMATS.register("hmdb51")
def read_hmdb51(split_dir: str, video_root: str, fold: int = 1, split: str = "train") -> FormatIndex:
    """HMDB51 fold ``fold`` (1..3), ``split`` train (flag 1) or test (flag 2)."""
    if fold not in (1, 2, 3) or split not in ("train", "test"):
        raise ValueError(f"hmdb51: fold must be 1..3 and split train|test, got fold={fold}, split={split!r}")
    files = sorted(Path(split_dir).glob(f"*_test_split{fold}.txt"))
    if not files:
        raise FormatError(split_dir, f"no '<class>_test_split{fold}.txt' files")
    classes = sorted(f.name[: -len(f"_test_split{fold}.txt")] for f in files)
    want = "1" if split == "train" else "2"
    entries = []
    for f in files:
        cls = f.name[: -len(f"_test_split{fold}.txt")]
        for n, line in _lines(f, "HMDB51 split file"):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise FormatError(f, f"expected '<video>.avi <0|1|2>', got {line!r}", line=n)
            if parts[1] == want:
                entries.append(VideoEntry(str(Path(video_root) / cls / parts[0]), Path(parts[0]).stem, [], None,
                                          classes.index(cls), meta={"label_name": cls}))
    return FormatIndex(entries, classes, f"HMDB51 fold {fold} {split}")


@FORMATS.register("ssv2")
def read_ssv2(labels: str, list_json: str, video_root: str, ext: str = "webm") -> FormatIndex:
    """Something-Something-v2: label dict + train/validation/test list JSON."""
    mapping = read_json(labels, "SSv2 labels JSON")
    if not isinstance(mapping, dict):
        raise FormatError(labels, "expected an object {template: index}")
    classes = [""] * len(mapping)
    for name, idx in mapping.items():
        classes[int(idx)] = name
    items = read_json(list_json, "SSv2 list JSON")
    if not isinstance(items, list):
        raise FormatError(list_json, "expected a list of {id, template, ...}")
    entries = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "id" not in it:
            raise FormatError(list_json, f"item {i}: missing 'id'")
        label = None
        if "template" in it:
            name = re.sub(r"[\[\]]", "", it["template"])
            if name not in mapping:
                raise FormatError(list_json, f"item {i}: template {name!r} not in {labels}")
            label = int(mapping[name])
        entries.append(VideoEntry(str(Path(video_root) / f"{it['id']}.{ext}"), str(it["id"]), [], None, label,
                                  meta={"label_name": classes[label] if label is not None else None}))
    return FormatIndex(entries, classes, f"SSv2 {list_json}")
