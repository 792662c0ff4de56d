"""Conversations -> text with the LLM tokenizer's own chat template -> token ids and loss mask (stage 2).

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}`` (an optional
system message first, then user / assistant turns alternating, ending with an assistant turn); the clip's
placeholder ``<ImageHere>`` sits in a user message where its media tokens go.

The text is the tokenizer's ``apply_chat_template`` (its ``chat_template``, or ``template`` when given, or
:data:`FALLBACK_CHAT_TEMPLATE`: Video-LLaMA's ``###Human: ... ###Assistant: ...`` turns, for tokenizers without
one). The loss covers the assistant turns only: for assistant message ``k`` the target span is the text that
``render(messages[:k+1])`` adds after ``render(messages[:k], add_generation_prompt=True)`` -- the answer and the
template's end-of-turn marker (so that the model learns to stop). Templates whose shorter renderings are not
prefixes of the longer ones (e.g. ones that rewrite earlier turns) are refused with a clear error.

Token ids: each text piece between placeholders is tokenized as a whole (``add_special_tokens=False``: the
template writes BOS and the markers itself) and a token is a target when its first character lies in a target
span (fast tokenizers' offsets; slow ones are tokenized span by span). Generation prompts are the same rendering
with ``add_generation_prompt=True``, tokenized the same way, so training and inference see the same ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PLACEHOLDER = "<ImageHere>"
ROLES = ("system", "user", "assistant")

FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}###Human: {{ m['content'] }} "
    "{% else %}###Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}###Assistant:{% endif %}"
)
"""Video-LLaMA's turn layout as a Jinja chat template (used when the tokenizer has no ``chat_template``)."""

Message = Mapping[str, str]


def check_conversation(messages: Sequence[Message], num_media: int = 1, final_assistant: bool = True) -> None:
    """Raise ``ValueError`` unless ``messages`` is [system], user, assistant, user, ... with ``num_media``
    placeholders in user messages (and, with ``final_assistant``, ending with an assistant turn)."""
    if not messages:
        raise ValueError("empty conversation")
    roles = [m.get("role") for m in messages]
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"unknown role(s) {bad}; roles are {ROLES}")
    turns = roles[1:] if roles[0] == "system" else roles
    if "system" in turns:
        raise ValueError("a system message may only come first")
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)]:
        raise ValueError(f"turns must alternate user, assistant, ... starting with user; got {turns}")
    if final_assistant and turns[-1] != "assistant":
        raise ValueError("the conversation must end with an assistant turn (the target)")
    for m in messages:
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message content must be a string, got {type(m.get('content')).__name__}")
    placed = sum(m["content"].count(PLACEHOLDER) for m in messages)
    in_user = sum(m["content"].count(PLACEHOLDER) for m in messages if m["role"] == "user")
    if placed != num_media or in_user != placed:
        raise ValueError(f"the conversation has {placed} {PLACEHOLDER} placeholder(s) ({in_user} in user turns) but "
                         f"{num_media} video(s) were given")


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False,
           template: str | None = None) -> str:
    """The conversation as text through the tokenizer's chat template (``template`` overrides it; the fallback
    when neither exists)."""
    chosen = template or getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt, chat_template=chosen)


def target_spans(tokenizer: Any, messages: Sequence[Message], template: str | None = None
                 ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character spans of its assistant turns (the loss)."""
    full = render(tokenizer, messages, False, template)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], True, template)
        upto = render(tokenizer, messages[: k + 1], False, template)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                "the chat template does not render a conversation as a prefix of its continuation (turn "
                f"{k}): loss masking needs render(messages[:k], add_generation_prompt=True) to be a prefix of "
                "render(messages[:k+1]); pass another chat template (ChatConfig.chat_template)")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def _slow_pieces(tokenizer: Any, text: str, start: int, spans: Sequence[tuple[int, int]]
                 ) -> tuple[list[int], list[bool]]:
    """Tokenize ``text`` (at offset ``start`` of the full text) span by span (tokenizers without offsets)."""
    cuts = sorted({0, len(text), *(min(max(p - start, 0), len(text)) for s in spans for p in s)})
    ids: list[int] = []
    mask: list[bool] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if a == b:
            continue
        piece = list(tokenizer(text[a:b], add_special_tokens=False)["input_ids"])
        hit = any(s <= start + a < e for s, e in spans)
        ids += piece
        mask += [hit] * len(piece)
    return ids, mask


def tokenize_with_targets(tokenizer: Any, text: str, start: int, spans: Sequence[tuple[int, int]]
                          ) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (a piece of the full text beginning at character ``start``) and, per token, whether
    its first character lies in one of ``spans`` (full-text coordinates)."""
    if not text:
        return [], []
    if not getattr(tokenizer, "is_fast", False):
        return _slow_pieces(tokenizer, text, start, spans)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [any(s <= start + a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return ids, mask


def conversation_pieces(tokenizer: Any, messages: Sequence[Message], num_media: int = 1,
                        template: str | None = None, add_generation_prompt: bool = False,
                        ) -> list[tuple[list[int], list[bool]]]:
    """The conversation as ``num_media + 1`` text pieces ``(ids, is_target)``: media ``k`` goes between piece
    ``k`` and ``k + 1``. With ``add_generation_prompt`` the conversation ends with a user turn and nothing is a
    target (a generation prompt)."""
    check_conversation(messages, num_media, final_assistant=not add_generation_prompt)
    if add_generation_prompt:
        text, spans = render(tokenizer, messages, True, template), []
    else:
        text, spans = target_spans(tokenizer, messages, template)
    pieces, start = [], 0
    for part in text.split(PLACEHOLDER):
        pieces.append(tokenize_with_targets(tokenizer, part, start, spans))
        start += len(part) + len(PLACEHOLDER)
    if len(pieces) != num_media + 1:  # the template itself wrote a placeholder
        raise ValueError(f"the rendered conversation has {len(pieces) - 1} {PLACEHOLDER} placeholders, expected "
                         f"{num_media}: {text!r}")
    return pieces


def user_turn(question: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-question prompt: ``[system], user(<ImageHere> + newline + question)``."""
    if PLACEHOLDER in question:
        raise ValueError(f"the question may not contain the placeholder {PLACEHOLDER}: {question!r}")
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": f"{PLACEHOLDER}\n{question}"}]
