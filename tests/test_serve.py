"""``vidlang serve`` on loopback (ephemeral port): endpoints, limits, confinement, errors, chat, load, shutdown.

Limits, cancellation, batching, metrics and the HTTP layer's errors: ``tests/test_serve_limits.py``."""

from __future__ import annotations

import copy
import http.client
import json
import os
import shutil
import socket
import threading
import time
import uuid
import warnings

import pytest
import torch

from vidlang.serve import ServeApp, ServeConfig, confine_path
from vidlang.serve.index import VideoIndex
from vidlang.serve.inference import InferenceBundle, load_bundle
from vidlang.serve.limits import HttpError
from vidlang.serve.testing import synthetic_videos, tiny_retrieval_checkpoint

TIMEOUT = 20  # seconds, every client call


class FakeChat:
    """Stands in for ``ChatEncoder``: streams a fixed answer built from the question."""

    audio = None

    def answer(self, video, question, max_new_tokens=64, stream=False, **kw):
        assert video.shape[0] == 1 and video.dtype == torch.float32
        pieces = ["The video ", "shows\na square. ", f"Q: {question}"][:max_new_tokens]
        return iter(pieces) if stream else "".join(pieces)


class HeldBundle:
    """Delegates to a bundle; decoding waits until :attr:`release` is set (at most 30 s)."""

    def __init__(self, inner: InferenceBundle) -> None:
        self.inner, self.release, self.entered = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode_video(self, *args, **kw):
        self.entered.set()
        self.release.wait(30)
        return self.inner.decode_video(*args, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    ckpt = tiny_retrieval_checkpoint(base / "ckpt")
    corpus = synthetic_videos(base / "corpus", 6)
    root = base / "root"
    shutil.copytree(corpus, root)
    secret = base / "secret.mp4"  # a valid video outside the root
    shutil.copyfile(next(iter(sorted(root.rglob("*.mp4")))), secret)
    os.symlink(secret, root / "escape.mp4")  # symlink escaping the root
    bundle = load_bundle(ckpt)
    index = VideoIndex.build(bundle, root, base / "cache", progress=False)
    bundle.chat = FakeChat()
    return {"bundle": bundle, "index": index, "root": root, "secret": secret, "base": base}


def start(request, bundle, index=None, root=None, **cfg) -> ServeApp:
    """A server on 127.0.0.1:<ephemeral>; always shut down by a finalizer."""
    cfg = {"max_upload_mb": 1.0, "decode_processes": 0, **cfg}  # threads, unless a test asks for processes
    config = ServeConfig(host="127.0.0.1", port=0, log_requests=False, **cfg)
    app = ServeApp(bundle, config, index=index, root=str(root) if root else None).start()
    request.addfinalizer(app.shutdown)
    return app


@pytest.fixture(scope="module")
def server(request, setup):
    # the shared server decodes in processes (the CLI's default): every test using it covers that path
    return start(request, setup["bundle"], setup["index"], setup["root"], timeout_s=15.0, workers=2,
                 decode_processes=2)


def call(app, method, path, body=None, ctype=None, headers=None):
    conn = http.client.HTTPConnection(*app.address, timeout=TIMEOUT)
    try:
        h = dict(headers or {})
        if ctype:
            h["Content-Type"] = ctype
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.headers, data  # headers: case-insensitive
    finally:
        conn.close()


def call_json(app, method, path, body=None, ctype="application/json", headers=None):
    status, hdrs, data = call(app, method, path, body, ctype, headers)
    assert hdrs["Content-Type"] == "application/json", data
    return status, json.loads(data)


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, data in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.mp4"\r\n'
                f"Content-Type: video/mp4\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def offline_embedding(setup, rel: str) -> torch.Tensor:
    return setup["bundle"].embed_videos([str(setup["root"] / rel)])[0]


# -- endpoints -------------------------------------------------------------------------------------
def test_health(server):
    status, body = call_json(server, "GET", "/health", ctype=None)
    assert status == 200 and body["status"] == "ok" and body["embed_dim"] == 32
    assert body["index"] == {"videos": 7, "unreadable": 0, "kind": "folder"}  # 6 videos + the symlink escape.mp4
    assert body["chat"] is True and body["paths"] is True


def test_embed_path_upload_and_multipart_agree_with_offline(server, setup):
    rel = setup["index"].paths[1]
    want = offline_embedding(setup, rel)
    status, body = call_json(server, "POST", "/embed", {"path": rel})
    assert status == 200 and body["dim"] == 32 and "tokens" not in body
    assert torch.allclose(torch.tensor(body["embedding"]), want, atol=1e-5)
    data = (setup["root"] / rel).read_bytes()
    status, raw = call_json(server, "POST", "/embed", data, ctype="video/mp4")
    assert status == 200 and torch.allclose(torch.tensor(raw["embedding"]), want, atol=1e-5)
    payload, ctype = multipart({"note": "x"}, {"video": data})
    status, form = call_json(server, "POST", "/embed", payload, ctype=ctype)
    assert status == 200 and torch.allclose(torch.tensor(form["embedding"]), want, atol=1e-5)
    absolute = str((setup["root"] / rel).resolve())  # an absolute path inside the root is fine
    assert call_json(server, "POST", "/embed", {"path": absolute})[0] == 200


def test_search_matches_offline_ranking(server, setup):
    b, index = setup["bundle"], setup["index"]
    status, body = call_json(server, "POST", "/search", {"query": "a blue circle grows", "k": 4})
    want = index.search(b.embed_texts(["a blue circle grows"])[0], 4)
    assert status == 200 and [r["path"] for r in body["results"]] == [p for p, _ in want]
    assert [r["score"] for r in body["results"]] == pytest.approx([s for _, s in want], abs=1e-5)
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]


