"""``vidlang search``: rank a folder of videos for a text query (embeddings cached on disk)."""

from __future__ import annotations

import argparse

from vidlang.commands import COMMANDS
from vidlang.errors import CheckpointError, ConfigError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@COMMANDS.register("search")
class SearchCommand:
    help = "rank the videos of a folder for a text query with a trained retrieval checkpoint"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("query", nargs="+", help="the text query (several arguments are joined by spaces)")
        parser.add_argument("--ckpt", required=True, help="a RetrievalTask checkpoint (.ckpt)")
        parser.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
        parser.add_argument("--topk", type=_positive, default=5, help="results to print (default 5)")
        parser.add_argument("--cache", default=None,
                            help="embedding cache folder (default ~/.cache/vidlang/index/<hash of the folder>)")
        parser.add_argument("--batch-size", type=_positive, default=8, help="videos per forward pass (default 8)")
        parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
        parser.add_argument("--backend", default="auto", help="video decoding backend (default auto)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from pathlib import Path

        from vidlang.serve.index import VideoIndex, default_cache_dir
        from vidlang.serve.inference import load_bundle

        if not Path(args.videos).is_dir():
            raise ConfigError(f"--videos {args.videos}: not a folder")

        bundle = load_bundle(args.ckpt, device=args.device, backend=args.backend, kinds=("retrieval",),
                             command="vidlang search")
        if bundle.tokenizer is None:
            raise CheckpointError(f"{args.ckpt}: the checkpoint has no text tokenizer; search needs one")
        cache = args.cache or default_cache_dir(args.videos)
        index = VideoIndex.build(bundle, args.videos, cache, batch_size=args.batch_size, progress=not args.quiet)
        s = index.stats
        print(f"indexed {len(index)} videos in {args.videos} ({s.reused} cached, {s.embedded} embedded, "
              f"{s.failed} unreadable, {s.removed} removed; {s.seconds:.1f} s; cache {cache})")
        for path, why in index.failed.items():
            print(f"  unreadable: {path}: {why}")
        if not len(index):
            print("no videos to search")
            return 1
        query = " ".join(args.query)
        results = index.search(bundle.embed_texts([query])[0], args.topk)
        print(f'top {len(results)} for "{query}":')
        for rank, (path, score) in enumerate(results, 1):
            print(f"{rank:3d}  {score:+.4f}  {path}")
        return 0
