"""Frame samplers: counts, ordering, bounds, determinism, randomness, VFR and the short-video rule."""

from __future__ import annotations

import pytest
import torch

from vidlang.data.sampling import (
    SAMPLERS,
    DenseSampler,
    FpsSampler,
    FrameSampler,
    MultiViewSampler,
    SegmentSampler,
    build_sampler,
    sample_clip,
    times_to_indices,
    video_span,
)


def cfr(num: int, fps: float) -> torch.Tensor:
    return torch.arange(num, dtype=torch.float64) / fps


SAMPLER_CONFIGS = {
    "segment": dict(num_frames=8),
    "dense": dict(num_frames=8, stride_s=0.25),
    "dense_frames": dict(num_frames=8, frame_stride=2),
    "fps": dict(max_frames=8, fps=1.0),
    "multiview": dict(sampler="segment", num_views=3, num_frames=8),
    "multiview_dense": dict(sampler="dense", num_views=3, num_frames=8, frame_stride=2),
}


def make(cfg_name: str) -> FrameSampler:
    cfg = dict(SAMPLER_CONFIGS[cfg_name])
    name = cfg_name.split("_")[0]
    return build_sampler(name, **cfg)


def test_registry_lists_all_samplers():
    assert {"segment", "dense", "fps", "multiview"} <= set(SAMPLERS.names())
    assert isinstance(build_sampler("segment", num_frames=4), SegmentSampler)
    with pytest.raises(KeyError, match="unknown frame sampler"):
        build_sampler("nope", num_frames=4)


@pytest.mark.parametrize("cfg", list(SAMPLER_CONFIGS))
@pytest.mark.parametrize("training", [False, True])
def test_shape_order_bounds(cfg, training):
    ts, dur = cfr(300, 30.0), 10.0  # 10 s at 30 fps
    s = make(cfg)
    idx = s(ts, dur, training=training, generator=torch.Generator().manual_seed(0))
    views = 3 if cfg.startswith("multiview") and not training else 1
    assert idx.dtype == torch.long and idx.shape == (views, 8)
    assert (idx.diff(dim=1) >= 0).all()
    assert idx.min() >= 0 and idx.max() < 300


@pytest.mark.parametrize("cfg", list(SAMPLER_CONFIGS))
@pytest.mark.parametrize("training", [False, True])
def test_window_bounds(cfg, training):
    ts, dur = cfr(300, 30.0), 10.0
    s = make(cfg)
    for seed in range(5):
        idx = s(ts, dur, training=training, generator=torch.Generator().manual_seed(seed), window=(4.0, 6.5))
        # frames on screen during [4.0, 6.5): indices 120 .. 194
        assert idx.min() >= 120 and idx.max() <= 194, idx
        assert (idx.diff(dim=1) >= 0).all()


@pytest.mark.parametrize("cfg", list(SAMPLER_CONFIGS))
def test_eval_is_deterministic(cfg):
    ts, dur = cfr(250, 25.0), 10.0
    s = make(cfg)
    a = s(ts, dur, training=False, generator=torch.Generator().manual_seed(1))
    b = s(ts, dur, training=False, generator=torch.Generator().manual_seed(2))
    c = s(ts, dur, training=False)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("cfg", list(SAMPLER_CONFIGS))
def test_training_is_random_but_seeded(cfg):
    ts, dur = cfr(600, 30.0), 20.0
    s = make(cfg)
    draws = [s(ts, dur, training=True, generator=torch.Generator().manual_seed(k)) for k in range(6)]
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1, "training sampling never varies"
    again = s(ts, dur, training=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, draws[3])


def test_segment_eval_takes_segment_middles():
    idx = SegmentSampler(4)(cfr(80, 8.0), 10.0, training=False)  # segments of 2.5 s, middles 1.25, 3.75, ...
    assert idx.tolist() == [[10, 30, 50, 70]]


def test_segment_training_stays_in_its_segment():
    s, ts = SegmentSampler(5), cfr(100, 10.0)  # 10 s -> 2 s segments of 20 frames
    for seed in range(20):
        idx = s(ts, 10.0, training=True, generator=torch.Generator().manual_seed(seed))[0]
        assert all(20 * k <= int(i) < 20 * (k + 1) for k, i in enumerate(idx))


