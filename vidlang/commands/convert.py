"""``vidlang convert SRC --out DIR``: write any supported CLIP checkpoint in vidlang's format."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from vidlang.commands import COMMANDS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _print_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: object = None,
) -> None:
    """Warnings as one loud line each on stderr (the activation guess must not go unseen)."""
    print(f"vidlang convert: WARNING: {' '.join(str(message).split())}", file=sys.stderr)


@COMMANDS.register("convert")
class ConvertCommand:
    help = "convert an HF / OpenAI / open_clip CLIP checkpoint (local file or directory) to vidlang's format"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("src", help="checkpoint file (.pt/.bin/.safetensors, TorchScript) or directory")
        parser.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
        parser.add_argument("--image-size", type=int, default=None, help="resample position embeddings to this size")
        parser.add_argument(
            "--heads",
            type=_positive_int,
            default=None,
            help="attention heads of the image tower (width / head width); needed when a bare weights file's "
            "shapes match no known architecture",
        )
        parser.add_argument(
            "--text-heads", type=_positive_int, default=None, help="attention heads of the text tower (as --heads)"
        )
        parser.add_argument(
            "--act",
            choices=("quick_gelu", "gelu"),
            default=None,
            help="activation of the towers: quick_gelu for OpenAI's weights, gelu for most open_clip trainings. "
            "A bare weights file cannot record it: without --act vidlang guesses and warns",
        )
        parser.add_argument(
            "--from",
            dest="method",
            default=None,
            metavar="METHOD",
            help="the file is a method's released checkpoint in its authors' layout: clip4clip, vifi_clip, "
            "prompt_switch, m2clip, xclip, ila, mugstan, videollama, or auto (detected from the keys); towers and "
            "the temporal block are converted",
        )
        parser.add_argument(
            "--base",
            default=None,
            help="with --from: a CLIP checkpoint for tensors the official file lacks (ViFi-CLIP stores no token "
            "embedding, M2-CLIP only its adapters, Video-LLaMA only its video Q-former: give the CLIP its "
            "training started from)",
        )
        parser.add_argument(
            "--dtype", choices=("float32", "float16", "bfloat16", "keep"), default="float32", help="stored precision"
        )

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.errors import VidlangUserError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = _print_warning  # restored on leaving the block
                return self._convert(args)
        except (VidlangUserError, ValueError, FileNotFoundError) as e:
            if os.environ.get("VIDLANG_DEBUG", "") not in ("", "0"):
                raise
            print(f"vidlang convert: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2

    def _convert(self, args: argparse.Namespace) -> int:
        import torch

        from vidlang.models.clip.pretrained import load_pretrained, save_vidlang

        dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
        if args.method is not None:
            return self._convert_official(args, dtype)
        if args.base is not None:
            raise ValueError("--base is only used with --from METHOD")
        sd, info = load_pretrained(
            args.src, dtype=dtype, act=args.act, image_size=args.image_size, heads=args.heads,
            text_heads=args.text_heads,
        )  # fmt: skip
        out = save_vidlang(sd, info, args.out)
        n_params = sum(v.numel() for v in sd.values())
        # the info keeps the converted format's tower keys: "vision" is the image tower
        towers = ", ".join(name for key, name in (("vision", "image"), ("text", "text")) if info.get(key) is not None)
        heads_from = info.get("heads_source", {})
        print(f"converted {info['format']} checkpoint {args.src} ({n_params:,} values; towers: {towers}) -> {out}")
        if info.get("vision") is not None:
            v = info["vision"]
            print(
                f"  image: width {v['width']}, layers {v['layers']}, heads {v['heads']} ({heads_from.get('vision')}), "
                f"patch {v['patch_size']}, image {v['image_size']}, embed {v['embed_dim']}, act {v['act']}"
            )
        if info.get("text") is not None:
            t = info["text"]
            print(
                f"  text: width {t['width']}, layers {t['layers']}, heads {t['heads']} ({heads_from.get('text')}), "
                f"context {t['context_length']}, vocab {t['vocab_size']}, embed {t['embed_dim']}"
            )
        print(f"  activation: {info['vision' if info.get('vision') else 'text']['act']} ({info['act_source']})")
        print(f"  tokenizer files: {'copied' if info.get('tokenizer_dir') else 'none in source'}")
        return 0

    def _convert_official(self, args: argparse.Namespace, dtype: object) -> int:
        from vidlang.models.clip.convert import resample_state_dict
        from vidlang.models.clip.pretrained import save_vidlang
        from vidlang.models.official import OFFICIAL_METHODS, load_official

        method = None if args.method == "auto" else args.method
        if method is not None and method not in OFFICIAL_METHODS:
            raise ValueError(f"--from {method}: unknown method; known: auto, {', '.join(OFFICIAL_METHODS.names())}")
        if args.heads is not None or args.text_heads is not None or args.act is not None:
            raise ValueError("--heads / --text-heads / --act do not apply with --from (the method's code fixes them)")
        sd, info = load_official(args.src, method, base=args.base, dtype=dtype)
        if args.image_size is not None:
            sd = resample_state_dict(sd, image_size=args.image_size)
            info["vision"]["image_size"] = args.image_size
        out = save_vidlang(sd, info, args.out)
        off = info["official"]
        n_params = sum(v.numel() for v in sd.values())
        print(f"converted {off['method']} ({off['variant']}) checkpoint {args.src} ({n_params:,} values) -> {out}")
        print(f"  sha256 {off['sha256']}")
        print(f"  block: {off['block']['name']} {off['block']['args']} (set model.block / model.block_args to these)")
        for key, why in off["dropped"].items():
            print(f"  not converted: {key}: {why}")
        if off["from_base"]:
            print(f"  from --base {off['from_base']['source']}: {', '.join(off['from_base']['keys'])}")
        return 0
