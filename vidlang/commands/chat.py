"""``vidlang chat --ckpt CKPT --video FILE "question"``: ask a chat-encoder checkpoint about one video, streaming.

The video goes through the one inference path (:class:`vidlang.serve.inference.InferenceBundle`, as ``serve``):
decoded at the model's image size, its evaluation frame count, centre-cropped, normalised. The answer is printed
piece by piece as the LLM generates it (``--no-stream``: at once), in the checkpoint's prompt style (stage 2:
the LLM tokenizer's chat template). LoRA adapters of a stage-2 checkpoint are merged into the LLM first
(``--no-merge`` keeps them apart); ``--save-adapter DIR`` writes them alone.

``--index IDX --rag-ckpt RETRIEVAL.ckpt [--k 3]`` instead of ``--video``: a question about a collection. The
retrieval checkpoint's text tower embeds the question, the index (built from that checkpoint's embeddings) gives
the top-k clips, and the answer is about all of them (:mod:`vidlang.serve.rag`); the clips used are printed first.
"""

from __future__ import annotations

import argparse
import sys

from vidlang.commands import COMMANDS


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@COMMANDS.register("chat")
class ChatCommand:
    help = "ask a ChatEncoderTask checkpoint a question about a video (the answer streams)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("question", nargs="+", help="the question (several arguments are joined by spaces)")
        parser.add_argument("--ckpt", required=True, help="a ChatEncoderTask checkpoint (.ckpt)")
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--video", help="the video file")
        where.add_argument("--index", help="a question about a collection: a vector index (vidlang index build) or a "
                                           "folder of videos, searched with --rag-ckpt")
        parser.add_argument("--rag-ckpt", default=None, help="with --index: the RetrievalTask checkpoint whose "
                                                             "embeddings the index holds")
        parser.add_argument("--k", type=_positive, default=3, help="with --index: clips the answer sees (default 3)")
        parser.add_argument("--index-param", action="append", default=[], metavar="NAME=VALUE",
                            help="a search-time parameter of the vector index (ef_search; nprobe, k_factor)")
        parser.add_argument("--root", default=None, help="with --index: folder relative clip paths are under")
        parser.add_argument("--llm", default=None, help="local causal-LM directory (default: the one stored in the "
                                                        "checkpoint)")
        parser.add_argument("--max-new-tokens", type=_positive, default=64, help="longest answer (default 64)")
        parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
        parser.add_argument("--backend", default="auto", help="video decoding backend (default auto)")
        parser.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")
        parser.add_argument("--no-merge", action="store_true", help="keep LoRA adapters apart from the LLM weights")
        parser.add_argument("--save-adapter", default=None, metavar="DIR",
                            help="write the checkpoint's LoRA adapters (peft format) to DIR and exit")

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.serve.inference import load_bundle

        retriever = self._retriever(args) if args.index is not None else None
        bundle = load_bundle(args.ckpt, device=args.device, llm=args.llm, backend=args.backend, kinds=("chat",),
                             command="vidlang chat")
        enc = bundle.chat
        if args.save_adapter:
            enc.save_adapter(args.save_adapter)
            print(f"wrote the LoRA adapters of {args.ckpt} to {args.save_adapter}")
            return 0
        if enc.has_lora and not args.no_merge:
            enc.merge_lora()
        question = " ".join(args.question)
        if retriever is not None:
            return self._collection(bundle, retriever, question, args)
        if args.no_stream:
            print(bundle.answer(args.video, question, max_new_tokens=args.max_new_tokens))
            return 0
        for piece in bundle.answer(args.video, question, max_new_tokens=args.max_new_tokens, stream=True):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    @staticmethod
    def _retriever(args: argparse.Namespace):
        """--index + --rag-ckpt -> a :class:`~vidlang.serve.rag.CollectionRetriever` (index checked first)."""
        import os

        from vidlang.errors import ConfigError
        from vidlang.index import is_vector_index, load_index
        from vidlang.serve.inference import load_bundle
        from vidlang.serve.rag import MAX_RAG_K, CollectionRetriever, check_k

        if not args.rag_ckpt:
            raise ConfigError("--index needs --rag-ckpt (the retrieval checkpoint whose embeddings the index holds)")
        if not os.path.isdir(args.index):
            raise ConfigError(f"--index {args.index}: not a directory")
        try:
            check_k(args.k)
        except ValueError:
            raise ConfigError(f"--k must be in 1..{MAX_RAG_K}, got {args.k}") from None
        vector = is_vector_index(args.index)
        if args.index_param and not vector:
            raise ConfigError("--index-param needs --index to be a vector index (built by vidlang index build)")
        index = None
        if vector:  # read (and validated) before the models: a bad index fails fast
            from vidlang.commands.index import parse_params

            index = load_index(args.index, **parse_params(args.index_param, "--index-param"))
        text = load_bundle(args.rag_ckpt, device=args.device, backend=args.backend, kinds=("retrieval",),
                           command="vidlang chat --rag-ckpt")
        if index is None:
            from vidlang.serve.index import VideoIndex, default_cache_dir

            index = VideoIndex.build(text, args.index, default_cache_dir(args.index), progress=False)
        return CollectionRetriever(text, index, root=args.root, what=f"--rag-ckpt {args.rag_ckpt}")

    @staticmethod
    def _collection(bundle, retriever, question: str, args: argparse.Namespace) -> int:
        from vidlang.serve.rag import answer_collection

        out = answer_collection(bundle, retriever, question, args.k, max_new_tokens=args.max_new_tokens,
                                stream=not args.no_stream)
        print(f"clips ({len(out.clips)} of the top {args.k}):")
        for clip in out.clips:
            extra = "" if clip.id == clip.path else f"  [{clip.id}]"
            print(f"{clip.rank:3d}  {clip.score:+.4f}  {clip.path}{extra}")
        for clip, why in out.skipped:
            print(f"  skipped {clip.rank}: {clip.path}: {why}")
        if args.no_stream:
            print(out.answer)
            return 0
        for piece in out.answer:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
