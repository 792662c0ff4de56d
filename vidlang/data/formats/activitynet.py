"""ActivityNet Captions: ``train.json``, ``val_1.json``, ``val_2.json``.

Each file maps a video id to its annotation::

    {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                       "sentences": ["A young woman is seen standing in a room ...", " She then ..."]}, ...}

Videos are minutes long (median about 2 min), so the frame sampler matters: the evaluation protocol
(``anet-paragraph``) and the run record name it.

* ``paragraph: true`` (default): one entry per video, whose one caption is its sentences joined with spaces
  in file order (paragraph-to-video retrieval on ``val_1``, as CLIP4Clip); the whole video is the item.
* ``paragraph: false``: one entry per sentence, with its timestamps as the window.

Files are ``{video_root}/{file_prefix}{id}.{ext}`` where ``id`` is the key without its ``v_``:
``file_prefix: "v_"`` (default) for ``v_QOlSCBRmfWY.mp4``, ``""`` for CLIP4Clip's layout ``QOlSCBRmfWY.mp4``.
``ids_json`` (CLIP4Clip's ``train_ids.json`` / ``val_ids.json``, a JSON list of ``v_`` keys) keeps those
videos only. ``entry.meta["duration"]`` is the annotated duration in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vidlang.data.formats.base import FORMATS, FormatError, join_paragraph, read_json_items
from vidlang.data.sample import FormatIndex, Official, VideoEntry

SOURCE = "ActivityNet Captions release (Krishna et al. 2017): train.json, val_1.json, val_2.json"
OFFICIAL = {
    "train": Official("ActivityNet Captions train", 10009, 37421, SOURCE),
    "val_1": Official("ActivityNet Captions val_1", 4917, 17505, SOURCE),
    "val_2": Official("ActivityNet Captions val_2", 4885, 17031, SOURCE),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(vid: str, ann: Any, path: Path, line: int) -> tuple[float, list[tuple[float, float]], list[str]]:
    if not isinstance(ann, dict):
        raise FormatError(path, f"video {vid!r}: expected an object with duration, timestamps, sentences", line=line)
    missing = [k for k in ("duration", "timestamps", "sentences") if k not in ann]
    if missing:
        raise FormatError(path, f"video {vid!r}: missing {missing}", line=line)
    duration, stamps, sentences = ann["duration"], ann["timestamps"], ann["sentences"]
    if not _number(duration) or duration <= 0:
        raise FormatError(path, f"video {vid!r}: 'duration' must be a positive number, got {duration!r}", line=line)
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
        raise FormatError(path, f"video {vid!r}: 'sentences' must be a non-empty list of strings", line=line)
    if any(not s.strip() for s in sentences):
        raise FormatError(path, f"video {vid!r}: blank sentence", line=line)
    if not isinstance(stamps, list) or len(stamps) != len(sentences):
        raise FormatError(path, f"video {vid!r}: {len(sentences)} sentences but "
                                f"{len(stamps) if isinstance(stamps, list) else stamps!r} timestamps", line=line)
    windows = []
    for t in stamps:
        if not (isinstance(t, list) and len(t) == 2 and all(_number(x) for x in t)):
            raise FormatError(path, f"video {vid!r}: timestamp {t!r} is not [start, end] in seconds", line=line)
        windows.append((float(t[0]), float(t[1])))
    return float(duration), windows, sentences


@FORMATS.register("activitynet")
def read_activitynet(
    captions_json: str,
    video_root: str | None = None,
    ids_json: str | None = None,
    paragraph: bool = True,
    file_prefix: str = "v_",
    ext: str = "mp4",
    split: str | None = None,
) -> FormatIndex:
    """ActivityNet Captions of ``captions_json`` (module docstring); ``split`` (train / val_1 / val_2, default from
    the file name) names the official size."""
    p = Path(captions_json)
    kind, items = read_json_items(p, "ActivityNet Captions JSON")
    if kind != "dict":
        raise FormatError(p, "expected an object {video_id: {duration, timestamps, sentences}}", line=1)
    anns = {vid: (n, ann) for n, vid, ann in items}
    order = list(anns)
    if ids_json is not None:
        id_kind, listed = read_json_items(ids_json, "ActivityNet id list")
        if id_kind != "list" or not all(isinstance(v, str) for _, _, v in listed):
            raise FormatError(ids_json, "expected a JSON list of video ids", line=1)
        for n, _, vid in listed:
            if vid not in anns:
                raise FormatError(ids_json, f"video {vid!r} has no annotation in {p}", line=n)
        order = list(dict.fromkeys(v for _, _, v in listed))
    root = Path(video_root) if video_root else p.parent
    entries = []
    for vid in order:
        n, ann = anns[vid]
        duration, windows, sentences = _check(vid, ann, p, n)
        path = str(root / f"{file_prefix}{vid.removeprefix('v_')}.{ext}")
        if paragraph:
            entries.append(VideoEntry(path, vid, [join_paragraph(sentences)],
                                      meta={"duration": duration, "sentences": len(sentences)}))
        else:
            for k, (s, w) in enumerate(zip(sentences, windows, strict=True)):
                meta = {"video": vid, "duration": duration}
                entries.append(VideoEntry(path, f"{vid}#{k}", [s.strip()], w, meta=meta))
    split = split or (p.stem if p.stem in OFFICIAL else None)
    official = OFFICIAL.get(split) if split else None
    if official is not None and paragraph:
        official = Official(f"{official.name} (paragraphs)", official.videos, official.videos, official.source)
    kind_name = "paragraphs" if paragraph else "sentences"
    return FormatIndex(entries, None, f"ActivityNet Captions {split or ''} {kind_name} {p}".replace("  ", " "),
                       official)