# -- limits and confinement ------------------------------------------------------------------------
def test_upload_limit_is_413_before_the_body_is_read(server):
    with socket.create_connection(server.address, timeout=TIMEOUT) as s:
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
                  b"Content-Length: 50000000\r\n\r\n" + b"\0" * 1000)  # 50 MB announced, 1 kB sent
        reply = b""
        while chunk := s.recv(65536):  # the server answers and closes without reading the 50 MB
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "exceeds the 1 MB limit" in reply
    status, _, _ = call(server, "POST", "/embed", b"\0" * (1024 * 1024 + 1), ctype="video/mp4")
    assert status == 413


@pytest.mark.parametrize("path, status", [
    ("../secret.mp4", 403),
    ("000/../../secret.mp4", 403),
    ("escape.mp4", 403),  # symlink whose target is outside the root
    ("/etc/passwd", 403),
    ("missing/video.mp4", 404),
    ("000", 400),  # a directory
])
def test_paths_are_confined_to_the_root(server, setup, path, status):
    code, body = call_json(server, "POST", "/embed", {"path": path})
    assert code == status and body["status"] == status and body["error"]
    if status == 403:
        assert "secret" not in json.dumps(body).replace(path, "")  # the target is never disclosed


def test_confine_path_unit(setup, tmp_path):
    root = setup["root"]
    rel = setup["index"].paths[0]
    assert confine_path(str(root), rel) == os.path.realpath(root / rel)
    link = root / "inner_link.mp4"
    os.symlink(root / rel, link)  # a symlink that stays inside is fine
    try:
        assert confine_path(str(root), "inner_link.mp4") == os.path.realpath(root / rel)
    finally:
        link.unlink()
    with pytest.raises(HttpError) as err:
        confine_path(str(root), str(setup["secret"]))
    assert err.value.status == 403
    with pytest.raises(HttpError) as err:
        confine_path(None, rel)
    assert err.value.status == 403


