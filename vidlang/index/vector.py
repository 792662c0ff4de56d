"""A FAISS vector index over an embeddings folder, saved with its id map and the producing model's identity.

Saved layout (a folder; one writer at a time)::

    index.json               metadata: kind, parameters, dim, count, model, source folder, file names + sizes
    index-<generation>.faiss the FAISS index (``faiss.write_index``); row i = FAISS label i
    ids-<generation>.parquet the id map: ``id``, ``source``, ``caption`` of row i

Saving writes the two data files under a new random generation (each atomically, :mod:`vidlang.io`), then
replaces ``index.json`` atomically -- the commit point -- and only then removes the previous generation's
files. A crash at any moment leaves either the old index or the new one complete under ``index.json``; the
orphaned files of an unfinished save are removed by the next save to that folder.

Searching (:meth:`VectorIndex.search_batch`) takes query embeddings ``[A, dim]`` (normalised here) and returns
per query the top-``k`` ``(source, cosine score)``, best first, like :class:`vidlang.serve.index.VideoIndex`; an
index refuses a model other than the one whose embeddings it holds (:meth:`VectorIndex.check_model`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vidlang.embeddings import EmbeddingsDir, ModelInfo
from vidlang.errors import ConfigError, InputNotFoundError, ModelMismatchError
from vidlang.index.kinds import AUTO, INDEX_KINDS, IndexKind, auto_kind

FORMAT = "vidlang-vector-index"
VERSION = 1
META = "index.json"


class IndexFormatError(ConfigError):
    """A saved vector index that cannot be read as one (names the file and the reason)."""


@dataclass
class Hit:
    """One search result: the row's ``id``, ``source``, ``caption``, cosine ``score`` and FAISS ``row``."""

    id: str
    source: str
    caption: str | None
    score: float
    row: int


class VectorSource(Protocol):
    """What :func:`build_index` reads: an :class:`~vidlang.embeddings.EmbeddingsDir` or an :class:`ArraySource`."""

    dim: int
    count: int
    model: ModelInfo

    def sample(self, n: int, seed: int = 0) -> np.ndarray: ...

    def iter_embeddings(self) -> Any: ...

    def read_keys(self) -> Any: ...


class ArraySource:
    """In-memory vectors ``[N, dim]`` with ids (default ``"0"``, ``"1"``, ...) as a :class:`VectorSource`."""

    def __init__(self, vectors: np.ndarray, model: ModelInfo, ids: list[str] | None = None,
                 sources: list[str] | None = None, captions: list[str | None] | None = None,
                 batch_rows: int = 65536) -> None:
        self.vectors = np.asarray(vectors)
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be [N, dim], got {list(self.vectors.shape)}")
        self.count, self.dim = self.vectors.shape
        self.model, self.batch_rows = model, batch_rows
        self.ids = ids if ids is not None else [str(i) for i in range(self.count)]
        self.sources = sources if sources is not None else self.ids
        self.captions = captions if captions is not None else [None] * self.count
        self.path = Path("<memory>")
        self.columns = {"embedding": "video"}
        self.protocol: dict[str, Any] = {}

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        take = np.sort(np.random.default_rng(seed).choice(self.count, size=min(n, self.count), replace=False))
        return self.vectors[take].astype(np.float32)

    def iter_embeddings(self) -> Any:
        for lo in range(0, self.count, self.batch_rows):
            yield lo, self.vectors[lo:lo + self.batch_rows].astype(np.float32)

    def read_keys(self) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        table = pa.table({"id": pa.array(self.ids, pa.string()), "source": pa.array(self.sources, pa.string()),
                          "caption": pa.array(self.captions, pa.string())})
        if pc.count_distinct(table.column("id")).as_py() != self.count:
            raise ConfigError("ids must be unique")
        return table


