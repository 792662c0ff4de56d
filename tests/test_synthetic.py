"""The synthetic corpus: determinism, exact reverse pairs, real H.264/AAC files, manifests and split."""

from __future__ import annotations

import csv
import dataclasses
import filecmp
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from vidlang.data.synthetic import (
    COLORS,
    MANIFEST_COLUMNS,
    MOTIONS,
    REVERSE_PAIRS,
    SOUNDS,
    WEBVID_COLUMNS,
    ShapeSpec,
    encode_video,
    generate_corpus,
    iso_duration,
    make_specs,
    render_audio,
    render_video,
    shape_mask,
)
from vidlang.data.synthetic.captions import MOTION_PHRASES, SOUND_CLAUSES, SOUND_SENTENCES

N_VIDEOS = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("synth") / "a", N_VIDEOS, seed=7, workers=2, progress=False)


def decode_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # [T, H, W, 3]


def decode_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])  # [S]


def spec_for(motion: str, seed: int = 0):
    return next(s for s in make_specs(64, seed, frames=16) if s.motion == motion)


# ---------------------------------------------------------------- specs, captions, rendering


def test_specs_deterministic_and_seed_dependent():
    a, b, c = make_specs(40, 3), make_specs(40, 3), make_specs(40, 4)
    assert a == b
    assert a != c and [s.captions for s in a] != [s.captions for s in c]
    assert all(np.array_equal(render_video(x), render_video(y)) for x, y in zip(a[:5], b[:5], strict=True))


def test_motions_and_sounds_balanced():
    specs = make_specs(90, 0)
    counts = {m: sum(s.motion == m for s in specs) for m in MOTIONS}
    assert set(counts.values()) == {10}
    sounds = {snd: sum(s.sound == snd for s in specs) for snd in SOUNDS}
    assert max(sounds.values()) - min(sounds.values()) <= 1
    silent = [s for s in specs if s.sound == "silence"]
    assert any(not s.has_audio for s in silent) and any(s.has_audio for s in silent)
    assert all(s.has_audio for s in specs if s.sound != "silence")


def test_captions_mention_shape_colour_motion_sound():
    for spec in make_specs(36, 1):
        assert len(spec.captions) >= 4 and len(set(spec.captions)) == len(spec.captions)
        sound_phrases = SOUND_CLAUSES[spec.sound] + SOUND_SENTENCES[spec.sound]
        for cap in spec.captions:
            low = cap.lower()
            assert f"{spec.primary.color} {spec.primary.shape}" in low, cap
            assert any(p in low for p in MOTION_PHRASES[spec.motion]), cap
            assert any(p in low for p in sound_phrases), cap
            assert not re.search(r"\ba [aeiou]", low), cap  # "an orange ..."


@pytest.mark.parametrize("motion", [m for m in MOTIONS if m in REVERSE_PAIRS])
def test_reverse_pairs_are_exact_frame_reversals(motion):
    spec = spec_for(motion)
    twin = dataclasses.replace(spec, motion=REVERSE_PAIRS[motion])
    fwd, rev = render_video(spec), render_video(twin)
    assert fwd.shape == (16, 64, 64, 3) and fwd.dtype == np.uint8
    assert np.array_equal(fwd, rev[::-1])
    assert not np.array_equal(fwd, rev)  # the pair really differs in order
    assert not np.array_equal(fwd[0], fwd[-1])  # and the shape really moves


def test_static_has_identical_frames():
    frames = render_video(spec_for("static"))
    assert (frames == frames[:1]).all()
    assert len(np.unique(frames.reshape(-1, 3), axis=0)) >= 2  # a shape on a background, not a blank frame


