"""``vidlang bench model``: vidlang's ViT image tower against ``transformers`` CLIP, and block costs.

1. **Towers** (``--arch``, default B/32 and B/16), random weights, fp32, same threads: vidlang's
   :class:`ClipImageTower` (fused qkv, SDPA) vs ``transformers.CLIPVisionModelWithProjection`` (SDPA attention)
   holding the *same* weights (copied with :func:`vidlang.models.clip.convert.from_vidlang`). Parity: the max
   |difference| of the fp32 embeddings (target <= 1e-5), and under bf16 autocast the max |difference| of each
   model's L2-normalised embeddings to its own fp32 ones (the bf16 path; tolerance :data:`BF16_TOL`). Speed:
   forward (inference mode) and forward + backward (all weights trainable), the four runners timed
   round-robin (``--iters`` rounds after a warm-up), medians; ratio = transformers time / vidlang time
   (>= 1: vidlang at least as fast).
2. ``--compile``: the first arch's tower with its layers ``torch.compile``d (what ``ModelConfig.compile``
   does) against the same tower eager, forward and forward + backward, round-robin; the compilation time
   is reported apart.
3. **Blocks**: forward + backward of ``encode_video`` for every registered temporal block under its paper
   freezing (default policy) relative to ``mean`` on the ``--block-arch`` tower; each block is timed
   round-robin with a ``mean`` model (same load), ratio = block / mean (target <= 1.5).
4. ``--interactions``: the retrieval similarities over a gallery (``--gallery A,B,T,L``: captions, videos, frames,
   words; embed dim 512 as B/32) from the towers' outputs to the ``[A, B]`` matrix, inference: cosine of the
   pooled embeddings, GLSCL's global interaction alone, GLSCL (concepts of every caption and video + the pairwise
   scores; and the pairwise scores alone, concepts cached), Mug, and CLIP4Clip's tightTransf cross-encoder. FLOPs
   from ``torch.utils.flop_counter`` (matmuls; norms, softmax and fused CPU attention kernels are not counted),
   parameters, median wall time; ``tight`` is run on ``--tight-rows`` captions and scaled to ``A`` (its cost is
   linear in the pairs).

Every table is printed with the load average of the machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from vidlang.bench import BENCHMARKS
from vidlang.bench.common import add_json_argument, interleaved_times, load_average, medians, write_json

FP32_TOL = 1e-5
BF16_TOL = 5e-2  # max |diff| of L2-normalised embeddings, bf16 autocast vs fp32 (bf16 keeps ~3 digits)
BLOCK_TARGET = 1.5


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


def _fwd_bwd(forward: Callable[[], object]) -> Callable[[], None]:
    def step() -> None:
        forward().square().sum().backward()

    return step


def _normalised(x):
    return x / x.norm(dim=-1, keepdim=True)


def tower_parity(tower, hf, video, device) -> dict[str, float]:
    """fp32 max |diff| vidlang vs transformers; bf16-autocast max |diff| of normalised embeddings to fp32 (each)."""
    import torch

    frames = video.flatten(0, 1)
    with torch.inference_mode():
        ours = tower(video).frame_embeds.flatten(0, 1)
        theirs = hf(pixel_values=frames).image_embeds
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ours16 = tower(video).frame_embeds.flatten(0, 1).float()
            theirs16 = hf(pixel_values=frames).image_embeds.float()
    return {
        "fp32": (ours - theirs).abs().max().item(),
        "bf16_vidlang": (_normalised(ours16) - _normalised(ours)).abs().max().item(),
        "bf16_transformers": (_normalised(theirs16) - _normalised(theirs)).abs().max().item(),
    }


def bench_tower(arch: str, args: argparse.Namespace, device, sync) -> dict:
    """Parity and fwd / fwd+bwd times of one preset, vidlang vs transformers (round-robin)."""
    import torch

    from vidlang.models.clip.configs import image_config
    from vidlang.models.clip.image import ClipImageTower

    torch.manual_seed(0)
    tower = ClipImageTower(image_config(arch)).to(device).eval()
    hf = _hf_tower(tower, device)
    size = tower.cfg.image_size
    video = torch.randn(args.batch, args.frames, 3, size, size, device=device)
    parity = tower_parity(tower, hf, video, device)
    run_v = lambda: tower(video).frame_embeds  # noqa: E731
    run_h = lambda: hf(pixel_values=video.flatten(0, 1)).image_embeds  # noqa: E731
    with torch.inference_mode():
        fwd = medians(interleaved_times({"vidlang": run_v, "transformers": run_h}, args.iters, args.warmup, sync))
    bwd = medians(interleaved_times({"vidlang": _fwd_bwd(run_v), "transformers": _fwd_bwd(run_h)}, args.iters,
                                    args.warmup, sync))  # fmt: skip
    return {"arch": arch, "size": size, "parity": parity, "fwd": fwd, "fwd_bwd": bwd}


def print_towers(rows: list[dict], args: argparse.Namespace, device) -> None:
    import torch

    print(f"image towers, {args.batch}x{args.frames} frames, fp32, {device}, threads {torch.get_num_threads()}, "
          f"{args.iters} round-robin rounds (median); {load_average()}")  # fmt: skip
    print(f"  {'arch':<9}{'pass':<9}{'vidlang ms':>11}{'transformers ms':>16}{'ratio':>7}  parity")
    for r in rows:
        p = r["parity"]
        fp32 = f"fp32 |diff| {p['fp32']:.1e} ({'ok' if p['fp32'] <= FP32_TOL else 'FAIL'} <= {FP32_TOL:g})"
        bf16 = (f"bf16 autocast vs fp32 (normalised) vidlang {p['bf16_vidlang']:.1e}, transformers "
                f"{p['bf16_transformers']:.1e} ({'ok' if p['bf16_vidlang'] <= BF16_TOL else 'FAIL'} <= {BF16_TOL:g})")
        for key, label, note in (("fwd", "fwd", fp32), ("fwd_bwd", "fwd+bwd", bf16)):
            v, h = r[key]["vidlang"], r[key]["transformers"]
            print(f"  {r['arch']:<9}{label:<9}{v * 1e3:11.1f}{h * 1e3:16.1f}{h / v:7.2f}  {note}")
    print("  ratio = transformers time / vidlang time (>= 1: vidlang at least as fast)")


def bench_compile(arch: str, args: argparse.Namespace, device, sync) -> dict:
    """Eager tower vs the same tower with ``torch.compile``d layers (round-robin), fwd and fwd+bwd: seconds per
    call (medians), compilation time of the first calls, max |difference| of the embeddings."""
    import copy

    import torch

    from vidlang.models.clip.configs import image_config
    from vidlang.models.clip.image import ClipImageTower

    torch.manual_seed(0)
    eager = ClipImageTower(image_config(arch)).to(device).eval()
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    size = eager.cfg.image_size
    video = torch.randn(args.batch, args.frames, 3, size, size, device=device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        diff = (compiled(video).frame_embeds - eager(video).frame_embeds).abs().max().item()
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    _fwd_bwd(lambda: compiled(video).frame_embeds)()
    compile_bwd = time.perf_counter() - t0
    runners = {"eager": lambda: eager(video).frame_embeds, "compiled": lambda: compiled(video).frame_embeds}
    with torch.inference_mode():
        fwd = medians(interleaved_times(runners, args.iters, args.warmup, sync))
    bwd = medians(interleaved_times({k: _fwd_bwd(v) for k, v in runners.items()}, args.iters, args.warmup, sync))
    print(f"torch.compile of the {arch} tower's layers (ModelConfig.compile), {args.batch}x{args.frames} frames, "
          f"{device}; first calls (compilation) fwd {compile_fwd:.0f} s, fwd+bwd {compile_bwd:.0f} s; "
          f"max |diff| {diff:.1e}; {load_average()}")  # fmt: skip
    for key, label in ((fwd, "fwd"), (bwd, "fwd+bwd")):
        print(f"  {label:<9} eager {key['eager'] * 1e3:9.1f} ms  compiled {key['compiled'] * 1e3:9.1f} ms  "
              f"speed-up x{key['eager'] / key['compiled']:.2f}")  # fmt: skip
    return {"arch": arch, "first_call_s": {"fwd": compile_fwd, "fwd_bwd": compile_bwd}, "max_abs_diff": diff,
            "fwd": fwd, "fwd_bwd": bwd}


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


def bench_blocks(args: argparse.Namespace, device, sync) -> dict[str, float]:
    """Every block's fwd+bwd time / ``mean``'s, each timed round-robin with a ``mean`` model."""
    import torch

    from vidlang.models.factory import ModelConfig, build_model
    from vidlang.models.temporal import BLOCKS

    names = args.blocks.split(",") if args.blocks else [n for n in BLOCKS.names() if n != "mean"]
    torch.manual_seed(0)
    mean = build_model(ModelConfig(image=args.block_arch, block="mean")).to(device).train()
    size = mean.image_tower.cfg.image_size
    video = torch.randn(args.block_batch, args.frames, 3, size, size, device=device)
    print(f"blocks: forward+backward of encode_video on {args.block_arch}, {args.block_batch}x{args.frames} frames, "
          f"paper freezing, each round-robin with mean, {args.block_iters} rounds (median); {load_average()}")
    ratios = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(ModelConfig(image=args.block_arch, block=name)).to(device).train()
        t = medians(interleaved_times({"mean": _block_step(mean, video), name: _block_step(model, video)},
                                      args.block_iters, 1, sync))  # fmt: skip
        ratios[name] = t[name] / t["mean"]
        verdict = "ok" if ratios[name] <= BLOCK_TARGET else f"above {BLOCK_TARGET}"
        print(f"  {name:16s} {t[name] * 1e3:9.1f} ms  mean {t['mean'] * 1e3:9.1f} ms  x{ratios[name]:.2f} of mean "
              f"({verdict}; {model.freeze_policy}; {load_average()})", flush=True)  # fmt: skip
        del model
    return ratios


def _interaction_runners(a: int, b: int, t: int, words: int, e: int, tight_rows: int, device) -> tuple[dict, tuple]:
    """name -> (runner, parameters, factor to the whole gallery) of each retrieval interaction (module docstring 4),
    and the modules with parameters."""
    import torch

    from vidlang.models.cross_similarity import TightTransformerSimilarity
    from vidlang.models.glscl import GLSCLSimilarity, global_similarity
    from vidlang.models.similarity import cosine_similarity, mug_similarity

    torch.manual_seed(0)
    text, tokens = torch.randn(a, e, device=device), torch.randn(a, words, e, device=device)
    frames = torch.randn(b, t, e, device=device)
    word_mask = torch.ones(a, words, dtype=torch.bool, device=device)
    frame_mask = torch.ones(b, t, dtype=torch.bool, device=device)
    glscl = GLSCLSimilarity(e).to(device).eval().requires_grad_(False)
    tight = TightTransformerSimilarity(e, 4, heads=max(1, e // 64)).to(device).eval().requires_grad_(False)

    def glscl_all():
        video = (frames, frame_mask.float(), glscl.concepts(frames, frame_mask))
        return glscl((text, glscl.concepts(tokens, word_mask)), video)

    cached_video = (frames, frame_mask.float(), glscl.concepts(frames, frame_mask))
    cached = ((text, glscl.concepts(tokens, word_mask)), cached_video)
    rows = max(1, min(a, tight_rows))
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "cosine": (lambda: cosine_similarity(text, frames.mean(1)), 0, 1.0),
        "glscl_global": (lambda: global_similarity(text, frames, frame_mask), 0, 1.0),
        "glscl": (glscl_all, size(glscl), 1.0),
        "glscl_pairs": (lambda: glscl(*cached), size(glscl), 1.0),
        "mug": (lambda: mug_similarity(tokens, word_mask, frames), 0, 1.0),
        "tight": (lambda: tight(text[:rows], frames, frame_mask), size(tight), a / rows),
    }, (glscl, tight)


def bench_interactions(args: argparse.Namespace, device, sync) -> dict[str, dict[str, float]]:
    """FLOPs, parameters and wall time of each retrieval interaction over the gallery, relative to GLSCL's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    a, b, t, words = (int(x) for x in args.gallery.split(","))
    runners, modules = _interaction_runners(a, b, t, words, 512, args.tight_rows, device)
    flops = {}
    for m in modules:
        m.train()  # counted in train mode: the eval-mode fused attention kernels escape the counter (same FLOPs)
    for name, (run, _, factor) in runners.items():
        with FlopCounterMode(display=False) as counter:
            run()
        flops[name] = counter.get_total_flops() * factor
    for m in modules:
        m.eval()
    with torch.inference_mode():
        times = medians(interleaved_times({k: v[0] for k, v in runners.items()}, args.iters, args.warmup, sync))
    print(f"retrieval interactions, gallery {a} captions x {b} videos x {t} frames x {words} words, E 512, inference, "
          f"{device}, threads {torch.get_num_threads()}, {args.iters} round-robin rounds (median); {load_average()}")
    print(f"  {'interaction':<14}{'params':>10}{'GFLOPs':>12}{'ms':>12}{'FLOPs / glscl':>15}{'ms / glscl':>12}")
    out = {}
    for name, (_, params, factor) in runners.items():
        ms = times[name] * factor * 1e3
        out[name] = {"params": params, "gflops": flops[name] / 1e9, "ms": ms}
        note = f"  ({args.tight_rows} captions timed, x{factor:g})" if factor != 1.0 else ""
        print(f"  {name:<14}{params:>10,}{flops[name] / 1e9:12.1f}{ms:12.1f}{flops[name] / flops['glscl']:15.3g}"
              f"{ms / (times['glscl'] * 1e3):12.3g}{note}")  # fmt: skip
    print("  glscl = concepts of every caption and video + pairwise scores; glscl_pairs = pairwise scores alone")
    return out


