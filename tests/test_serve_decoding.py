"""The serving preprocessing in worker processes (vidlang.serve.decoding): same clips, same errors, a crash
contained to the video that caused it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from vidlang.data.decoding import VideoDecodeError
from vidlang.serve.decoding import ClipDecoder, DecodePool, VideoTooLongError
from vidlang.serve.testing import synthetic_videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = synthetic_videos(tmp_path_factory.mktemp("decode_pool"), 3)
    return sorted(folder.rglob("*.mp4"))


DECODER = ClipDecoder("auto", image_size=24, num_frames=4, audio_rate=8000)  # an audio-visual model's


@pytest.fixture(scope="module")
def pool():
    p = DecodePool(DECODER, processes=1)
    p.start()
    yield p
    p.close()


def test_pool_returns_the_clips_and_audio_of_the_server_process(pool, videos):
    for path in videos:
        want, want_audio = DECODER.decode_video(str(path))
        got, audio = pool.decode_video(path)  # a Path travels as its string
        assert got.dtype == torch.uint8 and got.shape == (4, 3, 24, 24)
        assert torch.equal(got, want)
        assert want_audio is not None and torch.equal(audio, want_audio)
    data = videos[0].read_bytes()
    assert torch.equal(pool.decode_video(bytearray(data), "upload.mp4")[0], DECODER.decode_clip(data))
    assert ClipDecoder("auto", 24, 4).decode_video(str(videos[0]))[1] is None  # no audio_rate: no audio decoded


def test_pool_raises_the_decoders_errors_naming_the_video(pool, videos, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(300))
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        pool.decode_video(str(bad))
    with pytest.raises(VideoTooLongError, match="over the 0.1 s limit"):
        pool.decode_video(str(videos[0]), max_seconds=0.1)
    with pytest.raises(VideoDecodeError, match="pixel limit"):
        pool.decode_video(str(videos[0]), max_pixels=16)


def test_a_dead_worker_fails_its_video_only_and_is_replaced(videos):
    p = DecodePool(ClipDecoder("auto", image_size=24, num_frames=4), processes=1)
    try:
        (pid,) = p.start()
        os.kill(pid, signal.SIGKILL)  # as a decoder crash (segfault) or the OOM killer would
        time.sleep(0.2)
        with pytest.raises(VideoDecodeError, match="decoding process died"):
            p.decode_video(str(videos[0]), "first.mp4")
        clip, _ = p.decode_video(str(videos[1]))  # a fresh worker serves the next video
        assert clip.shape == (4, 3, 24, 24)
    finally:
        p.close()


def test_pool_needs_a_process():
    with pytest.raises(ValueError, match="at least 1 process"):
        DecodePool(ClipDecoder("auto", 24, 4), processes=0)


def test_a_main_module_that_cannot_be_reimported_gets_a_clear_error():
    """Worker processes re-import the program's main module; code read from stdin cannot be: say so, and how."""
    import subprocess
    import sys

    code = ("from vidlang.serve.decoding import ClipDecoder, DecodePool\n"
            "DecodePool(ClipDecoder('auto', 24, 4), 1).start()\n")
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "decoding processes could not start" in out.stderr and "--decode-processes 0" in out.stderr


def test_a_closed_pool_stops_its_workers_and_refuses_instead_of_waiting(videos):
    p = DecodePool(ClipDecoder("auto", image_size=24, num_frames=4), processes=2)
    pids = p.start()
    assert len(set(pids)) == 2 and p.decode_video(str(videos[0]))[0].shape == (4, 3, 24, 24)
    p.close()
    for pid in pids:  # terminated and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(VideoDecodeError, match="stopped"):
        p.decode_video(str(videos[0]))
