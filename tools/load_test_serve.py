"""Load test for ``vidlang serve`` on loopback: bounded concurrent /embed + /search, every answer checked.

Starts ``vidlang serve`` as a subprocess on 127.0.0.1 (an ephemeral port), computes the expected answers
offline with the same checkpoint (embeddings of every video; the top-k of every query), sends
``--threads`` x ``--requests`` requests (alternating /embed of a path and /search), checks each answer
(embedding within ``--atol`` of the offline one; search paths in the offline order, scores within ``--atol``),
prints throughput and latency percentiles, then stops the server with SIGTERM and checks it exits cleanly.

Without ``--ckpt``/``--videos`` it builds a tiny random checkpoint and synthetic videos in a temp folder::

    python tools/load_test_serve.py                      # tiny model, 16 synthetic videos, 8 x 25 requests
    python tools/load_test_serve.py --ckpt run/last.ckpt --videos my_videos --threads 4 --requests 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QUERIES = ["a red square moves left", "a blue circle grows", "a green triangle moves up", "a yellow ball shrinks"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="RetrievalTask checkpoint (default: a tiny random one)")
    p.add_argument("--videos", help="folder of videos (default: 16 synthetic videos)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="requests per thread")
    p.add_argument("--workers", type=int, default=2, help="the server's inference threads")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--timeout-s", type=float, default=60.0, help="client and server per-request limit")
    p.add_argument("--json-out", help="write the numbers to this JSON file")
    return p.parse_args(argv)


def post(port: int, path: str, body: dict, timeout: float) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def start_server(args: argparse.Namespace, ckpt: str, videos: str, cache: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "vidlang.cli", "serve", "--ckpt", ckpt, "--index", videos, "--cache", cache,
           "--host", "127.0.0.1", "--port", "0", "--workers", str(args.workers), "--timeout-s", str(args.timeout_s),
           "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError("the server did not start:\n" + "".join(lines[-30:]))


def expected_answers(ckpt: str, videos: str, cache: str, k: int) -> tuple[dict, dict]:
    """Offline: path -> embedding [E] (list) for every video; query -> [(path, score)] top-k."""
    from vidlang.index import VideoIndex
    from vidlang.inference import load_bundle

    bundle = load_bundle(ckpt)
    index = VideoIndex.build(bundle, videos, cache, progress=False)
    emb = bundle.embed_videos([str(Path(videos) / p) for p in index.paths], batch_size=4)  # [N, E]
    embeds = {p: emb[i].tolist() for i, p in enumerate(index.paths)}
    text = bundle.embed_texts(QUERIES)  # [A, E]
    searches = {q: index.search(text[i], k) for i, q in enumerate(QUERIES)}
    return embeds, searches


def check(kind: str, key: str, status: int, body: dict, embeds: dict, searches: dict, atol: float) -> str | None:
    """None when the answer is right, else a description of what is wrong."""
    if status != 200:
        return f"{kind} {key}: HTTP {status} {body}"
    if kind == "embed":
        got, want = body["embedding"], embeds[key]
        diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
        return None if diff <= atol and body["dim"] == len(want) else f"embed {key}: max diff {diff:.2e}"
    got = [(r["path"], r["score"]) for r in body["results"]]
    want = searches[key]
    if [p for p, _ in got] != [p for p, _ in want]:
        return f"search {key!r}: ranking {got} != {want}"
    diff = max(abs(a[1] - b[1]) for a, b in zip(got, want, strict=True))
    return None if diff <= atol else f"search {key!r}: score diff {diff:.2e}"


def run_load(args: argparse.Namespace, port: int, embeds: dict, searches: dict) -> dict:
    paths = sorted(embeds)
    latencies: dict[str, list[float]] = {"embed": [], "search": []}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for j in range(args.requests):
            if (t + j) % 2 == 0:
                kind, key = "embed", paths[(t * args.requests + j) % len(paths)]
                route, body = "/embed", {"path": key}
            else:
                kind, key = "search", QUERIES[(t + j) % len(QUERIES)]
                route, body = "/search", {"query": key, "k": args.k}
            t0 = time.perf_counter()
            try:
                status, answer = post(port, route, body, args.timeout_s)
                problem = check(kind, key, status, answer, embeds, searches, args.atol)
            except Exception as err:  # noqa: BLE001 - counted as a failed request
                problem = f"{kind} {key}: {type(err).__name__}: {err}"
            dt = time.perf_counter() - t0
            with lock:
                latencies[kind].append(dt)
                if problem:
                    errors.append(problem)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return summarize(latencies, errors, wall)


def _pct(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(latencies: dict[str, list[float]], errors: list[str], wall: float) -> dict:
    every = [x for v in latencies.values() for x in v]
    out = {"requests": len(every), "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 3),
           "req_per_s": round(len(every) / wall, 2)}
    for name, vals in [("all", every), *latencies.items()]:
        if vals:
            out[name] = {"n": len(vals), "p50_ms": round(1000 * _pct(vals, 50), 1),
                         "p95_ms": round(1000 * _pct(vals, 95), 1), "max_ms": round(1000 * max(vals), 1)}
    return out


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[str, str]:
    from vidlang.serve.testing import synthetic_videos, tiny_retrieval_checkpoint

    ckpt = args.ckpt or str(tiny_retrieval_checkpoint(tmp / "ckpt"))
    videos = args.videos or str(synthetic_videos(tmp / "corpus", 16))
    return ckpt, videos


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vidlang_load_") as tmp_name:
        tmp = Path(tmp_name)
        ckpt, videos = prepare(args, tmp)
        cache = str(tmp / "cache")
        embeds, searches = expected_answers(ckpt, videos, cache, args.k)
        proc, port = start_server(args, ckpt, videos, cache)
        try:
            result = run_load(args, port, embeds, searches)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                result_rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                result_rc = "killed after 30 s"
    result.update({"threads": args.threads, "requests_per_thread": args.requests, "server_workers": args.workers,
                   "videos": len(embeds), "server_exit": result_rc, "cpu_count": os.cpu_count()})
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    ok = result["errors"] == 0 and result_rc == 0
    print("OK: every response correct, server exited cleanly" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
