"""``vidlang serve`` under abuse and load: limits (4xx JSON), the HTTP layer's errors as JSON, timeouts,
the bounded queue (503), cancellation that frees the pool, dynamic batching, metrics, graceful shutdown.

No assertion depends on how fast the machine is: slow work is held at a gate (:class:`GatedBundle`) and
released by the test, and waits have generous upper bounds only to end a broken test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import copy
import http.client
import json
import logging
import re
import socket
import threading
import time
import uuid

import pytest
import torch

from vidlang.serve import ServeApp, ServeConfig
from vidlang.serve.engine import Batcher, Engine, EngineConfig
from vidlang.serve.index import VideoIndex
from vidlang.serve.inference import load_bundle
from vidlang.serve.limits import Deadline, HttpError, json_depth
from vidlang.serve.testing import synthetic_videos, tiny_retrieval_checkpoint
from vidlang.serve.wakeup import LoopWaker

TIMEOUT = 30  # seconds, every client call (only ends a broken test)


class GatedBundle:
    """Delegates to a bundle; counts the calls of each stage and holds a stage at a gate when asked."""

    STAGES = ("decode", "encode", "text")

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gates: dict[str, threading.Event] = {}
        self.entered = {s: threading.Event() for s in self.STAGES}
        self.calls: dict[str, list[int]] = {s: [] for s in self.STAGES}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def hold(self, stage: str) -> threading.Event:
        """From now on ``stage`` waits until the returned event is set."""
        self.gates[stage] = gate = threading.Event()
        return gate

    def _pass(self, stage: str, n: int) -> None:
        self.calls[stage].append(n)
        self.entered[stage].set()
        gate = self.gates.get(stage)
        if gate is not None:
            gate.wait(TIMEOUT)

    def decode_video(self, *args, **kw):
        self._pass("decode", 1)
        return self.inner.decode_video(*args, **kw)

    def encode_clips(self, clips, audio=None):
        self._pass("encode", clips.shape[0])
        return self.inner.encode_clips(clips, audio)

    def embed_texts(self, texts):
        self._pass("text", len(texts))
        return self.inner.embed_texts(texts)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_limits")
    ckpt = tiny_retrieval_checkpoint(base / "ckpt")
    root = synthetic_videos(base / "corpus", 6)
    bundle = load_bundle(ckpt)
    index = VideoIndex.build(bundle, root, base / "cache", progress=False)
    return {"bundle": bundle, "index": index, "root": root, "base": base, "ckpt": ckpt}


def start(request, bundle, index=None, root=None, **cfg) -> ServeApp:
    config = ServeConfig(host="127.0.0.1", port=0, log_requests=False,
                         **{"max_upload_mb": 1.0, "decode_processes": 0, **cfg})
    app = ServeApp(bundle, config, index=index, root=str(root) if root else None).start()
    request.addfinalizer(app.shutdown)
    return app


@pytest.fixture(scope="module")
def server(request, setup):
    return start(request, setup["bundle"], setup["index"], setup["root"], max_json_kb=256, max_text_chars=100,
                 max_parts=4, max_video_s=60.0)


def call(app, method, path, body=None, ctype="application/json", headers=None):
    conn = http.client.HTTPConnection(*app.address, timeout=TIMEOUT)
    try:
        h = dict(headers or {})
        if ctype and body is not None:
            h["Content-Type"] = ctype
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def call_json(app, method, path, body=None, ctype="application/json", headers=None):
    status, hdrs, data = call(app, method, path, body, ctype, headers)
    assert hdrs["Content-Type"] == "application/json", data
    answer = json.loads(data)
    assert answer.get("status", status) == status
    return status, answer


def raw(app, data: bytes, read_all: bool = True) -> tuple[int | None, dict, bytes]:
    """Send bytes as is; ``(status, headers, body)`` of the answer (read until the server closes)."""
    with socket.create_connection(app.address, timeout=TIMEOUT) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
            if not read_all and b"\r\n\r\n" in reply:
                break
    return parse_reply(reply)


def parse_reply(reply: bytes) -> tuple[int | None, dict, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        return None, {}, reply
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return int(lines[0].split()[1]), headers, body


def raw_json(app, data: bytes) -> tuple[int, dict]:
    status, headers, body = raw(app, data)
    assert headers.get("content-type") == "application/json", (status, headers, body[:200])
    answer = json.loads(body)
    assert answer["status"] == status and answer["error"]
    return status, answer


def post_bytes(path: str, body: bytes, ctype: str = "application/json", extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            ).encode() + extra + b"Connection: close\r\n\r\n" + body


def metric(app, name: str, **labels: str) -> float:
    """The value of one sample of ``/metrics`` (0 when absent)."""
    status, _, data = call(app, "GET", "/metrics")
    assert status == 200
    for line in data.decode().splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if labels else {}
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, what: str, seconds: float = TIMEOUT) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.01)


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as err:  # noqa: BLE001 - asserted by the caller
            out["error"] = err

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


# -- hostile JSON and fields: 4xx JSON, never 500 ---------------------------------------------------
@pytest.mark.parametrize("body, message", [
    (b'{"query": "a", "k": ' + b"9" * 5000 + b"}", "malformed JSON"),  # past Python's int digit limit
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),  # RecursionError in the parser
    (b'{"query": ' + b"[" * 20 + b"]" * 20 + b"}", "nested deeper than 8"),  # parses, but too deep
    (b'{"query": "\xff\xfe"}', "not UTF-8"),
    (b'{"query": "a", "k": 1000000000}', "'k'"),
    (b'{"query": "a", "k": true}', "'k'"),
    (b'{"query": "a", "k": 2.5}', "'k'"),
    (b'{"query": 7}', "'query'"),
    (b'{"query": "   "}', "empty field 'query'"),
    (json.dumps({"query": "red " * 30}).encode(), "'query' is 120 characters long; the limit is 100"),
])
def test_hostile_search_bodies_are_400_json(server, body, message):
    code, answer = call_json(server, "POST", "/search", body)
    assert code == 400 and message in answer["error"], answer


def test_json_body_over_its_limit_is_413(server):
    code, answer = call_json(server, "POST", "/search", {"query": "a", "pad": "x" * 300_000})
    assert code == 413 and "256 kB limit" in answer["error"]


def test_multipart_with_too_many_parts_is_400(server):
    boundary = uuid.uuid4().hex[:8]
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'.encode()
    body = part * 15_000 + f"--{boundary}--\r\n".encode()  # 15,000 text fields (the attack, scaled)
    code, answer = call_json(server, "POST", "/embed", body, ctype=f"multipart/form-data; boundary={boundary}")
    assert code == 400 and "Too many fields" in answer["error"]


def test_video_over_the_duration_or_pixel_limit_is_refused(request, setup):
    app = start(request, setup["bundle"], root=setup["root"], max_video_s=0.05, max_pixels=16 * 16)
    rel = setup["index"].paths[0]
    code, answer = call_json(app, "POST", "/embed", {"path": rel})
    assert code == 422 and "exceeds" in answer["error"]  # 32x32 frames > 16x16: refused before decoding
    app2 = start(request, setup["bundle"], root=setup["root"], max_video_s=0.05)
    code, answer = call_json(app2, "POST", "/embed", (setup["root"] / rel).read_bytes(), ctype="video/mp4")
    assert code == 413 and "over the 0.05 s limit" in answer["error"]


# -- the HTTP layer's own errors are JSON too ---------------------------------------------------------
@pytest.mark.parametrize("data, status, message", [
    (b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 24\r\n"
     b'Content-Length: 5\r\n\r\n{"query": "a", "k": 1}  ', 400, "Content-Length"),
    (b"THIS IS NOT HTTP\r\n\r\n", 400, "malformed HTTP request"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431, "exceed 16 kB"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n", 431, "exceed 16 kB"),
    (b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n", 400, "malformed HTTP request"),
    # checks llhttp does not make itself (h11, the parser before it, did)
    (b"GET /health HTTP/1.1\r\nX-A: b\r\n\r\n", 400, "mandatory Host"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n", 400, "multiple Host"),
    (b"POST /search HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc", 501, "Transfer-Encoding: chunked"),
    (b"POST /search HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501,
     "Transfer-Encoding: chunked"),
    # and where llhttp is stricter than h11 was: a request smuggling shape
    (b"POST /search HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400,
     "malformed HTTP request"),
])
def test_http_layer_errors_are_json(server, data, status, message):
    code, answer = raw_json(server, data)
    assert code == status and message in answer["error"], answer


def test_large_head_arriving_in_pieces_is_431(server):
    with socket.create_connection(server.address, timeout=TIMEOUT) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        try:
            for _ in range(40):  # 40 kB of headers, 1 kB at a time, never ending
                s.sendall(b"X-A: " + b"b" * 1017 + b"\r\n")
                time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):  # refused meanwhile
            pass
        status, _, body = parse_reply(_read_to_eof(s))
    assert status == 431 and "exceed 16 kB" in json.loads(body)["error"]


def test_large_head_pipelined_behind_a_request_is_431(server):
    """A complete request followed, in the same bytes, by an oversized head: the head is refused."""
    first = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
    data = first + b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n"
    with socket.create_connection(server.address, timeout=TIMEOUT) as s:
        s.sendall(data)
        reply = _read_to_eof(s)
    last = reply[reply.rindex(b"HTTP/1.1 "):]
    status, headers, body = parse_reply(last)
    assert status == 431 and headers["content-type"] == "application/json"
    assert "exceed 16 kB" in json.loads(body)["error"]


def test_pipelined_requests_are_answered_in_order(server):
    search = post_bytes("/search", json.dumps({"query": "a", "k": 2}).encode()).replace(b"Connection: close\r\n", b"")
    data = (b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" + search
            + b"GET /nothing HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    with socket.create_connection(server.address, timeout=TIMEOUT) as s:
        s.sendall(data)
        reply = _read_to_eof(s)
    assert [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)] == [200, 200, 404], reply
    assert b'"k":2' in reply


def test_keep_alive_connection_serves_requests_one_after_another(server):
    conn = http.client.HTTPConnection(*server.address, timeout=TIMEOUT)
    try:
        for _ in range(3):
            conn.request("POST", "/search", body=json.dumps({"query": "a", "k": 1}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["k"] == 1
    finally:
        conn.close()


def test_wrong_method_is_json_and_docs_are_served(server):
    code, answer = call_json(server, "DELETE", "/health")
    assert code == 405
    status, headers, data = call(server, "GET", "/openapi.json")
    spec = json.loads(data)
    assert status == 200 and {"/embed", "/search", "/chat", "/health", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/embed"]["post"]["requestBody"]["content"]
    status, headers, data = call(server, "GET", "/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")


def test_internal_error_is_500_json(request, setup):
    class Broken(GatedBundle):
        def embed_texts(self, texts):
            raise ZeroDivisionError("a bug")

    logging.getLogger("uvicorn.error").disabled = True  # the traceback a real bug logs: not for the test output
    request.addfinalizer(lambda: setattr(logging.getLogger("uvicorn.error"), "disabled", False))
    app = start(request, Broken(setup["bundle"]), setup["index"])
    code, answer = call_json(app, "POST", "/search", {"query": "a"})
    assert code == 500 and "ZeroDivisionError: a bug" in answer["error"]


# -- timeouts of the connection ----------------------------------------------------------------------
def test_slow_headers_are_cut_with_408(request, setup):
    app = start(request, setup["bundle"], header_timeout_s=0.3)
    with socket.create_connection(app.address, timeout=TIMEOUT) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")  # and never the rest
        status, headers, body = parse_reply(_read_to_eof(s))
    assert status == 408 and json.loads(body)["status"] == 408 and "headers" in json.loads(body)["error"]
    with socket.create_connection(app.address, timeout=TIMEOUT) as s:  # a connection that sends nothing
        assert parse_reply(_read_to_eof(s))[0] == 408
    assert metric(app, "vidlang_rejected_total", reason="header_timeout") == 2


def test_slow_upload_is_408_within_the_request_deadline(request, setup):
    app = start(request, setup["bundle"], root=setup["root"], timeout_s=0.5)
    with socket.create_connection(app.address, timeout=TIMEOUT) as s:
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: video/mp4\r\nContent-Length: 1000\r\n\r\nabc")
        status, headers, body = parse_reply(_read_to_eof(s))
    assert status == 408 and "was not received within the 0.5 s limit" in json.loads(body)["error"]
    assert headers["connection"] == "close"


def _read_to_eof(s: socket.socket) -> bytes:
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    return reply


def test_connections_beyond_the_limit_get_503(request, setup):
    app = start(request, setup["bundle"], max_connections=2)
    kept = [http.client.HTTPConnection(*app.address, timeout=TIMEOUT) for _ in range(2)]
    try:
        for conn in kept:  # two keep-alive connections, surely registered
            conn.request("GET", "/health")
            assert conn.getresponse().read() and True
        with socket.create_connection(app.address, timeout=TIMEOUT) as s:
            status, _, body = parse_reply(_read_to_eof(s))
        assert status == 503 and "too many connections (limit 2)" in json.loads(body)["error"]
    finally:
        for conn in kept:
            conn.close()
    wait_for(lambda: call(app, "GET", "/health")[0] == 200, "a free connection slot")


# -- the bounded queue, cancellation, shutdown -------------------------------------------------------
def test_full_queue_is_503_with_retry_after(request, setup):
    gated = GatedBundle(setup["bundle"])
    gate = gated.hold("decode")
    request.addfinalizer(gate.set)
    app = start(request, gated, root=setup["root"], workers=1, max_queue=1)
    rel = setup["index"].paths[0]
    first, result = in_thread(call_json, app, "POST", "/embed", {"path": rel})
    assert gated.entered["decode"].wait(TIMEOUT)
    status, headers, data = call(app, "POST", "/embed", {"path": rel})
    assert status == 503 and headers["Retry-After"] == "1" and "busy" in json.loads(data)["error"]
    assert metric(app, "vidlang_queue_depth") == 1
    gate.set()
    first.join(TIMEOUT)
    assert result["value"][0] == 200
    assert metric(app, "vidlang_rejected_total", reason="queue_full") == 1
    assert metric(app, "vidlang_queue_depth") == 0


def test_timed_out_work_is_stopped_and_the_pool_freed(request, setup):
    """Job A times out while decoding, job B while queued behind it: B never decodes, A is never encoded,
    and once A's decode returns the single worker serves C."""
    gated = GatedBundle(setup["bundle"])
    gate = gated.hold("decode")
    request.addfinalizer(gate.set)
    app = start(request, gated, root=setup["root"], workers=1, timeout_s=0.5)
    rel = setup["index"].paths[0]
    a, ra = in_thread(call_json, app, "POST", "/embed", {"path": rel})
    assert gated.entered["decode"].wait(TIMEOUT)
    code, answer = call_json(app, "POST", "/embed", {"path": rel})  # B: queued behind A
    assert code == 504 and "0.5 s limit" in answer["error"]
    a.join(TIMEOUT)
    assert ra["value"][0] == 504
    assert app.engine.depth == 1  # B's slot is free already; A holds the worker until its decode returns
    gate.set()
    wait_for(lambda: app.engine.depth == 0, "A to be dropped after its decode")
    code, answer = call_json(app, "POST", "/embed", {"path": rel})  # C
    assert code == 200 and answer["dim"] == 32
    assert len(gated.calls["decode"]) == 2  # A and C: B never started
    assert gated.calls["encode"] == [1]  # C only: A was dropped between decode and encode
    assert metric(app, "vidlang_timed_out_total", route="/embed") == 2
    assert metric(app, "vidlang_jobs_total", outcome="cancelled") == 2


