"""Recognition metrics: top-1/top-5, mean-class accuracy, multi-view fusion, base-to-novel, confusion plot;
mAP for multi-label data.

Multi-view testing: every view (temporal clip x spatial crop) is classified on its own;
the fused prediction is the mean over views of the per-view **softmax** probabilities (``sigmoid`` for
a model trained with binary cross-entropy). Per-view results are reported next to the fused ones.
Accuracies are percentages.

Multi-label data (targets ``[N, K]`` 0/1 instead of labels ``[N]``): ``mAP`` = the mean over classes of
the average precision of ranking all samples by that class's score (classes without a positive sample
are left out, as in the Charades evaluation; ``map_classes`` counts the others). Average precision is
``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, high to low (tied scores form one
threshold), the definition scikit-learn's ``average_precision_score`` uses. ``top1``: % of the samples
with at least one positive whose highest-scoring class is a positive (ties with a negative count as a miss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vidlang.eval.report import write_metrics
from vidlang.io import atomic_path

FUSIONS = ("softmax", "sigmoid")


def fuse_views(logits: Tensor, fuse: str = "softmax") -> Tensor:
    """``logits [N, V, K]`` -> fused probabilities ``[N, K]`` = mean over views of ``softmax`` (or ``sigmoid``)
    per view."""
    if logits.ndim != 3:
        raise ValueError(f"fuse_views expects logits [N, V, K], got shape {tuple(logits.shape)}")
    if fuse not in FUSIONS:
        raise ValueError(f"fuse must be one of {FUSIONS}, got {fuse!r}")
    logits = logits.float()
    return (logits.softmax(dim=-1) if fuse == "softmax" else logits.sigmoid()).mean(dim=1)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """% of rows whose label is among the ``k`` highest ``scores [N, K]`` (k capped at K).

    Ties are pessimistic: a label tied with the k-th score counts only if fewer than k scores beat or
    tie it (so a constant score vector is never "correct" by accident when K > k)."""
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"scores [N, K] and labels [N] expected, got {tuple(scores.shape)}, {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples")
    true = scores.gather(1, labels.long()[:, None])  # [N, 1]
    rank = (scores > true).sum(dim=1) + (scores == true).sum(dim=1)  # pessimistic 1-based rank [N]
    return {k: 100.0 * (rank <= min(k, scores.shape[1])).double().mean().item() for k in ks}


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``[K, K]`` counts, row = true class, column = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_class_accuracy(preds: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over the classes that occur in ``labels`` of the per-class recall (%)."""
    cm = confusion_matrix(preds, labels, num_classes).double()
    support = cm.sum(dim=1)
    present = support > 0
    if not bool(present.any()):
        raise ValueError("mean_class_accuracy: no samples")
    return 100.0 * (cm.diag()[present] / support[present]).mean().item()


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)`` (0 when both are 0)."""
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def score_metrics(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """top-k accuracies and mean-class accuracy of ``scores [N, K]`` (logits or probabilities)."""
    acc = topk_accuracy(scores, labels, ks)
    out = {f"top{k}": v for k, v in acc.items()}
    out["mean_class_acc"] = mean_class_accuracy(scores.argmax(dim=1), labels, scores.shape[1])
    out["num_samples"] = int(labels.shape[0])
    return out


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-class average precision ``[K]`` (float64; NaN for a class without positives) of ``scores [N, K]``
    against 0/1 ``targets [N, K]`` (module docstring: distinct thresholds, ties form one threshold)."""
    if scores.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(f"scores and targets [N, K] expected, got {tuple(scores.shape)}, {tuple(targets.shape)}")
    scores, targets = scores.detach().double().cpu(), (targets.detach().cpu() > 0).double()
    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(scores.shape[1]):
        positives = targets[:, k].sum()
        if positives == 0:
            continue
        s, order = scores[:, k].sort(descending=True, stable=True)
        tp = targets[order, k].cumsum(0)  # true positives among the top i+1
        _, counts = torch.unique_consecutive(s, return_counts=True)
        ends = counts.cumsum(0) - 1  # last position of each tie group = one threshold
        tp_at = tp[ends]
        precision = tp_at / (ends + 1).double()
        recall_step = torch.diff(tp_at, prepend=tp_at.new_zeros(1)) / positives
        out[k] = (recall_step * precision).sum()
    return out


def multilabel_metrics(scores: Tensor, targets: Tensor) -> dict[str, float]:
    """``mAP`` (%), ``map_classes``, ``top1`` (%) and ``num_samples`` of ``scores [N, K]`` against 0/1
    ``targets [N, K]`` (module docstring)."""
    ap = average_precision(scores, targets)
    present = ~torch.isnan(ap)
    if not bool(present.any()):
        raise ValueError("multi-label metrics: no sample has a positive label")
    pos = targets.detach().cpu() > 0
    scores = scores.detach().double().cpu()
    has_pos = pos.any(dim=1)
    best_pos = scores.masked_fill(~pos, -math.inf).max(dim=1).values
    best_neg = scores.masked_fill(pos, -math.inf).max(dim=1).values
    hit = (best_pos > best_neg)[has_pos]
    return {
        "mAP": 100.0 * ap[present].mean().item(),
        "map_classes": int(present.sum()),
        "top1": 100.0 * hit.double().mean().item(),
        "num_samples": int(scores.shape[0]),
    }


def view_names(num_views: int, layout: tuple[int, int] | None = None) -> list[str]:
    """Names of the views: ``clip{c}_crop{s}`` for a ``(clips, crops)`` layout (clip-major), else ``view{v}``."""
    if layout is not None:
        clips, crops = layout
        if clips * crops == num_views:
            return [f"clip{c}_crop{s}" for c in range(clips) for s in range(crops)]
    return [f"view{v}" for v in range(num_views)]


