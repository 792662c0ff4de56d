"""``vidlang probe FILE...``: metadata, a decoded clip's shape and the decode time, per file."""

from __future__ import annotations

import argparse
import json
import sys
import time

from vidlang.commands import COMMANDS

DEFAULT_MAX_PIXELS = 4096 * 4096  # = decoding.DEFAULT_MAX_PIXELS, not imported: the CLI starts without torch


def uniform_indices(num_frames: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``[0, num_frames)`` (segment middles; repeats when too short)."""
    return [min(num_frames - 1, int((k + 0.5) * num_frames / count)) for k in range(count)]


def probe_one(path: str, backend: str, frames: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """Open, read metadata and decode ``frames`` uniformly spread frames; times in seconds."""
    from vidlang.data.decoding import open_video

    start = time.perf_counter()
    with open_video(path, backend, max_pixels=max_pixels) as reader:
        opened = time.perf_counter()
        meta = reader.metadata
        clip = reader.get_frames(uniform_indices(meta.num_frames, frames))
        done = time.perf_counter()
    return {
        "file": path,
        "ok": True,
        "backend": reader.backend,  # for "auto": the backend it picked for this file
        **meta.to_dict(),
        "clip_shape": list(clip.shape),
        "open_s": opened - start,
        "decode_s": done - opened,
    }


def format_line(r: dict) -> str:
    if not r["ok"]:
        return f"{r['file']}: ERROR {r['error']}"
    audio = f"audio {r['audio_sample_rate']} Hz" if r["has_audio"] else "no audio"
    rotated = f" (rotated {r['rotation']} deg)" if r.get("rotation") else ""
    return (
        f"{r['file']}: {r['width']}x{r['height']}{rotated}, {r['num_frames']} frames, {r['duration']:.3f} s, "
        f"{r['fps']:.3f} fps, {audio} | clip {tuple(r['clip_shape'])} uint8 via {r['backend']}: "
        f"open {r['open_s'] * 1e3:.1f} ms, decode {r['decode_s'] * 1e3:.1f} ms"
    )


@COMMANDS.register("probe")
class ProbeCommand:
    help = "show each video's metadata and time decoding a clip of uniformly spread frames"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("files", nargs="+", metavar="FILE", help="video files")
        parser.add_argument("--frames", type=int, default=8, help="frames in the decoded clip (default 8)")
        parser.add_argument(
            "--backend", default="auto", choices=["auto", "torchcodec", "decord", "pyav"], help="decoding backend"
        )
        parser.add_argument("--json", action="store_true", help="one JSON object per file (JSON lines)")
        parser.add_argument(
            "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
            help=f"refuse videos whose frames exceed N pixels before decoding (default {DEFAULT_MAX_PIXELS}; 0: none)",
        )

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.data.decoding import VideoDecodeError, backend_available, resolve_backend

        if args.frames < 1:
            print("--frames must be >= 1", file=sys.stderr)
            return 2
        if args.max_pixels < 0:
            print("--max-pixels must be >= 0 (0: no limit)", file=sys.stderr)
            return 2
        if not backend_available(resolve_backend(args.backend)):  # load the library outside the timings
            print(f"backend {args.backend!r} cannot be imported here", file=sys.stderr)
            return 2
        failures = 0
        for path in args.files:
            try:
                result = probe_one(path, args.backend, args.frames, args.max_pixels or None)
            except VideoDecodeError as e:
                failures += 1
                result = {"file": path, "ok": False, "backend": e.backend, "error": e.reason}
            print(json.dumps(result) if args.json else format_line(result), flush=True)
        if failures and not args.json:
            print(f"{failures} of {len(args.files)} files could not be decoded", file=sys.stderr)
        return 1 if failures else 0
