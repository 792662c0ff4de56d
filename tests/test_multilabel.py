"""Multi-label data (Charades-style): list files with several labels per line, manifests with label lists,
multi-hot targets through collate, mixup / cutmix / smoothing of multi-hot targets, and mAP."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from vidlang.data.collate import collate_samples
from vidlang.data.formats import FormatError, build_index
from vidlang.data.formats.protocols import few_shot_index, subset_classes
from vidlang.data.sample import VideoSample
from vidlang.eval.classification import average_precision, evaluate_views, multilabel_metrics, write_report
from vidlang.losses.classification import MixupCutmix, mix_targets, multi_hot, smooth_targets

CLASSES = ["open door", "sit", "drink", "walk"]


@pytest.fixture
def classes(tmp_path) -> Path:
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return tmp_path / "classes.txt"


def read_list(tmp_path: Path, classes: Path, lines: list[str], **kw):
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return build_index("kinetics", list_file=str(tmp_path / "list.txt"), classes=str(classes), video_root="/r", **kw)


# -- list files -------------------------------------------------------------------------------------------------
def test_several_labels_per_line_become_a_label_tuple(tmp_path, classes):
    index = read_list(tmp_path, classes, ["test.mp4 0 3", "my clip 2.mp4 1", "a/b.avi 2 2 0"])
    assert [(e.path, e.label) for e in index.entries] == [
        ("/r/test.mp4", (0, 3)), ("/r/my clip 2.mp4", (1,)), ("/r/a/b.avi", (2, 0))]  # a repeat counts once
    assert index.entries[0].meta["label_name"] == ["open door", "walk"] and index.classes == CLASSES


def test_single_label_lists_keep_int_labels_and_spaces_in_paths(tmp_path, classes):
    index = read_list(tmp_path, classes, ["x 1.mp4 1", "dir with space/y.mp4 0"])
    assert [(e.path, e.label) for e in index.entries] == [("/r/x 1.mp4", 1), ("/r/dir with space/y.mp4", 0)]
    forced = read_list(tmp_path, classes, ["x.mp4 1"], multi_label=True)
    assert forced.entries[0].label == (1,)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("x.mp4", "expected 'path label"),
        ("x.mp4 a", "expected 'path label"),
        ("x.mp4 1 7", "label 7 outside the 4 classes"),
        ("x.mp4 -1", "label -1 outside"),
        ("clip 12 3", "ambiguous line"),  # the file "clip 12" with label 3, or "clip" with labels 12 and 3?
    ],
)
def test_lines_that_do_not_parse_are_refused_with_file_and_line(tmp_path, classes, line, reason):
    with pytest.raises(FormatError, match=rf"list\.txt:2: {reason}"):
        read_list(tmp_path, classes, ["ok.mp4 0", line])


def test_multi_label_false_refuses_several_labels(tmp_path, classes):
    with pytest.raises(FormatError, match=r"list\.txt:1: 2 labels on one line but multi_label=False"):
        read_list(tmp_path, classes, ["x.mp4 0 1"], multi_label=False)


def test_explicit_delimiter(tmp_path, classes):
    index = read_list(tmp_path, classes, ["clip 12\t0 3", "other clip\t1"], delimiter="\t")
    assert [(e.path, e.label) for e in index.entries] == [("/r/clip 12", (0, 3)), ("/r/other clip", (1,))]
    commas = read_list(tmp_path, classes, ["a b.mp4,2,1"], delimiter=",")
    assert commas.entries[0].path == "/r/a b.mp4" and commas.entries[0].label == (2, 1)
    with pytest.raises(FormatError, match=r"list\.txt:2: expected 'path"):
        read_list(tmp_path, classes, ["a.mp4\t1", "no tab 1"], delimiter="\t")
    with pytest.raises(FormatError, match=r"list\.txt:1: column 'label': 'x' is not an integer"):
        read_list(tmp_path, classes, ["a.mp4\t1 x"], delimiter="\t")


# -- manifests --------------------------------------------------------------------------------------------------
def test_manifest_label_lists(tmp_path, classes):
    csv = tmp_path / "m.csv"
    csv.write_text('path,caption,label\na.mp4,c,"[0, 2]"\nb.mp4,c,1\nc.mp4,c,\nd.mp4,,[]\n')
    index = build_index("manifest", path=str(csv), classes=str(classes))
    assert [e.label for e in index.entries] == [(0, 2), (1,), (), ()]
    assert index.entries[0].meta["label_name"] == ["open door", "drink"]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"path": "a.mp4", "label": [3, 1]},
                                                       {"path": "b.mp4", "label": [1, 4]}]) + "\n")
    with pytest.raises(FormatError, match=r"m\.jsonl:2: label 4 of b is outside the 4 classes"):
        build_index("manifest", path=str(jsonl), classes=str(classes))
    csv.write_text('path,label\na.mp4,"[0, ""x""]"\n')
    with pytest.raises(FormatError, match=r"m\.csv:2: column 'label': a label list must hold integers"):
        build_index("manifest", path=str(csv), classes=str(classes))


# -- protocols --------------------------------------------------------------------------------------------------
def test_class_subset_relabels_label_tuples_and_few_shot_refuses(tmp_path, classes):
    index = read_list(tmp_path, classes, ["a.mp4 0 3", "b.mp4 1", "c.mp4 3 2"])
    sub = subset_classes(index, [3, 1])  # keep "walk" -> 0, "sit" -> 1
    assert [(Path(e.path).name, e.label) for e in sub.entries] == [("a.mp4", (0,)), ("b.mp4", (1,)),
                                                                     ("c.mp4", (0,))]
    assert sub.classes == ["walk", "sit"] and sub.entries[0].meta["original_label"] == (0, 3)
    with pytest.raises(ValueError, match="few-shot.*multi-label"):
        few_shot_index(index, 1)


# -- collate and targets ----------------------------------------------------------------------------------------
def sample(key: str, label) -> VideoSample:
    return VideoSample(torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8), key, [], label=label)


def test_collate_carries_label_sets_and_multi_hot():
    batch = collate_samples([sample("a", (0, 3)), sample("b", (2,)), sample("c", ())])
    assert batch["label"].tolist() == [-1, -1, -1]  # no single label: single-label code cannot misuse them
    assert batch["label_set"].tolist() == [[0, 3], [2, -1], [-1, -1]]
    assert multi_hot(batch["label_set"], 4).tolist() == [[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        multi_hot(batch["label_set"], 3)
    single = collate_samples([sample("a", 1), sample("b", None)])
    assert single["label"].tolist() == [1, -1] and "label_set" not in single


def test_mixing_multi_hot_targets():
    y = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]])
    assert torch.equal(smooth_targets(y, 0.0), y)
    assert torch.allclose(smooth_targets(y, 0.2), y * 0.8 + 0.05)
    one_hot = torch.eye(4)[[2, 0]]
    assert torch.allclose(smooth_targets(one_hot, 0.1), mix_targets(torch.tensor([2, 0]), 4, 1.0, 0.1))
    t = mix_targets(y, 4, 0.7, smoothing=0.0)  # sample i with sample 2 - i
    assert torch.allclose(t, torch.tensor([[0.7, 0, 0.3, 1.0], [0, 1.0, 0, 0], [0.3, 0, 0.7, 1.0]]))
    norm = y / y.sum(1, keepdim=True)
    video = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1, 1).expand(3, 2, 3, 8, 8)
    torch.manual_seed(0)
    out = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)(video, norm, 4,
                                                                               torch.Generator().manual_seed(1))
    expected = smooth_targets(norm, 0.1) * out.lam + smooth_targets(norm.flip(0), 0.1) * (1 - out.lam)
    assert out.mode == "cutmix" and torch.allclose(out.targets, expected)
    assert torch.allclose(out.targets.sum(1), torch.ones(3))  # normalised multi-hot stays a distribution
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        mix_targets(torch.ones(3, 5), 4, 0.5)


# -- mAP --------------------------------------------------------------------------------------------------------
def reference_ap(scores: list[float], labels: list[int]) -> float:
    """Average precision by its definition: sum over distinct thresholds t (high to low) of
    (recall(t) - recall(previous t)) * precision(t), predicting positive every score >= t."""
    positives = sum(labels)
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        picked = [y for s, y in zip(scores, labels, strict=True) if s >= t]
        recall, precision = sum(picked) / positives, sum(picked) / len(picked)
        ap += (recall - last_recall) * precision
        last_recall = recall
    return ap


def test_average_precision_by_hand():
    # class 0: positives ranked 1st and 3rd -> (1/1 + 2/3) / 2; class 1: tie at 0.8 between a negative
    # and a positive -> the tie is one threshold: 1/2 * 1/3 + 1/2 * 2/4
    scores = torch.tensor([[0.9, 0.9], [0.8, 0.8], [0.7, 0.8], [0.6, 0.1]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]])
    ap = average_precision(scores, targets)
    assert ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.5 / 3 + 0.5 * 0.5])
    m = multilabel_metrics(scores, targets)
    assert m["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 0.5 / 3 + 0.25) / 2)
    assert m["map_classes"] == 2 and m["num_samples"] == 4


def test_average_precision_matches_the_definition_on_random_data_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40, 7), generator=g).float() / 5  # many ties
    targets = (torch.rand(40, 7, generator=g) < 0.3).long()
    targets[:, 6] = 0  # a class without positives: left out of the mean, as Charades' evaluation does
    ap = average_precision(scores, targets)
    assert torch.isnan(ap[6])
    for k in range(6):
        assert ap[k].item() == pytest.approx(reference_ap(scores[:, k].tolist(), targets[:, k].tolist()), abs=1e-12)
    m = multilabel_metrics(scores, targets)
    assert m["map_classes"] == 6 and m["mAP"] == pytest.approx(100 * ap[:6].mean().item())


def test_multilabel_top1_is_pessimistic_on_ties():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.5, 0.5, 0.0], [0.2, 0.3, 0.9], [0.1, 0.1, 0.1]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    # row 0 hit; row 1 its positive ties a negative -> miss; row 2 miss; row 3 has no positive -> not counted
    assert multilabel_metrics(scores, targets)["top1"] == pytest.approx(100 / 3)


def test_evaluate_views_multi_label(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 2, 4, generator=g)  # [N, V, K]
    targets = torch.tensor(list(itertools.islice(itertools.cycle([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]]), 6)))
    r = evaluate_views(logits, targets, layout=(2, 1))
    probs = logits.softmax(-1).mean(1)
    assert torch.allclose(r.probs, probs) and r.confusion is None
    assert r.metrics["mAP"] == pytest.approx(100 * average_precision(probs, targets).mean().item())
    assert r.per_view["clip1_crop0"]["mAP"] == pytest.approx(
        100 * average_precision(logits[:, 1].softmax(-1), targets).mean().item())
    sig = evaluate_views(logits, targets, fuse="sigmoid")
    assert torch.allclose(sig.probs, logits.sigmoid().mean(1))
    with pytest.raises(ValueError, match="base-to-novel"):
        evaluate_views(logits, targets, base_novel=([0, 1], [2, 3]))
    with pytest.raises(ValueError, match=r"targets \[N, K\]"):
        evaluate_views(logits, targets[:, :3])
    path = write_report(tmp_path, "test", r, CLASSES)
    report = json.loads(path.read_text())
    assert report["metrics"]["mAP"] == pytest.approx(r.metrics["mAP"]) and "confusion" not in report
    assert report["chance"]["mAP"] == pytest.approx(100 * targets.float().mean(0).mean().item())
    assert not (tmp_path / "test_confusion.png").exists()
