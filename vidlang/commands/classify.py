"""``vidlang classify --ckpt CKPT VIDEO... [--labels "a,b,c"]``: zero-shot (or fine-tuned) video classification.

With ``--labels`` the checkpoint's text tower classifies the videos among those names (zero-shot); without,
the checkpoint's training class names are used (and its linear head, if it has one). A retrieval checkpoint
works zero-shot and needs ``--labels``. Each video goes through the one inference path
(:class:`vidlang.serve.inference.InferenceBundle`, as ``search`` and ``serve``): decoded at the model's image
size, the model's evaluation frame count (``ModelConfig.inference_frames``, or ``--frames``) taken with the
segment sampler (segment middles), centre-cropped and normalised; the top-k classes are printed with their
probabilities. A video that cannot be read gets a one-line error and the others continue; the exit status is
then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vidlang.commands import COMMANDS
from vidlang.errors import CheckpointError, ConfigError


def parse_labels(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; empty names and duplicates are errors."""
    names = [s.strip() for s in text.split(",")]
    if any(not n for n in names):
        raise ValueError(f"--labels has an empty class name: {text!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--labels repeats {dup}")
    return names


def classify_files(bundle: Any, paths: list[str], names: list[str], topk: int) -> list[dict]:
    """One dict per path: ``{"file", "ok": True, "top": [(name, prob), ...]}`` or ``{"file", "ok": False,
    "error"}`` (``bundle``: :func:`vidlang.serve.inference.load_classifier`)."""
    import torch

    from vidlang.data.decoding import VideoDecodeError

    with torch.inference_mode():
        text = bundle.classifier.class_embeddings(names)  # [K, E], computed once
    results = []
    for path in paths:
        try:
            clip = bundle.decode_clip(path)  # uint8 [T, 3, S, S]
        except (VideoDecodeError, ValueError, OSError) as e:
            results.append({"file": path, "ok": False, "error": getattr(e, "reason", None) or str(e)})
            continue
        probs = bundle.classify_clips(clip[None], names, text)[0]  # [K]
        p, idx = probs.topk(min(topk, len(names)))
        top = [(names[i], float(v)) for v, i in zip(p, idx.tolist(), strict=True)]
        results.append({"file": path, "ok": True, "top": top})
    return results


def format_result(r: dict) -> str:
    if not r["ok"]:
        return f"{r['file']}: ERROR {r['error']}"
    width = max(len(n) for n, _ in r["top"])
    lines = [f"{r['file']}:"] + [f"  {k + 1}. {n:<{width}}  {p:.4f}" for k, (n, p) in enumerate(r["top"])]
    return "\n".join(lines)


@COMMANDS.register("classify")
class ClassifyCommand:
    help = "classify video files with a recognition checkpoint (zero-shot with --labels), printing top-k"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video files")
        parser.add_argument("--ckpt", required=True,
                            help="RecognitionTask checkpoint (.ckpt), or a RetrievalTask one with --labels")
        parser.add_argument("--labels", help='comma-separated class names, e.g. "dancing,running" (zero-shot); '
                            "default: the checkpoint's training classes")
        parser.add_argument("--topk", type=int, default=5, help="classes to print per video (default 5)")
        parser.add_argument("--frames", type=int, default=None,
                            help="frames per clip (default: the model's evaluation count)")
        parser.add_argument("--templates", action="append", default=None,
                            help="prompt template with {} (repeatable; default: the checkpoint's)")
        parser.add_argument("--backend", default="auto", choices=["auto", "torchcodec", "decord", "pyav"])
        parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
        parser.add_argument("--json", action="store_true", help="one JSON object per video (JSON lines)")

    def run(self, args: argparse.Namespace) -> int:
        if args.topk < 1 or (args.frames is not None and args.frames < 1):
            raise ConfigError(f"--topk and --frames must be >= 1, got --topk {args.topk} --frames {args.frames}")
        bundle, names = _load(args)
        results = classify_files(bundle, args.videos, names, args.topk)
        for r in results:
            out = sys.stdout if r["ok"] or args.json else sys.stderr
            print(json.dumps(r) if args.json else format_result(r), file=out, flush=True)
        failed = sum(not r["ok"] for r in results)
        if failed:
            print(f"{failed} of {len(results)} videos could not be classified", file=sys.stderr)
        return 1 if failed else 0


def _load(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The bundle with its classifier (:func:`vidlang.serve.inference.load_classifier`) and the class names to
    choose from."""
    from vidlang.serve.inference import load_classifier

    labels = None
    if args.labels is not None:
        try:
            labels = parse_labels(args.labels)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    bundle = load_classifier(args.ckpt, device=args.device, labels=labels is not None, backend=args.backend,
                             num_frames=args.frames)
    task = bundle.classifier
    if args.templates:
        bad = [t for t in args.templates if t.count("{}") != 1]
        if bad:
            raise ConfigError(f"each --templates needs exactly one {{}}: {bad}")
        task.templates = list(args.templates)
    if labels is not None:
        return bundle, labels
    names = task.class_names_by_split.get("train") or task.hparams.get("class_names")
    if not names:
        raise CheckpointError(f"{args.ckpt}: the checkpoint has no class names; pass --labels")
    return bundle, list(names)
