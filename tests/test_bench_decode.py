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


def test_table_ratios():
    """vidlang rows are divided by the same library raw, raw rows by the fastest raw row of the column."""
    results = {(m, "a sparse"): v for m, v in zip(bench.METHODS, [100.0, 50.0, 80.0, 90.0, 75.0, 80.0], strict=True)}
    rows = {line.split("  ")[0]: line for line in bench.format_table(["a sparse"], results).splitlines()}
    assert "90.0 (0.90x)" in rows["vidlang torchcodec"] and "75.0 (1.50x)" in rows["vidlang pyav"]
    assert "80.0 (1.00x)" in rows["vidlang decord"] and "50.0 (0.50x)" in rows["raw pyav"]


def test_json_results_and_file(tmp_path):
    """``--json``: the same clips/s and ratios as the table, the vidlang cells below 0.95 named, and the arguments,
    load and time of the run beside them."""
    import argparse
    import json

    from vidlang.bench.common import write_json

    results = {(m, "a sparse"): v for m, v in zip(bench.METHODS, [100.0, 50.0, 80.0, 90.0, 75.0, 80.0], strict=True)}
    data = bench.json_results(["a sparse"], results)
    assert data["rows"]["vidlang torchcodec"]["a sparse"] == {"clips_per_s": 90.0, "ratio": 0.9}
    assert data["rows"]["raw pyav"]["a sparse"]["ratio"] == 0.5
    assert data["below_target"] == ["vidlang torchcodec / a sparse"] and data["target"] == 0.95
    args = argparse.Namespace(videos=tmp_path, repeat=5, json=tmp_path / "x.json")
    write_json(args.json, "decode", args, data)
    written = json.loads(args.json.read_text())
    assert written["benchmark"] == "decode" and written["args"] == {"videos": str(tmp_path), "repeat": 5}
    assert written["rows"] == data["rows"] and written["cores"] >= 1 and written["time"].endswith("+00:00")
    write_json(None, "decode", args, data)  # no path: nothing written, no error


def test_measure_cell_takes_the_best_round(clips):
    best = bench.measure_cell({"raw torchcodec": bench.raw_torchcodec}, clips, False, repeat=2, min_time=0.0)
    assert best["raw torchcodec"] > 0
