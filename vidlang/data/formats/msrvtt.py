"""MSR-VTT retrieval splits.

* 1k-A test: ``MSRVTT_JSFUSION_test.csv`` with ``key, vid_key, video_id, sentence`` -> one
  entry per row (one caption per video).
* 9k train: ``MSRVTT_train.9k.csv`` (column ``video_id``) + ``MSRVTT_data.json``
  (``sentences: [{video_id, caption}, ...]``) -> one entry per video holding all its captions
  (the dataset picks one at random when training).
Videos at ``{video_root}/{video_id}.mp4``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from vidlang.data.formats.base import FORMATS, FormatError, read_csv, read_json
from vidlang.data.sample import FormatIndex, VideoEntry


def _path(root: str, vid: str, ext: str) -> str:
    return str(Path(root) / f"{vid}.{ext}")


@FORMATS.register("msrvtt")
def read_msrvtt(csv: str, video_root: str, data_json: str | None = None, ext: str = "mp4") -> FormatIndex:
    """Test CSV alone (``key, vid_key, video_id, sentence``) or train CSV + ``data_json``."""
    if data_json is None:
        entries = []
        for n, row in read_csv(csv, ("key", "vid_key", "video_id", "sentence"), "MSR-VTT test CSV"):
            if not row["video_id"] or not row["sentence"]:
                raise FormatError(csv, "empty 'video_id' or 'sentence'", line=n)
            entries.append(VideoEntry(_path(video_root, row["video_id"], ext), row["video_id"], [row["sentence"]]))
        return FormatIndex(entries, None, f"MSR-VTT test {csv}")
    vids = [(n, row["video_id"]) for n, row in read_csv(csv, ("video_id",), "MSR-VTT train CSV")]
    data = read_json(data_json, "MSR-VTT data JSON")
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise FormatError(data_json, "expected an object with a 'sentences' list")
    caps: dict[str, list[str]] = defaultdict(list)
    for i, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or "video_id" not in s or "caption" not in s:
            raise FormatError(data_json, f"sentences[{i}]: expected {{video_id, caption}}")
        if not isinstance(s["caption"], str) or not s["caption"].strip():
            raise FormatError(data_json, f"sentences[{i}]: blank caption (video {s['video_id']!r})")
        caps[str(s["video_id"])].append(s["caption"])
    entries = []
    for n, vid in vids:
        if not caps.get(vid):
            raise FormatError(csv, f"video {vid!r} has no caption in {data_json}", line=n)
        entries.append(VideoEntry(_path(video_root, vid, ext), vid, caps[vid]))
    return FormatIndex(entries, None, f"MSR-VTT train {csv}")
