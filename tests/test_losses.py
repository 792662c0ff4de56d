"""ContrastiveLoss against hand computations (3x3, several captions per video), gradients, clamping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vidlang.losses import ContrastiveLoss, all_gather_with_grad
from vidlang.losses.contrastive import clamped_scale


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _hand_loss(video: list[list[float]], text: list[list[float]], index: list[int], scale: float) -> float:
    """Pure-Python reference of the documented loss."""
    logits = [[scale * _cos(t, v) for v in video] for t in text]  # [A][B]
    t2v = 0.0
    for a, row in enumerate(logits):
        t2v += -row[index[a]] + math.log(sum(math.exp(x) for x in row))
    t2v /= len(text)
    v2t, n_videos = 0.0, 0
    for b in range(len(video)):
        pos = [a for a in range(len(text)) if index[a] == b]
        if not pos:
            continue
        neg_sum = sum(math.exp(logits[a][b]) for a in range(len(text)) if a not in pos)
        v2t += sum(-logits[a][b] + math.log(math.exp(logits[a][b]) + neg_sum) for a in pos) / len(pos)
        n_videos += 1
    return (t2v + v2t / n_videos) / 2


def test_three_by_three_matches_hand_computation():
    video = [[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0]]
    text = [[0.9, 0.1, 0.3], [0.1, 0.8, 0.4], [0.5, 0.0, 0.7]]
    scale = 10.0
    out = ContrastiveLoss()(torch.tensor(video), torch.tensor(text), torch.arange(3), torch.tensor(math.log(scale)))
    assert out.loss.item() == pytest.approx(_hand_loss(video, text, [0, 1, 2], scale), rel=1e-5)
    # one caption per video: exactly CLIP's symmetric cross-entropy
    v, t = F.normalize(torch.tensor(video), dim=-1), F.normalize(torch.tensor(text), dim=-1)
    logits = scale * t @ v.t()
    clip = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3))) / 2
    assert out.loss.item() == pytest.approx(clip.item(), rel=1e-5)
    assert out.scale.item() == pytest.approx(scale)


def test_several_captions_per_video_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(3, 8, generator=g), torch.randn(7, 8, generator=g)
    index = [0, 0, 1, 2, 2, 2, 0]
    out = ContrastiveLoss()(video, text, torch.tensor(index), torch.tensor(math.log(20.0)))
    ref = _hand_loss(video.tolist(), text.tolist(), index, 20.0)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)
    assert (out.loss_t2v + out.loss_v2t).item() / 2 == pytest.approx(out.loss.item(), rel=1e-6)


def test_positives_do_not_compete_so_perfect_alignment_gives_near_zero_loss():
    # two captions identical to their video: the loss must go to ~0 at a large scale
    video = torch.eye(3)
    text = torch.cat([torch.eye(3), torch.eye(3)])
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    out = ContrastiveLoss()(video, text, index, torch.tensor(math.log(100.0)))
    assert out.loss.item() < 1e-3
    assert out.loss_v2t.item() < 1e-3  # a full-denominator variant would stay >= log(2)


def test_videos_without_captions_act_only_as_negatives():
    g = torch.Generator().manual_seed(1)
    video, text = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)
    index = [0, 2, 2]
    out = ContrastiveLoss()(video, text, torch.tensor(index), torch.tensor(math.log(5.0)))
    assert out.loss.item() == pytest.approx(_hand_loss(video.tolist(), text.tolist(), index, 5.0), rel=1e-5)


def test_gradients_finite_and_reach_all_inputs():
    g = torch.Generator().manual_seed(2)
    video = torch.randn(4, 16, generator=g, requires_grad=True)
    text = torch.randn(9, 16, generator=g, requires_grad=True)
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    index = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    ContrastiveLoss()(video, text, index, logit_scale).loss.backward()
    for x in (video, text, logit_scale):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_scale_is_clamped_at_100():
    logit_scale = torch.tensor(math.log(500.0), requires_grad=True)
    assert clamped_scale(logit_scale).item() == pytest.approx(100.0)
    out = ContrastiveLoss()(torch.randn(3, 4), torch.randn(3, 4), torch.arange(3), logit_scale)
    out.loss.backward()
    assert out.scale.item() == pytest.approx(100.0)
    assert logit_scale.grad.item() == 0.0


def test_bad_inputs_raise():
    loss = ContrastiveLoss()
    with pytest.raises(ValueError, match="caption_index"):
        loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor(1.0))
    with pytest.raises(ValueError, match="caption_index"):
        loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        loss(torch.randn(2, 4), torch.randn(3, 5), torch.tensor([0, 1, 1]), torch.tensor(1.0))


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