def _centroid_and_area(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = (frames != frames[:, :1, :1]).any(-1)  # pixels that differ from the corner background
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    area = mask.sum((1, 2))
    return (mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area, area


@pytest.mark.parametrize(
    "motion,check",
    [("right", "x+"), ("left", "x-"), ("down", "y+"), ("up", "y-"), ("grow", "a+"), ("shrink", "a-")],
)
def test_motion_direction_and_span(motion, check):
    spec = dataclasses.replace(spec_for(motion), distractor=None)
    x, y, area = _centroid_and_area(render_video(spec))
    series = {"x": x, "y": y, "a": area}[check[0]]
    diffs = np.diff(series)
    assert (diffs > 0).all() if check[1] == "+" else (diffs < 0).all(), series
    if check[0] in "xy":
        assert abs(series[-1] - series[0]) >= 0.4 * spec.size  # a large motion
    else:
        assert max(area[0], area[-1]) >= 4 * min(area[0], area[-1])
    if check[0] in "xy":  # a big shape: at least a quarter of the frame across
        assert spec.primary.size >= 0.25 and area.min() >= (0.25 * spec.size) ** 2 / 2


def test_rotation_is_clockwise_on_screen():
    tri = ShapeSpec("triangle", "red", 0.5, 0.5, 0.8, angle=0.0)  # apex points right at angle 0
    right, below, above = (52, 32), (32, 52), (32, 11)  # (x, y) pixels ~20 px right / below / above centre
    m0 = shape_mask(tri, 64, 64)
    m90 = shape_mask(dataclasses.replace(tri, angle=90.0), 64, 64)
    assert m0[right[1], right[0]] and m90[below[1], below[0]] and not m90[above[1], above[0]]
    spec = spec_for("clockwise")
    assert spec.primary.shape in {"triangle", "rectangle", "arrow"}  # rotation is visible
    assert spec.end - spec.start >= 90


def test_audio_signals():
    base = spec_for("static")
    sr = base.sample_rate
    for sound in SOUNDS:
        spec = dataclasses.replace(base, sound=sound, tone_hz=880.0 if sound != "silence" else 0.0, has_audio=True)
        wave = render_audio(spec)
        assert wave.dtype == np.float32 and wave.shape == (round(spec.duration * sr),)
        if sound == "silence":
            assert not wave.any()
            continue
        spectrum = np.abs(np.fft.rfft(wave))
        assert np.fft.rfftfreq(len(wave), 1 / sr)[spectrum.argmax()] == pytest.approx(880.0, abs=2)
    assert render_audio(dataclasses.replace(base, sound="silence", has_audio=False)) is None


# ---------------------------------------------------------------- the encoded corpus


def test_corpus_files_decode(corpus):
    for row in corpus.rows:
        path = corpus.out_dir / row["path"]
        with av.open(str(path)) as c:
            (video,) = c.streams.video
            assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
            assert (video.codec_context.width, video.codec_context.height) == (row["width"], row["height"])
            audio = c.streams.audio
            assert len(audio) == int(row["has_audio"])
            if row["has_audio"]:
                assert audio[0].codec_context.name == "aac" and audio[0].codec_context.sample_rate == 16000
                assert audio[0].codec_context.channels == 1
        assert len(decode_video(path)) == row["num_frames"] == 24
    assert any(not r["has_audio"] for r in corpus.rows)


def test_decoded_frames_match_rendering(corpus):
    specs = make_specs(N_VIDEOS, 7)
    for spec in specs[:6]:
        decoded = decode_video(corpus.out_dir / corpus.rows[spec.index]["path"]).astype(np.float32)
        err = np.abs(decoded - render_video(spec).astype(np.float32))
        assert err.mean() < 4.0, (spec.key, err.mean())  # crf 16; chroma subsampling blurs edges only


def test_decoded_audio_matches_sound(corpus):
    for row in corpus.rows:
        if not row["has_audio"]:
            continue
        wave = decode_audio(corpus.out_dir / row["path"])
        assert abs(len(wave) - row["duration"] * 16000) <= 1024 + 64
        rms = float(np.sqrt(np.mean(wave**2)))
        if row["sound"] == "silence":
            assert rms < 1e-3
            continue
        assert rms > 0.05
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(len(wave), 1 / 16000)[spectrum.argmax()]
        assert (peak < 400) if row["sound"] == "low" else (peak > 1200 if row["sound"] == "high" else 600 < peak < 1200)


def test_reverse_pair_after_decoding(tmp_path):
    spec = spec_for("right")
    twin = dataclasses.replace(spec, motion="left")
    encode_video(spec, tmp_path / "r.mp4")
    encode_video(twin, tmp_path / "l.mp4")
    right, left = decode_video(tmp_path / "r.mp4").astype(np.float32), decode_video(tmp_path / "l.mp4")
    assert np.abs(right - left[::-1]).mean() < 2.0
    assert np.abs(right - left).mean() > 5.0  # in the same order they clearly differ


def test_determinism_bytes_and_manifests(corpus, tmp_path):
    again = generate_corpus(tmp_path / "b", N_VIDEOS, seed=7, workers=1, progress=False)
    names = ["manifest.csv", "manifest.jsonl", "classes.txt", "webvid_train.csv", "webvid_val.csv"]
    names.append("tokenizer/tokenizer.json")
    for name in names:
        assert (corpus.out_dir / name).read_bytes() == (again.out_dir / name).read_bytes(), name
    for row in corpus.rows:
        assert filecmp.cmp(corpus.out_dir / row["path"], again.out_dir / row["path"], shallow=False), row["path"]


def test_different_seed_gives_different_corpus(corpus, tmp_path):
    other = generate_corpus(tmp_path / "c", 4, seed=8, workers=1, progress=False)
    assert [r["captions"] for r in other.rows] != [r["captions"] for r in corpus.rows[:4]]
    a, b = corpus.out_dir / corpus.rows[0]["path"], other.out_dir / other.rows[0]["path"]
    assert a.read_bytes() != b.read_bytes()


def test_manifest_columns(corpus):
    with open(corpus.manifest_csv, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == MANIFEST_COLUMNS
        csv_rows = list(reader)
    jsonl = [json.loads(line) for line in corpus.manifest_jsonl.read_text().splitlines()]
    assert len(csv_rows) == len(jsonl) == N_VIDEOS
    for c, j in zip(csv_rows, jsonl, strict=True):
        assert list(j) == MANIFEST_COLUMNS
        assert json.loads(c["captions"]) == j["captions"] and len(j["captions"]) >= 4
        assert c["has_audio"] == str(j["has_audio"]).lower() and int(c["label"]) == j["label"]
        assert MOTIONS[j["label"]] == j["motion"] and j["color"] in COLORS
        assert (corpus.out_dir / j["path"]).is_file()
    classes = (corpus.out_dir / "classes.txt").read_text().splitlines()
    assert classes == corpus.classes and len(classes) == len(MOTIONS)
    assert all(classes[j["label"]] == j["label_name"] for j in jsonl)
    assert "webvid" in (corpus.out_dir / "README.txt").read_text().lower()


def test_webvid_csvs_resolve_and_split_disjoint(corpus):
    keys_by_split = {}
    rows = {r["key"]: r for r in corpus.rows}
    for split in ("train", "val", "test"):
        with open(corpus.webvid_csv(split), newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == WEBVID_COLUMNS
            entries = list(reader)
        for e in entries:
            assert (corpus.out_dir / e["page_dir"] / f"{e['videoid']}.mp4").is_file()
            assert re.fullmatch(r"PT\d\dH\d\dM\d\dS", e["duration"]) and e["duration"] == "PT00H00M03S"
            assert e["name"] in rows[e["videoid"]]["captions"] and rows[e["videoid"]]["split"] == split
            assert str(int(e["videoid"])) == e["videoid"]  # numeric ids survive pandas' int parsing
        keys_by_split[split] = {e["videoid"] for e in entries}
    tr, va, te = keys_by_split.values()
    assert not (tr & va or tr & te or va & te) and tr | va | te == set(rows)
    assert corpus.split_counts == {"train": len(tr), "val": len(va), "test": len(te)} and len(va) >= 1 <= len(te)


def test_split_stratified_by_motion():
    specs = make_specs(512, 0)
    counts = {sp: sum(s.split == sp for s in specs) for sp in ("train", "val", "test")}
    assert counts == {"train": 410, "val": 51, "test": 51}
    for motion in MOTIONS:
        group = [s for s in specs if s.motion == motion]
        for split in ("val", "test"):
            n = sum(s.split == split for s in group)
            assert len(group) // 10 <= n <= -(-len(group) // 10), (motion, split, n)


def test_iso_duration():
    assert iso_duration(3.0) == "PT00H00M03S" and iso_duration(3725.4) == "PT01H02M05S"


def test_small_corpus_is_fast(corpus):
    assert corpus.seconds < 30.0, f"32 videos took {corpus.seconds:.1f} s"  # ~1-3 s on 2 idle cores


def test_cli_synth(tmp_path, capsys):
    from vidlang.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--videos", "6", "--seed", "1", "--workers", "1", "--quiet"]) == 0
    assert "wrote 6 videos" in capsys.readouterr().out
    assert len(list(out.glob("videos/*/*.mp4"))) == 6
    # re-running replaces the previous corpus; a foreign non-empty folder is refused
    assert main(["synth", "--out", str(out), "--videos", "3", "--seed", "1", "--workers", "1", "--quiet"]) == 0
    assert len(list(out.glob("videos/*/*.mp4"))) == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a vidlang synthetic corpus"):
        main(["synth", "--out", str(foreign), "--videos", "2", "--workers", "1", "--quiet"])
    assert (foreign / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs,match", [({"size": 63}, "even"), ({"frames": 1}, "frames"), ({"fps": 0}, "fps")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_specs(4, 0, **kwargs)


# ---------------------------------------------------------------- with vidlang's decoding backends


def _backends() -> list[str]:
    from vidlang.data.decoding import available_backends

    return available_backends()


@pytest.mark.parametrize("backend", _backends())
def test_backends_read_corpus_and_sample(corpus, backend):
    import torch

    from vidlang.data.decoding import open_video
    from vidlang.data.sampling import build_sampler, sample_clip

    for row in corpus.rows[:4]:
        path = corpus.out_dir / row["path"]
        with open_video(path, backend) as reader:
            meta = reader.metadata
            assert (meta.num_frames, meta.width, meta.height, meta.has_audio) == (24, 64, 64, row["has_audio"])
            assert meta.fps == pytest.approx(8.0) and meta.duration == pytest.approx(3.0)
            ts = reader.frame_timestamps()
            assert torch.allclose(ts, torch.arange(24, dtype=torch.float64) / 8, atol=1e-6)
            sampler = build_sampler("multiview", sampler="segment", num_views=2, num_frames=6)
            clip = sample_clip(reader, sampler, training=False)  # [V, T, C, H, W]
            idx = sampler(ts, meta.duration, training=False)
            assert clip.shape == (2, 6, 3, 64, 64)
            ref = torch.from_numpy(decode_video(path)).permute(0, 3, 1, 2)  # [T, C, H, W]
            assert (clip.reshape(12, 3, 64, 64).int() - ref[idx.flatten()].int()).abs().float().mean() < 1.0


def test_corpus_ships_a_tokenizer_for_its_captions(corpus):
    from vidlang.models.clip.tokenizer import ClipTokenizer

    tok = ClipTokenizer.from_dir(corpus.out_dir / "tokenizer")
    assert tok.vocab_size <= 512
    caption = corpus.rows[0]["captions"]
    caption = json.loads(caption)[0] if isinstance(caption, str) else caption[0]
    ids, mask = tok([caption], 32)
    assert ids[0, 0] == tok.bos_id and ids[0, int(mask[0].sum()) - 1] == tok.eot_id
    assert tok.decode(ids[0, 1 : int(mask[0].sum()) - 1].tolist()).strip().lower() == caption.lower()


def test_parallel_generation_from_an_unguarded_script_fails_with_a_clear_error(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "make.py"  # no `if __name__ == "__main__":` guard: spawned workers re-run it
    script.write_text(f"from vidlang.data.synthetic import generate_corpus\n"
                      f"generate_corpus({str(tmp_path / 'c')!r}, 4, size=32, frames=8, workers=2, progress=False)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "if __name__ == '__main__':" in run.stderr and "workers=1" in run.stderr
