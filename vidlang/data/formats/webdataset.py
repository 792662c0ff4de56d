"""video2dataset WebDataset shards as a map-style index (random access, nothing extracted).

Layout: ``{shard:05d}.tar`` holding per sample ``{key}.mp4`` (or another video extension),
``{key}.txt`` (caption) and ``{key}.json`` (metadata: ``caption``, ``captions``, ``label``,
``window`` = [start, end] seconds, ``clips``, ...; all optional); keys are 9 digits.
Indexing reads only tar headers and the small ``.txt``/``.json`` members; video bytes are
read later by seeking to the member (:class:`~vidlang.data.sample.TarMember`).
For sequential streaming with shuffle buffers use :mod:`vidlang.data.streaming`.

**Truncated shards** (:func:`iter_shard`, shared by both modes): every complete sample is
served; the sample a cut falls in, and each sample the shard's ``_stats.json`` promises but the
cut lost, becomes an entry whose source is a :class:`DamagedMember` naming the shard and member,
so loading it fails and the bad-sample policy counts it (every epoch). A file that is not a tar
at all is refused (:class:`FormatError`).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
    label = _label(meta.get("label"), key, where)
    if any(not c.strip() for c in captions):
        raise FormatError(where, f"sample {key}: blank caption in {captions!r}")
    if not captions and label is None:
        raise FormatError(where, f"sample {key}: neither a caption (.txt / 'caption' / 'captions') nor a 'label'")
    eval_captions = meta.get("eval_captions", "all")
    if eval_captions not in ("all", "first"):
        raise FormatError(where, f"sample {key}: 'eval_captions' must be 'all' or 'first', got {eval_captions!r}")
    return {"captions": captions, "window": window, "label": label, "meta": meta, "eval_captions": eval_captions}


def _label(value: Any, key: str, where: str) -> int | tuple[int, ...] | None:
    """A sample's ``label``: an integer, or a list of integers (multi-label -> tuple); anything else is refused."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise FormatError(where, f"sample {key}: 'label' must be a class index or a list of class indices, got {value!r}")


@dataclass(frozen=True)
class ShardCut:
    """Where a shard ends early: ``member`` is the member cut (or named by a cut header), "" if unknown."""

    offset: int
    member: str
    reason: str


@dataclass(frozen=True)
class DamagedMember(TarMember):
    """An entry of a truncated shard that cannot be served: reading it raises :class:`OSError` with the reason."""

    reason: str = ""

    def read(self) -> bytes:
        raise OSError(f"{self}: {self.reason}")


@dataclass
class ShardSample:
    """One sample of a shard: ``parts`` maps an extension to its bytes (loaded) or its :class:`TarMember`."""

    key: str  # member name without extension (``dir/000000001``)
    parts: dict[str, Any]


@dataclass
class BrokenSample:
    """A sample a truncated shard holds only in part, or lost after the cut (``key`` ``{shard}~lost{i}``)."""

    key: str
    member: str  # names the member cut, or where the shard was cut
    offset: int
    reason: str


def _header_name(buf: bytes) -> str:
    """The member name in a (possibly partial) tar header block, "" when too little of it is there."""
    name = buf[:100].split(b"\0", 1)[0]
    return name.decode("utf-8", "replace") if name and (b"\0" in buf[:100] or len(buf) >= 100) else ""


def _cut_after_members(raw: BinaryIO, offset: int, size: int) -> ShardCut | None:
    """Classify the end of the member list at ``offset``: None for an end-of-archive marker, else the cut."""
    raw.seek(offset)
    buf = raw.read(512)
    if buf and not buf.strip(b"\0"):
        return None  # the end-of-archive marker (zero blocks), whole or cut: every member is complete
    if not buf:
        return ShardCut(offset, "", f"shard ends at byte {size} without the end-of-archive marker")
    name = _header_name(buf)
    what = f"of member {name} " if name else ""
    if len(buf) < 512:
        return ShardCut(offset, name, f"tar header {what}cut at byte {size} ({len(buf)} of 512 bytes)")
    return ShardCut(offset, name, f"invalid tar header {what}at byte {offset}")


def iter_members(path: str, raw: BinaryIO) -> Iterator[tarfile.TarInfo | ShardCut]:
    """File members of the tar ``raw`` in order; a shard that ends early ends with one :class:`ShardCut`.

    Only members whose data is complete are yielded. A file that is not a tar at all raises
    :class:`FormatError`; a truncated or corrupt one never raises.
    """
    size = os.fstat(raw.fileno()).st_size
    try:
        tf = tarfile.open(fileobj=raw, mode="r:")
    except tarfile.ReadError as e:
        raw.seek(0)
        head = raw.read(512)
        if len(head) == 512 and head.strip(b"\0"):
            raise FormatError(path, f"not a tar archive ({e})") from None
        cut = _cut_after_members(raw, 0, size) or ShardCut(0, "", "shard holds no members")
        yield cut
        return
    last = ""
    while True:
        try:
            m = tf.next()
        except tarfile.ReadError as e:  # the padding after the last member is cut, or a header is corrupt
            cut = _cut_after_members(raw, tf.offset, size) or ShardCut(tf.offset, "", f"{e} at byte {tf.offset}")
            break
        if m is None:
            cut = _cut_after_members(raw, tf.offset, size)
            break
        if m.isfile() and m.offset_data + m.size > size:
            yield ShardCut(m.offset, m.name, f"member data cut at byte {size} ({size - m.offset_data} of "
                                             f"{m.size} bytes)")
            return
        last = m.name
        if m.isfile():
            yield m
    if cut is not None:
        yield cut if cut.member or not last else ShardCut(cut.offset, "", f"{cut.reason}, after member {last}")


