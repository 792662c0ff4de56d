"""The MP4 fast path (vidlang/data/decoding/mp4.py): the same index and frames as the PyAV scan, or a fallback.

``read_mp4`` reads an H.264 MP4/MOV file's sample tables instead of demuxing it with PyAV. On every file it
accepts, the index must equal the scan's field by field (``data_end`` aside: the scan of a complete file only
measures the video stream, and the value is only used for truncated files, which the fast path never
accepts), and every backend must return the same frames as with the fast path switched off. On every suspect
file it must refuse (raise ``Unsupported``), so that the scan, with all its guards, handles it. The decode
matrix (tests/test_decode_matrix.py) checks the accepted matrix files against the ffmpeg CLI as well.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.register_assert_rewrite("decode_matrix", "videos")
from decode_matrix import BY_NAME  # noqa: E402

from vidlang.data.decoding import VideoDecodeError, open_video  # noqa: E402
from vidlang.data.decoding import mp4 as mp4mod  # noqa: E402
from vidlang.data.decoding.mp4 import Unsupported, read_mp4, sps_size  # noqa: E402
from vidlang.data.decoding.scan import index_video, scan_video  # noqa: E402

pytest_plugins = ["decode_matrix"]

SRC = ["-f", "lavfi", "-t", "2", "-i", "testsrc2=size=160x96:rate=25"]
ODD = ["-f", "lavfi", "-t", "2", "-i", "testsrc2=size=97x61:rate=25"]
TONE = ["-f", "lavfi", "-t", "2", "-i", "sine=frequency=300:sample_rate=48000"]
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
# files the fast path reads: name -> ffmpeg arguments (after the inputs)
ACCEPTED = {
    "bframes.mp4": [*SRC, *X264, "-bf", "3", "-g", "12"],
    "no_bframes.mp4": [*SRC, *X264, "-bf", "0"],
    "no_editlist.mp4": [*SRC, *X264, "-bf", "2", "-use_editlist", "0"],
    "opengop.mp4": [*SRC, *X264, "-x264-params", "open-gop=1:keyint=12:bframes=3"],
    "inband_sps.mp4": [*SRC, *X264, "-x264-params", "repeat-headers=1:keyint=12"],
    "audio48k.mp4": [*SRC, *TONE, *X264, "-c:a", "aac"],
    "audio22k.mp4": [*SRC, "-f", "lavfi", "-t", "2", "-i", "sine=sample_rate=22050", *X264, "-c:a", "aac"],
    "audio_first.mp4": [*TONE, *SRC, "-map", "1:v", "-map", "0:a", *X264, "-c:a", "aac"],
    "odd.mp4": [*ODD, *X264],
    "odd444.mp4": [*SRC, "-vf", "scale=97:61,format=yuv444p", *X264[:-1], "yuv444p"],
    "hi10.mp4": [*SRC, *X264[:-1], "yuv420p10le"],
    "ntsc.mp4": [*SRC, "-r", "30000/1001", *X264, "-bf", "2"],
    "plain.mov": [*SRC, *X264, "-bf", "2"],
}
# files it must refuse: name -> (ffmpeg arguments, a word of the reason)
REFUSED = {
    "fragmented.mp4": ([*SRC, *X264, "-movflags", "frag_keyframe+empty_moov"], "fragmented"),
    "trimmed.mp4": (None, "edit"),  # a stream copy cut at a non-key frame: the edit list drops frames
    "sound.mov": ([*SRC, *TONE, *X264, "-c:a", "aac"], "sound description"),
    "timecode.mov": ([*SRC, *X264, "-timecode", "01:00:00:00"], "references"),
    "interlaced.mp4": ([*SRC, "-vf", "interlace", *X264, "-flags", "+ilme+ildct"], "interlaced"),
    "hevc.mp4": ([*SRC, "-c:v", "libx265", "-x265-params", "log-level=error", "-tag:v", "hvc1"], "codec"),
    "matroska.mkv": ([*SRC, *X264], "not an MP4"),
    "cut.mp4": (None, "past the end"),  # cut inside the mdat box (moov at the front)
}
FIELDS = ("pts", "durations", "keyframes", "time_base", "width", "height", "codec", "stream_index", "has_audio",
          "audio_sample_rate", "truncated", "format", "rotation", "reordered", "clean_keys")  # fmt: skip


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def mp4_dir(tmp_path_factory) -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.fail("the ffmpeg CLI is not installed; the tests need it (tools/setup.sh installs it)")
    root = tmp_path_factory.mktemp("mp4_index")
    for name, args in ACCEPTED.items():
        _ffmpeg(*args, str(root / name))
    for name, (args, _) in REFUSED.items():
        if args is not None:
            _ffmpeg(*args, str(root / name))
    _ffmpeg("-ss", "0.5", "-i", str(root / "bframes.mp4"), "-c", "copy", str(root / "trimmed.mp4"))
    _ffmpeg(*SRC, *X264, "-movflags", "faststart", str(root / "faststart.mp4"))
    data = (root / "faststart.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    return root


def assert_same_index(path: Path, rotation: bool = True) -> None:
    fast = index_video(str(path), "f", "pyav", rotation=rotation)
    scan = scan_video(str(path), "s", "pyav", rotation=True)
    assert fast.container is None  # no PyAV container: the fast path ran
    for field in FIELDS:
        assert getattr(fast, field) == getattr(scan, field), (path.name, field)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_fast_index_equals_the_scan(mp4_dir, name):
    read_mp4(str(mp4_dir / name), None)  # accepted (raises Unsupported otherwise)
    assert_same_index(mp4_dir / name)


@pytest.mark.parametrize("name", ["h264_bf.mp4", "h264_bf.mov", "vfr.mp4", "rot90.mp4", "rot180.mp4", "rot270.mov"])
def test_fast_index_equals_the_scan_on_the_matrix(decode_matrix, name):
    assert_same_index(decode_matrix.path(BY_NAME[name]))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_suspect_files_fall_back_to_the_scan(mp4_dir, name):
    with pytest.raises(Unsupported) as err:
        read_mp4(str(mp4_dir / name), None)
    assert REFUSED[name][1] in str(err.value)
    if name != "cut.mp4":  # (a cut file's own handling is tested in test_decoding.py)
        assert index_video(str(mp4_dir / name), "f", "pyav").num_frames > 0  # the scan indexes it


def test_truncated_matrix_files_fall_back(decode_matrix):
    for name in ("trunc_video.mp4", "trunc_audio.mp4"):
        with pytest.raises(Unsupported):
            read_mp4(str(decode_matrix.path(BY_NAME[name])), None)
        assert index_video(str(decode_matrix.path(BY_NAME[name])), "t", "pyav").truncated


@pytest.mark.parametrize("backend", ["torchcodec", "pyav", "decord"])
@pytest.mark.parametrize("name", ["bframes.mp4", "opengop.mp4", "audio_first.mp4", "odd.mp4", "plain.mov"])
def test_same_frames_as_the_scan_path(mp4_dir, backend, name, monkeypatch):
    """Every frame, in random order, equal with the fast path on and off (the scan's index)."""
    path = str(mp4_dir / name)
    with open_video(path, backend) as r:
        n = r.metadata.num_frames
        order = np.random.default_rng(0).permutation(n).tolist()
        fast = r.get_frames(order)
        fast_meta, fast_ts = r.metadata, r.frame_timestamps()
    monkeypatch.setattr(mp4mod, "_read", lambda *a: (_ for _ in ()).throw(Unsupported("switched off")))
    with open_video(path, backend) as r:
        assert r.index.container is None or backend == "pyav"
        assert r.metadata == fast_meta and torch.equal(r.frame_timestamps(), fast_ts)
        assert torch.equal(r.get_frames(order), fast)


def test_pixel_limit_holds_on_the_fast_path(mp4_dir):
    """A stream over ``max_pixels`` is never indexed by the fast path; the scan refuses it before decoding."""
    path = str(mp4_dir / "bframes.mp4")
    with pytest.raises(Unsupported, match="max_pixels"):
        read_mp4(path, 160 * 96 - 1)
    for backend in ("torchcodec", "pyav", "decord"):
        with pytest.raises(VideoDecodeError, match="max_pixels=15359"):
            open_video(path, backend, max_pixels=160 * 96 - 1)
    assert read_mp4(path, 160 * 96).width == 160


def _avcc_sps(path: Path) -> bytes:
    data = path.read_bytes()
    at = data.index(b"avcC") + 4
    (n,) = struct.unpack_from(">H", data, at + 6)
    return data[at + 8 : at + 8 + n]


def test_sps_sizes(mp4_dir):
    assert sps_size(_avcc_sps(mp4_dir / "bframes.mp4")) == (160, 96)
    assert sps_size(_avcc_sps(mp4_dir / "odd.mp4")) == (96, 60)  # x264 rounds 4:2:0 to even; cropped at the bottom
    assert sps_size(_avcc_sps(mp4_dir / "odd444.mp4")) == (97, 61)  # 4:4:4: crop units of one pixel
    assert sps_size(_avcc_sps(mp4_dir / "hi10.mp4")) == (160, 96)
    with pytest.raises(Unsupported, match="interlaced"):
        sps_size(_avcc_sps(mp4_dir / "interlaced.mp4"))


@pytest.mark.parametrize("samples", [3, mp4mod.SMALL + 5])  # the plain-Python and the numpy walk
def test_an_inband_sps_that_changes_the_frame_size_falls_back(mp4_dir, samples):
    """A sample carrying an SPS of another size (a resolution change FFmpeg would follow) is refused."""
    sps, other = _avcc_sps(mp4_dir / "bframes.mp4"), _avcc_sps(mp4_dir / "odd.mp4")
    slice_nal = b"\x65" + b"\x88" * 20  # an IDR slice NAL (content irrelevant to the walk)

    def sample(*nals: bytes) -> bytes:
        return b"".join(struct.pack(">I", len(n)) + n for n in nals)

    def check(last: bytes) -> None:
        parts = [sample(sps, slice_nal)] * (samples - 1) + [last]
        data = b"".join(parts)
        sizes = np.array([len(p) for p in parts], np.int64)
        pos = np.cumsum(sizes) - sizes
        mp4mod._check_parameter_sets(data, pos, sizes, 4, sps, (160, 96))  # arrays, as the numpy engine passes them
        mp4mod._check_parameter_sets(data, pos.tolist(), sizes.tolist(), 4, sps, (160, 96))  # lists

    check(sample(slice_nal))  # the same SPS repeated in band: accepted
    with pytest.raises(Unsupported, match="in-band"):
        check(sample(other, slice_nal))
    with pytest.raises(Unsupported, match="NAL"):
        check(sample(slice_nal)[:-3])  # a NAL length past its sample


def _read_both(src, monkeypatch) -> tuple:
    """``read_mp4`` under the plain-Python and the numpy engine: each a dict of fields, or the refusal's text."""
    out = []
    for small in (10**9, 0):
        with monkeypatch.context() as patch:
            patch.setattr(mp4mod, "SMALL", small)
            try:
                got = read_mp4(src, None)
            except Unsupported as e:
                out.append(f"refused: {e}")
                continue
        fields = dict(vars(got))
        for key in ("pts", "durations", "keyframes"):
            fields[key] = [bool(x) if key == "keyframes" else int(x) for x in fields[key]]
        out.append(fields)
    return tuple(out)


@pytest.mark.parametrize("name", sorted(ACCEPTED) + sorted(REFUSED) + ["faststart.mp4"])
def test_both_engines_give_the_same_answer(mp4_dir, name, monkeypatch):
    """Small tables are worked in plain Python, large ones with numpy: on every file both give the same index
    (each equal to the scan's: the default engine is checked against the scan above, and its files all lie
    below the threshold) or refuse with the same reason."""
    plain, vector = _read_both(str(mp4_dir / name), monkeypatch)
    assert plain == vector
    assert isinstance(plain, dict) == (name in ACCEPTED or name == "faststart.mp4")


@pytest.mark.parametrize("name", ["h264_bf.mp4", "h264_bf.mov", "vfr.mp4", "rot90.mp4", "rot180.mp4", "rot270.mov"])
def test_both_engines_give_the_same_answer_on_the_matrix(decode_matrix, name, monkeypatch):
    """The matrix's MP4/MOV files too: variable frame rate (several ``stts`` runs) and rotations."""
    plain, vector = _read_both(str(decode_matrix.path(BY_NAME[name])), monkeypatch)
    assert plain == vector and isinstance(plain, dict)


def test_both_engines_agree_on_damaged_tables(mp4_dir, monkeypatch):
    """Random byte changes inside the moov box of files with B-frames, an edit list, audio: the two engines
    accept and refuse the same files, with the same index or the same reason (no other exception escapes)."""
    rng = np.random.default_rng(7)
    accepted = refused = 0
    for name in ("bframes.mp4", "audio_first.mp4", "faststart.mp4"):
        data = (mp4_dir / name).read_bytes()
        start = data.index(b"moov") - 4
        end = start + struct.unpack_from(">I", data, start)[0]
        for _ in range(150):
            damaged = bytearray(data)
            for at in rng.integers(start + 8, end, size=rng.integers(1, 4)):
                damaged[at] = int(rng.integers(0, 256))
            plain, vector = _read_both(bytes(damaged), monkeypatch)
            assert plain == vector, name
            accepted += isinstance(plain, dict)
            refused += isinstance(plain, str)
    assert accepted > 50 and refused > 50  # both outcomes exercised


def test_clean_keys_engines_match_the_definition():
    """Key frames split the stream cleanly: the plain and the vectorised check against the definition itself."""
    rng = np.random.default_rng(3)
    for _ in range(3000):
        n = int(rng.integers(1, 12))
        pts = rng.integers(0, 10, n).tolist()
        keys = (rng.random(n) < 0.4).tolist()
        expected = all(
            max(pts[:i], default=-1) < pts[i] < min(pts[i + 1 :], default=99) for i in range(n) if keys[i]
        )
        assert mp4mod.clean_keys_plain(pts, keys) == expected
        assert mp4mod.clean_keys(np.array(pts), np.array(keys)) == expected


@pytest.mark.parametrize("name", ["bframes.mp4", "audio_first.mp4", "ntsc.mp4"])
def test_torchcodec_core_route_gives_videodecoders_frames(mp4_dir, name, monkeypatch):
    """torchcodec opened below ``VideoDecoder`` (the index as tensors) returns what ``VideoDecoder`` returns."""
    from vidlang.data.decoding.torchcodec import TorchCodecReader, core_ops

    assert core_ops() is not None  # this torchcodec has the functions (the route is tested, not skipped)
    path = str(mp4_dir / name)
    with open_video(path, "torchcodec") as r:
        assert r._core is not None
        order = np.random.default_rng(1).permutation(r.metadata.num_frames).tolist()
        direct = r.get_frames(order)
    monkeypatch.setattr(TorchCodecReader, "direct", False)
    with open_video(path, "torchcodec") as r:
        assert r._core is None
        assert torch.equal(r.get_frames(order), direct)


def test_torchcodec_core_route_only_where_it_applies(mp4_dir, decode_matrix):
    """Rotated, resized and scanned files go through ``VideoDecoder`` (its metadata checks the rotation)."""
    with open_video(str(decode_matrix.path(BY_NAME["rot90.mp4"])), "torchcodec") as r:
        assert r._core is None and r.metadata.rotation == 90
    with open_video(str(mp4_dir / "bframes.mp4"), "torchcodec", resize_short_side=48) as r:
        assert r._core is None and r.get_frames([0]).shape == (1, 3, 48, 80)
    with open_video(str(mp4_dir / "matroska.mkv"), "torchcodec") as r:
        assert r._core is None


def test_large_file_reads_its_moov_beyond_the_prefix(mp4_dir, monkeypatch):
    """A file larger than the prefix read at once: the moov box (at the end, as ffmpeg writes it) is read on its
    own, the samples past the prefix are not walked, and the index is the same; bytes input agrees."""
    path = mp4_dir / "bframes.mp4"
    full = read_mp4(str(path), None)
    assert path.read_bytes().index(b"moov") > 4096  # the moov box lies past the small prefix below
    monkeypatch.setattr(mp4mod, "PREFIX", 4096)
    small = read_mp4(str(path), None)
    from_bytes = read_mp4(path.read_bytes(), None)
    for got in (small, from_bytes):
        assert np.array_equal(got.pts, full.pts) and np.array_equal(got.keyframes, full.keyframes)
        assert (got.width, got.height, got.data_end) == (full.width, full.height, full.data_end)


def test_torchcodec_core_route_is_refused_when_its_private_keywords_changed(monkeypatch):
    """The core functions are private torchcodec API: a release that renames a keyword vidlang passes makes the
    reader use the public ``VideoDecoder`` instead of failing on every video."""
    import torchcodec._core._ffmpeg_ops as ops

    from vidlang.data.decoding.torchcodec import core_ops

    assert core_ops.__wrapped__() is not None

    def renamed(decoder, *, frame_idx):  # what a future release might do
        raise AssertionError("never called")

    monkeypatch.setattr(ops, "get_frames_at_indices", renamed)
    assert core_ops.__wrapped__() is None
