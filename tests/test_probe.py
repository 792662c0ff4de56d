"""``vidlang probe``: per-file metadata and clip shape; bad files reported, the rest still probed."""

from __future__ import annotations

import json

import pytest

pytest.register_assert_rewrite("videos")
from videos import make_video  # noqa: E402

from vidlang.cli import main  # noqa: E402
from vidlang.commands.probe import uniform_indices  # noqa: E402

pytest_plugins = ["videos"]


def test_uniform_indices():
    assert uniform_indices(24, 8) == [1, 4, 7, 10, 13, 16, 19, 22]
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # short video: frames repeat
    assert uniform_indices(1, 4) == [0, 0, 0, 0]


@pytest.mark.parametrize("backend", ["auto", "pyav", "decord", "torchcodec"])
def test_probe_text(backend, cfr_video, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    rc = main(["probe", str(cfr_video.path), str(bad), str(cfr_video.path), "--frames", "5", "--backend", backend])
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert rc == 1 and len(lines) == 3  # the file after the bad one is still probed
    assert "64x48, 24 frames, 2.000 s, 12.000 fps, no audio" in lines[0] and "(5, 3, 48, 64)" in lines[0]
    assert lines[1].startswith(f"{bad}: ERROR") and "\n" not in lines[1]
    assert lines[2].startswith(f"{cfr_video.path}: 64x48") and "(5, 3, 48, 64)" in lines[2]
    assert "1 of 3 files could not be decoded" in out.err


def test_probe_json(audio_video, tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    assert main(["probe", str(audio_video.path), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["ok"] and rec["backend"] == "torchcodec" and rec["clip_shape"] == [8, 3, 48, 64]
    assert rec["num_frames"] == 20 and rec["has_audio"] and rec["audio_sample_rate"] == 16000
    assert rec["duration"] == pytest.approx(2.0) and rec["decode_s"] > 0
    assert main(["probe", str(missing), str(audio_video.path), "--json", "--backend", "pyav"]) == 1
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert recs[0] == {"file": str(missing), "ok": False, "backend": "pyav", "error": "file not found"}
    assert recs[1]["ok"] and recs[1]["backend"] == "pyav"


def test_probe_vfr(tmp_path, capsys):
    v = make_video(tmp_path / "v.mp4", 4, 8.0, pts=[0.0, 0.1, 0.7, 0.75])
    assert main(["probe", str(v.path), "--json", "--frames", "2"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["num_frames"] == 4 and rec["clip_shape"] == [2, 3, 48, 64]


def test_probe_max_pixels(cfr_video, capsys):
    from vidlang.commands.probe import DEFAULT_MAX_PIXELS
    from vidlang.data.decoding import DEFAULT_MAX_PIXELS as DECODING_DEFAULT

    assert DEFAULT_MAX_PIXELS == DECODING_DEFAULT
    assert main(["probe", str(cfr_video.path), "--max-pixels", "3000"]) == 1
    out = capsys.readouterr()
    assert "ERROR frame size 64x48 (0.0 Mpx) exceeds the pixel limit max_pixels=3000" in out.out
    assert main(["probe", str(cfr_video.path), "--max-pixels", "0", "--json"]) == 0  # 0: no limit
    assert json.loads(capsys.readouterr().out)["ok"]
    assert main(["probe", str(cfr_video.path), "--max-pixels", "-1"]) == 2
    assert "--max-pixels must be >= 0" in capsys.readouterr().err