def test_dense_stride_and_centring():
    ts = cfr(300, 30.0)  # 10 s
    idx = DenseSampler(8, frame_stride=4)(ts, 10.0, training=False)[0]
    assert idx.diff().tolist() == [4] * 7
    assert abs((int(idx[0]) + int(idx[-1])) / 2 - 150) <= 4  # centred
    idx = DenseSampler(8, stride_s=0.5)(ts, 10.0, training=False)[0]
    assert idx.diff().tolist() == [15] * 7
    with pytest.raises(ValueError, match="exactly one"):
        DenseSampler(8)
    with pytest.raises(ValueError, match="exactly one"):
        DenseSampler(8, stride_s=1.0, frame_stride=2)


def test_dense_training_start_varies_but_stride_fixed():
    s, ts = DenseSampler(4, frame_stride=3), cfr(300, 30.0)
    starts = set()
    for seed in range(10):
        idx = s(ts, 10.0, training=True, generator=torch.Generator().manual_seed(seed))[0]
        assert idx.diff().tolist() == [3, 3, 3]
        starts.add(int(idx[0]))
    assert len(starts) > 5


def test_fps_sampler_one_per_second_and_cap():
    ts = cfr(250, 25.0)  # 10 s
    idx = FpsSampler(max_frames=10, fps=1.0)(ts, 10.0, training=False)[0]
    assert idx.tolist() == [12 + 25 * k for k in range(10)]  # middle of each second
    idx = FpsSampler(max_frames=5, fps=1.0)(ts, 10.0, training=False)[0]  # 10 times -> evenly subsampled to 5
    assert len(set(idx.tolist())) == 5 and idx[0] == 12 and idx[-1] == 237


def test_fps_sampler_num_frames_alias():
    assert FpsSampler(num_frames=6).max_frames == 6 and FpsSampler().max_frames == 12
    assert build_sampler("multiview", sampler="fps", num_views=2, num_frames=5).num_frames == 5
    with pytest.raises(ValueError, match="alias"):
        FpsSampler(max_frames=4, num_frames=5)


def test_fps_sampler_short_video_repeats_evenly():
    ts = cfr(75, 25.0)  # 3 s -> 3 distinct times at 1 fps
    idx = FpsSampler(max_frames=6, fps=1.0)(ts, 3.0, training=False)[0]
    assert idx.tolist() == [12, 12, 37, 37, 62, 62]


@pytest.mark.parametrize("cfg", list(SAMPLER_CONFIGS))
def test_short_video_rule(cfg):
    """3 frames, 8 asked: T stays 8, only real frames appear, in order (eval: each of the 3 at least once)."""
    ts, dur = cfr(3, 30.0), 0.1
    s = make(cfg)
    for training in (False, True):
        idx = s(ts, dur, training=training, generator=torch.Generator().manual_seed(0))
        assert idx.shape[-1] == 8
        assert (idx.diff(dim=1) >= 0).all() and idx.min() >= 0 and idx.max() <= 2
        if not training:  # fps: 0.1 s at 1 frame/s holds one distinct time
            assert set(idx[0].tolist()) == ({1} if cfg == "fps" else {0, 1, 2})


def test_short_video_rule_exact():
    assert SegmentSampler(6)(cfr(3, 30.0), 0.1, training=False).tolist() == [[0, 0, 1, 1, 2, 2]]
    assert DenseSampler(6, frame_stride=2)(cfr(3, 30.0), 0.1, training=False).tolist() == [[0, 0, 1, 1, 2, 2]]
    one = SegmentSampler(4)(torch.zeros(1, dtype=torch.float64), 0.04, training=False)
    assert one.tolist() == [[0, 0, 0, 0]]


def test_short_window_repeats_nearest_frames():
    ts = cfr(100, 10.0)
    idx = SegmentSampler(8)(ts, 10.0, training=False, window=(2.0, 2.3))  # window shows frames 20, 21, 22
    assert idx.tolist() == [[20, 20, 20, 21, 21, 22, 22, 22]]


