"""The FastAPI application of ``vidlang serve``: routes, request parsing under limits, JSON errors.

Video input (``/embed``, ``/chat``), by ``Content-Type``:

* ``application/json`` -- ``{"path": "relative/or/absolute.mp4", ...}``, a file under the allowed root;
* ``multipart/form-data`` -- a file part named ``video`` (else the first file part) + text fields;
* ``video/*`` or ``application/octet-stream`` -- the raw bytes of one video (other fields in the query string).

Anything else is 415. Every request has one deadline (``timeout_s``) covering the upload, parsing, decoding
and inference: an upload still arriving then is 408, work still queued or running is cancelled (504). Errors
are JSON ``{"error": message, "status": code}``; OpenAPI at ``/docs`` and ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vidlang.serve import schemas
from vidlang.serve.engine import Engine, Job
from vidlang.serve.limits import Deadline, HttpError, confine_path, parse_json_object
from vidlang.serve.metrics import Metrics
from vidlang.serve.wakeup import LoopWaker

if TYPE_CHECKING:
    from vidlang.serve.app import ServeConfig

RAW_TYPES = ("application/octet-stream",)
ROUTES = ("/health", "/embed", "/search", "/chat", "/metrics")
READ_CHUNK = 1 << 16


@dataclass
class ServeState:
    """What the routes share: the model bundle, index, allowed root, config, engine and metrics."""

    bundle: Any
    index: Any | None
    root: str | None
    config: ServeConfig
    engine: Engine
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    _stopped: asyncio.Future | None = None
    _waker: LoopWaker | None = None

    @property
    def stopped(self) -> asyncio.Future:
        """Done once the server stops waiting for work (end of the shutdown grace period); on the event loop."""
        if self._stopped is None:
            self._stopped = asyncio.get_running_loop().create_future()
        return self._stopped

    @property
    def waker(self) -> LoopWaker:
        """Hands the engine's results to the event loop, one wake-up per burst (:mod:`vidlang.serve.wakeup`)."""
        if self._waker is None:
            self._waker = LoopWaker(asyncio.get_running_loop())
        return self._waker

    def stop_waiting(self) -> None:
        """Every request still waiting is answered 503 (called on the event loop)."""
        if not self.stopped.done():
            self.stopped.set_result(None)


class ClientGone(Exception):
    """The client closed the connection: nothing can be answered."""


