"""``vidlang bench loader``: a tiny run prints every row and a ratio computed from them."""

from __future__ import annotations

import json
import re


def test_tiny_loader_benchmark_run(capsys):
    from vidlang.cli import main

    argv = ["bench", "loader", "--videos", "6", "--video-size", "48", "--video-frames", "24", "--video-fps", "8",
            "--workers", "1", "--batch-size", "2", "--size", "32", "--repeat", "2", "--passes", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {m[1].strip(): float(m[2]) for m in re.finditer(r"^(.+?)\s+([\d.]+)(?:\s+[\d.]+)?$", out, re.M)}
    raw, full = rows["raw decoder, 1 processes"], rows["full loader, 1 workers (+transforms, collate)"]
    assert raw > 0 and full > 0
    assert "same loader without transforms (breakdown)" in rows and "same loader, fresh shared memory per batch" in rows
    ratio = float(re.search(r"loader / raw \(1 processes\) = ([\d.]+)", out)[1])
    assert abs(ratio - full / raw) < 0.01


def test_loader_benchmark_reports_the_bare_library(capsys, tmp_path):
    """The bare-library row (torchcodec alone, same indices) and the loader / bare ratio computed from the rows;
    ``--json`` writes the same numbers."""
    from vidlang.cli import main
    from vidlang.data.decoding import resolve_backend

    assert resolve_backend("auto") == "torchcodec"  # a required dependency, first in auto's order
    argv = ["bench", "loader", "--videos", "4", "--video-size", "48", "--video-frames", "24", "--video-fps", "8",
            "--workers", "1", "--batch-size", "2", "--size", "32", "--repeat", "1", "--passes", "1",
            "--skip-breakdown", "--json", str(tmp_path / "out" / "loader.json")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    lib = float(re.search(r"^bare torchcodec, 1 processes \(no vidlang code\)\s+([\d.]+)", out, re.M)[1])
    full = float(re.search(r"^full loader, 1 workers \(\+transforms, collate\)\s+([\d.]+)", out, re.M)[1])
    ratio = float(re.search(r"loader / bare torchcodec \(1 processes\) = ([\d.]+)", out)[1])
    assert lib > 0 and abs(ratio - full / lib) < 0.01
    pipe = float(re.search(r"^bare torchcodec \+ crop, DataLoader, 1 workers\s+([\d.]+)", out, re.M)[1])
    ratio = float(re.search(r"loader / bare torchcodec \+ crop in a DataLoader \(the same work by hand\) = ([\d.]+)",
                            out)[1])
    assert pipe > 0 and abs(ratio - full / pipe) < 0.01
    data = json.loads((tmp_path / "out" / "loader.json").read_text())
    assert data["benchmark"] == "loader" and data["backend"] == "torchcodec" and data["target"] == 0.9
    assert data["args"]["workers"] == 1 and data["args"]["repeat"] == 1 and "json" not in data["args"]
    rows = data["clips_per_s"]
    assert set(rows) == {"raw decoder, 1 process", "raw decoder, one process per worker", "bare library",
                         "bare library + crop, DataLoader", "full loader"}  # fmt: skip
    assert abs(rows["bare library"] - lib) < 0.05 and abs(rows["full loader"] - full) < 0.05
    assert data["loader_over_bare_library"] == rows["full loader"] / rows["bare library"]
    assert data["loader_over_bare_library_and_crop"] == rows["full loader"] / rows["bare library + crop, DataLoader"]
