"""``vidlang bench loader``: the full data loader against the raw decoder, same files and indices.

Both sides decode the same deterministic 8-frame sparse (``segment``, eval) indices of the same
videos. "raw" opens each file, samples the indices and calls ``get_frames`` in a plain loop,
in 1 process and in as many processes as the loader has workers (a ``multiprocessing`` pool whose
processes use one intra-op thread each, like DataLoader workers).
"loader" is :class:`~vidlang.data.datasets.VideoTextDataset` + transforms (random resized crop
to ``--size``) + collate through the :class:`~vidlang.data.shm_ring.RingDataLoader` that
:class:`~vidlang.data.datamodule.VideoDataModule` builds, with ``--workers`` persistent workers.
The default synthetic videos are shaped like WebVid clips (336 px short side, 24 fps, 10 s).
Each pass goes over the videos ``--repeat`` times (steady-state throughput, as in training,
rather than the tail of one short pass). Each side makes one untimed warm-up pass (page cache,
worker start-up); then ``--passes`` rounds time one pass of each side in turn, and the best
pass of each is reported (robust to other load on a shared machine).
"bare {backend} + crop" is the same job written with the libraries alone: the library decodes the same indices,
torchvision's ``RandomResizedCrop`` (one box per clip, antialiased) crops them, a plain ``DataLoader`` with
the same workers and batch size batches them (:class:`BarePipelineDataset`): the like-for-like comparison with
the full loader, which also crops, collates and hands batches to the training process.
"bare library" is the decoding library alone, no vidlang code in the timed loop: torchcodec's
``VideoDecoder`` (exact seek mode, one FFmpeg thread; decord's ``VideoReader.get_batch`` when the backend is
decord) called with the *same* frame indices (computed once, untimed, by vidlang's sampler), in the same
number of processes. The headline ratios are loader / bare library (what a user gives up by using vidlang's
loader instead of the library; target >= 0.9) and loader / raw (vidlang's own reader) with the same number
of processes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from vidlang.bench import BENCHMARKS
from vidlang.bench.common import add_json_argument, load_average, write_json


def _raw_clip(job: tuple[str, str, int]) -> int:
    from vidlang.data.decoding import open_video
    from vidlang.data.sampling import build_sampler, sample_clip

    path, backend, frames = job
    with open_video(path, backend=backend) as reader:
        clip = sample_clip(reader, build_sampler("segment", num_frames=frames), training=False)
    return int(clip.shape[1])


def _bare_clip(job: tuple[str, str, list[int]]) -> int:
    """The library alone: open ``path`` and decode ``indices`` (no vidlang code)."""
    path, backend, indices = job
    if backend == "decord":
        import decord

        return int(decord.VideoReader(path, num_threads=1).get_batch(indices).shape[0])
    from torchcodec.decoders import VideoDecoder

    return int(VideoDecoder(path, num_ffmpeg_threads=1, seek_mode="exact").get_frames_at(indices).data.shape[0])


def _bare_frames(path: str, backend: str, indices: list[int]) -> Any:
    """``[T, C, H, W]`` uint8 frames at ``indices``, decoded by the library alone."""
    import torch

    if backend == "decord":
        import decord

        frames = decord.VideoReader(path, num_threads=1).get_batch(indices).asnumpy()  # [T, H, W, C]
        return torch.from_numpy(frames).permute(0, 3, 1, 2)
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(path, num_ffmpeg_threads=1, seek_mode="exact").get_frames_at(indices).data


class BarePipelineDataset:
    """What a user writes with the libraries alone: the library decodes the same indices, torchvision's
    ``RandomResizedCrop`` (one box per clip, antialiased) crops them; a plain ``DataLoader`` batches them."""

    def __init__(self, jobs: list[tuple[str, str, list[int]]], size: int) -> None:
        from torchvision.transforms import v2

        self.jobs = jobs
        self.crop = v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> Any:
        return self.crop(_bare_frames(*self.jobs[i]))  # [T, C, size, size]


def bare_pipeline_runner(paths: list[str], backend: str, indices: dict[str, list[int]], workers: int, size: int,
                         batch: int) -> Callable[[], int]:
    """One pass of :class:`BarePipelineDataset` through a plain ``torch.utils.data.DataLoader`` -> clips."""
    from torch.utils.data import DataLoader

    ds = BarePipelineDataset([(p, backend, indices[p]) for p in paths], size)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    return lambda: sum(b.shape[0] for b in loader)


def clip_indices(paths: list[str], backend: str, frames: int) -> dict[str, list[int]]:
    """The frame indices vidlang's eval ``segment`` sampler picks for each file (computed once, untimed)."""
    from vidlang.data.decoding import open_video
    from vidlang.data.sampling import build_sampler

    sampler = build_sampler("segment", num_frames=frames)
    out = {}
    for path in dict.fromkeys(paths):
        with open_video(path, backend=backend) as reader:
            idx, _ = sampler.sample_indices(reader.frame_timestamps(), reader.metadata.duration, training=False)
            out[path] = [int(i) for i in idx.flatten().tolist()]
    return out


