"""``vidlang bench decode``: every backend raw and through vidlang on the same clips, and its two ratios."""

from __future__ import annotations

import numpy as np
import pytest

from vidlang.bench import decode as bench


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_decode")
    return [bench.write_h264(root / f"c{i}.mp4", 1.0, 12.8, 64, 48, seed=i) for i in range(2)]


@pytest.mark.parametrize("full", [False, True])
def test_every_method_decodes_the_same_number_of_frames(clips, full):
    """Raw rows and vidlang rows do the same job: the same clip, the same frames, returned as one array."""
    for clip in clips:
        counts = {name: fn(clip, full) for name, fn in bench.METHODS.items()}
        assert set(counts.values()) == {12 if full else bench.SPARSE_FRAMES}, counts


def test_raw_pyav_returns_the_frames_it_decodes(clips, monkeypatch):
    """The raw PyAV row stacks its RGB frames (the job vidlang's reader does), it does not drop them."""
    stacked = []
    real_stack = np.stack
    monkeypatch.setattr(np, "stack", lambda arrays, *a, **k: stacked.append(real_stack(arrays, *a, **k)) or stacked[-1])
    assert bench.raw_pyav(clips[0], True) == 12
    assert stacked and stacked[-1].shape == (12, 48, 64, 3) and stacked[-1].dtype == np.uint8


def test_table_best_and_paired_ratios():
    """The main table divides best passes; the paired block takes the median of the per-round ratios."""
    columns = ["a sparse"]
    rounds = {"raw torchcodec": [100.0, 80.0, 90.0], "vidlang torchcodec": [90.0, 84.0, 81.0]}
    results = {(m, "a sparse"): rounds.get(m, [50.0, 50.0, 50.0]) for m in bench.METHODS}
    text = bench.format_table(columns, results)
    row = next(line for line in text.splitlines() if line.startswith("vidlang torchcodec"))
    assert "90.0 (0.90x)" in row  # best 90 / best 100
    paired = [line for line in text.splitlines() if line.startswith("vidlang torchcodec")][1]
    assert paired.split()[-1] == "0.90x"  # median of 0.90, 1.05, 0.90
    assert bench.paired_ratio("vidlang torchcodec", "a sparse", results) == pytest.approx(0.9)
    assert bench.paired_ratio("vidlang decord", "a sparse", results) == pytest.approx(1.0)


def test_measure_cell_keeps_every_round(clips):
    rates = bench.measure_cell({"raw torchcodec": bench.raw_torchcodec}, clips, False, repeat=3, min_time=0.0)
    assert len(rates["raw torchcodec"]) == 3 and all(r > 0 for r in rates["raw torchcodec"])
