"""Reusable shared-memory slots for the video tensor of batches made in DataLoader workers.

A worker must hand its batch to the main process through shared memory. PyTorch allocates a
fresh shared-memory segment per batch, and on Linux creating and first touching one costs
~0.65 ms per MB (tmpfs page allocation, zeroing and faults) against ~0.1 ms per MB for reusing
memory: for 8 clips of 8 x 224 x 224 frames that is ~6 ms per batch, ~5-10 % of decoding them.

:class:`BatchRing` keeps ``slots`` segments per worker and reuses them. Ownership is explicit and
never guessed: a worker takes only a slot whose flag is free, marks it busy and writes the batch
into it; the main process (:class:`RingDataLoader`) keeps a *weak* reference to the storage of each
batch it hands out and frees the slot's flag only once that storage is gone, i.e. once the
consumer has dropped every tensor and view of the batch (moved it to a GPU, pinned it, or simply
finished the step). A consumer that keeps batches keeps their slots: nothing it holds is ever
overwritten. When every slot of a worker is busy the worker falls back to a fresh segment, as
PyTorch does: slower, never wrong, never blocking.
"""

from __future__ import annotations

import itertools
import math
import os
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, get_worker_info

from vidlang.data.worker_memory import KeepFreedMemory

RING_SPARE_SLOTS = 4  # slots per worker beyond its prefetched batches (one being built, ones awaiting release)
SLOT_KEY = "_ring_slot"  # (ring id, worker, slot) in batches whose video lives in a ring slot
BY_VALUE_KEY = "_by_value"  # small tensors of such batches, as numpy arrays pickled with the batch (seal_batch)
BY_VALUE_BYTES = 1 << 16
_ids = itertools.count()
_RINGS: weakref.WeakValueDictionary[str, BatchRing] = weakref.WeakValueDictionary()


class BatchRing:
    """``slots`` reusable shared-memory buffers for each of ``num_workers`` workers (module docs)."""

    def __init__(self, num_workers: int, slots: int = 6) -> None:
        if num_workers < 1 or slots < 1:
            raise ValueError(f"BatchRing needs num_workers >= 1 and slots >= 1, got {num_workers}, {slots}")
        self.key = f"{os.getpid()}-{next(_ids)}"  # a string: loaders may turn tuples in batches into lists
        self.flags = torch.zeros(num_workers, slots, dtype=torch.int32).share_memory_()  # 1 = in flight
        self._buffers: dict[int, torch.UntypedStorage] = {}  # worker side: this worker's slot segments
        self._out: dict[tuple[int, int], StorageWeakRef] = {}  # main side: slots handed to the consumer
        self.fallbacks = torch.zeros(num_workers, dtype=torch.int64).share_memory_()  # batches that found no free slot
        _RINGS[self.key] = self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_buffers"], state["_out"] = {}, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _RINGS.setdefault(self.key, self)

    # ------------------------------------------------------------------ worker side
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, tuple[str, int, int] | None]:
        """A contiguous tensor for one batch (in a free slot inside a worker) and its slot tag (or ``None``)."""
        info = get_worker_info()
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if info is None or info.id >= self.flags.shape[0]:
            return torch.empty(shape, dtype=dtype), None
        row = self.flags[info.id]
        free = (row == 0).nonzero()
        if free.numel() == 0:  # tagged with slot -1, so that the main process still polls this ring
            self.fallbacks[info.id] += 1
            storage = torch.UntypedStorage._new_shared(nbytes)
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape), (self.key, info.id, -1)
        slot = int(free[0])
        storage = self._buffers.get(slot)
        if storage is None or storage.nbytes() < nbytes:
            storage = self._buffers[slot] = torch.UntypedStorage._new_shared(nbytes)
        row[slot] = 1
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape), (self.key, info.id, slot)

    # ------------------------------------------------------------------ main side
    def track(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Main process: remove the slot tag; the slot is freed once the batch's video storage is gone."""
        _, worker, slot = batch.pop(SLOT_KEY)
        if slot >= 0:
            self._out[(int(worker), int(slot))] = StorageWeakRef(batch["video"].untyped_storage())
        self.poll()
        return batch

    def poll(self) -> int:
        """Free the slots whose batches the consumer has dropped; returns how many are still held."""
        for key, ref in list(self._out.items()):
            if ref.expired():
                del self._out[key]
                self.flags[key] = 0
        return len(self._out)


class ByValue:
    """Numpy arrays that travel inside a pickled batch. An object of its own rather than a dict: a ``DataLoader``
    with ``batch_size=None`` passes worker output through ``default_convert``, which would turn arrays in a dict
    back into tensors (and so into shared-memory segments)."""

    __slots__ = ("arrays",)

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.arrays.items()}


def seal_batch(batch: dict[str, Any], slot: tuple[str, int, int]) -> dict[str, Any]:
    """Worker side, last step of collating into a ring slot: tag the batch with its ``slot`` and move its small
    tensors (up to :data:`BY_VALUE_BYTES`, the video excepted) into numpy arrays (:class:`ByValue`) under
    :data:`BY_VALUE_KEY`.

    PyTorch sends every tensor of a batch through a shared-memory segment of its own: the worker creates it and
    the main process receives its file descriptor over a socket, about 0.5 ms of CPU per tensor split between the
    two (2.1-2.4 ms for the 4 small tensors of a batch); as numpy arrays inside the pickled batch they cost 0.1 ms.
    :func:`release_batch` turns them back into tensors.
    """
    small = {k: v for k, v in batch.items() if k != "video" and isinstance(v, torch.Tensor)
             and v.device.type == "cpu" and v.numel() * v.element_size() <= BY_VALUE_BYTES}
    for k in small:
        del batch[k]
    batch[BY_VALUE_KEY] = ByValue({k: v.numpy() for k, v in small.items()})
    batch[SLOT_KEY] = slot
    return batch


def release_batch(batch: Any) -> Any:
    """Main process: hand a batch out of its ring slot and restore its small tensors (:func:`seal_batch`; no-op
    for batches without a slot)."""
    if not isinstance(batch, dict) or SLOT_KEY not in batch:
        return batch
    if BY_VALUE_KEY in batch:
        batch.update(batch.pop(BY_VALUE_KEY).tensors())
    ring = _RINGS.get(batch[SLOT_KEY][0])
    if ring is None:  # the ring is gone (its loader was deleted): the slot can never be reused
        batch.pop(SLOT_KEY)
        return batch
    return ring.track(batch)


class RingDataLoader(DataLoader):
    """A ``DataLoader`` whose batches' ring slots are tracked and freed when the consumer drops them.

    ``keep_freed_memory`` (default True): each worker first calls
    :func:`~vidlang.data.worker_memory.keep_freed_memory` (no page faults for every clip's fresh tensors),
    then the ``worker_init_fn`` given, if any.
    """

    def __init__(self, *args: Any, keep_freed_memory: bool = True, **kwargs: Any) -> None:
        if keep_freed_memory:
            kwargs["worker_init_fn"] = KeepFreedMemory(kwargs.get("worker_init_fn"))
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            yield release_batch(batch)
