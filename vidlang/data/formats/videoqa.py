"""VideoQA sets: open-ended (MSRVTT-QA, MSVD-QA) and multiple choice, for evaluating (and tuning) the chat encoder.

* ``msrvtt_qa`` -- ``{train,val,test}_qa.json`` of MSRVTT-QA: a JSON array of ``{"question", "answer",
  "video_id", "id", ["category_id"]}``; ``video_id`` 6513 (or ``"video6513"``) is ``{video_root}/video6513.mp4``.
* ``msvd_qa`` -- MSVD-QA's ``{train,val,test}_qa.json`` (the same fields, ``video_id`` an integer) and
  ``youtube_mapping.txt`` (lines ``-4wsuPCjDBc_5_15 vid1``): video 1 is ``{video_root}/-4wsuPCjDBc_5_15.avi``.
* ``video_qa`` -- a generic JSON array of ``{"video": "rel/path.mp4", "question", "answer", ["candidates"],
  ["id"], ["type"]}``: open-ended without candidates; multiple choice with ``candidates`` (also ``options`` /
  ``choices``: a list of answer texts) and ``answer`` one of them, its 0-based index, or its letter (``"B"``,
  ``"(B)"``), as MVBench-style sets are laid out.

The questions of one video are grouped into one entry (each clip is decoded once): ``meta["qa"]`` is the list of
``{"id", "question", "answer", ["choices", "answer_index"], ["type"]}`` and ``meta["conversation"]`` the same
questions as a conversation (user question, assistant answer, ...), so a QA training split can tune the model too.
Evaluation (:class:`vidlang.tasks.chat_encoder.ChatEncoderTask`): open-ended accuracy after answer normalisation
(:func:`vidlang.eval.videoqa.normalize_answer`), multiple choice by likelihood.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from vidlang.data.formats.base import FORMATS, FormatError, read_json_items, read_lines, resolve
from vidlang.data.sample import FormatIndex, VideoEntry
from vidlang.models.chat_format import PLACEHOLDER

CHOICE_KEYS = ("candidates", "options", "choices")


def _text(value: Any, what: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}: expected a non-empty string, got {value!r}")
    return value.strip()


def _answer_index(answer: Any, choices: list[str]) -> int:
    """The index of ``answer`` among ``choices``: the text itself, a 0-based index, or a letter (``B``, ``(B)``)."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a choice")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} outside the {len(choices)} candidates")
        return answer
    if isinstance(answer, str):
        text = answer.strip()
        if text in choices:
            return choices.index(text)
        letter = text.strip("()").strip()
        if len(letter) == 1 and letter.upper() in string.ascii_uppercase[: len(choices)]:
            return string.ascii_uppercase.index(letter.upper())
    raise ValueError(f"answer {answer!r} is none of the candidates {choices}")


def qa_item(row: dict[str, Any], default_id: str) -> dict[str, Any]:
    """One question of a row: ``{"id", "question", "answer", ["choices", "answer_index"], ["type"]}``."""
    question = _text(row.get("question"), "question")
    if PLACEHOLDER in question:
        raise ValueError(f"question contains the placeholder {PLACEHOLDER}")
    item: dict[str, Any] = {"id": str(row.get("id", row.get("question_id", default_id))), "question": question}
    key = next((k for k in CHOICE_KEYS if k in row), None)
    if key is not None:
        raw = row[key]
        if not isinstance(raw, list) or len(raw) < 2:
            raise ValueError(f"{key}: expected a list of at least 2 answers")
        choices = [_text(c, f"{key}[{j}]") for j, c in enumerate(raw)]
        index = _answer_index(row.get("answer"), choices)
        item.update(choices=choices, answer_index=index, answer=choices[index])
    else:
        item["answer"] = _text(row.get("answer"), "answer")
    kind = row.get("type", row.get("question_type", row.get("category_id")))
    if kind is not None:
        item["type"] = str(kind)
    return item


