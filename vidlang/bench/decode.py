"""``vidlang bench decode``: clips/s of every decoding backend, raw library calls and vidlang readers.

Two workloads per video set: *sparse* (8 frames spread uniformly, the training case) and
*full* (every frame). Two video sets: a directory (``--videos DIR``; by default a small
generated set) and a generated 10 s 320x240 H.264 clip. "raw" rows call each library
directly the way its documentation suggests (torchcodec exact seek mode, decord
``get_batch``, PyAV decoding in order); "vidlang" rows go through :func:`open_video`
(container scan included). Every decoder uses one thread; each cell is the best of
``--repeat`` timed runs of at least ``--min-time`` seconds. Ratios are to the fastest raw
backend of the same column.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from vidlang.bench import BENCHMARKS

SPARSE_FRAMES = 8
VIDEO_EXTS = {".mp4", ".mkv", ".webm", ".avi", ".mov"}


def sparse_indices(n: int, k: int = SPARSE_FRAMES) -> list[int]:
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


# --------------------------------------------------------------------------- video generation


def write_h264(path: Path, seconds: float, fps: float, width: int, height: int, seed: int = 0) -> Path:
    """A moving-gradient clip with a bouncing square: libx264 (preset medium, crf 23, B-frames), a key frame
    every 2 s as streaming encoders write them (x264's own default, 250 frames, would make sparse access
    decode almost the whole file)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    colour = rng.integers(0, 256, 3)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1000), options={"crf": "23", "preset": "medium"}
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = max(1, round(2 * fps))
        for t in range(int(seconds * fps)):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = (xx * 255 // width + 3 * t) % 256
            img[..., 1] = (yy * 255 // height + 5 * t) % 256
            img[..., 2] = (xx + yy + 7 * t) % 256
            s = min(width, height) // 4
            x0 = int((width - s) * (0.5 + 0.5 * np.sin(t / 9)))
            y0 = int((height - s) * (0.5 + 0.5 * np.cos(t / 7)))
            img[y0 : y0 + s, x0 : x0 + s] = colour
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def default_set(root: Path, count: int = 12) -> list[Path]:
    """``count`` short clips like the synthetic corpus: 112x112, 2.5 s at 12.8 fps (32 frames)."""
    return [write_h264(root / f"clip{i:03d}.mp4", 2.5, 12.8, 112, 112, seed=i) for i in range(count)]


# --------------------------------------------------------------------------- decoders under test


def raw_torchcodec(path: Path, full: bool) -> int:
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(str(path), num_ffmpeg_threads=1, seek_mode="exact")
    n = len(dec)
    idx = list(range(n)) if full else sparse_indices(n)
    return dec.get_frames_at(idx).data.shape[0]


def raw_decord(path: Path, full: bool) -> int:
    import decord

    vr = decord.VideoReader(str(path), num_threads=1)
    n = len(vr)
    idx = list(range(n)) if full else sparse_indices(n)
    return vr.get_batch(idx).asnumpy().shape[0]


def raw_pyav(path: Path, full: bool) -> int:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        n = stream.frames
        wanted = set(range(n)) if full or n == 0 else set(sparse_indices(n))
        got = 0
        for i, frame in enumerate(c.decode(stream)):
            if i in wanted:
                frame.to_ndarray(format="rgb24")
                got += 1
            if not full and i >= max(wanted):
                break
    return got


def vidlang_reader(backend: str) -> Callable[[Path, bool], int]:
    def run(path: Path, full: bool) -> int:
        from vidlang.data.decoding import open_video

        with open_video(path, backend) as r:
            n = r.metadata.num_frames
            return r.get_frames(list(range(n)) if full else sparse_indices(n)).shape[0]

    return run


METHODS: dict[str, Callable[[Path, bool], int]] = {
    "raw torchcodec": raw_torchcodec,
    "raw pyav": raw_pyav,
    "raw decord": raw_decord,
    "vidlang torchcodec": vidlang_reader("torchcodec"),
    "vidlang pyav": vidlang_reader("pyav"),
    "vidlang decord": vidlang_reader("decord"),
}


def measure(fn: Callable[[Path, bool], int], videos: list[Path], full: bool, repeat: int, min_time: float) -> float:
    """Best clips/s over ``repeat`` runs, each looping over ``videos`` for at least ``min_time`` s."""
    for v in videos[:2]:  # warm-up: library loading, file cache
        fn(v, full)
    best = 0.0
    for _ in range(repeat):
        clips, start = 0, time.perf_counter()
        while True:
            for v in videos:
                if fn(v, full) <= 0:
                    raise RuntimeError(f"{v}: no frames decoded")
                clips += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = max(best, clips / elapsed)
    return best


# --------------------------------------------------------------------------- benchmark


def run_table(sets: dict[str, list[Path]], repeat: int, min_time: float) -> tuple[list[str], dict]:
    from vidlang.progress import progress as tqdm  # a live bar on a terminal, lines in a log

    columns = [f"{name} {mode}" for name in sets for mode in ("sparse", "full")]
    jobs = [(m, c) for m in METHODS for c in columns]
    results: dict[tuple[str, str], float] = {}
    for method, col in tqdm(jobs, desc="bench decode", unit="cell"):
        name, mode = col.rsplit(" ", 1)
        results[method, col] = measure(METHODS[method], sets[name], mode == "full", repeat, min_time)
    return columns, results


def format_table(columns: list[str], results: dict) -> str:
    best_raw = {c: max(v for (m, cc), v in results.items() if cc == c and m.startswith("raw")) for c in columns}
    header = f"{'clips/s (x fastest raw)':<22}" + "".join(f"{c:>26}" for c in columns)
    lines = [header, "-" * len(header)]
    for method in METHODS:
        cells = "".join(f"{results[method, c]:>17.1f} ({results[method, c] / best_raw[c]:>4.2f}x)" for c in columns)
        lines.append(f"{method:<22}{cells}")
    return "\n".join(lines)


@BENCHMARKS.register("decode")
class DecodeBenchmark:
    help = "clips/s of each decoding backend (sparse 8-frame and full decode), raw and through vidlang"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--videos", type=Path, help="directory of videos (default: generate 12 small clips)")
        parser.add_argument("--max-videos", type=int, default=32, help="use at most this many videos from --videos")
        parser.add_argument("--repeat", type=int, default=3, help="timed runs per cell; the best is reported")
        parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timed run")

    def run(self, args: argparse.Namespace) -> int:
        import torch

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix="vidlang-bench-") as tmp:
            root = Path(tmp)
            if args.videos is not None:
                videos = sorted(p for p in args.videos.rglob("*") if p.suffix.lower() in VIDEO_EXTS)
                videos = videos[: args.max_videos]
                if not videos:
                    print(f"{args.videos}: no video files ({', '.join(sorted(VIDEO_EXTS))})")
                    return 2
                set_name = "dir"
            else:
                videos, set_name = default_set(root), "small"
            clip = write_h264(root / "ten_seconds.mp4", 10.0, 30, 320, 240)
            sets = {f"{set_name}({len(videos)})": videos, "10s-320x240": [clip]}
            columns, results = run_table(sets, args.repeat, args.min_time)
        print(format_table(columns, results))
        print(f"sparse = {SPARSE_FRAMES} uniformly spread frames per clip; full = every frame; 1 decoder thread.")
        return 0
