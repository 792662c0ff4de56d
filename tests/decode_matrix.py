"""A matrix of tiny videos written by the ffmpeg CLI, and the ffmpeg CLI's own decode of each (the reference).

Every frame shows its index as the block pattern of :func:`videos.frame_pattern` plus a smooth texture that
moves from frame to frame (so that colour conversion is exercised away from flat colours and two frames are
never alike). Cases cover containers (mp4, mkv, avi, webm, mov), codecs (H.264 with B-frames and an open
GOP, HEVC, MPEG-4 Part 2 with B-frames, plain and *packed* as DivX/Xvid write them, VP9, MJPEG), variable
frame rate, duplicate timestamps, odd frame sizes, rotation metadata, and files truncated inside a video
or an audio packet.

:class:`Matrix` (the session fixture ``decode_matrix``) writes each file once per test session, on first
use, under pytest's temporary directory, and caches the reference decode: ``ffmpeg -i FILE -fps_mode
passthrough`` to rgb24 PPM frames (no resize; the CLI applies rotation metadata, as it does by default).
The CLI runs with ``-fflags +discardcorrupt``: packets the demuxer flags as damaged (the partial packet
at the cut of a truncated file) are dropped, as the readers drop them; fed to the decoder, such a packet
makes the CLI output damaged frames around the cut or lose a frame (seen with MPEG-4 in AVI and H.264 in
MP4). On intact files the flag changes nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from videos import frame_pattern, read_index

SIZE = (64, 48)  # width, height
ODD = (97, 61)
FRAMES = 16
FPS = 12
X264 = ("-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p")
X264_BF = (*X264, "-x264-params", "bframes=2:b-adapt=0:keyint=8:min-keyint=8:scenecut=0")
X265 = ("-c:v", "libx265", "-pix_fmt", "yuv420p",
        "-x265-params", "bframes=2:keyint=8:min-keyint=8:scenecut=0:log-level=error")
MPEG4_BF = ("-c:v", "mpeg4", "-bf", "2", "-g", "8", "-q:v", "4")
VP9 = ("-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-g", "8", "-b:v", "300k", "-deadline", "good", "-cpu-used", "8")
MJPEG = ("-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p")
# frame i at (100 i + 20 i^2) / 1200 s: irregular gaps, exact in a 1/1200 time base
VFR = ("-vf", "settb=1/1200,setpts=(N*100+N*N*20)/1200/TB", "-fps_mode", "passthrough", "-enc_time_base", "1:1200")


@dataclass(frozen=True)
class Case:
    """One matrix video: ``ffmpeg -f rawvideo -i - [audio] ARGS NAME``, then an optional remux or cut."""

    name: str  # file name; the extension picks the container
    args: tuple[str, ...]
    size: tuple[int, int] = SIZE
    audio: bool = False  # a 440 Hz AAC track
    rotate: int = 0  # remuxed with this display rotation (the ``rotate`` tag: degrees counter-clockwise)
    cut: str | None = None  # "video" / "audio": the file cut in the middle of a packet of that stream
    encoder: str = ""  # an ffmpeg encoder the case needs (a clear failure without it)

    @property
    def truncated(self) -> bool:
        return self.cut is not None

    @property
    def odd_subsampled(self) -> bool:
        """Odd width/height with 4:2:0 chroma: FFmpeg versions convert it to RGB differently (see TOLERANCE)."""
        return self.size[0] % 2 == 1 and "444" not in self.name


def _c(name: str, *args: str, **kw) -> Case:
    return Case(name, tuple(args), **kw)


CASES: list[Case] = [
    _c("h264_bf.mp4", *X264_BF, encoder="libx264"),
    _c("h264_bf.mkv", *X264_BF, encoder="libx264"),
    _c("h264_bf.mov", *X264_BF, encoder="libx264"),
    _c("h264_bf.avi", *X264_BF, encoder="libx264"),  # AVI stores no presentation timestamps
    _c("h264_opengop.mkv", *X264, "-x264-params", "bframes=3:b-adapt=0:keyint=8:min-keyint=8:scenecut=0:open-gop=1",
       encoder="libx264"),
    _c("hevc.mp4", *X265, "-tag:v", "hvc1", encoder="libx265"),
    _c("hevc.mkv", *X265, encoder="libx265"),
    _c("mpeg4_bf.avi", *MPEG4_BF),
    _c("mpeg4_bf.mp4", *MPEG4_BF),
    # libxvid with B-frames in AVI writes the packed bitstream (P+B in one chunk, then a placeholder chunk)
    _c("mpeg4_packed.avi", "-c:v", "libxvid", "-bf", "2", "-g", "8", "-q:v", "4", encoder="libxvid"),
    _c("vp9.webm", *VP9, "-auto-alt-ref", "1", "-lag-in-frames", "8", encoder="libvpx-vp9"),
    _c("mjpeg.avi", *MJPEG),
    _c("mjpeg.mov", *MJPEG),
    _c("vfr.mkv", *VFR, *X264_BF, encoder="libx264"),
    _c("vfr.mp4", *VFR, "-video_track_timescale", "1200", *X264_BF, encoder="libx264"),
    # the encoder's 1/12 s time base rounds 0 and 1/48 s to 0: two frames share a timestamp
    _c("dup_pts.mkv", "-vf", "setpts=(N*N/4)/(12*TB)", "-fps_mode", "passthrough", *X264_BF, encoder="libx264"),
    _c("vp9_odd.webm", *VP9, size=ODD, encoder="libvpx-vp9"),
    _c("h264_444_odd.mkv", *X264_BF[:-3], "yuv444p", *X264_BF[-2:], size=ODD, encoder="libx264"),
    _c("mjpeg_odd.avi", *MJPEG, size=ODD),
    _c("mpeg4_odd.avi", *MPEG4_BF, size=ODD),
    _c("rot90.mp4", *X264_BF, rotate=90, encoder="libx264"),
    _c("rot180.mp4", *X264_BF, rotate=180, encoder="libx264"),
    _c("rot270.mov", *X264_BF, rotate=270, encoder="libx264"),
    _c("trunc_video.mp4", *X264_BF, "-movflags", "faststart", cut="video", encoder="libx264"),
    _c("trunc_video.mkv", *X264_BF, cut="video", encoder="libx264"),
    _c("trunc_video.webm", *VP9, cut="video", encoder="libvpx-vp9"),
    _c("trunc_video.avi", *MPEG4_BF, cut="video"),
    _c("trunc_audio.mp4", *X264_BF, "-c:a", "aac", "-movflags", "faststart", audio=True, cut="audio",
       encoder="libx264"),
]
CASE_NAMES = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}


def pattern(index: int, height: int, width: int) -> np.ndarray:
    """Frame ``index`` ``[H, W, 3]`` uint8: the index blocks plus a smooth texture (+-12 levels) that moves."""
    img = frame_pattern(index, height, width).astype(np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    tex = 12 * np.sin(2 * np.pi * (xx / 23 + yy / 17 + index / 7))
    return np.clip(np.rint(img + tex[..., None]), 0, 255).astype(np.uint8)


def unrotate(frame: np.ndarray, rotate: int) -> np.ndarray:
    """Undo a display rotation of ``rotate`` degrees counter-clockwise on ``[H, W, C]``."""
    return np.rot90(frame, -(rotate // 90))


def parse_ppm_stream(data: bytes) -> np.ndarray:
    """Concatenated binary PPM (P6, maxval 255) images -> ``[N, H, W, 3]`` uint8 (all of one size)."""
    frames, pos = [], 0
    while pos < len(data):
        fields: list[bytes] = []
        while len(fields) < 4:  # magic, width, height, maxval, separated by whitespace
            while data[pos : pos + 1].isspace():
                pos += 1
            end = pos
            while not data[end : end + 1].isspace():
                end += 1
            fields.append(data[pos:end])
            pos = end
        pos += 1  # the single whitespace after maxval
        assert fields[0] == b"P6" and fields[3] == b"255", fields
        w, h = int(fields[1]), int(fields[2])
        frames.append(np.frombuffer(data, np.uint8, w * h * 3, pos).reshape(h, w, 3))
        pos += w * h * 3
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def ffmpeg_decode(path: Path) -> np.ndarray:
    """What ``ffmpeg -fflags +discardcorrupt -i FILE -fps_mode passthrough -pix_fmt rgb24`` decodes ``[N, H, W, 3]``."""
    cmd = ["ffmpeg", "-v", "error", "-fflags", "+discardcorrupt", "-i", str(path), "-fps_mode", "passthrough",
           "-f", "image2pipe", "-c:v", "ppm", "-"]
    out = subprocess.run(cmd, capture_output=True, check=False)
    return parse_ppm_stream(out.stdout)


def _packets(path: Path) -> list[dict]:
    cmd = ["ffprobe", "-v", "error", "-show_entries", "packet=stream_index,pos,size", "-of", "json", str(path)]
    out = subprocess.run(cmd, capture_output=True, check=False, text=True)
    return [p for p in json.loads(out.stdout or "{}").get("packets", []) if p.get("pos") not in (None, "N/A")]


def cut_point(path: Path, stream: str) -> int:
    """A byte offset in the middle of a packet of ``stream`` ("video" = 0, "audio" = 1) past 55 % of that stream."""
    index = 0 if stream == "video" else 1
    pkts = [p for p in _packets(path) if int(p["stream_index"]) == index and int(p["size"]) >= 8]
    p = pkts[int(len(pkts) * 0.55)]
    return int(p["pos"]) + int(p["size"]) // 2


def ffmpeg_encoders() -> set[str]:
    """Names of the encoders this ffmpeg CLI has."""
    out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line[:2] in (" V", " A") and len(line.split()) > 1}


class Matrix:
    """Writes each :data:`CASES` video on first use and caches its ffmpeg CLI decode."""

    def __init__(self, root: Path, encoders: set[str]) -> None:
        self.root, self.encoders = root, encoders
        self._paths: dict[str, Path] = {}
        self._refs: dict[str, np.ndarray] = {}

    def path(self, case: Case) -> Path:
        if case.name not in self._paths:
            if case.encoder and case.encoder not in self.encoders:
                pytest.fail(f"this ffmpeg has no {case.encoder} encoder, which the decode matrix needs (Debian's "
                            "ffmpeg package, installed by tools/setup.sh, has every encoder it uses)")
            self._paths[case.name] = self._write(case)
        return self._paths[case.name]

    def reference(self, case: Case) -> np.ndarray:
        """The ffmpeg CLI's frames ``[N, H, W, 3]``; checked to show source frames in order from frame 0."""
        if case.name not in self._refs:
            ref = ffmpeg_decode(self.path(case))
            assert len(ref) >= 1, f"the ffmpeg CLI decodes no frame of {case.name}"
            shown = [read_index(unrotate(f, case.rotate)) for f in ref]
            # increasing from 0; an encoder may drop a frame (libxvid with packed B-frames does)
            assert shown[0] == 0 and shown == sorted(set(shown)), (case.name, shown)
            self._refs[case.name] = ref
        return self._refs[case.name]

    def _write(self, case: Case) -> Path:
        w, h = case.size
        final = self.root / case.name
        base = final if not (case.rotate or case.cut) else self.root / f"base_{case.name}"
        raw = b"".join(pattern(i, h, w).tobytes() for i in range(FRAMES))
        audio = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={FRAMES / FPS}"]
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{w}x{h}", "-r", str(FPS), "-i", "-", *(audio if case.audio else []), *case.args, str(base)]
        subprocess.run(cmd, input=raw, check=True, capture_output=True)
        if case.rotate:
            cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(base), "-c", "copy", "-metadata:s:v:0",
                   f"rotate={case.rotate}", str(final)]
            subprocess.run(cmd, check=True, capture_output=True)
        elif case.cut:
            data = base.read_bytes()
            final.write_bytes(data[: cut_point(base, case.cut)])
        return final


@pytest.fixture(scope="session")
def decode_matrix(tmp_path_factory) -> Matrix:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.fail("the ffmpeg CLI is not installed; the tests need it (tools/setup.sh installs Debian's ffmpeg)")
    return Matrix(tmp_path_factory.mktemp("decode_matrix"), ffmpeg_encoders())
