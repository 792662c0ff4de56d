"""Retrieval-augmented chat (vidlang/serve/rag.py): a question about a collection is answered from exactly the
top-k clips of an independent search (their chat-encoder tokens, in rank order), over the library, ``/chat``
(JSON, SSE, text) and ``vidlang chat --index``; ``k`` is validated; no index / another checkpoint's index is a
clear error."""

from __future__ import annotations

import http.client
import json

import pytest
import torch

from vidlang.cli import main
from vidlang.embeddings import ModelInfo
from vidlang.index import ArraySource, build_index, load_index
from vidlang.models.chat import collection_media
from vidlang.serve import ServeApp, ServeConfig
from vidlang.serve.inference import load_bundle
from vidlang.serve.rag import CollectionRetriever, answer_collection
from vidlang.serve.testing import synthetic_videos, tiny_retrieval_checkpoint

QUESTION = "which clip shows a red square ?"


def chat_checkpoint(base):
    """A ChatEncoderTask checkpoint (vit_tiny + Q-former of 4 queries) and its tiny random Llama directory."""
    from vidlang.serve.testing import tiny_chat_checkpoint, tiny_llm

    words = "a the red blue square moves left right ### Human : < Video > </ Assistant which clip shows ? 1 2 3".split()
    tiny_llm(base / "llm", words, max_positions=256)
    tiny_chat_checkpoint(base / "chat.ckpt", base / "llm")
    return base / "chat.ckpt", base / "llm"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("rag")
    rckpt = tiny_retrieval_checkpoint(base / "retrieval")
    videos = synthetic_videos(base / "corpus", 6)
    paths = sorted(str(p) for p in videos.rglob("*.mp4"))
    text = load_bundle(rckpt)
    vectors = text.embed_videos(paths).numpy()
    info = ModelInfo.of_checkpoint(rckpt, text.embed_dim, kind="retrieval")
    ids = [f"clip{i}" for i in range(len(paths))]
    build_index(ArraySource(vectors, info, ids=ids, sources=paths), kind="flat", out=base / "idx")
    chat_ckpt, llm = chat_checkpoint(base / "chat")
    chat = load_bundle(chat_ckpt, llm=str(llm))
    index = load_index(base / "idx")
    return {"base": base, "rckpt": rckpt, "text": text, "index": index, "chat": chat, "chat_ckpt": chat_ckpt,
            "llm": llm, "paths": paths}


def independent_top(setup, question, k):
    """The top-k hits by the retrieval checkpoint's text tower and the index, without the RAG code."""
    return setup["index"].search_hits(setup["text"].embed_texts([question]), k)[0]


def expected_tokens(setup, path):
    chat = setup["chat"]
    with torch.no_grad():
        return chat.chat.media_tokens(chat.normalize(chat.decode_clip(path)[None]))[0]  # [Q, d]


@pytest.fixture()
def recorded(setup, monkeypatch):
    """The media tokens the chat encoder's collection prompt receives, per call."""
    calls = []
    enc = setup["chat"].chat
    inner = enc.collection_sequence

    def spy(media, question):
        calls.append([m.detach().clone() for m in media])
        return inner(media, question)

    monkeypatch.setattr(enc, "collection_sequence", spy)
    return calls


def test_collection_prompt_numbers_the_clips(setup):
    assert collection_media(3) == "Clip 1: <ImageHere>\nClip 2: <ImageHere>\nClip 3: <ImageHere>"
    enc = setup["chat"].chat
    media = [torch.randn(4, enc.d_llm) for _ in range(3)]
    seq, labels = enc.collection_sequence(media, QUESTION)
    one, _ = enc.question_sequence(media[0], QUESTION)
    numbering = len(enc._text_ids("Clip 1: \nClip 2: \nClip 3: ")) - len(enc._text_ids(""))
    assert seq.shape[0] > one.shape[0] + 2 * 4  # two more clips' tokens (and their numbering)
    assert numbering > 0 and bool((labels == -100).all())
    with pytest.raises(ValueError, match="at least one clip"):
        enc.collection_sequence([], QUESTION)