def bare_runner(paths: list[str], backend: str, indices: dict[str, list[int]], pool: Any = None) -> Callable[[], int]:
    """One pass of the bare library over ``paths`` (in ``pool`` when given) -> clips decoded."""
    jobs = [(p, backend, indices[p]) for p in paths]
    if pool is None:
        return lambda: len([_bare_clip(j) for j in jobs])
    return lambda: len(pool.map(_bare_clip, jobs, chunksize=4))


def _one_thread() -> None:
    """Pool initializer: one intra-op thread per process, as in DataLoader workers (no oversubscription)."""
    import torch

    torch.set_num_threads(1)


def raw_runner(paths: list[str], backend: str, frames: int, processes: int, pool: Any = None) -> Callable[[], int]:
    """One pass of the raw decoder over ``paths`` (in ``pool`` when given) -> clips decoded."""
    jobs = [(p, backend, frames) for p in paths]
    if pool is None:
        return lambda: len([_raw_clip(j) for j in jobs])
    return lambda: len(pool.map(_raw_clip, jobs, chunksize=4))


def loader_runner(
    entries: list, backend: str, frames: int, workers: int, size: int, batch: int, transform: bool = True,
    ring: bool = True,
) -> Callable[[], int]:
    """One pass of the full loader (dataset + transforms + collate + DataLoader workers) -> clips delivered."""
    from vidlang.data.collate import collate_samples
    from vidlang.data.datasets import VideoTextDataset
    from vidlang.data.sampling import build_sampler
    from vidlang.data.shm_ring import RING_SPARE_SLOTS, BatchRing, RingDataLoader
    from vidlang.data.transforms import ClipTransform

    tf = ClipTransform(size, "train") if transform else None
    ds = VideoTextDataset(entries, build_sampler("segment", num_frames=frames), tf, training=False, backend=backend)
    shm_ring = BatchRing(workers, slots=4 + RING_SPARE_SLOTS) if ring and workers else None
    collate = partial(collate_samples, ring=shm_ring)
    loader = RingDataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate,
                            persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    def one_pass() -> int:
        n = sum(b["video"].shape[0] for b in loader)
        if n != len(entries):
            raise RuntimeError(f"loader delivered {n} clips, expected {len(entries)}")
        return n

    return one_pass