# -- waiting under the deadline -------------------------------------------------------------------
async def bounded(state: ServeState, work: Awaitable[Any], deadline: Deadline, status: int, message: str) -> Any:
    """``await work`` until ``deadline``: then ``status`` (408 / 504) with ``message``; 503 once the server
    stops waiting (end of the shutdown grace period). The work is cancelled in both cases."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, state.stopped}, timeout=deadline.left(), return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    if state.stopped.done():
        raise HttpError(503, "the server is shutting down", {"Connection": "close"})
    raise HttpError(status, message, {"Connection": "close"} if status == 408 else None)


async def run_job(state: ServeState, request: Request, job: Job, deadline: Deadline) -> Any:
    """The job's result; 504 (job cancelled) when the deadline passes first, 503 when the server stops,
    nothing when the client leaves (the job is cancelled too)."""
    result = state.waker.wrap(job.future)
    result.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when nobody waits
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone, state.stopped}, timeout=deadline.left(),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in done:
        if result.cancelled():
            raise HttpError(503, "the server is shutting down", {"Connection": "close"})
        return result.result()
    if gone in done:
        job.cancel("client disconnected")
        raise ClientGone
    if state.stopped.done():
        job.cancel("shutdown")
        raise HttpError(503, "the server is shutting down", {"Connection": "close"})
    job.cancel("deadline")
    raise HttpError(504, f"the request did not finish within the {deadline.seconds:g} s limit")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the request body must have been read entirely)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- request bodies -------------------------------------------------------------------------------
async def read_body(state: ServeState, request: Request, limit: int, deadline: Deadline, what: str) -> bytes:
    """The whole body, at most ``limit`` bytes (413 from ``Content-Length`` before reading, or once exceeded
    while reading a chunked body); 408 when it has not arrived by the deadline."""
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:
        raise HttpError(413, f"{what} of {int(declared)} bytes exceeds the {_size(limit)} limit",
                        {"Connection": "close"})

    async def read() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise HttpError(413, f"{what} exceeds the {_size(limit)} limit", {"Connection": "close"})
        return bytes(data)

    try:
        return await bounded(state, read(), deadline, 408,
                             f"the request body was not received within the {deadline.seconds:g} s limit")
    except ClientDisconnect:
        raise ClientGone from None


def _size(n: int) -> str:
    return f"{n / 2**20:g} MB" if n >= 2**20 else f"{n / 1024:g} kB"


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(state: ServeState, request: Request, deadline: Deadline) -> dict[str, Any]:
    cfg = state.config
    data = await read_body(state, request, int(cfg.max_json_kb * 1024), deadline, "JSON body")
    return parse_json_object(data, cfg.max_json_depth)


async def form_body(state: ServeState, request: Request, deadline: Deadline) -> tuple[dict[str, bytes], dict[str, str]]:
    """``multipart/form-data`` -> (file parts by name, text fields by name), at most ``max_parts`` parts."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    cfg = state.config
    data = await read_body(state, request, int(cfg.max_upload_mb * 2**20), deadline, "request body")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), READ_CHUNK):
            yield data[i:i + READ_CHUNK]

    parser = MultiPartParser(request.headers, chunks(), max_files=cfg.max_parts, max_fields=cfg.max_parts,
                             max_part_size=int(cfg.max_json_kb * 1024))
    try:
        form = await bounded(state, parser.parse(), deadline, 408,
                             f"the multipart body was not parsed within the {deadline.seconds:g} s limit")
    except MultiPartException as err:
        raise HttpError(400, f"malformed multipart body: {err.message}") from None
    files: dict[str, bytes] = {}
    fields: dict[str, str] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files[name] = await value.read()
            else:
                fields[name] = value
    finally:
        await form.close()
    return files, fields


async def video_input(state: ServeState, request: Request, deadline: Deadline, obj: dict[str, Any] | None = None
                      ) -> tuple[str | bytes, str, dict[str, Any], bool]:
    """The request's video (real path or bytes), a display name, its other fields, and whether they came as
    JSON (typed strictly) rather than as text. ``obj``: the JSON body when the caller has read it already."""
    ctype = content_type(request)
    if ctype == "application/json":
        obj = obj if obj is not None else await json_body(state, request, deadline)
        if "path" not in obj:
            raise HttpError(400, "missing field 'path' (or upload the video as multipart or raw bytes)")
        return confine_path(state.root, obj["path"]), str(obj["path"]), obj, True
    if ctype == "multipart/form-data":
        files, fields = await form_body(state, request, deadline)
        if not files:
            raise HttpError(400, "the multipart body has no file part (name it 'video')")
        name = "video" if "video" in files else next(iter(files))
        return _nonempty(files[name]), f"<upload {name}>", fields, False
    if ctype.startswith("video/") or ctype in RAW_TYPES:
        data = await read_body(state, request, int(state.config.max_upload_mb * 2**20), deadline, "request body")
        return _nonempty(data), "<upload>", dict(request.query_params), False
    raise HttpError(415, f"unsupported Content-Type {ctype or '(none)'!r}: send application/json, "
                         "multipart/form-data, video/* or application/octet-stream")


def _nonempty(data: bytes) -> bytes:
    if not data:
        raise HttpError(400, "the uploaded video is empty")
    return data


def _text_field(value: str, name: str, limit: int) -> str:
    if not value.strip():
        raise HttpError(400, f"missing or empty field '{name}' (a string)")
    if len(value) > limit:
        raise HttpError(400, f"'{name}' is {len(value)} characters long; the limit is {limit}")
    return value


# -- the application ------------------------------------------------------------------------------
def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status, headers=headers or None)


