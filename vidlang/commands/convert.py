"""``vidlang convert SRC --out DIR``: write any supported CLIP checkpoint in vidlang's format."""

from __future__ import annotations

import argparse

from vidlang.commands import COMMANDS


@COMMANDS.register("convert")
class ConvertCommand:
    help = "convert an HF / OpenAI / open_clip CLIP checkpoint (local file or directory) to vidlang's format"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("src", help="checkpoint file (.pt/.bin/.safetensors, TorchScript) or directory")
        parser.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
        parser.add_argument("--image-size", type=int, default=None, help="resample position embeddings to this size")
        parser.add_argument(
            "--act",
            choices=("quick_gelu", "gelu"),
            default=None,
            help="activation of the towers (a bare weights file cannot record it; default quick_gelu, as OpenAI)",
        )
        parser.add_argument(
            "--dtype", choices=("float32", "float16", "bfloat16", "keep"), default="float32", help="stored precision"
        )

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from vidlang.models.clip.pretrained import load_pretrained, save_vidlang

        dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
        sd, info = load_pretrained(args.src, dtype=dtype, act=args.act, image_size=args.image_size)
        out = save_vidlang(sd, info, args.out)
        n_params = sum(v.numel() for v in sd.values())
        towers = ", ".join(t for t in ("vision", "text") if info.get(t) is not None)
        print(f"converted {info['format']} checkpoint {args.src} ({n_params:,} values; towers: {towers}) -> {out}")
        if info.get("vision") is not None:
            v = info["vision"]
            print(
                f"  vision: width {v['width']}, layers {v['layers']}, heads {v['heads']}, "
                f"patch {v['patch_size']}, image {v['image_size']}, embed {v['embed_dim']}, act {v['act']}"
            )
        if info.get("text") is not None:
            t = info["text"]
            print(
                f"  text: width {t['width']}, layers {t['layers']}, heads {t['heads']}, "
                f"context {t['context_length']}, vocab {t['vocab_size']}, embed {t['embed_dim']}"
            )
        print(f"  activation: {info['vision' if info.get('vision') else 'text']['act']} ({info['act_source']})")
        print(f"  tokenizer files: {'copied' if info.get('tokenizer_dir') else 'none in source'}")
        return 0