def test_confine_path_compares_whole_components(tmp_path):
    """A sibling whose name starts with the root's is outside it; the root "/" holds every path."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos2").mkdir()
    (tmp_path / "videos2" / "a.mp4").write_bytes(b"x")
    (tmp_path / "videos" / "b.mp4").write_bytes(b"x")
    with pytest.raises(HttpError) as err:
        confine_path(str(tmp_path / "videos"), str(tmp_path / "videos2" / "a.mp4"))
    assert err.value.status == 403
    with pytest.raises(HttpError) as err:
        confine_path(str(tmp_path / "videos"), "//..//videos2/a.mp4")
    assert err.value.status == 403 and "'..'" in err.value.message
    assert confine_path(str(tmp_path / "videos"), ".//b.mp4") == os.path.realpath(tmp_path / "videos" / "b.mp4")
    assert confine_path("/", str(tmp_path / "videos" / "b.mp4")) == os.path.realpath(tmp_path / "videos" / "b.mp4")
    with pytest.raises(HttpError) as err:
        confine_path(str(tmp_path), "videos")
    assert err.value.status == 400  # a directory


# -- malformed requests ----------------------------------------------------------------------------
@pytest.mark.parametrize("route, body, ctype, status, message", [
    ("/embed", "{not json", "application/json", 400, "malformed JSON"),
    ("/embed", "[1, 2]", "application/json", 400, "must be an object"),
    ("/embed", {"video": "x"}, "application/json", 400, "missing field 'path'"),
    ("/embed", "hello", "text/plain", 415, "unsupported Content-Type"),
    ("/embed", b"definitely not a video" * 20, "video/mp4", 422, "cannot decode"),
    ("/embed", b"", "video/mp4", 400, "empty"),
    ("/embed", b"--x\r\n", "multipart/form-data", 400, "multipart"),
    ("/search", {"k": 3}, "application/json", 400, "'query'"),
    ("/search", {"query": "a", "k": 0}, "application/json", 400, "'k'"),
    ("/search", {"query": "a", "k": "many"}, "application/json", 400, "'k'"),
    ("/search", "query=a", "application/x-www-form-urlencoded", 415, "application/json"),
    ("/chat", {"path": "000/100000000.mp4"}, "application/json", 400, "'question'"),
])
def test_malformed_requests_get_4xx_json(server, route, body, ctype, status, message):
    code, answer = call_json(server, "POST", route, body, ctype=ctype)
    assert code == status and message in answer["error"], answer


def test_unknown_route_and_wrong_method(server):
    code, body = call_json(server, "GET", "/nothing-here", ctype=None)
    assert code == 404 and "unknown route" in body["error"]
    status, headers, data = call(server, "GET", "/embed")
    assert status == 405 and headers["Allow"] == "POST" and json.loads(data)["status"] == 405
    assert call(server, "POST", "/health", {})[0] == 405


# -- chat ------------------------------------------------------------------------------------------
def test_chat_streams_text_and_sse(server, setup):
    rel = setup["index"].paths[0]
    status, headers, data = call(server, "POST", "/chat", {"path": rel, "question": "what?"}, "application/json")
    assert status == 200 and headers["Transfer-Encoding"] == "chunked" and headers["Content-Type"].startswith("text/")
    assert data.decode() == "The video shows\na square. Q: what?"
    status, headers, data = call(server, "POST", "/chat", {"path": rel, "question": "hi"}, "application/json",
                                 {"Accept": "text/event-stream"})
    events = data.decode().split("\n\n")
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert events[0] == "data: The video " and events[1] == "data: shows\ndata: a square. "
    assert events[3] == "event: done\ndata: {}"
    payload, ctype = multipart({"question": "short", "max_new_tokens": "1", "stream": "false"},
                               {"video": (setup["root"] / rel).read_bytes()})
    code, body = call_json(server, "POST", "/chat", payload, ctype=ctype)
    assert code == 200 and body == {"answer": "The video"}


def test_chat_without_llm_is_501(request, setup):
    plain = copy.copy(setup["bundle"])
    plain.chat = None
    app = start(request, plain)
    code, body = call_json(app, "POST", "/chat", {"path": "a.mp4", "question": "q"})
    assert code == 501 and "--llm" in body["error"]
    code, body = call_json(app, "POST", "/search", {"query": "a"})
    assert code == 501 and "--index" in body["error"]
    code, body = call_json(app, "POST", "/embed", {"path": "a.mp4"})
    assert code == 403 and "no allowed root" in body["error"]


# -- timeouts, load, shutdown ----------------------------------------------------------------------
def test_slow_request_is_504_and_the_server_stays_up(request, setup):
    held = HeldBundle(setup["bundle"])
    request.addfinalizer(held.release.set)
    app = start(request, held, root=setup["root"], timeout_s=0.4, workers=1)
    code, body = call_json(app, "POST", "/embed", {"path": setup["index"].paths[0]})
    assert code == 504 and "0.4 s limit" in body["error"]
    assert not held.release.is_set()  # answered while the decode was still running
    assert call_json(app, "GET", "/health", ctype=None)[0] == 200


def test_concurrent_load_every_response_correct(server, setup):
    b, index = setup["bundle"], setup["index"]
    queries = ["a red square", "a green ball moves up", "a yellow triangle"]
    # every indexed video's true score per query; 'escape.mp4' links to another video: an exact tie whose order
    # batching noise (1e-8) may flip, so a ranking is right when its scores are the top-3 and each path has its score
    true_score = {q: dict(index.search(b.embed_texts([q])[0], len(index.paths))) for q in queries}
    top3 = {q: sorted(true_score[q].values(), reverse=True)[:3] for q in queries}

    def right_ranking(q: str, results: list[dict]) -> bool:
        return len(results) == 3 and all(
            abs(r["score"] - want) < 1e-5 and abs(true_score[q][r["path"]] - r["score"]) < 1e-5
            for r, want in zip(results, top3[q], strict=True))
    paths = [p for p in index.paths if p != "escape.mp4"]  # indexed (the operator's link) but not servable
    want_embed = {p: offline_embedding(setup, p) for p in paths}
    failures: list[str] = []

    def worker(t: int) -> None:
        for j in range(5):
            try:
                if (t + j) % 2:
                    q = queries[(t + j) % len(queries)]
                    code, body = call_json(server, "POST", "/search", {"query": q, "k": 3})
                    ok = code == 200 and right_ranking(q, body["results"])
                else:
                    p = paths[(t * 5 + j) % len(paths)]
                    code, body = call_json(server, "POST", "/embed", {"path": p})
                    ok = code == 200 and torch.allclose(torch.tensor(body["embedding"]), want_embed[p], atol=1e-5)
                if not ok:
                    failures.append(f"thread {t} request {j}: {code} {str(body)[:200]}")
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                failures.append(f"thread {t} request {j}: {err!r}")

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads)
    assert failures == []


def test_shutdown_stops_serving(request, setup):
    app = start(request, setup["bundle"])
    assert call_json(app, "GET", "/health", ctype=None)[0] == 200
    app.shutdown()
    assert not app._thread.is_alive()
    with pytest.raises(OSError):
        call(app, "GET", "/health")
    app.shutdown()  # idempotent


def test_expect_100_continue_refuses_an_oversized_body_early(server):
    with socket.create_connection(server.address, timeout=TIMEOUT) as s:
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 50000000\r\n\r\n")
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413") and "Continue" not in reply


# -- a real tiny causal LM -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A ChatEncoderTask checkpoint (video Q-former + projection) and its tiny random Llama directory."""
    from vidlang.serve.testing import tiny_chat_checkpoint, tiny_llm

    base = tmp_path_factory.mktemp("chat")
    words = "a the red blue square moves left right ### Human : < Video > </ Assistant what is this ?".split()
    tiny_llm(base / "llm", words, max_positions=128)
    _, task = tiny_chat_checkpoint(base / "chat.ckpt", base / "llm")
    return base / "chat.ckpt", base / "llm", task


