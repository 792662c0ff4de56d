"""Transforms: shapes, dtypes, ranges, same crop for every frame, eval determinism, caption-aware flip."""

from __future__ import annotations

import pytest
import torch

from vidlang.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ClipTransform,
    RandomResizedCrop,
    ResizeCenterCrop,
    ThreeCrop,
    flip_captions,
    normalize,
    random_crop_box,
    resize_short_side,
)


def clip(v: int = 1, t: int = 6, h: int = 48, w: int = 64, same_frames: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 1, 3, h, w) if same_frames else (v, t, 3, h, w), generator=g, dtype=torch.uint8)
    return x.expand(v, t, 3, h, w).clone() if same_frames else x


def x_ramp(v: int = 1, t: int = 4, h: int = 48, w: int = 96) -> torch.Tensor:
    """Pixel value grows with x: left crops are darker than right crops."""
    ramp = torch.linspace(0, 255, w).round().to(torch.uint8)
    return ramp.view(1, 1, 1, 1, w).expand(v, t, 3, h, w).clone()


def test_random_resized_crop_shape_dtype_and_shared_box():
    video = clip(v=2, same_frames=True)  # every frame and view identical
    out = RandomResizedCrop(32, scale=(0.2, 0.6))(video, torch.Generator().manual_seed(3))
    assert out.shape == (2, 6, 3, 32, 32) and out.dtype == torch.uint8
    # one crop box for the whole clip: identical inputs stay identical
    assert torch.equal(out, out[:1, :1].expand_as(out))


def test_random_crop_box_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_crop_box(48, 64, (0.3, 0.7), (0.75, 1.33), g)
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        assert 0.25 <= h * w / (48 * 64) <= 0.75
        assert 0.7 <= w / h <= 1.4


def test_train_randomness_is_seeded():
    video = clip()
    t = ClipTransform(32, "train", scale=(0.1, 0.5))
    a, _ = t(video, [], torch.Generator().manual_seed(1))
    b, _ = t(video, [], torch.Generator().manual_seed(1))
    c, _ = t(video, [], torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eval_is_deterministic_and_centered():
    video = x_ramp()
    t = ClipTransform(32, "eval")
    a, _ = t(video, ["x"], torch.Generator().manual_seed(1))
    b, _ = t(video, ["x"], torch.Generator().manual_seed(2))
    assert a.shape == (1, 4, 3, 32, 32) and torch.equal(a, b)
    # resized to 32 x 64 then center-cropped: the crop's mean is the middle of the ramp
    assert abs(a.float().mean().item() - 127.5) < 3


def test_resize_short_side_keeps_aspect():
    assert resize_short_side(clip(h=48, w=64), 24).shape[-2:] == (24, 32)
    assert resize_short_side(clip(h=64, w=48), 24).shape[-2:] == (32, 24)
    assert ResizeCenterCrop(24)(clip(h=64, w=48)).shape[-2:] == (24, 24)


def test_three_crop_views_left_center_right():
    out = ThreeCrop(32)(x_ramp(v=2))  # [2*3, T, C, 32, 32]
    assert out.shape == (6, 4, 3, 32, 32)
    means = out.float().mean(dim=(1, 2, 3, 4))
    assert means[0] < means[1] < means[2] and torch.allclose(means[:3], means[3:])


def test_normalize_range_and_values():
    video = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2).contiguous()  # [C, H, W]
    out = normalize(video)
    assert out.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    assert torch.allclose(out[:, 0, 0], -mean / std)
    assert torch.allclose(out[:, 0, 1], (1 - mean) / std)
    assert normalize(clip(v=2)).shape == (2, 6, 3, 48, 64)
    with pytest.raises(TypeError):
        normalize(video.float())


def test_flip_captions_swaps_direction_words():
    caps = ["A red circle moves left.", "Moves from left to right", "turns clockwise", "LEFT",
            "spins counter-clockwise then anticlockwise", "leftover rights", "drifts rightward"]
    assert flip_captions(caps) == ["A red circle moves right.", "Moves from right to left", "turns counter-clockwise",
                                   "RIGHT", "spins clockwise then clockwise", "leftover rights", "drifts leftward"]
    assert flip_captions(flip_captions(["left and right, clockwise"])) == ["left and right, clockwise"]


def test_flip_is_off_by_default_and_mirrors_with_captions():
    video = x_ramp(w=64)
    caps = ["moves left"]
    plain = ClipTransform(48, "train", scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    assert plain.hflip == 0.0
    a, ca = plain(video, caps, torch.Generator().manual_seed(0))
    flip = ClipTransform(48, "train", scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=1.0)
    b, cb = flip(video, caps, torch.Generator().manual_seed(0))
    assert ca == ["moves left"] and cb == ["moves right"]
    assert torch.equal(b, a.flip(-1))


def test_bad_arguments():
    with pytest.raises(ValueError):
        ClipTransform(32, "sideways")
    with pytest.raises(ValueError):
        RandomResizedCrop(32, scale=(0.8, 0.2))


@pytest.mark.gpu
def test_transforms_run_on_gpu():
    video = clip(v=1).cuda()
    out, _ = ClipTransform(32, "train")(video, [], torch.Generator().manual_seed(0))
    assert out.is_cuda and out.shape == (1, 6, 3, 32, 32)
    assert normalize(out).is_cuda


def test_stack_videos_keeps_channels_last_layout_and_values():
    from vidlang.data.collate import stack_videos

    clips = [torch.randint(0, 256, (1, 4, 5, 6, 3), dtype=torch.uint8).permute(0, 1, 4, 2, 3) for _ in range(3)]
    out, _ = stack_videos(clips)  # decoders hand out [V, T, C, H, W] with C innermost
    assert out.shape == (3, 1, 4, 3, 5, 6) and out.stride(-3) == 1
    assert torch.equal(out, torch.stack(clips))
    plain = [c.contiguous() for c in clips]
    out, _ = stack_videos(plain)
    assert out.is_contiguous() and torch.equal(out, torch.stack(plain))


def test_normalize_returns_contiguous_floats_for_channels_last_input():
    x = torch.randint(0, 256, (2, 4, 5, 6, 3), dtype=torch.uint8).permute(0, 1, 4, 2, 3)  # [B, T, C, H, W], C innermost
    y = normalize(x)
    assert y.is_contiguous() and y.dtype == torch.float32
    assert torch.allclose(y, normalize(x.contiguous()))


def _stack_collate(clips: list[torch.Tensor]) -> torch.Tensor:
    from vidlang.data.collate import stack_videos

    return stack_videos(clips)[0]


def test_stack_videos_writes_into_shared_memory_inside_workers():
    from torch.utils.data import DataLoader

    clips = [torch.full((1, 2, 3, 4, 4), i, dtype=torch.uint8) for i in range(4)]
    (batch,) = list(DataLoader(clips, batch_size=4, num_workers=1, collate_fn=_stack_collate))
    assert batch.is_shared() and torch.equal(batch[:, 0, 0, 0, 0, 0], torch.arange(4, dtype=torch.uint8))
