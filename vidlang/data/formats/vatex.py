"""VATEX (English captions).

The official JSON is a list of videos with 10 English and 10 Chinese captions::

    [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["A man ...", ...], "chCap": [...]}, ...]

(``vatex_training_v1.0.json``, ``vatex_validation_v1.0.json``); CLIP2Video's ``vatex_data.json`` holds the same
as an object ``{videoID: {"enCap": [...]}}`` and is read too. ``videoID`` is ``<youtube id>_<start>_<end>``
(6-digit seconds); files are ``{video_root}/{videoID}.{ext}``.

Retrieval papers (HGR, CLIP2Video, TS2-Net, ...) use 25,991 training videos and split the official validation
set into 1,500 validation and 1,500 **test** videos: give that split's id list with ``ids`` (one videoID per line,
e.g. ``test_list.txt``) and ``split: test``. A listed id missing from the JSON is an error naming the list line.
"""

from __future__ import annotations

from pathlib import Path

from vidlang.data.formats.base import FORMATS, FormatError, read_id_list, read_json_items
from vidlang.data.sample import FormatIndex, Official, VideoEntry

SOURCE = "VATEX v1.0 (Wang et al. 2019); 1,500 / 1,500 val / test split of the official validation set (HGR)"
OFFICIAL = {
    "train": Official("VATEX train", 25991, 259910, SOURCE),
    "val": Official("VATEX val (1.5k)", 1500, 15000, SOURCE),
    "test": Official("VATEX test (1.5k)", 1500, 15000, SOURCE),
}
LANGUAGES = {"en": "enCap", "zh": "chCap"}


@FORMATS.register("vatex")
def read_vatex(
    annotations: str,
    video_root: str | None = None,
    ids: str | None = None,
    split: str | None = None,
    ext: str = "mp4",
    language: str = "en",
) -> FormatIndex:
    """VATEX videos of ``annotations`` (optionally only those of ``ids``) with their ``language`` captions."""
    if language not in LANGUAGES:
        raise ValueError(f"vatex: language must be one of {sorted(LANGUAGES)}, got {language!r}")
    field = LANGUAGES[language]
    p = Path(annotations)
    kind, items = read_json_items(p, "VATEX JSON")
    videos: dict[str, tuple[int, list[str]]] = {}
    for n, key, it in items:
        if not isinstance(it, dict):
            raise FormatError(p, f"item {key!r}: expected an object", line=n)
        vid = it.get("videoID") if kind == "list" else key
        if not isinstance(vid, str) or not vid.strip():
            raise FormatError(p, f"item {key!r}: missing 'videoID'", line=n)
        caps = it.get(field)
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise FormatError(p, f"video {vid!r}: {field!r} must be a non-empty list of captions (the public test "
                                 "set has none)", line=n)
        if any(not c.strip() for c in caps):
            raise FormatError(p, f"video {vid!r}: blank caption in {field!r}", line=n)
        if vid in videos:
            raise FormatError(p, f"video {vid!r} repeats line {videos[vid][0]}", line=n)
        videos[vid] = (n, [c.strip() for c in caps])
    order = list(videos)
    if ids is not None:
        listed = read_id_list(ids, "VATEX id list")
        for n, vid in listed:
            if vid not in videos:
                raise FormatError(ids, f"video {vid!r} is not in {p}", line=n)
        order = [vid for _, vid in listed]
    root = Path(video_root) if video_root else p.parent
    entries = [VideoEntry(str(root / f"{vid}.{ext}"), vid, videos[vid][1]) for vid in order]
    official = OFFICIAL.get(split) if split and language == "en" else None
    return FormatIndex(entries, None, f"VATEX {split or ''} {p}".replace("  ", " "), official)
