"""uvicorn's HTTP/1.1 protocol (httptools: the C llhttp parser) with the connection-level limits of ``vidlang serve``.

:func:`make_protocol` returns a subclass of uvicorn's ``HttpToolsProtocol`` that

* answers the HTTP layer's own errors as JSON (``{"error", "status"}``): a malformed request, conflicting
  ``Content-Length`` headers, a missing or repeated ``Host`` (HTTP/1.1), ... -> 400; a ``Transfer-Encoding``
  other than ``chunked`` -> 501; request headers over ``max_header_bytes`` -> 431 (llhttp has no size limit of
  its own, and uvicorn answers parse errors in plain text);
* closes a connection whose request headers are not complete ``header_timeout_s`` after it opened or
  after the request began (slowloris), with a JSON 408; a request body still arriving ``body_timeout_s``
  after the headers is cut the same way (the application's deadline normally answers first);
* refuses connections beyond ``max_connections`` with a JSON 503;
* after answering a request whose body it did not read (e.g. 413), stops writing and discards what the
  client still sends for ``linger_s`` before closing, so that the client reads the answer instead of a
  connection reset.

llhttp is stricter than h11 (the pure-Python parser uvicorn also has, used here before): it refuses duplicate
``Content-Length`` headers even when they agree, ``Content-Length`` beside ``Transfer-Encoding``, bare-LF line
ends, obsolete header folding and control characters in header values (all 400). llhttp parses a small request
in about 1 us where h11 took about 40 us to parse it and frame the answer; with uvicorn's protocol code around it,
a request on a new connection costs the event loop about 0.1 ms less (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# where the request being received stands
IDLE = "idle"  # no byte of a request yet (a new connection, or after an answered request on a kept-alive one)
HEAD = "head"  # the request line / headers are arriving
BODY = "body"  # the headers are complete, the body is arriving
DONE = "done"  # the request is complete; its answer is not


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


class _BadRequest(Exception):
    """A request refused by the checks llhttp does not make (raised from a parser callback)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


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


def make_protocol(limits: ConnectionLimits, on_reject: Any = None) -> type[HttpToolsProtocol]:
    """An ``HttpToolsProtocol`` subclass enforcing ``limits`` (module docstring); ``on_reject(reason)`` is told of
    each refused request or connection (``bad_http``, ``header_timeout``, ``body_timeout``,
    ``too_many_connections``)."""
    reject = on_reject or (lambda reason: None)
    too_large = f"the request headers exceed {limits.max_header_bytes // 1024} kB"

    class VidlangHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._refused = False
            self._discarding = False
            self._inner: asyncio.Transport | None = None
            self._header_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None
            self._phase = IDLE
            self._head = b""  # the raw bytes of a request head still incomplete (bounded by the limit)
            self._head_size = 0  # the current request's head as parsed so far (request target + headers)
            self._messages = 0  # requests received complete

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
            if self._discarding or self._refused or self.parser is None:
                return
            head = b""
            if self._phase in (IDLE, HEAD):
                head = self._head + data if self._head else data
                if self._head_too_large(head):
                    self._refuse(431, too_large)
                    return
            self._unset_keepalive_if_required()
            messages = self._messages
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError as err:
                self.logger.warning("Invalid HTTP request received.")
                cause = err.__context__ if isinstance(err, httptools.HttpParserCallbackError) else None
                if isinstance(cause, _BadRequest):
                    self._refuse(cause.status, cause.message)
                else:
                    self._refuse(400, f"malformed HTTP request: {err}")
                return
            # a head still incomplete: keep its bytes for the size check (after a request completed within
            # these bytes, the next head's start is not known here: the parsed size bounds it, on_header)
            self._head = head if self._phase == HEAD and self._messages == messages else b""
            self._arm_timers()

        def _head_too_large(self, head: bytes) -> bool:
            """Whether the request head now arriving is over the limit (also one that arrives at once)."""
            end = head.find(b"\r\n\r\n", 0, limits.max_header_bytes + 4)
            return end == -1 and len(head) > limits.max_header_bytes

        def eof_received(self) -> bool | None:
            if self._discarding and self._inner is not None:
                self._inner.close()
            return super().eof_received()

        # -- parser callbacks: where the request stands, and the checks llhttp does not make ---------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._phase, self._head_size = HEAD, 0

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            self._grow_head(len(url) + 16)  # + method, version and the line's separators

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            self._grow_head(len(name) + len(value) + 4)

        def _grow_head(self, n: int) -> None:
            self._head_size += n
            if self._head_size > limits.max_header_bytes + 4:  # as the raw check: the end CRLF CRLF may pass it
                raise _BadRequest(431, too_large)

        def on_headers_complete(self) -> None:
            hosts = sum(name == b"host" for name, _ in self.headers)
            if hosts > 1:
                raise _BadRequest(400, "malformed HTTP request: found multiple Host: headers")
            if hosts == 0 and self.parser.get_http_version() == "1.1":
                raise _BadRequest(400, "malformed HTTP request: missing mandatory Host: header")
            for name, value in self.headers:
                if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                    raise _BadRequest(501, "only Transfer-Encoding: chunked is supported")
            super().on_headers_complete()
            self._phase = BODY

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._messages += 1
            self._phase = IDLE if self.cycle is not None and self.cycle.response_complete else DONE

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._phase == DONE:
                self._phase = IDLE
            self._arm_timers()

        # -- timeouts ------------------------------------------------------------------------------
        def _arm_timers(self) -> None:
            if self._phase == HEAD:  # a request's headers are arriving
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)
            elif self._phase == BODY:
                self._cancel_header_timer()
                if self._body_timer is None:
                    self._body_timer = self.loop.call_later(limits.body_timeout_s, self._body_timeout)
            elif self._phase == DONE:
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
            if self._phase not in (IDLE, HEAD) or self._inner is None or self._inner.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:  # still answering the last one
                self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)
                return
            reject("header_timeout")
            self._abort(408, f"the request headers were not received within {limits.header_timeout_s:g} s")

        def _body_timeout(self) -> None:
            self._body_timer = None
            if self._phase != BODY or self._inner is None or self._inner.is_closing():
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
        def _refuse(self, status: int, message: str) -> None:
            reject("bad_http")
            self._cancel_timers()
            if self._inner is not None and not self._inner.is_closing():
                self._abort(status, message)

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, msg)

        # -- closing -------------------------------------------------------------------------------
        def _close_lingering(self) -> None:
            inner = self._inner
            if inner is None or inner.is_closing() or self._discarding:
                return
            if self._phase == BODY and inner.can_write_eof():
                self._discarding = True  # the answer is sent; drop the rest of the body, then close
                self._cancel_timers()
                inner.write_eof()
                inner.resume_reading()
                self.loop.call_later(limits.linger_s, inner.close)
            else:
                inner.close()

    return VidlangHttpProtocol