def test_chat_with_a_real_tiny_llm_checkpoint(request, setup, chat_ckpt):
    path, llm_dir, task = chat_ckpt
    bundle = load_bundle(path, llm=str(llm_dir))
    assert bundle.kind == "chat" and bundle.chat is not None and bundle.tokenizer is None
    want = task.encoder.state_dict()
    for name, value in bundle.chat.state_dict().items():  # every weight came from the checkpoint / LLM dir
        assert torch.equal(value, want[name]), name
    app = start(request, bundle, root=setup["root"], timeout_s=30.0)
    rel = setup["index"].paths[0]
    offline = bundle.answer(str(setup["root"] / rel), "what is this ?", max_new_tokens=6)
    assert isinstance(offline, str) and offline  # seed 0: six random words
    status, headers, data = call(app, "POST", "/chat", {"path": rel, "question": "what is this ?",
                                                        "max_new_tokens": 6}, "application/json")
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    assert " ".join(data.decode().split()) == " ".join(offline.split())  # greedy: streamed == offline
    code, body = call_json(app, "POST", "/embed", {"path": rel})
    assert code == 200 and body["tokens_shape"] == [4, 64] and len(body["tokens"]) == 4
    code, body = call_json(app, "POST", "/search", {"query": "a"})
    assert code == 501