def build_api(state: ServeState) -> FastAPI:
    """The FastAPI application over ``state`` (routes, exception handlers, OpenAPI)."""
    api = FastAPI(title="vidlang serve", version="1", summary="video embeddings, text search over an indexed "
                  "folder, and chat about a video", responses=schemas.ERROR_RESPONSES)
    _install_error_handlers(api)
    engine, cfg = state.engine, state.config

    @api.get("/health", response_model=schemas.Health)
    async def health() -> Response:
        b = state.bundle
        index = None if state.index is None else {"videos": len(state.index), "unreadable": len(state.index.failed),
                                                  "kind": getattr(state.index, "kind_name", "folder")}
        return JSONResponse({
            "status": "ok", "checkpoint_kind": getattr(b, "kind", "retrieval"), "embed_dim": b.embed_dim,
            "num_frames": b.num_frames, "image_size": b.image_size, "text": b.tokenizer is not None,
            "chat": b.chat is not None, "collection_chat": b.chat is not None and engine.rag is not None,
            "index": index, "paths": state.root is not None,
            "queue": {"depth": engine.depth, "max": cfg.max_queue},
            "uptime_s": round(time.monotonic() - state.started, 3),
        })

    @api.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @api.post("/embed", response_model=schemas.EmbedAnswer, openapi_extra=_video_body(schemas.EmbedRequest))
    async def embed(request: Request) -> Response:
        deadline = Deadline(cfg.timeout_s)
        source, name, _, _ = await video_input(state, request, deadline)
        embeds, tokens = await run_job(state, request, engine.embed_video(source, name, deadline), deadline)
        body: dict[str, Any] = {"embedding": embeds.tolist(), "dim": int(embeds.shape[0])}
        if tokens is not None:
            body["tokens"] = tokens.tolist()
            body["tokens_shape"] = list(tokens.shape)
        return JSONResponse(body)

    @api.post("/search", response_model=schemas.SearchAnswer,
              openapi_extra=_json_body(schemas.SearchRequest))
    async def search(request: Request) -> Response:
        deadline = Deadline(cfg.timeout_s)
        if state.index is None:
            raise HttpError(501, "no video index loaded: start the server with --index DIR (a folder of videos or a "
                                 "vector index)")
        if engine.text_bundle.tokenizer is None:
            raise HttpError(501, "this checkpoint has no text tokenizer: search needs a retrieval checkpoint "
                                 "(serve it with --ckpt, or with --rag-ckpt beside a chat checkpoint)")
        if content_type(request) != "application/json":
            raise HttpError(415, f"/search takes application/json, got {content_type(request) or '(none)'!r}")
        req = schemas.validate(schemas.SearchRequest, await json_body(state, request, deadline), strict=True)
        query = _text_field(req.query, "query", cfg.max_text_chars)
        hits = await run_job(state, request, engine.search(query, req.k, deadline), deadline)
        results = [{"rank": r, "path": p, "score": s} for r, (p, s) in enumerate(hits, 1)]
        return JSONResponse({"query": query, "k": req.k, "results": results})

    @api.post("/chat", response_model=schemas.ChatAnswer,
              openapi_extra=_video_body(schemas.ChatRequest, schemas.CollectionChatRequest),
              responses={200: {"content": {"text/plain": {}, "text/event-stream": {}}}})
    async def chat(request: Request) -> Response:
        deadline = Deadline(cfg.timeout_s)
        if state.bundle.chat is None:
            raise HttpError(501, "chat is not available: start the server with --llm DIR (a local causal LM)")
        obj = await json_body(state, request, deadline) if content_type(request) == "application/json" else None
        if obj is not None and "collection" in obj:
            return await collection_chat(obj, request, deadline)
        source, _, fields, typed = await video_input(state, request, deadline, obj)
        req = schemas.validate(schemas.ChatFields, fields, strict=typed)
        question = _text_field(req.question, "question", cfg.max_text_chars)
        mode = _stream_mode(req.stream, request)
        pieces = await chat_pieces(state, source, question, req.max_new_tokens, deadline)
        return await _answer_response(mode, pieces)

    async def collection_chat(obj: dict[str, Any], request: Request, deadline: Deadline) -> Response:
        """``/chat`` with ``"collection": true``: a question about the indexed videos (:mod:`vidlang.serve.rag`)."""
        if "path" in obj:
            raise HttpError(400, "give either 'path' (a question about one video) or \"collection\": true (about "
                                 "the indexed videos), not both")
        req = schemas.validate(schemas.CollectionChatRequest, obj, strict=True)
        if engine.rag is None:
            raise HttpError(501, "no video collection to answer about: start the server with --index DIR (a vector "
                                 "index or a folder of videos) and --rag-ckpt CKPT (the retrieval checkpoint whose "
                                 "embeddings it holds)")
        question = _text_field(req.question, "question", cfg.max_text_chars)
        mode = _stream_mode(req.stream, request)
        meta, pieces = await start_stream(state, lambda emit, on_meta: engine.rag_chat(
            question, req.k, req.max_new_tokens, deadline, emit, lambda out: on_meta(out.clips_json())), deadline)
        return await _answer_response(mode, pieces, {"k": req.k, **(meta or {"clips": [], "skipped": []})})

    api.state.hot_routes = {"/embed": embed, "/search": search}
    return api