def measure(runners: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Best clips/s of each runner over ``rounds`` interleaved timed passes (after one warm-up pass each)."""
    for run in runners.values():
        run()
    best = dict.fromkeys(runners, 0.0)
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            n = run()
            best[name] = max(best[name], n / (time.perf_counter() - t0))
    return best


def real_manifest(root: Path, count: int) -> str:
    """A manifest of ``count`` rows cycling over the real-shaped clips of ``vidlang bench decode``."""
    import csv

    from vidlang.bench.decode import real_shaped_set

    paths = real_shaped_set(root)
    if not paths:
        raise SystemExit("--real needs the ffmpeg CLI to write the real-shaped clips")
    out = root / "manifest.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i in range(count):
            w.writerow([str(paths[i % len(paths)]), f"real-shaped clip {i}"])
    return str(out)


ROWS = {  # runner -> the row's name in the JSON results
    "raw1": "raw decoder, 1 process", "rawn": "raw decoder, one process per worker", "libn": "bare library",
    "pipe": "bare library + crop, DataLoader", "loader": "full loader", "bare": "full loader without transforms",
    "noring": "full loader, fresh shared memory per batch",
}
TARGET = 0.9  # loader over the bare library


def json_results(best: dict[str, float], backend: str, workers: int) -> dict:
    """The table as data: clips/s of every row and the headline ratios (``None`` where a row did not run)."""
    full = best["loader"]
    lib, pipe = best.get("libn"), best.get("pipe")
    return {
        "backend": backend, "workers": workers, "clips_per_s": {ROWS[k]: v for k, v in best.items()},
        "loader_over_bare_library": full / lib if lib else None,
        "loader_over_bare_library_and_crop": full / pipe if pipe else None,
        "loader_over_raw": full / best["rawn"], "target": TARGET,
    }


@BENCHMARKS.register("loader")
class LoaderBench:
    help = "clips/s of the full data loader vs the raw decoder on the same files and frame indices"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--manifest", help="a generic CSV/JSONL manifest (default: generate a synthetic corpus)")
        parser.add_argument("--videos", type=int, default=48, help="synthetic corpus size")
        # defaults shaped like WebVid clips (336 px short side, 24 fps, 10 s); `vidlang synth` keyframes every second
        parser.add_argument("--video-size", type=int, default=336, help="synthetic video side (px)")
        parser.add_argument("--video-frames", type=int, default=240, help="synthetic frames per video")
        parser.add_argument("--video-fps", type=float, default=24.0, help="synthetic frame rate")
        parser.add_argument("--backend", default="auto")
        parser.add_argument("--frames", type=int, default=8)
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--size", type=int, default=224, help="crop size of the transforms")
        parser.add_argument("--repeat", type=int, default=4, help="each pass goes over the videos this many times")
        parser.add_argument("--skip-breakdown", action="store_true",
                            help="skip the breakdown rows (no transforms; PyTorch's fresh shared memory per batch)")
        parser.add_argument("--passes", type=int, default=2, help="timed rounds (best pass of each is reported)")
        parser.add_argument("--real", action="store_true",
                            help="use the real-shaped set of `vidlang bench decode` instead (640x360 H.264 with "
                                 "B-frames and AAC, 5/12/30 s, written with the ffmpeg CLI), --videos copies of it")
        add_json_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.data.decoding import resolve_backend
        from vidlang.data.formats.manifest import read_manifest

        manifest = args.manifest
        tmp = None
        if manifest is None and args.real:
            tmp = tempfile.TemporaryDirectory(prefix="vidlang_bench_loader_")
            manifest = real_manifest(Path(tmp.name), args.videos)
        elif manifest is None:
            from vidlang.data.synthetic import generate_corpus

            tmp = tempfile.TemporaryDirectory(prefix="vidlang_bench_loader_")
            generate_corpus(tmp.name, args.videos, seed=0, size=args.video_size, frames=args.video_frames,
                            fps=args.video_fps)
            manifest = str(Path(tmp.name) / "manifest.csv")
        entries = read_manifest(manifest).entries * args.repeat  # one long pass: steady state, small tail
        backend = resolve_backend(args.backend)
        paths = [e.path for e in entries]
        bare_ok = backend in ("torchcodec", "decord")
        indices = clip_indices(paths, backend, args.frames) if bare_ok else {}
        with mp.get_context("fork").Pool(args.workers, initializer=_one_thread) as pool:
            runners = {
                "raw1": raw_runner(paths, backend, args.frames, 1),
                "rawn": raw_runner(paths, backend, args.frames, args.workers, pool),
                "loader": loader_runner(entries, backend, args.frames, args.workers, args.size, args.batch_size),
            }
            if bare_ok:
                runners["libn"] = bare_runner(paths, backend, indices, pool)
                runners["pipe"] = bare_pipeline_runner(paths, backend, indices, args.workers, args.size,
                                                       args.batch_size)
            if not args.skip_breakdown:
                runners["bare"] = loader_runner(entries, backend, args.frames, args.workers, args.size,
                                                args.batch_size, transform=False)
                runners["noring"] = loader_runner(entries, backend, args.frames, args.workers, args.size,
                                                  args.batch_size, ring=False)
            best = measure(runners, args.passes)
        raw1, rawn, full = best["raw1"], best["rawn"], best["loader"]
        print(f"loader benchmark: {len(paths) // args.repeat} videos x {args.repeat} per pass from {manifest}, "
              f"backend {backend}, {args.frames}-frame "
              f"segment sampling, crop {args.size}, batch {args.batch_size}; best of {args.passes} interleaved passes")
        print(f"{'pipeline':<48}{'clips/s':>10}{'ratio':>8}")
        print(f"{'raw decoder, 1 process':<48}{raw1:>10.1f}{'':>8}")
        print(f"{f'raw decoder, {args.workers} processes':<48}{rawn:>10.1f}{1.0:>8.2f}")
        if "libn" in best:
            lib = best["libn"]
            print(f"{f'bare {backend}, {args.workers} processes (no vidlang code)':<48}{lib:>10.1f}{lib / rawn:>8.2f}")
        if "pipe" in best:
            pipe = best["pipe"]
            print(f"{f'bare {backend} + crop, DataLoader, {args.workers} workers':<48}{pipe:>10.1f}{pipe / rawn:>8.2f}")
        print(f"{f'full loader, {args.workers} workers (+transforms, collate)':<48}{full:>10.1f}{full / rawn:>8.2f}")
        if "bare" in best:
            bare = best["bare"]
            print(f"{'  same loader without transforms (breakdown)':<48}{bare:>10.1f}{bare / rawn:>8.2f}")
            fresh = best["noring"]
            print(f"{'  same loader, fresh shared memory per batch':<48}{fresh:>10.1f}{fresh / rawn:>8.2f}")
        if "libn" in best:
            lib = best["libn"]
            print(f"loader / bare {backend} ({args.workers} processes) = {full / lib:.2f} "
                  f"({'meets' if full / lib >= TARGET else 'misses'} the {TARGET} target); {load_average()}")
            pipe = best["pipe"]
            print(f"loader / bare {backend} + crop in a DataLoader (the same work by hand) = {full / pipe:.2f}")
        verdict = "meets" if full / rawn >= TARGET else "misses"
        print(f"loader / raw ({args.workers} processes) = {full / rawn:.2f} ({verdict} the {TARGET} target); "
              f"loader / raw (1 process) = {full / raw1:.2f}")
        write_json(args.json, "loader", args, json_results(best, backend, args.workers))
        if tmp is not None:
            tmp.cleanup()
        return 0
