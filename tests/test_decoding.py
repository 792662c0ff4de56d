"""Decoding backends against videos whose frames carry their own index (see tests/videos.py).

Tolerances: frames are compared with the truth inside the blocks only (``interior_mask``,
3 px from block edges), where the only error left is the 8-bit RGB->YUV->RGB round trip of
the encoder input and the decoder's colour conversion: at most 2 levels, measured; we allow
3. At block edges 4:2:0 chroma subsampling and resize filters legitimately mix
neighbouring blocks. Backends agree bit-exactly with each other at native size (all use
FFmpeg's swscale with the same defaults).
"""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import torch

pytest.register_assert_rewrite("videos")  # before the import: it is also loaded as a plugin below
from videos import VFR_PTS, frame_pattern, interior_mask, make_video, read_index  # noqa: E402

from vidlang.data.decoding import (  # noqa: E402
    AUTO_ORDER,
    DEFAULT_MAX_PIXELS,
    READERS,
    FrameIndexError,
    VideoDecodeError,
    open_video,
    resized_hw,
    resolve_backend,
)

pytest_plugins = ["videos"]  # the session-scoped video fixtures

BACKENDS = ["torchcodec", "pyav", "decord"]
TOL = 3  # levels, inside blocks (see module docstring)


def hwc(frames: torch.Tensor) -> np.ndarray:
    """``[T, C, H, W]`` uint8 tensor -> ``[T, H, W, C]`` int array."""
    assert frames.dtype == torch.uint8 and frames.ndim == 4 and frames.shape[1] == 3
    return frames.permute(0, 2, 3, 1).cpu().numpy().astype(np.int64)


