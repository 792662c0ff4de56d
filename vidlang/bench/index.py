"""``vidlang bench index``: build time, memory, query latency and recall@k of every vector index kind.

Data: ``--n`` synthetic ``--dim``-d unit vectors (seeded), a Gaussian mixture of ``--centres`` clusters whose
noise has a decaying spectrum (``sigma_i ~ i^-1/2`` in a random basis, total norm ``--spread``), so neighbours
are structured like real embeddings rather than equidistant as in isotropic noise; ``--queries`` queries are
data points plus half that noise. Ground truth: exact inner-product search (FAISS ``IndexFlatIP``, all threads).

Per kind (built once with ``--param``) and per search setting (``--sweep``): build seconds, resident memory the
built index added (RSS after - before, MiB), size on disk (MiB, saved to a temporary folder), single-query
latency p50 / p95 (``--latency-queries`` queries one at a time on ``--latency-threads`` threads, through
:meth:`VectorIndex.search_arrays`: normalisation included), and recall@k (all queries, batched) against the
exact top-k. The load average is printed before and after: the machine is often shared.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import shlex
import sys
import tempfile
import time
from typing import Any

from vidlang.bench import BENCHMARKS

DEFAULT_SWEEPS = {"flat": {}, "hnsw": {"ef_search": [64, 128, 256, 512, 1024]},
                  "ivfpq": {"nprobe": [16, 32, 64, 128], "k_factor": [4, 16, 64]}}


def synthetic_vectors(n: int, dim: int, centres: int, queries: int, seed: int = 0, spread: float = 1.0,
                      chunk: int = 65536) -> tuple[Any, Any]:
    """``(data [n, dim], queries [queries, dim])``, float32, unit rows (module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((centres, dim), dtype=np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)  # [dim, dim] orthonormal
    spectrum = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    spectrum *= spread / np.sqrt((spectrum**2).sum())  # E|noise| ~ spread

    def noise(rows: int, scale: float) -> Any:
        return (rng.standard_normal((rows, dim), dtype=np.float32) * (spectrum * scale)) @ basis.T

    x = np.empty((n, dim), np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x[lo:hi] = centre[rng.integers(0, centres, hi - lo)] + noise(hi - lo, 1.0)
        x[lo:hi] /= np.linalg.norm(x[lo:hi], axis=1, keepdims=True)
    q = x[rng.integers(0, n, queries)] + noise(queries, 0.5)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def rss_mib() -> float:
    """Resident memory of this process (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def recall_at_k(found: Any, exact: Any) -> float:
    """Mean over queries of |found_i & exact_i| / k (rows ``[A, k]``; -1 entries never match)."""
    k = exact.shape[1]
    return float(sum(len(set(f[f >= 0].tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True))
                 / (k * len(exact)))


def _parse_kind_items(items: list[str], flag: str, lists: bool) -> dict[str, dict[str, Any]]:
    """``["hnsw.m=16", ...]`` -> ``{"hnsw": {"m": 16}}`` (``lists``: values are comma lists of integers)."""
    from vidlang.commands.index import parse_params
    from vidlang.errors import ConfigError

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        kind, dot, rest = item.partition(".")
        if not dot:
            raise ConfigError(f"{flag} {item!r}: expected KIND.NAME=VALUE")
        if lists:
            name, _, values = rest.partition("=")
            try:
                out.setdefault(kind, {})[name] = [int(v) for v in values.split(",")]
            except ValueError:
                raise ConfigError(f"{flag} {item!r}: values must be integers, comma separated") from None
        else:
            out.setdefault(kind, {}).update(parse_params([rest], flag))
    return out


@BENCHMARKS.register("index")
class IndexBench:
    help = "vector indexes: build time, memory, latency p50/p95 and recall@k per kind on synthetic vectors"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, default=1_000_000, help="vectors indexed (default 1,000,000)")
        parser.add_argument("--dim", type=int, default=512, help="dimensions (default 512)")
        parser.add_argument("--centres", type=int, default=4096, help="mixture components (default 4096)")
        parser.add_argument("--spread", type=float, default=1.0,
                            help="norm of the within-cluster noise (default 1.0; the centres are unit vectors)")
        parser.add_argument("--queries", type=int, default=1000, help="queries for recall (default 1000)")
        parser.add_argument("--latency-queries", type=int, default=500,
                            help="queries timed one at a time (default 500)")
        parser.add_argument("--latency-threads", type=int, default=1,
                            help="FAISS threads while timing single queries (default 1: one query per core)")
        parser.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
        parser.add_argument("--kinds", default="flat,hnsw,ivfpq", help="kinds to build (default flat,hnsw,ivfpq)")
        parser.add_argument("--param", action="append", default=[], metavar="KIND.NAME=VALUE",
                            help="a build parameter, e.g. hnsw.m=16 (repeatable)")
        parser.add_argument("--sweep", action="append", default=[], metavar="KIND.NAME=V1,V2",
                            help="search settings to measure, e.g. hnsw.ef_search=32,64 (repeatable; replaces "
                                 "that kind's default sweep; several names: every combination)")
        parser.add_argument("--threads", type=int, default=0, help="FAISS threads to build (default 0 = all)")
        parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
        parser.add_argument("--no-save", action="store_true", help="skip saving (no size on disk)")

    def run(self, args: argparse.Namespace) -> int:
        import faiss

        from vidlang.embeddings import ModelInfo
        from vidlang.index import INDEX_KINDS, ArraySource, build_index
        from vidlang.index.vector import faiss_threads

        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        for kind in kinds:
            INDEX_KINDS.get(kind)
        params = _parse_kind_items(args.param, "--param", lists=False)
        sweeps = {k: dict(DEFAULT_SWEEPS.get(k, {})) for k in kinds}
        for kind, given in _parse_kind_items(args.sweep, "--sweep", lists=True).items():
            sweeps[kind] = given
        load0 = os.getloadavg()
        print(f"$ {' '.join(shlex.quote(a) for a in ['vidlang', *sys.argv[1:]])}" if sys.argv[1:] else "", flush=True)
        print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs); "
              f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
        t = time.perf_counter()
        x, q = synthetic_vectors(args.n, args.dim, args.centres, args.queries, args.seed, args.spread)
        print(f"data: {args.n} x {args.dim} ({args.centres} centres, spread {args.spread}), {len(q)} queries, "
              f"generated in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(x)
        truth = exact.search(q, args.k)[1]  # [Q, k]
        del exact
        print(f"exact top-{args.k}: {time.perf_counter() - t:.1f} s", flush=True)
        model = ModelInfo("0" * 64, args.dim, "<synthetic>")
        rows: list[list[str]] = []
        for kind in kinds:
            gc.collect()
            before = rss_mib()
            vi = build_index(ArraySource(x, model), kind, threads=args.threads, **params.get(kind, {}))
            gc.collect()
            added = rss_mib() - before
            disk = self._disk_mib(vi) if not args.no_save else float("nan")
            build_s = vi.meta["build_seconds"]
            names = [n for n in sweeps[kind] if n in vi.search_params]  # e.g. no k_factor without refine
            for values in itertools.product(*(sweeps[kind][n] for n in names)) if names else [()]:
                setting = dict(zip(names, values, strict=True))
                vi.set_search_params(**setting)
                found = vi.search_arrays(q, args.k)[1]
                recall = recall_at_k(found, truth)
                p50, p95 = self._latency(vi, q[:args.latency_queries], args.k, args.latency_threads, faiss_threads)
                shown = ", ".join(f"{k}={v}" for k, v in vi.search_params.items()) or "-"
                rows.append([kind, vi.meta["factory"], shown, f"{build_s:.1f}", f"{added:.0f}", f"{disk:.0f}",
                             f"{p50:.2f}", f"{p95:.2f}", f"{recall:.4f}"])
                print("  " + " | ".join(rows[-1]), flush=True)
            del vi
        load1 = os.getloadavg()
        print()
        print(f"{args.n} x {args.dim} vectors, {len(q)} queries, k={args.k}; latency: one query at a time on "
              f"{args.latency_threads} thread(s), {min(args.latency_queries, len(q))} queries")
        print(_table(["kind", "factory", "search", "build s", "RSS +MiB", "disk MiB", "p50 ms", "p95 ms",
                      f"recall@{args.k}"], rows))
        print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; after: {load1[0]:.2f} "
              f"{load1[1]:.2f} {load1[2]:.2f}")
        return 0

    @staticmethod
    def _disk_mib(vi: Any) -> float:
        with tempfile.TemporaryDirectory(prefix="vidlang-bench-index-") as tmp:
            vi.save(tmp)
            return sum(vi.meta["sizes"].values()) / 2**20

    @staticmethod
    def _latency(vi: Any, queries: Any, k: int, threads: int, faiss_threads: Any) -> tuple[float, float]:
        import numpy as np

        times = []
        with faiss_threads(threads):
            vi.search_arrays(queries[:1], k)  # warm-up
            for row in queries:
                t0 = time.perf_counter()
                vi.search_arrays(row[None], k)
                times.append((time.perf_counter() - t0) * 1e3)
        return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