def test_serve_command_serves_until_sigterm(setup, monkeypatch, capsys):
    """``vidlang serve`` in this process: index from the cache, root = the index folder, SIGTERM stops it."""
    import signal

    from vidlang.cli import main
    from vidlang.serve import app as app_module

    created: list[ServeApp] = []
    original_init = app_module.ServeApp.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(app_module.ServeApp, "__init__", recording_init)
    seen: dict = {}

    def client() -> None:  # always ends the server, even when a check fails
        try:
            end = time.monotonic() + 60
            while not created and time.monotonic() < end:
                time.sleep(0.05)
            time.sleep(0.3)
            seen["health"] = call_json(created[0], "GET", "/health", ctype=None)
            seen["search"] = call_json(created[0], "POST", "/search", {"query": "a red square", "k": 2})
        except Exception as err:  # noqa: BLE001 - asserted in the main thread
            seen["error"] = repr(err)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    rc = main(["serve", "--ckpt", str(setup["base"] / "ckpt" / "tiny.ckpt"), "--index", str(setup["root"]),
               "--cache", str(setup["base"] / "cache"), "--port", "0", "--quiet", "--timeout-s", "20"])
    thread.join(timeout=10)
    out = capsys.readouterr().out
    assert rc == 0 and "error" not in seen, (seen, out)
    assert "7 cached, 0 embedded" in out and "server stopped" in out
    assert seen["health"][0] == 200 and seen["health"][1]["index"]["videos"] == 7 and seen["health"][1]["paths"]
    assert seen["search"][0] == 200 and len(seen["search"][1]["results"]) == 2
    assert created[0]._closed


def test_keep_alive_connection_serves_several_requests(server, setup):
    conn = http.client.HTTPConnection(*server.address, timeout=TIMEOUT)
    try:
        for method, path, body in [("GET", "/health", None), ("POST", "/search", {"query": "a", "k": 1}),
                                   ("GET", "/nope", None), ("GET", "/health", None)]:
            headers = {"Content-Type": "application/json"} if body else {}
            conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
            resp = conn.getresponse()
            assert resp.status in (200, 404) and json.loads(resp.read())
            assert resp.getheader("Connection") != "close"
    finally:
        conn.close()


def test_a_model_trained_with_another_similarity_warns_that_serving_ranks_by_cosine(setup, tmp_path):
    ckpt = torch.load(setup["base"] / "ckpt" / "tiny.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["contrastive"]["similarity"] == "cosine"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cosine model loads without the warning
        assert load_bundle(setup["base"] / "ckpt" / "tiny.ckpt").similarity == "cosine"
    ckpt["hyper_parameters"]["contrastive"]["similarity"] = "mug"
    torch.save(ckpt, tmp_path / "mug.ckpt")
    with pytest.warns(UserWarning, match=r"contrastive.similarity='mug'.*rank by the cosine"):
        assert load_bundle(tmp_path / "mug.ckpt").similarity == "mug"
