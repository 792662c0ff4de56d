"""LSMDC (Large Scale Movie Description Challenge) 2016 annotation files.

Tab-separated, no header, six fields per line::

    <clip id>\\t<start aligned>\\t<end aligned>\\t<start extracted>\\t<end extracted>\\t<sentence>
    0001_American_Beauty_00.00.51.926-00.00.54.129\\t00.00.51.926\\t00.00.54.129\\t00.00.51.406\\t00.00.54.129\\tSomeone...

Files: ``LSMDC16_annos_training.csv`` (train), ``LSMDC16_annos_val.csv`` (val) and
``LSMDC16_challenge_1000_publictect.csv`` (the 1,000-clip public test split retrieval papers report).
A clip id may repeat (several sentences): one entry per clip, with its sentences as captions in file order.

Videos: ``layout: movie`` (default) ``{video_root}/{movie}/{clip id}.{ext}``, where the movie folder is the
clip id without its ``_HH.MM.SS.mmm-HH.MM.SS.mmm`` time range (``0001_American_Beauty``); ``layout: flat``
``{video_root}/{clip id}.{ext}``. ``ext`` defaults to ``avi``.
"""

from __future__ import annotations

import re
from pathlib import Path

from vidlang.data.formats.base import FORMATS, FormatError, read_lines
from vidlang.data.sample import FormatIndex, Official, VideoEntry

SOURCE = "LSMDC 2016 (Rohrbach et al.), as used by JSFusion / CLIP4Clip"
OFFICIAL = {
    "train": Official("LSMDC train", 101079, None, SOURCE),
    "val": Official("LSMDC val", 7408, None, SOURCE),
    "test": Official("LSMDC public test (1k)", 1000, 1000, SOURCE),
}
FILES = {"LSMDC16_annos_training": "train", "LSMDC16_annos_val": "val", "LSMDC16_challenge_1000_publictect": "test"}
LAYOUTS = ("movie", "flat")
_CLIP = re.compile(r"^(?P<movie>.+)_\d{2}\.\d{2}\.\d{2}\.\d{3}-\d{2}\.\d{2}\.\d{2}\.\d{3}$")


def movie_of(clip_id: str) -> str:
    """The movie folder of a clip id (the id without its time range; else up to the last ``_``)."""
    m = _CLIP.match(clip_id)
    return m["movie"] if m else clip_id.rsplit("_", 1)[0]


@FORMATS.register("lsmdc")
def read_lsmdc(
    annotations: str, video_root: str | None = None, layout: str = "movie", ext: str = "avi", split: str | None = None
) -> FormatIndex:
    """LSMDC clips of ``annotations`` (module docstring); ``split`` (train / val / test, default from the file name)
    names the official size."""
    if layout not in LAYOUTS:
        raise ValueError(f"lsmdc: layout must be one of {LAYOUTS}, got {layout!r}")
    p = Path(annotations)
    root = Path(video_root) if video_root else p.parent
    clips: dict[str, list[str]] = {}
    for n, line in read_lines(p, "LSMDC annotation file"):
        fields = line.split("\t")
        if len(fields) != 6:
            raise FormatError(p, f"expected 6 tab-separated fields (clip id, 4 times, sentence), got {len(fields)}",
                              line=n)
        clip, sentence = fields[0].strip(), fields[5].strip()
        if not clip or not sentence:
            raise FormatError(p, "empty clip id or sentence", line=n)
        clips.setdefault(clip, []).append(sentence)
    entries = []
    for clip, sentences in clips.items():
        rel = Path(movie_of(clip)) / f"{clip}.{ext}" if layout == "movie" else Path(f"{clip}.{ext}")
        entries.append(VideoEntry(str(root / rel), clip, sentences))
    split = split or FILES.get(p.stem)
    return FormatIndex(entries, None, f"LSMDC {split or ''} {p}".replace("  ", " "), OFFICIAL.get(split or ""))
