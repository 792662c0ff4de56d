"""Inference bundle, the cached video index, and the ``vidlang search`` command (tiny random checkpoint)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from vidlang.cli import main
from vidlang.data.decoding import VideoDecodeError
from vidlang.serve.decoding import ClipDecoder
from vidlang.serve.index import EMBEDDINGS, MANIFEST, VideoIndex, scan_videos
from vidlang.serve.inference import load_bundle
from vidlang.serve.testing import synthetic_videos, tiny_retrieval_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_retrieval_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic_videos(tmp_path_factory.mktemp("corpus"), 8)


@pytest.fixture(scope="module")
def bundle(ckpt):
    return load_bundle(ckpt)


@pytest.fixture
def videos(tmp_path, corpus):
    """A private copy of the 8 videos (tests modify it)."""
    return shutil.copytree(corpus, tmp_path / "videos")


class DecodeCounter:
    """Counts the videos decoded (``ClipDecoder.decode_clip``, the bundle's preprocessing; monkeypatched)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        original = ClipDecoder.decode_clip

        def counting(decoder, source, name=None, *limits):
            self.calls.append(os.path.basename(str(source)))
            return original(decoder, source, name, *limits)

        monkeypatch.setattr(ClipDecoder, "decode_clip", counting)


def test_bundle_embeds_videos_and_texts(bundle, corpus):
    assert bundle.kind == "retrieval" and bundle.num_frames == 4 and bundle.image_size == 32
    paths = [str(corpus / p) for p in scan_videos(corpus)]
    emb = bundle.embed_videos(paths, batch_size=3)  # [8, 32]
    assert emb.shape == (8, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert not torch.allclose(emb[0], emb[1])  # different videos, different embeddings
    one = bundle.embed_video(paths[2])
    assert torch.allclose(one.embeds[0], emb[2], atol=1e-5) and one.tokens is None  # mean block: no tokens
    from_bytes = bundle.embed_videos([open(paths[5], "rb").read()])
    assert torch.allclose(from_bytes[0], emb[5], atol=1e-5)
    text = bundle.embed_texts(["a red square moves left", "a blue circle"])
    assert text.shape == (2, 32) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_bad_video_is_reported_not_zero_filled(bundle, tmp_path, corpus):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        bundle.embed_videos([str(next(iter(corpus.rglob("*.mp4")))), str(bad)])


def test_load_bundle_rejects_non_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_bundle(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    torch.save({"state_dict": {"x.weight": torch.zeros(1)}}, junk)
    with pytest.raises(ValueError, match="neither a RetrievalTask"):
        load_bundle(junk)


def test_index_build_reuse_and_invalidation(bundle, videos, tmp_path, monkeypatch):
    counter = DecodeCounter(monkeypatch)
    cache = tmp_path / "cache"
    first = VideoIndex.build(bundle, videos, cache, batch_size=3, progress=False)
    assert len(first) == 8 and first.stats.embedded == 8 and len(counter.calls) == 8
    manifest = json.loads((cache / MANIFEST).read_text())
    assert (cache / EMBEDDINGS).is_file() and manifest["fingerprint"] == bundle.fingerprint
    assert sorted(manifest["videos"]) == first.paths and all("mtime_ns" in v for v in manifest["videos"].values())
    expected = bundle.embed_videos([str(videos / p) for p in first.paths])
    assert torch.allclose(first.embeddings, expected, atol=1e-5)

    counter.calls.clear()
    again = VideoIndex.build(bundle, videos, cache, progress=False)
    assert counter.calls == [] and again.stats.reused == 8 and again.stats.embedded == 0
    assert torch.equal(again.embeddings, first.embeddings) and again.paths == first.paths

    # change one file (another video's bytes), remove one, add a new one and an undecodable one
    changed, removed, source = first.paths[0], first.paths[1], first.paths[2]
    shutil.copyfile(videos / source, videos / changed)
    st = os.stat(videos / changed)
    os.utime(videos / changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (videos / removed).unlink()
    (videos / "new").mkdir()
    shutil.copyfile(videos / source, videos / "new" / "copy.mkv")
    (videos / "broken.mp4").write_bytes(b"not a video" * 100)
    (videos / "notes.txt").write_text("not a video extension")
    counter.calls.clear()
    third = VideoIndex.build(bundle, videos, cache, progress=False)
    assert sorted(counter.calls) == sorted([os.path.basename(changed), "copy.mkv", "broken.mp4"])
    assert third.stats.reused == 6 and third.stats.embedded == 2 and third.stats.removed == 1
    assert removed not in third.paths and "new/copy.mkv" in third.paths and "broken.mp4" not in third.paths
    assert "broken.mp4" in third.failed and "cannot decode" in third.failed["broken.mp4"]
    row = {p: i for i, p in enumerate(third.paths)}
    src_emb = third.embeddings[row[source]]
    assert torch.allclose(third.embeddings[row[changed]], src_emb, atol=1e-5)  # re-embedded with new content
    assert torch.allclose(third.embeddings[row["new/copy.mkv"]], src_emb, atol=1e-5)

    counter.calls.clear()
    fourth = VideoIndex.build(bundle, videos, cache, progress=False)
    assert counter.calls == [] and fourth.failed == third.failed  # the bad file is not retried until it changes

    monkeypatch.setattr(bundle, "fingerprint", "another-model")
    fifth = VideoIndex.build(bundle, videos, cache, progress=False)  # another model: nothing reusable
    assert fifth.stats.reused == 0 and len(counter.calls) == 9


def test_search_ranks_by_cosine_with_stable_ties():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    index = VideoIndex(root=None, paths=["a.mp4", "b.mp4", "c.mp4", "d.mp4"], embeddings=emb)
    hits = index.search(torch.tensor([2.0, 0.0]), k=3)
    assert [p for p, _ in hits] == ["a.mp4", "c.mp4", "b.mp4"]  # the tie a/c keeps path order
    assert [s for _, s in hits] == pytest.approx([1.0, 1.0, 0.6])
    assert [p for p, _ in index.search(torch.tensor([[0.0, 1.0]]), k=10)] == ["d.mp4", "b.mp4", "a.mp4", "c.mp4"]
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.tensor([1.0, 0.0]), k=0)
    with pytest.raises(ValueError, match="query embeddings"):
        index.search(torch.zeros(3), k=1)


def _results(out: str) -> list[tuple[str, float]]:
    lines = out.split("top ", 1)[1].splitlines()[1:]
    return [(line.split()[2], float(line.split()[1])) for line in lines if line.strip()]


def test_search_command_prints_topk_and_reuses_cache(ckpt, bundle, videos, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cli_cache"
    argv = ["search", "--ckpt", str(ckpt), "--videos", str(videos), "--cache", str(cache), "--topk", "3",
            "--quiet", "a", "red", "square"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "8 embedded" in out and 'top 3 for "a red square"' in out
    results = _results(out)
    index = VideoIndex.build(bundle, videos, tmp_path / "offline", progress=False)
    offline = index.search(bundle.embed_texts(["a red square"])[0], 3)
    assert [p for p, _ in results] == [p for p, _ in offline]
    assert [s for _, s in results] == pytest.approx([s for _, s in offline], abs=1e-4)

    counter = DecodeCounter(monkeypatch)
    assert main(argv) == 0
    out2 = capsys.readouterr().out
    assert counter.calls == [] and "8 cached, 0 embedded" in out2  # no re-decoding on the second run
    assert _results(out2) == results


def test_decode_clip_resizes_while_decoding(bundle, tmp_path, monkeypatch):
    """A large video is resized to the model's input size inside the decoder (memory bounded by the target
    size, not the file's), then center-cropped: the same clip as resizing full-size frames, within interpolation."""
    import subprocess

    import vidlang.data.decoding as decoding
    from vidlang.data.sampling import build_sampler, sample_clip
    from vidlang.data.transforms import ResizeCenterCrop

    src = tmp_path / "big.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=8:duration=1",
                    "-pix_fmt", "yuv420p", str(src)], check=True)
    seen = []
    original = decoding.open_video

    def spy(*args, **kwargs):
        reader = original(*args, **kwargs)
        seen.append(kwargs.get("resize_short_side"))
        return reader

    monkeypatch.setattr(decoding, "open_video", spy)
    clip = bundle.decode_clip(str(src))
    assert seen == [bundle.image_size] and clip.shape == (bundle.num_frames, 3, 32, 32)
    with original(str(src), backend=bundle.backend) as reader:  # full-size frames, resized by the transform
        sampler = build_sampler("segment", num_frames=bundle.num_frames)
        full = ResizeCenterCrop(bundle.image_size)(sample_clip(reader, sampler, training=False)[0])
    assert (clip.float() - full.float()).abs().mean() < 12  # measured 8.6 (swscale vs torch on a 11x downscale)
