"""Streaming from shards: exactly-once epochs with 2 workers, rank splits, resampled epochs, bad members."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from vidlang.commands.shards import write_shards
from vidlang.data.formats import build_index
from vidlang.data.sampling import build_sampler
from vidlang.data.streaming import StreamingVideoDataset, make_streaming_loader, shuffle_buffer, split_quota
from vidlang.data.transforms import ClipTransform

N = 14


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from vidlang.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("stream")
    generate_corpus(root / "corpus", N, seed=3, size=32, frames=8, workers=1, progress=False)
    index = build_index("manifest", path=str(root / "corpus" / "manifest.csv"))
    write_shards(index, root / "shards", samples_per_shard=3, progress=False)  # 5 shards: 3,3,3,3,2
    return root / "shards"


def make(shards, **kw) -> StreamingVideoDataset:
    kw.setdefault("batch_size", 4)
    return StreamingVideoDataset(str(shards), build_sampler("segment", num_frames=2), ClipTransform(32, "eval"),
                                 backend="pyav", **kw)


def epoch_keys(ds, epoch) -> tuple[list[str], int]:
    ds.set_epoch(epoch)
    loader = make_streaming_loader(ds)
    batches = list(loader)
    for b in batches:
        assert b["video"].shape[1:] == (2, 3, 32, 32) and len(b["key"]) <= ds.batch_size
    return [k for b in batches for k in b["key"]], len(batches)


def test_exactly_once_per_epoch_with_two_workers(shards):
    ds = make(shards, training=True, num_workers=2, shuffle_buffer=4)
    length = len(ds)
    orders = []
    for epoch in (0, 1, 2):
        keys, n_batches = epoch_keys(ds, epoch)
        assert Counter(keys) == Counter(f"{i:09d}" for i in range(N))  # every sample exactly once
        assert n_batches == length == len(ds) == len(make_streaming_loader(ds))  # same length every epoch
        orders.append(keys)
    assert orders[0] != orders[1]  # shard order and buffer reshuffled per epoch
    assert epoch_keys(ds, 1)[0] == orders[1]  # and reproducible


def test_eval_stream_is_in_order_and_complete(shards):
    keys, _ = epoch_keys(make(shards, training=False, num_workers=0), 0)
    assert keys == [f"{i:09d}" for i in range(N)]


def test_rank_split_is_disjoint_and_equal(shards, caplog):
    ranks = [make(shards, training=True, num_workers=0, rank=r, world_size=2) for r in range(2)]
    keys = [epoch_keys(ds, 0)[0] for ds in ranks]
    assert len(keys[0]) == len(keys[1]) == ranks[0].rank_samples(0)  # equal steps for DDP
    assert not set(keys[0]) & set(keys[1])
    plan = ranks[0]._exact_plan(0)[0]
    totals = [sum(ranks[0].counts[i] for ws in plan[r] for i in ws) for r in range(2)]
    assert sum(totals) == N and len(keys[0]) == min(totals)
    assert N - len(keys[0]) - len(keys[1]) == max(totals) - min(totals)  # the only samples left out, and logged
    assert max(totals) == min(totals) or "not served this epoch" in caplog.text


def test_exact_mode_needs_enough_shards(shards):
    with pytest.raises(ValueError, match="at least world_size x num_workers = 6 shards, got 5"):
        make(shards, num_workers=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="resampled=True"):
        make(shards, samples_per_epoch=5)


def test_resampled_epoch_has_fixed_length(shards):
    ds = make(shards, training=True, num_workers=2, resampled=True, samples_per_epoch=9, batch_size=2)
    keys, n_batches = epoch_keys(ds, 0)
    assert len(keys) == 9 and n_batches == len(ds) == 5  # workers take 5 + 4 samples, 3 + 2 batches
    assert set(keys) <= {f"{i:09d}" for i in range(N)}
    assert epoch_keys(ds, 1)[0] != keys


def test_bad_member_is_skipped_and_counted(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "00000.tar", "w") as tf:
        for key, data in [("000000100", b"not a video at all"), ("000000101", (shards / "00000.tar").read_bytes())]:
            payload = data if key == "000000100" else _first_video(shards / "00000.tar")
            for ext, blob in [("mp4", payload), ("json", json.dumps({"captions": ["c"]}).encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    ds = make(bad, training=False)
    ds.set_epoch(0)
    batches = list(make_streaming_loader(ds))
    assert [k for b in batches for k in b["key"]] == ["000000101"]
    assert [k for b in batches for k in b["skipped"]] == ["000000100"]  # evaluation reports what it skipped
    assert [f["key"] for f in ds._tracker().failures] == ["000000100"]
    assert ds._tracker().failures[0]["replacement"] is None  # never replaced in evaluation


def _shards_with_bad_members(src: Path, out: Path, bad_at: set[int], n: int = 6) -> Path:
    """One shard of ``n`` samples copied from ``src``'s first video; the samples at ``bad_at`` hold garbage."""
    out.mkdir()
    video = _first_video(src / "00000.tar")
    with tarfile.open(out / "00000.tar", "w") as tf:
        for i in range(n):
            key = f"{200 + i:09d}"
            blob = b"not a video" if i in bad_at else video
            for ext, data in [("mp4", blob), ("json", json.dumps({"captions": [f"c{i}"]}).encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.parametrize("bad_at", [{0}, {2, 3}, {5}, {0, 1, 2, 3, 4}])
def test_exact_training_keeps_its_step_count_when_samples_fail(shards, tmp_path, bad_at):
    """A failed sample is replaced by a fresh decode of a good one, so a rank never runs short of steps
    (a rank short of steps hangs DDP): the epoch has len(ds) full batches and every failure is recorded."""
    ds = make(_shards_with_bad_members(shards, tmp_path / "b", bad_at), training=True, batch_size=3,
              shuffle_buffer=0)
    ds.set_epoch(0)
    batches = list(make_streaming_loader(ds))
    assert len(batches) == len(ds) == 2 and [len(b["key"]) for b in batches] == [3, 3]
    good = {f"{200 + i:09d}" for i in range(6) if i not in bad_at}
    keys = [k for b in batches for k in b["key"]]
    assert good <= set(keys) and set(keys) <= good  # every good sample served, repeats only of good ones
    failures = ds._tracker().failures
    assert sorted(f["key"] for f in failures) == sorted(f"{200 + i:09d}" for i in bad_at)
    assert {f["replacement"] for f in failures} == {"repeat of a good sample"}


def test_eval_ranks_serve_every_sample(shards):
    """Evaluation never leaves samples out to equalise ranks (training does; evaluation has no per-step
    collective): the ranks' keys together are every sample once."""
    ranks = [make(shards, training=False, num_workers=0, rank=r, world_size=2) for r in range(2)]
    keys = [epoch_keys(ds, 0)[0] for ds in ranks]
    assert sorted(keys[0] + keys[1]) == [f"{i:09d}" for i in range(N)]
    assert [len(k) for k in keys] == [ds.rank_samples(0) for ds in ranks] and len(keys[0]) != len(keys[1])


def _first_video(tar: Path) -> bytes:
    with tarfile.open(tar) as tf:
        return tf.extractfile(next(m for m in tf if m.name.endswith(".mp4"))).read()


def test_shuffle_buffer_and_quota_helpers():
    import random

    out = list(shuffle_buffer(iter(range(50)), 8, random.Random(0)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert split_quota(9, 2) == [5, 4]
    capped = split_quota(10, 3, caps=[6, 2, 4])
    assert sum(capped) == 10 and all(q <= c for q, c in zip(capped, [6, 2, 4], strict=True))
    with pytest.raises(ValueError):
        split_quota(13, 3, caps=[6, 2, 4])


def _shard_of(out: Path, metas: list[dict | None], video: bytes) -> Path:
    out.mkdir()
    with tarfile.open(out / "00000.tar", "w") as tf:
        for i, meta in enumerate(metas):
            members = [("mp4", video)] + ([] if meta is None else [("json", json.dumps(meta).encode())])
            for ext, data in members:
                info = tarfile.TarInfo(f"{300 + i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out


def test_shard_labels_multi_label_and_bad_metadata(shards, tmp_path):
    """Label lists are multi-label tuples (both modes); a sample with a blank caption, no caption and no
    label, or a malformed label is a bad sample of its own (index mode: counted each epoch), never a refusal
    of the whole split and never a misread label."""
    metas = [{"captions": ["a"], "label": [0, 2]}, {"caption": "b", "label": 1}, {"captions": [" "]}, None,
             {"captions": ["c"], "label": "x"}, {"captions": ["d"], "label": "3"}]
    root = _shard_of(tmp_path / "s", metas, _first_video(shards / "00000.tar"))
    index = build_index("webdataset", shards=str(root / "00000.tar"))
    by_key = {e.key: e for e in index.entries}
    assert by_key["000000300"].label == (0, 2) and by_key["000000301"].label == 1
    assert by_key["000000305"].label == 3
    for bad in ("000000302", "000000303", "000000304"):
        with pytest.raises(OSError, match="blank caption|neither a caption|'label' must be"):
            by_key[bad].open_source()
    ds = make(root, training=False)
    ds.set_epoch(0)
    batches = list(make_streaming_loader(ds))
    assert [k for b in batches for k in b["key"]] == ["000000300", "000000301", "000000305"]
    assert sorted(k for b in batches for k in b["skipped"]) == ["000000302", "000000303", "000000304"]
    sets = [row for b in batches for row in b["label_set"].tolist()]
    assert sets == [[0, 2], [1, -1], [3, -1]]


def test_write_shards_keeps_multi_label_names(tmp_path):
    from vidlang.data.sample import FormatIndex, VideoEntry

    video = tmp_path / "v.mp4"
    video.write_bytes(b"\0" * 10)
    index = FormatIndex([VideoEntry(str(video), "k", ["a caption"], None, (0, 2))], ["run", "jump", "swim"], "t")
    write_shards(index, tmp_path / "out", samples_per_shard=4, progress=False)
    with tarfile.open(tmp_path / "out" / "00000.tar") as tf:
        meta = json.loads(tf.extractfile("000000000.json").read())
    assert meta["label"] == [0, 2] and meta["label_name"] == ["run", "swim"]