def stats_count(path: str) -> int | None:
    """``successes`` of the shard's ``{shard}_stats.json`` (video2dataset), None when there is none."""
    stats = Path(path).with_name(Path(path).stem + "_stats.json")
    if not stats.is_file():
        return None
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (KeyError, ValueError, TypeError):
        raise FormatError(stats, "expected a JSON object with an integer 'successes'") from None


def iter_shard(path: str, load: Callable[[str], bool]) -> Iterator[ShardSample | BrokenSample]:
    """Samples (runs of consecutive members with one key) of a shard, in order; ``load(ext)``: read those bytes.

    A truncated shard yields every complete sample, then a :class:`BrokenSample` for the sample
    the cut falls in, and one per further sample its ``_stats.json`` promises but the shard lost
    (without stats, one for the cut itself when no sample is known to be broken). The last sample
    before a cut between members counts as complete only if it has a video and every extension
    that all earlier samples of the shard have.
    """
    key, parts, last_member = "", {}, ""
    common: set[str] | None = None  # extensions every complete sample of the shard has
    found = broken = 0
    with open(path, "rb") as raw:
        for item in iter_members(path, raw):
            if isinstance(item, ShardCut):
                break
            k, ext = split_member_name(item.name)
            if k != key and parts:
                common = set(parts) if common is None else common & set(parts)
                found += 1
                yield ShardSample(key, parts)
                parts = {}
            key, last_member = k, item.name
            if load(ext):
                raw.seek(item.offset_data)
                parts[ext] = raw.read(item.size)
            else:
                parts[ext] = TarMember(path, item.offset_data, item.size, item.name)
        else:
            if parts:
                yield ShardSample(key, parts)
            return
    # the shard was cut: ``item`` is the ShardCut
    cut_key = split_member_name(item.member)[0] if item.member else None
    if parts:
        has_video = any(e in parts for e in VIDEO_EXTS)
        if cut_key == key:
            broken += 1
            yield BrokenSample(key, item.member, item.offset, f"truncated shard: {item.reason}")
        elif cut_key is not None or (has_video and (common is None or common <= set(parts))):
            found += 1
            yield ShardSample(key, parts)
        else:
            missing = ", ".join(sorted((common or set()) - set(parts))) if has_video else "video"
            broken += 1
            yield BrokenSample(key, last_member, item.offset, f"truncated shard: {item.reason}; the sample ends "
                                                             f"after member {last_member} (no {missing})")
    if cut_key is not None and cut_key != key:
        broken += 1
        yield BrokenSample(cut_key, item.member, item.offset, f"truncated shard: {item.reason}")
    expected = stats_count(path)
    lost = (expected - found - broken) if expected is not None else int(broken == 0)
    where = f"after member {last_member}" if last_member else f"at byte {item.offset}"
    for i in range(max(lost, 0)):
        of = f" ({i + 1} of {lost} samples lost per its _stats.json)" if expected is not None else ""
        yield BrokenSample(f"{Path(path).stem}~lost{i + 1}", f"(cut {where})", item.offset,
                           f"truncated shard: {item.reason}; sample lost{of}")


def index_shard(path: str) -> list[VideoEntry]:
    """Entries of one shard in key order; small members are read, videos are referenced by offset.

    Samples a truncated shard holds only in part (or lost) become entries whose source is a
    :class:`DamagedMember`: loading them fails, so the bad-sample policy counts them every epoch.
    """
    groups: dict[str, dict[str, Any]] = {}
    entries: list[VideoEntry] = []
    for s in iter_shard(path, lambda ext: ext in ("txt", "json")):
        if isinstance(s, BrokenSample):
            entries.append(VideoEntry(DamagedMember(path, s.offset, 0, s.member, s.reason), os.path.basename(s.key)))
            continue
        g = groups.setdefault(s.key, {})
        for ext, part in s.parts.items():
            g["video" if ext in VIDEO_EXTS else ext] = part
    good = []
    for key, parts in groups.items():
        if "video" not in parts:
            raise FormatError(path, f"sample {key} has no video member ({'/'.join(VIDEO_EXTS)})")
        try:
            s = sample_from_parts(key, parts, path)
        except FormatError as e:  # one sample's metadata: skipped and counted each epoch, not the whole split
            member = f"{key}.json" if "json" in parts else f"{key}.txt"
            entries.append(VideoEntry(DamagedMember(path, 0, 0, member, e.reason), os.path.basename(key)))
            continue
        good.append(VideoEntry(parts["video"], os.path.basename(key), s["captions"], s["window"], s["label"],
                               eval_captions=s["eval_captions"], meta=s["meta"]))
    return good + entries


@FORMATS.register("webdataset")
def read_webdataset(shards: str | list[str], classes: str | None = None) -> FormatIndex:
    """Index every sample of the shards (map-style access through tar offsets)."""
    from vidlang.data.formats.base import read_class_names

    entries = [e for shard in expand_shards(shards) for e in index_shard(shard)]
    names = read_class_names(classes) if classes else None
    return FormatIndex(entries, names, f"WebDataset shards {shards}")


def shard_sample_count(path: str) -> int:
    """Samples in a shard: ``{shard}_stats.json`` (``successes``) if present, else the samples found (a cut
    one and one for a cut with no known broken sample included: what :func:`iter_shard` yields)."""
    expected = stats_count(path)
    if expected is not None:
        return expected
    return sum(1 for _ in iter_shard(path, lambda ext: False))
