"""``vidlang bench gradcache``: peak memory and step time of feature-cache accumulation vs the full batch.

One training step (forward, contrastive loss, backward; no optimizer) of a random ``--image`` video-text model
on ``--batch`` clips of ``--frames`` frames with one caption each, computed (a) on the full batch in one graph
and (b) with :func:`vidlang.losses.grad_cache.cached_contrastive_backward` over micro-batches of each
``--micro`` size: the same effective batch, the same loss and gradients. Each variant runs in a fresh process
(spawned) and is warmed up on 2 clips: peak memory is the step's peak resident memory (sampled every ms) above
the memory held before it (on CUDA ``max_memory_allocated`` above the allocation before it); parameter
gradients are allocated during the step, so they count. Step time: the median of ``--iters`` steps after the
first. The load average is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from vidlang.bench import BENCHMARKS


def _step(args: dict[str, Any], micro: int, queue: Any) -> None:
    """Runs in a spawned process: build, one measured step, ``iters`` timed steps; result -> ``queue``."""
    import torch

    from vidlang.bench.index import rss_mib
    from vidlang.losses import ContrastiveLoss
    from vidlang.losses.grad_cache import cached_contrastive_backward
    from vidlang.models.factory import ModelConfig, build_model

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    device = torch.device(args["device"])
    cfg = ModelConfig(image=args["image"], num_frames=args["frames"], image_size=args["image_size"], freeze="full")
    model = build_model(cfg).to(device).train()
    size, ctx = model.image_tower.cfg.image_size, model.text_tower.cfg.context_length
    b = args["batch"]
    g = torch.Generator().manual_seed(1)
    video = torch.randn(b, args["frames"], 3, size, size, generator=g).to(device)
    ids = torch.randint(1, model.text_tower.cfg.vocab_size - 1, (b, ctx), generator=g).to(device)
    mask = torch.ones_like(ids)
    index = torch.arange(b, device=device)
    loss_fn = ContrastiveLoss()

    def full() -> None:
        v, t = model.encode_video(video).embeds, model.encode_text(ids, mask).embeds
        loss_fn(v, t, index, model.logit_scale).loss.backward()

    mbs = [{"video": video[i:i + micro], "ids": ids[i:i + micro], "mask": mask[i:i + micro]}
           for i in range(0, b, micro)]

    def cached() -> None:
        cached_contrastive_backward(
            mbs, lambda m: model.encode_video(m["video"]).embeds,
            lambda m: model.encode_text(m["ids"], m["mask"]).embeds,
            lambda v, t, i: loss_fn(v, t, i, model.logit_scale),
            [torch.arange(len(m["video"]), device=device) for m in mbs])

    step = full if micro >= b else cached
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # warm-up on 2 clips (lazy initialisation of the kernels and the autograd engine), not measured
    v, t = model.encode_video(video[:2]).embeds, model.encode_text(ids[:2], mask[:2]).embeds
    loss_fn(v, t, index[:2], model.logit_scale).loss.backward()
    del v, t
    model.zero_grad()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mib()
    watch = _PeakRss()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    top = watch.stop()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else top) - before
    times = []
    for _ in range(args["iters"]):
        model.zero_grad()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    queue.put({"micro": micro, "peak_mib": peak, "step_s": statistics.median(times) if times else first,
               "first_s": first})


class _PeakRss:
    """Samples this process's resident memory every millisecond in a thread until :meth:`stop` (MiB)."""

    def __init__(self) -> None:
        import threading

        from vidlang.bench.index import rss_mib

        self.rss, self.peak = rss_mib, rss_mib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, self.rss())


@BENCHMARKS.register("gradcache")
class GradCacheBench:
    help = "feature-cache gradient accumulation vs the full batch: peak memory and step time at equal batch"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--image", default="vit_tiny", help="image tower preset (default vit_tiny)")
        parser.add_argument("--image-size", type=int, default=64, help="image size (default 64)")
        parser.add_argument("--frames", type=int, default=8, help="frames per clip (default 8)")
        parser.add_argument("--batch", type=int, default=64, help="effective batch: clips (default 64)")
        parser.add_argument("--micro", default="8,16,32", help="micro-batch sizes to compare (default 8,16,32)")
        parser.add_argument("--iters", type=int, default=3, help="timed steps after the first (default 3)")
        parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
        parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")

    def run(self, args: argparse.Namespace) -> int:
        import multiprocessing as mp

        micros = [args.batch] + [int(m) for m in args.micro.split(",") if m.strip()]
        conf = {k: getattr(args, k) for k in ("image", "image_size", "frames", "batch", "iters", "threads", "device")}
        load0 = os.getloadavg()
        print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs)")
        ctx = mp.get_context("spawn")
        rows = []
        for micro in micros:
            queue = ctx.Queue()
            proc = ctx.Process(target=_step, args=(conf, micro, queue))
            proc.start()
            result = queue.get()
            proc.join()
            rows.append(result)
            what = "full batch" if micro >= args.batch else f"cached, micro-batch {micro}"
            print(f"  {what}: peak +{result['peak_mib']:.0f} MiB, step {result['step_s']:.2f} s", flush=True)
        base = rows[0]
        print(f"\n{args.image} @ {args.image_size}px, {args.frames} frames, effective batch {args.batch}, "
              f"{args.device}, {args.threads} thread(s); median of {args.iters} steps")
        print("| variant | micro-batch | peak memory MiB | vs full | step s | vs full |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            name = "full batch" if r["micro"] >= args.batch else "feature cache"
            print(f"| {name} | {min(r['micro'], args.batch)} | {r['peak_mib']:.0f} | "
                  f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f} | {r['step_s']:.2f} | "
                  f"{r['step_s'] / base['step_s']:.2f} |")
        load1 = os.getloadavg()
        print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
        return 0
