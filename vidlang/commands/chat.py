"""``vidlang chat --ckpt CKPT --video FILE "question"``: ask a chat-encoder checkpoint about one video, streaming.

The video goes through the one inference path (:class:`vidlang.serve.inference.InferenceBundle`, as ``serve``):
decoded at the model's image size, its evaluation frame count, centre-cropped, normalised. The answer is printed
piece by piece as the LLM generates it (``--no-stream``: at once), in the checkpoint's prompt style (stage 2:
the LLM tokenizer's chat template). LoRA adapters of a stage-2 checkpoint are merged into the LLM first
(``--no-merge`` keeps them apart); ``--save-adapter DIR`` writes them alone.
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
        parser.add_argument("--video", required=True, help="the video file")
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
        if args.no_stream:
            print(bundle.answer(args.video, question, max_new_tokens=args.max_new_tokens))
            return 0
        for piece in bundle.answer(args.video, question, max_new_tokens=args.max_new_tokens, stream=True):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
