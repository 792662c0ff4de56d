"""``vidlang synth``: generate the synthetic video-text corpus."""

from __future__ import annotations

import argparse

from vidlang.commands import COMMANDS


def _even_size(text: str) -> int:
    value = int(text)
    if value < 16 or value % 2:
        raise argparse.ArgumentTypeError(f"--size must be an even number >= 16 (yuv420p), got {value}")
    return value


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


@COMMANDS.register("synth")
class SynthCommand:
    help = "generate a synthetic video-text corpus (H.264 + AAC .mp4, captions, labels, manifests)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", required=True, help="output folder (created; a previous corpus is replaced)")
        parser.add_argument("--videos", type=_at_least(1), default=512, help="number of videos (default 512)")
        parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same corpus)")
        parser.add_argument("--size", type=_even_size, default=64, help="frame width = height in pixels (default 64)")
        parser.add_argument("--frames", type=_at_least(1), default=24, help="frames per video (default 24)")
        parser.add_argument("--fps", type=float, default=8.0, help="frame rate (default 8)")
        parser.add_argument("--sample-rate", type=int, default=16000, choices=[16000, 44100], help="audio rate")
        parser.add_argument("--workers", type=_at_least(0), default=2, help="encoding processes (default 2)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
        parser.add_argument("--instruct", action="store_true",
                            help="also write instruction / VideoQA sets (instruct_, qa_, mc_{split}.json: questions "
                                 "about colour, shape and motion; vidlang.data.synthetic.instruct)")

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.data.synthetic import generate_corpus

        info = generate_corpus(
            args.out,
            args.videos,
            args.seed,
            size=args.size,
            frames=args.frames,
            fps=args.fps,
            sample_rate=args.sample_rate,
            workers=args.workers,
            progress=not args.quiet,
        )
        if args.instruct:
            from vidlang.data.synthetic.instruct import write_instruction_sets

            written = write_instruction_sets(args.out)
            print(f"wrote {len(written)} instruction / VideoQA sets: {', '.join(p.name for p in written.values())}")
        splits = ", ".join(f"{k} {v}" for k, v in info.split_counts.items())
        print(
            f"wrote {info.num_videos} videos ({info.size}x{info.size}, {info.frames} frames @ {info.fps:g} fps) "
            f"to {info.out_dir} in {info.seconds:.1f} s ({info.num_videos / info.seconds:.1f} videos/s); "
            f"split: {splits}; {len(info.classes)} classes; manifests: {info.manifest_csv.name}, "
            f"{info.manifest_jsonl.name}, webvid_{{train,val,test}}.csv"
        )
        return 0
