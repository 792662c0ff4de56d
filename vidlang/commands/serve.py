"""``vidlang serve``: the HTTP API (embed, search, chat, health) for a trained checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from vidlang.commands import COMMANDS
from vidlang.errors import ConfigError, VidlangUserError


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 (0 = any free port), got {value}")
    return value


@COMMANDS.register("serve")
class ServeCommand:
    help = "serve a checkpoint over HTTP: POST /embed, /search, /chat; GET /health"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ckpt", required=True, help="a RetrievalTask or ChatEncoderTask checkpoint")
        parser.add_argument("--llm", default=None,
                            help="local causal-LM directory: enables /chat (a chat-encoder checkpoint defaults "
                                 "to the directory it was trained with)")
        parser.add_argument("--index", default=None, help="folder of videos to index for /search")
        parser.add_argument("--cache", default=None, help="index cache folder (default ~/.cache/vidlang/index/...)")
        parser.add_argument("--root", default=None,
                            help="allowed root for {\"path\": ...} requests (default: the --index folder; "
                                 "without either, path requests are refused)")
        parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
        parser.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 = any free port)")
        parser.add_argument("--max-upload-mb", type=_positive_float, default=64.0, help="request body limit (MB)")
        parser.add_argument("--timeout-s", type=_positive_float, default=30.0, help="per-request time limit (s)")
        parser.add_argument("--workers", type=int, default=2, help="inference threads (default 2)")
        parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
        parser.add_argument("--backend", default="auto", help="video decoding backend (default auto)")
        parser.add_argument("--quiet", action="store_true", help="no request log")

    def run(self, args: argparse.Namespace) -> int:
        app = self.build_app(args)
        app.serve_forever()
        print("server stopped")
        return 0

    def build_app(self, args: argparse.Namespace) -> Any:
        """Load the checkpoint, index ``--index``, bind the socket: a ready :class:`ServeApp` (not serving yet)."""
        import os

        from vidlang.serve import ServeApp, ServeConfig
        from vidlang.serve.inference import attach_llm, load_bundle

        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        root = args.root or args.index
        if root is not None and not os.path.isdir(root):
            raise ConfigError(f"--{'root' if args.root else 'index'} {root}: not a directory")
        bundle = load_bundle(args.ckpt, device=args.device, llm=args.llm, backend=args.backend,
                             kinds=("retrieval", "chat"), command="vidlang serve")
        if args.llm and bundle.chat is None:
            try:
                attach_llm(bundle, args.llm)
            except ValueError as err:
                raise ConfigError(f"--llm needs a checkpoint whose temporal block yields query tokens: {err}") from err
            print("warning: the checkpoint is a retrieval model; its projection to the LLM is untrained "
                  "(serve a ChatEncoderTask checkpoint for meaningful answers)")
        index = self._index(bundle, args)
        bundle.warmup()
        config = ServeConfig(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
                             timeout_s=args.timeout_s, workers=args.workers, log_requests=not args.quiet)
        try:
            app = ServeApp(bundle, config, index=index, root=root)
        except OSError as err:
            raise VidlangUserError(f"cannot listen on {args.host}:{args.port}: {err}") from err
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host}: the API has no authentication")
        print(f"serving {args.ckpt} on {app.url} (chat: {'on' if bundle.chat is not None else 'off'}, "
              f"index: {len(index) if index is not None else 'none'} videos, paths under: {root or 'disabled'})",
              flush=True)
        return app

    @staticmethod
    def _index(bundle, args: argparse.Namespace):
        if args.index is None:
            return None
        from vidlang.serve.index import VideoIndex, default_cache_dir

        cache = args.cache or default_cache_dir(args.index)
        index = VideoIndex.build(bundle, args.index, cache, progress=not args.quiet)
        print(f"index: {len(index)} videos ({index.stats.reused} cached, {index.stats.embedded} embedded, "
              f"{len(index.failed)} unreadable)")
        return index
