"""``vidlang search``: rank a folder of videos (embeddings cached on disk) or a vector index for a text query."""

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
    help = "rank the videos of a folder, or of a vector index, for a text query with a trained retrieval checkpoint"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("query", nargs="+", help="the text query (several arguments are joined by spaces)")
        parser.add_argument("--ckpt", required=True, help="a RetrievalTask checkpoint (.ckpt)")
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--videos", help="folder of videos (searched recursively)")
        where.add_argument("--index", help="a vector index built by 'vidlang index build' from this checkpoint's "
                                           "embeddings")
        parser.add_argument("--topk", type=_positive, default=5, help="results to print (default 5)")
        parser.add_argument("--index-param", action="append", default=[], metavar="NAME=VALUE",
                            help="a search-time parameter of the vector index (ef_search; nprobe, k_factor)")
        parser.add_argument("--cache", default=None,
                            help="embedding cache folder (default ~/.cache/vidlang/index/<hash of the folder>)")
        parser.add_argument("--batch-size", type=_positive, default=8, help="videos per forward pass (default 8)")
        parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
        parser.add_argument("--backend", default="auto", help="video decoding backend (default auto)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from pathlib import Path

        from vidlang.serve.inference import load_bundle

        if args.videos is not None and not Path(args.videos).is_dir():
            raise ConfigError(f"--videos {args.videos}: not a folder")
        if args.index_param and args.index is None:
            raise ConfigError("--index-param needs --index (a vector index)")
        index = None
        if args.index is not None:  # read (and validated) before the model: a bad index fails fast
            from vidlang.commands.index import parse_params
            from vidlang.index import load_index

            index = load_index(args.index, **parse_params(args.index_param, "--index-param"))
        bundle = load_bundle(args.ckpt, device=args.device, backend=args.backend, kinds=("retrieval",),
                             command="vidlang search")
        if bundle.tokenizer is None:
            raise CheckpointError(f"{args.ckpt}: the checkpoint has no text tokenizer; search needs one")
        query = " ".join(args.query)
        if index is not None:
            index.check_model(bundle, f"--ckpt {args.ckpt}")
            return self._print_hits(query, index.search_hits(bundle.embed_texts([query]), args.topk)[0])
        from vidlang.serve.index import VideoIndex, default_cache_dir

        cache = args.cache or default_cache_dir(args.videos)
        folder = VideoIndex.build(bundle, args.videos, cache, batch_size=args.batch_size, progress=not args.quiet)
        s = folder.stats
        print(f"indexed {len(folder)} videos in {args.videos} ({s.reused} cached, {s.embedded} embedded, "
              f"{s.failed} unreadable, {s.removed} removed; {s.seconds:.1f} s; cache {cache})")
        for path, why in folder.failed.items():
            print(f"  unreadable: {path}: {why}")
        if not len(folder):
            print("no videos to search")
            return 1
        results = folder.search(bundle.embed_texts([query])[0], args.topk)
        print(f'top {len(results)} for "{query}":')
        for rank, (path, score) in enumerate(results, 1):
            print(f"{rank:3d}  {score:+.4f}  {path}")
        return 0

    @staticmethod
    def _print_hits(query: str, hits: list) -> int:
        if not hits:
            print("the index is empty")
            return 1
        print(f'top {len(hits)} for "{query}":')
        for rank, h in enumerate(hits, 1):
            extra = "" if h.id == h.source else f"  [{h.id}]"
            caption = f'  "{h.caption}"' if h.caption else ""
            print(f"{rank:3d}  {h.score:+.4f}  {h.source}{extra}{caption}")
        return 0