def test_client_that_hangs_up_cancels_its_job(request, setup, caplog):
    gated = GatedBundle(setup["bundle"])
    gate = gated.hold("text")
    request.addfinalizer(gate.set)
    app = start(request, gated, setup["index"], timeout_s=20)
    first, _ = in_thread(call_json, app, "POST", "/search", {"query": "a"})  # holds the text batcher
    assert gated.entered["text"].wait(TIMEOUT)
    errors: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = errors.append
    logging.getLogger("uvicorn").addHandler(handler)
    request.addfinalizer(lambda: logging.getLogger("uvicorn").removeHandler(handler))
    with socket.create_connection(app.address, timeout=TIMEOUT) as s:
        s.sendall(post_bytes("/search", b'{"query": "a red square"}'))
        wait_for(lambda: app.engine.depth == 2, "the second search to be queued")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset on close
    wait_for(lambda: app.engine.depth == 1, "the job of the client that left to be cancelled")
    gate.set()
    first.join(TIMEOUT)
    assert gated.calls["text"] == [1]  # the second query was never encoded
    assert not [r for r in errors if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in errors]


def test_shutdown_answers_work_in_flight_with_503_within_the_grace_period(request, setup):
    gated = GatedBundle(setup["bundle"])
    gate = gated.hold("decode")
    request.addfinalizer(gate.set)
    app = start(request, gated, root=setup["root"], workers=1, grace_s=1.0, timeout_s=60)
    pending, result = in_thread(call_json, app, "POST", "/embed", {"path": setup["index"].paths[0]})
    assert gated.entered["decode"].wait(TIMEOUT)
    t0 = time.monotonic()
    app.shutdown()  # the decode never returns before the end of the grace period
    elapsed = time.monotonic() - t0
    pending.join(TIMEOUT)
    assert result["value"][0] == 503 and "shutting down" in result["value"][1]["error"]
    assert not app._thread.is_alive() and elapsed < 1.0 + 5.0  # the grace period, plus slack for a busy machine
    with pytest.raises(OSError):
        call(app, "GET", "/health")


