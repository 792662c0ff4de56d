"""The frame index of a plain H.264 MP4/MOV file, read from its own sample tables: the scan's fast path.

:func:`read_mp4` parses the ``moov`` box of a complete, non-fragmented file with one H.264 (``avc1``) video
track and computes what the PyAV scan (:func:`vidlang.data.decoding.scan.scan_video`) would learn by
demuxing it: the pts of every frame as FFmpeg's ``mov`` demuxer derives them (``stts`` + ``ctts``, an edit list
applied as FFmpeg applies a single edit), key frames (``stss``), durations, the frame size from the H.264
sequence parameter set, the display rotation from the track matrix. No FFmpeg code runs, no frame is decoded.

It accepts only what it can state exactly and raises :class:`Unsupported` for everything else, so that the
caller falls back to the PyAV scan: fragmented or truncated files (a box or a sample past the end of the
file), more than one video track, any track other than video / AAC audio, track references, external data,
other codecs, several sample descriptions, interlaced or cropped-at-the-origin streams, a frame size in the
SPS other than the sample description's, an edit list other than one plain edit that drops no frame, negative
composition offsets, partial-sync or random-access sample groups, duplicate timestamps, mirrored or
non-right-angle matrices, and a frame larger than ``max_pixels`` (the scan then refuses it with its own
message). Every sample in the first :data:`PREFIX` bytes (more than FFmpeg's stream probing reads) is checked
for in-band parameter sets (H.264 SPS NAL units): one that changes the frame size sends the file to the scan, so
FFmpeg's probe sees no frame size the check did not.
"""

from __future__ import annotations

import math
import operator
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from itertools import accumulate, chain, compress, repeat

import numpy as np

MOV_FORMAT = "mov,mp4,m4a,3gp,3g2,mj2"  # the name FFmpeg gives its MP4/MOV demuxer
MAX_SAMPLES = 5_000_000  # as the scan's packet bound
PREFIX = 8 << 20  # bytes of a file read at once; their samples are checked for in-band parameter sets
MAX_NALS = 64  # NAL units per sample looked at; more sends the file to the scan
SMALL = 192  # up to this many samples a track's tables are worked in plain Python (see _entries)
TOP_LEVEL = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"uuid", b"udta", b"meta", b"pdin"}
FRAGMENTED = {b"moof", b"mfra", b"sidx", b"styp", b"ssix", b"emsg", b"prft", b"mvex"}
STBL_KNOWN = {b"stsd", b"stts", b"ctts", b"stss", b"stsz", b"stsc", b"stco", b"co64", b"sdtp", b"sgpd", b"sbgp"}
# pure rotations of the 16.16 track matrix (a, b, c, d) -> degrees counter-clockwise, as FFmpeg reports them
ROTATIONS = {(1, 0, 0, 1): 0, (0, 1, -1, 0): 270, (-1, 0, 0, -1): 180, (0, -1, 1, 0): 90}
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


class Unsupported(Exception):
    """The file is not one the fast path reads exactly; the caller scans it with PyAV."""


@dataclass
class Mp4Video:
    """What :func:`read_mp4` learned, in display order: lists for up to :data:`SMALL` frames, else numpy arrays
    (int64, bool). Times in ``time_base`` units."""

    pts: list[int] | np.ndarray  # [N], increasing
    durations: list[int] | np.ndarray  # [N]
    keyframes: list[bool] | np.ndarray  # [N]
    time_base: Fraction
    width: int
    height: int
    stream_index: int
    has_audio: bool
    audio_sample_rate: int | None
    rotation: int
    reordered: bool
    clean_keys: bool
    data_end: int


@dataclass
class _Track:
    index: int
    handler: bytes = b""
    timescale: int = 0
    matrix: tuple[int, ...] = ()
    edits: list[tuple[int, int, int]] | None = None  # (segment duration, media time, rate as 16.16)
    stsd: bytes = b""
    tables: dict[bytes, tuple[int, int]] | None = None  # stbl child -> (start, end) in the moov buffer