def group_entries(rows: list[tuple[str, str, dict[str, Any]]]) -> list[VideoEntry]:
    """``(video path, key, qa item)`` rows -> one entry per video, questions in file order."""
    by_video: dict[str, VideoEntry] = {}
    for path, key, item in rows:
        entry = by_video.get(path)
        if entry is None:
            entry = by_video[path] = VideoEntry(path, key, meta={"qa": [], "conversation": []})
        entry.meta["qa"].append(item)
        first = not entry.meta["conversation"]
        entry.meta["conversation"] += [
            {"role": "user", "content": (f"{PLACEHOLDER}\n" if first else "") + item["question"]},
            {"role": "assistant", "content": item["answer"]},
        ]
    return list(by_video.values())


def _read_rows(path: str, what: str) -> list[tuple[int, int, dict[str, Any]]]:
    kind, items = read_json_items(path, what)
    if kind != "list":
        raise FormatError(path, f"expected a JSON array of questions ({what})")
    for n, i, row in items:
        if not isinstance(row, dict):
            raise FormatError(path, f"item {i}: expected an object", line=n)
    return items


def _video_id(row: dict[str, Any], path: str, n: int, i: int) -> str:
    vid = row.get("video_id")
    if vid is None or isinstance(vid, bool) or str(vid).strip() == "":
        raise FormatError(path, f"item {i}: missing 'video_id'", line=n)
    return str(vid).strip()


@FORMATS.register("msrvtt_qa")
def read_msrvtt_qa(path: str, video_root: str, ext: str = "mp4") -> FormatIndex:
    """MSRVTT-QA questions (module docstring); videos ``{video_root}/video{video_id}.{ext}``."""
    rows = []
    for n, i, row in _read_rows(path, "MSRVTT-QA JSON"):
        vid = _video_id(row, path, n, i)
        name = vid if vid.startswith("video") else f"video{vid}"
        try:
            rows.append((str(Path(video_root) / f"{name}.{ext}"), name, qa_item(row, str(i))))
        except ValueError as err:
            raise FormatError(path, f"item {i}: {err}", line=n) from None
    return FormatIndex(group_entries(rows), None, f"MSRVTT-QA {path}")


def read_youtube_mapping(path: str) -> dict[str, str]:
    """MSVD-QA's ``youtube_mapping.txt``: ``youtube_clip_id vidN`` per line -> ``{"N": youtube_clip_id}``."""
    out: dict[str, str] = {}
    for n, line in read_lines(path, "MSVD-QA youtube mapping"):
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
            raise FormatError(path, f"expected 'youtube_clip_id vidN', got {line!r}", line=n)
        out[parts[1][3:]] = parts[0]
    return out


@FORMATS.register("msvd_qa")
def read_msvd_qa(path: str, video_root: str, mapping: str | None = None, ext: str = "avi") -> FormatIndex:
    """MSVD-QA questions (module docstring); ``mapping`` defaults to ``youtube_mapping.txt`` beside ``path``."""
    mapping = mapping or str(Path(path).parent / "youtube_mapping.txt")
    names = read_youtube_mapping(mapping)
    rows = []
    for n, i, row in _read_rows(path, "MSVD-QA JSON"):
        vid = _video_id(row, path, n, i).removeprefix("vid")
        if vid not in names:
            raise FormatError(path, f"item {i}: video_id {vid} is not in {mapping}", line=n)
        try:
            rows.append((str(Path(video_root) / f"{names[vid]}.{ext}"), names[vid], qa_item(row, str(i))))
        except ValueError as err:
            raise FormatError(path, f"item {i}: {err}", line=n) from None
    return FormatIndex(group_entries(rows), None, f"MSVD-QA {path}")


@FORMATS.register("video_qa")
def read_video_qa(path: str, video_root: str | None = None) -> FormatIndex:
    """A generic open-ended / multiple-choice VideoQA JSON (module docstring); paths relative to ``video_root``
    (default: the JSON's folder)."""
    root = Path(path).parent
    rows = []
    for n, i, row in _read_rows(path, "VideoQA JSON"):
        video = row.get("video")
        if not isinstance(video, str) or not video.strip():
            raise FormatError(path, f"item {i}: missing 'video' (the clip's path)", line=n)
        try:
            rows.append((resolve(video_root, video.strip(), root), video.strip(), qa_item(row, str(i))))
        except ValueError as err:
            raise FormatError(path, f"item {i}: {err}", line=n) from None
    return FormatIndex(group_entries(rows), None, f"VideoQA {path}")