def test_shutdown_lets_work_in_flight_finish(request, setup):
    gated = GatedBundle(setup["bundle"])
    gate = gated.hold("decode")
    request.addfinalizer(gate.set)
    app = start(request, gated, root=setup["root"], workers=1, grace_s=30.0, timeout_s=60)
    pending, result = in_thread(call_json, app, "POST", "/embed", {"path": setup["index"].paths[0]})
    assert gated.entered["decode"].wait(TIMEOUT)
    stopping, _ = in_thread(app.shutdown)
    wait_for(lambda: app.engine.refusing, "the shutdown to begin")
    gate.set()
    pending.join(TIMEOUT)
    stopping.join(TIMEOUT)
    assert result["value"][0] == 200 and len(result["value"][1]["embedding"]) == 32
    assert not app._thread.is_alive()


# -- dynamic batching ------------------------------------------------------------------------------
def test_concurrent_queries_are_batched_and_answered_correctly(request, setup):
    gated = GatedBundle(setup["bundle"])
    gate = gated.hold("text")
    request.addfinalizer(gate.set)
    app = start(request, gated, setup["index"], max_batch=8)
    queries = ["a red square", "a green ball moves up", "a yellow triangle", "blue circle grows", "box"]
    first, r0 = in_thread(call_json, app, "POST", "/search", {"query": "hold", "k": 2})
    assert gated.entered["text"].wait(TIMEOUT)
    threads = [in_thread(call_json, app, "POST", "/search", {"query": q, "k": 1 + i}) for i, q in enumerate(queries)]
    wait_for(lambda: app.engine.depth == 1 + len(queries), "the queries to be queued")
    gate.set()
    for th, _ in [(first, r0), *threads]:
        th.join(TIMEOUT)
    assert gated.calls["text"] == [1, len(queries)]  # the five waiting queries ran as one batch
    b, index = setup["bundle"], setup["index"]
    for i, (q, (_, out)) in enumerate(zip(queries, threads, strict=True)):
        code, body = out["value"]
        want = index.search(b.embed_texts([q])[0], 1 + i)
        assert code == 200 and [r["path"] for r in body["results"]] == [p for p, _ in want]
        assert [r["score"] for r in body["results"]] == pytest.approx([s for _, s in want], abs=1e-5)
    assert metric(app, "vidlang_batch_size_count", kind="text") == 2
    assert metric(app, "vidlang_batch_size_sum", kind="text") == 1 + len(queries)


