"""The endpoints of ``vidlang serve``: request parsing and one function per route (:data:`ROUTES`).

Video input (``/embed``, ``/chat``), by ``Content-Type``:

* ``application/json`` -- ``{"path": "relative/or/absolute.mp4", ...}``, a file under the allowed root;
* ``multipart/form-data`` -- a file part named ``video`` (else the first file part) + text fields;
* ``video/*`` or ``application/octet-stream`` -- the raw bytes of one video (other fields in the query string).

Anything else is 415. Errors are JSON ``{"error": message, "status": code}``.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING, Any, BinaryIO

from vidlang.serve.limits import Deadline, HttpError, confine_path, run_with_deadline

if TYPE_CHECKING:
    from vidlang.serve.app import ServeApp

RAW_TYPES = ("application/octet-stream",)
MAX_K = 1000
MAX_NEW_TOKENS = 512


@dataclass
class JsonResponse:
    body: dict[str, Any]
    status: int = 200


@dataclass
class StreamResponse:
    """A ``200`` answered with ``Transfer-Encoding: chunked``; each item of ``chunks`` is sent as one chunk."""

    content_type: str
    chunks: Iterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


Response = JsonResponse | StreamResponse


@dataclass
class Request:
    """One request; the body is read on demand (:meth:`body`) after the size check."""

    method: str
    path: str
    query: dict[str, str]
    headers: Message
    rfile: BinaryIO
    max_bytes: int
    _body: bytes | None = None

    @property
    def content_type(self) -> str:
        return (self.headers.get_content_type() if self.headers.get("Content-Type") else "").lower()

    @property
    def body_consumed(self) -> bool:
        """Whether nothing of the request body is left unread on the connection."""
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        return self._body is not None or (not chunked and (self.declared_length() or 0) == 0)

    def declared_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            n = int(raw)
        except ValueError:
            raise HttpError(400, f"invalid Content-Length {raw!r}") from None
        if n < 0:
            raise HttpError(400, f"invalid Content-Length {raw!r}")
        return n

    def body(self) -> bytes:
        """The whole body; 413 (before reading anything) when it is larger than the upload limit."""
        if self._body is not None:
            return self._body
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise HttpError(411, "chunked request bodies are not accepted: send a Content-Length")
        n = self.declared_length()
        if n is None:
            raise HttpError(411, "a Content-Length header is required")
        if n > self.max_bytes:
            limit_mb = self.max_bytes / 2**20
            raise HttpError(413, f"request body of {n} bytes exceeds the {limit_mb:g} MB limit")
        data = self.rfile.read(n)
        if len(data) != n:
            raise HttpError(400, f"request body truncated: got {len(data)} of {n} bytes")
        self._body = data
        return data

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.body().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise HttpError(400, f"malformed JSON body: {err}") from None
        if not isinstance(obj, dict):
            raise HttpError(400, f"the JSON body must be an object, got {type(obj).__name__}")
        return obj

    def multipart(self) -> tuple[dict[str, bytes], dict[str, str]]:
        """``multipart/form-data`` -> (file parts by name, text fields by name)."""
        from email import policy
        from email.parser import BytesParser

        header = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode("latin-1")
        msg = BytesParser(policy=policy.HTTP).parsebytes(header + self.body())
        if not msg.is_multipart() or not msg.get_boundary():
            raise HttpError(400, "malformed multipart body (no boundary or no parts)")
        files: dict[str, bytes] = {}
        fields: dict[str, str] = {}
        for i, part in enumerate(msg.iter_parts()):
            name = part.get_param("name", header="content-disposition") or f"part{i}"
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                files[str(name)] = payload
            else:
                fields[str(name)] = payload.decode("utf-8", errors="replace")
        return files, fields


# -- video input -----------------------------------------------------------------------------------
def video_input(app: ServeApp, req: Request) -> tuple[str | bytes, str, dict[str, Any]]:
    """The request's video (real path or bytes), a display name, and its other fields."""
    ctype = req.content_type
    if ctype == "application/json":
        obj = req.json()
        if "path" not in obj:
            raise HttpError(400, "missing field 'path' (or upload the video as multipart or raw bytes)")
        return confine_path(app.root, obj["path"]), str(obj["path"]), obj
    if ctype == "multipart/form-data":
        files, fields = req.multipart()
        if not files:
            raise HttpError(400, "the multipart body has no file part (name it 'video')")
        name = "video" if "video" in files else next(iter(files))
        return _nonempty(files[name]), f"<upload {name}>", fields
    if ctype.startswith("video/") or ctype in RAW_TYPES:
        return _nonempty(req.body()), "<upload>", dict(req.query)
    raise HttpError(415, f"unsupported Content-Type {ctype or '(none)'!r}: send application/json, "
                         "multipart/form-data, video/* or application/octet-stream")


def _nonempty(data: bytes) -> bytes:
    if not data:
        raise HttpError(400, "the uploaded video is empty")
    return data


