"""Attack and overload scenarios for ``vidlang serve``, each printed as a table (companion of load_test_serve.py).

Scenarios (``--only`` picks some; default: all):

* ``hostile``    -- malformed and oversized requests sent over raw sockets: the status each gets, whether
  the answer is JSON, how long it took; then clients that disconnect before the answer; then the number
  of tracebacks in the server's log (for a server this tool started).
* ``multipart``  -- one multipart body of 200,000 tiny parts (~12 MB) to /embed.
* ``starvation`` -- two /search requests with an 8 MB query, while ``--clients`` ordinary clients send
  /embed + /search: the ordinary requests' latency and errors meanwhile.
* ``slowloris``  -- 50 connections dripping one byte a second (half into the headers, half into a body)
  for ``--slowloris-s`` seconds, with ordinary traffic meanwhile: how many are still open at the end.
* ``shutdown``   -- SIGTERM while ordinary traffic and two huge queries are in flight: the seconds until
  the process exits and what the clients got (needs a server this tool starts).

The server under test is chosen as in ``tools/load_test_serve.py`` (``--url``, or ``--code`` to start one from
any checkout), e.g. the old and the new server on the same data::

    python tools/serve_scenarios.py --data /tmp/vl_bench --code /tmp/oldserve --label old
    python tools/serve_scenarios.py --data /tmp/vl_bench --label new
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_test_serve import (  # noqa: E402 - the tools folder is put on the path above
    Server,
    Tally,
    add_server_args,
    expected_answers,
    load_average,
    ms,
    one_request,
    pct,
    prepare_data,
    print_table,
    server_from_url,
    start_server,
)

SCENARIOS = ("hostile", "multipart", "starvation", "slowloris", "shutdown")


# -- raw requests ---------------------------------------------------------------------------------
def raw_request(server: Server, data: bytes, timeout: float = 60.0, linger: bool = True) -> dict:
    """Send ``data`` as is, read the answer until the server closes or the body is complete.

    Returns ``{"status", "json", "seconds", "error", "body"}`` (status None when no answer came)."""
    t0 = time.monotonic()
    out: dict = {"status": None, "json": False, "error": None, "body": b""}
    try:
        with socket.create_connection((server.host, server.port), timeout=timeout) as s:
            try:
                s.sendall(data)
            except OSError as err:  # the server may answer and close before everything is sent
                out["error"] = type(err).__name__
            reply = _read_reply(s, time.monotonic() + timeout)
    except OSError as err:
        out.update(error=type(err).__name__, seconds=round(time.monotonic() - t0, 2))
        return out
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if lines and lines[0].startswith("HTTP/"):
        out["status"] = int(lines[0].split()[1])
        headers = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
        out["json"] = headers.get("content-type", "").startswith("application/json") and _is_json(body)
    out["body"] = body[:200]
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def _read_reply(s: socket.socket, end: float) -> bytes:
    reply = b""
    while time.monotonic() < end:
        s.settimeout(max(0.05, end - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except OSError:
            break
        if not chunk:
            break
        reply += chunk
        head, sep, body = reply.partition(b"\r\n\r\n")
        if sep:
            length = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")[1:]
                           if ln.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
    return reply


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def http_post(path: str, body: bytes, ctype: str = "application/json", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode("latin-1") + body


def make_video(path: Path, args: list[str]) -> Path | None:
    """An H.264 file made by the ffmpeg CLI from ``args`` (lavfi input), or None without ffmpeg."""
    if shutil.which("ffmpeg") is None:
        return None
    if not path.exists():
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args, "-c:v", "libx264", "-preset", "ultrafast",
                        "-pix_fmt", "yuv420p", str(path)], check=True, timeout=300)
    return path


def hostile_cases(tmp: Path) -> list[tuple[str, bytes]]:
    digits = "9" * 5000
    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        ("k with 5,000 digits", http_post("/search", f'{{"query": "a", "k": {digits}}}'.encode())),
        ("k = 10**9", http_post("/search", b'{"query": "a", "k": 1000000000}')),
        ("JSON nested 100,000 deep", http_post("/search", deep)),
        ("query nested 100,000 deep", http_post("/search", b'{"query": ' + deep + b"}")),
        ("non-UTF-8 JSON", http_post("/search", b'{"query": "\xff\xfe"}')),
        ("query of 1 MB", http_post("/search", json.dumps({"query": "red " * 262_144}).encode())),
        ("JSON body of 80 MB announced", b"POST /search HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                                         b"Content-Length: 80000000\r\n\r\n{}"),
        ("two conflicting Content-Length", b"POST /search HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                                           b"Content-Length: 24\r\nContent-Length: 5\r\n\r\n"
                                           b'{"query": "a", "k": 1}  '),
        ("Content-Length: abc", b"POST /search HTTP/1.1\r\nHost: b\r\nContent-Length: abc\r\n\r\n"),
        ("garbage request line", b"THIS IS NOT HTTP\r\n\r\n"),
        ("header of 100 kB", b"GET /health HTTP/1.1\r\nHost: b\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"),
        ("3,000 header lines (24 kB)", b"GET /health HTTP/1.1\r\nHost: b\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n"),
        ("NUL in a path", http_post("/embed", b'{"path": "a\\u0000b.mp4"}')),
        ("path ../ escape", http_post("/embed", b'{"path": "../../../../etc/passwd"}')),
        ("multipart without boundary", http_post("/embed", b"--x\r\n\r\n", ctype="multipart/form-data")),
        ("unknown route", b"GET /nothing HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"),
        ("wrong method", b"GET /embed HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"),
        ("not a video", http_post("/embed", b"not a video" * 100, ctype="video/mp4")),
    ]
    big = make_video(tmp / "huge_frame.mp4", ["-f", "lavfi", "-i", "color=c=red:s=4352x4352:d=0.04", "-r", "25"])
    if big is not None:
        cases.append(("video 4352x4352 (> 4096^2 pixels)", http_post("/embed", big.read_bytes(), "video/mp4")))
    long = make_video(tmp / "three_hours.mp4", ["-f", "lavfi", "-i", "color=c=blue:s=16x16:d=10800:r=1"])
    if long is not None:
        cases.append(("video of 3 hours (16x16, 1 fps)", http_post("/embed", long.read_bytes(), "video/mp4")))
    return cases


def scenario_hostile(server: Server, tmp: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, data in hostile_cases(tmp):
        r = raw_request(server, data, timeout=args.client_timeout_s)
        rows.append({"case": name, "status": r["status"] or f"no answer ({r['error']})", "JSON": r["json"],
                     "seconds": r["seconds"], "answer": r["body"][:70].decode("utf-8", "replace").replace("\n", " ")})
    # clients that hang up before the answer: the server must not log a traceback for them
    before = server.tracebacks()
    body = json.dumps({"query": "a red square", "k": 3}).encode()
    for _ in range(20):
        with socket.create_connection((server.host, server.port), timeout=10) as s:
            s.sendall(http_post("/search", body))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    time.sleep(2.0)
    after = server.tracebacks()
    rows.append({"case": "20 clients hang up before the answer", "status": "-", "JSON": "-", "seconds": "-",
                 "answer": f"tracebacks logged meanwhile: {None if before is None else after - before}"})
    return rows


def scenario_multipart(server: Server, tmp: Path, args: argparse.Namespace) -> list[dict]:
    boundary = uuid.uuid4().hex[:8]
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'.encode()
    body = part * 200_000 + f"--{boundary}--\r\n".encode()
    data = http_post("/embed", body, ctype=f"multipart/form-data; boundary={boundary}")
    r = raw_request(server, data, timeout=args.client_timeout_s)
    return [{"case": f"multipart: 200,000 parts ({len(body) / 2**20:.1f} MB)", "status": r["status"] or
             f"no answer in {args.client_timeout_s:g} s ({r['error']})", "JSON": r["json"], "seconds": r["seconds"],
             "answer": r["body"][:70].decode("utf-8", "replace")}]


# -- ordinary traffic -----------------------------------------------------------------------------
class Traffic:
    """``clients`` threads sending ordinary, checked /embed + /search requests until :meth:`stop`."""

    def __init__(self, server: Server, clients: int, embeds: dict, searches: dict, timeout: float) -> None:
        self.tally = Tally()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(t, server, embeds, searches, timeout), daemon=True)
                        for t in range(clients)]

    def _client(self, t: int, server: Server, embeds: dict, searches: dict, timeout: float) -> None:
        j = 0
        while not self.stop_event.is_set():
            one_request(server, t, j, 1000, embeds, searches, 5, 1e-5, timeout, self.tally)
            j += 1

    def __enter__(self) -> Traffic:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for th in self.threads:
            th.join(timeout=120)

    def summary(self) -> dict:
        every = [x for v in self.tally.latencies.values() for x in v]
        t = self.tally
        return {"ordinary requests": len(every), "p50 ms": ms(pct(every, 50)), "p95 ms": ms(pct(every, 95)),
                "max ms": ms(max(every) if every else float("nan")),
                "errors": f"{sum(t.http_errors.values())} http {dict(t.http_errors) or ''}, {t.resets} resets, "
                          f"{t.refused} refused, {t.timeouts} timeouts, {t.wrong} wrong"}


def huge_query(server: Server, timeout: float, out: list, mb: int = 8) -> None:
    body = json.dumps({"query": "red " * (mb * 2**18), "k": 5}).encode()
    t0 = time.monotonic()
    r = raw_request(server, http_post("/search", body), timeout=timeout)
    out.append((r["status"] or f"no answer ({r['error']})", round(time.monotonic() - t0, 1)))


def scenario_starvation(server: Server, tmp: Path, args: argparse.Namespace, embeds: dict, searches: dict
                        ) -> list[dict]:
    huge: list = []
    with Traffic(server, args.clients, embeds, searches, args.client_timeout_s) as traffic:
        time.sleep(1.0)
        hogs = [threading.Thread(target=huge_query, args=(server, args.client_timeout_s, huge)) for _ in range(2)]
        for th in hogs:
            th.start()
        for th in hogs:
            th.join()
        time.sleep(args.after_s)  # the ordinary traffic once the huge requests were answered
    return [{"case": f"2 x 8 MB query + {args.clients} ordinary clients", **traffic.summary(),
             "huge queries (status, s)": huge}]


def scenario_slowloris(server: Server, tmp: Path, args: argparse.Namespace, embeds: dict, searches: dict
                       ) -> list[dict]:
    n = 50
    closed_at: list[float | None] = [None] * n
    answers: list[int | None] = [None] * n
    t0 = time.monotonic()

    def drip(i: int) -> None:
        try:
            s = socket.create_connection((server.host, server.port), timeout=5)
        except OSError:
            closed_at[i] = 0.0
            return
        if i % 2:  # into a body
            s.sendall(b"POST /search HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 10000\r\n\r\n")
        else:  # into the headers
            s.sendall(b"POST /search HTTP/1.1\r\nHost: b\r\nX-Slow: ")
        s.settimeout(1.0)
        try:
            while time.monotonic() - t0 < args.slowloris_s:
                try:
                    data = s.recv(4096)
                    if not data:
                        break
                    if data.startswith(b"HTTP/1.1 "):
                        answers[i] = int(data.split()[1])
                except TimeoutError:
                    pass
                s.sendall(b"a")
            else:
                return  # still open at the end
        except OSError:
            pass
        finally:
            s.close()
        closed_at[i] = time.monotonic() - t0

    with Traffic(server, args.clients, embeds, searches, args.client_timeout_s) as traffic:
        drips = [threading.Thread(target=drip, args=(i,), daemon=True) for i in range(n)]
        for th in drips:
            th.start()
        for th in drips:
            th.join(timeout=args.slowloris_s + 30)
    closed = sorted(x for x in closed_at if x is not None)
    got = sorted({a for a in answers if a is not None})
    return [{"case": f"{n} slowloris connections ({args.slowloris_s:g} s)", **traffic.summary(),
             "still open at end": n - len(closed), "closed after (s, median/max)":
             f"{pct(closed, 50):.1f}/{max(closed):.1f}" if closed else "-", "their answers": got or "-"}]


def scenario_shutdown(server: Server, tmp: Path, args: argparse.Namespace, embeds: dict, searches: dict
                      ) -> list[dict]:
    if server.proc is None:
        return [{"case": "shutdown", "result": "skipped: needs a server this tool starts (no --url)"}]
    huge: list = []
    traffic = Traffic(server, args.clients, embeds, searches, args.client_timeout_s).__enter__()
    hogs = [threading.Thread(target=huge_query, args=(server, args.client_timeout_s, huge)) for _ in range(2)]
    for th in hogs:
        th.start()
    time.sleep(2.0)
    rc, seconds = server.stop(timeout=90)
    traffic.__exit__(None, None, None)
    for th in hogs:
        th.join()
    t = traffic.tally
    return [{"case": f"SIGTERM with {args.clients} clients + 2 huge queries in flight", "exit status": rc,
             "seconds to exit": seconds, "ordinary ok": len([x for v in t.latencies.values() for x in v])
             - t.errors, "http errors": dict(t.http_errors), "resets": t.resets, "refused (stopped)": t.refused,
             "huge queries": huge}]


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_args(p)
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    p.add_argument("--clients", type=int, default=4, help="ordinary clients during starvation/slowloris/shutdown")
    p.add_argument("--slowloris-s", type=float, default=45.0, help="how long the slowloris connections drip")
    p.add_argument("--after-s", type=float, default=3.0, help="ordinary traffic after the huge queries end")
    p.add_argument("--client-timeout-s", type=float, default=60.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    label = args.label or Path(args.code).name
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="vidlang_scen_") as tmp_name:
        tmp = Path(tmp_name)
        ckpt, videos = prepare_data(args.data, tmp, args.videos_n, args.ckpt, args.videos)
        embeds, searches = expected_answers(ckpt, videos, str(tmp / "expected_cache"), 5)

        def server_for() -> Server:
            if args.url:
                return server_from_url(args.url)
            return start_server(Path(args.code), ckpt, videos, str(tmp / "cache"), tmp / f"server_{time.time()}.log",
                                args.workers, args.timeout_s, args.server_arg)

        server = server_for()
        try:
            for name in chosen:
                if name == "shutdown":
                    continue
                print(f"[{label}] {name} ... (load average {load_average()})", flush=True)
                fn = globals()[f"scenario_{name}"]
                extra = (embeds, searches) if name in ("starvation", "slowloris") else ()
                results[name] = fn(server, tmp, args, *extra)
            tracebacks = server.tracebacks()
        finally:
            rc, seconds = server.stop()
        if "shutdown" in chosen:
            print(f"[{label}] shutdown ... (load average {load_average()})", flush=True)
            fresh = server_for()
            try:
                results["shutdown"] = scenario_shutdown(fresh, tmp, args, embeds, searches)
            finally:
                if fresh.proc is not None and fresh.proc.poll() is None:
                    fresh.stop()
    for name, rows in results.items():
        columns = list(dict.fromkeys(c for r in rows for c in r))
        print_table(rows, columns, f"[{label}] {name}")
    print(f"\n[{label}] tracebacks in the server log: {tracebacks}; exit after SIGTERM: {rc} in {seconds} s; "
          f"load average now {load_average()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"label": label, "results": results, "tracebacks": tracebacks},
                                                  indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
