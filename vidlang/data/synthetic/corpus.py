"""Encode the synthetic videos (H.264 + AAC in .mp4, PyAV) and write the corpus manifests.

Layout of ``DIR``::

    videos/{page}/{videoid}.mp4     100 videos per page folder ("videos/000", "videos/001", ...)
    manifest.csv, manifest.jsonl    generic manifest (one row per video, ``path`` relative to DIR)
    webvid_{train,val,test}.csv     WebVid-style: videoid, contentUrl, duration, page_dir, name;
                                    page_dir is "videos/NNN", so files are DIR/{page_dir}/{videoid}.mp4
    classes.txt                     one motion class name per line; line i (0-based) = label i
    README.txt                      what all of this is
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from vidlang.data.synthetic.render import render_audio, render_video
from vidlang.data.synthetic.spec import LABEL_NAMES, MOTIONS, SOUNDS, SPLITS, VideoSpec, make_specs
from vidlang.io import atomic_open, atomic_path, atomic_write_text

MANIFEST_COLUMNS = [
    "key", "path", "split", "captions", "label", "label_name", "motion", "shape", "color", "sound",
    "has_audio", "duration", "num_frames", "fps", "width", "height",
]  # fmt: skip
WEBVID_COLUMNS = ["videoid", "contentUrl", "duration", "page_dir", "name"]
VIDEOS_PER_PAGE = 100
AUDIO_FRAME = 1024  # AAC frame size


@dataclass
class CorpusInfo:
    """What :func:`generate_corpus` wrote."""

    out_dir: Path
    num_videos: int
    seed: int
    size: int
    frames: int
    fps: float
    sample_rate: int
    classes: list[str]
    split_counts: dict[str, int]
    seconds: float
    rows: list[dict] = field(repr=False, default_factory=list)

    @property
    def manifest_csv(self) -> Path:
        return self.out_dir / "manifest.csv"

    @property
    def manifest_jsonl(self) -> Path:
        return self.out_dir / "manifest.jsonl"

    def webvid_csv(self, split: str) -> Path:
        return self.out_dir / f"webvid_{split}.csv"


def page_dir(spec: VideoSpec) -> str:
    return f"videos/{spec.index // VIDEOS_PER_PAGE:03d}"


def video_relpath(spec: VideoSpec) -> str:
    return f"{page_dir(spec)}/{spec.key}.mp4"


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def encode_video(spec: VideoSpec, path: str | os.PathLike, frames: np.ndarray | None = None) -> None:
    """Render (unless ``frames`` is given) and write ``spec`` as H.264/yuv420p + AAC mono .mp4.

    x264 runs single-threaded without mb-tree so the bytes are reproducible (same library versions).
    The soundtrack is AAC-encoded once per distinct sound (cached) and re-muxed.
    """
    import av

    frames = render_video(spec) if frames is None else frames  # [T, H, W, 3]
    audio = _encoded_audio(spec.sound, spec.tone_hz, spec.beep_hz, spec.duration, spec.sample_rate, spec.has_audio)
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=_rate(spec.fps))
        vs.width, vs.height, vs.pix_fmt = spec.size, spec.size, "yuv420p"
        gop = max(1, round(spec.fps))
        # threads=1 and mbtree=0: with x264's macroblock-tree (asm paths) the bytes of these tiny
        # frames differed from run to run; without it they are reproducible
        vs.options = {"crf": "16", "preset": "veryfast", "threads": "1", "g": str(gop), "x264-params": "mbtree=0"}
        src = av.open(io.BytesIO(audio)) if audio is not None else None
        try:
            astream = out.add_stream_from_template(src.streams.audio[0]) if src is not None else None
            for k, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = k  # time base 1/fps
                out.mux(vs.encode(frame))
            out.mux(vs.encode())
            if src is not None:
                for packet in src.demux(src.streams.audio[0]):
                    if packet.dts is None:  # demuxer flush packet
                        continue
                    packet.stream = astream
                    out.mux(packet)
        finally:
            if src is not None:
                src.close()


@functools.lru_cache(maxsize=64)
def _encoded_audio(sound: str, tone_hz: float, beep_hz: float, duration: float, sr: int, has: bool) -> bytes | None:
    """The soundtrack as an AAC-in-mp4 byte string (``None`` without audio)."""
    import av

    spec = _AudioOnly(sound=sound, tone_hz=tone_hz, beep_hz=beep_hz, duration=duration, sample_rate=sr, has_audio=has)
    wave = render_audio(spec)  # [S] float32 or None
    if wave is None:
        return None
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=sr)
        stream.layout = "mono"
        for start in range(0, len(wave), AUDIO_FRAME):
            chunk = wave[None, start : start + AUDIO_FRAME]  # [1, <=1024]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sr, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


@dataclass(frozen=True)
class _AudioOnly:
    """The fields of a :class:`VideoSpec` that :func:`render_audio` reads."""

    sound: str
    tone_hz: float
    beep_hz: float
    duration: float
    sample_rate: int
    has_audio: bool


def manifest_row(spec: VideoSpec) -> dict:
    return {
        "key": spec.key,
        "path": video_relpath(spec),
        "split": spec.split,
        "captions": list(spec.captions),
        "label": spec.label,
        "label_name": LABEL_NAMES[spec.motion],
        "motion": spec.motion,
        "shape": spec.primary.shape,
        "color": spec.primary.color,
        "sound": spec.sound,
        "has_audio": spec.has_audio,
        "duration": round(spec.duration, 6),
        "num_frames": spec.frames,
        "fps": spec.fps,
        "width": spec.size,
        "height": spec.size,
    }


def _build_one(job: tuple[VideoSpec, str]) -> dict:
    spec, out_dir = job
    path = Path(out_dir) / video_relpath(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(spec, path)
    return manifest_row(spec)


def iso_duration(seconds: float) -> str:
    """WebVid's duration format, whole seconds: ``PT00H00M03S``."""
    s = max(0, round(seconds))
    return f"PT{s // 3600:02d}H{s % 3600 // 60:02d}M{s % 60:02d}S"