class HotRoutes:
    """ASGI: ``POST /embed`` and ``POST /search`` go straight to their endpoints (which read the request
    themselves), past FastAPI's routing, dependency solving and middleware stack -- about 0.05 ms of the event
    loop per request, measured. Their errors get the same exception handlers (500: the handler's answer, then
    the exception goes on to the server's log, as in Starlette). Everything else, and the OpenAPI description of
    these routes, is FastAPI's."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self.routes: dict[str, Any] = api.state.hot_routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.api(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as err:
            handler, key = _exception_handler(self.api.exception_handlers, err)
            if handler is None:
                raise
            await (await handler(request, err))(scope, receive, send)
            if key is Exception:  # a bug: answered, and logged by the server
                raise
            return
        await response(scope, receive, send)


def _exception_handler(handlers: dict[Any, Any], err: Exception) -> tuple[Any, Any]:
    """The handler registered for the nearest class of ``err`` (as Starlette looks it up), and that class."""
    for cls in type(err).__mro__:
        if cls in handlers:
            return handlers[cls], cls
    return None, None


def _install_error_handlers(api: FastAPI) -> None:
    from vidlang.data.decoding import VideoDecodeError
    from vidlang.serve.decoding import VideoTooLongError

    @api.exception_handler(HttpError)
    async def http_error(request: Request, err: HttpError) -> Response:
        return error_response(err.status, err.message, err.headers)

    @api.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, err: StarletteHTTPException) -> Response:
        headers = dict(err.headers or {})
        if err.status_code == 404:
            message = f"unknown route {request.url.path!r}; routes: {', '.join(sorted(ROUTES))} (API docs: /docs)"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {headers.get('Allow', '?')})"
        else:
            message = str(err.detail)
        return error_response(err.status_code, message, headers)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        return error_response(400, f"'{'.'.join(str(p) for p in first['loc'])}': {first['msg']}")

    @api.exception_handler(VideoDecodeError)
    async def decode_error(request: Request, err: VideoDecodeError) -> Response:
        if isinstance(err, VideoTooLongError):
            return error_response(413, f"the video is {err.reason}")
        return error_response(422, f"cannot decode the video: {err.reason}")

    @api.exception_handler(ClientGone)
    @api.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, err: Exception) -> Response:
        return Response(status_code=499)  # never sent: the connection is gone

    @api.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        return error_response(500, f"internal error: {type(err).__name__}: {err}")


def _json_body(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _video_body(model: type, *alternatives: type) -> dict[str, Any]:
    """A video route's body; ``alternatives``: other JSON bodies the route accepts."""
    json_schema = model.model_json_schema()
    if alternatives:
        json_schema = {"oneOf": [json_schema, *(m.model_json_schema() for m in alternatives)]}
    upload = {"type": "object", "properties": {"video": {"type": "string", "format": "binary"}}, "required": ["video"]}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_schema},
        "multipart/form-data": {"schema": upload},
        "video/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}}


def _stream_mode(stream: Any, request: Request) -> str:
    """``text`` (chunked text), ``sse`` (also chosen by ``Accept: text/event-stream``) or ``json`` (one JSON)."""
    mode = str(stream).lower()
    if "text/event-stream" in request.headers.get("accept", ""):
        mode = "sse"
    if mode not in ("text", "sse", "false", "0", "true", "1"):
        raise HttpError(400, f"'stream' must be true, false or 'sse', got {stream!r}")
    return "json" if mode in ("false", "0") else "sse" if mode == "sse" else "text"


