"""``vidlang index build`` / ``vidlang index info``: FAISS vector indexes over an embeddings folder (docs/index.md)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from vidlang.commands import COMMANDS
from vidlang.errors import ConfigError

DEFAULT_KIND = "auto"


def parse_params(items: Sequence[str], flag: str = "--param") -> dict[str, Any]:
    """``["m=32", "refine=fp16"]`` -> ``{"m": 32, "refine": "fp16"}`` (integers where the value is one)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{flag} {item!r}: expected NAME=VALUE")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            out[name.strip()] = value.strip()
    return out


def _threads(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0 = all cores), got {value}")
    return value


@COMMANDS.register("index")
class IndexCommand:
    help = "build a FAISS vector index over an embeddings folder (flat, hnsw, ivfpq), or describe one"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from vidlang.index.kinds import INDEX_KINDS

        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        b = sub.add_parser("build", help="build an index and save it (atomically) to --out",
                           description="build a vector index over an embeddings folder (docs/embeddings.md) and "
                                       "save it to --out with its id map and the producing model's identity")
        b.add_argument("--embeddings", required=True, help="embeddings folder (manifest.json + Parquet shards)")
        b.add_argument("--out", required=True, help="index folder (created; an index there is replaced atomically)")
        b.add_argument("--kind", default=DEFAULT_KIND, choices=["auto", *INDEX_KINDS.names()],
                       help=f"index kind (default {DEFAULT_KIND}: flat below 20,000 vectors, else ivfpq; see "
                            "docs/index.md)")
        b.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a build or default search parameter of the kind, repeatable: hnsw m, ef_construction, "
                            "ef_search; ivfpq nlist, pq, refine, nprobe, k_factor, train_size")
        b.add_argument("--column", default="embedding", help="embedding column to index (default embedding)")
        b.add_argument("--threads", type=_threads, default=0, help="FAISS threads (default 0 = all cores)")
        b.add_argument("--gpu", choices=("auto", "on", "off"), default="auto",
                       help="train IVF cells on the GPU: auto (where the installed FAISS has one), on, off")
        b.add_argument("--seed", type=int, default=0, help="seed of the training sample (default 0)")
        b.add_argument("--quiet", action="store_true", help="no progress bar")
        i = sub.add_parser("info", help="describe a saved index", description="describe a saved vector index")
        i.add_argument("path", help="index folder")

    def run(self, args: argparse.Namespace) -> int:
        return self.build(args) if args.action == "build" else self.info(args)

    @staticmethod
    def build(args: argparse.Namespace) -> int:
        from pathlib import Path

        from vidlang.index import build_index, is_vector_index

        out = Path(args.out)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_vector_index(out))):
            raise ConfigError(f"--out {out}: exists and is not a vector index; give a new or empty folder")
        gpu = {"auto": None, "on": True, "off": False}[args.gpu]
        vi = build_index(args.embeddings, args.kind, out, column=args.column, threads=args.threads, gpu=gpu,
                         seed=args.seed, progress=not args.quiet, **parse_params(args.param))
        size = sum(vi.meta["sizes"].values()) / 2**20
        print(f"built {vi.kind_name} index ({vi.meta['factory']}) of {len(vi)} x {vi.dim} in "
              f"{vi.meta['build_seconds']:.1f} s -> {out} ({size:.1f} MiB); search {vi.search_params}")
        return 0

    @staticmethod
    def info(args: argparse.Namespace) -> int:
        from vidlang.index import load_index

        vi = load_index(args.path)
        m = vi.meta
        print(f"{args.path}: {vi.kind_name} ({m['factory']}), {len(vi)} x {vi.dim}, metric cosine")
        print(f"  build parameters: {m['params']}; search: {vi.search_params}")
        print(f"  model: checkpoint {vi.model.checkpoint or '?'} (sha256 {vi.model.checkpoint_sha256[:16]}...)")
        e = m.get("embeddings", {})
        print(f"  embeddings: {e.get('path')} (column {e.get('column')}, {e.get('modality') or '?'})")
        print("  files: " + ", ".join(f"{m['files'][k]} ({m['sizes'][k] / 2**20:.1f} MiB)" for k in m["files"]))
        print(f"  faiss {m.get('faiss')}, built in {m.get('build_seconds')} s (gpu: {m.get('gpu')})")
        return 0
