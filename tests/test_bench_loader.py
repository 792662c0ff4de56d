"""``vidlang bench loader``: a tiny run prints every row and a ratio computed from them."""

from __future__ import annotations

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
