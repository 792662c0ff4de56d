"""VideoQA metrics: open-ended accuracy after answer normalisation, multiple-choice accuracy, per question type.

Normalisation (:func:`normalize_answer`, in the spirit of the VQA evaluation): lower case, punctuation removed
(apostrophes and hyphens included: ``counter-clockwise`` == ``counterclockwise``), the articles ``a an the``
dropped, number words zero..twenty written as digits, whitespace collapsed. An open-ended prediction is correct
when its normalised text equals the normalised answer.

Predictions are one dict each: ``{"key", "id", "question", "answer", "prediction", "correct", ["type"],
["choices", "scores"]}``; :func:`qa_metrics` summarises them and :func:`write_predictions` writes them as JSON
lines.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidlang.io import atomic_open

ARTICLES = {"a", "an", "the"}
NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_PUNCT = re.compile(r"[^\w\s]|_")


def normalize_answer(text: str) -> str:
    """``"The Counter-Clockwise!"`` -> ``"counterclockwise"`` (module docstring)."""
    text = text.lower().replace("'", "").replace("-", "")
    words = _PUNCT.sub(" ", text).split()
    return " ".join(NUMBERS.get(w, w) for w in words if w not in ARTICLES)


def open_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def qa_metrics(predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``accuracy`` over all questions, ``open_accuracy`` / ``mc_accuracy`` over each kind (when present), the
    counts, and ``accuracy_by_type`` when questions carry a ``type``."""
    def acc(rows: Sequence[dict[str, Any]]) -> float:
        return sum(bool(r["correct"]) for r in rows) / len(rows) if rows else float("nan")

    mc = [p for p in predictions if "choices" in p]
    open_ = [p for p in predictions if "choices" not in p]
    out: dict[str, Any] = {"num_questions": len(predictions), "accuracy": acc(predictions)}
    if open_:
        out.update(open_questions=len(open_), open_accuracy=acc(open_))
    if mc:
        out.update(mc_questions=len(mc), mc_accuracy=acc(mc))
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        if "type" in p:
            by_type[str(p["type"])].append(p)
    if by_type:
        out["accuracy_by_type"] = {t: acc(rows) for t, rows in sorted(by_type.items())}
    return out


def write_predictions(path: str | Path, predictions: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line (atomic)."""
    with atomic_open(Path(path), "w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