def assert_frames_match(frames: torch.Tensor, indices: list[int]) -> None:
    """Each decoded frame shows the expected index and equals the true frame inside the blocks."""
    arr = hwc(frames)
    assert [read_index(f) for f in arr] == list(indices)
    h, w = arr.shape[1:3]
    mask = interior_mask(h, w, 3 * max(1, -(-h // 48)))  # filters reach farther when upscaling
    truth = np.stack([frame_pattern(i, h, w) for i in indices]).astype(np.int64)
    assert np.abs(arr - truth)[:, mask].max() <= TOL


VIDEOS = ["cfr_video", "bframes_video", "vfr_video", "mkv_video"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("video", VIDEOS)
def test_frames_by_index_match_truth(backend, video, request):
    v = request.getfixturevalue(video)
    with open_video(v.path, backend) as r:
        n = r.metadata.num_frames
        assert n == v.num_frames
        assert_frames_match(r.get_frames(list(range(n))), list(range(n)))
        order = [5, 2, 2, n - 1, 0, 7, 5]  # any order, repeats
        assert_frames_match(r.get_frames(order), order)


@pytest.mark.parametrize("video", VIDEOS)
def test_backends_agree_exactly(video, request):
    v = request.getfixturevalue(video)
    idx = [0, 3, 7, v.num_frames - 1, 1]
    frames = {b: open_video(v.path, b).get_frames(idx) for b in BACKENDS}
    for b in BACKENDS[1:]:
        assert torch.equal(frames[b], frames[BACKENDS[0]]), b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("video", VIDEOS)
def test_metadata_and_timestamps(backend, video, request):
    v = request.getfixturevalue(video)
    with open_video(v.path, backend) as r:
        m = r.metadata
        assert (m.width, m.height, m.num_frames, m.has_audio) == (v.width, v.height, v.num_frames, False)
        ts = r.frame_timestamps()
        assert ts.dtype == torch.float64 and ts.shape == (v.num_frames,)
        # Matroska stores milliseconds: 1/12 s is 0.083
        np.testing.assert_allclose(ts.numpy(), v.pts, atol=1e-3)
        assert m.start_time == pytest.approx(0.0, abs=1e-3)
        # duration = last pts + the last frame's duration (the muxer's packet duration)
        assert v.pts[-1] < m.duration <= v.pts[-1] + 0.2
        assert m.fps == pytest.approx(m.num_frames / m.duration)
    if video != "vfr_video":
        assert m.duration == pytest.approx(v.duration, abs=1e-3)
        assert m.fps == pytest.approx(v.fps, rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vfr_frames_by_time(backend, vfr_video):
    pts = np.array(VFR_PTS)
    # exact pts, just before the next pts, in long gaps, before the start and after the end
    times = [*pts, *(pts[1:] - 1e-3), 0.25, 0.7, 1.3, 2.0, -1.0, 99.0]
    expected = [int(np.searchsorted(pts, t, side="right")) - 1 for t in times]
    expected = [min(max(i, 0), len(pts) - 1) for i in expected]
    with open_video(vfr_video.path, backend) as r:
        assert r.indices_at(times) == expected
        assert_frames_match(r.get_frames_at(times), expected)
    # a naive constant-fps mapping would pick other frames: the test can tell
    naive = [min(int(t * len(pts) / pts[-1]), len(pts) - 1) for t in times if t >= 0]
    assert naive != [e for t, e in zip(times, expected, strict=True) if t >= 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_and_file_like_input(backend, cfr_video):
    data = cfr_video.path.read_bytes()
    idx = [0, 11, 4, 23]
    expected = open_video(cfr_video.path, backend).get_frames(idx)
    for src in (data, bytearray(data), io.BytesIO(data), open(cfr_video.path, "rb")):
        with open_video(src, backend) as r:
            assert r.metadata.num_frames == cfr_video.num_frames
            assert torch.equal(r.get_frames(idx), expected)
        if hasattr(src, "close"):
            src.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("short", [24, 32, 96])
def test_resize_short_side(backend, short, cfr_video):
    h, w = resized_hw(48, 64, short)
    assert h == short and w % 2 == 0 and abs(w / h - 64 / 48) < 0.05
    with open_video(cfr_video.path, backend, resize_short_side=short) as r:
        frames = r.get_frames([0, 9, 23])
        assert frames.shape == (3, 3, h, w)
        assert_frames_match(frames, [0, 9, 23])
        assert (r.metadata.width, r.metadata.height) == (64, 48)  # the stream's size


def test_resized_hw_rounds_to_even_and_keeps_aspect():
    assert resized_hw(240, 320, 112) == (112, 150)
    assert resized_hw(320, 240, 112) == (150, 112)
    assert resized_hw(480, 640, None) == (480, 640)
    assert resized_hw(101, 203, 51) == (52, 102)
    with pytest.raises(ValueError):
        resized_hw(48, 64, 1)


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_track(backend, audio_video):
    with open_video(audio_video.path, backend) as r:
        assert r.metadata.has_audio and r.metadata.audio_sample_rate == 16000
        for rate in (16000, 8000, 22050):
            a = r.get_audio(rate)
            assert a.dtype == torch.float32 and a.ndim == 1
            # AAC adds encoder priming/padding (< 1 frame of 1024 samples at 16 kHz): within 5 %
            assert abs(len(a) - audio_video.duration * rate) <= 0.05 * audio_video.duration * rate
            assert dominant_frequency(a.numpy(), rate) == pytest.approx(440.0, abs=5.0)
            assert 0.3 < float(a.abs().max()) < 0.7  # the sine's amplitude is 0.5, not silence


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_audio_is_none(backend, cfr_video):
    with open_video(cfr_video.path, backend) as r:
        assert r.get_audio(16000) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_errors(backend, cfr_video):
    with open_video(cfr_video.path, backend) as r:
        assert_frames_match(r.get_frames([-1, -24]), [23, 0])  # Python-style negatives
        for bad in ([24], [0, -25], [100]):
            with pytest.raises(FrameIndexError) as exc:
                r.get_frames(bad)
            assert isinstance(exc.value, IndexError) and isinstance(exc.value, VideoDecodeError)
            assert str(cfr_video.path) in str(exc.value)
        assert r.get_frames([]).shape == (0, 3, 48, 64)


# --------------------------------------------------------------------------- bad input


def _rng_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="session")
def bad_files(video_dir, cfr_video, faststart_video):
    """name -> path of each kind of bad input."""
    d = video_dir / "bad"
    d.mkdir()
    data = cfr_video.path.read_bytes()
    files = {"missing": d / "missing.mp4"}
    (files.setdefault("empty", d / "empty.mp4")).write_bytes(b"")
    # MP4 whose index (moov) is at the end: cut in half it has no index left
    (files.setdefault("truncated", d / "truncated.mp4")).write_bytes(data[: len(data) // 2])
    (files.setdefault("random", d / "random.mp4")).write_bytes(_rng_bytes(20000))
    middle = bytearray(faststart_video.path.read_bytes())
    n = len(middle)
    middle[n // 3 : n // 3 + n // 4] = _rng_bytes(n // 4, 1)
    (files.setdefault("overwritten_middle", d / "middle.mp4")).write_bytes(bytes(middle))
    (files.setdefault("text", d / "notes.txt")).write_text("this is not a video\n" * 50)
    import av

    png = d / "image.png"
    av.VideoFrame.from_ndarray(frame_pattern(3), format="rgb24").to_image().save(png)
    files["png"] = png
    files["audio_only"] = make_video(d / "audio_only.mp4", 20, 10.0, audio_freq=440.0, audio_only=True).path
    (files.setdefault("directory", d / "dir.mp4")).mkdir()
    return files


BAD_KINDS = ["missing", "empty", "truncated", "random", "overwritten_middle", "text", "png", "audio_only", "directory"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_raises(backend, kind, bad_files):
    path = bad_files[kind]
    with pytest.raises(VideoDecodeError) as exc:
        with open_video(path, backend) as r:
            r.get_frames(list(range(r.metadata.num_frames)))  # corruption inside the data surfaces here
    err = exc.value
    assert str(path) in str(err) and backend in str(err) and err.reason
    assert err.backend == backend and err.source == str(path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["empty", "random", "text", "png"])
def test_bad_bytes_raise(backend, kind, bad_files):
    data = b"" if kind == "empty" else bad_files[kind].read_bytes()
    with pytest.raises(VideoDecodeError, match="bytes in memory"):
        open_video(data, backend)


def test_error_reasons_are_specific(bad_files):
    def reason(kind):
        with pytest.raises(VideoDecodeError) as exc:
            open_video(bad_files[kind], "pyav")
        return exc.value.reason

    assert "not found" in reason("missing")
    assert "empty" in reason("empty")
    assert "still image" in reason("png")
    assert "no video stream" in reason("audio_only")
    assert "not a regular file" in reason("directory")
    err = VideoDecodeError("a.mp4", "pyav", "boom")
    assert pickle.loads(pickle.dumps(err)).reason == "boom"


@pytest.fixture(scope="session")
def truncated_prefix(video_dir, faststart_video):
    """A faststart MP4 cut at 60 %: its index survives, the data of the later frames is gone."""
    data = faststart_video.path.read_bytes()
    path = video_dir / "truncated_faststart.mp4"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_yields_decodable_prefix(backend, truncated_prefix, faststart_video):
    with open_video(truncated_prefix, backend) as r:
        m = r.metadata
        assert 1 <= m.num_frames < faststart_video.num_frames
        n = m.num_frames
        np.testing.assert_allclose(r.frame_timestamps().numpy(), faststart_video.pts[:n], atol=1e-6)
        assert m.duration == pytest.approx(n / faststart_video.fps)
        assert_frames_match(r.get_frames(list(range(n))), list(range(n)))
        with pytest.raises(FrameIndexError):
            r.get_frames([n])
    counts = {b: open_video(truncated_prefix, b).metadata.num_frames for b in BACKENDS}
    assert len(set(counts.values())) == 1, counts


# --------------------------------------------------------------------------- selection and devices


def test_registry_and_auto(cfr_video):
    assert set(BACKENDS) <= set(READERS.names())
    assert AUTO_ORDER[0] == "torchcodec" and resolve_backend("auto") == "torchcodec"
    assert type(open_video(cfr_video.path)).backend == "torchcodec"
    with pytest.raises(KeyError, match="registered"):
        open_video(cfr_video.path, "nope")


@pytest.mark.parametrize("backend", ["torchcodec", "decord"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: covered by test_cuda_decode")
def test_cuda_request_falls_back_to_cpu_with_warning(backend, cfr_video):
    with pytest.warns(UserWarning, match="no GPU"):
        r = open_video(cfr_video.path, backend, device="cuda")
    frames = r.get_frames([0, 5])
    assert frames.device.type == "cpu"
    assert_frames_match(frames, [0, 5])


@pytest.mark.gpu
def test_cuda_decode(cfr_video, bframes_video):  # the gpu marker skips it without CUDA (conftest.py)
    for v in (cfr_video, bframes_video):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = open_video(v.path, "torchcodec", device="cuda")
        idx = list(range(v.num_frames))
        frames = r.get_frames(idx)
        assert frames.device.type == "cuda"
        # NVDEC uses its own YUV->RGB kernel: exact index, interior within the same tolerance
        assert_frames_match(frames, idx)
        resized = open_video(v.path, "torchcodec", device="cuda", resize_short_side=24).get_frames([0, 7])
        assert resized.shape == (2, 3, 24, 32) and [read_index(f) for f in hwc(resized)] == [0, 7]


# --------------------------------------------------------------------------- decompression bombs (pixel limit)


def write_large_frames(path, width: int, height: int, frames: int = 1):
    """A tiny H.264 file with huge flat frames (a few KB on disk, ``width x height`` to decode)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(np.full((height * 3 // 2, width), 128, np.uint8), format="yuv420p")
        for i in range(frames):
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="session")
def large_frames_video(video_dir):
    """4112 x 4112 (16.9 Mpx), just over the default limit of 4096 x 4096."""
    return write_large_frames(video_dir / "large.mp4", 4112, 4112)


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_pixel_limit_refuses_before_decoding(backend, cfr_video):
    with pytest.raises(VideoDecodeError) as exc:
        open_video(cfr_video.path, backend, max_pixels=64 * 48 - 1)
    err = exc.value
    assert err.source == str(cfr_video.path) and "64x48" in err.reason and "max_pixels=3071" in err.reason
    for limit in (64 * 48, None):  # at the limit, and no limit
        with open_video(cfr_video.path, backend, max_pixels=limit) as r:
            assert r.get_frames([0]).shape == (1, 3, 48, 64)


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_default_pixel_limit_refuses_a_large_stream(backend, large_frames_video):
    assert DEFAULT_MAX_PIXELS == 4096 * 4096 < 4112 * 4112
    with pytest.raises(VideoDecodeError, match=r"4112x4112 \(16.9 Mpx\) exceeds the pixel limit") as exc:
        open_video(large_frames_video, backend)
    assert exc.value.source == str(large_frames_video)
    if backend == "pyav":  # opting out opens it (metadata only: decoding 17 Mpx frames is not needed here)
        with open_video(large_frames_video, backend, max_pixels=None) as r:
            assert (r.metadata.width, r.metadata.height) == (4112, 4112)


RSS_PROBE = """
import json, sys
import av, decord, torch, torchcodec.decoders  # noqa: F401  (libraries loaded before measuring)
from vidlang.data.decoding import VideoDecodeError, open_video


def kb(field):  # from /proc/self/status: VmRSS (now) or VmHWM (peak since the last reset)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


out = {}
for backend in ("pyav", "torchcodec", "decord", "auto"):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = kb("VmRSS")
    try:
        open_video(sys.argv[1], backend, **json.loads(sys.argv[2])).close()
        out[backend] = "opened"
    except VideoDecodeError as e:
        out[backend] = e.reason
    out[backend + "_mb"] = (kb("VmHWM") - before) / 1024
print(json.dumps(out))
"""


@pytest.mark.slow
def test_bomb_costs_no_memory_to_refuse(tmp_path):
    """8192 x 8192 H.264 (400 KB): refused from metadata; peak RSS grows < 100 MB (before the limit: 160-180 MB
    to open on 2 cores, more with more FFmpeg threads; 0.4-1.3 GB to decode one frame)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    bomb = write_large_frames(tmp_path / "bomb.mp4", 8192, 8192, frames=2)
    assert bomb.stat().st_size < 1_000_000
    root = Path(__file__).resolve().parents[1]

    def peak_rss(**kwargs) -> dict:
        cmd = [sys.executable, "-c", RSS_PROBE, str(bomb), json.dumps(kwargs)]
        env = {**os.environ, "PYTHONPATH": str(root)}
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    out = peak_rss()
    for backend in ("pyav", "torchcodec", "decord", "auto"):
        assert "exceeds the pixel limit" in out[backend], out
        assert out[backend + "_mb"] < 100, out
    unlimited = peak_rss(max_pixels=None)  # the measurement can tell: opening it costs more
    assert unlimited["pyav"] == "opened" and unlimited["pyav_mb"] > 2 * out["pyav_mb"] + 50, (unlimited, out)


def test_max_pixels_is_plumbed_through_the_data_pipeline(cfr_video):
    from vidlang.data.config import DecodeConfig
    from vidlang.data.datamodule import VideoDataModule
    from vidlang.data.datasets import VideoTextDataset
    from vidlang.data.sample import VideoEntry
    from vidlang.data.sampling import build_sampler

    entries = [VideoEntry(str(cfr_video.path), "a", ["a caption"])]
    sampler = build_sampler("segment", num_frames=4)
    with pytest.raises(VideoDecodeError, match="exceeds the pixel limit"):
        VideoTextDataset(entries, sampler, max_pixels=64 * 48 - 1).load(0)
    assert VideoTextDataset(entries, sampler, max_pixels=None).load(0).video.shape == (1, 4, 3, 48, 64)
    dm = VideoDataModule(train={"format": "manifest", "path": "unused.csv"}, decode=DecodeConfig(max_pixels=1000))
    assert dm._common(training=True)["max_pixels"] == 1000
    assert VideoDataModule(train={"format": "manifest", "path": "unused.csv"})._common(False)["max_pixels"] == (
        DEFAULT_MAX_PIXELS
    )


# --------------------------------------------------------------------------- the scan's cheap path


def test_scan_reads_only_the_video_stream_of_a_complete_mp4(audio_video, truncated_prefix, faststart_video):
    """An MP4 whose sample tables lie inside the file is complete: only its video packets are demuxed (the audio
    stream is discarded), and the facts are those of a full scan; a cut one is scanned in full."""
    import av

    from vidlang.data.decoding.scan import index_complete, scan_video

    for path, complete in ((audio_video.path, True), (faststart_video.path, True), (truncated_prefix, False)):
        with av.open(str(path)) as c:
            assert index_complete(c, str(path)) is complete, path
    index = scan_video(str(audio_video.path), "a", "pyav", keep_open=True)
    try:
        assert not index.truncated and index.num_frames == audio_video.num_frames and index.has_audio
        audio = index.container.streams.audio[0]
        assert audio.discard == av.stream.Discard.all  # the audio packets were never read
    finally:
        index.close()
    assert index.container is None
    cut = scan_video(str(truncated_prefix), "t", "pyav")
    assert cut.truncated and cut.data_end is not None and cut.num_frames < faststart_video.num_frames


def test_rotation_is_left_to_a_backend_that_reads_it(decode_matrix_rot90):
    """torchcodec reads the display matrix itself: the scan decodes no frame for it and leaves ``None``."""
    from vidlang.data.decoding.scan import read_rotation, scan_video

    path = str(decode_matrix_rot90)
    assert scan_video(path, "r", "torchcodec", rotation=False).rotation is None
    assert scan_video(path, "r", "pyav").rotation == 90 == read_rotation(path, "r", "pyav", None)
    with open_video(path, "torchcodec", resize_short_side=24) as r:
        assert r.metadata.rotation == 90 and (r.metadata.width, r.metadata.height) == (48, 64)
        assert r.get_frames([3]).shape == (1, 3, 32, 24)  # portrait once rotated


@pytest.fixture(scope="session")
def decode_matrix_rot90(video_dir, cfr_video):
    """``cfr_video`` remuxed with a 90 degree display rotation (the ``rotate`` tag, as tests/decode_matrix.py)."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.fail("the ffmpeg CLI is not installed; the tests need it (tools/setup.sh installs Debian's ffmpeg)")
    out = video_dir / "rot90_cfr.mp4"
    if not out.exists():
        cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(cfr_video.path), "-c", "copy", "-metadata:s:v:0", "rotate=90",
               str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def test_pyav_decodes_in_the_scans_container(cfr_video, monkeypatch):
    """One ``av.open`` per video for PyAV: the reader seeks and decodes in the container the scan read."""
    import av

    opened = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    with open_video(cfr_video.path, "pyav") as r:
        assert_frames_match(r.get_frames([5, 0, 23]), [5, 0, 23])
    assert len(opened) == 1
