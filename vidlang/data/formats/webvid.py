"""WebVid-2M/10M CSV: ``videoid, contentUrl, duration, page_dir, name``.

``name`` is the caption; ``duration`` is ISO-8601 (``PT00H00M17S``); the local file is
``{video_root}/{page_dir}/{videoid}.mp4``. ``split`` filters on an optional ``split`` column.
"""

from __future__ import annotations

import re
from pathlib import Path

from vidlang.data.formats.base import FORMATS, FormatError, read_csv
from vidlang.data.sample import FormatIndex, VideoEntry

_ISO = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


def parse_iso_duration(text: str) -> float:
    """``PT00H00M17S`` -> 17.0 seconds (days, hours, minutes, fractional seconds accepted)."""
    m = _ISO.match(text.strip())
    if not m or not any(m.groupdict().values()):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    g = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    return g["d"] * 86400 + g["h"] * 3600 + g["m"] * 60 + g["s"]


@FORMATS.register("webvid")
def read_webvid(csv: str, video_root: str | None = None, split: str | None = None) -> FormatIndex:
    """One entry per row: the video ``{page_dir}/{videoid}.mp4`` with its caption ``name``."""
    p = Path(csv)
    root = Path(video_root) if video_root is not None else p.parent
    entries = []
    for line, row in read_csv(p, ("videoid", "contentUrl", "duration", "page_dir", "name"), "WebVid CSV"):
        if split is not None and row.get("split", split) != split:
            continue
        if not row["videoid"] or not row["name"]:
            raise FormatError(p, "empty 'videoid' or 'name'", line=line)
        try:
            duration = parse_iso_duration(row["duration"]) if row["duration"] else None
        except ValueError as e:
            raise FormatError(p, f"column 'duration': {e}", line=line) from None
        entries.append(
            VideoEntry(
                source=str(root / row["page_dir"] / f"{row['videoid']}.mp4"),
                key=row["videoid"],
                captions=[row["name"]],
                meta={"duration": duration, "url": row["contentUrl"]},
            )
        )
    return FormatIndex(entries, None, f"WebVid {p}")
