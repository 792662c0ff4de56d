"""Every backend against the ffmpeg CLI on a matrix of real-world-shaped files (see tests/decode_matrix.py).

The contract (docs/decoding.md): for every index a backend claims, it returns the same frame as
``ffmpeg -fflags +discardcorrupt -i FILE -fps_mode passthrough -pix_fmt rgb24`` (no resize, rotation
applied), or it refuses the file at open with a :class:`VideoDecodeError` naming the file, the backend
and the reason; ``auto`` picks a backend that is exact on the file.

Tolerance: exact (0 levels) everywhere except odd-sized 4:2:0 video converted by a backend whose FFmpeg is
not the CLI's (PyAV bundles FFmpeg 8, decord FFmpeg 4.1; torchcodec and the CLI share the system FFmpeg).
There the decoded YUV planes are identical (checked for MPEG-4), but swscale's generic path, which odd
sizes take, upsamples chroma differently across versions: up to 87 levels right at colour edges,
decaying over a few pixels. Pixels at least 4 px from every block edge (bicubic chroma taps reach that
far) must stay within ``INTERIOR_TOL`` (measured: 12) and each frame's mean difference within
``MEAN_TOL`` (measured: 2.33). Frame identity is checked separately and exactly: each decoded frame must
be closer to the CLI frame of its own index than to any other CLI frame, so a shifted frame fails
whatever the tolerance.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.register_assert_rewrite("decode_matrix", "videos")
from decode_matrix import BY_NAME, CASE_NAMES, Case, unrotate  # noqa: E402
from videos import interior_mask, read_index  # noqa: E402

from vidlang.data.decoding import VideoDecodeError, open_video  # noqa: E402

pytest_plugins = ["decode_matrix"]

BACKENDS = ["torchcodec", "pyav", "decord"]
INTERIOR_TOL = 16  # levels, >= 4 px from block edges, odd-sized 4:2:0 only (see module docstring)
MEAN_TOL = 3.0  # mean |difference| over the frame, odd-sized 4:2:0 only

# (backend, case) pairs a backend refuses at open: it cannot return the CLI's frames there (docs/decoding.md)
REFUSED = {
    ("torchcodec", "h264_bf.avi"),
    ("torchcodec", "mpeg4_bf.avi"),
    ("torchcodec", "mpeg4_packed.avi"),
    ("torchcodec", "mpeg4_odd.avi"),
    ("torchcodec", "trunc_video.avi"),
    ("torchcodec", "dup_pts.mkv"),
    ("decord", "rot90.mp4"),
    ("decord", "rot270.mov"),
}


def tolerant(case: Case, backend: str) -> bool:
    return case.odd_subsampled and backend != "torchcodec"


def check_frames(got: torch.Tensor, indices: list[int], ref: np.ndarray, case: Case, backend: str) -> None:
    """``got`` ``[T, C, H, W]`` uint8 shows the CLI's frames ``indices`` (identity exact, pixels per tolerance)."""
    assert got.dtype == torch.uint8 and got.shape[1] == 3, got.shape
    arr = got.permute(0, 2, 3, 1).numpy().astype(np.int16)
    assert arr.shape[1:] == ref.shape[1:], (arr.shape, ref.shape)
    refs = ref.astype(np.int16)
    for frame, i in zip(arr, indices, strict=True):
        dist = np.abs(refs - frame[None]).mean(axis=(1, 2, 3))  # [N]
        assert int(dist.argmin()) == i, f"{case.name}/{backend}: frame {i} looks like CLI frame {dist.argmin()}"
        diff = np.abs(refs[i] - frame)
        if not tolerant(case, backend):
            assert diff.max() == 0, f"{case.name}/{backend}: frame {i} differs by up to {diff.max()} levels"
            continue
        h, w = frame.shape[:2]
        assert diff[interior_mask(h, w, 4)].max() <= INTERIOR_TOL, (case.name, backend, i)
        assert diff.mean() <= MEAN_TOL, (case.name, backend, i, diff.mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_backend_matches_ffmpeg_cli(name, backend, decode_matrix):
    case = BY_NAME[name]
    path, ref = decode_matrix.path(case), decode_matrix.reference(case)
    try:
        reader = open_video(path, backend)
    except VideoDecodeError as e:
        assert (backend, name) in REFUSED, f"unexpected refusal: {e}"
        assert e.source == str(path) and e.backend == backend and e.reason
        return
    assert (backend, name) not in REFUSED, f"{backend} should refuse {name}"
    with reader:
        m = reader.metadata
        assert (m.height, m.width) == ref.shape[1:3]
        assert m.rotation == case.rotate % 360
        n = m.num_frames
        if case.truncated:
            assert 1 <= n <= len(ref)
        else:
            assert n == len(ref)
        check_frames(reader.get_frames(list(range(n))), list(range(n)), ref, case, backend)
        order = list(range(n))
        random.Random(name).shuffle(order)
        for i in order:  # one frame at a time, in random order: every seek path
            check_frames(reader.get_frames([i]), [i], ref, case, backend)
        mixed = [n - 1, 0, n // 2, n // 2, min(1, n - 1), n - 1]
        check_frames(reader.get_frames(mixed), mixed, ref, case, backend)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_auto_picks_an_exact_backend(name, decode_matrix):
    case = BY_NAME[name]
    path, ref = decode_matrix.path(case), decode_matrix.reference(case)
    with open_video(path) as reader:
        assert (reader.backend, name) not in REFUSED
        n = reader.metadata.num_frames
        assert n == len(ref) or (case.truncated and 1 <= n < len(ref))
        check_frames(reader.get_frames(list(range(n))[::-1]), list(range(n))[::-1], ref, case, reader.backend)


ROTATED = [(n, b) for n in ("rot90.mp4", "rot180.mp4", "rot270.mov") for b in BACKENDS if (b, n) not in REFUSED]


@pytest.mark.parametrize(("name", "backend"), ROTATED)
def test_rotation_with_resize(name, backend, decode_matrix):
    """``resize_short_side`` resizes the displayed (rotated) frame: portrait stays portrait, frames in order."""
    case = BY_NAME[name]
    path = decode_matrix.path(case)
    with open_video(path, backend, resize_short_side=24) as reader:
        h, w = (32, 24) if case.rotate in (90, 270) else (24, 32)
        assert (reader.metadata.height, reader.metadata.width) == (h * 2, w * 2)  # the displayed size, unresized
        idx = [0, 9, 3, 15]
        frames = reader.get_frames(idx)
        assert frames.shape == (4, 3, h, w)
        shown = [read_index(unrotate(f.permute(1, 2, 0).numpy(), case.rotate)) for f in frames]
        assert shown == idx


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_audio_track_is_its_complete_prefix(backend, decode_matrix):
    """A file cut inside an audio packet: the audio before the cut decodes (a 440 Hz sine), not an error."""
    path = decode_matrix.path(BY_NAME["trunc_audio.mp4"])
    with open_video(path, backend) as reader:
        audio = reader.get_audio(16000)
    full = 16 / 12 * 16000  # FRAMES / FPS seconds
    assert audio is not None and 0.3 * full < len(audio) < full
    spectrum = np.abs(np.fft.rfft(audio.numpy() * np.hanning(len(audio))))
    assert np.fft.rfftfreq(len(audio), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=10)
