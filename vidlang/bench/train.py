"""``vidlang bench train``: retrieval training throughput (clips/s) and the share of step time spent
waiting for data, through the real pipeline (synthetic corpus files -> VideoDataModule workers ->
RetrievalTask under a Lightning Trainer), for the tiny demo model and for ViT-B/32.

Waiting for data = the time the loop spends inside ``next(loader)`` (the training loader's iterator is timed
directly). The rest of the time between the end of one training step (``on_train_batch_end``) and the start of
the next (``on_train_batch_start``) is the loop's own overhead (Lightning's bookkeeping, the host-to-device copy,
the uint8 normalisation), reported on its own. The first ``--warmup`` steps (worker start-up, allocator warm-up)
are not timed.

Threads: the training process uses ``--threads`` torch threads when given. By default ``tiny`` gets the cores the
loader workers leave (``cores - workers``, at least 1: :mod:`vidlang.threads`, the rule ``vidlang demo`` and
``vidlang serve`` apply): on 2 cores, 2 decoding workers and a 2-thread step oversubscribe the cores (measured: 175
clips/s at 2 threads against 241 at 1). ``vit_b32``'s step is compute-bound (the workers mostly wait for a free
prefetch slot) and gets every core: 5.6-6.6 s a step at 2 threads against 10.6-11.1 s at 1 (batch 4 x 8 frames).

Peak memory: the peak resident set of the training process during the setting (``ru_maxrss`` is a lifetime peak,
so each setting reports the peak so far; run one setting per process for a clean figure), plus the peak CUDA
allocation on a GPU.
The target is a data-wait share below 5 % of step time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from vidlang.bench import BENCHMARKS
from vidlang.bench.common import add_json_argument, load_average, peak_rss_mb, write_json

DATA_WAIT_TARGET = 0.05

SETTINGS = {  # name -> (image preset, image size, text preset)
    "tiny": ("vit_tiny", 32, "text_tiny"),
    "vit_b32": ("vit_b32", 224, "text_b"),
}
COMPUTE_BOUND = {"vit_b32"}  # settings whose step wants every core (the workers mostly wait; module docstring)


def setting_threads(name: str, workers: int, threads: int | None = None) -> int:
    """Torch threads for a setting: ``threads`` when given; else every core for a compute-bound setting and the
    cores the workers leave for the others."""
    from vidlang.threads import cpu_cores, threads_beside

    if threads:
        return threads
    return cpu_cores() if name in COMPUTE_BOUND else threads_beside(workers)


class TimedLoader:
    """The training loader with ``next()`` timed: ``waits`` gets the seconds of each fetch, in order."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.waits = loader, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


