"""Recognition metrics: top-k, mean-class accuracy, multi-view fusion by hand, base-to-novel, reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vidlang.eval.classification import (
    base_novel_metrics,
    confusion_matrix,
    evaluate_views,
    fuse_views,
    harmonic_mean,
    mean_class_accuracy,
    topk_accuracy,
    view_names,
    write_report,
)


def test_topk_and_ties():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.3], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 0, 1, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    # row 0 right at 1; row 1 all tied -> pessimistic rank 3; row 2 label tied 2nd/3rd -> rank 3; row 3 rank 3
    assert acc[1] == pytest.approx(25.0) and acc[2] == pytest.approx(25.0) and acc[5] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        topk_accuracy(scores, labels[:2])


def test_mean_class_accuracy_and_confusion():
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    cm = confusion_matrix(preds, labels, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # class 3 has no samples and is left out: mean(3/4, 1, 1/2)
    assert mean_class_accuracy(preds, labels, 4) == pytest.approx(100 * (0.75 + 1 + 0.5) / 3)


def test_multiview_fusion_matches_hand_computation():
    # one video, 2 views, 3 classes; view 0 favours class 0 mildly, view 1 favours class 2 strongly
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]]])
    e = [math.exp(x) for x in (2.0, 1.0, 0.0)]
    p0 = [x / sum(e) for x in e]
    f = [1.0, 1.0, math.exp(5.0)]
    p1 = [x / sum(f) for x in f]
    hand = [(a + b) / 2 for a, b in zip(p0, p1, strict=True)]
    assert fuse_views(logits)[0].tolist() == pytest.approx(hand)
    assert hand.index(max(hand)) == 2
    # averaging logits instead would differ: fusion is of probabilities
    assert logits.mean(1).softmax(-1)[0].tolist() != pytest.approx(hand)
    result = evaluate_views(logits, torch.tensor([0]), layout=(2, 1))
    assert result.metrics["top1"] == 0.0 and result.per_view["clip0_crop0"]["top1"] == 100.0
    assert result.per_view["clip1_crop0"]["top1"] == 0.0 and result.probs[0].tolist() == pytest.approx(hand)


def test_evaluate_views_rejects_labels_outside_the_label_set():
    with pytest.raises(ValueError, match="label set"):
        evaluate_views(torch.zeros(2, 1, 3), torch.tensor([0, 3]))


def test_view_names():
    assert view_names(6, (2, 3))[:4] == ["clip0_crop0", "clip0_crop1", "clip0_crop2", "clip1_crop0"]
    assert view_names(4, (2, 3)) == ["view0", "view1", "view2", "view3"]


def test_base_to_novel_and_harmonic_mean():
    # classes 0,1 base; 2,3 novel. Scores over all 4 classes; each group is scored among its own classes.
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],  # base, label 0: right
        [0.6, 0.4, 0.0, 0.0],  # base, label 1: wrong within base
        [0.0, 0.0, 0.2, 0.1],  # novel, label 2: right among novel (even though base scores are ignored)
        [5.0, 0.0, 0.3, 0.7],  # novel, label 3: right among novel; globally it would be wrong
    ])
    labels = torch.tensor([0, 1, 2, 3])
    m = base_novel_metrics(scores, labels, [0, 1], [2, 3])
    assert m["base_top1"] == pytest.approx(50.0) and m["novel_top1"] == pytest.approx(100.0)
    assert m["hm_top1"] == pytest.approx(2 * 50 * 100 / 150)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(40.0, 40.0) == pytest.approx(40.0)
    with pytest.raises(ValueError, match="novel"):
        base_novel_metrics(scores[:2], labels[:2], [0, 1], [2, 3])


def test_write_report(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(20, 3, 4)
    labels = torch.randint(0, 4, (20,))
    result = evaluate_views(logits, labels, base_novel=([0, 1], [2, 3]))
    names = ["a", "b", "c", "d"]
    path = write_report(tmp_path, "test", result, names, {"epoch": 1})
    report = json.loads(path.read_text())
    assert report["metrics"]["top1"] == pytest.approx(result.metrics["top1"]) and report["epoch"] == 1
    assert set(report["per_view"]) == {"view0", "view1", "view2"} and report["class_names"] == names
    assert sum(map(sum, report["confusion"])) == 20 and "hm_top1" in report["metrics"]
    assert report["chance"] == {"top1": 25.0, "top5": 100.0}
    assert (tmp_path / "test_confusion.png").stat().st_size > 3000
    write_report(tmp_path, "test", result, names)
    assert len((tmp_path / "test_metrics_history.jsonl").read_text().splitlines()) == 2
