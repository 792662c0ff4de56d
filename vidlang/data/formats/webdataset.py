"""video2dataset WebDataset shards as a map-style index (random access, nothing extracted).

Layout: ``{shard:05d}.tar`` holding per sample ``{key}.mp4`` (or another video extension),
``{key}.txt`` (caption) and ``{key}.json`` (metadata: ``caption``, ``captions``, ``label``,
``window`` = [start, end] seconds, ``clips``, ...; all optional); keys are 9 digits.
Indexing reads only tar headers and the small ``.txt``/``.json`` members; video bytes are
read later by seeking to the member (:class:`~vidlang.data.sample.TarMember`).
For sequential streaming with shuffle buffers use :mod:`vidlang.data.streaming`.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vidlang.data.formats.base import FORMATS, FormatError
from vidlang.data.sample import FormatIndex, TarMember, VideoEntry

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


def expand_shards(shards: str | os.PathLike | list[str]) -> list[str]:
    """A folder (all ``*.tar``), a glob, a brace range ``{00000..00009}.tar`` or a list -> sorted paths."""
    if isinstance(shards, (list, tuple)):
        return [str(s) for s in shards]
    s = str(shards)
    if os.path.isdir(s):
        found = sorted(glob.glob(os.path.join(s, "*.tar")))
    elif "{" in s and ".." in s:
        import braceexpand

        found = list(braceexpand.braceexpand(s))
    else:
        found = sorted(glob.glob(s))
    if not found:
        raise FormatError(s, "no shards found (expected a folder of .tar files, a glob or a {a..b} pattern)")
    return found


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000000001.mp4`` -> (``dir/000000001``, ``mp4``): the key is everything before the first dot."""
    base = os.path.basename(name)
    stem, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), stem), ext.lower()


def sample_from_parts(key: str, parts: dict[str, Any], where: str) -> dict[str, Any]:
    """Caption(s), window, label and metadata of one shard sample from its ``txt``/``json`` parts."""
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(where, f"sample {key}: invalid .json metadata ({e})") from None
        if not isinstance(meta, dict):
            raise FormatError(where, f"sample {key}: .json metadata must be an object")
    captions = meta.get("captions")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        text = parts["txt"].decode("utf-8").strip() if "txt" in parts else meta.get("caption")
        captions = [text] if text else []
    window = meta.get("window")
    if window is not None:
        if not (isinstance(window, (list, tuple)) and len(window) == 2 and float(window[1]) > float(window[0])):
            raise FormatError(where, f"sample {key}: 'window' must be [start, end] with end > start, got {window}")
        window = (float(window[0]), float(window[1]))
    label = meta.get("label")
    eval_captions = meta.get("eval_captions", "all")
    if eval_captions not in ("all", "first"):
        raise FormatError(where, f"sample {key}: 'eval_captions' must be 'all' or 'first', got {eval_captions!r}")
    return {"captions": captions, "window": window, "label": None if label is None else int(label), "meta": meta,
            "eval_captions": eval_captions}


def _iter_members(path: str) -> Iterator[tarfile.TarInfo]:
    try:
        with tarfile.open(path, "r:") as tf:
            yield from (m for m in tf if m.isfile())
    except (tarfile.TarError, OSError) as e:
        raise FormatError(path, f"unreadable tar shard: {e}") from None


def index_shard(path: str) -> list[VideoEntry]:
    """Entries of one shard in key order; small members are read, videos are referenced by offset."""
    groups: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as raw:
        for m in _iter_members(path):
            key, ext = split_member_name(m.name)
            g = groups.setdefault(key, {})
            if ext in ("txt", "json"):
                raw.seek(m.offset_data)
                g[ext] = raw.read(m.size)
            elif ext in VIDEO_EXTS:
                g["video"] = TarMember(path, m.offset_data, m.size, m.name)
    entries = []
    for key, parts in groups.items():
        if "video" not in parts:
            raise FormatError(path, f"sample {key} has no video member ({'/'.join(VIDEO_EXTS)})")
        s = sample_from_parts(key, parts, path)
        entries.append(VideoEntry(parts["video"], os.path.basename(key), s["captions"], s["window"], s["label"],
                                  eval_captions=s["eval_captions"], meta=s["meta"]))
    return entries


@FORMATS.register("webdataset")
def read_webdataset(shards: str | list[str], classes: str | None = None) -> FormatIndex:
    """Index every sample of the shards (map-style access through tar offsets)."""
    from vidlang.data.formats.base import read_class_names

    entries = [e for shard in expand_shards(shards) for e in index_shard(shard)]
    names = read_class_names(classes) if classes else None
    return FormatIndex(entries, names, f"WebDataset shards {shards}")


def shard_sample_count(path: str) -> int:
    """Samples in a shard: ``{shard}_stats.json`` (``successes``) if present, else count video members."""
    stats = Path(path).with_name(Path(path).stem + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (KeyError, ValueError, TypeError):
            raise FormatError(stats, "expected a JSON object with an integer 'successes'") from None
    return sum(1 for m in _iter_members(path) if split_member_name(m.name)[1] in VIDEO_EXTS)
