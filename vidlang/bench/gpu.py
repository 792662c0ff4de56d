"""``vidlang bench gpu``: the GPU benchmarks of ``tools/gpu_check.sh`` (they also run, slowly, on the CPU).

1. **decode**: the real-shaped clips (:func:`vidlang.bench.decode.real_shaped_set`), sparse 8 frames, raw
   torchcodec and vidlang's torchcodec reader, on ``--device`` (NVDEC) and on the CPU, round-robin passes.
2. **tower**: ``--arch`` (B/16) under bf16 autocast, vidlang vs transformers (same weights), forward and
   forward + backward, round-robin, with the bf16 parity of :func:`vidlang.bench.model.tower_parity`.
3. **train step**: a B/16 ``mean`` model (bf16 autocast, AdamW) fed by :class:`VideoTextDataset` decoding on
   ``--device`` in the main process (the NVDEC loader: GPU decoding forces 0 workers); clips/s, the share of
   time spent waiting for data, peak CUDA memory.

Prints one table and, with ``--json DIR``, writes ``DIR/gpu_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vidlang.bench import BENCHMARKS
from vidlang.bench.common import interleaved_times, load_average, medians


def bench_decode(clips: list[Path], device: str, rounds: int) -> dict[str, float]:
    """Clips/s of raw torchcodec and vidlang's reader, on ``device`` and on the CPU."""
    from torchcodec.decoders import VideoDecoder

    from vidlang.bench.decode import sparse_indices
    from vidlang.data.decoding import open_video

    def raw(dev: str):
        def run() -> None:
            for c in clips:
                d = VideoDecoder(str(c), num_ffmpeg_threads=1, seek_mode="exact", device=dev)
                d.get_frames_at(sparse_indices(len(d))).data.sum().item()  # .item(): wait for the GPU

        return run

    def ours(dev: str):
        def run() -> None:
            for c in clips:
                with open_video(c, "torchcodec", device=dev) as r:
                    r.get_frames(sparse_indices(r.metadata.num_frames)).sum().item()

        return run

    runners = {f"raw torchcodec {device}": raw(device), f"vidlang torchcodec {device}": ours(device),
               "raw torchcodec cpu": raw("cpu"), "vidlang torchcodec cpu": ours("cpu")}  # fmt: skip
    return {k: len(clips) / v for k, v in medians(interleaved_times(runners, rounds)).items()}


def bench_tower_bf16(arch: str, batch: int, frames: int, device, rounds: int) -> dict:
    import torch

    from vidlang.bench.model import _hf_tower, tower_parity
    from vidlang.models.clip.configs import image_config
    from vidlang.models.clip.image import ClipImageTower

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    tower = ClipImageTower(image_config(arch)).to(device).eval()
    hf = _hf_tower(tower, device)
    s = tower.cfg.image_size
    video = torch.randn(batch, frames, 3, s, s, device=device)
    parity = tower_parity(tower, hf, video, device)
    fwd = {"vidlang": lambda: tower(video).frame_embeds, "transformers": lambda: hf(pixel_values=video.flatten(0, 1))}

    def bwd(run):
        def go() -> None:
            out = run()
            out = out.frame_embeds if hasattr(out, "frame_embeds") else out.image_embeds
            out.float().square().sum().backward()

        return go

    with torch.autocast(device.type, dtype=torch.bfloat16):
        with torch.inference_mode():
            t_fwd = medians(interleaved_times(fwd, rounds, 1, sync))
        t_bwd = medians(interleaved_times({"vidlang": bwd(lambda: tower(video)),
                                           "transformers": bwd(lambda: hf(pixel_values=video.flatten(0, 1)))},
                                          rounds, 1, sync))  # fmt: skip
    return {"arch": arch, "parity": parity, "fwd_ms": {k: 1e3 * v for k, v in t_fwd.items()},
            "fwd_bwd_ms": {k: 1e3 * v for k, v in t_bwd.items()}}  # fmt: skip


