"""Recall@K curves of retrieval ranks, written as PNG with matplotlib's Agg canvas.

Uses ``matplotlib.figure.Figure`` directly (no pyplot global state, no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import Tensor

from vidlang.io import atomic_path


def recall_curve(ranks: Tensor, max_k: int) -> np.ndarray:
    """Recall@K in percent for K = 1..max_k from 1-based ``ranks [Q]`` -> ``[max_k]``."""
    r = ranks.double().cpu().numpy()
    if r.size == 0:
        raise ValueError("recall curve: no ranks")
    counts = np.bincount(np.clip(r.astype(np.int64), 1, max_k + 1), minlength=max_k + 2)[1 : max_k + 1]
    return 100.0 * np.cumsum(counts) / r.size


def plot_recall_at_k(
    ranks: Mapping[str, Tensor], path: str | Path, max_k: int | None = None, title: str = "Recall@K"
) -> Path:
    """Plot one recall@K curve per entry of ``ranks`` (e.g. ``t2v``, ``v2t``, ``dsl_t2v``) to ``path``.

    ``max_k`` defaults to ``min(100, largest rank seen)``, at least 10.
    Chance level (``K / gallery``) is not drawn because galleries differ per direction.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not ranks:
        raise ValueError("plot_recall_at_k: nothing to plot")
    if max_k is None:
        max_k = max(10, min(100, max(int(r.max()) for r in ranks.values())))
    ks = np.arange(1, max_k + 1)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, r in ranks.items():
        style = "--" if name.startswith("dsl_") else "-"
        ax.plot(ks, recall_curve(r, max_k), style, label=f"{name} (n={r.numel()})")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path