def read_mp4(src: str | bytes, max_pixels: int | None) -> Mp4Video:
    """The frame index of a complete H.264 MP4/MOV file; :class:`Unsupported` when it is not one.

    A file is read with plain reads (its first :data:`PREFIX` bytes, then the ``moov`` box wherever it lies), never
    memory-mapped: a file truncated while mapped would kill the process with SIGBUS.
    """
    if isinstance(src, str):
        fd = os.open(src, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < 16:
                raise Unsupported("file too small")
            return _read(os.pread(fd, min(size, PREFIX), 0), size, max_pixels, lambda at, n: os.pread(fd, n, at))
        finally:
            os.close(fd)
    return _read(src, len(src), max_pixels, lambda at, n: src[at : at + n])


def _top_level(prefix: bytes, size: int, read) -> bytes:
    """The ``moov`` box of a file whose top-level boxes tile it exactly (:class:`Unsupported` otherwise)."""
    if prefix[4:8] not in TOP_LEVEL:
        raise Unsupported("not an MP4/MOV file")
    moov, pos = None, 0
    while pos < size:
        head = prefix[pos : pos + 16] if pos + 16 <= len(prefix) else read(pos, 16)
        if len(head) < 8:
            raise Unsupported("bytes after the last box")
        n, kind = struct.unpack_from(">I4s", head)
        skip = 8
        if n == 1:
            if len(head) < 16:
                raise Unsupported("box header past the end")
            (n,) = struct.unpack_from(">Q", head, 8)
            skip = 16
        if n < skip or pos + n > size:  # n == 0 ("to the end of the file") included
            raise Unsupported(f"{kind!r} box past the end of the file (truncated file?)")
        if kind == b"moov":
            if moov is not None:
                raise Unsupported("two moov boxes")
            moov = prefix[pos + skip : pos + n] if pos + n <= len(prefix) else read(pos + skip, n - skip)
            if len(moov) != n - skip:
                raise Unsupported("short read")
        elif kind in FRAGMENTED:
            raise Unsupported("fragmented MP4")
        elif kind not in TOP_LEVEL:
            raise Unsupported(f"top-level box {kind!r}")
        pos += n
    if moov is None:
        raise Unsupported("no moov box")
    return moov


def _boxes(buf, start: int, end: int):
    """``(type, payload start, box end)`` of the boxes in ``buf[start:end]``."""
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise Unsupported("bytes after the last box")
        n, kind = struct.unpack_from(">I4s", buf, pos)
        head = 8
        if n == 1:
            if pos + 16 > end:
                raise Unsupported("box header past the end")
            (n,) = struct.unpack_from(">Q", buf, pos + 8)
            head = 16
        if n < head or pos + n > end:  # n == 0 ("to the end of the file") included
            raise Unsupported(f"{kind!r} box past the end of its parent (truncated file?)")
        yield kind, pos + head, pos + n
        pos += n


def _read(prefix: bytes, size: int, max_pixels: int | None, read) -> Mp4Video:
    """``prefix``: the file's first bytes (all of it for bytes input); ``read(offset, n)``: bytes from the file."""
    moov = _top_level(prefix, size, read)
    movie_scale, tracks = _movie(moov)
    video = [t for t in tracks if t.handler == b"vide"]
    if len(video) != 1 or any(t.handler not in (b"vide", b"soun") for t in tracks):
        raise Unsupported("not exactly one video track and audio tracks")
    ends = []
    audio_rate = None
    for t in tracks:
        if t.handler == b"soun":
            rate = _aac_rate(moov, t)
            audio_rate = rate if audio_rate is None else audio_rate
            ends.append(_sample_end(moov, t))
    v = video[0]
    width, height, nal_size, sps = _avc_entry(moov, v)
    if max_pixels is not None and width * height > max_pixels:
        raise Unsupported("frame larger than max_pixels (the scan refuses it)")
    layout = _layout(moov, v)
    plain = layout.count <= SMALL
    pos, sizes = _positions(moov, layout, plain)
    end, smallest = _extent(pos, sizes)
    if smallest == 0:
        raise Unsupported("a video sample is empty")
    ends.append(end)
    if max(ends) > size:
        raise Unsupported("a sample lies past the end of the file (truncated file)")
    _check_parameter_sets(prefix, pos, sizes, nal_size, sps, (width, height))
    rotation = ROTATIONS.get(v.matrix[:4]) if v.matrix[4:] == (0, 0, 1 << 30) else None
    if rotation is None:
        raise Unsupported("track matrix is not a pure rotation")
    pts, durations, keys, reordered, clean = _timeline(moov, v, layout.count, movie_scale, plain)
    return Mp4Video(
        pts=pts, durations=durations, keyframes=keys, time_base=_time_base(v.timescale), width=width,
        height=height, stream_index=v.index, has_audio=any(t.handler == b"soun" for t in tracks),
        audio_sample_rate=audio_rate, rotation=rotation, reordered=reordered, clean_keys=clean, data_end=max(ends),
    )  # fmt: skip


@lru_cache(maxsize=64)  # a handful of time scales cover a collection (Fraction is pure Python: slow to build)
def _time_base(timescale: int) -> Fraction:
    return Fraction(1, timescale)


def _movie(moov: bytes) -> tuple[int, list[_Track]]:
    movie_scale = 0
    tracks: list[_Track] = []
    for kind, start, end in _boxes(moov, 0, len(moov)):
        if kind == b"mvhd":
            version = moov[start]
            movie_scale = struct.unpack_from(">I", moov, start + (20 if version == 1 else 12))[0]
            m = struct.unpack_from(">9i", moov, start + (48 if version == 1 else 36))
            if (m[0], m[1], m[3], m[4], m[8]) != (1 << 16, 0, 0, 1 << 16, 1 << 30):
                raise Unsupported("movie matrix is not the identity")
        elif kind == b"trak":
            tracks.append(_track(moov, start, end, len(tracks)))
        elif kind in (b"mvex", b"cmov"):
            raise Unsupported(f"{kind!r} in moov")
    if movie_scale <= 0:
        raise Unsupported("no movie time scale")
    return movie_scale, tracks


def _track(moov: bytes, start: int, end: int, index: int) -> _Track:
    t = _Track(index)
    for kind, s, e in _boxes(moov, start, end):
        if kind == b"tkhd":
            m = struct.unpack_from(">9i", moov, s + (52 if moov[s] == 1 else 40))
            t.matrix = (m[0] >> 16 if m[0] % (1 << 16) == 0 else 99, m[1] >> 16 if m[1] % (1 << 16) == 0 else 99,
                        m[3] >> 16 if m[3] % (1 << 16) == 0 else 99, m[4] >> 16 if m[4] % (1 << 16) == 0 else 99,
                        m[2], m[5], m[8])  # fmt: skip
        elif kind == b"edts":
            for k, es, _ in _boxes(moov, s, e):
                if k == b"elst":
                    t.edits = _elst(moov, es)
        elif kind == b"tref":
            raise Unsupported("track references")
        elif kind == b"mdia":
            _media(moov, s, e, t)
    if not t.tables or not t.matrix:
        raise Unsupported("incomplete track")
    return t


def _elst(moov: bytes, s: int) -> list[tuple[int, int, int]]:
    version, count = moov[s], struct.unpack_from(">I", moov, s + 4)[0]
    fmt, step = (">QqI", 20) if version == 1 else (">IiI", 12)
    if 8 + count * step > len(moov) - s:
        raise Unsupported("bad elst")
    return [struct.unpack_from(fmt, moov, s + 8 + i * step) for i in range(count)]


def _media(moov: bytes, start: int, end: int, t: _Track) -> None:
    for kind, s, e in _boxes(moov, start, end):
        if kind == b"mdhd":
            t.timescale = struct.unpack_from(">I", moov, s + (20 if moov[s] == 1 else 12))[0]
        elif kind == b"hdlr":
            t.handler = moov[s + 8 : s + 12]
        elif kind == b"minf":
            for k, ms, me in _boxes(moov, s, e):
                if k == b"dinf":
                    _self_contained(moov, ms, me)
                elif k == b"stbl":
                    t.tables = {}
                    for kk, ss, se in _boxes(moov, ms, me):
                        if kk not in STBL_KNOWN or kk in t.tables:
                            raise Unsupported(f"sample table box {kk!r}")
                        t.tables[kk] = (ss, se)
    if t.timescale <= 0:
        raise Unsupported("no media time scale")


def _self_contained(moov: bytes, start: int, end: int) -> None:
    """Every data reference points into this file (flag 1)."""
    for kind, s, e in _boxes(moov, start, end):
        if kind == b"dref":
            for _, es, _ in _boxes(moov, s + 8, e):
                if not moov[es + 3] & 1:
                    raise Unsupported("media data in another file")


# Two engines compute the per-sample work below: plain Python on lists for up to SMALL samples, where numpy's
# per-call cost (and the cache its code evicts from the FFmpeg calls that follow) dominates, and numpy arrays
# above. tests/test_mp4_index.py runs every file through both and requires the same answer.


def _entries(moov: bytes, t: _Track, kind: bytes, entry_size: int, required: bool = True) -> tuple[int, int] | None:
    """``(offset of the first entry, entry count)`` of a full-box table, checked against its box."""
    where = t.tables.get(kind)
    if where is None:
        if required:
            raise Unsupported(f"no {kind!r}")
        return None
    s, e = where
    (count,) = struct.unpack_from(">I", moov, s + 4)
    if count * entry_size > e - s - 8 or count > MAX_SAMPLES:
        raise Unsupported(f"{kind!r} larger than its box")
    return s + 8, count


def _table(moov: bytes, t: _Track, kind: bytes, fmt: str, width: int, required: bool = True) -> np.ndarray | None:
    """A table as an int64 array ``[count, width]`` of big-endian ``fmt`` numbers (``None``: absent)."""
    dtype = np.dtype(fmt)
    found = _entries(moov, t, kind, width * dtype.itemsize, required)
    if found is None:
        return None
    at, count = found
    return np.frombuffer(moov, dtype, count * width, at).astype(np.int64).reshape(count, width)


def _rows(moov: bytes, t: _Track, kind: bytes, code: str, width: int, required: bool = True) -> tuple | None:
    """:func:`_table` flat, as a tuple of Python ints row after row; ``code`` is a struct letter."""
    found = _entries(moov, t, kind, width * struct.calcsize(code), required)
    if found is None:
        return None
    at, count = found
    return struct.unpack_from(f">{count * width}{code}", moov, at)


@dataclass
class _Layout:
    """Where a track's samples lie: its ``stsz``, ``stco``/``co64`` and ``stsc`` tables, checked."""

    count: int  # samples
    sizes_at: int  # offset of the first sample size in the moov buffer
    chunks: int
    chunks_at: int  # offset of the first chunk offset
    wide: bool  # co64: 64-bit chunk offsets
    bounds: tuple[int, ...]  # first chunk (1-based) of each sample-to-chunk run, then chunks + 1
    per_chunk: tuple[int, ...]  # samples per chunk in each run

    def read(self, moov: bytes, plain: bool) -> tuple:
        """``(sample sizes, chunk offsets)``: tuples of ints (``plain``) or int64 arrays."""
        if plain:
            sizes = struct.unpack_from(f">{self.count}I", moov, self.sizes_at)
            return sizes, struct.unpack_from(f">{self.chunks}{'Q' if self.wide else 'I'}", moov, self.chunks_at)
        sizes = np.frombuffer(moov, ">u4", self.count, self.sizes_at).astype(np.int64)
        offsets = np.frombuffer(moov, ">u8" if self.wide else ">u4", self.chunks, self.chunks_at)
        return sizes, offsets.astype(np.int64)


def _layout(moov: bytes, t: _Track) -> _Layout:
    s, e = t.tables.get(b"stsz") or (None, None)
    if s is None:
        raise Unsupported("no stsz")
    uniform, count = struct.unpack_from(">II", moov, s + 4)
    if uniform or count > MAX_SAMPLES or 12 + 4 * count > e - s:
        raise Unsupported("uniform or bad stsz")
    sizes_at = s + 12
    wide = b"co64" in t.tables
    chunks_at, chunks = _entries(moov, t, b"co64" if wide else b"stco", 8 if wide else 4)
    s, e = t.tables.get(b"stsc") or (None, None)
    if s is None:
        raise Unsupported("no stsc")
    (runs,) = struct.unpack_from(">I", moov, s + 4)
    if runs == 0 or 8 + 12 * runs > e - s:
        raise Unsupported("bad stsc")
    fields = struct.unpack_from(f">{3 * runs}I", moov, s + 8)
    first, per_chunk = fields[0::3], fields[1::3]
    bounds = (*first, chunks + 1)
    increasing = all(map(operator.lt, bounds, bounds[1:]))
    if first[0] != 1 or not increasing or min(per_chunk) <= 0 or set(fields[2::3]) != {1}:
        raise Unsupported("bad stsc, or several sample descriptions")
    if sum(map(operator.mul, per_chunk, map(operator.sub, bounds[1:], bounds))) != count:
        raise Unsupported("stsc and stsz disagree on the sample count")
    return _Layout(count, sizes_at, chunks, chunks_at, wide, bounds, per_chunk)


def _positions(moov: bytes, lay: _Layout, plain: bool) -> tuple:
    """Byte offset and size of every sample in decode order: two lists (``plain``) or two int64 arrays."""
    sizes, offsets = lay.read(moov, plain)
    if plain:
        pos, k = [], 0
        for a, b, per in zip(lay.bounds, lay.bounds[1:], lay.per_chunk, strict=False):
            for offset in offsets[a - 1 : b - 1]:
                for size in sizes[k : k + per]:
                    pos.append(offset)
                    offset += size
                k += per
        return pos, list(sizes)
    if len(lay.per_chunk) == 1:  # one run: every chunk holds the same number of samples
        by_chunk = sizes.reshape(-1, lay.per_chunk[0])
        return (offsets[:, None] + np.cumsum(by_chunk, axis=1) - by_chunk).reshape(-1), sizes
    per = np.repeat(lay.per_chunk, np.diff(lay.bounds))  # samples in each chunk
    chunk = np.repeat(np.arange(lay.chunks), per)
    before = np.cumsum(sizes) - sizes  # bytes of the samples before each one
    return offsets[chunk] + before - before[np.cumsum(per) - per][chunk], sizes


def _extent(pos, sizes) -> tuple[int, int]:
    """``(end of the last byte of any sample, smallest sample size)``; ``(0, 0)`` without samples."""
    if isinstance(pos, list):
        return max(map(operator.add, pos, sizes), default=0), min(sizes, default=0)
    return (int((pos + sizes).max()), int(sizes.min())) if len(sizes) else (0, 0)


def _sample_end(moov: bytes, t: _Track) -> int:
    """Where a track's data ends: a chunk holds its samples back to back, so the largest chunk offset + size."""
    lay = _layout(moov, t)
    if lay.count == 0:
        raise Unsupported("a track without samples")
    per = list(chain.from_iterable(map(repeat, lay.per_chunk, map(operator.sub, lay.bounds[1:], lay.bounds))))
    sizes, offsets = lay.read(moov, lay.count <= SMALL)
    if lay.count <= SMALL:
        starts = accumulate(per, initial=0)
        return max(offset + sum(sizes[k : k + n]) for offset, k, n in zip(offsets, starts, per, strict=False))
    starts = np.cumsum(per) - per  # first sample of each chunk (every chunk holds at least one)
    return int((offsets + np.add.reduceat(sizes, starts)).max())


def _entry(moov: bytes, t: _Track) -> tuple[bytes, int, int]:
    """The single sample description: ``(fourcc, start of its fields, end)``."""
    s, e = t.tables.get(b"stsd") or (None, None)
    if s is None or struct.unpack_from(">I", moov, s + 4)[0] != 1:
        raise Unsupported("not one sample description")
    entries = list(_boxes(moov, s + 8, e))
    if len(entries) != 1:
        raise Unsupported("not one sample description")
    return entries[0]


def _avc_entry(moov: bytes, t: _Track) -> tuple[int, int, int, bytes]:
    """``(width, height, NAL length size, SPS)`` of an ``avc1`` description, checked against its SPS."""
    fourcc, s, e = _entry(moov, t)
    if fourcc != b"avc1":
        raise Unsupported(f"video codec {fourcc!r}")
    width, height = struct.unpack_from(">HH", moov, s + 24)
    avcc = next((bs for k, bs, be in _boxes(moov, s + 78, e) if k == b"avcC"), None)
    if avcc is None or moov[avcc] != 1:
        raise Unsupported("no avcC")
    nal_size = (moov[avcc + 4] & 3) + 1
    if nal_size != 4 or moov[avcc + 5] & 0x1F != 1:
        raise Unsupported("not 4-byte NAL lengths and one SPS")
    (n,) = struct.unpack_from(">H", moov, avcc + 6)
    sps = moov[avcc + 8 : avcc + 8 + n]
    if len(sps) != n or sps_size(sps) != (width, height):
        raise Unsupported("SPS frame size differs from the sample description")
    return width, height, nal_size, sps


def _aac_rate(moov: bytes, t: _Track) -> int:
    """Sample rate of an AAC-LC ``mp4a`` description, as its AudioSpecificConfig and the description state it.

    FFmpeg reports the same rate, except for HE-AAC signalled only inside the audio frames ("implicit SBR",
    cores of <= 24 kHz), where it reports the doubled output rate after decoding a frame; the rate is
    informational (``VideoMetadata.audio_sample_rate``; audio decoding resamples from the decoder's output).
    """
    fourcc, s, e = _entry(moov, t)
    if fourcc != b"mp4a" or struct.unpack_from(">H", moov, s + 8)[0] != 0:
        raise Unsupported(f"audio codec {fourcc!r} or QuickTime sound description")
    stored = struct.unpack_from(">I", moov, s + 24)[0] >> 16
    esds = next((bs for k, bs, be in _boxes(moov, s + 28, e) if k == b"esds"), None)
    if esds is None:
        raise Unsupported("no esds")
    asc = _decoder_specific_info(moov, esds + 4, e)
    if len(asc) < 2 or asc[0] >> 3 != 2:
        raise Unsupported("not AAC-LC")
    index = ((asc[0] & 7) << 1) | (asc[1] >> 7)
    rate = AAC_RATES[index] if index < len(AAC_RATES) else 0
    if rate != stored:
        raise Unsupported("AAC sample rate not as stored in the sample description")
    return rate


def _decoder_specific_info(buf: bytes, pos: int, end: int) -> bytes:
    """The AudioSpecificConfig inside an ``esds`` ES descriptor."""

    def descriptor(p: int) -> tuple[int, int, int]:  # tag, payload start, payload end
        tag, length, p = buf[p], 0, p + 1
        for _ in range(4):
            b = buf[p]
            length, p = (length << 7) | (b & 0x7F), p + 1
            if not b & 0x80:
                break
        return tag, p, p + length

    tag, p, e = descriptor(pos)
    if tag != 3 or e > end:
        raise Unsupported("bad esds")
    flags = buf[p + 2]
    p += 3 + (2 if flags & 0x80 else 0)
    p += (1 + buf[p] if flags & 0x40 else 0) + (2 if flags & 0x20 else 0)
    tag, p, e = descriptor(p)
    if tag != 4 or buf[p] != 0x40:
        raise Unsupported("not MPEG-4 audio")
    tag, p, e = descriptor(p + 13)
    if tag != 5 or e > end:
        raise Unsupported("no decoder specific info")
    return buf[p:e]


# --------------------------------------------------------------------------- H.264 parameter sets


class _Bits:
    def __init__(self, rbsp: bytes) -> None:
        self.bits = bin(int.from_bytes(b"\x01" + rbsp, "big"))[3:]  # leading 1 keeps leading zeros
        self.pos = 0

    def u(self, n: int) -> int:
        if self.pos + n > len(self.bits):
            raise Unsupported("SPS shorter than its fields")
        v = int(self.bits[self.pos : self.pos + n], 2) if n else 0
        self.pos += n
        return v

    def ue(self) -> int:
        one = self.bits.find("1", self.pos)
        if one < 0 or one - self.pos > 31:
            raise Unsupported("bad exp-Golomb code in SPS")
        zeros = one - self.pos
        self.pos = one + 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


@lru_cache(maxsize=64)  # clips of one encoder share their SPS
def sps_size(nal: bytes) -> tuple[int, int]:
    """``(width, height)`` of an H.264 SPS NAL unit (header byte included), cropped as FFmpeg reports it.

    :class:`Unsupported` for interlaced streams and crops at the left or top edge (not needed by the files
    the fast path is for; the scan handles them).
    """
    if not nal or nal[0] & 0x1F != 7:
        raise Unsupported("not an SPS")
    r = _Bits(nal[1:].replace(b"\x00\x00\x03", b"\x00\x00"))
    profile = r.u(8)
    r.u(16)  # constraint flags, level
    r.ue()  # seq_parameter_set_id
    chroma = 1
    separate = 0
    if profile in HIGH_PROFILES:
        chroma = r.ue()
        if chroma == 3:
            separate = r.u(1)
        r.ue(), r.ue(), r.u(1)  # bit depths, qpprime_y_zero_transform_bypass
        if r.u(1):  # seq_scaling_matrix_present
            for i in range(8 if chroma != 3 else 12):
                if r.u(1):
                    last = nxt = 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + r.se() + 256) % 256
                        last = nxt or last
    r.ue()  # log2_max_frame_num_minus4
    poc = r.ue()
    if poc == 0:
        r.ue()
    elif poc == 1:
        r.u(1), r.se(), r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue(), r.u(1)  # max_num_ref_frames, gaps_in_frame_num_allowed
    width, height = (r.ue() + 1) * 16, (r.ue() + 1) * 16
    if not r.u(1):
        raise Unsupported("interlaced H.264")
    r.u(1)  # direct_8x8_inference
    if r.u(1):
        left, right, top, bottom = r.ue(), r.ue(), r.ue(), r.ue()
        if left or top or chroma > 3:
            raise Unsupported("SPS crops at the left or top")
        sub_w = 2 if chroma in (1, 2) and not separate else 1
        sub_h = 2 if chroma == 1 and not separate else 1
        width -= sub_w * right
        height -= sub_h * bottom
    if width <= 0 or height <= 0:
        raise Unsupported("SPS crops the whole frame")
    return width, height