def _int_field(fields: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = fields.get(name, default)
    try:
        n = int(value)
        if isinstance(value, float) or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise HttpError(400, f"'{name}' must be an integer, got {value!r}") from None
    if not low <= n <= high:
        raise HttpError(400, f"'{name}' must be between {low} and {high}, got {n}")
    return n


# -- endpoints -------------------------------------------------------------------------------------
def health(app: ServeApp, req: Request, deadline: Deadline) -> Response:
    b = app.bundle
    index = None if app.index is None else {"videos": len(app.index), "unreadable": len(app.index.failed)}
    return JsonResponse({
        "status": "ok", "checkpoint_kind": getattr(b, "kind", "retrieval"), "embed_dim": b.embed_dim,
        "num_frames": b.num_frames, "image_size": b.image_size, "text": b.tokenizer is not None,
        "chat": b.chat is not None, "index": index, "paths": app.root is not None,
        "uptime_s": round(app.uptime(), 3),
    })


def embed(app: ServeApp, req: Request, deadline: Deadline) -> Response:
    source, name, _ = video_input(app, req)
    out = run_with_deadline(app.executor, deadline, app.bundle.embed_video, source, name)
    body: dict[str, Any] = {"embedding": out.embeds[0].tolist(), "dim": int(out.embeds.shape[1])}
    if out.tokens is not None:
        body["tokens"] = out.tokens[0].tolist()
        body["tokens_shape"] = list(out.tokens.shape[1:])
    return JsonResponse(body)


def search(app: ServeApp, req: Request, deadline: Deadline) -> Response:
    if app.index is None:
        raise HttpError(501, "no video index loaded: start the server with --index DIR")
    if app.bundle.tokenizer is None:
        raise HttpError(501, "this checkpoint has no text tokenizer: search needs a retrieval checkpoint")
    if req.content_type != "application/json":
        raise HttpError(415, f"/search takes application/json, got {req.content_type or '(none)'!r}")
    obj = req.json()
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise HttpError(400, "missing or empty field 'query' (a string)")
    k = _int_field(obj, "k", 5, 1, MAX_K)
    text = run_with_deadline(app.executor, deadline, app.bundle.embed_texts, [query])  # [1, E]
    hits = app.index.search(text[0], k)
    results = [{"rank": r, "path": p, "score": s} for r, (p, s) in enumerate(hits, 1)]
    return JsonResponse({"query": query, "k": k, "results": results})


def chat(app: ServeApp, req: Request, deadline: Deadline) -> Response:
    if app.bundle.chat is None:
        raise HttpError(501, "chat is not available: start the server with --llm DIR (a local causal LM)")
    source, _, fields = video_input(app, req)
    question = fields.get("question")
    if not isinstance(question, str) or not question.strip():
        raise HttpError(400, "missing or empty field 'question' (a string)")
    max_new = _int_field(fields, "max_new_tokens", 64, 1, MAX_NEW_TOKENS)
    mode = str(fields.get("stream", "text")).lower()
    if "text/event-stream" in (req.headers.get("Accept") or ""):
        mode = "sse"
    if mode not in ("text", "sse", "false", "0", "true", "1"):
        raise HttpError(400, f"'stream' must be true, false or 'sse', got {fields.get('stream')!r}")
    pieces = _chat_pieces(app, source, question, max_new, deadline)
    if mode in ("false", "0"):
        return JsonResponse({"answer": "".join(p.decode() for p in pieces).strip()})
    if mode == "sse":
        return StreamResponse("text/event-stream; charset=utf-8", _sse(pieces), {"Cache-Control": "no-cache"})
    return StreamResponse("text/plain; charset=utf-8", pieces)


ROUTES: dict[str, dict[str, Callable[..., Response]]] = {
    "/health": {"GET": health},
    "/embed": {"POST": embed},
    "/search": {"POST": search},
    "/chat": {"POST": chat},
}


# -- chat streaming ----------------------------------------------------------------------------------
class StreamTimeout(Exception):
    """The deadline passed after the answer had started streaming (the status was already sent)."""


def _chat_pieces(app: ServeApp, source: str | bytes, question: str, max_new: int, deadline: Deadline
                 ) -> Iterator[bytes]:
    """Start generation on the executor; 504/4xx before the first piece, else an iterator of UTF-8 pieces."""
    out: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            with app.bundle.chat_lock:
                for piece in app.bundle.answer(source, question, max_new_tokens=max_new, stream=True):
                    if cancel.is_set():
                        break
                    out.put(("piece", piece))
            out.put(("done", None))
        except BaseException as err:  # handed to the request thread
            out.put(("error", err))

    try:
        app.executor.submit(work)
    except RuntimeError as err:
        raise HttpError(503, "the server is shutting down") from err
    first = _next(out, deadline, cancel)
    if first[0] == "error":
        raise first[1]
    return _drain(first, out, deadline, cancel)


def _next(out: queue.Queue, deadline: Deadline, cancel: threading.Event) -> tuple[str, Any]:
    try:
        return out.get(timeout=deadline.left())
    except queue.Empty:
        cancel.set()
        raise HttpError(504, f"the answer did not start within the {deadline.seconds:g} s limit") from None


def _drain(first: tuple[str, Any], out: queue.Queue, deadline: Deadline, cancel: threading.Event
           ) -> Iterator[bytes]:
    item = first
    try:
        while item[0] == "piece":
            if item[1]:
                yield item[1].encode("utf-8")
            try:
                item = out.get(timeout=deadline.left())
            except queue.Empty:
                raise StreamTimeout(f"the answer did not finish within the {deadline.seconds:g} s limit") from None
        if item[0] == "error":
            raise item[1]
    finally:
        cancel.set()


def _sse(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Text pieces -> server-sent events: ``data:`` per piece, then ``event: done`` (or ``event: error``)."""
    try:
        for piece in pieces:
            lines = piece.decode("utf-8").split("\n")
            yield ("".join(f"data: {line}\n" for line in lines) + "\n").encode("utf-8")
    except Exception as err:
        yield f"event: error\ndata: {json.dumps({'error': str(err)})}\n\n".encode()
        return
    yield b"event: done\ndata: {}\n\n"