@pytest.mark.parametrize("k", [1, 3])
def test_answer_sees_exactly_the_top_k_clips_in_rank_order(setup, recorded, k):
    retriever = CollectionRetriever(setup["text"], setup["index"])
    out = answer_collection(setup["chat"], retriever, QUESTION, k, max_new_tokens=4)
    top = independent_top(setup, QUESTION, k)
    assert [c.id for c in out.clips] == [h.id for h in top] and [c.rank for c in out.clips] == list(range(1, k + 1))
    assert [c.path for c in out.clips] == [h.source for h in top]
    assert [c.score for c in out.clips] == pytest.approx([h.score for h in top], abs=1e-6)
    assert not out.skipped and isinstance(out.answer, str)
    assert len(recorded) == 1 and len(recorded[0]) == k
    for got, hit in zip(recorded[0], top, strict=True):
        torch.testing.assert_close(got, expected_tokens(setup, hit.source))
    # the clips not in the top k are not what the answer saw
    others = [p for p in setup["paths"] if p not in {h.source for h in top}]
    assert not any(torch.allclose(recorded[0][0], expected_tokens(setup, p)) for p in others)


def test_undecodable_clip_is_skipped_and_reported(setup, recorded, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    top = independent_top(setup, QUESTION, 2)
    index = setup["index"]
    retriever = CollectionRetriever(setup["text"], index)
    retriever.resolve = lambda clip: str(bad) if clip.id == top[0].id else clip.path
    out = answer_collection(setup["chat"], retriever, QUESTION, 2, max_new_tokens=2)
    assert [c.id for c in out.clips] == [top[1].id] and [c.id for c, _ in out.skipped] == [top[0].id]
    torch.testing.assert_close(recorded[0][0], expected_tokens(setup, top[1].source))


def test_index_of_another_checkpoint_and_chat_checkpoint_are_refused(setup, tmp_path):
    from vidlang.errors import CheckpointError, ModelMismatchError

    other = load_bundle(tiny_retrieval_checkpoint(tmp_path / "other", seed=1))
    with pytest.raises(ModelMismatchError, match="built from embeddings of checkpoint"):
        CollectionRetriever(other, setup["index"], what="--rag-ckpt other.ckpt")
    with pytest.raises(CheckpointError, match="no text tokenizer"):
        CollectionRetriever(setup["chat"], setup["index"])


# -- /chat -------------------------------------------------------------------------------------------
def call(app, body, headers=None):
    conn = http.client.HTTPConnection(*app.address, timeout=60)
    try:
        conn.request("POST", "/chat", body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                       **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def start(request, setup, rag=True, index=True):
    config = ServeConfig(host="127.0.0.1", port=0, log_requests=False, timeout_s=60.0, decode_processes=0)
    retriever = CollectionRetriever(setup["text"], setup["index"]) if rag else None
    app = ServeApp(setup["chat"], config, index=setup["index"] if index else None, rag=retriever).start()
    request.addfinalizer(app.shutdown)
    return app


def test_chat_route_answers_about_the_collection(server, setup, recorded):
    app = server
    top = independent_top(setup, QUESTION, 2)
    want = [{"rank": r, "id": h.id, "path": h.source} for r, h in enumerate(top, 1)]
    status, _, data = call(app, {"collection": True, "question": QUESTION, "k": 2, "stream": False,
                                 "max_new_tokens": 4})
    body = json.loads(data)
    assert status == 200 and body["k"] == 2 and body["skipped"] == [] and isinstance(body["answer"], str)
    assert [{x: c[x] for x in ("rank", "id", "path")} for c in body["clips"]] == want
    assert [c["score"] for c in body["clips"]] == pytest.approx([h.score for h in top], abs=1e-5)
    for got, hit in zip(recorded[-1], top, strict=True):
        torch.testing.assert_close(got, expected_tokens(setup, hit.source))
    offline = answer_collection(setup["chat"], CollectionRetriever(setup["text"], setup["index"]), QUESTION, 2,
                                max_new_tokens=4).answer
    assert body["answer"] == offline  # greedy: the same answer as the library call
    # server-sent events: the clips in the final 'done' event (and in a header)
    status, headers, data = call(app, {"collection": True, "question": QUESTION, "k": 2, "max_new_tokens": 4},
                                 {"Accept": "text/event-stream"})
    events = data.decode().strip().split("\n\n")
    assert status == 200 and events[-1].startswith("event: done\ndata: ")
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert [c["id"] for c in done["clips"]] == [h.id for h in top]
    assert json.loads(headers["X-Vidlang-Clips"]) == done
    # chunked text: the clips in the header
    status, headers, data = call(app, {"collection": True, "question": QUESTION, "k": 1, "max_new_tokens": 4})
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert [c["id"] for c in json.loads(headers["X-Vidlang-Clips"])["clips"]] == [top[0].id]
    code, _, data = call(app, {"collection": True, "question": QUESTION, "k": 1})
    assert code == 200
    conn = http.client.HTTPConnection(*app.address, timeout=60)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["collection_chat"] is True
    conn.close()


@pytest.fixture(scope="module")
def server(request, setup):
    return start(request, setup)


@pytest.mark.parametrize("k", [0, 17, "2", True, 2.5, None])
def test_chat_route_validates_k(server, k):
    status, headers, data = call(server, {"collection": True, "question": QUESTION, "k": k})
    body = json.loads(data)
    assert status == 400 and headers["Content-Type"] == "application/json" and "'k'" in body["error"], body


def test_chat_route_refuses_bad_collection_requests(request, setup, server):
    app = start(request, setup, rag=False, index=False)
    status, _, data = call(app, {"collection": True, "question": QUESTION})
    body = json.loads(data)
    assert status == 501 and "--index" in body["error"] and "--rag-ckpt" in body["error"] and body["status"] == 501
    app = server
    status, _, data = call(app, {"collection": True, "question": QUESTION, "path": "a.mp4"})
    assert status == 400 and "not both" in json.loads(data)["error"]
    status, _, data = call(app, {"collection": False, "question": QUESTION})
    assert status == 400 and "'collection'" in json.loads(data)["error"]
    status, _, data = call(app, {"collection": True, "question": " "})
    assert status == 400 and "question" in json.loads(data)["error"]


def test_search_uses_the_rag_checkpoint_beside_a_chat_checkpoint(server, setup):
    app = server
    conn = http.client.HTTPConnection(*app.address, timeout=60)
    conn.request("POST", "/search", body=json.dumps({"query": QUESTION, "k": 3}),
                 headers={"Content-Type": "application/json"})
    body = json.loads(conn.getresponse().read())
    conn.close()
    assert [r["path"] for r in body["results"]] == [h.source for h in independent_top(setup, QUESTION, 3)]


# -- command line ------------------------------------------------------------------------------------
def test_cli_chat_about_a_collection(setup, capsys):
    top = independent_top(setup, QUESTION, 2)
    argv = ["chat", "--ckpt", str(setup["chat_ckpt"]), "--llm", str(setup["llm"]), "--index",
            str(setup["base"] / "idx"), "--rag-ckpt", str(setup["rckpt"]), "--k", "2", "--no-stream", QUESTION]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "clips (2 of the top 2):"
    assert [line.split()[0] for line in lines[1:3]] == ["1", "2"]
    assert [line.split()[2] for line in lines[1:3]] == [h.source for h in top]
    assert [line.split()[3] for line in lines[1:3]] == [f"[{h.id}]" for h in top]
    assert main([*argv[:6], *argv[8:]]) == 2  # --index without --rag-ckpt
    assert "--rag-ckpt" in capsys.readouterr().err
    assert main([*argv[:-2], "--k", "17", QUESTION]) == 2
    assert "--k must be in 1..16" in capsys.readouterr().err