def test_vfr_timestamps_map_to_frame_on_screen():
    # irregular pts: a burst of fast frames, then slow ones (variable frame rate)
    ts = torch.tensor([0.0, 0.1, 0.15, 0.2, 0.25, 1.0, 2.5, 2.6, 3.6], dtype=torch.float64)
    times = torch.tensor([0.0, 0.12, 0.2, 0.99, 1.0, 2.0, 2.55, 3.0, 4.5])
    assert times_to_indices(ts, times).tolist() == [0, 1, 3, 4, 5, 5, 6, 7, 8]
    idx = SegmentSampler(5)(ts, 5.0, training=False)  # middles 0.5, 1.5, 2.5, 3.5, 4.5
    assert idx.tolist() == [[4, 5, 6, 7, 8]]
    # time-uniform, not index-uniform: a CFR assumption would have picked [0, 2, 4, 6, 8]-ish indices
    idx = FpsSampler(max_frames=4, fps=1.0)(ts, 4.0, training=False)  # 0.5, 1.5, 2.5, 3.5
    assert idx.tolist() == [[4, 5, 6, 7]]


def test_video_span_uses_duration_or_timestamps():
    ts = cfr(10, 10.0)
    assert video_span(ts, 1.0) == (0.0, 1.0)
    start, end = video_span(ts, float("nan"))  # unknown duration: last pts + typical interval
    assert start == 0.0 and end == pytest.approx(1.0)
    assert video_span(ts + 5.0, 1.0) == (5.0, 6.0)  # duration counts from the first frame's pts
    start, end = video_span(ts + 5.0, 0.5)  # duration shorter than the pts: trust the pts
    assert start == 5.0 and end == pytest.approx(6.0)
    start, end = video_span(ts, float("inf"))
    assert end == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty"):
        video_span(torch.zeros(0, dtype=torch.float64), 1.0)


@pytest.mark.parametrize("window", [(3.0, 3.0), (4.0, 2.0), (20.0, 30.0), (-5.0, -1.0), (float("nan"), 2.0)])
def test_invalid_window_raises(window):
    with pytest.raises(ValueError, match="window"):
        SegmentSampler(4)(cfr(100, 10.0), 10.0, training=False, window=window)


def test_window_is_clamped_to_video():
    idx = SegmentSampler(4)(cfr(100, 10.0), 10.0, training=False, window=(-3.0, 2.0))  # -> [0, 2)
    assert idx.tolist() == [[2, 7, 12, 17]]


def test_multiview_eval_spreads_views_and_training_gives_one():
    ts = cfr(300, 30.0)  # 10 s
    s = MultiViewSampler("dense", num_views=4, num_frames=4, frame_stride=2)
    idx = s(ts, 10.0, training=False)
    assert idx.shape == (4, 4)
    starts = idx[:, 0].tolist()
    assert starts == sorted(starts) and len(set(starts)) == 4
    assert starts[0] < 60 and starts[-1] > 220  # spread over the whole span
    gaps = torch.tensor(starts).diff().float()
    assert gaps.max() - gaps.min() <= 2  # evenly
    assert s(ts, 10.0, training=True, generator=torch.Generator().manual_seed(0)).shape == (1, 4)
    seg = MultiViewSampler("segment", num_views=2, num_frames=5)(ts, 10.0, training=False)
    assert seg.shape == (2, 5) and (seg[1] > seg[0]).all()  # different offsets within each segment


def test_multiview_wraps_instance_and_validates():
    inner = SegmentSampler(3)
    assert MultiViewSampler(inner, num_views=2).num_frames == 3
    with pytest.raises(ValueError):
        MultiViewSampler(MultiViewSampler(inner), num_views=2)
    with pytest.raises(ValueError):
        MultiViewSampler(inner, num_views=0)


class _FakeReader:
    """A reader whose frame i is filled with the value i (enough to test ``sample_clip``)."""

    def __init__(self, n: int, fps: float) -> None:
        self.n, self.fps = n, fps
        self.metadata = type("M", (), {"duration": n / fps})()

    def frame_timestamps(self) -> torch.Tensor:
        return cfr(self.n, self.fps)

    def get_frames(self, indices):
        return torch.tensor(indices, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 5).clone()


def test_sample_clip_shapes_and_content():
    reader = _FakeReader(40, 8.0)
    sampler = MultiViewSampler("segment", num_views=3, num_frames=4)
    clip = sample_clip(reader, sampler, training=False)
    assert clip.shape == (3, 4, 3, 4, 5) and clip.dtype == torch.uint8
    idx = sampler(reader.frame_timestamps(), 5.0, training=False)
    assert torch.equal(clip[:, :, 0, 0, 0].long(), idx)
    clip = sample_clip(reader, SegmentSampler(4), training=True, generator=torch.Generator().manual_seed(0))
    assert clip.shape == (1, 4, 3, 4, 5)