def test_concurrent_clips_are_batched_and_answered_correctly(request, setup):
    gated = GatedBundle(setup["bundle"])
    gate = gated.hold("encode")
    request.addfinalizer(gate.set)
    app = start(request, gated, root=setup["root"], workers=2, max_batch=8)
    paths = setup["index"].paths
    first, _ = in_thread(call_json, app, "POST", "/embed", {"path": paths[0]})
    assert gated.entered["encode"].wait(TIMEOUT)
    threads = [in_thread(call_json, app, "POST", "/embed", {"path": p}) for p in paths[1:5]]
    wait_for(lambda: app.engine._clips._q.qsize() == 4, "four decoded clips waiting for the model")
    gate.set()
    for th, _ in [(first, None), *threads]:
        th.join(TIMEOUT)
    assert gated.calls["encode"] == [1, 4]
    for p, (_, out) in zip(paths[1:5], threads, strict=True):
        want = setup["bundle"].embed_videos([str(setup["root"] / p)])[0]
        assert out["value"][0] == 200 and torch.allclose(torch.tensor(out["value"][1]["embedding"]), want, atol=1e-5)


def test_loop_waker_hands_a_burst_of_results_over_with_one_wake_up():
    """A batch's results reach the event loop with one wake-up (not one self-pipe write each), with their
    values, errors and cancellation; a call after the loop closed is dropped."""
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    try:
        waker = LoopWaker(loop)
        sources = [cf.Future() for _ in range(8)]
        outs = asyncio.run_coroutine_threadsafe(_wrap_all(waker, sources), loop).result(TIMEOUT)
        busy, held = threading.Event(), threading.Event()
        loop.call_soon_threadsafe(lambda: (busy.set(), held.wait(TIMEOUT)))  # the loop is busy meanwhile
        assert busy.wait(TIMEOUT)
        for i, f in enumerate(sources[:6]):  # this (worker) thread finishes the batch while the loop is busy
            f.set_result(i)
        sources[6].set_exception(ValueError("bad clip"))
        sources[7].cancel()
        assert waker.wakeups == 1 and not any(f.done() for f in outs)
        held.set()
        got = asyncio.run_coroutine_threadsafe(_outcomes(outs), loop).result(TIMEOUT)
        assert got[:6] == list(range(6)) and isinstance(got[6], ValueError) and got[7] == "cancelled"
        assert waker.wakeups == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(TIMEOUT)
        loop.close()
    waker.call(lambda: None)  # the loop is closed: dropped, no error


