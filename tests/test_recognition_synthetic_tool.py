"""Pieces of tools/recognition_synthetic.py: reverse pairs, pair accuracy, crop agreement, label-aware augmentation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vidlang.data.synthetic.spec import LABEL_NAMES, MOTIONS
from vidlang.data.transforms import ThreeCrop

TOOL = Path(__file__).resolve().parents[1] / "tools" / "recognition_synthetic.py"
CLASSES = [LABEL_NAMES[m] for m in MOTIONS]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("recognition_synthetic", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reverse_index_pairs_every_motion_but_static(tool):
    rev = tool.reverse_index(CLASSES)
    assert rev[CLASSES.index("moving left")] == CLASSES.index("moving right")
    assert rev[CLASSES.index("growing")] == CLASSES.index("shrinking")
    assert CLASSES.index("staying still") not in rev and len(rev) == 8
    assert all(rev[rev[k]] == k for k in rev)
    with pytest.raises(ValueError, match="reverse pair"):
        tool.reverse_index(CLASSES[:3])


def test_pair_accuracy_by_hand(tool):
    rev = tool.reverse_index(CLASSES)
    left, right, still = (CLASSES.index(n) for n in ("moving left", "moving right", "staying still"))
    scores = torch.zeros(4, 9)
    scores[0, left], scores[0, right] = 0.6, 0.3  # left video: true beats reverse
    scores[1, left], scores[1, right] = 0.2, 0.7  # left video: reverse wins
    scores[2, right], scores[2, left] = 0.4, 0.4  # right video: a tie loses
    scores[3, still] = 1.0  # static videos are not counted
    labels = torch.tensor([left, left, right, still])
    assert tool.pair_accuracy(scores, labels, rev) == pytest.approx(100 / 3)
    assert tool.pair_accuracy(scores[3:], labels[3:], rev) is None
    up, grow = CLASSES.index("moving up"), CLASSES.index("growing")
    scores = torch.zeros(4, 9)
    scores[0, right] = scores[1, left] = scores[2, grow] = scores[3, up] = 1.0
    labels = torch.tensor([left, left, up, still])  # pair-blind: the reverse counts (row 0), other motions do not
    assert tool.pair_blind_accuracy(scores, labels, rev) == pytest.approx(50.0)


def test_three_crop_of_a_square_clip_gives_identical_crops_and_crops_agree_sees_it(tool):
    clip = torch.randint(0, 255, (2, 4, 3, 40, 40), dtype=torch.uint8)  # [V, T, C, H, W], square
    crops = ThreeCrop(32)(clip).view(2, 3, 4, 3, 32, 32)
    assert torch.equal(crops[:, 0], crops[:, 1]) and torch.equal(crops[:, 0], crops[:, 2])
    logits = torch.randn(5, 2, 1, 9).expand(5, 2, 3, 9).reshape(5, 6, 9)  # clip-major, crops equal
    assert tool.crops_agree(logits, clips=2, crops=3)
    logits = logits.clone()
    logits[0, 4] += 1.0
    assert not tool.crops_agree(logits, clips=2, crops=3)


def test_label_aware_augment_swaps_labels_with_the_transform(tool):
    aug = tool.LabelAwareAugment(CLASSES, seed=0)
    b, t = 64, 4
    video = torch.arange(b * t, dtype=torch.float32).view(b, t, 1, 1, 1).expand(b, t, 3, 6, 6).contiguous()
    video[..., 0, :] += 1000.0  # mark the top row, to see vertical flips
    video[..., :, 0] += 5000.0  # mark the left column, to see horizontal flips
    labels = torch.tensor([CLASSES.index("moving left")] * b)
    orig = video.clone()
    batch = {"video": video, "label": labels.clone()}
    aug(batch)
    out, new = batch["video"], batch["label"]
    reversed_t = out[:, 0, 0, 3, 3] != orig[:, 0, 0, 3, 3]
    hflip = out[:, 0, 0, 3, 0] < 5000.0
    assert reversed_t.any() and (~reversed_t).any() and hflip.any() and (~hflip).any()
    # moving left flips to moving right iff exactly one of (time reversal, horizontal flip) was applied
    expect = torch.where(reversed_t ^ hflip, CLASSES.index("moving right"), CLASSES.index("moving left"))
    assert torch.equal(new, expect)
