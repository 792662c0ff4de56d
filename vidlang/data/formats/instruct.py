"""Video instruction data (stage 2 of the chat encoder): a JSON array of conversations about one video each.

Three layouts are read, item by item (a file may mix them):

* VideoChat / Video-LLaMA (``videochat_instruct_11k.json``)::

    {"video": "rel/path.mp4", "QA": [{"i": "optional instruction", "q": "question", "a": "answer"}, ...]}

  each ``{i, q, a}`` one user turn (``i`` and ``q`` joined by a newline) and one assistant turn;
* LLaVA / Video-ChatGPT style::

    {"id": "...", "video": "rel/path.mp4", "conversations": [{"from": "human", "value": "<video>\\n..."},
                                                            {"from": "gpt", "value": "..."}, ...]}

  (``from``: ``human`` / ``user``, ``gpt`` / ``assistant``, ``system``);
* chat messages::

    {"video": "rel/path.mp4", "messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

The video's place in the conversation is its placeholder: ``<video>``, ``<image>``, Video-LLaMA's
``<Video><ImageHere></Video>`` or ``<ImageHere>``; without one the video goes before the first user message (as
Video-LLaMA does). One video per conversation. Each item becomes one entry whose ``meta["conversation"]`` holds the
messages (roles ``system`` / ``user`` / ``assistant``, the placeholder normalised to ``<ImageHere>``); training
puts the clip's media tokens there and the loss on the assistant turns
(:meth:`vidlang.models.chat.ChatEncoder.conversation_loss`). Paths are relative to ``video_root`` (default: the
JSON's folder). Malformed items raise :class:`FormatError` naming ``file:line``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vidlang.data.formats.base import FORMATS, FormatError, read_json_items, resolve
from vidlang.data.sample import FormatIndex, VideoEntry
from vidlang.models.chat_format import PLACEHOLDER, check_conversation

PLACEHOLDERS = re.compile(r"<Video>\s*<ImageHere>\s*</Video>|<video>|<image>|<ImageHere>")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def place_video(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Normalise the video placeholder to ``<ImageHere>`` (no space around it is changed); without one, put it
    before the first user message."""
    out = [{"role": m["role"], "content": PLACEHOLDERS.sub(PLACEHOLDER, m["content"])} for m in messages]
    if not any(PLACEHOLDER in m["content"] for m in out):
        first = next((m for m in out if m["role"] == "user"), None)
        if first is not None:
            first["content"] = f"{PLACEHOLDER}\n{first['content']}"
    return out


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}: expected a non-empty string, got {value!r}")
    return value.strip()


def conversation_of(item: dict[str, Any]) -> list[dict[str, str]]:
    """The messages of one item in any of the three layouts (module docstring); ``ValueError`` when malformed."""
    if "QA" in item:
        qa = item["QA"]
        if not isinstance(qa, list) or not qa:
            raise ValueError("'QA' must be a non-empty list of {q, a}")
        messages = []
        for k, turn in enumerate(qa):
            if not isinstance(turn, dict):
                raise ValueError(f"QA[{k}]: expected an object {{i, q, a}}")
            instruction = turn.get("i") or ""
            if not isinstance(instruction, str):
                raise ValueError(f"QA[{k}].i: expected a string")
            q = _text(turn.get("q"), f"QA[{k}].q")
            user = f"{instruction.strip()}\n{q}" if instruction.strip() else q
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(turn.get("a"),
                                                                                                    f"QA[{k}].a")}]
        return messages
    if "conversations" in item:
        turns, role_key, text_key = item["conversations"], "from", "value"
    elif "messages" in item:
        turns, role_key, text_key = item["messages"], "role", "content"
    else:
        raise ValueError("expected 'QA', 'conversations' or 'messages'")
    if not isinstance(turns, list) or not turns:
        raise ValueError("the conversation must be a non-empty list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k}: expected an object")
        role = ROLE_NAMES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise ValueError(f"turn {k}: unknown {role_key} {turn.get(role_key)!r}; expected one of "
                             f"{sorted(ROLE_NAMES)}")
        messages.append({"role": role, "content": _text(turn.get(text_key), f"turn {k}.{text_key}")})
    return messages


@FORMATS.register("video_instruct")
def read_video_instruct(path: str, video_root: str | None = None) -> FormatIndex:
    """A JSON array of video conversations (module docstring) -> one entry per conversation."""
    kind, items = read_json_items(path, "instruction JSON")
    if kind != "list":
        raise FormatError(path, "expected a JSON array of conversations")
    root = Path(path).parent
    entries: list[VideoEntry] = []
    seen: dict[str, int] = {}
    for n, i, item in items:
        if not isinstance(item, dict):
            raise FormatError(path, f"item {i}: expected an object", line=n)
        video = item.get("video")
        if not isinstance(video, str) or not video.strip():
            raise FormatError(path, f"item {i}: missing 'video' (the clip's path)", line=n)
        try:
            messages = place_video(conversation_of(item))
            check_conversation(messages, 1)
        except ValueError as err:
            raise FormatError(path, f"item {i}: {err}", line=n) from None
        key = str(item.get("id", video))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            key = f"{key}#{seen[key] - 1}"
        entries.append(VideoEntry(resolve(video_root, video.strip(), root), key,
                                  meta={"conversation": messages}))
    return FormatIndex(entries, None, f"video instructions {path}")