def base_novel_metrics(
    scores: Tensor, labels: Tensor, base: Sequence[int], novel: Sequence[int], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Base-to-novel: samples of base classes scored among the base classes only, novel among novel only
    (ViFi-CLIP / CoOp protocol); ``hm_top1`` = harmonic mean of the two top-1 accuracies."""
    out: dict[str, float] = {}
    for name, ids in (("base", list(base)), ("novel", list(novel))):
        cls = torch.tensor(ids, dtype=torch.long)
        remap = torch.full((scores.shape[1],), -1, dtype=torch.long)
        remap[cls] = torch.arange(len(ids))
        keep = remap[labels.long()] >= 0
        if not bool(keep.any()):
            raise ValueError(f"base-to-novel: no evaluation samples of the {name} classes")
        m = score_metrics(scores[keep][:, cls], remap[labels.long()[keep]], ks)
        out.update({f"{name}_{k}": v for k, v in m.items()})
    out["hm_top1"] = harmonic_mean(out["base_top1"], out["novel_top1"])
    return out


@dataclass
class ClassificationResult:
    metrics: dict[str, float]  # fused: top1, top5, mean_class_acc, num_samples (+ base/novel/hm); multi-label: mAP ...
    per_view: dict[str, dict[str, float]]  # view name -> metrics of that view alone
    confusion: Tensor | None  # [K, K] of the fused predictions (None for multi-label data)
    probs: Tensor  # [N, K] fused probabilities
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def multi_label(self) -> bool:
        return self.confusion is None


def evaluate_views(
    logits: Tensor,
    labels: Tensor,
    layout: tuple[int, int] | None = None,
    base_novel: tuple[Sequence[int], Sequence[int]] | None = None,
    ks: Sequence[int] = (1, 5),
    fuse: str = "softmax",
) -> ClassificationResult:
    """Metrics of ``logits [N, V, K]`` (or ``[N, K]``): fused (``fuse`` per view, averaged) and per view.

    ``labels [N]``: single-label top-k / mean-class accuracy; 0/1 ``targets [N, K]``: multi-label mAP
    (per view on that view's ``fuse`` probabilities)."""
    if logits.ndim == 2:
        logits = logits[:, None]
    logits = logits.float().cpu()
    k = logits.shape[-1]
    probs = fuse_views(logits, fuse)  # [N, K]
    names = view_names(logits.shape[1], layout)
    if labels.ndim == 2:
        if labels.shape != (logits.shape[0], k):
            raise ValueError(f"multi-label targets [N, K] = [{logits.shape[0]}, {k}] expected, got "
                             f"{tuple(labels.shape)}: the evaluation label set does not match the data")
        if base_novel is not None:
            raise ValueError("base-to-novel evaluation is defined for single-label data only")
        targets = labels.cpu()
        per_view = {name: multilabel_metrics(fuse_views(logits[:, v : v + 1], fuse), targets)
                    for v, name in enumerate(names)}
        freq = (targets > 0).double().mean(dim=0)  # a random ranking's AP of a class is about its frequency
        chance = {"mAP": 100.0 * freq[freq > 0].mean().item()}
        return ClassificationResult(metrics=multilabel_metrics(probs, targets), per_view=per_view, confusion=None,
                                    probs=probs, extra={"chance": chance})
    labels = labels.long().cpu()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels outside the {k} classes of the classifier (range {int(labels.min())}.."
                         f"{int(labels.max())}): the evaluation label set does not match the data")
    metrics = score_metrics(probs, labels, ks)
    per_view = {name: score_metrics(logits[:, v], labels, ks) for v, name in enumerate(names)}
    if base_novel is not None:
        metrics.update(base_novel_metrics(probs, labels, *base_novel, ks=ks))
    cm = confusion_matrix(probs.argmax(dim=1), labels, k)
    return ClassificationResult(metrics=metrics, per_view=per_view, confusion=cm, probs=probs)


def plot_confusion_matrix(
    cm: Tensor, class_names: Sequence[str], path: str | Path, title: str = "confusion matrix", normalize: bool = True
) -> Path:
    """Write ``cm [K, K]`` (rows true, columns predicted; row-normalised if ``normalize``) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = cm.double()
    if normalize:
        m = m / m.sum(dim=1, keepdim=True).clamp_min(1)
    k = m.shape[0]
    side = min(24.0, max(4.0, 0.35 * k + 2.5))
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m.numpy(), cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if k <= 60:
        ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [str(n) for n in class_names], fontsize=7)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    return out


def write_report(
    out_dir: str | Path,
    stage: str,
    result: ClassificationResult,
    class_names: Sequence[str],
    info: dict[str, Any] | None = None,
    plot: bool = True,
) -> Path:
    """Write ``{stage}_metrics.json`` (+ a line in ``{stage}_metrics_history.jsonl``) and, for single-label
    data, ``{stage}_confusion.png`` to ``out_dir``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = len(class_names)
    if result.multi_label:
        chance = dict(result.extra.get("chance", {}))
    else:
        chance = {"top1": 100.0 / k, "top5": 100.0 * min(5, k) / k}
    report = {
        "stage": stage,
        **(info or {}),
        "metrics": result.metrics,
        "per_view": result.per_view,
        "chance": chance,
        "class_names": list(class_names),
    }
    if result.confusion is not None:
        report["confusion"] = result.confusion.tolist()
    path = write_metrics(out, stage, report, history={key: v for key, v in report.items() if key != "confusion"})
    if plot and result.confusion is not None:
        title = f"{stage}: top-1 {result.metrics['top1']:.1f}%"
        plot_confusion_matrix(result.confusion, class_names, out / f"{stage}_confusion.png", title=title)
    return path
