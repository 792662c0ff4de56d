"""Typed request and answer bodies of the HTTP API (pydantic): validation and the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vidlang.serve.limits import HttpError

MAX_K = 1000
MAX_NEW_TOKENS = 512
MAX_RAG_K = 16  # clips per collection question: each adds the chat encoder's query tokens to the prompt


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbedRequest(_Body):
    """``/embed`` with a file on the server (else upload the video: multipart or raw bytes)."""

    path: str = Field(description="a video under the server's allowed root (relative to it, or absolute)")


class SearchRequest(_Body):
    query: str = Field(description="the text to search the indexed videos for")
    k: int = Field(5, ge=1, le=MAX_K, description="how many results")


class ChatFields(_Body):
    """``/chat``'s fields besides the video (JSON fields, multipart text fields or query parameters)."""

    question: str
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    stream: bool | str = Field("text", description="'text' (default, chunked text), 'sse', or false (one JSON)")


class CollectionChatRequest(ChatFields):
    """``/chat`` about the indexed videos (JSON only): the question is embedded by the retrieval checkpoint, the
    top-``k`` clips are decoded and their tokens fed to the LLM in rank order."""

    collection: Literal[True] = Field(description="true: answer about the top-k clips of the server's index")
    k: int = Field(3, ge=1, le=MAX_RAG_K, description="how many retrieved clips the answer sees")


class ChatRequest(ChatFields):
    path: str = Field(description="a video under the allowed root (or upload it: multipart with a 'video' part)")


class ChatAnswer(BaseModel):
    answer: str
    k: int | None = Field(None, description="collection questions: the k asked for")
    clips: list[dict[str, Any]] | None = Field(None, description="collection questions: the clips whose tokens the "
                                               "answer saw, in rank order (rank, id, path, score[, caption])")
    skipped: list[dict[str, Any]] | None = Field(None, description="retrieved clips that could not be decoded")


class EmbedAnswer(BaseModel):
    embedding: list[float] = Field(description="L2-normalised video embedding [E]")
    dim: int
    tokens: list[list[float]] | None = Field(None, description="query tokens [Q, D] (query-token blocks only)")
    tokens_shape: list[int] | None = None


class SearchHit(BaseModel):
    rank: int
    path: str = Field(description="the video's path in the folder, or a vector index row's source")
    score: float


class SearchAnswer(BaseModel):
    query: str
    k: int
    results: list[SearchHit]


class IndexInfo(BaseModel):
    videos: int
    unreadable: int
    kind: str = Field("folder", description="'folder' (a folder of videos embedded at start) or the vector index "
                      "kind (flat, hnsw, ivfpq)")


class QueueInfo(BaseModel):
    depth: int
    max: int


class Health(BaseModel):
    status: str
    checkpoint_kind: str
    embed_dim: int
    num_frames: int
    image_size: int
    text: bool
    chat: bool
    collection_chat: bool = Field(False, description="whether /chat answers questions about the indexed videos")
    index: IndexInfo | None
    paths: bool
    queue: QueueInfo
    uptime_s: float


class ErrorAnswer(BaseModel):
    """Every error, whatever its origin (application, limits, the HTTP layer)."""

    error: str
    status: int


def validate(model: type[BaseModel], obj: dict[str, Any], strict: bool) -> Any:
    """``obj`` as ``model``; 400 naming the first wrong field. ``strict``: JSON bodies (no type coercion: ``"5"``
    or ``true`` is not an integer); form fields and query strings are text, so they are coerced."""
    try:
        return model.model_validate(obj, strict=strict)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "missing":
            raise HttpError(400, f"missing field '{name}'") from None
        raise HttpError(400, f"'{name}': {first['msg']}") from None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorAnswer, "description": why} for code, why in [
        (400, "malformed request, or a field out of range"), (403, "path outside the allowed root"),
        (404, "no such file or route"), (408, "the request did not arrive in time"),
        (413, "body, part or video over a limit"), (415, "unsupported Content-Type"),
        (422, "the video cannot be decoded"), (501, "not available on this server"),
        (503, "queue full (Retry-After) or shutting down"), (504, "the deadline passed; the work was stopped"),
    ]
}
