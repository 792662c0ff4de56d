"""A folder of videos as a text-searchable index of video embeddings, cached on disk.

``VideoIndex.build(bundle, videos_dir, cache_dir)`` embeds every video under ``videos_dir`` (recursively;
extensions in :data:`VIDEO_EXTENSIONS`, hidden folders skipped) and keeps the result in ``cache_dir``:

* ``embeddings.safetensors`` -- one tensor ``embeddings [N, E]`` (float32, L2-normalised);
* ``manifest.json`` -- ``{"version", "generation", "fingerprint", "dim",
  "videos": {relpath: {"size", "mtime_ns", "row"}}, "failed": {relpath: {"size", "mtime_ns", "error"}}}``.

A later build reuses every cached row whose relative path, size and modification time are unchanged and
whose model fingerprint (checkpoint bytes + preprocessing) matches; only new or changed files are decoded;
removed files are dropped. Videos that cannot be decoded are reported (``VideoIndex.failed``), never
zero-filled, and are not retried until they change. Both files are replaced atomically (:mod:`vidlang.io`)
and carry the same random ``generation``: a cache whose two files come from different builds (a crash
between the two renames) is rebuilt, never read with rows pointing at the wrong embeddings.

``search(text_embeds, k)`` ranks the videos by cosine similarity; equal scores keep path order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
CACHE_VERSION = 2  # 2: embeddings and manifest carry a shared 'generation'


def scan_videos(root: str | os.PathLike) -> dict[str, os.stat_result]:
    """Relative POSIX path -> ``stat`` of every video file under ``root`` (sorted by path)."""
    base = Path(root)
    if not base.is_dir():
        raise NotADirectoryError(f"{base}: not a directory of videos")
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except OSError:  # a dangling symlink
                continue
            if full.is_file():
                found[full.relative_to(base).as_posix()] = st
    return dict(sorted(found.items()))


def _signature(st: os.stat_result) -> dict[str, int]:
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


@dataclass
class BuildStats:
    """What a build did: rows reused from the cache, videos embedded, failures (new and cached), removed."""

    reused: int = 0
    embedded: int = 0
    failed: int = 0
    removed: int = 0
    seconds: float = 0.0


@dataclass
class VideoIndex:
    """``paths`` (relative, sorted) and their normalised ``embeddings [N, E]``; ``failed``: path -> reason."""

    root: Path
    paths: list[str]
    embeddings: Tensor
    failed: dict[str, str] = field(default_factory=dict)
    stats: BuildStats = field(default_factory=BuildStats)

    def __len__(self) -> int:
        return len(self.paths)

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        bundle: Any,
        videos_dir: str | os.PathLike,
        cache_dir: str | os.PathLike,
        batch_size: int = 8,
        progress: bool = True,
    ) -> VideoIndex:
        """Embed (or reuse from ``cache_dir``) every video under ``videos_dir``; see the module docstring."""
        import time

        t0 = time.perf_counter()
        root = Path(videos_dir)
        files = scan_videos(root)
        cached_rows, cached_failed = _load_cache(Path(cache_dir), bundle.fingerprint, bundle.embed_dim)
        stats = BuildStats()
        rows: dict[str, Tensor] = {}
        failed: dict[str, str] = {}
        todo: list[str] = []
        for rel, st in files.items():
            sig = _signature(st)
            if rel in cached_rows and cached_rows[rel][0] == sig:
                rows[rel] = cached_rows[rel][1]
            elif rel in cached_failed and cached_failed[rel][0] == sig:
                failed[rel] = cached_failed[rel][1]
            else:
                todo.append(rel)
        stats.reused = len(rows)
        stats.removed = len((set(cached_rows) | set(cached_failed)) - set(files))
        new_rows, new_failed = _embed_files(bundle, root, todo, batch_size, progress)
        rows.update(new_rows)
        failed.update(new_failed)
        stats.embedded, stats.failed = len(new_rows), len(failed)
        paths = sorted(rows)
        emb = torch.stack([rows[p] for p in paths]) if paths else torch.empty(0, bundle.embed_dim)
        index = cls(root, paths, emb, dict(sorted(failed.items())), stats)
        index.save(Path(cache_dir), bundle.fingerprint, {p: _signature(files[p]) for p in files})
        stats.seconds = time.perf_counter() - t0
        return index

    def save(self, cache_dir: Path, fingerprint: str, signatures: dict[str, dict[str, int]]) -> None:
        """Write ``embeddings.safetensors`` and ``manifest.json``, each atomically, tied by one ``generation``."""
        import secrets

        from safetensors.torch import save_file

        from vidlang.io import atomic_path, atomic_write_text

        cache_dir.mkdir(parents=True, exist_ok=True)
        generation = secrets.token_hex(8)
        manifest = {
            "version": CACHE_VERSION,
            "generation": generation,
            "fingerprint": fingerprint,
            "dim": int(self.embeddings.shape[1]),
            "root": str(self.root.resolve()),
            "videos": {p: {**signatures[p], "row": i} for i, p in enumerate(self.paths)},
            "failed": {p: {**signatures[p], "error": why} for p, why in self.failed.items()},
        }
        with atomic_path(cache_dir / EMBEDDINGS, clean_stale=True) as tmp:
            save_file({"embeddings": self.embeddings.contiguous().float()}, str(tmp), {"generation": generation})
        atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    # -- searching ---------------------------------------------------------------------------------
    def scores(self, text_embeds: Tensor) -> Tensor:
        """Cosine similarity of queries ``[A, E]`` (or ``[E]``) with every video -> ``[A, N]``."""
        q = text_embeds.float()
        q = q[None] if q.dim() == 1 else q
        if q.dim() != 2 or q.shape[1] != self.embeddings.shape[1]:
            dim = self.embeddings.shape[1]
            raise ValueError(f"query embeddings must be [A, {dim}], got {tuple(text_embeds.shape)}")
        return torch.nn.functional.normalize(q, dim=-1) @ self.embeddings.T

    def search_batch(self, text_embeds: Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(relative path, score)`` per query, best first; ties keep path order."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        s = self.scores(text_embeds)  # [A, N]
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]  # [A, k]
        return [[(self.paths[j], float(s[a, j])) for j in row.tolist()] for a, row in enumerate(order)]

    def search(self, text_embeds: Tensor, k: int = 5) -> list[tuple[str, float]]:
        """One query ``[E]`` or ``[1, E]`` -> top-``k`` ``(relative path, score)``, best first."""
        if text_embeds.dim() == 2 and text_embeds.shape[0] != 1:
            raise ValueError(f"search takes one query; use search_batch for {text_embeds.shape[0]}")
        return self.search_batch(text_embeds, k)[0]


def _load_cache(
    cache_dir: Path, fingerprint: str, dim: int
) -> tuple[dict[str, tuple[dict, Tensor]], dict[str, tuple[dict, str]]]:
    """Cached ``rel -> (signature, embedding [E])`` and ``rel -> (signature, error)``; empty when stale."""
    from safetensors import SafetensorError, safe_open

    man_path, emb_path = cache_dir / MANIFEST, cache_dir / EMBEDDINGS
    if not (man_path.is_file() and emb_path.is_file()):
        return {}, {}
    try:
        manifest = json.loads(man_path.read_text())
        with safe_open(str(emb_path), "pt") as f:
            generation = (f.metadata() or {}).get("generation")
            emb = f.get_tensor("embeddings")
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # a damaged cache is rebuilt, never trusted
        print(f"warning: ignoring unreadable index cache {cache_dir}: {err}")
        return {}, {}
    if (manifest.get("version") != CACHE_VERSION or manifest.get("fingerprint") != fingerprint
            or manifest.get("dim") != dim or emb.shape[1:] != (dim,)):
        return {}, {}
    if generation is None or manifest.get("generation") != generation:
        print(f"warning: ignoring index cache {cache_dir}: its two files come from different builds")
        return {}, {}
    sig = ("size", "mtime_ns")
    rows = {
        rel: ({k: e[k] for k in sig}, emb[e["row"]])
        for rel, e in manifest.get("videos", {}).items()
        if 0 <= e.get("row", -1) < emb.shape[0]
    }
    failed = {rel: ({k: e[k] for k in sig}, e["error"]) for rel, e in manifest.get("failed", {}).items()}
    return rows, failed


def _embed_files(
    bundle: Any, root: Path, rels: list[str], batch_size: int, progress: bool
) -> tuple[dict[str, Tensor], dict[str, str]]:
    from vidlang.progress import progress as tqdm  # a live bar on a terminal, lines in a log

    rows: dict[str, Tensor] = {}
    failed: dict[str, str] = {}
    if not rels:
        return rows, failed
    bar = tqdm(total=len(rels), desc="index", unit="video", disable=not progress)
    for ok, embeds, bad in bundle.iter_embed([str(root / r) for r in rels], batch_size):
        for j, i in enumerate(ok):
            rows[rels[i]] = embeds[j].clone()
        for i, err in bad:
            failed[rels[i]] = str(err)
            bar.write(f"warning: skipped {rels[i]}: {err}")
        bar.update(len(ok) + len(bad))
    bar.close()
    return rows, failed


def default_cache_dir(videos_dir: str | os.PathLike) -> Path:
    """``$XDG_CACHE_HOME/vidlang/index/<hash of the folder's real path>`` (default ``~/.cache``)."""
    import hashlib

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(os.path.realpath(videos_dir).encode()).hexdigest()[:16]
    return base / "vidlang" / "index" / key
