"""``TrainStream``: the training batches of one or more sources in one stream, rebuilt when the frame count changes.

Frozen in Time trains on images and videos alternately (the released trainer zips a CC3M and a WebVid loader and
takes an optimizer step on each batch). Here each source (``data.train``, then each of ``data.train_mix``) keeps
its own DataLoader, so every batch is homogeneous (one source, one frame count), and the stream yields one batch
of each source in turn. An epoch is ``min(len(source)) x number of sources`` batches: it ends with the shortest
source, as the released ``zip`` does.

The frame curriculum (:class:`vidlang.data.curriculum.FrameCurriculum`) changes the training frame count
between epochs (:meth:`VideoDataModule.set_train_frames`). DataLoader workers hold a copy of their dataset, so
the stream builds its DataLoaders lazily, at the first batch of an epoch, and builds them again (new workers)
when the data module's frame version changed since. Lightning creates an epoch's iterator before calling
``on_train_epoch_start`` at the start of a run (also when resuming), so nothing is decoded before the first
``next``. ``sampler.set_epoch`` reaches every source's sampler (Lightning calls it each epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader


class _Samplers:
    """What Lightning sees as ``stream.sampler``: ``set_epoch`` for every source's sampler, now and rebuilt."""

    def __init__(self, stream: TrainStream) -> None:
        self.stream = stream

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch
        for loader in self.stream.loaders():
            _set_epoch(loader, epoch)


def _set_epoch(loader: Any, epoch: int) -> None:
    """``loader.sampler.set_epoch(epoch)`` where the sampler has one (streamed shards: the data module's)."""
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


class TrainStream:
    """Batches of the loaders ``build()`` returns, one of each in turn (module docstring).

    ``build``: makes one DataLoader per source (not iterated yet: no worker starts); ``version``: the data
    module's frame version, the loaders are built again when it changed.
    """

    def __init__(self, build: Callable[[], list[DataLoader]], version: Callable[[], int]) -> None:
        self._build, self._version = build, version
        self._loaders: list[DataLoader] | None = None
        self._built_at: int | None = None
        self.epoch = 0
        self.sampler = _Samplers(self)
        self.builds = 0  # how many times the loaders were built (new workers each time)

    def loaders(self) -> list[DataLoader]:
        """The current loaders, built again if the frame version changed (their samplers at ``self.epoch``)."""
        if self._loaders is None or self._built_at != self._version():
            self._loaders = None  # the old loaders (and their persistent workers) go first
            self._built_at = self._version()
            self._loaders = self._build()
            self.builds += 1
            for loader in self._loaders:
                _set_epoch(loader, self.epoch)
        return self._loaders

    def __len__(self) -> int:
        loaders = self.loaders()
        return min(len(dl) for dl in loaders) * len(loaders)

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        loaders = self.loaders()  # runs at the first next(): after on_train_epoch_start
        rounds = min(len(dl) for dl in loaders)
        iters = [iter(dl) for dl in loaders]
        for _ in range(rounds):
            for it in iters:
                yield next(it)
