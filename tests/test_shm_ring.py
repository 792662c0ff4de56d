"""Reusable shared-memory batch slots: data never corrupted, slots reused, fallback when none is free."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.data import Dataset

from vidlang.data.collate import collate_samples
from vidlang.data.sample import VideoSample
from vidlang.data.shm_ring import BY_VALUE_BYTES, BY_VALUE_KEY, SLOT_KEY, BatchRing, RingDataLoader, release_batch


class _Clips(Dataset):
    """Clip i is filled with i % 251 (channels-last, like decoder output)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> VideoSample:
        video = torch.full((1, 2, 6, 6, 3), i % 251, dtype=torch.uint8).permute(0, 1, 4, 2, 3)
        return VideoSample(video, str(i), [f"clip {i}"], None, None, None, f"{i}.mp4", False)


def _loader(ring: BatchRing, workers: int = 2) -> RingDataLoader:
    return RingDataLoader(_Clips(), batch_size=4, num_workers=workers, collate_fn=partial(collate_samples, ring=ring),
                          persistent_workers=True, prefetch_factor=2)


def _check(batches: list[dict], partial_epoch: bool = False) -> None:
    keys = [int(k) for b in batches for k in b["key"]]
    assert partial_epoch or sorted(keys) == list(range(40))
    for b in batches:
        assert SLOT_KEY not in b
        expect = torch.tensor([int(k) % 251 for k in b["key"]], dtype=torch.uint8)
        assert torch.equal(b["video"].amax(dim=(1, 2, 3, 4)), expect)
        assert torch.equal(b["video"].amin(dim=(1, 2, 3, 4)), expect)


def test_slots_are_reused_once_the_consumer_drops_its_batches():
    ring = BatchRing(num_workers=2, slots=4)  # 10 batches per epoch, 8 slots in all: slots must be reused
    loader = _loader(ring)
    for _ in range(2):
        seen = []
        for b in loader:  # the consumer checks each batch and drops it
            _check([b], partial_epoch=True)
            seen.extend(int(k) for k in b["key"])
            del b
        assert sorted(seen) == list(range(40))
    assert int(ring.fallbacks.sum()) == 0  # 20 batches through 8 slots: always a free, reused slot
    assert ring.poll() == 0 and int(ring.flags.sum()) == 0  # every slot came back


def test_batches_kept_by_the_consumer_are_never_overwritten():
    ring = BatchRing(num_workers=2, slots=2)
    loader = _loader(ring)
    kept = [list(loader) for _ in range(2)]  # holds every batch of both epochs: their slots stay busy
    for epoch in kept:
        _check(epoch)
    assert ring.poll() == 4 and int(ring.fallbacks.sum()) == 20 - 4  # kept slots stay busy; the rest fell back
    del kept
    assert ring.poll() == 0


def test_interrupted_epoch_never_corrupts_or_blocks_and_its_slots_come_back():
    ring = BatchRing(num_workers=1, slots=2)
    loader = _loader(ring, workers=1)
    for i, _ in enumerate(loader):
        if i == 1:
            break  # the loader drops its prefetched batches when the next epoch starts
    del _
    _check(list(loader))
    assert ring.poll() == 0  # dropped batches free their slots too


def test_release_outside_a_loader_and_without_workers():
    samples = [_Clips()[i] for i in range(3)]
    batch = collate_samples(samples, ring=BatchRing(1, 1))  # main process: no slot is used
    assert SLOT_KEY not in batch and release_batch(batch) is batch
    assert batch["video"].shape == (3, 2, 3, 6, 6)


class _Rich(_Clips):
    """Clips with a window, a label, frame indices and (odd clips) 80 kB of audio."""

    def __getitem__(self, i: int) -> VideoSample:
        s = super().__getitem__(i)
        audio = torch.full((20000,), float(i)) if i % 2 else None
        return VideoSample(s.video, s.key, [f"clip {i}", f"also {i}"], (0.5 * i, i + 1.0), i % 3, audio, s.path,
                           audio is not None, None, torch.arange(2)[None] + i)


def test_small_tensors_travel_by_value_and_arrive_intact():
    ds = _Rich()
    loader = RingDataLoader(ds, batch_size=4, num_workers=2, collate_fn=partial(collate_samples, ring=BatchRing(2, 4)))
    n = 0
    for b in loader:
        expect = collate_samples([ds[int(k)] for k in b["key"]])
        assert set(b) == set(expect) and BY_VALUE_KEY not in b
        for name, value in expect.items():
            if isinstance(value, torch.Tensor):
                got = b[name]
                assert got.dtype == value.dtype and got.shape == value.shape, name
                assert torch.equal(got.nan_to_num(-1.0), value.nan_to_num(-1.0)) if got.is_floating_point() \
                    else torch.equal(got, value), name
                small = name != "video" and value.numel() * value.element_size() <= BY_VALUE_BYTES
                assert got.is_shared() != small, name  # small ones came inside the pickle; video and audio in shm
            else:
                assert b[name] == value, name
        n += len(b["key"])
    assert n == len(ds)
