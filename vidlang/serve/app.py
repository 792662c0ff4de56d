"""``vidlang serve``: the FastAPI application (:mod:`vidlang.serve.routes`) on uvicorn.

:class:`ServeApp` binds the listening socket (with a real backlog), builds the inference engine
(:mod:`vidlang.serve.engine`), the metrics and the application, and runs uvicorn with the connection limits
of :mod:`vidlang.serve.protocol` -- in a background thread (:meth:`ServeApp.start`, for tests and tools) or
on the calling thread until SIGINT/SIGTERM (:meth:`ServeApp.serve_forever`).

Shutdown (a signal, or :meth:`ServeApp.shutdown`): stop accepting and close idle connections; new model
work gets 503; requests in flight may finish for ``grace_s`` minus half a second, then whatever is still
waiting is cancelled and answered 503, so that the process is done within the grace period. Engine threads
are daemons: a decode step still running cannot hold the exit up.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from vidlang.serve.config import ServeConfig
from vidlang.serve.engine import Engine
from vidlang.serve.metrics import Metrics, MetricsMiddleware
from vidlang.serve.protocol import make_protocol
from vidlang.serve.routes import ROUTES, HotRoutes, ServeState, build_api

__all__ = ["ServeApp", "ServeConfig"]
STOP_MARGIN_S = 0.5  # in-flight work is cancelled this long before the grace period ends


class _Server(uvicorn.Server):
    """uvicorn's server: signals stop it without being re-raised afterwards, and shutdown cancels the work
    still in flight just before the grace period ends."""

    def __init__(self, config: uvicorn.Config, app: ServeApp) -> None:
        super().__init__(config)
        self.serve_app = app

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        import asyncio

        state = self.serve_app.state
        state.engine.refuse_new()
        grace = self.serve_app.config.grace_s

        def stop_waiting() -> None:
            state.stop_waiting()
            state.engine.cancel_all()

        handle = asyncio.get_running_loop().call_later(max(0.0, grace - STOP_MARGIN_S), stop_waiting)
        try:
            await super().shutdown(sockets)
        finally:
            handle.cancel()


class ServeApp:
    """The server: state shared by the routes, the uvicorn server and its socket (bound at construction)."""

    def __init__(self, bundle: Any, config: ServeConfig, index: Any | None = None, root: str | None = None,
                 rag: Any | None = None) -> None:
        """``index``: a folder index (:class:`~vidlang.serve.index.VideoIndex`) or a vector index
        (:class:`~vidlang.index.VectorIndex`, refused unless ``bundle`` is the model that made its embeddings).
        ``rag``: a :class:`~vidlang.serve.rag.CollectionRetriever` over ``index`` for questions about the
        collection on ``/chat``; its retrieval checkpoint (not ``bundle``) then embeds ``/search`` queries and is
        the one the index must come from."""
        if rag is not None and index is not None and rag.index is not index:
            raise ValueError("rag must search the server's index")
        if index is not None and hasattr(index, "check_model"):
            index.check_model(rag.bundle if rag is not None else bundle)
        self.bundle, self.config, self.index, self.root = bundle, config, index, root
        self.metrics = Metrics(set(ROUTES))
        engine = Engine(bundle, index, config.engine(), on_event=self.metrics.engine_event, rag=rag)
        self.metrics.watch_queue(lambda: engine.depth)
        self.state = ServeState(bundle, index, root, config, engine, self.metrics)
        self.api = build_api(self.state)
        self.sock = _listen(config.host, config.port, config.backlog)
        protocol = make_protocol(config.connection_limits(),
                                 on_reject=lambda reason: self.metrics.rejected.labels(reason).inc())
        self.server = _Server(uvicorn.Config(
            MetricsMiddleware(HotRoutes(self.api), self.metrics), http=protocol, lifespan="off", ws="none",
            log_level="info" if config.log_requests else "warning", access_log=config.log_requests,
            timeout_keep_alive=config.keepalive_s, timeout_graceful_shutdown=config.grace_s,
            backlog=config.backlog, server_header=False,
        ), self)
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def engine(self) -> Engine:
        return self.state.engine

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> ServeApp:
        """Serve on a background thread (for tests and tools); returns self once accepting."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="vidlang-serve", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the server did not start")
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until SIGINT/SIGTERM, then shut down within ``grace_s``."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self._closed = True
            self._close()

    def shutdown(self) -> None:
        """Stop (see the module docstring) and wait for the server thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.config.grace_s + 10)
        self._close()

    def _close(self) -> None:
        self.state.engine.close()
        self.sock.close()

    def __enter__(self) -> ServeApp:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket (IPv6 when ``host`` is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock

