"""The HTTP server of ``vidlang serve`` on the standard library (``ThreadingHTTPServer``, HTTP/1.1).

Concurrency: every connection gets a thread; decoding and model work run on a bounded thread pool
(``workers``) with a per-request deadline (504 when exceeded; the server stays up). The model is shared,
in eval mode, and every forward pass holds the bundle's lock; the index is read-only while serving.
Shutdown (:meth:`ServeApp.shutdown`, or SIGINT/SIGTERM under :meth:`ServeApp.serve_forever`) stops
accepting, waits up to ``grace_s`` for requests in flight, then closes the socket and the pool.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from vidlang.serve.handlers import ROUTES, JsonResponse, Request, StreamResponse
from vidlang.serve.limits import Deadline, HttpError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = an ephemeral port
    max_upload_mb: float = 64.0
    timeout_s: float = 30.0  # per request: reading the body, and decode + inference
    workers: int = 2  # inference thread pool
    grace_s: float = 5.0  # shutdown waits this long for requests in flight
    log_requests: bool = True


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": message, "status": status}


class ServeApp:
    """State shared by the request threads: bundle, optional index, allowed root, pool, limits."""

    def __init__(self, bundle: Any, config: ServeConfig, index: Any | None = None, root: str | None = None) -> None:
        self.bundle, self.config, self.index, self.root = bundle, config, index, root
        self.executor = cf.ThreadPoolExecutor(max_workers=max(1, config.workers), thread_name_prefix="vidlang-infer")
        self.started = time.monotonic()
        self._inflight = 0
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.server = ThreadingHTTPServer((config.host, config.port), make_handler(self))
        self.server.daemon_threads = True

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def uptime(self) -> float:
        return time.monotonic() - self.started

    # -- in-flight accounting ------------------------------------------------------------------------
    def enter(self) -> None:
        with self._idle:
            self._inflight += 1

    def leave(self) -> None:
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> ServeApp:
        """Serve on a background thread (for tests and tools); returns self."""
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="vidlang-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until SIGINT/SIGTERM, then shut down gracefully."""

        def stop(signum: int, frame: Any) -> None:
            threading.Thread(target=self.server.shutdown, daemon=True).start()

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.shutdown()

    def shutdown(self) -> None:
        """Stop accepting, wait up to ``grace_s`` for requests in flight, close the socket and the pool."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=10)
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=self.config.grace_s)
        self.server.server_close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ServeApp:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def make_handler(app: ServeApp) -> type[BaseHTTPRequestHandler]:
    """A request-handler class bound to ``app``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "vidlang-serve"
        timeout = app.config.timeout_s  # socket timeout: a client that stalls is dropped

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._dispatch("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._dispatch("DELETE")

        def do_PATCH(self) -> None:  # noqa: N802
            self._dispatch("PATCH")

        def _dispatch(self, method: str) -> None:
            app.enter()
            try:
                self._handle(method)
            finally:
                app.leave()

        def _handle(self, method: str) -> None:
            parts = urlsplit(self.path)
            req = Request(method, parts.path, dict(parse_qsl(parts.query)), self.headers, self.rfile,
                          int(app.config.max_upload_mb * 2**20))
            deadline = Deadline(app.config.timeout_s)
            try:
                response = self._route(req, deadline)
            except HttpError as err:
                response = JsonResponse(error_body(err.status, err.message), err.status)
                self._extra_headers = err.headers
            except Exception as err:  # noqa: BLE001 - every failure becomes a JSON answer
                response = _map_exception(err)
            unread = not _body_done(req)
            if unread:
                self.close_connection = True  # an unread body would corrupt the next request
            self._send(response)
            if unread:
                self._linger()

        def _linger(self, seconds: float = 1.0) -> None:
            """After answering without reading the body: stop writing, then discard what the client is still
            sending for a moment, so that it sees the answer instead of a reset connection."""
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.2)
                end = time.monotonic() + seconds
                while time.monotonic() < end and self.connection.recv(1 << 16):
                    pass
            except OSError:
                pass

        def handle_expect_100(self) -> bool:
            """``Expect: 100-continue``: refuse an oversized body (413) before the client sends it."""
            req = Request("POST", self.path, {}, self.headers, self.rfile, int(app.config.max_upload_mb * 2**20))
            try:
                n = req.declared_length()
                if n is not None and n > req.max_bytes:
                    req.body()  # raises the 413
            except HttpError as err:
                self.close_connection = True
                self._send(JsonResponse(error_body(err.status, err.message), err.status))
                return False
            return super().handle_expect_100()

        def _route(self, req: Request, deadline: Deadline) -> Any:
            methods = ROUTES.get(req.path.rstrip("/") or "/")
            if methods is None:
                raise HttpError(404, f"unknown route {req.path!r}; routes: {', '.join(sorted(ROUTES))}")
            if req.method not in methods:
                allowed = ", ".join(sorted(methods))
                raise HttpError(405, f"{req.method} is not allowed on {req.path} (allowed: {allowed})",
                                {"Allow": allowed})
            return methods[req.method](app, req, deadline)

        def _send(self, response: Any) -> None:
            extra = getattr(self, "_extra_headers", {})
            self._extra_headers = {}
            if isinstance(response, StreamResponse):
                self._send_stream(response)
                return
            data = (json.dumps(response.body) + "\n").encode("utf-8")
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra.items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _send_stream(self, response: StreamResponse) -> None:
            self.send_response(200)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in response.headers.items():
                self.send_header(k, v)
            self.end_headers()
            try:
                for chunk in response.chunks:
                    self._chunk(chunk)
            except Exception as err:  # noqa: BLE001 - the status is sent: report in-band and end the stream
                self._chunk(f"\n[error: {err}]\n".encode())
                self.close_connection = True
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _chunk(self, data: bytes) -> None:
            if data:
                self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base-class signature)
            if app.config.log_requests:
                sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    return Handler


def _body_done(req: Request) -> bool:
    try:
        return req.body_consumed
    except HttpError:
        return False


def _map_exception(err: Exception) -> JsonResponse:
    """Other errors -> JSON answers: 422 undecodable video, 408 body read timed out, else 500."""
    from vidlang.data.decoding import VideoDecodeError

    if isinstance(err, VideoDecodeError):
        return JsonResponse(error_body(422, f"cannot decode the video: {err.reason}"), 422)
    if isinstance(err, TimeoutError):  # the socket timeout while reading the request body
        return JsonResponse(error_body(408, "the request body was not received in time"), 408)
    return JsonResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"), 500)
