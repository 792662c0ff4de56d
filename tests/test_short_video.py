"""CLIP4Clip's data options: ``short_video: repeat | mask`` (frame mask -> collated ``video_mask``) and the frame
order per split (``ordinary | reverse | random``), from the sampler to the batch (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_sampling import _FakeReader, cfr

from vidlang.data.collate import collate_samples
from vidlang.data.config import SamplingConfig
from vidlang.data.datamodule import VideoDataModule
from vidlang.data.sample import VideoSample
from vidlang.data.sampling import (
    FpsSampler,
    MultiViewSampler,
    SegmentSampler,
    build_sampler,
    configure_sampler,
    mask_repeats,
    order_frames,
    sample_clip,
    sample_clip_masked,
)
from vidlang.errors import ConfigError


def test_repeat_is_the_default_and_unchanged():
    sampler = build_sampler("segment", num_frames=6)
    assert (sampler.short_video, sampler.frame_order) == ("repeat", "ordinary")
    idx, mask = sampler.sample_indices(cfr(3, 1.0), 3.0, training=False)
    assert mask is None and idx.tolist() == [[0, 0, 1, 1, 2, 2]]  # the module's short-video rule
    assert torch.equal(idx, sampler(cfr(3, 1.0), 3.0, training=False))


def test_mask_keeps_each_frame_once_then_pads():
    sampler = build_sampler("segment", num_frames=6, short_video="mask")
    idx, mask = sampler.sample_indices(cfr(3, 1.0), 3.0, training=False)
    assert idx.tolist() == [[0, 1, 2, 2, 2, 2]] and mask.tolist() == [[True] * 3 + [False] * 3]
    long_idx, long_mask = sampler.sample_indices(cfr(60, 10.0), 6.0, training=False)  # enough frames: no padding
    assert long_mask.all() and torch.equal(long_idx, sampler(cfr(60, 10.0), 6.0, training=False))
    # CLIP4Clip's 1 fps sampling of a 5 s video with 12 slots: 5 real frames, 7 masked (it zero-pads them)
    fps = build_sampler("fps", max_frames=12, fps=1.0, short_video="mask")
    idx, mask = fps.sample_indices(cfr(150, 30.0), 5.0, training=False)
    assert mask.sum().item() == 5 and idx[0, :5].unique().numel() == 5 and (idx[0, 5:] == idx[0, 4]).all()
    # several views: each row on its own
    rows, masks = mask_repeats(torch.tensor([[0, 0, 1, 1], [3, 4, 5, 6]]))
    assert rows.tolist() == [[0, 1, 1, 1], [3, 4, 5, 6]] and masks.sum(1).tolist() == [2, 4]


def test_frame_orders_apply_to_the_real_frames_only():
    idx = torch.tensor([[4, 5, 6, 6, 6], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert order_frames(idx, mask, "ordinary").tolist() == idx.tolist()
    assert order_frames(idx, mask, "reverse").tolist() == [[6, 5, 4, 6, 6], [5, 4, 3, 2, 1]]
    assert order_frames(idx, None, "reverse").tolist() == [[6, 6, 6, 5, 4], [5, 4, 3, 2, 1]]
    g = torch.Generator().manual_seed(0)
    shuffled = order_frames(idx, mask, "random", g)
    assert sorted(shuffled[0, :3].tolist()) == [4, 5, 6] and shuffled[0, 3:].tolist() == [6, 6]
    assert sorted(shuffled[1].tolist()) == [1, 2, 3, 4, 5]
    perms = {tuple(order_frames(idx[1:], None, "random", g)[0].tolist()) for _ in range(20)}
    assert len(perms) > 5  # a new permutation per clip
    with pytest.raises(ValueError, match="frame order"):
        order_frames(idx, mask, "backwards")


def test_sampler_options_reach_the_decoded_clip():
    reader = _FakeReader(3, 1.0)
    sampler = build_sampler("segment", num_frames=5, short_video="mask", frame_order="reverse")
    clip, mask = sample_clip_masked(reader, sampler, training=False)
    assert clip[0, :, 0, 0, 0].tolist() == [2, 1, 0, 2, 2] and mask.tolist() == [[True] * 3 + [False] * 2]
    assert torch.equal(sample_clip(reader, sampler, training=False), clip)
    multi = configure_sampler(MultiViewSampler(SegmentSampler(5), num_views=2), short_video="mask")
    clip, mask = sample_clip_masked(reader, multi, training=False)
    assert clip.shape[:2] == (2, 5) and mask.shape == (2, 5) and mask.sum(1).tolist() == [3, 3]
    assert sample_clip_masked(reader, FpsSampler(4), training=False)[1] is None
    with pytest.raises(ValueError, match="short_video"):
        build_sampler("segment", num_frames=4, short_video="pad")


def test_sampling_config_options_per_split():
    cfg = SamplingConfig(num_frames=4, short_video="mask", frame_order="random", eval_frame_order="reverse")
    train, val = cfg.build(True), cfg.build(False)
    assert (train.short_video, train.frame_order) == ("mask", "random")
    assert (val.short_video, val.frame_order) == ("mask", "reverse")
    plain = SamplingConfig().build(False)
    assert (plain.short_video, plain.frame_order) == ("repeat", "ordinary")
    with pytest.raises(ConfigError, match=r"data\.sampling\.eval_frame_order must be one of .*got 'sideways'"):
        SamplingConfig(eval_frame_order="sideways")
    with pytest.raises(ConfigError, match=r"data\.sampling\.short_video"):
        VideoDataModule(sampling={"short_video": "zeros"})


def _sample(key: str, views: int, t: int, mask: list[list[bool]] | None) -> VideoSample:
    video = torch.zeros(views, t, 3, 2, 2, dtype=torch.uint8)
    return VideoSample(video, key, [key], frame_mask=None if mask is None else torch.tensor(mask))


def test_collate_carries_video_mask():
    a = _sample("a", 1, 4, [[True, True, False, False]])
    b = _sample("b", 1, 4, None)
    batch = collate_samples([a, b])
    assert batch["video_mask"].dtype == torch.bool
    assert batch["video_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert "video_mask" not in collate_samples([b, b])  # repeat mode: no mask, as before
    # three spatial crops of one sampled view share its mask; several views keep [B, V, T]
    crops = _sample("c", 3, 4, [[True, False, False, False]])
    assert crops.frame_mask.shape == (3, 4) and crops.frame_mask.sum().item() == 3
    multi = collate_samples([crops, _sample("d", 3, 4, None)])
    assert multi["video"].shape[:3] == (2, 3, 4) and multi["video_mask"].shape == (2, 3, 4)
    with pytest.raises(ValueError, match="frame_mask"):
        _sample("e", 2, 4, [[True] * 3])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from vidlang.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("short")
    generate_corpus(out, 4, seed=5, size=32, frames=8, workers=1, progress=False)  # 8-frame videos
    return out


def _module(corpus: Path, **sampling) -> VideoDataModule:
    manifest = {"format": "manifest", "path": str(corpus / "manifest.csv")}
    return VideoDataModule(
        train=manifest, val=manifest, sampling={"num_frames": 12, **sampling}, transform={"image_size": 32},
        loader={"batch_size": 4, "num_workers": 0, "pin_memory": False}, decode={"backend": "pyav"},
    )


def test_datamodule_masks_short_clips_and_orders_frames(corpus):
    masked = _module(corpus, short_video="mask", eval_frame_order="reverse")
    masked.setup("fit")
    train = next(iter(masked.train_dataloader()))
    assert train["video_mask"].shape == (4, 12) and train["video_mask"].sum(1).tolist() == [8] * 4
    plain = _module(corpus, short_video="mask")
    plain.setup("validate")
    masked.setup("validate")
    fwd, rev = next(iter(plain.val_dataloader())), next(iter(masked.val_dataloader()))
    assert torch.equal(fwd["video_mask"], rev["video_mask"])
    assert torch.equal(rev["video"][:, :8], fwd["video"][:, :8].flip(1))  # reversed real frames, padding kept
    assert torch.equal(rev["video"][:, 8:], fwd["video"][:, 8:])
    repeat = _module(corpus)
    repeat.setup("validate")
    assert "video_mask" not in next(iter(repeat.val_dataloader()))