def _check_parameter_sets(data, pos, sizes, nal_size: int, sps: bytes, size: tuple[int, int]) -> None:
    """Walk the NAL units of every video sample inside ``data``; an SPS among them must repeat the description's
    frame size. ``pos``/``sizes``: lists or int64 arrays (:func:`_positions`)."""
    if isinstance(pos, list):
        inside = [(p, n) for p, n in zip(pos, sizes, strict=True) if p + n <= len(data)]
        return _check_parameter_sets_small(data, inside, sps, size)
    keep = pos + sizes <= len(data)  # the samples in the prefix (all but those of very large files)
    pos, sizes = pos[keep], sizes[keep]
    if len(pos) <= SMALL:
        return _check_parameter_sets_small(data, list(zip(pos.tolist(), sizes.tolist(), strict=True)), sps, size)
    buf = np.frombuffer(data, np.uint8)
    try:
        start, end = pos, pos + sizes
        seen = {sps}
        for _ in range(MAX_NALS):
            if start.size == 0:
                return
            if (start + 5 > end).any():
                raise Unsupported("malformed NAL unit lengths")
            head = buf[start[:, None] + np.arange(5)].astype(np.int64)  # [n, 5]: 4-byte length, NAL header
            length = (head[:, 0] << 24) | (head[:, 1] << 16) | (head[:, 2] << 8) | head[:, 3]
            nxt = start + 4 + length
            if (nxt > end).any() or (length == 0).any():
                raise Unsupported("malformed NAL unit lengths")
            kind = head[:, 4] & 0x1F
            for i in np.flatnonzero((kind == 7) | (kind == 13) | (kind == 15)):
                nal = buf[start[i] + 4 : nxt[i]].tobytes()
                if nal not in seen:
                    if nal[0] & 0x1F != 7 or sps_size(nal) != size:
                        raise Unsupported("an in-band parameter set changes the stream")
                    seen.add(nal)
            more = nxt < end
            start, end = nxt[more], end[more]
        raise Unsupported("too many NAL units in a sample")
    finally:
        del buf


