"""``interleaved_segments``: Prompt Switch's test frame order (two interleaved passes over the video for 12 frames)."""

from __future__ import annotations

import pytest
import torch

from vidlang.data.config import SamplingConfig
from vidlang.data.sampling import InterleavedSegmentSampler, build_sampler


def cfr(num: int, fps: float) -> torch.Tensor:
    return torch.arange(num, dtype=torch.float64) / fps


def test_eval_order_is_two_full_passes():
    """300 frames in 6 segments of 50: pass 0 at 1/3 of each segment, pass 1 at 2/3 (official: 16 and 32 frames
    into a segment; here the frame on screen at those times)."""
    s = build_sampler("interleaved_segments", num_frames=12, segments=6)
    assert isinstance(s, InterleavedSegmentSampler) and s.passes == 2
    idx = s(cfr(300, 30.0), 10.0, training=False)
    assert idx.shape == (1, 12)
    first, second = idx[0, :6], idx[0, 6:]
    assert first.tolist() == [16, 66, 116, 166, 216, 266]
    assert second.tolist() == [33, 83, 133, 183, 233, 283]
    segment = torch.arange(6) * 50
    assert ((first >= segment) & (second < segment + 50) & (first < second)).all()
    assert not (idx.diff(dim=1) >= 0).all()  # not in temporal order: the second pass starts over


def test_one_pass_is_the_segment_sampler():
    ts = cfr(250, 25.0)
    one = build_sampler("interleaved_segments", num_frames=6, segments=6)(ts, 10.0, training=False)
    assert torch.equal(one, build_sampler("segment", num_frames=6)(ts, 10.0, training=False))


def test_training_passes_are_random_and_inside_their_segments():
    s = build_sampler("interleaved_segments", num_frames=18, segments=6)
    ts = cfr(600, 30.0)
    seen = set()
    for seed in range(6):
        idx = s(ts, 20.0, training=True, generator=torch.Generator().manual_seed(seed))[0].view(3, 6)  # [pass, seg]
        assert ((idx >= torch.arange(6) * 100) & (idx < torch.arange(6) * 100 + 100)).all()
        assert not torch.equal(idx[0], idx[1])
        again = s(ts, 20.0, training=True, generator=torch.Generator().manual_seed(seed))[0].view(3, 6)
        assert torch.equal(idx, again)
        seen.add(tuple(idx.flatten().tolist()))
    assert len(seen) == 6


def test_window_and_short_video():
    s = build_sampler("interleaved_segments", num_frames=12, segments=6)
    idx = s(cfr(300, 30.0), 10.0, training=False, window=(4.0, 6.0))
    assert idx.min() >= 120 and idx.max() < 180
    short = s(cfr(3, 30.0), 0.1, training=False)[0]  # 3 frames: frames repeat, each pass in order
    assert short.shape == (12,) and short.max() <= 2
    assert (short[:6].diff() >= 0).all() and (short[6:].diff() >= 0).all()


def test_bad_arguments_and_use_through_the_data_config():
    with pytest.raises(ValueError, match="multiple of segments"):
        build_sampler("interleaved_segments", num_frames=8, segments=6)
    with pytest.raises(ValueError, match="multiple of segments"):
        build_sampler("interleaved_segments", num_frames=6, segments=0)
    cfg = SamplingConfig(num_frames=6, eval_num_frames=12, eval_sampler="interleaved_segments",
                         eval_sampler_args={"segments": 6})
    test_sampler = cfg.build(training=False)
    assert test_sampler.num_frames == 12 and test_sampler.passes == 2
    assert cfg.build(training=True).num_frames == 6
