"""``vidlang blocks``: list the registered temporal blocks with what each adds to a given architecture."""

from __future__ import annotations

import argparse

from vidlang.commands import COMMANDS


@COMMANDS.register("blocks")
class BlocksCommand:
    help = "list registered temporal blocks: parameters added for an arch, hooks, default freezing, lr, image towers"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--arch", default="vit_b32", help="image preset (default: vit_b32)")
        parser.add_argument("--text", default="auto", help="text preset (default: the one paired with --arch)")
        parser.add_argument("--image-size", type=int, default=None, help="input size (default: the preset's)")

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from vidlang.models.contract import TemporalBlock
        from vidlang.models.factory import ModelConfig, resolve_configs, tower_spec
        from vidlang.models.temporal import BLOCKS, build_block

        vcfg, tcfg = resolve_configs(ModelConfig(image=args.arch, text=args.text, image_size=args.image_size))
        spec = tower_spec(vcfg, tcfg)
        rows = [("block", "params", "hooks", "default freeze", "lr mult", "image towers", "zero-init identity")]
        for name in BLOCKS.names():
            with torch.no_grad():
                block = build_block(name, spec)
            pool = ["pool"] if type(block).pool is not TemporalBlock.pool else []
            hooks = ",".join(sorted(block.implemented_hooks()) + pool)
            freeze = "block_only" if block.freeze_backbone else "full"
            ident = "yes" if block.zero_init_identity else "no"
            mults = ", ".join(f"{p}: {m:g}" if p else f"{m:g}" for p, m in block.lr_mults.items())
            towers = ",".join(sorted(block.supported_towers))
            rows.append((name, f"{block.extra_param_count():,}", hooks, freeze, mults, towers, ident))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        print(f"arch {args.arch}: width {spec.width}, layers {spec.layers}, grid {spec.grid}, embed {spec.embed_dim}")
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
        return 0