def _check_parameter_sets_small(data, samples: list[tuple[int, int]], sps: bytes, size: tuple[int, int]) -> None:
    """:func:`_check_parameter_sets` for a few ``(offset, size)`` samples, in plain Python."""
    seen = {sps}
    unpack = struct.Struct(">IB").unpack_from
    for p, n in samples:
        end = p + n
        for _ in range(MAX_NALS):
            if p + 5 > end:
                raise Unsupported("malformed NAL unit lengths")
            length, header = unpack(data, p)
            nxt = p + 4 + length
            if length == 0 or nxt > end:
                raise Unsupported("malformed NAL unit lengths")
            if header & 0x1F in (7, 13, 15):
                nal = bytes(data[p + 4 : nxt])
                if nal not in seen:
                    if nal[0] & 0x1F != 7 or sps_size(nal) != size:
                        raise Unsupported("an in-band parameter set changes the stream")
                    seen.add(nal)
            if nxt == end:
                break
            p = nxt
        else:
            raise Unsupported("too many NAL units in a sample")


# --------------------------------------------------------------------------- timestamps


def _timeline(moov: bytes, v: _Track, n: int, movie_scale: int, plain: bool) -> tuple:
    """Display-order pts, durations and key frames of the ``n`` video samples as FFmpeg's demuxer gives them, and
    whether decode order differs from display order and every key frame splits the stream cleanly
    (:func:`clean_keys`): ``(pts, durations, keys, reordered, clean_keys)``, lists (``plain``) or arrays."""
    if b"sbgp" in v.tables:
        s, _ = v.tables[b"sbgp"]
        if moov[s + 4 : s + 8] in (b"rap ", b"sync"):
            raise Unsupported("random-access sample groups")
    edit = _edit_window(v, movie_scale) if v.edits else None
    return (_timeline_plain if plain else _timeline_numpy)(moov, v, n, edit)