async def _wrap_all(waker, sources):
    return [waker.wrap(f) for f in sources]


async def _outcomes(futures):
    out = []
    for f in futures:
        try:
            out.append(await f)
        except asyncio.CancelledError:
            out.append("cancelled")
        except ValueError as err:
            out.append(err)
    return out


def test_batcher_drops_cancelled_jobs_and_spreads_errors():
    ran: list[list[int]] = []

    def run(items):
        ran.append(list(items))
        if -1 in items:
            raise ValueError("bad batch")
        return [2 * x for x in items]

    engine = Engine(None, None, EngineConfig(max_queue=10))  # only its slot accounting is used here
    batcher = Batcher("t", run, window_s=0.0, max_batch=8, on_event=lambda *e: None)
    jobs = [engine.admit("t", Deadline(30), x) for x in (1, 2, 3)]
    jobs[1].cancel("client gone")
    assert engine.depth == 2  # a queued job's slot is freed when it is cancelled
    for job in jobs:
        batcher.put(job)
    assert [j.future.result(TIMEOUT) for j in (jobs[0], jobs[2])] == [2, 6]
    bad = [engine.admit("t", Deadline(30), x) for x in (-1, 4)]
    for job in bad:
        batcher.put(job)
    for job in bad:
        with pytest.raises(ValueError, match="bad batch"):
            job.future.result(TIMEOUT)
    assert ran[0] == [1, 3] and engine.depth == 0
    batcher.close()
    with pytest.raises(HttpError) as err:
        [engine.admit("t", Deadline(30), x) for x in range(11)]
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"
    engine.close()
    assert engine.depth == 0  # the ten admitted jobs were cancelled
    with pytest.raises(HttpError, match="shutting down"):
        engine.admit("t", Deadline(30), 0)


