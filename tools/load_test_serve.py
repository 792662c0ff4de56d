"""Load test for ``vidlang serve``: concurrent /embed + /search from many clients, every answer checked.

The expected answers are computed offline in this process with the same checkpoint and videos (the embedding
of every video; the top-k of every query). The server is either one that is already running (``--url``; it
must serve ``--ckpt`` with ``--index`` = ``--videos``) or one this tool starts as a subprocess on loopback from
the checkout ``--code`` (default: this repository; any older checkout works, which is how an old and a new
server are compared on the same data). ``--threads`` clients each send ``--requests`` requests (alternating an
/embed of a path and a /search, a new connection each), then a table is printed: throughput, latency
percentiles, HTTP errors, connection resets, wrong answers, the server's memory before/after and its exit.

``--data DIR`` keeps the tiny random checkpoint and the synthetic videos between runs (created when missing),
so that two servers are measured on the same files::

    python tools/load_test_serve.py --data /tmp/vl_bench --videos-n 64 --threads 32 --requests 50
    python tools/load_test_serve.py --data /tmp/vl_bench --code /tmp/oldserve --label old   # another checkout
    python tools/load_test_serve.py --data /tmp/vl_bench --url http://127.0.0.1:8000        # a running server
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
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
QUERIES = ["a red square moves left", "a blue circle grows", "a green triangle moves up", "a yellow ball shrinks"]
RESET_ERRORS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.RemoteDisconnected)


# -- data and expected answers --------------------------------------------------------------------
def prepare_data(data: str | None, tmp: Path, n_videos: int, ckpt: str | None = None,
                 videos: str | None = None) -> tuple[str, str]:
    """``(checkpoint, videos folder)``: the given ones, else a tiny random checkpoint and ``n_videos`` synthetic
    videos under ``data`` (reused when present) or ``tmp``."""
    sys.path.insert(0, str(REPO))
    from vidlang.serve.testing import synthetic_videos, tiny_retrieval_checkpoint

    base = Path(data) if data else tmp
    if ckpt is None:
        path = base / "ckpt" / "tiny.ckpt"
        ckpt = str(path if path.is_file() else tiny_retrieval_checkpoint(base / "ckpt"))
    if videos is None:
        folder = base / "corpus" / "videos"
        if not folder.is_dir() or len(list(folder.rglob("*.mp4"))) != n_videos:
            folder = synthetic_videos(base / "corpus", n_videos)
        videos = str(folder)
    return ckpt, videos


def expected_answers(ckpt: str, videos: str, cache: str, k: int) -> tuple[dict, dict]:
    """Offline: path -> embedding [E] (list) for every video; query -> [(path, score)] top-k."""
    sys.path.insert(0, str(REPO))
    from vidlang.serve.index import VideoIndex
    from vidlang.serve.inference import load_bundle

    bundle = load_bundle(ckpt)
    index = VideoIndex.build(bundle, videos, cache, progress=False)
    emb = bundle.embed_videos([str(Path(videos) / p) for p in index.paths], batch_size=4)  # [N, E]
    embeds = {p: emb[i].tolist() for i, p in enumerate(index.paths)}
    text = bundle.embed_texts(QUERIES)  # [A, E]
    searches = {q: index.search(text[i], k) for i, q in enumerate(QUERIES)}
    return embeds, searches


def check(kind: str, key: str, body: dict, embeds: dict, searches: dict, atol: float) -> str | None:
    """None when a 200 answer is right, else a description of what is wrong."""
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


# -- the server under test ------------------------------------------------------------------------
@dataclass
class Server:
    """A server under test: its address and, when this tool started it, its process and log file."""

    host: str
    port: int
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"VmRSS:\s+(\d+) kB", text)
        return round(int(m.group(1)) / 1024, 1) if m else None

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the started server has used so far."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tracebacks(self) -> int | None:
        """How many tracebacks the server has logged (None for a server this tool did not start)."""
        if self.log is None:
            return None
        return sum("Traceback (most recent call last)" in line for line in self.read_log())

    def read_log(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log and self.log.exists() else []

    def stop(self, timeout: float = 60.0) -> tuple[int | str, float]:
        """SIGTERM; ``(exit status or 'killed', seconds to exit)``."""
        if self.proc is None:
            return "not started here", 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | str = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = f"killed after {timeout:g} s"
        return rc, round(time.monotonic() - t0, 2)


def start_server(code: Path, ckpt: str, videos: str, cache: str, log: Path, workers: int, timeout_s: float,
                 extra: list[str]) -> Server:
    """``vidlang serve`` of the checkout ``code`` on 127.0.0.1 (ephemeral port); its output goes to ``log``."""
    cmd = [sys.executable, "-m", "vidlang.cli", "serve", "--ckpt", ckpt, "--index", videos, "--cache", cache,
           "--host", "127.0.0.1", "--port", "0", "--workers", str(workers), "--timeout-s", str(timeout_s),
           "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    out = open(log, "w")  # noqa: SIM115 - kept open for the server's life
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(code))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", text)
        if m:
            return Server("127.0.0.1", int(m.group(1)), proc, log)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start:\n" + log.read_text(errors="replace")[-3000:])


def server_from_url(url: str) -> Server:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"--url must be http://host:port, got {url!r}")
    return Server(parts.hostname, parts.port or 80)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """Options shared with ``tools/serve_scenarios.py``: the data and the server under test."""
    p.add_argument("--data", help="folder keeping the tiny checkpoint + synthetic videos between runs")
    p.add_argument("--videos-n", type=int, default=64, help="synthetic videos to make (default 64)")
    p.add_argument("--ckpt", help="RetrievalTask checkpoint (default: a tiny random one)")
    p.add_argument("--videos", help="folder of videos (default: --videos-n synthetic videos)")
    p.add_argument("--url", help="test this running server (it must serve --ckpt with --index --videos)")
    p.add_argument("--code", default=str(REPO), help="checkout whose vidlang runs the started server")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for the started server (repeat), e.g. --server-arg=--batch-window-ms=0")
    p.add_argument("--workers", type=int, default=2, help="the started server's --workers")
    p.add_argument("--timeout-s", type=float, default=30.0, help="the started server's --timeout-s")
    p.add_argument("--label", default=None, help="name of this server in the table (default: --code's name)")
    p.add_argument("--json-out", help="also write the numbers to this JSON file")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# -- requests -------------------------------------------------------------------------------------
def post(server: Server, path: str, body: dict | bytes, timeout: float, ctype: str = "application/json"
         ) -> tuple[int, dict | None]:
    """One request on a new connection: ``(status, JSON body or None)``."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        data = json.dumps(body) if isinstance(body, dict) else body
        conn.request("POST", path, body=data, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


@dataclass
class Tally:
    """Latencies (seconds) per request kind and the failures, by class."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"embed": [], "search": []})
    http_errors: dict[int, int] = field(default_factory=dict)
    resets: int = 0
    refused: int = 0
    timeouts: int = 0
    other: int = 0
    wrong: int = 0
    samples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, dt: float, status: int | None, problem: str | None, err: BaseException | None
               ) -> None:
        with self.lock:
            self.latencies[kind].append(dt)
            if err is not None:
                if isinstance(err, RESET_ERRORS):
                    self.resets += 1
                elif isinstance(err, ConnectionRefusedError):
                    self.refused += 1
                elif isinstance(err, TimeoutError):
                    self.timeouts += 1
                else:
                    self.other += 1
                problem = f"{kind}: {type(err).__name__}: {err}"
            elif status != 200:
                self.http_errors[status] = self.http_errors.get(status, 0) + 1
            elif problem:
                self.wrong += 1
            if problem and len(self.samples) < 5:
                self.samples.append(problem)

    @property
    def errors(self) -> int:
        return sum(self.http_errors.values()) + self.resets + self.refused + self.timeouts + self.other + self.wrong


def one_request(server: Server, t: int, j: int, n: int, embeds: dict, searches: dict, k: int, atol: float,
                timeout: float, tally: Tally, mix: str = "mixed") -> None:
    """Request ``j`` of client ``t`` (out of ``n`` per client), checked: an /embed of a path or a /search
    (``mix``: alternating, ``embed`` only or ``search`` only)."""
    paths = sorted(embeds)
    if mix == "embed" or (mix == "mixed" and (t + j) % 2 == 0):
        kind, key = "embed", paths[(t * n + j) % len(paths)]
        route, body = "/embed", {"path": key}
    else:
        kind, key = "search", QUERIES[(t + j) % len(QUERIES)]
        route, body = "/search", {"query": key, "k": k}
    t0 = time.perf_counter()
    status, problem, error = None, None, None
    try:
        status, answer = post(server, route, body, timeout)
        if status == 200:
            problem = check(kind, key, answer, embeds, searches, atol) if answer else f"{kind}: not JSON"
        else:
            problem = f"{kind} {key}: HTTP {status} {str(answer)[:160]}"
    except Exception as err:  # noqa: BLE001 - every failure is counted by class
        error = err
    tally.record(kind, time.perf_counter() - t0, status, problem, error)
    if isinstance(error, ConnectionRefusedError):
        time.sleep(0.1)  # nobody listens (e.g. the server is stopping): no busy loop


def run_load(server: Server, threads: int, requests: int, embeds: dict, searches: dict, k: int, atol: float,
             timeout: float, mix: str = "mixed") -> tuple[Tally, float]:
    tally = Tally()

    def client(t: int) -> None:
        for j in range(requests):
            one_request(server, t, j, requests, embeds, searches, k, atol, timeout, tally, mix)

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    return tally, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (inclusive method); NaN for no values."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{1000 * seconds:.0f}"


def print_table(rows: list[dict], columns: list[str], title: str) -> None:
    """A plain-text table: one row per dict, the given columns."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_args(p)
    p.add_argument("--threads", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--requests", type=int, default=50, help="requests per client (default 50)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--client-timeout-s", type=float, default=60.0)
    p.add_argument("--mix", choices=["mixed", "embed", "search"], default="mixed",
                   help="the requests: /embed and /search alternating (default), or only one of them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    label = args.label or Path(args.code).name
    with tempfile.TemporaryDirectory(prefix="vidlang_load_") as tmp_name:
        tmp = Path(tmp_name)
        ckpt, videos = prepare_data(args.data, tmp, args.videos_n, args.ckpt, args.videos)
        embeds, searches = expected_answers(ckpt, videos, str(tmp / "expected_cache"), args.k)
        if args.url:
            server = server_from_url(args.url)
        else:
            server = start_server(Path(args.code), ckpt, videos, str(tmp / "cache"), tmp / "server.log",
                                  args.workers, args.timeout_s, args.server_arg)
        load_before = load_average()
        try:
            rss0, cpu0, own0 = server.rss_mb(), server.cpu_s(), time.process_time()
            tally, wall = run_load(server, args.threads, args.requests, embeds, searches, args.k, args.atol,
                                   args.client_timeout_s, args.mix)
            rss1, cpu1, own1 = server.rss_mb(), server.cpu_s(), time.process_time()
            tracebacks = server.tracebacks()
        finally:
            rc, exit_s = server.stop()
            if rc not in (0, "not started here"):
                print(f"the server exited with {rc}; the end of its log:\n" + "\n".join(server.read_log()[-30:]))
    every = [x for v in tally.latencies.values() for x in v]
    row = {
        "server": label, "requests": len(every), "req/s": f"{len(every) / wall:.1f}",
        "p50 ms": ms(pct(every, 50)), "p95 ms": ms(pct(every, 95)), "max ms": ms(max(every)),
        "embed p50": ms(pct(tally.latencies["embed"], 50)), "search p50": ms(pct(tally.latencies["search"], 50)),
        "http errors": sum(tally.http_errors.values()), "resets": tally.resets, "refused": tally.refused,
        "timeouts": tally.timeouts, "wrong": tally.wrong,
        "server CPU ms/req": "-" if cpu0 is None else f"{1000 * (cpu1 - cpu0) / len(every):.1f}",
        "client CPU ms/req": f"{1000 * (own1 - own0) / len(every):.1f}", "rss MB before/after": f"{rss0}/{rss1}",
        "tracebacks": tracebacks,
        "exit": f"{rc} in {exit_s} s", "load avg": f"{load_before} -> {load_average()}",
    }
    what = {"mixed": "/embed of a path and /search alternating", "embed": "/embed of a path",
            "search": "/search"}[args.mix]
    print_table([row], list(row), f"load test: {args.threads} clients x {args.requests} requests ({what}), "
                                  f"{len(embeds)} videos, {os.cpu_count()} CPUs")
    if tally.http_errors:
        print(f"HTTP errors by status: {tally.http_errors}")
    for sample in tally.samples:
        print(f"  e.g. {sample}")
    result = {**row, "http_errors_by_status": tally.http_errors, "samples": tally.samples,
              "threads": args.threads, "requests_per_client": args.requests, "wall_s": round(wall, 2),
              "server_workers": args.workers, "videos": len(embeds), "cpu_count": os.cpu_count()}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    ok = tally.errors == 0 and rc in (0, "not started here")
    print("OK: every response correct" + (", server exited cleanly" if server.proc else "") if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