def _edit_window(v: _Track, movie_scale: int) -> tuple[int, int]:
    """``(media start, media end)`` of the track's single plain edit, or :class:`Unsupported`."""
    if len(v.edits) != 1:
        raise Unsupported("several edits")
    duration, media_time, rate = v.edits[0]
    if media_time < 0 or rate != 1 << 16:
        raise Unsupported("empty or non-unit-rate edit")
    span = (duration * v.timescale * 2 + movie_scale) // (2 * movie_scale)  # av_rescale: round half up
    return media_time, media_time + span


# The edit is applied as FFmpeg's ``mov_fix_index`` does: it must drop no frame (every pts inside the window) and
# end at the last sample (the key frame, the second one with composition offsets, whose pts plus frame duration
# reaches the window's end; FFmpeg's frame duration is the next dts step, the last frame's the edit's span).


def _timeline_numpy(moov: bytes, v: _Track, n: int, edit: tuple[int, int] | None) -> tuple:
    stts = _table(moov, v, b"stts", ">u4", 2)
    if int(stts[:, 0].sum()) != n:
        raise Unsupported("stts and stsz disagree on the sample count")
    if len(stts) == 1:  # constant frame rate
        delta = np.full(n, stts[0, 1], np.int64)  # [N] decode-order durations
        dts = np.arange(0, n * stts[0, 1], stts[0, 1]) if stts[0, 1] else np.zeros(n, np.int64)
    else:
        delta = np.repeat(stts[:, 1], stts[:, 0])
        dts = np.cumsum(delta) - delta
    ctts = _table(moov, v, b"ctts", ">i4", 2, required=False)
    if ctts is not None:
        if int(ctts[:, 0].sum()) != n or (ctts[:, 1] < 0).any():
            raise Unsupported("ctts count differs from the samples, or negative composition offsets")
        pts = dts + np.repeat(ctts[:, 1], ctts[:, 0])
    else:
        pts = dts.copy()
    keys = np.ones(n, bool)
    stss = _table(moov, v, b"stss", ">u4", 1, required=False)
    if stss is not None:
        stss = stss[:, 0]
        if len(stss) == 0 or stss[0] < 1 or stss[-1] > n or (stss[1:] <= stss[:-1]).any():
            raise Unsupported("bad stss")
        keys[:] = False
        keys[stss - 1] = True
    if not keys[0] or (pts < pts[0]).any():
        raise Unsupported("the first sample is not a key frame displayed first")
    if edit is not None:
        start, end = edit
        if (pts < start).any() or (pts >= end).any():
            raise Unsupported("the edit drops frames")
        step = np.concatenate([dts[1:] - dts[:-1], [end - start]])
        last = np.flatnonzero(keys & (pts + step >= end))
        skip = 1 if ctts is not None else 0
        if (last[skip] if len(last) > skip else n - 1) != n - 1:
            raise Unsupported("the edit ends before the last sample")
        pts = pts - pts.min()
    order = np.argsort(pts, kind="stable")
    shown = pts[order]
    if (shown[1:] == shown[:-1]).any():
        raise Unsupported("duplicate timestamps")
    # durations: the stts delta of each sample, the last one's from the edit (as FFmpeg's packets carry them)
    return shown, delta[order], keys[order], bool((pts[1:] < pts[:-1]).any()), clean_keys(pts, keys)


