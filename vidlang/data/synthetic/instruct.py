"""Instruction and VideoQA sets over the synthetic corpus: questions whose answers are the clip's attributes.

For each video of a split and each asked attribute (``color``, ``shape``, ``motion``, ``sound``) one question
(:data:`QUESTIONS`) whose answer is one word (the manifest's value: ``red``, ``triangle``, ``counterclockwise``,
``beeping``). Written next to the corpus's manifests (:func:`write_instruction_sets`):

* ``instruct_{split}.json`` -- VideoChat / Video-LLaMA instruction layout (``{"video", "QA": [{"q", "a"}]}``, one
  item per question), read by the ``video_instruct`` format;
* ``qa_{split}.json`` -- open-ended VideoQA (``{"video", "question", "answer", "type", "id"}``), format ``video_qa``;
* ``mc_{split}.json`` -- multiple choice: the answer among ``choices`` candidates of the same attribute (the others
  drawn at random, seeded), format ``video_qa``.

Chance level of the open-ended questions, guessing uniformly among an attribute's values: :func:`chance_accuracy`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vidlang.data.synthetic.spec import COLORS, MOTIONS, SHAPES, SOUNDS, SPLITS
from vidlang.io import atomic_write_text

QUESTIONS: dict[str, str] = {
    "color": "what color is the big shape ?",
    "shape": "what shape is the big shape ?",
    "motion": "how does the big shape move ?",
    "sound": "what sound can be heard ?",
}
VALUES: dict[str, list[str]] = {"color": list(COLORS), "shape": list(SHAPES), "motion": list(MOTIONS),
                                "sound": list(SOUNDS)}
DEFAULT_ATTRIBUTES = ("color", "shape", "motion")


def chance_accuracy(attributes: Sequence[str] = DEFAULT_ATTRIBUTES) -> float:
    """Expected accuracy of uniform guessing among each asked attribute's values (questions equally many)."""
    return float(np.mean([1.0 / len(VALUES[a]) for a in attributes]))


def read_rows(corpus_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The corpus's ``manifest.jsonl`` rows."""
    path = Path(corpus_dir) / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {corpus_dir} a `vidlang synth` corpus?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def questions_of(rows: Sequence[dict[str, Any]], attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
                 choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """One record per (video, attribute): ``video, key, type, question, answer, candidates`` (the answer among
    ``choices`` values of the attribute, in a seeded random order)."""
    unknown = set(attributes) - set(QUESTIONS)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {sorted(QUESTIONS)}")
    rng = np.random.default_rng(seed)
    out = []
    for row in rows:
        for attr in attributes:
            answer = str(row[attr])
            others = [v for v in VALUES[attr] if v != answer]
            picked = [str(v) for v in rng.choice(others, size=min(choices, len(VALUES[attr])) - 1, replace=False)]
            candidates = [answer, *picked]
            order = rng.permutation(len(candidates))
            out.append({"video": row["path"], "key": row["key"], "type": attr, "question": QUESTIONS[attr],
                        "answer": answer, "candidates": [candidates[i] for i in order]})
    return out


def write_instruction_sets(corpus_dir: str | os.PathLike, attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
                           choices: int = 4, seed: int = 0, splits: Sequence[str] = SPLITS,
                           out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``instruct_/qa_/mc_{split}.json`` into ``out_dir`` (default: the corpus folder; video paths are relative
    to the corpus folder: give the readers ``video_root`` when they differ) and return name -> path."""
    rows = read_rows(corpus_dir)
    out_dir = Path(out_dir if out_dir is not None else corpus_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split in splits:
        qs = questions_of([r for r in rows if r["split"] == split], attributes, choices, seed)
        if not qs:
            continue
        sets = {
            f"instruct_{split}": [{"video": q["video"], "id": f"{q['key']}-{q['type']}",
                                   "QA": [{"q": q["question"], "a": q["answer"]}]} for q in qs],
            f"qa_{split}": [{"video": q["video"], "id": f"{q['key']}-{q['type']}", "type": q["type"],
                             "question": q["question"], "answer": q["answer"]} for q in qs],
            f"mc_{split}": [{"video": q["video"], "id": f"{q['key']}-{q['type']}", "type": q["type"],
                             "question": q["question"], "candidates": q["candidates"], "answer": q["answer"]}
                            for q in qs],
        }
        for name, items in sets.items():
            path = out_dir / f"{name}.json"
            atomic_write_text(path, json.dumps(items, indent=1) + "\n")
            written[name] = path
    return written
