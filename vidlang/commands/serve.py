"""``vidlang serve``: the HTTP API (embed, search, chat, health, metrics) for a trained checkpoint, on uvicorn."""

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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 (0 = any free port), got {value}")
    return value


@COMMANDS.register("serve")
class ServeCommand:
    help = "serve a checkpoint over HTTP: POST /embed, /search, /chat; GET /health, /metrics, /docs"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from vidlang.serve.config import ServeConfig

        parser.add_argument("--ckpt", required=True, help="a RetrievalTask or ChatEncoderTask checkpoint")
        parser.add_argument("--llm", default=None,
                            help="local causal-LM directory: enables /chat (a chat-encoder checkpoint defaults "
                                 "to the directory it was trained with)")
        parser.add_argument("--index", default=None,
                            help="what /search searches: a folder of videos (embedded at start, cached), or a "
                                 "vector index built by 'vidlang index build' (made with this checkpoint)")
        parser.add_argument("--rag-ckpt", default=None,
                            help="a RetrievalTask checkpoint whose video embeddings --index holds: /chat then also "
                                 "answers questions about the indexed videos (\"collection\": true), its text tower "
                                 "embedding the question (and /search queries)")
        parser.add_argument("--index-param", action="append", default=[], metavar="NAME=VALUE",
                            help="a search-time parameter of a vector index (ef_search; nprobe, k_factor), repeatable")
        parser.add_argument("--cache", default=None, help="index cache folder (default ~/.cache/vidlang/index/...)")
        parser.add_argument("--root", default=None,
                            help="allowed root for {\"path\": ...} requests (default: the --index folder of "
                                 "videos; without either, path requests are refused)")
        parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
        parser.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 = any free port)")
        d = ServeConfig()
        parser.add_argument("--max-upload-mb", type=_positive_float, default=d.max_upload_mb,
                            help=f"request body limit (MB, default {d.max_upload_mb:g})")
        parser.add_argument("--timeout-s", type=_positive_float, default=d.timeout_s,
                            help=f"per-request deadline covering upload, parsing, decoding and inference "
                                 f"(default {d.timeout_s:g} s)")
        parser.add_argument("--workers", type=int, default=d.workers,
                            help=f"video decoding threads (default {d.workers})")
        parser.add_argument("--decode-processes", type=int, default=d.decode_processes,
                            help=f"processes the decoding threads hand videos to, so that decoding does not hold "
                                 f"the server's interpreter (default {d.decode_processes}; 0 = decode in the "
                                 "threads; each process takes ~200 MB)")
        parser.add_argument("--max-queue", type=_positive_int, default=d.max_queue,
                            help=f"model jobs waiting or running; more get 503 (default {d.max_queue})")
        parser.add_argument("--batch-window-ms", type=_nonnegative_float, default=d.batch_window_ms,
                            help=f"wait this long to batch concurrent queries / clips (default {d.batch_window_ms:g})")
        parser.add_argument("--max-batch", type=_positive_int, default=d.max_batch,
                            help=f"largest batch (default {d.max_batch}; 1 = no batching)")
        parser.add_argument("--grace-s", type=_nonnegative_float, default=d.grace_s,
                            help=f"on SIGTERM, finish requests in flight within this (default {d.grace_s:g} s)")
        parser.add_argument("--max-connections", type=_positive_int, default=d.max_connections,
                            help=f"open connections; more are refused with 503 (default {d.max_connections})")
        parser.add_argument("--header-timeout-s", type=_positive_float, default=d.header_timeout_s,
                            help=f"request headers must arrive within this (default {d.header_timeout_s:g} s)")
        parser.add_argument("--keepalive-s", type=_positive_float, default=d.keepalive_s,
                            help=f"idle keep-alive connections close after this (default {d.keepalive_s:g} s)")
        parser.add_argument("--max-text-chars", type=_positive_int, default=d.max_text_chars,
                            help=f"longest search query / chat question (default {d.max_text_chars})")
        parser.add_argument("--max-video-s", type=_positive_float, default=d.max_video_s,
                            help=f"longest video accepted (default {d.max_video_s:g} s)")
        parser.add_argument("--torch-threads", type=int, default=0,
                            help="torch intra-op threads (default 0 = auto: the CPUs left over by --workers, at "
                                 "least 1; decode threads and model threads then do not fight over the cores)")
        parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
        parser.add_argument("--backend", default="auto", help="video decoding backend (default auto)")
        parser.add_argument("--quiet", action="store_true", help="no request log")

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from vidlang.threads import threads_beside

        previous = torch.get_num_threads()  # a process-wide setting: restored when the server stops
        torch.set_num_threads(args.torch_threads or threads_beside(args.workers))
        try:
            app = self.build_app(args)
            app.serve_forever()
        finally:
            torch.set_num_threads(previous)
        print("server stopped")
        return 0

    def build_app(self, args: argparse.Namespace) -> Any:
        """Load the checkpoint, index ``--index``, bind the socket: a ready :class:`ServeApp` (not serving yet)."""
        import os

        from vidlang.serve.app import ServeApp, ServeConfig
        from vidlang.serve.inference import attach_llm, load_bundle

        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        if getattr(args, "decode_processes", 0) < 0:
            raise ConfigError(f"--decode-processes must be >= 0 (0 = decode in threads), got {args.decode_processes}")
        if getattr(args, "torch_threads", 0) < 0:
            raise ConfigError(f"--torch-threads must be >= 0 (0 = auto), got {args.torch_threads}")
        from vidlang.index import is_vector_index

        vector = args.index is not None and is_vector_index(args.index)
        root = args.root or (None if vector else args.index)
        if args.index is not None and not os.path.isdir(args.index):
            raise ConfigError(f"--index {args.index}: not a directory")
        if getattr(args, "index_param", None) and not vector:
            raise ConfigError("--index-param needs --index to be a vector index (built by vidlang index build)")
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
        rag_bundle = None
        if getattr(args, "rag_ckpt", None):
            if args.index is None:
                raise ConfigError("--rag-ckpt needs --index (the collection its embeddings were made of)")
            rag_bundle = load_bundle(args.rag_ckpt, device=args.device, backend=args.backend, kinds=("retrieval",),
                                     command="vidlang serve --rag-ckpt")
            if rag_bundle.tokenizer is None:
                raise ConfigError(f"--rag-ckpt {args.rag_ckpt}: the checkpoint has no text tokenizer")
        index = self._index(rag_bundle or bundle, args)
        rag = self._retriever(bundle, rag_bundle, index, args)
        bundle.warmup()
        if rag_bundle is not None:
            rag_bundle.warmup()
        config = ServeConfig(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
                             timeout_s=args.timeout_s, workers=args.workers, log_requests=not args.quiet)
        for name in ("max_queue", "batch_window_ms", "max_batch", "grace_s", "max_connections", "header_timeout_s",
                     "keepalive_s", "max_text_chars", "max_video_s", "decode_processes"):
            value = getattr(args, name, None)  # a Namespace built by hand may leave the newer flags out
            if value is not None:
                setattr(config, name, value)
        try:
            app = ServeApp(bundle, config, index=index, root=root, rag=rag)
        except OSError as err:
            raise VidlangUserError(f"cannot listen on {args.host}:{args.port}: {err}") from err
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host}: the API has no authentication")
        what = "none" if index is None else f"{len(index)} videos ({getattr(index, 'kind_name', 'folder')})"
        print(f"serving {args.ckpt} on {app.url} (chat: {'on' if bundle.chat is not None else 'off'}, "
              f"collection chat: {'on' if rag is not None else 'off'}, "
              f"index: {what}, paths under: {root or 'disabled'})", flush=True)
        return app

    @staticmethod
    def _retriever(bundle, rag_bundle, index, args: argparse.Namespace):
        """The :class:`~vidlang.serve.rag.CollectionRetriever` of /chat's collection questions, or None: the
        --rag-ckpt checkpoint (else a served retrieval checkpoint with --llm) over the index."""
        from vidlang.serve.rag import CollectionRetriever

        if index is None or bundle.chat is None:
            if rag_bundle is not None:
                raise ConfigError("--rag-ckpt needs chat (a ChatEncoderTask checkpoint, or --llm DIR)")
            return None
        text = rag_bundle if rag_bundle is not None else (bundle if bundle.tokenizer is not None else None)
        if text is None:
            return None
        what = f"--rag-ckpt {args.rag_ckpt}" if rag_bundle is not None else f"--ckpt {args.ckpt}"
        return CollectionRetriever(text, index, root=args.root, what=what)

    @staticmethod
    def _index(bundle, args: argparse.Namespace):
        if args.index is None:
            return None
        from vidlang.index import is_vector_index, load_index
        from vidlang.serve.index import VideoIndex, default_cache_dir

        if is_vector_index(args.index):
            from vidlang.commands.index import parse_params

            index = load_index(args.index, bundle, **parse_params(getattr(args, "index_param", []), "--index-param"))
            print(f"index: {args.index}: {index.kind_name}, {len(index)} vectors, {index.search_params}")
            return index
        cache = args.cache or default_cache_dir(args.index)
        index = VideoIndex.build(bundle, args.index, cache, progress=not args.quiet)
        print(f"index: {len(index)} videos ({index.stats.reused} cached, {index.stats.embedded} embedded, "
              f"{len(index.failed)} unreadable)")
        return index