def _timeline_plain(moov: bytes, v: _Track, n: int, edit: tuple[int, int] | None) -> tuple:
    """:func:`_timeline_numpy` on lists (built by C-level builtins where it can: few Python steps per clip)."""
    stts = _rows(moov, v, b"stts", "I", 2)  # (count, delta) pairs
    if sum(stts[0::2]) != n:
        raise Unsupported("stts and stsz disagree on the sample count")
    delta = list(chain.from_iterable(map(repeat, stts[1::2], stts[0::2])))  # [N] decode-order durations
    dts = list(accumulate(delta[:-1], initial=0))
    ctts = _rows(moov, v, b"ctts", "i", 2, required=False)  # (count, composition offset) pairs
    if ctts is not None:
        if sum(ctts[0::2]) != n or min(ctts[1::2], default=0) < 0:
            raise Unsupported("ctts count differs from the samples, or negative composition offsets")
        pts = list(map(operator.add, dts, chain.from_iterable(map(repeat, ctts[1::2], ctts[0::2]))))
    else:
        pts = dts
    stss = _rows(moov, v, b"stss", "I", 1, required=False)
    if stss is None:
        keys = [True] * n
    else:
        if not stss or stss[0] < 1 or stss[-1] > n or not all(map(operator.lt, stss, stss[1:])):
            raise Unsupported("bad stss")
        keys = [False] * n
        for k in stss:
            keys[k - 1] = True
    low = min(pts)
    if not keys[0] or low < pts[0]:
        raise Unsupported("the first sample is not a key frame displayed first")
    if edit is not None:
        start, end = edit
        if low < start or max(pts) >= end:
            raise Unsupported("the edit drops frames")
        step = [*map(operator.sub, dts[1:], dts[:-1]), end - start]
        last = [i for i in compress(range(n), keys) if pts[i] + step[i] >= end]
        skip = 1 if ctts is not None else 0
        if (last[skip] if len(last) > skip else n - 1) != n - 1:
            raise Unsupported("the edit ends before the last sample")
        pts = [p - low for p in pts]
    order = sorted(range(n), key=pts.__getitem__)  # stable, as numpy's
    shown = [pts[i] for i in order]
    if any(map(operator.eq, shown[1:], shown[:-1])):
        raise Unsupported("duplicate timestamps")
    reordered = any(map(operator.lt, pts[1:], pts[:-1]))
    return shown, [delta[i] for i in order], [keys[i] for i in order], reordered, clean_keys_plain(pts, keys)


