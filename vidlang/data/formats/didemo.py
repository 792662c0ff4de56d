"""DiDeMo (Localizing Moments): ``train_data.json`` / ``val_data.json`` / ``test_data.json``.

Each file is a JSON list of moment descriptions::

    [{"annotation_id": 17867, "description": "the girl jumps", "video": "12090392@N02_13482799053_87ef417396.mov",
      "times": [[2, 2], [2, 3], [2, 2], [2, 2]], "dl_link": "...", "num_segments": 6}, ...]

``video`` is the file name (videos were downloaded as ``{video_root}/{video}``); ``ext`` replaces its
extension for converted copies (``ext: mp4``). ``times`` are 5-second chunks marked by several annotators.

* ``paragraph: true`` (default, the retrieval protocol): one entry per video, whose one caption is all its
  descriptions joined with spaces in file order (CLIP4Clip's paragraph-to-video retrieval); the whole video is
  the item.
* ``paragraph: false``: one entry per description with its moment as the window, in seconds: the annotators'
  mean start chunk x 5 to (mean end chunk + 1) x 5.

``ids`` (CLIP4Clip's ``{split}_list.txt``, one video name per line) keeps the listed videos only; a listed
video without a description is an error naming the list file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vidlang.data.formats.base import FORMATS, FormatError, join_paragraph, read_id_list, read_json_items
from vidlang.data.sample import FormatIndex, Official, VideoEntry

SOURCE = "LocalizingMoments data/{train,val,test}_data.json (Hendricks et al. 2017)"
OFFICIAL = {
    "train": Official("DiDeMo train (paragraphs)", 8395, 8395, SOURCE),
    "val": Official("DiDeMo val (paragraphs)", 1065, 1065, SOURCE),
    "test": Official("DiDeMo test (paragraphs)", 1004, 1004, SOURCE),
}
CHUNK_S = 5.0


def _split_of(path: Path) -> str | None:
    stem = path.stem.removesuffix("_data")
    return stem if stem in OFFICIAL else None


def _moment(times: Any, path: Path, line: int) -> tuple[float, float] | None:
    if times is None:
        return None
    if not isinstance(times, list) or not times or not all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, (int, float)) for x in t) for t in times
    ):
        raise FormatError(path, f"'times' must be a list of [start_chunk, end_chunk] pairs, got {times!r}", line=line)
    start = sum(t[0] for t in times) / len(times) * CHUNK_S
    end = (sum(t[1] for t in times) / len(times) + 1) * CHUNK_S
    return start, end


@FORMATS.register("didemo")
def read_didemo(
    data_json: str,
    video_root: str | None = None,
    ids: str | None = None,
    paragraph: bool = True,
    ext: str | None = None,
    split: str | None = None,
) -> FormatIndex:
    """DiDeMo descriptions of ``data_json`` (module docstring); ``split`` (train / val / test, default from the file
    name) names the official size."""
    p = Path(data_json)
    _, items = read_json_items(p, "DiDeMo JSON")
    root = Path(video_root) if video_root else p.parent
    per_video: dict[str, list[tuple[int, str, tuple[float, float] | None]]] = {}
    for n, i, it in items:
        if not isinstance(it, dict) or not isinstance(it.get("video"), str) or not it["video"].strip():
            raise FormatError(p, f"item {i}: expected an object with a 'video' name", line=n)
        desc = it.get("description")
        if not isinstance(desc, str) or not desc.strip():
            raise FormatError(p, f"item {i} (video {it['video']!r}): blank or missing 'description'", line=n)
        per_video.setdefault(it["video"], []).append((n, desc, _moment(it.get("times"), p, n)))
    order = list(per_video)
    if ids is not None:
        listed = read_id_list(ids, "DiDeMo id list")
        for n, vid in listed:
            if vid not in per_video:
                raise FormatError(ids, f"video {vid!r} has no description in {p}", line=n)
        order = [vid for _, vid in listed]

    def path_of(vid: str) -> str:
        name = f"{Path(vid).stem}.{ext}" if ext else vid
        return str(root / name)

    entries = []
    for vid in order:
        rows = per_video[vid]
        if paragraph:
            entries.append(VideoEntry(path_of(vid), vid, [join_paragraph([d for _, d, _ in rows])],
                                      meta={"sentences": len(rows)}))
        else:
            for k, (_, desc, window) in enumerate(rows):
                entries.append(VideoEntry(path_of(vid), f"{vid}#{k}", [desc.strip()], window, meta={"video": vid}))
    split = split or _split_of(p)
    official = OFFICIAL.get(split) if paragraph and split else None
    kind = "paragraphs" if paragraph else "moments"
    return FormatIndex(entries, None, f"DiDeMo {split or ''} {kind} {p}".replace("  ", " "), official)
