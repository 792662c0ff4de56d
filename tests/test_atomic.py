"""Atomic writes (vidlang.io): whole files or nothing, a one-line error on a full disk, checkpoints that
survive ``kill -9`` during saves, and the trainers of ``vidlang fit`` / ``vidlang demo`` using them."""

from __future__ import annotations

import errno
import os
import pickle
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from vidlang.io import (
    DiskWriteError,
    append_lines,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    with_atomic_checkpoint_io,
)

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


class _FillingFile:
    """A file object whose disk fills after ``room`` bytes (what a real write on a full disk does)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]) if isinstance(data, (bytes, bytearray, memoryview)) else
                         data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk_after(monkeypatch):
    """``full_disk_after(n)``: files opened by vidlang.io from now on hit ENOSPC after n bytes."""
    real = os.fdopen

    def arm(room: int) -> None:
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FillingFile(real(*a, **k), room))

    return arm


def test_whole_file_replaced_and_no_temporary_left(tmp_path):
    p = tmp_path / "report.json"
    atomic_write_text(p, "first\n")
    atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"second" and _leftovers(tmp_path) == []
    mask = os.umask(0o022)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    with atomic_path(tmp_path / "plot.png") as tmp:  # libraries that infer the format from the suffix
        assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_error_inside_the_block_keeps_the_old_file(tmp_path):
    p = tmp_path / "manifest.csv"
    p.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(p, "w") as f:
        f.write("new, half written")
        raise RuntimeError("boom")
    assert p.read_text() == "old\n" and _leftovers(tmp_path) == []


def test_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, full_disk_after):
    p = tmp_path / "stats.json"
    p.write_text("previous")
    full_disk_after(10)
    with pytest.raises(DiskWriteError) as info:
        atomic_write_text(p, "x" * 10_000)
    msg = str(info.value)
    assert "\n" not in msg and str(p) in msg and "No space left on device" in msg, msg
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert str(pickle.loads(pickle.dumps(info.value))) == msg  # crosses process boundaries (loader workers)
    assert p.read_text() == "previous" and _leftovers(tmp_path) == []
    new = tmp_path / "new.json"
    with pytest.raises(DiskWriteError):
        atomic_write_text(new, "y" * 10_000)
    assert not new.exists() and _leftovers(tmp_path) == []


def test_real_file_size_limit_in_a_child_process(tmp_path):
    """A kernel-level write failure (RLIMIT_FSIZE -> EFBIG) mid-file: a one-line error, no file."""
    import resource

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
            atomic_write_bytes(tmp_path / "big.bin", os.urandom(1 << 20))
            os.write(w, b"no error")
        except DiskWriteError as e:
            os.write(w, f"DiskWriteError {e}".encode())
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(w, f"{type(e).__name__} {e}".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    msg = os.read(r, 4096).decode()
    os.close(r)
    assert msg.startswith("DiskWriteError cannot write") and str(tmp_path / "big.bin") in msg and "\n" not in msg
    assert not (tmp_path / "big.bin").exists() and _leftovers(tmp_path) == []


def test_append_is_whole_lines_or_nothing(tmp_path, monkeypatch):
    log = tmp_path / "bad_samples.jsonl"
    append_lines(log, ['{"a": 1}'])
    real = os.write

    def half_then_full(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskWriteError, match="bad_samples.jsonl"):
        append_lines(log, ['{"b": 2}', '{"c": 3}'])
    monkeypatch.setattr(os, "write", real)
    assert log.read_text() == '{"a": 1}\n'  # cut back: no half record for a reader to choke on
    append_lines(log, ['{"d": 4}'])
    assert log.read_text().splitlines() == ['{"a": 1}', '{"d": 4}']


# ------------------------------------------------------------------------------------------ checkpoints
def _module(n_params: int):
    import pytorch_lightning as pl

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(n_params))

        def training_step(self, batch, batch_idx):
            return (self.w[:8] ** 2).sum() + 0 * batch[0].sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)  # no optimizer state: checkpoint ~ 4 * n_params bytes

    return Model()


def _trainer(ckpt_dir: Path, max_steps: int, atomic: bool = True):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=1, save_last=True,
                           enable_version_counter=False)  # fmt: skip
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[ckpt], limit_val_batches=0, num_sanity_val_steps=0,
                      plugins=with_atomic_checkpoint_io() if atomic else None)  # fmt: skip


def _loader(n: int = 100_000):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def test_full_disk_during_a_checkpoint_save(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "ckpt"
    trainer = _trainer(ckpt_dir, max_steps=3)
    real_save, calls = torch.save, []

    def save_then_fill(obj, f, *a, **k):  # the 3rd file written (step 2's top-k checkpoint) fills the disk
        calls.append(1)
        if len(calls) < 3:
            return real_save(obj, f, *a, **k)
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill)
    with pytest.raises(DiskWriteError) as info:
        trainer.fit(_module(1000), _loader())
    msg = str(info.value)
    assert "\n" not in msg and "epoch=0-step=2.ckpt" in msg and "No space left" in msg, msg
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]  # no partial file
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 1


def _check_all_loadable(ckpt_dir: Path) -> int:
    """Every *.ckpt loads; returns the global step of last.ckpt."""
    for p in ckpt_dir.glob("*.ckpt"):
        ck = torch.load(p, weights_only=True, map_location="cpu")
        assert "state_dict" in ck, p
    return int(torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"])


def _train_in_child(ckpt_dir: Path, n_params: int, atomic: bool) -> None:
    """Forked child: train forever with a checkpoint every step; $TMPDIR on another filesystem when possible."""
    torch.set_num_threads(1)
    if os.path.isdir("/dev/shm"):
        tempfile.tempdir = "/dev/shm"  # where fsspec's temporary files would go (Lightning's default IO)
    try:
        _trainer(ckpt_dir, max_steps=10_000, atomic=atomic).fit(_module(n_params), _loader())
    finally:
        os._exit(0)


def kill_during_saves(ckpt_dir: Path, rounds: int, n_params: int = 4_000_000, atomic: bool = True,
                      seed: int = 0) -> list[int]:  # fmt: skip
    """``rounds`` times: fork a training child, let it save a while, ``kill -9`` it at a random moment,
    then check every checkpoint left. Returns last.ckpt's step after each kill."""
    rng = random.Random(seed)
    steps = []
    for _ in range(rounds):
        before = (ckpt_dir / "last.ckpt").stat().st_mtime_ns if (ckpt_dir / "last.ckpt").exists() else 0
        pid = os.fork()
        if pid == 0:
            _train_in_child(ckpt_dir, n_params, atomic)
        deadline = time.time() + 120
        while not ((ckpt_dir / "last.ckpt").exists() and (ckpt_dir / "last.ckpt").stat().st_mtime_ns > before):
            if time.time() > deadline or os.waitpid(pid, os.WNOHANG) != (0, 0):
                os.kill(pid, signal.SIGKILL)
                pytest.fail("the training child wrote no checkpoint")
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next saves (they take most of the time)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        steps.append(_check_all_loadable(ckpt_dir))
    return steps


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork (Linux)")
def test_kill_9_during_checkpoint_saves_leaves_loadable_checkpoints(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    steps = kill_during_saves(ckpt_dir, rounds=4)
    assert all(s >= 1 for s in steps)
    assert len(_leftovers(ckpt_dir)) <= 1  # killed saves' temporary files are removed by the next save


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork (Linux)")
def test_kill_9_during_checkpoint_saves_many_times(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    steps = kill_during_saves(ckpt_dir, rounds=15, n_params=8_000_000, seed=1)
    assert all(s >= 1 for s in steps) and len(_leftovers(ckpt_dir)) <= 1


# ------------------------------------------------------------------------------------------ wiring
def test_fit_and_demo_trainers_save_atomically(fit_and_demo_trainers):
    from vidlang.io import AtomicCheckpointIO

    for trainer in fit_and_demo_trainers:
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_configured_checkpoint_io_is_kept():
    from lightning_fabric.plugins import TorchCheckpointIO

    mine = TorchCheckpointIO()
    assert with_atomic_checkpoint_io([mine]) == [mine]
    assert len(with_atomic_checkpoint_io("bf16-mixed")) == 2


# ------------------------------------------------------------------------------------------ other writers
class _FakeBundle:
    """Embeds a video as a fixed function of its file name (no decoding)."""

    fingerprint, embed_dim = "fake-model", 4

    @staticmethod
    def embedding(name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        return torch.nn.functional.normalize(torch.randn(4, generator=g), dim=0)

    def iter_embed(self, sources, batch_size=8):
        yield list(range(len(sources))), torch.stack([self.embedding(Path(s).name) for s in sources]), []


def test_index_cache_from_two_builds_is_rebuilt_not_misread(tmp_path):
    """A crash between the renames of the cache's two files (new embeddings, old manifest) must not give
    videos each other's embeddings."""

    from vidlang.serve.index import MANIFEST, VideoIndex

    videos, cache = tmp_path / "videos", tmp_path / "cache"
    videos.mkdir()
    for name in ("b.mp4", "c.mp4", "d.mp4"):
        (videos / name).write_bytes(b"")
    VideoIndex.build(_FakeBundle(), videos, cache, progress=False)
    old_manifest = (cache / MANIFEST).read_bytes()
    (videos / "a.mp4").write_bytes(b"")  # sorts first: every row moves down by one
    VideoIndex.build(_FakeBundle(), videos, cache, progress=False)
    (cache / MANIFEST).write_bytes(old_manifest)  # the state a crash between the two renames leaves
    index = VideoIndex.build(_FakeBundle(), videos, cache, progress=False)
    for path, row in zip(index.paths, index.embeddings, strict=True):
        torch.testing.assert_close(row, _FakeBundle.embedding(path))


def test_interrupted_shard_writing_leaves_only_complete_shards(tmp_path, monkeypatch):
    from vidlang.commands import shards as shards_mod
    from vidlang.data.formats.webdataset import index_shard
    from vidlang.data.sample import FormatIndex, VideoEntry

    src = tmp_path / "src"
    src.mkdir()
    entries = []
    for i in range(5):
        (src / f"{i}.mp4").write_bytes(os.urandom(3000))
        entries.append(VideoEntry(str(src / f"{i}.mp4"), str(i), [f"caption {i}"]))
    real_add = shards_mod._add_member

    def add_until_full(tf, name, data):
        if name.startswith("000000003."):  # the disk fills while the second shard is being written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(tf, name, data)

    monkeypatch.setattr(shards_mod, "_add_member", add_until_full)
    out = tmp_path / "shards"
    with pytest.raises(DiskWriteError, match="00001.tar"):
        shards_mod.write_shards(FormatIndex(entries), out, samples_per_shard=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json"]
    assert [e.key for e in index_shard(str(out / "00000.tar"))] == ["000000000", "000000001"]
