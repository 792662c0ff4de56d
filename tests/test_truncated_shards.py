"""One truncated shard in a set: both loading modes serve every complete sample and count the cut one.

The set is 3 shards x 3 samples (keys 0..8; members ``{key}.mp4``, ``.txt``, ``.json`` in that
order). Shard ``00001.tar`` (samples 3, 4, 5) is cut at one point per case; the expected served
keys and the expected bad-sample records (key and the member they name) are written out per case.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from vidlang.commands.shards import write_shards
from vidlang.data.badsamples import BadSamplePolicy
from vidlang.data.datasets import VideoTextDataset
from vidlang.data.formats import build_index
from vidlang.data.formats.base import FormatError
from vidlang.data.formats.webdataset import DamagedMember
from vidlang.data.sampling import build_sampler
from vidlang.data.streaming import StreamingVideoDataset, make_streaming_loader
from vidlang.data.transforms import ClipTransform

ALL = [f"{i:09d}" for i in range(9)]
SHARD = "00001.tar"


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    from vidlang.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("trunc")
    generate_corpus(root / "corpus", 9, seed=5, size=32, frames=8, workers=1, progress=False)
    index = build_index("manifest", path=str(root / "corpus" / "manifest.csv"))
    write_shards(index, root / "shards", samples_per_shard=3, progress=False)
    return root / "shards"


def _members(tar: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar) as tf:
        return {m.name: m for m in tf}


def _end(m: tarfile.TarInfo) -> int:
    """Offset just after a member's data and its padding (where the next header starts)."""
    return m.offset_data + -(-m.size // 512) * 512


# case -> (cut offset from the members of the intact shard, served keys of the shard, [(bad key, member named)],
#          samples lost after the cut, each counted too: the shard's _stats.json says it held 3)
CASES = {
    # inside the data of sample 4's video: sample 4 is broken, 3 is complete, 5 is lost
    "in_video_data": (lambda m: m["000000004.mp4"].offset_data + m["000000004.mp4"].size // 2,
                      ["000000003"], [("000000004", "000000004.mp4")], 1),
    # inside the data of sample 4's json (its last member)
    "in_json_data": (lambda m: m["000000004.json"].offset_data + 5, ["000000003"], [("000000004", "000000004.json")],
                     1),
    # inside the header of sample 4's caption: its video is complete but the sample is not
    "in_header_same_sample": (lambda m: m["000000004.txt"].offset + 300, ["000000003"],
                              [("000000004", "000000004.txt")], 1),
    # inside the header of sample 5's video: sample 4 is complete (a new key had started)
    "in_header_next_sample": (lambda m: m["000000005.mp4"].offset + 300, ["000000003", "000000004"],
                              [("000000005", "000000005.mp4")], 0),
    # exactly after sample 4's video member: the sample has no caption/metadata members
    "after_video_member": (lambda m: m["000000004.txt"].offset, ["000000003"], [("000000004", "000000004.mp4")], 1),
    # exactly after a full sample: 3 and 4 served, sample 5 lost
    "after_full_sample": (lambda m: m["000000005.mp4"].offset, ["000000003", "000000004"], [], 1),
    # inside the zero padding after sample 4's json: its data is complete
    "in_padding": (lambda m: _end(m["000000004.json"]) - 100, ["000000003", "000000004"], [], 1),
    # inside the very first header: nothing of the shard is served
    "in_first_header": (lambda m: 200, [], [("000000003", "000000003.mp4")], 2),
}


@pytest.fixture(params=sorted(CASES))
def cut(request, intact, tmp_path):
    offset_of, served, bad, lost = CASES[request.param]
    out = tmp_path / "shards"
    shutil.copytree(intact, out)
    cut_at = offset_of(_members(intact / SHARD))
    with open(out / SHARD, "r+b") as f:
        f.truncate(cut_at)
    expected = ALL[:3] + served + ALL[6:]
    return out, expected, bad + [(None, "lost")] * lost


def _check_records(records: list[dict], bad: list[tuple[str | None, str]]) -> None:
    assert len(records) == len(bad), records
    for rec, (key, member) in zip(records, bad, strict=True):
        if key is not None:
            assert rec["key"] == key
        assert SHARD in rec["path"] and member in rec["path"] + " " + rec["reason"], rec


def _sampler():
    return build_sampler("segment", num_frames=2)


def test_index_mode_serves_complete_samples(cut):
    shards, expected, bad = cut
    index = build_index("webdataset", shards=str(shards))  # the split is not refused
    ds = VideoTextDataset(index.entries, _sampler(), ClipTransform(32, "eval"), training=True, backend="pyav",
                          policy=BadSamplePolicy(max_skip_rate=1.0))
    served = {ds[i].key for i in range(len(ds))}  # a bad entry is replaced by another one in training
    assert served == set(expected)
    assert len(ds) == 9  # every sample of the shard is one entry: nothing vanishes
    _check_records(ds.tracker.failures, bad)
    assert all(r["key"] not in expected for r in ds.tracker.failures)


def test_streaming_mode_serves_complete_samples(cut):
    shards, expected, bad = cut
    ds = StreamingVideoDataset(str(shards), _sampler(), ClipTransform(32, "eval"), training=False, backend="pyav",
                               batch_size=2, policy=BadSamplePolicy(max_skip_rate=1.0))
    keys = [k for b in make_streaming_loader(ds) for k in b["key"]]
    assert keys == expected  # in order, each once, nothing after the cut dropped
    _check_records(ds._tracker().failures, bad)


def test_streaming_records_reach_the_report(cut, tmp_path):
    """With 2 workers: failures of workers go to the per-process report files that the epoch callback collects."""
    from vidlang.data.badsamples import collect_epoch

    shards, expected, bad = cut
    policy = BadSamplePolicy(report_dir=str(tmp_path / "report"), max_skip_rate=1.0)
    ds = StreamingVideoDataset(str(shards), _sampler(), ClipTransform(32, "eval"), training=False, backend="pyav",
                               batch_size=4, num_workers=2, policy=policy, split="val")
    keys = [k for b in make_streaming_loader(ds) for k in b["key"]]
    assert sorted(keys) == expected
    _check_records(collect_epoch(policy, 0, split="val"), bad)


def test_shard_without_end_marker(intact, tmp_path):
    """Cut inside the end-of-archive marker: nothing lost. Cut just before it: lost samples are unknowable
    without the shard's stats, so the cut is counted once; with the stats (3 samples, 3 there) nothing is."""
    out = tmp_path / "shards"
    shutil.copytree(intact, out)
    end = _end(_members(intact / SHARD)["000000005.json"])
    for cut_at, extra_without_stats in [(end + 100, 0), (end, 1)]:
        shutil.copy(intact / SHARD, out / SHARD)
        shutil.copy(intact / "00001_stats.json", out / "00001_stats.json")
        with open(out / SHARD, "r+b") as f:
            f.truncate(cut_at)
        assert [e.key for e in build_index("webdataset", shards=str(out)).entries] == ALL
        os.remove(out / "00001_stats.json")
        entries = build_index("webdataset", shards=str(out)).entries
        damaged = [e for e in entries if isinstance(e.source, DamagedMember)]
        assert [e.key for e in entries if e not in damaged] == ALL and len(damaged) == extra_without_stats
        for e in damaged:
            with pytest.raises(OSError, match=f"{SHARD}.*000000005.json"):
                e.open_source()


def test_not_a_tar_is_still_refused(intact, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(intact, out)
    (out / SHARD).write_bytes(b"this is not a tar archive at all " * 40)
    with pytest.raises(FormatError, match=f"{SHARD}.*not a tar"):
        build_index("webdataset", shards=str(out))
