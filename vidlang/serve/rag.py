"""Retrieval-augmented chat: a question about a *collection* of videos.

:class:`CollectionRetriever` is a retrieval checkpoint (its text tower) and the index of its video embeddings
(a vector index built by ``vidlang index build``, checked against the checkpoint as ``vidlang search`` does, or
a folder of videos embedded by it). :func:`answer_collection` embeds the question with that text tower, takes
the top-``k`` clips, decodes them at the chat model's clip size (:meth:`InferenceBundle.decode_clip`), and asks
the chat encoder about all of them at once: their Q-former tokens go into one prompt in rank order, numbered
``Clip 1: ...``, ``Clip 2: ...`` (``ChatEncoder.collection_sequence``). A clip that cannot be decoded is
skipped and reported, never replaced; when none can be, :class:`NoClipsError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS, VideoDecodeError
from vidlang.errors import CheckpointError
from vidlang.serve.schemas import MAX_RAG_K


class NoClipsError(VideoDecodeError):
    """None of the retrieved clips could be decoded."""


@dataclass
class RetrievedClip:
    """One retrieved clip: its 1-based ``rank``, the index's ``id`` and ``path`` (source), cosine ``score``."""

    rank: int
    id: str
    path: str
    score: float
    caption: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "id": self.id, "path": self.path, "score": self.score}
        if self.caption is not None:
            out["caption"] = self.caption
        return out


@dataclass
class CollectionAnswer:
    """The clips whose tokens were fed (rank order), the retrieved clips skipped (with the reason), the answer
    (a string, or an iterator of text pieces when streaming)."""

    clips: list[RetrievedClip]
    skipped: list[tuple[RetrievedClip, str]] = field(default_factory=list)
    answer: str | Iterator[str] = ""

    def clips_json(self) -> dict[str, Any]:
        return {"clips": [c.to_json() for c in self.clips],
                "skipped": [{**c.to_json(), "error": why} for c, why in self.skipped]}


def check_k(k: Any, limit: int = MAX_RAG_K) -> int:
    """``k`` as an integer in ``1..limit`` (``True``, ``"3"`` or ``2.5`` are refused): ``ValueError`` otherwise."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(f"k must be an integer in 1..{limit}, got {k!r}")
    return k


class CollectionRetriever:
    """A retrieval bundle (with a text tokenizer) + the index of its video embeddings -> top-k clips."""

    def __init__(self, bundle: Any, index: Any, root: str | os.PathLike | None = None,
                 what: str = "the retrieval checkpoint") -> None:
        """``root``: the folder relative index paths are resolved against (default: a folder index's own
        folder; a vector index's sources are used as written, relative to the working directory)."""
        if getattr(bundle, "tokenizer", None) is None:
            raise CheckpointError(f"{what}: has no text tokenizer; retrieval-augmented chat needs a retrieval "
                                  "checkpoint (its text tower embeds the question)")
        if hasattr(index, "check_model"):  # a vector index: made from this checkpoint's embeddings only
            index.check_model(bundle, what)
        self.bundle, self.index = bundle, index
        base = root if root is not None else getattr(index, "root", None)
        self.root = Path(base) if base is not None else None

    def __len__(self) -> int:
        return len(self.index)

    def search(self, question: str, k: int) -> list[RetrievedClip]:
        """The top-``k`` clips for ``question``, best first."""
        check_k(k)
        query = self.bundle.embed_texts([question])  # [1, E]
        if hasattr(self.index, "search_hits"):
            hits = self.index.search_hits(query, k)[0]
            return [RetrievedClip(r, h.id, h.source, h.score, h.caption) for r, h in enumerate(hits, 1)]
        return [RetrievedClip(r, p, p, s) for r, (p, s) in enumerate(self.index.search_batch(query, k)[0], 1)]

    def resolve(self, clip: RetrievedClip) -> str:
        """The file to decode for ``clip``."""
        path = Path(clip.path)
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        return str(path)


def answer_collection(chat: Any, retriever: CollectionRetriever, question: str, k: int, max_new_tokens: int = 64,
                      stream: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      max_seconds: float | None = None, alive: Callable[[], bool] = lambda: True
                      ) -> CollectionAnswer | None:
    """Retrieve the top-``k`` clips for ``question``, decode them with ``chat`` (an
    :class:`~vidlang.serve.inference.InferenceBundle` with a chat encoder) and answer about them (see the module
    docstring). ``alive()`` is checked between clips: ``None`` when it turns false (the request was cancelled)."""
    hits = retriever.search(question, k)
    clips, audio, used, skipped = [], [], [], []
    for hit in hits:
        if not alive():
            return None
        source = retriever.resolve(hit)
        try:
            clips.append(chat.decode_clip(source, hit.path, max_pixels, max_seconds))
            audio.append(chat.decode_audio(source, max_pixels) if chat.chat_audio else None)
        except (VideoDecodeError, OSError) as err:
            if len(clips) > len(audio):
                clips.pop()
            skipped.append((hit, getattr(err, "reason", None) or str(err)))
            continue
        used.append(hit)
    if not used:
        why = "; ".join(f"{c.path}: {r}" for c, r in skipped) or "the index is empty"
        raise NoClipsError("<collection>", getattr(chat, "backend", "auto"),
                           f"none of the top-{k} clips could be decoded ({why})")
    if not alive():
        return None
    answer = chat.answer_clips(clips, question, audio, max_new_tokens=max_new_tokens, stream=stream)
    return CollectionAnswer(used, skipped, answer)