@BENCHMARKS.register("model")
class ModelBench:
    help = "ViT towers vs transformers CLIPVisionModel (same weights; fwd, fwd+bwd, parity), compile, block costs"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--arch", default="vit_b32,vit_b16", help="comma list of image presets for the towers")
        parser.add_argument("--batch", type=int, default=1)
        parser.add_argument("--frames", type=int, default=8)
        parser.add_argument("--iters", type=int, default=3, help="round-robin rounds of the tower timings")
        parser.add_argument("--warmup", type=int, default=1)
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--compile", action="store_true", help="also time torch.compile of the first arch")
        parser.add_argument("--block-arch", default="vit_b32", help="tower for the block timings")
        parser.add_argument("--block-batch", type=int, default=2)
        parser.add_argument("--block-iters", type=int, default=2)
        parser.add_argument("--blocks", default=None, help="comma list of blocks (default: every registered one)")
        parser.add_argument("--skip-blocks", action="store_true")
        parser.add_argument("--skip-towers", action="store_true")
        parser.add_argument("--interactions", action="store_true", help="also time the retrieval interactions")
        parser.add_argument("--gallery", default="1000,1000,12,32", help="captions,videos,frames,words")
        parser.add_argument("--tight-rows", type=int, default=4, help="captions the tightTransf timing runs")
        add_json_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        archs = [a for a in args.arch.split(",") if a]
        results: dict = {"threads": torch.get_num_threads()}
        if not args.skip_towers:
            results["towers"] = [bench_tower(a, args, device, sync) for a in archs]  # seconds per call (medians)
            print_towers(results["towers"], args, device)
        if args.compile:
            results["compile"] = bench_compile(archs[0], args, device, sync)
        if not args.skip_blocks:
            results["blocks_over_mean"] = bench_blocks(args, device, sync)
        if args.interactions:
            results["interactions"] = bench_interactions(args, device, sync)
        write_json(args.json, "model", args, results)
        return 0


__all__ = ["ModelBench", "bench_blocks", "bench_interactions", "bench_tower", "tower_parity"]
