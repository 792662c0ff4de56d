"""Bad-sample policy: training skips + replaces, evaluation skips without replacing; counts across workers, the
report file, the threshold, fail-fast, timeouts; the collate leaves skipped samples out of the batch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vidlang.data.badsamples import (
    BadSampleError,
    BadSamplePolicy,
    DecodeTimeout,
    SkippedSample,
    check_rate,
    collect_epoch,
    preflight,
    time_limit,
)
from vidlang.data.collate import collate_samples
from vidlang.data.datasets import VideoTextDataset
from vidlang.data.formats import build_index
from vidlang.data.sampling import build_sampler
from vidlang.data.transforms import ClipTransform


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from vidlang.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, 20, seed=2, size=32, frames=8, workers=1, progress=False)
    return out


@pytest.fixture()
def entries_with_bad(corpus, tmp_path):
    entries = build_index("manifest", path=str(corpus / "manifest.csv")).entries
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # an mp4 header, then garbage
    entries[3].source = str(broken)
    entries[11].source = str(tmp_path / "missing.mp4")
    return entries


def dataset(entries, policy, training=False):
    return VideoTextDataset(entries, build_sampler("segment", num_frames=4), ClipTransform(32, "eval"),
                            training=training, backend="pyav", policy=policy)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_training_samples_skipped_replaced_counted_and_reported(entries_with_bad, tmp_path, workers):
    policy = BadSamplePolicy(report_dir=str(tmp_path / "report"))
    ds = dataset(entries_with_bad, policy, training=True)
    loader = DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=collate_samples)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 20  # every index served: two of them by replacements
    bad_keys = {entries_with_bad[3].key, entries_with_bad[11].key}
    assert keys.count(entries_with_bad[3].key) == 0 and keys.count(entries_with_bad[11].key) == 0
    records = collect_epoch(policy, 0, ds.tracker.failures)
    assert {r["key"] for r in records} == bad_keys and len(records) == 2
    assert {r["index"] for r in records} == {3, 11}
    assert all(r["replacement"] not in (3, 11) for r in records)
    assert any("file not found" in r["reason"] for r in records)
    report = [json.loads(ln) for ln in (tmp_path / "report" / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["path"] for r in report} == {entries_with_bad[3].path, entries_with_bad[11].path}
    # the replacement is the same whatever the number of workers: served keys are reproducible
    again = dataset(entries_with_bad, BadSamplePolicy(), training=True)
    again_keys = [k for b in DataLoader(again, batch_size=5, collate_fn=collate_samples) for k in b["key"]]
    assert sorted(keys) == sorted(again_keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_eval_samples_are_skipped_not_replaced(entries_with_bad, tmp_path, workers):
    """Evaluation: a sample that fails to load is left out of its batch (never replaced: that would change the
    gallery), recorded for the report, and named in ``batch["skipped"]``."""
    policy = BadSamplePolicy(report_dir=str(tmp_path / "report"), max_skip_rate=0.2)
    ds = VideoTextDataset(entries_with_bad, build_sampler("segment", num_frames=4), ClipTransform(32, "eval"),
                          training=False, backend="pyav", policy=policy, split="val")
    batches = list(DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_samples))
    keys = [k for b in batches for k in b["key"]]
    good = [e.key for i, e in enumerate(entries_with_bad) if i not in (3, 11)]
    assert keys == good  # each good sample once, in order; nothing stands in for the two bad ones
    assert [k for b in batches for k in b["skipped"]] == [entries_with_bad[3].key, entries_with_bad[11].key]
    assert [b["video"].shape[0] for b in batches] == [3, 4, 3, 4, 4]
    records = collect_epoch(policy, 0, ds.tracker.failures, split="val")
    assert {r["index"] for r in records} == {3, 11} and all(r["replacement"] is None for r in records)
    assert all(r["split"] == "val" for r in records)
    check_rate(policy, records, len(keys), scope="in val epoch 0")  # 2 of 20 under 20%
    with pytest.raises(BadSampleError, match=r"2 of 20 samples failed"):
        check_rate(BadSamplePolicy(max_skip_rate=0.05), records, len(keys), scope="in val epoch 0")


def test_collate_leaves_skipped_samples_out(entries_with_bad):
    ds = dataset(entries_with_bad, BadSamplePolicy())
    a, b = ds[0], ds[1]
    bad = ds[3]
    assert isinstance(bad, SkippedSample) and bad.key == entries_with_bad[3].key and "VideoDecodeError" in bad.reason
    batch = collate_samples([a, bad, b])
    assert batch["key"] == [a.key, b.key] and batch["skipped"] == [bad.key]
    assert batch["video"].shape[0] == 2 and batch["caption_index"].tolist() == [0] * len(a.captions) + [1] * len(
        b.captions)
    assert collate_samples([a, b])["skipped"] == []
    empty = collate_samples([bad, ds[11]])  # every sample of the batch was bad: an empty batch, not an error
    assert empty["video"] is None and empty["key"] == [] and empty["captions"] == []
    assert empty["caption_index"].shape == (0,) and empty["label"].shape == (0,) and empty["window"].shape == (0, 2)
    assert empty["skipped"] == [entries_with_bad[3].key, entries_with_bad[11].key]


def test_threshold_error_names_count_and_paths(entries_with_bad, tmp_path):
    policy = BadSamplePolicy(report_dir=str(tmp_path / "r"), max_skip_rate=0.05)
    ds = dataset(entries_with_bad, policy, training=True)
    served = sum(len(b["key"]) for b in DataLoader(ds, batch_size=10, collate_fn=collate_samples))
    records = collect_epoch(policy, 0, ds.tracker.failures)
    with pytest.raises(BadSampleError, match=r"2 of 22 samples failed.*missing\.mp4"):
        check_rate(policy, records, served, scope="in train epoch 0")
    check_rate(BadSamplePolicy(max_skip_rate=0.2), records, served, scope="x")  # 9% is under a 20% threshold


def test_wrong_video_root_fails_fast(corpus, tmp_path):
    entries = build_index("manifest", path=str(corpus / "manifest.csv"), video_root=str(tmp_path / "nowhere")).entries
    with pytest.raises(BadSampleError, match=r"preflight.*nowhere"):
        preflight(entries, BadSamplePolicy())
    ds = dataset(entries, BadSamplePolicy(min_attempts=8, max_retries=3), training=True)
    with pytest.raises(BadSampleError, match="4 samples in a row failed to load"):
        ds[0]
    ds = dataset(entries, BadSamplePolicy(min_attempts=8))  # evaluation skips, and stops at the 8th failure
    with pytest.raises(BadSampleError, match="8 of 8 samples failed to load in one loader process"):
        [ds[i] for i in range(len(ds))]


def test_preflight_passes_on_good_data(corpus):
    preflight(build_index("manifest", path=str(corpus / "manifest.csv")).entries, BadSamplePolicy(), backend="pyav")


def test_worker_guard_stops_a_broken_run(entries_with_bad):
    policy = BadSamplePolicy(max_skip_rate=0.01, min_attempts=5)
    ds = dataset(entries_with_bad, policy)
    with pytest.raises(BadSampleError, match=r"in one loader process"):
        for i in range(len(ds)):
            ds[i]


def test_replacement_is_deterministic_and_different(entries_with_bad):
    ds = dataset(entries_with_bad, BadSamplePolicy())
    for i in range(len(ds)):
        reps = [ds.replacement(i, a) for a in (1, 2, 3)]
        assert all(r != i and 0 <= r < len(ds) for r in reps)
        assert reps == [ds.replacement(i, a) for a in (1, 2, 3)]


def test_decode_time_limit():
    with pytest.raises(DecodeTimeout, match="slow.mp4: decode exceeded 0.2 s"):
        with time_limit(0.2, "slow.mp4"):
            time.sleep(2)
    with time_limit(1.0, "fast.mp4"):
        torch.zeros(1)


def test_timeout_counts_as_bad_sample(entries_with_bad, monkeypatch):
    import vidlang.data.datasets as datasets

    real = datasets.load_clip

    def slow_for_index_5(entry, *a, **kw):
        if entry.key == entries_with_bad[5].key:
            time.sleep(3)
        return real(entry, *a, **kw)

    monkeypatch.setattr(datasets, "load_clip", slow_for_index_5)
    ds = dataset(entries_with_bad, BadSamplePolicy(decode_timeout_s=0.5), training=True)
    sample = ds[5]
    assert sample.key != entries_with_bad[5].key
    assert ds.tracker.failures[0]["index"] == 5 and "DecodeTimeout" in ds.tracker.failures[0]["reason"]
    skipped = dataset(entries_with_bad, BadSamplePolicy(decode_timeout_s=0.5))[5]  # evaluation: skipped
    assert isinstance(skipped, SkippedSample) and "DecodeTimeout" in skipped.reason


def test_ranks_sharing_a_report_dir_collect_their_own_records(tmp_path):
    """Under DDP with a shared report directory each rank collects (and writes) only its own failures: no
    record twice in bad_samples.jsonl, and each rank's rate counts its own failures against its own served."""
    from vidlang.data.badsamples import BadSampleTracker

    policy = BadSamplePolicy(report_dir=str(tmp_path), max_skip_rate=0.3, min_attempts=10**6)
    trackers = [BadSampleTracker(policy, rank, "train") for rank in (0, 1)]
    for i in range(3):
        trackers[1].failure(0, i, f"k{i}", f"/v/{i}.mp4", "VideoDecodeError: x", None)
    trackers[0].failure(0, 9, "k9", "/v/9.mp4", "VideoDecodeError: y", None)
    mine = [collect_epoch(policy, 0, split="train", rank=r, reported=set()) for r in (0, 1)]
    assert [[r["key"] for r in m] for m in mine] == [["k9"], ["k0", "k1", "k2"]]
    lines = (tmp_path / "bad_samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["key"] for x in lines) == ["k0", "k1", "k2", "k9"]  # each once
    check_rate(policy, mine[0], served=5, scope="rank 0")  # 1 of 6: fine; with rank 1's records it would be 4 of 9
    with pytest.raises(BadSampleError, match="3 of 8"):
        check_rate(policy, mine[1], served=5, scope="rank 1")
