"""``vidlang bench model``: vidlang's ViT image tower against ``transformers`` CLIP, and block costs.

1. Image forward, random weights, fp32, same threads: vidlang's :class:`ClipImageTower` (fused qkv,
   SDPA) vs ``transformers.CLIPVisionModelWithProjection`` (SDPA attention) holding the *same*
   weights (copied with :func:`vidlang.models.clip.convert.from_vidlang`); their outputs are
   compared, then both run alternately, ``--iters`` times each after a warm-up; medians are
   reported with the ratio HF time / vidlang time (> 1 means vidlang is faster).
2. Forward + backward of ``encode_video`` for every registered temporal block (its default
   freezing policy) relative to ``mean`` on the ``--block-arch`` tower.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from vidlang.bench import BENCHMARKS


def _median_time(fn: Callable[[], object], iters: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hf_tower(tower, device):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from vidlang.models.clip.convert import from_vidlang

    c = tower.cfg
    hf_cfg = CLIPVisionConfig(
        hidden_size=c.width, intermediate_size=c.mlp_hidden, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, image_size=c.image_size, patch_size=c.patch_size,
        projection_dim=c.embed_dim, hidden_act=c.act, layer_norm_eps=1e-5,
    )
    hf_cfg._attn_implementation = "sdpa"
    hf = CLIPVisionModelWithProjection(hf_cfg)
    sd = from_vidlang({f"image_tower.{k}": v for k, v in tower.state_dict().items()}, "hf")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy to transformers failed: missing {missing}, unexpected {unexpected}")
    return hf.to(device).eval()


def bench_towers(args: argparse.Namespace, device, sync) -> None:
    import torch

    from vidlang.models.clip.configs import image_config
    from vidlang.models.clip.image import ClipImageTower

    torch.manual_seed(0)
    tower = ClipImageTower(image_config(args.arch)).to(device).eval()
    hf = _hf_tower(tower, device)
    size = tower.cfg.image_size
    video = torch.randn(args.batch, args.frames, 3, size, size, device=device)
    with torch.inference_mode():
        ours = tower(video).frame_embeds.flatten(0, 1)
        theirs = hf(pixel_values=video.flatten(0, 1)).image_embeds
        diff = (ours - theirs).abs().max().item()
        run_v = lambda: tower(video)  # noqa: E731
        run_h = lambda: hf(pixel_values=video.flatten(0, 1))  # noqa: E731
        for _ in range(args.warmup):
            run_v(), run_h()
        tv, th = [], []
        for _ in range(args.iters):  # alternate so both see the same machine load
            tv.append(_median_time(run_v, 1, sync))
            th.append(_median_time(run_h, 1, sync))
    v, h = statistics.median(tv), statistics.median(th)
    print(f"image tower {args.arch}, {args.batch}x{args.frames} frames {size}px, fp32, {device}, "
          f"threads {torch.get_num_threads()}, {args.iters} iters (median)")
    print(f"  max |embed diff| vidlang vs transformers: {diff:.2e}")
    print(f"  vidlang       {v * 1e3:9.1f} ms  ({args.batch * args.frames / v:7.1f} frames/s)")
    print(f"  transformers  {h * 1e3:9.1f} ms  ({args.batch * args.frames / h:7.1f} frames/s)")
    print(f"  speed ratio transformers/vidlang = {h / v:.3f}  (>= 1: vidlang at least as fast)")


def _block_step(model, video) -> Callable[[], None]:
    import torch

    def step() -> None:
        out = model.encode_video(video)
        loss = out.embeds.square().mean() + sum(out.aux_losses.values(), torch.zeros((), device=video.device))
        if out.tokens is not None:
            loss = loss + out.tokens.square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def bench_blocks(args: argparse.Namespace, device, sync) -> None:
    import torch

    from vidlang.models.factory import ModelConfig, build_model
    from vidlang.models.temporal import BLOCKS

    names = ["mean"] + [n for n in BLOCKS.names() if n != "mean"]
    results: dict[str, float] = {}
    print(f"blocks: forward+backward of encode_video on {args.block_arch}, "
          f"{args.block_batch}x{args.frames} frames, default freezing, {args.block_iters} iters (median)")
    for name in names:
        torch.manual_seed(0)
        model = build_model(ModelConfig(image=args.block_arch, block=name)).to(device).train()
        size = model.image_tower.cfg.image_size
        video = torch.randn(args.block_batch, args.frames, 3, size, size, device=device)

        step = _block_step(model, video)
        step()  # warm-up
        results[name] = _median_time(step, args.block_iters, sync)
        print(f"  {name:16s} {results[name] * 1e3:9.1f} ms  x{results[name] / results['mean']:.2f} of mean  "
              f"({model.freeze_policy})", flush=True)
        del model


@BENCHMARKS.register("model")
class ModelBench:
    help = "ViT image tower vs transformers CLIPVisionModel (same weights), and block fwd+bwd cost vs mean"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--arch", default="vit_b32", help="image preset for the tower comparison")
        parser.add_argument("--batch", type=int, default=4)
        parser.add_argument("--frames", type=int, default=8)
        parser.add_argument("--iters", type=int, default=5)
        parser.add_argument("--warmup", type=int, default=2)
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--block-arch", default="vit_b32", help="tower for the block timings")
        parser.add_argument("--block-batch", type=int, default=2)
        parser.add_argument("--block-iters", type=int, default=2)
        parser.add_argument("--skip-blocks", action="store_true")
        parser.add_argument("--skip-towers", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if not args.skip_towers:
            bench_towers(args, device, sync)
        if not args.skip_blocks:
            bench_blocks(args, device, sync)
        return 0