def write_manifests(out_dir: Path, specs: list[VideoSpec]) -> list[dict]:
    """Write manifest.csv/.jsonl, webvid_{split}.csv and classes.txt; returns the manifest rows."""
    rows = [manifest_row(s) for s in specs]
    with atomic_open(out_dir / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with atomic_open(out_dir / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({**row, "captions": json.dumps(row["captions"]), "has_audio": str(row["has_audio"]).lower()})
    for split in SPLITS:
        with atomic_open(out_dir / f"webvid_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(WEBVID_COLUMNS)
            for s in specs:
                if s.split == split:
                    w.writerow([s.key, video_relpath(s), iso_duration(s.duration), page_dir(s), s.captions[0]])
    atomic_write_text(out_dir / "classes.txt", "".join(LABEL_NAMES[m] + "\n" for m in MOTIONS))
    return rows


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``; refuse a non-empty folder that is not a previous corpus, else clear its videos."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "manifest.csv").is_file():
            raise FileExistsError(f"{out_dir}: not empty and not a vidlang synthetic corpus; choose another --out")
        shutil.rmtree(out_dir / "videos", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


TOKENIZER_VOCAB = 512  # matches the ``text_tiny`` preset


def write_tokenizer(out_dir: Path, specs: list) -> None:
    """Train a small BPE tokenizer on the training captions into ``out_dir/tokenizer`` (for from-scratch
    models: the demo and the synthetic configs point their ``tokenizer`` at it)."""
    from vidlang.models.clip.tokenizer import train_tokenizer

    captions = [c for s in specs if s.split == "train" for c in s.captions] or [c for s in specs for c in s.captions]
    train_tokenizer(captions, out_dir / "tokenizer", vocab_size=TOKENIZER_VOCAB, context_length=32)


def generate_corpus(
    out_dir: str | os.PathLike,
    num_videos: int,
    seed: int = 0,
    *,
    size: int = 64,
    frames: int = 24,
    fps: float = 8.0,
    sample_rate: int = 16000,
    workers: int = 2,
    progress: bool = True,
) -> CorpusInfo:
    """Generate the whole corpus in ``out_dir`` (see module docs); deterministic for a seed."""
    from vidlang.progress import progress as tqdm  # a live bar on a terminal, lines in a log

    t0 = time.perf_counter()
    out = Path(out_dir)
    specs = make_specs(num_videos, seed, size=size, frames=frames, fps=fps, sample_rate=sample_rate)
    _prepare_out_dir(out)
    jobs = [(s, str(out)) for s in specs]
    bar = tqdm(total=len(jobs), desc="synth", unit="video", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _build_one(job)
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                for _ in pool.map(_build_one, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                    bar.update()
        except BrokenProcessPool as e:
            raise RuntimeError(
                f"generate_corpus: the {workers} encoding processes died before finishing. They are started with "
                "'spawn', which re-imports the calling script: call generate_corpus under "
                "`if __name__ == '__main__':`, or pass workers=1"
            ) from e
    bar.close()
    rows = write_manifests(out, specs)
    write_tokenizer(out, specs)
    write_readme(out, specs, seed)
    counts = {split: sum(s.split == split for s in specs) for split in SPLITS}
    return CorpusInfo(
        out_dir=out,
        num_videos=num_videos,
        seed=seed,
        size=size,
        frames=frames,
        fps=float(fps),
        sample_rate=sample_rate,
        classes=[LABEL_NAMES[m] for m in MOTIONS],
        split_counts=counts,
        seconds=time.perf_counter() - t0,
        rows=rows,
    )


README = """vidlang synthetic video-text corpus
===================================

Generated by `vidlang synth --out DIR --videos {n} --seed {seed} --size {size} --frames {frames} --fps {fps}`.
The same arguments always produce the same metadata, captions and video bytes.

Each video ({size}x{size} px, {frames} frames at {fps} fps = {duration:.3g} s, H.264 yuv420p in .mp4)
shows one large coloured shape on a plain background ({backgrounds}) doing one motion, sometimes
with a small still second shape in a corner; an AAC mono track ({sr} Hz) plays a sound.

Motions (label = line number in classes.txt, 0-based):
  {motions}.
Order-dependent pairs are exact time reversals of each other (same shape, colour and path, frames
reversed): left/right, up/down, grow/shrink, clockwise/counterclockwise. A model that ignores frame
order cannot tell them apart.
Shapes: {shapes}.
Colours: {colors}.
Sounds: {sounds}. "silence" videos alternate between a real silent AAC track and no audio
stream at all (has_audio = false) so both audio paths get exercised; here {no_audio} videos have no
audio stream.

Files
  videos/NNN/{{videoid}}.mp4   100 videos per folder
  manifest.csv / manifest.jsonl  key, path (relative to this folder), split, captions (5 paraphrases; a JSON
                               list in the CSV), label, label_name, motion, shape, color, sound, has_audio,
                               duration (s), num_frames, fps, width, height
  webvid_{{train,val,test}}.csv  WebVid-2M columns videoid, contentUrl, duration (ISO-8601, whole seconds),
                               page_dir, name (= first caption); the video is at {{page_dir}}/{{videoid}}.mp4
                               relative to this folder (page_dir = "videos/NNN"); contentUrl = the same path
  classes.txt                  class names, one per line
  tokenizer/                   a byte-level BPE tokenizer (vocabulary 512) trained on the training captions

Split: 80/10/10 train/val/test, stratified by motion. Counts: {counts}.
"""


def write_readme(out_dir: Path, specs: list[VideoSpec], seed: int) -> None:
    from vidlang.data.synthetic.render import SHAPE_POLYGONS
    from vidlang.data.synthetic.spec import BACKGROUNDS, COLORS

    s0 = specs[0]
    text = README.format(
        n=len(specs),
        seed=seed,
        size=s0.size,
        frames=s0.frames,
        fps=f"{s0.fps:g}",
        duration=s0.duration,
        backgrounds=", ".join(BACKGROUNDS),
        sr=s0.sample_rate,
        motions=", ".join(MOTIONS),
        shapes=", ".join(["circle", *SHAPE_POLYGONS]),
        colors=", ".join(COLORS),
        sounds=", ".join(SOUNDS),
        no_audio=sum(not s.has_audio for s in specs),
        counts=", ".join(f"{sp} {sum(s.split == sp for s in specs)}" for sp in SPLITS),
    )
    atomic_write_text(out_dir / "README.txt", text)