def normalized(x: np.ndarray, what: str = "vector", first_row: int = 0) -> np.ndarray:
    """Rows of ``x`` (float32 ``[n, dim]``) scaled to unit length; a zero row raises :class:`ConfigError`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [n, 1]
    if x.size and not (norms > 0).all():
        raise ConfigError(f"{what} {first_row + int(np.flatnonzero(norms[:, 0] <= 0)[0])} is all zeros "
                          "(cannot be normalised)")
    return x / norms


@contextlib.contextmanager
def faiss_threads(n: int) -> Any:
    """Run the block with ``n`` OpenMP threads in FAISS (0: leave as is)."""
    import faiss

    if n <= 0:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def gpu_count() -> int:
    """GPUs the installed FAISS can use (0 with ``faiss-cpu``)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:
        return 0


class VectorIndex:
    """A built FAISS index, its id map (a ``pyarrow.Table`` with ``id``, ``source``, ``caption``) and metadata."""

    def __init__(self, index: Any, keys: Any, meta: dict[str, Any], path: Path | None = None) -> None:
        self.index, self.keys, self.meta, self.path = index, keys, meta, path
        self.kind_name: str = meta["kind"]
        self.kind: IndexKind = INDEX_KINDS.build(self.kind_name, **meta.get("params", {}))
        self.model = ModelInfo.from_dict(meta["model"], str(path or "index"))
        self.dim, self.count = int(meta["dim"]), int(meta["count"])
        self._sources = keys.column("source")
        self.set_search_params(**meta.get("search_params", {}))

    # -- facts ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.count

    @property
    def failed(self) -> dict[str, str]:
        """Unreadable videos (a folder index has some; embeddings were filtered upstream): none."""
        return {}

    @property
    def search_params(self) -> dict[str, int]:
        return dict(self.meta["search_params"])

    def set_search_params(self, **params: int) -> None:
        """Change search-time parameters (``ef_search``; ``nprobe``, ``k_factor``) for this process."""
        merged = self.kind.search_params(**{**self.meta.get("search_params", {}), **params})
        self.kind.apply_search_params(self.index, merged)
        self.meta["search_params"] = merged

    def check_model(self, bundle: Any, what: str = "the model") -> None:
        """Refuse a model (an :class:`~vidlang.serve.inference.InferenceBundle`) other than the one whose
        embeddings this index holds: :class:`ModelMismatchError`, one line."""
        sha = str(getattr(bundle, "checkpoint_sha256", "") or "")
        want = self.model
        where = self.path or "the index"
        if sha != want.checkpoint_sha256:
            made = f"{want.checkpoint} " if want.checkpoint else ""
            raise ModelMismatchError(
                f"{where}: built from embeddings of checkpoint {made}(sha256 {want.checkpoint_sha256[:12]}), but "
                f"{what} is {('sha256 ' + sha[:12]) if sha else 'of unknown origin'}; search it with that "
                "checkpoint, or embed the videos with this one and rebuild the index")
        dim = int(getattr(bundle, "embed_dim", self.dim))
        if dim != self.dim:
            raise ModelMismatchError(f"{where}: holds {self.dim}-d embeddings, but {what} makes {dim}-d ones")

    # -- searching -----------------------------------------------------------------------------------
    def search_arrays(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries ``[A, dim]`` (or ``[dim]``) -> cosine scores ``[A, k']`` and rows ``[A, k']``, best first
        (``k' = min(k, len)``; rows the index could not fill are -1)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = queries.detach().float().cpu().numpy() if hasattr(queries, "detach") else np.asarray(queries, np.float32)
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query embeddings must be [A, {self.dim}], got {list(q.shape)}")
        k = min(k, self.count)
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        dist, rows = self.index.search(normalized(q, "query"), k)  # [A, k] each
        scores = dist if self.kind.metric == "ip" else 1.0 - dist / 2.0
        return scores.astype(np.float32), rows

    def search_hits(self, queries: Any, k: int = 5) -> list[list[Hit]]:
        """Top-``k`` :class:`Hit` per query, best first."""
        scores, rows = self.search_arrays(queries, k)
        ids, captions = self.keys.column("id"), self.keys.column("caption")
        return [[Hit(ids[r].as_py(), self._sources[r].as_py(), captions[r].as_py(), float(s), int(r))
                 for s, r in zip(srow, rrow, strict=True) if r >= 0] for srow, rrow in zip(scores, rows, strict=True)]

    def search_batch(self, text_embeds: Any, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(source, score)`` per query, best first (the interface of ``VideoIndex``)."""
        scores, rows = self.search_arrays(text_embeds, k)
        return [[(self._sources[r].as_py(), float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
                for srow, rrow in zip(scores, rows, strict=True)]

    def search(self, text_embeds: Any, k: int = 5) -> list[tuple[str, float]]:
        """One query ``[dim]`` or ``[1, dim]`` -> top-``k`` ``(source, score)``, best first."""
        if getattr(text_embeds, "ndim", 1) == 2 and text_embeds.shape[0] != 1:
            raise ValueError(f"search takes one query; use search_batch for {text_embeds.shape[0]}")
        return self.search_batch(text_embeds, k)[0]

    # -- saving and loading ----------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Save to ``folder`` (module docstring: the old index stays whole until the new one is committed)."""
        import faiss
        import pyarrow.parquet as pq

        from vidlang.io import atomic_path, atomic_write_text

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        gen = secrets.token_hex(8)
        files = {"index": f"index-{gen}.faiss", "ids": f"ids-{gen}.parquet"}
        with atomic_path(out / files["index"], clean_stale=True) as tmp:
            faiss.write_index(self.index, str(tmp))
        with atomic_path(out / files["ids"]) as tmp:
            pq.write_table(self.keys, tmp)
        meta = {**self.meta, "generation": gen, "files": files,
                "sizes": {k: (out / name).stat().st_size for k, name in files.items()}}
        atomic_write_text(out / META, json.dumps(meta, indent=1) + "\n")  # the commit point
        self.meta, self.path = meta, out
        for p in out.iterdir():  # the previous generation, and the orphans of unfinished saves
            if p.name.startswith(("index-", "ids-")) and p.name not in files.values():
                with contextlib.suppress(OSError):
                    p.unlink()
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = False, **search_params: int) -> VectorIndex:
        """Read a saved index; ``mmap``: map the FAISS file instead of reading it (kinds that allow it)."""
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(folder)
        meta_path = path / META
        if not meta_path.is_file():
            raise InputNotFoundError(f"{path}: no {META}: not a vector index (build one with vidlang index build)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IndexFormatError(f"{meta_path}: unreadable ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise IndexFormatError(f"{meta_path}: not a vidlang vector index (format is not {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise IndexFormatError(f"{meta_path}: format version {meta.get('version')!r}; this vidlang reads {VERSION}")
        files = meta.get("files") or {}
        for key in ("index", "ids"):
            f = path / str(files.get(key, ""))
            if not files.get(key) or not f.is_file():
                raise IndexFormatError(f"{meta_path}: its {key} file {files.get(key)!r} is missing")
            if f.stat().st_size != (meta.get("sizes") or {}).get(key):
                raise IndexFormatError(f"{f}: {f.stat().st_size} bytes, {META} says {meta['sizes'].get(key)} "
                                       "(truncated or replaced)")
        try:
            index = faiss.read_index(str(path / files["index"]), faiss.IO_FLAG_MMAP if mmap else 0)
            keys = pq.read_table(path / files["ids"])
        except (RuntimeError, OSError, pa.ArrowException) as err:
            raise IndexFormatError(f"{path}: unreadable index files ({str(err).splitlines()[0]})") from None
        if index.ntotal != meta.get("count") or keys.num_rows != meta.get("count") or index.d != meta.get("dim"):
            raise IndexFormatError(f"{path}: the FAISS index ({index.ntotal} x {index.d}), id map ({keys.num_rows} "
                                   f"rows) and {META} (count {meta.get('count')}, dim {meta.get('dim')}) disagree")
        vi = cls(index, keys, meta, path)
        if search_params:
            vi.set_search_params(**search_params)
        return vi


def build_index(source: VectorSource | str | os.PathLike, kind: str = "auto", out: str | os.PathLike | None = None,
                column: str = "embedding", threads: int = 0, gpu: bool | None = None, seed: int = 0,
                progress: bool = False, **params: Any) -> VectorIndex:
    """Build a ``kind`` index over ``source`` (an embeddings folder, or an :class:`ArraySource`); save it to
    ``out`` when given; ``kind="auto"``: :func:`~vidlang.index.kinds.auto_kind` of the collection's size.
    ``params``: the kind's build parameters (:mod:`vidlang.index.kinds`). ``threads``:
    FAISS threads (0: all cores). ``gpu``: train IVF cells on the GPU (None: where the installed FAISS has one)."""
    import faiss

    from vidlang.progress import progress as tqdm

    t0 = time.perf_counter()
    src = EmbeddingsDir(source) if isinstance(source, (str, os.PathLike)) else source
    if isinstance(src, EmbeddingsDir):
        src._column(column)
    if kind == AUTO:
        kind = auto_kind(src.count)
    spec = INDEX_KINDS.build(kind, **params)
    search_params = spec.search_params()
    n, dim = src.count, src.dim
    spec.check_size(n, dim)
    keys = src.read_keys()  # validates the ids before the long part
    use_gpu = gpu_count() > 0 if gpu is None else bool(gpu)
    if use_gpu and gpu_count() == 0:
        raise ConfigError("--gpu: the installed FAISS has no GPU support or sees no GPU (faiss-cpu)")
    factory = spec.factory(dim, n)
    metric = faiss.METRIC_INNER_PRODUCT if spec.metric == "ip" else faiss.METRIC_L2
    with faiss_threads(threads):
        index = faiss.index_factory(dim, factory, metric)
        spec.configure(index)
        if spec.train_rows(n):
            x = normalized(src.sample(spec.train_rows(n), seed), "training vector")
            ivf = _gpu_clustering(index, dim) if use_gpu else None
            index.train(x)
            del x
            if ivf is not None:
                ivf.clustering_index = None  # frees the GPU copy; not part of the saved index
        bar = tqdm(total=n, desc=f"index {kind}", unit="vec", disable=not progress)
        for start, x in _embeddings(src, column):
            index.add(normalized(x, "row", start))
            bar.update(len(x))
        bar.close()
    meta = {
        "format": FORMAT, "version": VERSION, "kind": kind, "params": spec.params(), "factory": factory,
        "metric": "cosine", "search_params": search_params, "dim": dim, "count": n, "model": src.model.to_dict(),
        "embeddings": {"path": str(Path(getattr(src, "path", "")).resolve()) if isinstance(src, EmbeddingsDir)
                       else str(getattr(src, "path", "")), "column": column,
                       "modality": getattr(src, "columns", {}).get(column, "")},
        "protocol": dict(getattr(src, "protocol", {}) or {}),
        "faiss": faiss.__version__, "build_seconds": round(time.perf_counter() - t0, 3), "gpu": use_gpu,
    }
    vi = VectorIndex(index, keys, meta)
    if out is not None:
        vi.save(out)
    return vi


def _embeddings(src: Any, column: str) -> Any:
    return src.iter_embeddings(column) if isinstance(src, EmbeddingsDir) else src.iter_embeddings()


def _gpu_clustering(index: Any, dim: int) -> Any:
    """Run the k-means of an IVF index's cells on every GPU (the dominant cost of building one); returns the
    IVF index (None when ``index`` is not one: nothing to train on the GPU)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
    return ivf


def is_vector_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a saved vector index (its ``index.json`` names the format)."""
    meta = Path(path) / META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def load_index(path: str | os.PathLike, model: Any | None = None, **search_params: int) -> VectorIndex:
    """:meth:`VectorIndex.load`, refusing ``model`` (an inference bundle) when it is not the producing one."""
    vi = VectorIndex.load(path, **search_params)
    if model is not None:
        vi.check_model(model)
    return vi
