"""The embeddings folder format: what ``vidlang embed`` writes and ``vidlang index build`` reads (docs/embeddings.md).

A folder ``DIR`` holds Parquet shards and one ``manifest.json``, written last (the commit point: a folder without
it is an unfinished run). Each shard has the columns

* ``id`` -- string, unique across the folder (the index's key);
* ``source`` -- string: the video's path or the dataset's key for it;
* ``caption`` -- string or null;
* ``embedding`` -- ``fixed_size_list<float16 | float32>[dim]``, one row per id (more embedding columns may
  follow, e.g. ``text_embedding``; the manifest's ``columns`` maps each to its modality),

and carries the folder's header (format, version, dim, dtype, columns, model) as JSON under the Parquet schema
metadata key ``vidlang.embeddings``, so a stray shard is recognisable. ``manifest.json``::

    {"format": "vidlang-embeddings", "version": 1, "dim": 512, "dtype": "float16", "normalized": true,
     "columns": {"embedding": "video"}, "count": 1000,
     "model": {"checkpoint_sha256": "...", "checkpoint": "...", "kind": "retrieval", "embed_dim": 512},
     "protocol": {...},  "shards": [{"path": "rank00000-00000.parquet", "rows": 1000}, ...]}

Rows are read in the order of ``shards``, then of the rows in each shard. ``model.checkpoint_sha256`` (the
SHA-256 of the checkpoint file's bytes, :func:`vidlang.serve.inference.file_fingerprint`) is the identity
that searches are checked against; ``protocol`` is free-form (frames, sampler, data config) and informational.
Files of the folder that ``shards`` does not list (a crashed rank's leftovers) are ignored.

:class:`EmbeddingsDir` reads and validates a folder (every problem is an error naming the file);
:func:`write_shard` / :func:`write_manifest` / :func:`write_embeddings` write one, each file atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from vidlang.errors import ConfigError, InputNotFoundError

FORMAT = "vidlang-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
SCHEMA_KEY = b"vidlang.embeddings"
DTYPES = ("float16", "float32")
KEY_COLUMNS = ("id", "source", "caption")


class EmbeddingsFormatError(ConfigError):
    """An embeddings folder or shard that does not follow the format (names the file and the reason)."""


@dataclass(frozen=True)
class ModelInfo:
    """The model that produced embeddings: ``checkpoint_sha256`` is its identity, the rest is informational."""

    checkpoint_sha256: str
    embed_dim: int
    checkpoint: str = ""
    kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint_sha256": self.checkpoint_sha256, "embed_dim": int(self.embed_dim),
                "checkpoint": self.checkpoint, "kind": self.kind, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> ModelInfo:
        if not isinstance(d, dict) or not isinstance(d.get("checkpoint_sha256"), str) or not d["checkpoint_sha256"]:
            raise EmbeddingsFormatError(f"{where}: 'model' must hold the producing checkpoint's 'checkpoint_sha256'")
        if not isinstance(d.get("embed_dim"), int):
            raise EmbeddingsFormatError(f"{where}: 'model.embed_dim' must be an integer")
        known = ("checkpoint_sha256", "embed_dim", "checkpoint", "kind")
        return cls(d["checkpoint_sha256"], d["embed_dim"], str(d.get("checkpoint", "")), str(d.get("kind", "")),
                   {k: v for k, v in d.items() if k not in known})

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike, embed_dim: int, kind: str = "", **extra: Any) -> ModelInfo:
        """The info of a checkpoint file (hashes its bytes)."""
        from vidlang.serve.inference import file_fingerprint

        return cls(file_fingerprint(path), int(embed_dim), str(Path(path).resolve()), kind, dict(extra))


# -- reading -----------------------------------------------------------------------------------------
@dataclass
class Shard:
    path: Path
    rows: int
    start: int  # index of its first row in the folder


class EmbeddingsDir:
    """A validated embeddings folder: its manifest, shards and row count (module docstring).

    Opening checks the manifest, that every listed shard exists with the listed row count, the schema
    (columns, types, dim) and the header of each shard (same model); :meth:`iter_embeddings` checks the values
    (no null, NaN or infinite entries) and :meth:`read_keys` that the ids are unique and non-null.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputNotFoundError(f"{self.path}: no such embeddings folder")
        man = self.path / MANIFEST
        if not man.is_file():
            raise InputNotFoundError(f"{self.path}: no {MANIFEST}: not an embeddings folder, or its run has not "
                                     "finished (the manifest is written last)")
        try:
            self.manifest: dict[str, Any] = json.loads(man.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EmbeddingsFormatError(f"{man}: unreadable manifest ({err})") from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise EmbeddingsFormatError(f"{man}: not a vidlang embeddings manifest (format is not {FORMAT!r})")
        if m.get("version") != VERSION:
            raise EmbeddingsFormatError(f"{man}: format version {m.get('version')!r}; this vidlang reads {VERSION}")
        dim, dtype = m.get("dim"), m.get("dtype")
        if not isinstance(dim, int) or dim < 1:
            raise EmbeddingsFormatError(f"{man}: 'dim' must be a positive integer, got {dim!r}")
        if dtype not in DTYPES:
            raise EmbeddingsFormatError(f"{man}: 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dim, self.dtype = int(dim), str(dtype)
        self.normalized = bool(m.get("normalized", False))
        self.model = ModelInfo.from_dict(m.get("model"), str(man))
        if self.model.embed_dim != self.dim:
            raise EmbeddingsFormatError(f"{man}: model.embed_dim {self.model.embed_dim} != dim {self.dim}")
        cols = m.get("columns", {"embedding": "video"})
        if not isinstance(cols, dict) or "embedding" not in cols:
            raise EmbeddingsFormatError(f"{man}: 'columns' must map embedding columns to modalities, with 'embedding'")
        self.columns: dict[str, str] = {str(k): str(v) for k, v in cols.items()}
        self.protocol: dict[str, Any] = dict(m.get("protocol") or {})
        self.shards = self._shards(man)
        self.count = sum(s.rows for s in self.shards)
        if m.get("count", self.count) != self.count:
            raise EmbeddingsFormatError(f"{man}: 'count' {m.get('count')} != the shards' rows {self.count}")

    def _shards(self, man: Path) -> list[Shard]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        listed = self.manifest.get("shards")
        if not isinstance(listed, list):
            raise EmbeddingsFormatError(f"{man}: 'shards' must be a list of {{'path', 'rows'}}")
        shards: list[Shard] = []
        start = 0
        for entry in listed:
            rel = entry.get("path") if isinstance(entry, dict) else None
            rows = entry.get("rows") if isinstance(entry, dict) else None
            if not isinstance(rel, str) or not isinstance(rows, int) or rows < 0:
                raise EmbeddingsFormatError(f"{man}: bad shard entry {entry!r} (needs 'path' and 'rows')")
            pure = PurePosixPath(rel)
            if pure.is_absolute() or ".." in pure.parts:
                raise EmbeddingsFormatError(f"{man}: shard path {rel!r} must be relative, inside the folder")
            path = self.path / pure
            if not path.is_file():
                raise InputNotFoundError(f"{path}: shard listed in {man} is missing")
            try:
                meta = pq.read_metadata(path)
                schema = pq.read_schema(path)
            except (OSError, pa.ArrowException) as err:
                raise EmbeddingsFormatError(f"{path}: not a readable Parquet file ({err})") from None
            if meta.num_rows != rows:
                raise EmbeddingsFormatError(f"{path}: {meta.num_rows} rows, but {man} lists {rows} "
                                            "(a partial or replaced shard?)")
            self._check_schema(path, schema)
            shards.append(Shard(path, rows, start))
            start += rows
        return shards

    def _check_schema(self, path: Path, schema: Any) -> None:
        import pyarrow as pa

        for name in KEY_COLUMNS:
            if name not in schema.names:
                raise EmbeddingsFormatError(f"{path}: no column {name!r}")
            t = schema.field(name).type
            text = pa.types.is_string(t) or pa.types.is_large_string(t)
            if not (text or (name == "caption" and pa.types.is_null(t))):  # captions may all be null
                raise EmbeddingsFormatError(f"{path}: column {name!r} must be strings, not {t}")
        want = pa.float16() if self.dtype == "float16" else pa.float32()
        for name in self.columns:
            if name not in schema.names:
                raise EmbeddingsFormatError(f"{path}: no column {name!r} (listed in the manifest's 'columns')")
            t = schema.field(name).type
            if not pa.types.is_fixed_size_list(t) or t.list_size != self.dim or t.value_type != want:
                raise EmbeddingsFormatError(f"{path}: column {name!r} is {t}; the manifest says "
                                            f"fixed_size_list<{self.dtype}>[{self.dim}]")
        header = (schema.metadata or {}).get(SCHEMA_KEY)
        if header is None:
            raise EmbeddingsFormatError(f"{path}: no {SCHEMA_KEY.decode()} header: not a vidlang embeddings shard")
        try:
            h = json.loads(header)
        except json.JSONDecodeError as err:
            raise EmbeddingsFormatError(f"{path}: unreadable {SCHEMA_KEY.decode()} header ({err})") from None
        sha = (h.get("model") or {}).get("checkpoint_sha256")
        if sha != self.model.checkpoint_sha256:
            raise EmbeddingsFormatError(f"{path}: written by model {str(sha)[:12]}..., but the manifest says "
                                        f"{self.model.checkpoint_sha256[:12]}... (shards of two runs mixed)")

    def __len__(self) -> int:
        return self.count

    def modality(self, column: str = "embedding") -> str:
        self._column(column)
        return self.columns[column]

    def _column(self, column: str) -> None:
        if column not in self.columns:
            raise ConfigError(f"{self.path}: no embedding column {column!r}; it has {', '.join(self.columns)}")

    def iter_embeddings(self, column: str = "embedding", batch_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 [b, dim])`` batches over the whole folder, in row order."""
        import pyarrow.parquet as pq

        self._column(column)
        for shard in self.shards:
            row = shard.start
            for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=batch_rows, columns=[column]):
                arr = batch.column(0)
                if arr.null_count:
                    raise EmbeddingsFormatError(f"{shard.path}: column {column!r} has null rows")
                x = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), self.dim)
                x = x.astype(np.float32, copy=False)
                if not np.isfinite(x).all():
                    bad = row + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
                    raise EmbeddingsFormatError(f"{shard.path}: row {bad - shard.start} of {column!r} has NaN or "
                                                "infinite values")
                yield row, x
                row += len(arr)

    def read_embeddings(self, column: str = "embedding") -> np.ndarray:
        """All rows of ``column`` as float32 ``[N, dim]`` (for small folders; large ones: :meth:`iter_embeddings`)."""
        out = np.empty((self.count, self.dim), np.float32)
        for start, x in self.iter_embeddings(column):
            out[start:start + len(x)] = x
        return out

    def sample(self, n: int, seed: int = 0, column: str = "embedding") -> np.ndarray:
        """``min(n, N)`` rows drawn uniformly without replacement (seeded), float32 ``[n, dim]``, in row order."""
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(self.count, size=min(n, self.count), replace=False))
        out = np.empty((len(take), self.dim), np.float32)
        filled = 0
        for start, x in self.iter_embeddings(column):
            lo, hi = np.searchsorted(take, [start, start + len(x)])
            out[filled:filled + hi - lo] = x[take[lo:hi] - start]
            filled += hi - lo
        return out

    def read_keys(self) -> Any:
        """The ``id``, ``source``, ``caption`` columns of every row (a ``pyarrow.Table``, row order); raises
        :class:`EmbeddingsFormatError` for null or duplicate ids."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        parts = [pq.read_table(s.path, columns=list(KEY_COLUMNS)) for s in self.shards]
        table = pa.concat_tables(parts) if parts else pa.table(
            {c: pa.array([], pa.string()) for c in KEY_COLUMNS})
        table = table.cast(pa.schema([(c, pa.string()) for c in KEY_COLUMNS]))
        ids = table.column("id")
        if ids.null_count:
            raise EmbeddingsFormatError(f"{self.path}: null ids")
        if table.column("source").null_count:
            raise EmbeddingsFormatError(f"{self.path}: null sources")
        if pc.count_distinct(ids).as_py() != len(ids):
            counts = pc.value_counts(ids)
            dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
            raise EmbeddingsFormatError(f"{self.path}: id {dup!r} appears more than once (ids must be unique)")
        return table


# -- writing -----------------------------------------------------------------------------------------
def _header(dim: int, dtype: str, columns: dict[str, str], model: ModelInfo) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "dim": int(dim), "dtype": dtype, "columns": dict(columns),
            "model": model.to_dict()}


def write_shard(path: str | os.PathLike, ids: Sequence[str], sources: Sequence[str], embeddings: Any,
                model: ModelInfo, captions: Sequence[str | None] | None = None, dtype: str = "float16",
                extra_embeddings: dict[str, tuple[str, Any]] | None = None, dim: int | None = None,
                info: dict[str, Any] | None = None) -> int:
    """Write one shard atomically; returns its row count.

    ``embeddings``: ``[n, dim]`` (numpy or torch); ``extra_embeddings``: column -> (modality, ``[n, dim]``).
    ``dim``: the width when ``n`` may be 0 (default: the arrays'). ``info``: JSON-able facts about the shard
    (``vidlang embed``: its plan position, skipped videos), kept in the header under ``"shard"``
    (:func:`read_shard_info`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vidlang.io import atomic_path

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    columns = {"embedding": "video", **{k: m for k, (m, _) in (extra_embeddings or {}).items()}}
    arrays = {"embedding": embeddings, **{k: x for k, (_, x) in (extra_embeddings or {}).items()}}
    n = len(ids)
    if len(sources) != n or (captions is not None and len(captions) != n):
        raise ValueError(f"ids ({n}), sources ({len(sources)}) and captions must have one entry per row")
    data: dict[str, Any] = {"id": pa.array(list(ids), pa.string()), "source": pa.array(list(sources), pa.string()),
                            "caption": pa.array(list(captions) if captions is not None else [None] * n, pa.string())}
    for name, x in arrays.items():
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
        if x.ndim != 2 or x.shape[0] != n or (dim is not None and x.shape[1] != dim):
            raise ValueError(f"{name}: expected [{n}, dim], got {list(x.shape)}")
        dim = x.shape[1]
        flat = pa.array(np.ascontiguousarray(x, dtype=dtype).reshape(-1))
        data[name] = pa.FixedSizeListArray.from_arrays(flat, dim)
    header = _header(dim or model.embed_dim, dtype, columns, model)
    if info is not None:
        header["shard"] = info
    table = pa.table(data).replace_schema_metadata({SCHEMA_KEY: json.dumps(header).encode()})
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)
    return n


def read_shard_info(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a shard written by :func:`write_shard` (``format``, ``dim``, ``model``, ``shard``, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(SCHEMA_KEY)
    except (OSError, pa.ArrowException) as err:
        raise EmbeddingsFormatError(f"{path}: not a readable Parquet file ({err})") from None
    if raw is None:
        raise EmbeddingsFormatError(f"{path}: no {SCHEMA_KEY.decode()} header: not a vidlang embeddings shard")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise EmbeddingsFormatError(f"{path}: unreadable {SCHEMA_KEY.decode()} header ({err})") from None


def write_manifest(folder: str | os.PathLike, shards: Sequence[tuple[str, int]], dim: int, model: ModelInfo,
                   dtype: str = "float16", normalized: bool = True, columns: dict[str, str] | None = None,
                   protocol: dict[str, Any] | None = None) -> Path:
    """Write ``folder/manifest.json`` atomically (the commit point) for ``shards`` = ``[(relative path, rows)]``."""
    from vidlang.io import atomic_write_text

    manifest = {**_header(dim, dtype, columns or {"embedding": "video"}, model), "normalized": bool(normalized),
                "count": int(sum(r for _, r in shards)), "protocol": dict(protocol or {}),
                "shards": [{"path": str(p), "rows": int(r)} for p, r in shards]}
    path = Path(folder) / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    return path


def write_embeddings(folder: str | os.PathLike, ids: Sequence[str], sources: Sequence[str], embeddings: Any,
                     model: ModelInfo, captions: Sequence[str | None] | None = None, dtype: str = "float16",
                     shard_rows: int = 100_000, normalized: bool = True,
                     protocol: dict[str, Any] | None = None) -> EmbeddingsDir:
    """A whole embeddings folder from in-memory rows (tests, small collections); returns it opened."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x = embeddings.detach().cpu().numpy() if hasattr(embeddings, "detach") else np.asarray(embeddings)
    shards = []
    for i, lo in enumerate(range(0, max(len(ids), 1), shard_rows)):
        hi = min(lo + shard_rows, len(ids))
        name = f"shard-{i:05d}.parquet"
        write_shard(folder / name, ids[lo:hi], sources[lo:hi], x[lo:hi], model,
                    None if captions is None else captions[lo:hi], dtype)
        shards.append((name, hi - lo))
    write_manifest(folder, shards, x.shape[1], model, dtype, normalized, protocol=protocol)
    return EmbeddingsDir(folder)