def test_json_depth():
    assert json_depth({}, 8) == 1 and json_depth({"a": [1, {"b": 2}]}, 8) == 3
    deep: list = []
    for _ in range(50):
        deep = [deep]
    assert json_depth({"a": deep}, 8) == 9  # stops counting past the limit


# -- metrics ---------------------------------------------------------------------------------------
def test_metrics_count_requests_and_latency(server):
    before = metric(server, "vidlang_requests_total", route="/search", method="POST", status="200")
    assert call_json(server, "POST", "/search", {"query": "a red square", "k": 2})[0] == 200
    assert call_json(server, "GET", "/no/such/route")[0] == 404
    assert metric(server, "vidlang_requests_total", route="/search", method="POST", status="200") == before + 1
    assert metric(server, "vidlang_requests_total", route="other", method="GET", status="404") >= 1
    assert metric(server, "vidlang_request_seconds_count", route="/search") >= before + 1
    status, headers, data = call(server, "GET", "/metrics")
    assert headers["Content-Type"].startswith("text/plain") and b"vidlang_queue_depth" in data


def test_chat_stream_stops_generating_when_the_client_leaves(request, setup):
    class SteppedChat:
        """Streams pieces; every piece after the first waits for :attr:`gate`."""

        audio = None

        def __init__(self) -> None:
            self.gate, self.produced = threading.Event(), 0

        def answer(self, video, question, max_new_tokens=64, stream=False, **kw):
            def pieces():
                for i in range(max_new_tokens):
                    if i:
                        self.gate.wait(TIMEOUT)
                    self.produced += 1
                    yield f"piece{i} "
            return pieces()

    chat = SteppedChat()
    request.addfinalizer(chat.gate.set)
    bundle = copy.copy(setup["bundle"])
    bundle.chat = chat
    app = start(request, bundle, root=setup["root"], timeout_s=60)
    body = json.dumps({"path": setup["index"].paths[0], "question": "what?", "max_new_tokens": 500}).encode()
    with socket.create_connection(app.address, timeout=TIMEOUT) as s:
        s.sendall(post_bytes("/chat", body))
        reply = b""
        while b"piece0" not in reply and (chunk := s.recv(65536)):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b"piece0" in reply, reply
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset on close
    wait_for(lambda: any(job.cancel_reason for job in list(app.engine._jobs)), "the stream's job to be cancelled")
    chat.gate.set()
    wait_for(lambda: app.engine.depth == 0, "generation to stop")
    assert chat.produced == 2  # the piece in progress when the client left; no more was asked for
    assert metric(app, "vidlang_jobs_total", outcome="cancelled") == 1