def clean_keys(pts: np.ndarray, keys: np.ndarray) -> bool:
    """:func:`clean_keys_plain`, vectorised (decode-order ``pts`` and ``keys``)."""
    if len(pts) < 2:
        return True
    before = np.maximum.accumulate(pts)[:-1]  # max pts decoded before sample i+1
    after = np.minimum.accumulate(pts[::-1])[::-1][1:]  # min pts decoded after sample i
    bad_before = keys[1:] & (before >= pts[1:])
    bad_after = keys[:-1] & (after <= pts[:-1])
    return not (bad_before.any() or bad_after.any())


def clean_keys_plain(pts: list[int], keys: list[bool]) -> bool:
    """Every key frame splits the stream: frames decoded before it are displayed before it, frames after, after.

    Then a key frame's position in decode order is its display index, and decoding from it yields the
    frames from it on, in display order (no open-GOP leading pictures). ``pts``/``keys`` in decode order.
    """
    keyed = list(compress(range(len(pts)), keys))
    highest, start = -math.inf, 0  # the largest pts decoded before key frame i: whole slices at a time
    for i in keyed:
        highest = max(highest, max(pts[start:i], default=highest))
        if highest >= pts[i]:
            return False
        start = i
    lowest, stop = math.inf, len(pts)  # the smallest pts decoded after it
    for i in reversed(keyed):
        lowest = min(lowest, min(pts[i + 1 : stop], default=lowest))
        if lowest <= pts[i]:
            return False
        stop = i + 1
    return True
