"""uvicorn's HTTP/1.1 protocol (h11) with the connection-level limits of ``vidlang serve``.

:func:`make_protocol` returns a subclass of uvicorn's ``H11Protocol`` that

* answers the HTTP layer's own errors as JSON (``{"error", "status"}``): a malformed request, conflicting
  ``Content-Length`` headers, ... -> 400; request headers over ``max_header_bytes`` -> 431 (uvicorn answers
  those in plain text);
* closes a connection whose request headers are not complete ``header_timeout_s`` after it opened or
  after the request began (slowloris), with a JSON 408; a request body still arriving ``body_timeout_s``
  after the headers is cut the same way (the application's deadline normally answers first);
* refuses connections beyond ``max_connections`` with a JSON 503;
* after answering a request whose body it did not read (e.g. 413), stops writing and discards what the
  client still sends for ``linger_s`` before closing, so that the client reads the answer instead of a
  connection reset.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass
class ConnectionLimits:
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 31.0
    max_header_bytes: int = 16 * 1024
    linger_s: float = 1.0


def raw_json_response(status: int, message: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with the JSON error body."""
    body = (json.dumps({"error": message, "status": status}) + "\n").encode()
    reason = HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("latin-1") + body


class _Connection(h11.Connection):
    """An ``h11.Connection`` that remembers the last protocol error (uvicorn drops it)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as err:
            self.last_error = err
            raise


class _Transport:
    """The connection's transport as uvicorn sees it: ``close()`` lingers when the request body is unread."""

    def __init__(self, inner: asyncio.Transport, protocol: Any) -> None:
        self._inner, self._protocol = inner, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def is_closing(self) -> bool:
        return self._inner.is_closing() or self._protocol._discarding

    def close(self) -> None:
        self._protocol._close_lingering()


def make_protocol(limits: ConnectionLimits, on_reject: Any = None) -> type[H11Protocol]:
    """An ``H11Protocol`` subclass enforcing ``limits`` (module docstring); ``on_reject(reason)`` is told of
    each refused request or connection (``bad_http``, ``header_timeout``, ``body_timeout``,
    ``too_many_connections``)."""
    reject = on_reject or (lambda reason: None)

    class VidlangH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = _Connection(h11.SERVER, limits.max_header_bytes)
            self._refused = False
            self._discarding = False
            self._inner: asyncio.Transport | None = None
            self._header_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None

        # -- connection life -----------------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limits.max_connections:
                self._refused = True
                reject("too_many_connections")
                transport.write(raw_json_response(503, f"too many connections (limit {limits.max_connections})"))
                transport.close()
                return
            self._inner = transport
            super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._cancel_timers()
            super().connection_lost(exc)
            if self._inner is not None:
                self._inner.close()

        def data_received(self, data: bytes) -> None:
            if self._discarding or self._refused:
                return
            if self.conn.their_state is h11.IDLE and self._headers_too_large(data):
                reject("bad_http")
                self._cancel_timers()
                self._abort(431, f"the request headers exceed {limits.max_header_bytes // 1024} kB")
                return
            super().data_received(data)
            self._arm_timers()

        def _headers_too_large(self, data: bytes) -> bool:
            """Whether the request head now arriving is over the limit (h11 bounds only a head that is still
            incomplete, so a large head that arrives at once would pass)."""
            head = self.conn.trailing_data[0] + data if self.conn.trailing_data[0] else data
            end = head.find(b"\r\n\r\n", 0, limits.max_header_bytes + 4)
            return end == -1 and len(head) > limits.max_header_bytes

        def eof_received(self) -> bool | None:
            if self._discarding and self._inner is not None:
                self._inner.close()
            return super().eof_received()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_timers()

        # -- timeouts ------------------------------------------------------------------------------
        def _arm_timers(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE and self.conn.trailing_data[0]:  # a request's headers are arriving
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)
            elif state is h11.SEND_BODY:
                self._cancel_header_timer()
                if self._body_timer is None:
                    self._body_timer = self.loop.call_later(limits.body_timeout_s, self._body_timeout)
            elif state is not h11.IDLE:
                self._cancel_timers()

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _cancel_timers(self) -> None:
            self._cancel_header_timer()
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self._inner is None or self._inner.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:  # still answering the last one
                self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)
                return
            reject("header_timeout")
            self._abort(408, f"the request headers were not received within {limits.header_timeout_s:g} s")

        def _body_timeout(self) -> None:
            self._body_timer = None
            if self.conn.their_state is not h11.SEND_BODY or self._inner is None or self._inner.is_closing():
                return
            reject("body_timeout")
            if self.cycle is not None and not self.cycle.response_started:
                self._abort(408, f"the request body was not received within {limits.body_timeout_s:g} s")
            else:
                self._inner.close()
            if self.cycle is not None:
                self.cycle.disconnected = True
                self.cycle.message_event.set()

        def _abort(self, status: int, message: str) -> None:
            assert self._inner is not None
            self._inner.write(raw_json_response(status, message))
            self._inner.close()

        # -- HTTP-layer errors ---------------------------------------------------------------------
        def send_400_response(self, msg: str) -> None:
            err = getattr(self.conn, "last_error", None)
            status = getattr(err, "error_status_hint", 400)
            if status == 431:
                text = f"the request headers exceed {limits.max_header_bytes // 1024} kB"
            else:
                text = f"malformed HTTP request: {err}" if err is not None else msg
            reject("bad_http")
            self._cancel_timers()
            if self._inner is not None:
                self._abort(status if status in (400, 431, 501) else 400, text)

        # -- closing -------------------------------------------------------------------------------
        def _close_lingering(self) -> None:
            inner = self._inner
            if inner is None or inner.is_closing() or self._discarding:
                return
            if self.conn.their_state is h11.SEND_BODY and inner.can_write_eof():
                self._discarding = True  # the answer is sent; drop the rest of the body, then close
                self._cancel_timers()
                inner.write_eof()
                inner.resume_reading()
                self.loop.call_later(limits.linger_s, inner.close)
            else:
                inner.close()

    return VidlangH11Protocol