def _timer_callback() -> Any:
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Per-step data-wait and compute times (seconds) after ``skip`` warm-up steps."""

        def __init__(self) -> None:
            self.wait: list[float] = []
            self.step: list[float] = []
            self._end: float | None = None
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self._end is not None:
                self.wait.append(now - self._end)
            self._start = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._end = time.perf_counter()
            self.step.append(self._end - self._start)

    return StepTimer()


def measure(setting: str, corpus: Path, steps: int, warmup: int, batch: int, frames: int, workers: int) -> dict:
    """Train ``warmup + steps`` steps of one setting; returns clips/s, the data-wait and loop-overhead shares."""
    import pytorch_lightning as pl

    from vidlang.data.config import LoaderConfig, SamplingConfig, TransformConfig
    from vidlang.data.datamodule import VideoDataModule
    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.retrieval import RetrievalTask

    image, size, text = SETTINGS[setting]
    manifest = str(corpus / "manifest.csv")
    data = VideoDataModule(train={"format": "manifest", "path": manifest, "split": "train"},
                           sampling=SamplingConfig(num_frames=frames), transform=TransformConfig(image_size=size),
                           loader=LoaderConfig(batch_size=batch, num_workers=workers, persistent_workers=False,
                                               pin_memory=False))  # fmt: skip
    vocab = {"text_tiny": {}, "text_b": {"vocab_size": 512, "context_length": 32}}[text]
    task = RetrievalTask(ModelConfig(image=image, text=text, block="mean", num_frames=frames, **vocab),
                         tokenizer=str(corpus / "tokenizer"), optim={"lr": 1e-4})  # fmt: skip
    timer = _timer_callback()
    loaders: list[TimedLoader] = []
    plain = data.train_dataloader

    def timed() -> TimedLoader:
        loaders.append(TimedLoader(plain()))
        return loaders[-1]

    data.train_dataloader = timed  # type: ignore[method-assign]
    trainer = pl.Trainer(accelerator="cpu", max_steps=warmup + steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer])  # fmt: skip
    trainer.fit(task, datamodule=data)
    between, step = timer.wait[warmup - 1 :], timer.step[warmup:]
    # fetch k + 1 happens between steps k - 1 and k (Lightning fetches one batch ahead): the fetches of the timed gaps
    fetches = [w for loader in loaders for w in loader.waits][warmup + 1 : warmup + 1 + len(between)]
    total = sum(between) + sum(step)
    return {"setting": setting, "image": f"{image} {size}px", "steps": len(step), "batch": batch,
            "frames": frames, "clips_per_s": len(step) * batch / total, "data_wait_share": sum(fetches) / total,
            "loop_share": (sum(between) - sum(fetches)) / total, "step_ms": 1000 * sum(step) / len(step),
            "peak_rss_mb": peak_rss_mb()}  # fmt: skip


@BENCHMARKS.register("train")
class TrainBench:
    help = "retrieval training throughput (clips/s) and the share of step time spent waiting for data"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--corpus", default="data/synth", help="synthetic corpus (generated if missing)")
        parser.add_argument("--settings", default="tiny,vit_b32", help=f"comma list of {sorted(SETTINGS)}")
        parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
        parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
        parser.add_argument("--batch", type=int, default=16)
        parser.add_argument("--frames", type=int, default=8)
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--videos", type=int, default=512, help="videos of a generated corpus")
        parser.add_argument("--threads", type=int, default=None,
                            help="torch threads of the training process (default: tiny cores - workers, at least 1; "
                                 "vit_b32 every core)")
        add_json_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from vidlang.data.synthetic import generate_corpus

        corpus = Path(args.corpus)
        if not (corpus / "manifest.csv").is_file():
            generate_corpus(corpus, args.videos, seed=0)
        print(f"retrieval training on the CPU, {args.workers} loader workers, "
              f"batch {args.batch} x {args.frames} frames, {args.steps} timed steps after {args.warmup}")  # fmt: skip
        print(f"{'setting':<10}{'image tower':<16}{'threads':>8}{'clips/s':>9}{'step ms':>10}{'data wait':>11}"
              f"{'loop':>8}{'peak RSS':>11}")
        previous = torch.get_num_threads()
        rows = []
        try:
            for name in args.settings.split(","):
                threads = setting_threads(name, args.workers, args.threads)
                torch.set_num_threads(threads)
                r = measure(name, corpus, args.steps, args.warmup, args.batch, args.frames, args.workers)
                rows.append({**r, "threads": threads})
                verdict = "ok" if r["data_wait_share"] < DATA_WAIT_TARGET else f">= {DATA_WAIT_TARGET:.0%}"
                print(f"{name:<10}{r['image']:<16}{threads:>8}{r['clips_per_s']:9.1f}{r['step_ms']:10.0f}"
                      f"{100 * r['data_wait_share']:10.1f}%{100 * r['loop_share']:7.1f}%{r['peak_rss_mb']:8.0f} MB  "
                      f"({verdict}; {load_average()})")
        finally:
            torch.set_num_threads(previous)
        write_json(args.json, "train", args, {"rows": rows, "data_wait_target": DATA_WAIT_TARGET})
        return 0
