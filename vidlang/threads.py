"""How many torch threads a process takes when decoding worker processes share its cores.

On a CPU machine the training (or serving) process and its decoding workers compete for the same cores. When
the step is cheap and the workers are busy all the time, PyTorch's default (one thread per core) oversubscribes
the cores: on 2 cores with 2 loader workers, `vidlang bench train` tiny ran at 175 clips/s with 2 threads against
241 with 1, and `vidlang demo` took 96-100 s against 77-85 s (alternated runs), with the same results. When the
step is expensive the workers mostly wait for a free prefetch slot and the step wants every core: ViT-B/32 on the
same machine took 5.6-6.6 s a step with 2 threads against 10.6-11.1 s with 1 (batch 4 x 8 frames, data wait 0 %
either way).

So the rule (the cores the workers leave, at least 1) is for data-bound runs. ``vidlang demo``, ``vidlang serve``
and ``vidlang bench train``'s ``tiny`` setting apply it; a ``vidlang fit`` run opts in with the callback
(``trainer.callbacks: [{class_path: vidlang.threads.LoaderThreads}]``). :class:`LoaderThreads` leaves the count
alone when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set (the user chose), when the loaders have no workers,
and on GPU runs; ``threads`` overrides the rule.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def threads_beside(workers: int, processes: int = 1) -> int:
    """Torch threads for each of ``processes`` processes sharing this machine's cores with ``workers`` decoding
    workers each: the cores left, at least 1."""
    return max(1, cpu_cores() // max(1, processes) - max(0, workers))


def loader_workers(trainer: Any) -> int:
    """The DataLoader workers of the trainer's data module (0 when it has none or does not say)."""
    dm = getattr(trainer, "datamodule", None)
    workers = getattr(dm, "num_workers", None)
    if workers is None:
        workers = getattr(getattr(dm, "loader", None), "num_workers", 0)
    return int(workers or 0)


class LoaderThreads(Callback):
    """Set torch's thread count for a CPU run from its loader workers (module docstring); restored at teardown."""

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._previous: int | None = None
        self._said = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from pytorch_lightning.accelerators import CPUAccelerator

        if not isinstance(trainer.accelerator, CPUAccelerator):
            return
        if self.threads is None and any(os.environ.get(name) for name in USER_SETTINGS):
            return
        workers = loader_workers(trainer)
        if self.threads is None and workers == 0:
            return
        n = self.threads or threads_beside(workers, trainer.num_devices)
        if self._previous is None:
            self._previous = torch.get_num_threads()
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
            if not self._said:  # once, not at every stage
                rank_zero_info(f"torch threads: {n} ({cpu_cores()} cores, {workers} loader workers per process)")
                self._said = True

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._previous is not None:
            torch.set_num_threads(self._previous)
            self._previous = None