def bench_train_step(clips: list[Path], arch: str, batch: int, frames: int, steps: int, device) -> dict:
    """B/16 (``arch``) mean-block steps fed by GPU decoding in the main process: clips/s, data-wait share."""
    import torch

    from vidlang.data.collate import collate_samples
    from vidlang.data.datasets import VideoTextDataset
    from vidlang.data.sample import VideoEntry
    from vidlang.data.sampling import build_sampler
    from vidlang.data.transforms import ClipTransform, normalize
    from vidlang.models.factory import ModelConfig, build_model

    model = build_model(ModelConfig(image=arch, block="mean", num_frames=frames)).to(device).train()
    size = model.image_tower.cfg.image_size
    entries = [VideoEntry(key=f"v{i}", source=str(c), captions=["a clip"]) for i, c in enumerate(clips)]
    ds = VideoTextDataset(entries, build_sampler("segment", num_frames=frames), ClipTransform(size, "train"),
                          training=True, backend="torchcodec", resize_short_side=size, device=str(device))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait = compute = 0.0
    n = 0
    for step in range(steps + 1):  # step 0 warms up
        t0 = time.perf_counter()
        batch_items = [ds[(step * batch + i) % len(ds)] for i in range(batch)]
        video = collate_samples(batch_items)["video"].to(device, non_blocking=True)
        sync()
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            x = normalize(video, model.image_mean, model.image_std)
            loss = model.encode_video(x).embeds.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if step:
            wait, compute, n = wait + t1 - t0, compute + t2 - t1, n + batch
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None  # JSON null off CUDA
    return {"clips_per_s": n / (wait + compute), "data_wait_share": wait / (wait + compute),
            "step_ms": 1e3 * compute / steps, "peak_cuda_mb": peak}  # fmt: skip


@BENCHMARKS.register("gpu")
class GpuBench:
    help = "GPU benchmarks: NVDEC vs CPU decode, bf16 B/16 tower vs transformers, a B/16 step fed by NVDEC"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", default="cuda")
        parser.add_argument("--arch", default="vit_b16")
        parser.add_argument("--batch", type=int, default=8)
        parser.add_argument("--frames", type=int, default=8)
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--steps", type=int, default=10, help="timed training steps")
        parser.add_argument("--clip-seconds", default="5,12,30", help="lengths of the real-shaped clips")
        parser.add_argument("--json", type=Path, default=None, help="write DIR/gpu_bench.json")

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from vidlang.bench.decode import real_shaped_set

        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("vidlang bench gpu: no CUDA device here")
            return 2
        seconds = tuple(float(s) for s in args.clip_seconds.split(","))
        with tempfile.TemporaryDirectory(prefix="vidlang_bench_gpu_") as tmp:
            clips = real_shaped_set(Path(tmp), seconds)
            if not clips:
                print("vidlang bench gpu: needs the ffmpeg CLI to write the real-shaped clips")
                return 2
            result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "load": load_average(),
                      "decode_clips_per_s": bench_decode(clips, args.device, args.rounds),
                      "tower_bf16": bench_tower_bf16(args.arch, args.batch, args.frames, device, args.rounds),
                      "train_step": bench_train_step(clips, args.arch, args.batch, args.frames, args.steps, device)}
        print(f"vidlang bench gpu on {result['device']}; {result['load']}")
        print("decode, sparse 8 frames, real-shaped 640x360 H.264 clips (clips/s):")
        for k, v in result["decode_clips_per_s"].items():
            print(f"  {k:<28}{v:8.1f}")
        t = result["tower_bf16"]
        print(f"{t['arch']} tower, bf16 autocast, {args.batch}x{args.frames} frames (ms; ratio transformers/vidlang):")
        for key in ("fwd_ms", "fwd_bwd_ms"):
            v, h = t[key]["vidlang"], t[key]["transformers"]
            print(f"  {key[:-3]:<8} vidlang {v:8.1f}  transformers {h:8.1f}  ratio {h / v:.2f}")
        p = t["parity"]
        print(f"  parity: fp32 |diff| {p['fp32']:.1e}; bf16 vs fp32 (normalised) vidlang {p['bf16_vidlang']:.1e}, "
              f"transformers {p['bf16_transformers']:.1e}")
        s = result["train_step"]
        print(f"train step {args.arch} (mean, bf16, AdamW) fed by torchcodec on {args.device}: "
              f"{s['clips_per_s']:.1f} clips/s, step {s['step_ms']:.0f} ms, "
              f"data wait {100 * s['data_wait_share']:.1f}%"
              + (f", peak CUDA memory {s['peak_cuda_mb']:.0f} MB" if s["peak_cuda_mb"] is not None else ""))
        if args.json:
            args.json.mkdir(parents=True, exist_ok=True)
            (args.json / "gpu_bench.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
