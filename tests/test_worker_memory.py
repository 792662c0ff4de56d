"""Loader workers keep the memory they free (glibc): a clip's fresh tensors no longer page-fault every time."""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import Dataset

from vidlang.data.shm_ring import RingDataLoader
from vidlang.data.worker_memory import KeepFreedMemory, _mallopt, applied, keep_freed_memory

glibc = pytest.mark.skipif(_mallopt() is None, reason="glibc's mallopt only (Linux with glibc)")


def _churn() -> None:
    """What a worker does per clip, scaled up: three 16 MB tensors written, then all freed."""
    tensors = [torch.ones(16 << 20, dtype=torch.uint8) for _ in range(3)]
    del tensors


def _faults_per_churn(rounds: int = 3, warmup: int = 6) -> float:
    for _ in range(warmup):  # the heap settles after ~4 rounds
        _churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        _churn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds


@glibc
def test_freed_memory_is_reused_without_page_faults():
    # glibc's own thresholds move with the process's history, so the baseline pins its initial ones (blocks over
    # 128 kB mapped, freed memory over 128 kB trimmed), then the same process switches to keep_freed_memory
    code = textwrap.dedent("""
        import sys
        from test_worker_memory import _faults_per_churn
        from vidlang.data.worker_memory import _mallopt, applied, keep_freed_memory
        mallopt = _mallopt()
        assert mallopt(-3, 128 << 10) and mallopt(-1, 128 << 10) and not applied()
        baseline = _faults_per_churn()
        assert keep_freed_memory() and applied()
        print(baseline, _faults_per_churn())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(__file__))
    baseline, kept = map(float, out.stdout.split()[-2:])
    assert baseline > 10000, baseline  # 48 MB written per round: ~12,300 pages faulted in again every round
    assert kept < 50, kept


class _Settings(Dataset):
    """Each item: whether the worker keeps freed memory, and what the loader's own init set."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> tuple[bool, str]:
        return applied(), os.environ.get("VIDLANG_TEST_INIT", "")


def _mark_init(worker_id: int) -> None:
    os.environ["VIDLANG_TEST_INIT"] = f"worker {worker_id}"


@glibc
@pytest.mark.parametrize("keep", [True, False])
def test_ring_loader_workers_keep_freed_memory_and_still_run_the_given_init(keep):
    loader = RingDataLoader(_Settings(), batch_size=None, num_workers=1, worker_init_fn=_mark_init,
                            keep_freed_memory=keep)
    assert [tuple(item) for item in loader] == [(keep, "worker 0")] * 2
    assert not applied()  # the training process itself is left as it is


def test_wrapper_pickles_and_chains(monkeypatch):
    calls = []
    monkeypatch.setattr("vidlang.data.worker_memory.keep_freed_memory", lambda: calls.append("keep"))
    init = pickle.loads(pickle.dumps(KeepFreedMemory(_mark_init)))
    init(3)
    assert calls == ["keep"] and os.environ.pop("VIDLANG_TEST_INIT") == "worker 3"
    KeepFreedMemory()(0)  # no init of its own
    assert calls == ["keep", "keep"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mmap_mb"):
        keep_freed_memory(mmap_mb=64)
    with pytest.raises(ValueError, match="trim_mb"):
        keep_freed_memory(trim_mb=-1)


def test_data_loader_config_switch():
    from vidlang.data.config import LoaderConfig

    assert LoaderConfig().keep_freed_memory is True
    assert LoaderConfig(keep_freed_memory=False).keep_freed_memory is False