async def _answer_response(mode: str, pieces: AsyncIterator[str], meta: dict[str, Any] | None = None) -> Response:
    """The answer as ``mode`` (:func:`_stream_mode`). ``meta`` (the clips of a collection answer) goes into the
    JSON answer, into the SSE ``done`` event, and (compact JSON) into the ``X-Vidlang-Clips`` header."""
    if mode == "json":
        text = "".join([p async for p in pieces])
        return JSONResponse({"answer": text.strip(), **(meta or {})})
    headers = {"X-Content-Type-Options": "nosniff"}
    if meta is not None:
        headers["X-Vidlang-Clips"] = json.dumps(meta, separators=(",", ":"))
    if mode == "sse":
        return StreamingResponse(_sse(pieces, meta), media_type="text/event-stream; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", **headers})
    return StreamingResponse(_utf8(pieces), media_type="text/plain; charset=utf-8", headers=headers)


# -- chat streaming -------------------------------------------------------------------------------
async def chat_pieces(state: ServeState, source: str | bytes, question: str, max_new: int, deadline: Deadline
                      ) -> AsyncIterator[str]:
    """Start generation; 504 / 4xx before the first piece, else an async iterator of the text pieces (the job
    is cancelled when the iterator is closed early: client gone, deadline passed)."""
    _, pieces = await start_stream(state, lambda emit, _: state.engine.chat(source, question, max_new, deadline,
                                                                           emit), deadline)
    return pieces


async def start_stream(state: ServeState, start: Any, deadline: Deadline
                       ) -> tuple[Any | None, AsyncIterator[str]]:
    """``start(emit, on_meta) -> Job`` starts generation; ``on_meta`` may be called once before the first piece.
    Returns (that meta or None, the async iterator of text pieces); 504 / 4xx before the first piece."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    job = start(lambda piece: put(("piece", piece)), lambda meta: put(("meta", meta)))
    job.future.add_done_callback(lambda f: put(("end", f)))

    async def next_item() -> tuple[str, Any]:
        try:
            return await bounded(state, out.get(), deadline, 504,
                                 f"the answer did not finish within the {deadline.seconds:g} s limit")
        except HttpError:
            job.cancel("deadline")
            raise

    first = await next_item()
    meta = None
    if first[0] == "meta":
        meta, first = first[1], await next_item()
    if first[0] == "end":
        _raise_from(first[1])

    async def pieces() -> AsyncIterator[str]:
        item = first
        try:
            while item[0] == "piece":
                if item[1]:
                    yield item[1]
                item = await next_item()
            _raise_from(item[1])
        finally:
            job.cancel("stream closed")

    return meta, pieces()


def _raise_from(future: Any) -> None:
    if future.cancelled():
        raise HttpError(503, "the answer was cancelled (the server is shutting down)")
    if future.exception() is not None:
        raise future.exception()


async def _utf8(pieces: AsyncIterator[str]) -> AsyncIterator[bytes]:
    try:
        async for piece in pieces:
            yield piece.encode("utf-8")
    except Exception as err:  # the status is sent: report in-band and end the stream
        yield f"\n[error: {_message(err)}]\n".encode()


async def _sse(pieces: AsyncIterator[str], done: dict[str, Any] | None = None) -> AsyncIterator[bytes]:
    """Text pieces -> server-sent events: ``data:`` per piece, then ``event: done`` with ``done`` as its JSON
    data (``{}`` by default), or ``event: error``."""
    try:
        async for piece in pieces:
            yield ("".join(f"data: {line}\n" for line in piece.split("\n")) + "\n").encode("utf-8")
    except Exception as err:
        yield f"event: error\ndata: {json.dumps({'error': _message(err)})}\n\n".encode()
        return
    yield f"event: done\ndata: {json.dumps(done or {})}\n\n".encode()


def _message(err: Exception) -> str:
    return err.message if isinstance(err, HttpError) else str(err)
