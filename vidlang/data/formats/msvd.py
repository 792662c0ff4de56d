"""MSVD (YouTube2Text) retrieval splits, in the layout CLIP4Clip distributes.

* ``raw-captions.pkl``: ``{video_id: [caption, ...]}``, each caption a list of word tokens
  (``["a", "man", "is", "cooking"]``, joined with spaces) or a string; about 40 per video.
* ``{split}_list.txt``: one video id per line (``-4wsuPCjDBc_5_15``), the S2VT split of
  1,200 train / 100 val / 670 test videos.
* Videos ``{video_root}/{video_id}.avi``.

One entry per video with all its captions: training picks one at random, evaluation uses all
(multi-caption retrieval). The pickle is loaded with the restricted unpickler of
:mod:`~vidlang.data.formats.howtocaption` (builtin containers, strings and numbers only).
"""

from __future__ import annotations

from pathlib import Path

from vidlang.data.formats.base import FORMATS, FormatError, read_id_list
from vidlang.data.formats.howtocaption import safe_load_pickle
from vidlang.data.sample import FormatIndex, Official, VideoEntry

SOURCE = "S2VT split as distributed with CLIP4Clip (raw-captions.pkl, {train,val,test}_list.txt)"
OFFICIAL = {
    "train": Official("MSVD train", 1200, 48774, SOURCE),
    "val": Official("MSVD val", 100, 4290, SOURCE),
    "test": Official("MSVD test", 670, 27763, SOURCE),
}


def _caption(cap: object, vid: str, i: int, path: Path) -> str:
    if isinstance(cap, (list, tuple)) and all(isinstance(w, str) for w in cap):
        text = " ".join(w.strip() for w in cap if w.strip())
    elif isinstance(cap, str):
        text = cap.strip()
    else:
        raise FormatError(path, f"video {vid!r} caption {i}: expected a string or a list of word strings, got "
                                f"{type(cap).__name__}")
    if not text:
        raise FormatError(path, f"video {vid!r} caption {i}: blank caption")
    return text


@FORMATS.register("msvd")
def read_msvd(
    data_dir: str | None = None,
    split: str = "test",
    video_root: str | None = None,
    captions: str | None = None,
    ids: str | None = None,
    ext: str = "avi",
) -> FormatIndex:
    """The ``split`` (train / val / test) videos of ``ids`` (default ``{data_dir}/{split}_list.txt``) with their
    captions from ``captions`` (default ``{data_dir}/raw-captions.pkl``)."""
    if data_dir is None and (captions is None or ids is None):
        raise ValueError("msvd: give data_dir=... (or both captions=... and ids=...)")
    cap_path = Path(captions) if captions else Path(data_dir) / "raw-captions.pkl"
    ids_path = Path(ids) if ids else Path(data_dir) / f"{split}_list.txt"
    table = safe_load_pickle(cap_path, "MSVD captions pickle")
    if not isinstance(table, dict):
        raise FormatError(cap_path, f"expected a dict {{video_id: [caption, ...]}}, got {type(table).__name__}")
    root = Path(video_root) if video_root else ids_path.parent
    entries = []
    for n, vid in read_id_list(ids_path, "MSVD id list"):
        caps = table.get(vid)
        if not isinstance(caps, (list, tuple)) or not caps:
            raise FormatError(ids_path, f"video {vid!r} has no caption in {cap_path}", line=n)
        texts = [_caption(c, vid, i, cap_path) for i, c in enumerate(caps)]
        entries.append(VideoEntry(str(root / f"{vid}.{ext}"), vid, texts))
    return FormatIndex(entries, None, f"MSVD {split} {ids_path}", OFFICIAL.get(split))
